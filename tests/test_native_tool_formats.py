"""Native tool-call formats on real chat templates and vocabularies (tiny random weights).

For each family (tests/native_tool_models.py): (a) parsing: a call written in the model's own format,
tokenized by the family's tokenizer and detokenized token by token by the engine's detokenizer, fed to
`ToolCallParser` in those pieces, gives the right calls (two calls where the format has parallel calls);
(b) forcing: the random model served by the real engine over HTTP with `tool_choice` "required" or a named
function produces a call that parses, whatever its weights prefer; (c) round trip: that call and its result
render back through the family's template.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.engine.detokenizer import IncrementalDetokenizer
from server.registry import ModelRegistry
from server.serving.generation import build_prompt
from server.serving.reasoning import reasoning_mode
from server.serving.tools import ToolCallParser, tool_call_entry, tool_format
from tests.native_tool_models import FAMILIES, family_model_dir
from tests.real_vocab import template_text
from tests.serving import loaded_models, running_server, tiny_settings

jsonschema = pytest.importorskip("jsonschema")

ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 9},
        "b": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["a", "b"],
}
COLOR = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green"]}}, "required": ["color"]}
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Add two digits", "parameters": ADD}},
    {"type": "function", "function": {"name": "paint", "description": "Pick a colour", "parameters": COLOR}},
]
SCHEMAS = {"add": ADD, "paint": COLOR}
CALLS = [("add", {"a": 2, "b": 3}), ("paint", {"color": "red"})]

D = "｜DSML｜"
# Each format's text for CALLS (parallel where the format has a way to write two calls).
WRITTEN = {
    "hermes": 'Sure.<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
    '<tool_call>\n{"name": "paint", "arguments": {"color": "red"}}\n</tool_call>',
    "qwen3_coder": "Sure.<tool_call>\n<function=add>\n<parameter=a>\n2\n</parameter>\n<parameter=b>\n3\n</parameter>\n"
    "</function>\n</tool_call>\n<tool_call>\n<function=paint>\n<parameter=color>\nred\n</parameter>\n</function>\n"
    "</tool_call>",
    "llama3": '{"name": "add", "parameters": {"a": 2, "b": 3}}; {"name": "paint", "parameters": {"color": "red"}}',
    "functionary31": 'Sure.<function=add>{"a": 2, "b": 3}</function><function=paint>{"color": "red"}</function>',
    # the generation prompt ends with `>>>`: the output starts with the recipient (`all` for text)
    "functionary32": 'all\nSure.>>>add\n{"a": 2, "b": 3}>>>paint\n{"color": "red"}',
    "gemma4": 'Sure.<|tool_call>call:add{a:2,b:3}<tool_call|><|tool_call>call:paint{color:<|"|>red<|"|>}<tool_call|>',
    "mistral": 'Sure.[TOOL_CALLS]add[ARGS]{"a": 2, "b": 3}[TOOL_CALLS]paint[ARGS]{"color": "red"}',
    "deepseek_v31": 'Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>add<｜tool▁sep｜>{"a": 2, "b": 3}<｜tool▁call▁end｜>'
    '<｜tool▁call▁begin｜>paint<｜tool▁sep｜>{"color": "red"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "deepseek_r1": "Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n"
    '{"a": 2, "b": 3}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>paint\n```json\n'
    '{"color": "red"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "pythonic": 'Sure.<|tool_call_start|>[add(a=2, b=3), paint(color="red")]<|tool_call_end|>',
    "dsml": f'Sure.\n\n<{D}function_calls>\n<{D}invoke name="add">\n<{D}parameter name="a" string="false">2</{D}parameter>\n'
    f'<{D}parameter name="b" string="false">3</{D}parameter>\n</{D}invoke>\n<{D}invoke name="paint">\n'
    f'<{D}parameter name="color" string="true">red</{D}parameter>\n</{D}invoke>\n</{D}function_calls>',
    "glm47": "Sure.<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>2</arg_value>\n<arg_key>b</arg_key>\n<arg_value>3"
    "</arg_value>\n</tool_call><tool_call>paint\n<arg_key>color</arg_key>\n<arg_value>red</arg_value>\n</tool_call>",
    "kimi_k2": "Sure.<|tool_calls_section_begin|><|tool_call_begin|>functions.add:0<|tool_call_argument_begin|>"
    '{"a": 2, "b": 3}<|tool_call_end|><|tool_call_begin|>functions.paint:1<|tool_call_argument_begin|>'
    '{"color": "red"}<|tool_call_end|><|tool_calls_section_end|>',
    "minimax_m2": 'Sure.<minimax:tool_call>\n<invoke name="add">\n<parameter name="a">2</parameter>\n'
    '<parameter name="b">3</parameter>\n</invoke>\n<invoke name="paint">\n<parameter name="color">red</parameter>\n'
    "</invoke>\n</minimax:tool_call>",
    # the prompt opens the response element; the call follows the closed response
    "kimi_k3": 'Sure.<|close|>response<|sep|><|open|>tools<|sep|><|open|>call tool="add" index="1"<|sep|>'
    '<|open|>argument key="a" type="number"<|sep|>2<|close|>argument<|sep|>'
    '<|open|>argument key="b" type="number"<|sep|>3<|close|>argument<|sep|><|close|>call<|sep|>'
    '<|open|>call tool="paint" index="2"<|sep|><|open|>argument key="color" type="string"<|sep|>red'
    "<|close|>argument<|sep|><|close|>call<|sep|><|close|>tools<|sep|><|close|>message<|sep|>",
    "minicpm5": 'Sure.<function name="add"><param name="a">2</param><param name="b">3</param></function>'
    '<function name="paint"><param name="color">red</param></function>',
    "muse_spark": 'Sure.<atem:function_calls>\n<atem:invoke name="add">\n<atem:parameter name="a">2</atem:parameter>\n'
    '<atem:parameter name="b">3</atem:parameter>\n</atem:invoke>\n<atem:invoke name="paint">\n'
    '<atem:parameter name="color">red</atem:parameter>\n</atem:invoke>\n</atem:function_calls>',
}
# how a past call of NAME shows in the rendered prompt (formats checked beyond the name)
RENDERED = {
    "kimi_k3": '<|open|>tools<|sep|><|open|>call tool="NAME" index="1"<|sep|>',
    "minicpm5": '<function name="NAME">',
    "muse_spark": '<atem:function_calls>\n<atem:invoke name="NAME">',
    "deepseek_r1": "<｜tool▁sep｜>NAME\n```json\n",
    "pythonic": "<|tool_call_start|>[NAME(",
}
# templates that never render a past call through transformers' apply_chat_template (it drops keys whose value
# is None, and the R1-Distill-Llama template writes calls only when `content is none`; the LFM2-8B-A1B and
# LFM2.5-Instruct templates write only `content`): the call's text is absent, the result present
DROPS_PAST_CALLS = ("deepseek-r1-llama", "lfm2", "lfm2.5-instruct")
# served over HTTP for forcing and round trip (each loads one tiny engine)
FORCED = [
    "qwen3",
    "qwen3.5",
    "qwen3-coder",
    "llama3.1",
    "llama3.2",
    "hermes3",
    "functionary3.1",
    "functionary3.2",
    "gemma4",
    "devstral",
    "mistral-small-3.2",
    "ministral-reasoning",
    "deepseek-v3.1",
    "deepseek-v3.2",
    "deepseek-r1-qwen",
    "deepseek-r1-llama",
    "lfm2",
    "lfm2.5",
    "lfm2.5-instruct",
    "glm-4.6",
    "glm-4.7",
    "kimi-k2",
    "minimax-m2",
    "laguna-xs.2",
    "laguna-xs-2.1",
    "laguna-s-2.1",
    "minicpm5",
    "muse-glimmer",
    "kimi-k3",
    "kimi-k3-no-thinking",
    "spark2.5",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("native-tools")


@pytest.fixture(scope="module")
def registry(root: Path) -> Iterator[ModelRegistry]:
    dirs = {name: family_model_dir(root / name, family) for name, family in FAMILIES.items()}
    with loaded_models(dirs, tiny_settings(root, 0.02)) as registry:
        yield registry


@pytest.fixture(scope="module")
def base(root: Path, registry: ModelRegistry) -> Iterator[str]:
    with running_server(create_app(tiny_settings(root, 0.02), registry)) as url:
        yield url


def _pieces(tokenizer: Any, text: str) -> list[str]:
    """`text` as the engine would stream it: tokenized, then detokenized one token at a time."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.add(token_id) for token_id in ids] + [detok.flush()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_model_s_own_format_detected_and_parsed_from_token_pieces(registry: ModelRegistry, family: str) -> None:
    served = registry.get(family)
    fmt = tool_format(served.tokenizer)
    assert fmt.name == FAMILIES[family].fmt
    if fmt.name not in WRITTEN:
        pytest.skip(f"no sample written for {fmt.name}")
    parser = ToolCallParser(fmt, TOOLS)
    content, calls = "", []
    for piece in _pieces(served.tokenizer, WRITTEN[fmt.name]):
        shown, done = parser.feed(piece)
        content, calls = content + shown, calls + done
    shown, done = parser.finish()
    content, calls = content + shown, calls + done
    assert [(c.name, json.loads(c.arguments)) for c in calls] == CALLS
    assert content.strip() in ("", "Sure."), content
    assert len({c.id for c in calls}) == 2


def _functionary32_parser() -> ToolCallParser:
    template = SimpleNamespace(chat_template=template_text("meetkai-functionary-medium-v3.2"))
    return ToolCallParser(tool_format(template), TOOLS)


@pytest.mark.parametrize(
    "pieces, content",
    [
        (["al", "l\nHello", " there", ">", ">"], "Hello there>>"),  # a text reply; a partial `>>>` is text at the end
        ([], ""),  # the output ended right after the prompt's `>>>`
        (["all"], ""),  # ... or inside the text recipient
    ],
)
def test_functionary32_text_recipient_is_content_not_a_call(pieces: list[str], content: str) -> None:
    parser = _functionary32_parser()
    shown = "".join(parser.feed(piece)[0] for piece in pieces)
    rest, calls = parser.finish()
    assert (shown + rest, calls, parser.dropped_unfinished) == (content, [], False)


def _post(base: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=300)


def _closing_thinking(registry: ModelRegistry, model: str) -> dict[str, float]:
    """A logit bias that ends the reasoning at once, for a template that opens the think block in the prompt.

    The forcing grammar then starts after the end-of-thinking marker (what a real model writes when it is
    done thinking); random weights would think until `max_tokens` and never reach the call."""
    served = registry.get(model)
    ids, _ = build_prompt(served.tokenizer, [{"role": "user", "content": "Add 2 and 3."}], TOOLS, "required", None)
    mode = reasoning_mode(served.tokenizer, ids)
    if mode is None or not mode.starts_inside or len(mode.markers.end_ids) != 1:
        return {}
    return {str(mode.markers.end_ids[0]): 100.0}


def _forced(
    base: str, model: str, choice: Any, stream: bool = False, registry: ModelRegistry | None = None
) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Add 2 and 3."}],
        "tools": TOOLS,
        "tool_choice": choice,
        "max_tokens": 200,  # a thinking model reasons up to half of it (THINK_BUDGET_TOKENS), then calls
        "temperature": 0,
        "stream": stream,
        "logit_bias": _closing_thinking(registry, model) if registry is not None else {},
    }
    if model == "kimi-k3-no-thinking":  # Kimi K3 thinks by default; this one answers in the response at once
        body["chat_template_kwargs"] = {"thinking": False}
    return _post(base, body)


@pytest.mark.parametrize("model", FORCED)
def test_forced_call_in_the_native_format_parses_and_round_trips(
    registry: ModelRegistry, base: str, model: str
) -> None:
    for choice, name in (("required", None), ({"type": "function", "function": {"name": "paint"}}, "paint")):
        r = _forced(base, model, choice, registry=registry)
        assert r.status_code == 200, r.text
        choice0 = r.json()["choices"][0]
        assert choice0["finish_reason"] == "tool_calls", choice0
        assert not choice0["message"]["content"], choice0
        (call,) = choice0["message"]["tool_calls"]
        function = call["function"]
        assert name is None or function["name"] == name
        jsonschema.validate(json.loads(function["arguments"]), SCHEMAS[function["name"]])
    # round trip: the call and its result render back through the template
    served = registry.get(model)
    entry = tool_call_entry(call["id"], function["name"], function["arguments"])
    messages = [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "", "tool_calls": [entry]},
        {"role": "tool", "tool_call_id": call["id"], "content": "RESULT-42"},
    ]
    ids, _ = build_prompt(served.tokenizer, messages, TOOLS, "auto", None)
    text = served.tokenizer.decode(ids)
    assert "RESULT-42" in text and function["name"] in text
    rendered = RENDERED.get(FAMILIES[model].fmt, "").replace("NAME", function["name"])
    if rendered:
        assert (rendered in text) != (model in DROPS_PAST_CALLS), text
    if model == "functionary3.2":  # its template concatenates the arguments: they reach it as JSON text
        assert f">>>{function['name']}\n{function['arguments']}" in text, text


@pytest.mark.parametrize(
    "model",
    ["qwen3.5", "llama3.1", "devstral", "functionary3.2", "gemma4", "deepseek-r1-llama", "lfm2.5", "kimi-k3"],
)
def test_streamed_forced_call_has_a_stable_index_and_id(registry: ModelRegistry, base: str, model: str) -> None:
    r = _forced(base, model, "required", stream=True, registry=registry)
    assert r.status_code == 200, r.text
    chunks = [
        json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"
    ]
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert calls and {tc["index"] for tc in calls} == {0}
    assert len({tc["id"] for tc in calls if tc.get("id")}) == 1
    assert not "".join(d.get("content") or "" for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# models whose prompt leaves no think block open: the kit sends what any client sends (no logit bias)
@pytest.mark.parametrize("model", ["llama3.1", "devstral"])
def test_the_compat_kit_s_native_tool_checks_pass_on_a_tiny_native_model(base: str, model: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "COMPAT_BASE_URL": base + "/v1", "COMPAT_TOOL_MODEL": model, "COMPAT_MODEL": model}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "compat/test_native_tools.py"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "4 passed" in result.stdout, result.stdout[-3000:]


def test_kimi_k3_reasons_in_its_think_element_then_calls(registry: ModelRegistry, base: str) -> None:
    """Kimi K3 thinks by default (`<|open|>think<|sep|>` ends the prompt): the reasoning is apart, the
    forced call follows `<|close|>think<|sep|>`, and no XTML tag leaks into either."""
    r = _forced(base, "kimi-k3", "required", registry=registry)
    message = r.json()["choices"][0]["message"]
    reasoning = message.get("reasoning_content") or ""
    assert message["tool_calls"] and not message["content"], message
    assert "<|open|>" not in reasoning and "<|close|>think" not in reasoning, reasoning
