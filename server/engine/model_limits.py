"""What a request must fit in one model: its vocabulary, its context length, the grammars it can follow.

Checked once, on the caller's thread, by `Engine.validate` (the serving layer calls it while building a
request, so a bad one fails fast with an OpenAI-shaped 400 before any response starts; `Engine.submit`
checks a request nobody checked). The check returns a `ValidRequest`, which the engine thread trusts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from server.engine.constraints import ConstraintFactory
from server.engine.request import GenerationRequest, ValidRequest
from server.errors import InvalidRequestError


class ModelLimits:
    """One model's limits on requests."""

    def __init__(self, context_length: int, vocab_size: int, constraints: ConstraintFactory) -> None:
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.constraints = constraints

    def check(self, request: GenerationRequest) -> ValidRequest:
        """Raise InvalidRequestError unless the request fits; return it checked, with its max_tokens (asked, or all
        the room left)."""
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequestError("Prompt cannot be empty", param="prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequestError(
                f"Prompt contains token ids outside the vocabulary (0..{self.vocab_size - 1})", param="prompt"
            )
        bad_bias = [t for t in request.params.logit_bias if not 0 <= t < self.vocab_size]
        if bad_bias:
            raise InvalidRequestError(
                f"logit_bias has token ids outside the vocabulary: {bad_bias[:5]}", param="logit_bias"
            )
        if request.params.grammar is not None:
            try:
                self.constraints.validate(request.params.grammar)
            except ValueError as exc:
                raise InvalidRequestError(str(exc), param="response_format") from None
        room = self.context_length - len(prompt)
        asked = request.params.max_tokens
        if room < 1 or (asked is not None and asked > room):
            wanted = len(prompt) + (asked or 1)
            raise InvalidRequestError(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{wanted} tokens ({len(prompt)} in the messages, {asked or 1} in the completion). Please reduce "
                f"the length of the messages or completion. (context_length_exceeded)",
                param="messages",
                code="context_length_exceeded",
            )
        fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(GenerationRequest)}
        return ValidRequest(**fields, max_new_tokens=asked if asked is not None else room)


def model_context_length(model: Any) -> int:
    """The model's context length from its config (4096 when it names none)."""
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "context_length", "max_seq_len"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


def model_vocab_size(model: Any, tokenizer: Any) -> int:
    """Rows of the model's output projection (the tokenizer's vocabulary when the config names none)."""
    args = getattr(model, "args", None)
    value = getattr(args, "vocab_size", None)
    return int(value) if isinstance(value, int) else len(tokenizer.vocab)
