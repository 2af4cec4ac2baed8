"""Reasoning (think blocks): which markers a served model reasons between, and the streaming splitter.

A thinking model writes its reasoning between a start and an end marker
(`<think>`/`</think>` for Qwen3, QwQ, DeepSeek-R1 and V3.x, GLM, Kimi-K2,
MiniMax-M2, SmolLM3; `[THINK]`/`[/THINK]` for Mistral's reasoning models;
`<|channel>thought`/`<channel|>` for Gemma 4). `reasoning_mode` finds the
markers (in the vocabulary or the chat template, as mlx-lm's `_infer_thinking`
does) and where the output starts, from the rendered prompt's tail: templates
that open the think block in the generation prompt (DeepSeek-R1 distills,
Qwen3.5, DeepSeek-V3.1 thinking) leave the output inside the reasoning; a
prompt that closed an empty block (Qwen3 with enable_thinking false) or never
opened one leaves it in the answer, where the model may still open a block
itself as its first text.

`ReasoningSplitter` works on streamed text: text inside the block is
reasoning, text after it is the answer; a marker split across tokens is held
back and never shown, and the whitespace around the markers is trimmed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.serving.tools import _partial_suffix

# (start, end) marker pairs, single tokens in their vocabularies, tried in order
_PAIRS = (
    ("<think>", "</think>"),
    ("[THINK]", "[/THINK]"),
    ("<seed:think>", "</seed:think>"),
    ("<longcat_think>", "</longcat_think>"),
    ("<|think:start|>", "<|think:end|>"),
)
_GEMMA4 = ("<|channel>thought", "<channel|>")  # multi-token: `<|channel>` then `thought`
_XTML = ("<|open|>think<|sep|>", "<|close|>think<|sep|>")  # Kimi K3: tags of `<|open|>`/`<|close|>`/`<|sep|>` tokens
_TAIL_TOKENS = 12  # prompt tokens decoded to see whether the prompt opened the think block


@dataclass(frozen=True)
class ThinkMarkers:
    start: str
    end: str
    end_ids: tuple[int, ...] = ()  # the end marker's token ids (a grammar waits for them)
    start_ids: tuple[int, ...] = ()  # the start marker's token ids (a grammar lets the output begin with them)


@dataclass(frozen=True)
class ReasoningMode:
    markers: ThinkMarkers
    starts_inside: bool = False  # the prompt opened the think block
    closed: bool = False  # the prompt ends right after a closed block (thinking turned off by the template)
    # marker tokens the detokenizer drops (special tokens): their text, by id, put back for the splitter
    dropped: Mapping[int, str] = field(default_factory=dict)

    def text_of(self, token_id: int | None, text: str) -> str:
        """One token's streamed text, with a dropped marker token's text put back."""
        if token_id is not None and token_id in self.dropped:
            return self.dropped[token_id] + text
        return text


def _vocab(tokenizer: Any) -> Mapping[str, int]:
    try:
        return tokenizer.get_vocab()
    except (AttributeError, TypeError):
        return {}


def think_markers(tokenizer: Any) -> ThinkMarkers | None:
    """The model's think markers: a pair in its vocabulary, or one its chat template writes."""
    vocab = _vocab(tokenizer)
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else ""
    multi = {
        _GEMMA4: "<|channel>" in vocab and "<channel|>" in vocab,
        _XTML: all(t in vocab for t in ("<|open|>", "<|close|>", "<|sep|>")),
    }
    for start, end in [*_PAIRS, *multi]:
        in_vocab = multi[(start, end)] if (start, end) in multi else start in vocab and end in vocab
        if in_vocab or (start in template and end in template):
            ids = tuple(int(i) for i in tokenizer.encode(end, add_special_tokens=False))
            start_ids = tuple(int(i) for i in tokenizer.encode(start, add_special_tokens=False))
            return ThinkMarkers(start, end, ids, start_ids)
    return None


def _dropped(tokenizer: Any, markers: ThinkMarkers) -> dict[int, str]:
    """Marker tokens that decode to nothing with special tokens skipped."""
    out: dict[int, str] = {}
    for text in (markers.start, markers.end):
        for token_id in tokenizer.encode(text, add_special_tokens=False):
            piece = tokenizer.decode([token_id], skip_special_tokens=False)
            if piece and not tokenizer.decode([token_id], skip_special_tokens=True):
                out[int(token_id)] = piece
    return out


def _prompt_tail(tokenizer: Any, prompt_ids: list[int]) -> str:
    return str(tokenizer.decode(list(prompt_ids[-_TAIL_TOKENS:]), skip_special_tokens=False)).rstrip()


def opens_reasoning(tokenizer: Any, prompt_ids: list[int], markers: ThinkMarkers) -> bool:
    """True when the rendered prompt ends inside an open think block."""
    return _prompt_tail(tokenizer, prompt_ids).endswith(markers.start)


@functools.lru_cache(maxsize=8)
def model_markers(tokenizer: Any) -> tuple[ThinkMarkers, dict[int, str]] | None:
    """A tokenizer's think markers and the marker tokens it drops, found once per tokenizer (a served model's
    tokenizer never changes): `think_markers` reads the whole vocabulary, ~90 ms for Qwen's 151k tokens, which
    must not be paid per request."""
    markers = think_markers(tokenizer)
    return None if markers is None else (markers, _dropped(tokenizer, markers))


def reasoning_mode(tokenizer: Any, prompt_ids: list[int]) -> ReasoningMode | None:
    """How `tokenizer`'s model reasons after this prompt (None: it has no think markers)."""
    found = model_markers(tokenizer)
    if found is None:
        return None
    markers, dropped = found
    tail = _prompt_tail(tokenizer, prompt_ids)
    inside = tail.endswith(markers.start)
    return ReasoningMode(markers, inside, not inside and tail.endswith(markers.end), dropped)


_BEFORE, _REASONING, _ANSWER = "before", "reasoning", "answer"


class ReasoningSplitter:
    """Splits streamed text into (reasoning, answer) deltas.

    Before any text, a start marker (after optional whitespace) opens the block; any other text makes
    the whole output answer. Inside the block, text up to the end marker is reasoning; after it, the
    answer (its leading whitespace trimmed). Partial markers and trailing reasoning whitespace are held.
    """

    def __init__(self, mode: ReasoningMode) -> None:
        self.mode = mode
        self._state = _REASONING if mode.starts_inside else _BEFORE
        self._buffer = ""
        self._fresh = True  # at the start of a section: leading whitespace is trimmed

    @property
    def in_reasoning(self) -> bool:
        return self._state == _REASONING

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        reasoning, answer = "", ""
        while True:
            if self._state == _BEFORE:
                stripped = self._buffer.lstrip()
                start = self.mode.markers.start
                if stripped.startswith(start):
                    self._buffer = stripped[len(start) :]
                    self._state, self._fresh = _REASONING, True
                    continue
                if start.startswith(stripped):
                    return reasoning, answer  # undecided: held
                self._state, self._fresh = _ANSWER, False  # no think block: the output is all answer
            if self._state == _REASONING:
                if self._fresh:
                    self._buffer = self._buffer.lstrip()
                    self._fresh = not self._buffer
                end = self.mode.markers.end
                at = self._buffer.find(end)
                if at >= 0:
                    reasoning += self._buffer[:at].rstrip()
                    self._buffer = self._buffer[at + len(end) :]
                    self._state, self._fresh = _ANSWER, True
                    continue
                keep = _partial_suffix(self._buffer, end) or 0
                body = self._buffer[: len(self._buffer) - keep]
                shown = body.rstrip()
                reasoning += shown
                self._buffer = self._buffer[len(shown) :]
                return reasoning, answer
            if self._fresh:
                self._buffer = self._buffer.lstrip()
                self._fresh = not self._buffer
            answer += self._buffer
            self._buffer = ""
            return reasoning, answer

    def finish(self, cut: bool = False) -> tuple[str, str]:
        """The held text at the end: a partial marker is dropped when `cut`, otherwise kept as text."""
        rest, self._buffer = self._buffer, ""
        if self._state == _REASONING:
            if cut and _partial_suffix(rest.rstrip(), self.mode.markers.end):
                return "", ""
            return rest.strip() if self._fresh else rest.rstrip(), ""
        if self._state == _BEFORE and cut:
            return "", ""  # an unfinished start marker (or only whitespace)
        return "", rest
