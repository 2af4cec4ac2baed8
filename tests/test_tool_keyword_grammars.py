"""The keyword-argument forcing grammars (pythonic, function_gemma) accept their calls and refuse the rest.

Over a real tokenizer (the tiny LFM2.5 model's: llama-bpe with LFM2's markers as added tokens): each sample
text is tokenized and fed to the compiled grammar, and must be accepted whole (or refused) exactly as the
format's rules say: keywords in declared order, optional ones at most once, one separator between two, each
value of its property's type. The accepted texts parse with the format's own parser. function_gemma has no
chat template in the llama-cpp-python sdist (none writes `<start_function_call>`), so its grammar is tested
here only, with its markers as text.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.engine.constraints import ConstraintFactory, GrammarSpec
from server.serving.tool_formats import FORMATS, detect_format
from server.serving.tool_grammar import arguments_schema, lark_text
from server.serving.tools import ToolCallParser, named_format, tool_format
from tests.native_tool_models import FAMILIES, family_model_dir

SCHEMA = {
    "type": "object",
    "properties": {
        "x": {"type": "integer"},
        "y": {"type": "boolean"},
        "z": {"type": "string"},
        "w": {"type": "array", "items": {"type": "integer"}},
    },
    "required": ["x"],
}
TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": SCHEMA}},
    {
        "type": "function",
        "function": {"name": "g", "parameters": {"type": "object", "properties": {"z": {"type": "string"}}}},
    },
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from mlx_lm.tokenizer_utils import load

    path = family_model_dir(tmp_path_factory.mktemp("kw") / "lfm2.5", FAMILIES["lfm2.5"])
    return load(path)


@pytest.fixture(scope="module")
def factory(tokenizer: Any) -> ConstraintFactory:
    return ConstraintFactory(tokenizer, len(tokenizer.get_vocab()), tokenizer.eos_token_ids)


def _accepts(factory: ConstraintFactory, tokenizer: Any, grammar: str, text: str) -> bool:
    constraint = factory.create(GrammarSpec(kind="lark", text=grammar))
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        constraint.advance(token_id)
        if constraint.error is not None:
            return False
    return constraint.accepting


def _grammar(name: str, tokenizer: Any) -> str:
    return lark_text(named_format(name, True), list(enumerate(TOOLS)), tokenizer)


def _parsed(name: str, text: str) -> list[tuple[str, dict[str, Any]]]:
    parser = ToolCallParser(named_format(name, True), TOOLS)
    _, calls = parser.feed(text)
    calls += parser.finish()[1]
    return [(c.name, json.loads(c.arguments)) for c in calls]


PYTHONIC = [
    ("[f(x=1)]", True, {"x": 1}),
    ("[f(x=1, y=True)]", True, {"x": 1, "y": True}),
    ('[f(x=-3, z="a b")]', True, {"x": -3, "z": "a b"}),
    ('[f(x=1, y=False, z="q", w=[1,2])]', True, {"x": 1, "y": False, "z": "q", "w": [1, 2]}),
    ("[g()]", True, {}),
    ('[g(z="only")]', True, {"z": "only"}),
    ("[f()]", False, None),  # x is required
    ("[f(y=True)]", False, None),
    ("[f(x=1,y=True)]", False, None),  # one separator: ", "
    ('[f(x=1, z="a", y=True)]', False, None),  # declared order
    ("[f(x=1, y=true)]", False, None),  # a boolean is Python's True
    ('[f(x="1")]', False, None),
    ("[f(x=1, x=2)]", False, None),
    ("[h(x=1)]", False, None),
]


@pytest.mark.parametrize("call, accepted, arguments", PYTHONIC)
def test_pythonic_grammar(
    tokenizer: Any, factory: ConstraintFactory, call: str, accepted: bool, arguments: Any
) -> None:
    text = f"<|tool_call_start|>{call}<|tool_call_end|>"
    assert _accepts(factory, tokenizer, _grammar("pythonic", tokenizer), text) is accepted
    if accepted:
        assert _parsed("pythonic", text) == [(call[1], arguments)]


GEMMA = [
    ("call:f{x:1}", True, {"x": 1}),
    ("call:f{x:1,y:true,z:<escape>a, b<escape>}", True, {"x": 1, "y": True, "z": "a, b"}),
    ("call:g{}", True, {}),
    ("call:g{z:<escape>v<escape>}", True, {"z": "v"}),
    ("call:f{y:true}", False, None),
    ("call:f{x:1, y:true}", False, None),
    ("call:f{x:1,z:v}", False, None),  # a string goes between <escape> markers
    ("call:f{z:<escape>v<escape>,x:1}", False, None),
]


@pytest.mark.parametrize("call, accepted, arguments", GEMMA)
def test_function_gemma_grammar(
    tokenizer: Any, factory: ConstraintFactory, call: str, accepted: bool, arguments: Any
) -> None:
    text = f"<start_function_call>{call}<end_function_call>"
    assert _accepts(factory, tokenizer, _grammar("function_gemma", tokenizer), text) is accepted
    if accepted:
        assert _parsed("function_gemma", text) == [(call[5], arguments)]


def test_function_gemma_is_detected_from_its_marker() -> None:
    assert detect_format("{{ '<start_function_call>call:' + name }}") == "function_gemma"
    assert "function_gemma" in FORMATS


def test_lfm2_templates_are_pythonic_and_forceable(tokenizer: Any) -> None:
    fmt = tool_format(tokenizer)
    assert (fmt.name, fmt.native, fmt.forceable) == ("pythonic", True, True)
    assert arguments_schema(TOOLS[0])["required"] == ["x"]


def test_keyword_sequence_shapes() -> None:
    from server.serving.tool_keyword_grammars import keyword_sequence

    assert keyword_sequence([], ", ") == ""
    assert keyword_sequence([("a", True), ("b", False)], ",") == 'a ("," b)?'
    assert keyword_sequence([("a", False), ("b", True)], ",") == '(a "," b | b)'
