"""Real chat templates with tokenizers to render them, and the conversations every template is tried on.

`MATRIX_TEMPLATES` are the templates of llama.cpp's collection (the `llama-cpp-python` sdist) that
declare tools or reasoning. Each gets the real vocabulary of its family where the sdist has one
(Qwen, Llama 3, Command-R), else GPT-2's byte-level vocabulary with the template's markup
(`<|...|>`, `<｜...｜>`, `[TOOL_CALLS]`, `<think>`, ...) added as special tokens, as the model's own
tokenizer has them. `TemplateTokenizers` builds an mlx-lm `TokenizerWrapper` per template the way
`mlx_lm.tokenizer_utils.load` does (tool parser inferred from the template), without writing files.

`CONVERSATIONS` are OpenAI chat requests (wire dicts): system + user, multi-turn, a tool call with
its result, parallel calls, and reasoning sent back on earlier assistant turns.
"""

from __future__ import annotations

import copy
import importlib
import re
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Tokenizer

from tests.real_vocab import QWEN3_ADDED, QWEN25_ADDED, llama_cpp_file, template_text, vocab_metadata, with_added_tokens

# templates in the collection that mention tools, tool calls or reasoning (test_template_matrix checks this list)
MATRIX_TEMPLATES = (
    "Apertus-8B-Instruct",
    "Apriel-1.6-15b-Thinker-fixed",
    "Bielik-11B-v3.0-Instruct",
    "ByteDance-Seed-OSS",
    "Cohere2MoE",
    "CohereForAI-c4ai-command-r-plus-tool_use",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use",
    "GLM-4.6",
    "GLM-4.7-Flash",
    "GigaChat3-10B-A1.8B",
    "GigaChat3.1-10B-A1.8B",
    "HuggingFaceTB-SmolLM3-3B",
    "Kimi-K2-Instruct",
    "Kimi-K2-Thinking",
    "Kimi-K3",
    "LFM2-8B-A1B",
    "LFM2.5-8B-A1B",
    "LFM2.5-Instruct",
    "MiMo-VL",
    "MiniMax-M1",
    "MiniMax-M2",
    "MiniMax-M3",
    "Mistral-Small-3.2-24B-Instruct-2506",
    "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
    "NVIDIA-Nemotron-Nano-v2",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
    "Qwen-QwQ-32B",
    "Qwen-Qwen2.5-7B-Instruct",
    "Qwen-Qwen3-0.6B",
    "Qwen3-Coder",
    "Qwen3.5-4B",
    "Reka-Edge",
    "Spark2.5",
    "StepFun3.5-Flash",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai-DeepSeek-V3.1",
    "deepseek-ai-DeepSeek-V3.2",
    "deepseek-ai-DeepSeek-V4-Flash-0731",
    "deepseek-ai-DeepSeek-V4",
    "fireworks-ai-llama-3-firefunction-v2",
    "google-gemma-4-31B-it-interleaved",
    "google-gemma-4-31B-it",
    "ibm-granite-granite-3.3-2B-Instruct",
    "ibm-granite-granite-4.0",
    "ibm-granite-granite-4.1",
    "inclusionai-ling-3.0-flash",
    "llama-cpp-deepseek-r1",
    "llama-cpp-rwkv-world",
    "meetkai-functionary-medium-v3.1",
    "meetkai-functionary-medium-v3.2",
    "meta-llama-Llama-3.1-8B-Instruct",
    "meta-llama-Llama-3.2-3B-Instruct",
    "meta-llama-Llama-3.3-70B-Instruct",
    "mistralai-Ministral-3-14B-Reasoning-2512",
    "mistralai-Mistral-Nemo-Instruct-2407",
    "moonshotai-Kimi-K2",
    "muse-glimmer",
    "openai-gpt-oss-120b",
    "openbmb-MiniCPM5-1B",
    "poolside-Laguna-S-2.1",
    "poolside-Laguna-XS-2.1",
    "poolside-Laguna-XS.2",
    "tencent-Hy3",
    "unsloth-Apriel-1.5",
    "unsloth-mistral-Devstral-Small-2507",
    "upstage-Solar-Open-100B",
)
DECLARES = re.compile(r"\b(tools|tool_calls|think\w*|reasoning\w*|enable_thinking)\b")

QWEN_VOCAB = ("qwen2", QWEN3_ADDED)
# (vocabulary, Qwen added tokens) of the families whose real vocabulary the sdist carries
REAL_VOCAB: dict[str, tuple[str, tuple[str, ...]]] = {
    "Qwen-Qwen3-0.6B": QWEN_VOCAB,
    "Qwen-QwQ-32B": QWEN_VOCAB,
    "Qwen3-Coder": QWEN_VOCAB,
    "MiMo-VL": QWEN_VOCAB,
    "Qwen-Qwen2.5-7B-Instruct": ("qwen2", QWEN25_ADDED),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("qwen2", QWEN25_ADDED),
    "Qwen3.5-4B": ("qwen35", QWEN3_ADDED),
    "meta-llama-Llama-3.1-8B-Instruct": ("llama-bpe", ()),
    "meta-llama-Llama-3.2-3B-Instruct": ("llama-bpe", ()),
    "meta-llama-Llama-3.3-70B-Instruct": ("llama-bpe", ()),
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": ("llama-bpe", ()),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": ("llama-bpe", ()),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("llama-bpe", ()),
    "meetkai-functionary-medium-v3.1": ("llama-bpe", ()),
    "meetkai-functionary-medium-v3.2": ("llama-bpe", ()),
    "fireworks-ai-llama-3-firefunction-v2": ("llama-bpe", ()),
    "CohereForAI-c4ai-command-r-plus-tool_use": ("command-r", ()),
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": ("command-r", ()),
}
BYTE_LEVEL = "gpt-2"
_MARKUP = re.compile(
    r"<\|[^|<>\s'\"{}]{1,40}\|>|<｜[^｜<>'\"]{1,40}｜>|\[/?[A-Z][A-Z_]{2,}\]|<\|[a-z_]{2,20}>|<[a-z_]{2,20}\|>"
    r"|</?(?:think|tool_call|tool_response|tool_calls|arg_key|arg_value|minimax:tool_call|start_of_turn|end_of_turn)>"
)


def declares_tools_or_reasoning(template: str) -> bool:
    return bool(DECLARES.search(template))


def template_markup(template: str) -> list[str]:
    """The marker tokens a template writes (what its model's tokenizer holds as added tokens)."""
    return sorted(set(_MARKUP.findall(template)))


def vocabulary_of(template: str) -> str:
    return REAL_VOCAB[template][0] if template in REAL_VOCAB else f"{BYTE_LEVEL} + markup"


def _tool_fields(hf: Any) -> dict[str, Any]:
    """The tool parser mlx-lm's `load` infers from the template, as `TokenizerWrapper` keeps it."""
    from mlx_lm.tokenizer_utils import _infer_tool_parser

    parser_type = _infer_tool_parser(hf)
    if parser_type is None:
        return {"tool_parser": None, "tool_call_start": None, "tool_call_end": None}
    module = importlib.import_module(f"mlx_lm.tool_parsers.{parser_type}")
    return {
        "tool_parser": module.parse_tool_call,
        "tool_call_start": module.tool_call_start,
        "tool_call_end": module.tool_call_end,
    }


def _wrapper(tokenizer: Tokenizer, template: str, bos: str | None, eos: str | None) -> Any:
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, chat_template=template)
    return TokenizerWrapper(hf, **_tool_fields(hf))


def _with_template(base: Any, template: str) -> Any:
    """A copy of `base` (a TokenizerWrapper) with another chat template; the vocabulary is shared.

    What the wrapper infers from the vocabulary (thinking tokens, markers) stays; the tool parser is
    inferred again from the template, as `mlx_lm.tokenizer_utils.load` would.
    """
    hf = copy.copy(base._tokenizer)
    hf.chat_template = template
    wrapper = object.__new__(type(base))
    wrapper.__dict__.update(base.__dict__)
    wrapper._tokenizer = hf
    fields = _tool_fields(hf)
    wrapper._tool_parser = fields["tool_parser"]
    wrapper._tool_call_start, wrapper._tool_call_end = fields["tool_call_start"], fields["tool_call_end"]
    wrapper._tool_call_start_tokens = wrapper._tool_call_end_tokens = None
    if fields["tool_call_start"] is not None:
        wrapper._tool_call_start_tokens = tuple(hf.encode(fields["tool_call_start"], add_special_tokens=False))
        wrapper._tool_call_end_tokens = tuple(hf.encode(fields["tool_call_end"], add_special_tokens=False))
    return wrapper


@dataclass
class TemplateTokenizers:
    """Tokenizers per template, real vocabularies built once (one instance per test module)."""

    _bases: dict[tuple[str, tuple[str, ...]], Any] = field(default_factory=dict)
    _made: dict[str, Any] = field(default_factory=dict)

    def _meta(self, vocab: str, added: tuple[str, ...]) -> tuple[Tokenizer, str | None, str | None]:
        from server.models.gguf_tokenizer import build_tokenizer

        meta = dict(vocab_metadata(vocab))
        if added:
            meta = with_added_tokens(meta, added)
        tokens = meta["tokenizer.ggml.tokens"]
        bos, eos = (meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
        return (
            build_tokenizer(meta),
            tokens[int(bos)] if bos is not None else None,
            tokens[int(eos)] if eos is not None else None,
        )

    def __call__(self, name: str) -> Any:
        if name not in self._made:
            template = template_text(name)
            if name in REAL_VOCAB:
                key = REAL_VOCAB[name]
                if key not in self._bases:
                    tokenizer, bos, eos = self._meta(*key)
                    self._bases[key] = _wrapper(tokenizer, template, bos, eos)
                self._made[name] = _with_template(self._bases[key], template)
            else:
                tokenizer, bos, eos = self._meta(BYTE_LEVEL, ())
                markup = [AddedToken(t, special=True, normalized=False) for t in template_markup(template)]
                tokenizer.add_special_tokens(markup)
                self._made[name] = _wrapper(tokenizer, template, bos, eos)
        return self._made[name]


def templates_dir_available() -> bool:
    try:
        llama_cpp_file("models/templates/Qwen-Qwen3-0.6B.jinja")
    except (RuntimeError, FileNotFoundError, OSError):
        return False
    return True


# -- the conversations ------------------------------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SYSTEM = {"role": "system", "content": "You are a terse assistant named Quokka."}
ASK = {"role": "user", "content": "What is the weather in Paris?"}


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


CALL_WEATHER = _call("call_w1", "get_weather", '{"city": "Paris", "unit": "c"}')
CALL_TIME = _call("call_t1", "get_time", '{"city": "Paris"}')
RESULT_WEATHER = {"role": "tool", "tool_call_id": "call_w1", "content": '{"temp": 17, "sky": "drizzle"}'}
RESULT_TIME = {"role": "tool", "tool_call_id": "call_t1", "content": '{"time": "14:05"}'}
PAST_REASONING = "The user wants Paris weather; call the weather tool with city Paris."


@dataclass(frozen=True)
class Conversation:
    """A chat request body's `messages` and `tools`, and texts its prompt must show."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    shows: tuple[str, ...]  # texts every rendering must contain


CONVERSATIONS: dict[str, Conversation] = {
    "system_user": Conversation([SYSTEM, ASK], None, ("Quokka", "weather in Paris")),
    "multi_turn": Conversation(
        [
            SYSTEM,
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Ochre."},
            {"role": "user", "content": "Another one?"},
        ],
        None,
        ("Name a colour.", "Ochre.", "Another one?"),
    ),
    "tool_call": Conversation(
        [SYSTEM, ASK, {"role": "assistant", "content": None, "tool_calls": [CALL_WEATHER]}, RESULT_WEATHER],
        [WEATHER],
        ("weather in Paris", "get_weather", "drizzle"),
    ),
    "parallel_calls": Conversation(
        [
            ASK,
            {"role": "assistant", "content": "", "tool_calls": [CALL_WEATHER, CALL_TIME]},
            RESULT_WEATHER,
            RESULT_TIME,
        ],
        [WEATHER, TIME],
        ("get_weather", "get_time", "drizzle", "14:05"),
    ),
    "past_reasoning": Conversation(
        [
            SYSTEM,
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Ochre.", "reasoning_content": "Pick an earthy colour."},
            {"role": "user", "content": "Another one?"},
        ],
        None,
        ("Ochre.", "Another one?"),
    ),
    "reasoning_tool_call": Conversation(
        [
            ASK,
            {"role": "assistant", "content": "", "reasoning_content": PAST_REASONING, "tool_calls": [CALL_WEATHER]},
            RESULT_WEATHER,
        ],
        [WEATHER],
        ("get_weather", "drizzle"),
    ),
}
