"""Forcing grammars of the XML-like formats without a template in the llama-cpp-python sdist, or whose
structure a random model may not reach in the served tests: LongCat, MiniCPM5, Muse Spark and Kimi K3.

Over a real tokenizer (the tiny LFM2.5 model's: llama-bpe with LFM2's markers; these formats' markers are
plain text in it): each sample is tokenized and fed to the compiled grammar, and must be accepted whole (or
refused) as the format's rules say: the tool's name, its properties in declared order (required ones always,
optional ones at most once), a string as raw text and any other value as JSON of its type. Accepted texts
parse with the format's parser, fed through `ToolCallParser` as the engine would.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.engine.constraints import ConstraintFactory, GrammarSpec
from server.serving.tool_formats import detect_format
from server.serving.tool_grammar import lark_text
from server.serving.tools import ToolCallParser, named_format
from tests.native_tool_models import FAMILIES, family_model_dir

SCHEMA = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "z": {"type": "string"}},
    "required": ["x"],
}
TOOLS = [
    {"type": "function", "function": {"name": "f", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from mlx_lm.tokenizer_utils import load

    return load(family_model_dir(tmp_path_factory.mktemp("xml") / "lfm2.5", FAMILIES["lfm2.5"]))


@pytest.fixture(scope="module")
def factory(tokenizer: Any) -> ConstraintFactory:
    return ConstraintFactory(tokenizer, len(tokenizer.get_vocab()), tokenizer.eos_token_ids)


def _accepts(factory: ConstraintFactory, tokenizer: Any, name: str, text: str) -> bool:
    grammar = lark_text(named_format(name, True), list(enumerate(TOOLS)), tokenizer)
    constraint = factory.create(GrammarSpec(kind="lark", text=grammar))
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        constraint.advance(token_id)
        if constraint.error is not None:
            return False
    return constraint.accepting


def _parsed(name: str, text: str) -> list[tuple[str, dict[str, Any]]]:
    parser = ToolCallParser(named_format(name, True), TOOLS)
    content, calls = parser.feed(text)
    rest, more = parser.finish()
    assert not (content + rest).strip(), content + rest
    return [(c.name, json.loads(c.arguments)) for c in calls + more]


def _longcat(name: str, pairs: list[tuple[str, str]]) -> str:
    body = "".join(
        f"<longcat_arg_key>{k}</longcat_arg_key>\n<longcat_arg_value>{v}</longcat_arg_value>\n" for k, v in pairs
    )
    return f"<longcat_tool_call>{name}\n{body}</longcat_tool_call>"


def _minicpm5(name: str, pairs: list[tuple[str, str]]) -> str:
    return f'<function name="{name}">' + "".join(f'<param name="{k}">{v}</param>' for k, v in pairs) + "</function>"


def _muse(name: str, pairs: list[tuple[str, str]]) -> str:
    body = "".join(f'<atem:parameter name="{k}">{v}</atem:parameter>\n' for k, v in pairs)
    return f'<atem:function_calls>\n<atem:invoke name="{name}">\n{body}</atem:invoke>\n</atem:function_calls>'


def _k3(name: str, pairs: list[tuple[str, str]]) -> str:
    kinds = {"x": "number", "z": "string", "w": "string"}
    body = "".join(f'<|open|>argument key="{k}" type="{kinds[k]}"<|sep|>{v}<|close|>argument<|sep|>' for k, v in pairs)
    call = f'<|open|>call tool="{name}" index="1"<|sep|>{body}<|close|>call<|sep|>'
    return f"<|close|>response<|sep|><|open|>tools<|sep|>{call}<|close|>tools<|sep|>"


WRITERS = {"longcat": _longcat, "minicpm5": _minicpm5, "muse_spark": _muse, "kimi_k3": _k3}
CASES = [
    ("f", [("x", "1")], True, {"x": 1}),
    ("f", [("x", "-7"), ("z", "a b")], True, {"x": -7, "z": "a b"}),
    ("g", [], True, {}),
    ("f", [], False, None),  # x is required
    ("f", [("z", "a"), ("x", "1")], False, None),  # declared order
    ("f", [("x", "one")], False, None),  # x is an integer
    ("f", [("x", "1"), ("x", "2")], False, None),
    ("f", [("x", "1"), ("w", "2")], False, None),  # no such property
    ("h", [("x", "1")], False, None),  # no such tool
]


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("name, pairs, accepted, arguments", CASES)
def test_forcing_grammar_accepts_calls_in_the_format_and_refuses_the_rest(
    tokenizer: Any, factory: ConstraintFactory, fmt: str, name: str, pairs: Any, accepted: bool, arguments: Any
) -> None:
    text = WRITERS[fmt](name, pairs)
    assert _accepts(factory, tokenizer, fmt, text) is accepted, text
    if accepted:
        assert _parsed(fmt, text) == [(name, arguments)]


def test_longcat_is_detected_from_its_marker() -> None:
    assert detect_format("{{ '<longcat_tool_call>' + tool_call.name }}") == "longcat"


def test_kimi_k3_response_tags_are_never_content_even_split_mid_marker() -> None:
    parser = ToolCallParser(named_format("kimi_k3", True), TOOLS)
    text = "Hi <there>.<|close|>response<|sep|><|close|>message<|sep|>"
    shown = "".join(parser.feed(ch)[0] for ch in text)
    rest, calls = parser.finish()
    assert (shown + rest, calls, parser.dropped_unfinished) == ("Hi <there>.", [], False)
