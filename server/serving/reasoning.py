"""Reasoning (think blocks): which markers a served model reasons between, and the streaming splitter.

A thinking model writes its reasoning between a start and an end marker
(`<think>`/`</think>` for Qwen3, QwQ, DeepSeek-R1 and V3.x, GLM, Kimi-K2,
MiniMax-M2, SmolLM3; `[THINK]`/`[/THINK]` for Mistral's reasoning models).
`ReasoningMode` names the markers and where the output starts: templates that
open the think block in the generation prompt (DeepSeek-R1 distills, Qwen3
thinking) leave the output inside the reasoning; a prompt that closed an empty
block (Qwen3 with enable_thinking false) leaves it in the answer.

`ReasoningSplitter` works on streamed text: text inside the block is reasoning,
text after it is the answer; a marker split across tokens is held back and
never shown.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ThinkMarkers:
    start: str
    end: str


@dataclass(frozen=True)
class ReasoningMode:
    markers: ThinkMarkers
    starts_inside: bool = False  # the prompt opened the think block


class ReasoningSplitter:
    """Splits streamed text into (reasoning, answer); placeholder until the splitter lands."""

    def __init__(self, mode: ReasoningMode) -> None:
        self.mode = mode
        self.in_reasoning = mode.starts_inside

    def feed(self, text: str) -> tuple[str, str]:
        return ("", text)

    def finish(self) -> tuple[str, str]:
        return ("", "")
