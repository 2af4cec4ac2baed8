"""OpenAI request fields -> the engine's SamplingParams, with 400s that name the offending field."""

from __future__ import annotations

from typing import Any

from server.engine import SamplingParams
from server.errors import InvalidRequestError
from server.wire.chat import ChatCompletionRequest
from server.wire.completions import CompletionRequest

MAX_STOP_SEQUENCES = 4
MAX_SEED = 2**63 - 1  # OpenAI's seed is an int64; the engine checks the lower bound
_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "seed",
    "stop",
    "top_logprobs",
    "logprobs",
    "n",
)


def _param_of(message: str) -> str | None:
    for name in _FIELDS:
        if message.startswith(name):
            return name
    return None


def stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(
            f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(items)}.", param="stop"
        )
    if any(not s for s in items):
        raise InvalidRequestError("'stop' sequences must be non-empty strings.", param="stop")
    return tuple(items)


def build_params(**fields: Any) -> SamplingParams:
    """SamplingParams from OpenAI-named fields; None means "use the default"."""
    given = {k: v for k, v in fields.items() if v is not None}
    if isinstance(given.get("seed"), int) and given["seed"] > MAX_SEED:
        raise InvalidRequestError(
            f"Invalid 'seed': integer above maximum value. Expected a value <= {MAX_SEED}.",
            param="seed",
            code="integer_above_max_value",
        )
    if "logit_bias" in given:
        try:
            given["logit_bias"] = {int(k): float(v) for k, v in given["logit_bias"].items()}
        except (TypeError, ValueError):
            raise InvalidRequestError(
                "logit_bias keys must be token ids (integers as strings).", param="logit_bias"
            ) from None
    try:
        return SamplingParams(**given)
    except ValueError as exc:
        message = str(exc)
        raise InvalidRequestError(f"Invalid value: {message}.", param=_param_of(message)) from exc


def sampling_fields(body: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The sampling fields chat and completions requests share, named as `build_params` takes them."""
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "logit_bias": body.logit_bias,
        "seed": body.seed,
        "stop": stop_list(body.stop),
    }
