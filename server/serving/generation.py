"""What the generation endpoints share: an engine request built from messages, engine failures as API errors.

Chat completions and the Responses API turn templated messages and tools into
one validated request (`ValidRequest`) with `build_request` (tools reach the prompt,
a forced call or the response format becomes the grammar, the KV is salted by
tenant and model); completions, chat and responses map a full pool or a failed
generation to the same API error with `engine_failure` and stamp their objects
with the same `SYSTEM_FINGERPRINT`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from server import __version__
from server.engine import EngineUnavailableError, GenerationRequest, GrammarSpec, PoolExhaustedError, ValidRequest
from server.errors import APIError, InvalidRequestError, ServiceUnavailableError
from server.registry import ServedModel
from server.serving.harmony import HARMONY_FORMAT, is_harmony
from server.serving.params import build_params
from server.serving.prompt import control_tokens, render_prompt, template_text
from server.serving.reasoning import ReasoningMode, model_markers, reasoning_mode
from server.serving.scope import RequestScope
from server.serving.template_inputs import fit_tool_call_arguments, fit_tool_call_ids, one_analysis_per_call
from server.serving.tool_grammar import forcing_grammar, harmony_answer_grammar
from server.serving.tools import ToolFormat, tool_format, with_tools

SYSTEM_FINGERPRINT = f"fp_mlx_dropin_{__version__.replace('.', '_')}"
# The most tokens a thinking model reasons before a constrained answer (a forced call, a response format):
# then its end-of-thinking marker is forced. Capped at half of the request's max_tokens, so the answer
# has room; like gpt-oss's bounded analysis (tool_grammar.HARMONY_ANALYSIS_CHARS).
THINK_BUDGET_TOKENS = 8192


def learn_tokenizer(tokenizer: Any) -> None:
    """Work out, before a chat model serves, what its requests would otherwise find out from its tokenizer on
    first use (each cached per tokenizer): the control tokens a request's text may not contain, and the think
    markers. Cached lazily, the first burst after start-up missed the caches in every worker thread at once,
    and Qwen's think markers read a 151,000-token vocabulary (~90 ms with the GIL held) in each."""
    control_tokens(tokenizer)
    model_markers(tokenizer)


def tool_mode(choice: str | None, forced: str | None, names: list[str]) -> tuple[str, str | None]:
    """('none' | 'auto' | 'required', forced function name or None) from a tool_choice string or a named function."""
    if forced is not None:
        if forced not in names:
            raise InvalidRequestError(f"tool_choice names '{forced}', which is not in 'tools'.", param="tool_choice")
        return "required", forced
    if choice is None:
        return ("auto" if names else "none"), None
    if choice not in ("none", "auto", "required"):
        raise InvalidRequestError(f"Invalid tool_choice '{choice}'.", param="tool_choice")
    if choice != "none" and not names:
        raise InvalidRequestError(f"tool_choice '{choice}' needs 'tools'.", param="tool_choice")
    return choice, None


def _grammar(
    served: ServedModel,
    response_format: dict[str, Any] | None,
    tools: list[dict[str, Any]],
    mode: str,
    forced: str | None,
    fmt: ToolFormat | None,
) -> GrammarSpec | None:
    """The decoding constraint: a forced tool call (in the model's own format where we can force it, harmony
    included), else the response_format (for harmony, on the final message after the analysis)."""
    if mode == "required" and fmt is not None and (fmt.forceable or fmt == HARMONY_FORMAT):
        return forcing_grammar(tools, forced, fmt, served.tokenizer, served.running_engine.constraints)
    if response_format is None:
        return None
    try:
        spec = GrammarSpec.from_response_format(response_format)
    except ValueError as exc:
        raise InvalidRequestError(f"Invalid response_format: {exc}", param="response_format") from exc
    if spec is None or not is_harmony(served.tokenizer):
        return spec
    try:  # the client's schema is checked on its own, so its errors never quote the harmony wrapping
        served.running_engine.constraints.validate(spec)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="response_format") from None
    return harmony_answer_grammar(spec, served.tokenizer)  # the answer after gpt-oss's analysis


@dataclass(frozen=True)
class BuiltRequest:
    """A validated engine request and how to read its output."""

    request: ValidRequest
    tool_format: ToolFormat | None  # set when tool calls are parsed from the answer
    reasoning: ReasoningMode | None  # set for a model with think markers


def _after_reasoning(
    grammar: GrammarSpec | None, mode: ReasoningMode | None, max_tokens: int | None = None
) -> GrammarSpec | None:
    """A thinking model's grammar applies after its reasoning: after the end marker when the prompt opened the
    think block; when the prompt left the output outside one (and did not just close one, which turns
    thinking off), after the end marker if the output begins with the start marker, else from the start.
    The reasoning is bounded (`THINK_BUDGET_TOKENS`, at most half of `max_tokens`)."""
    if grammar is None or mode is None or not mode.markers.end_ids:
        return grammar
    budget = THINK_BUDGET_TOKENS if max_tokens is None else min(THINK_BUDGET_TOKENS, max_tokens // 2)
    if mode.starts_inside:
        return replace(grammar, after=mode.markers.end_ids, budget=budget)
    if mode.closed or not mode.markers.start_ids:
        return grammar
    return replace(grammar, after=mode.markers.end_ids, opens=mode.markers.start_ids, budget=budget)


def build_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    mode: str,
    forced: str | None,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[int], ToolFormat | None]:
    """Template messages + tools -> prompt ids, and the tool format to parse the output with (None: no tools).

    Templates that render `tools` get them natively; the others get them as a system message. A harmony
    model (gpt-oss) renders tools itself and answers in harmony's channels.
    """
    fmt = (HARMONY_FORMAT if is_harmony(tokenizer) else tool_format(tokenizer)) if mode != "none" else None
    if fmt is not None and not fmt.native:
        messages = with_tools(messages, tools, forced, fmt)
    native = tools if fmt is not None and fmt.native else None
    template = template_text(tokenizer)
    messages = fit_tool_call_arguments(fit_tool_call_ids(messages, template), template)
    if is_harmony(tokenizer):  # one analysis per tool-call turn, as its template demands
        messages = one_analysis_per_call(messages)
    return render_prompt(tokenizer, messages, native, template_kwargs), fmt


def build_request(
    served: ServedModel,
    scope: RequestScope,
    conversation: str | None,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    mode: str,
    forced: str | None,
    response_format: dict[str, Any] | None,
    *,
    request_id: str,
    streamed: bool = True,
    template_kwargs: dict[str, Any] | None = None,
    **sampling: Any,
) -> BuiltRequest:
    """Template messages + tools -> a validated engine request, the tool format to parse its output with,
    and the model's reasoning mode.

    Tools reach the prompt (natively or as a system message), a forced call or the response format
    becomes the grammar (after the think block, when the prompt opened one), and the KV is salted by
    tenant and model and keyed by the conversation. `template_kwargs` are extra chat template variables
    (`template_inputs.template_kwargs`).
    """
    harmony = is_harmony(served.tokenizer)  # gpt-oss: its markers are special tokens the output parser needs
    prompt, fmt = build_prompt(served.tokenizer, messages, tools, mode, forced, template_kwargs)
    reasoning = None if harmony else reasoning_mode(served.tokenizer, prompt)  # harmony has channels instead
    grammar = _grammar(served, response_format, tools, mode, forced, fmt)
    grammar = _after_reasoning(grammar, reasoning, sampling.get("max_tokens"))
    params = build_params(**sampling, grammar=grammar, skip_special_tokens=False if harmony else None)
    request = GenerationRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        params=params,
        conversation_key=scope.conversation_key(served.id, conversation),
        salt=scope.salt(served.id),
        streamed=streamed,
    )
    return BuiltRequest(served.running_engine.validate(request), fmt, reasoning)


def engine_failure(exc: Exception) -> APIError:
    """An engine error as the API error the client sees: a full KV pool or an engine process that is restarting
    is a retryable 503, the rest a 500."""
    if isinstance(exc, EngineUnavailableError):
        return ServiceUnavailableError(
            f"The model's engine is unavailable ({exc}); retry shortly.",
            code="engine_unavailable",
            headers={"retry-after": "5"},
        )
    if isinstance(exc, PoolExhaustedError):
        return ServiceUnavailableError(
            f"The server is at capacity ({exc}); retry shortly.", code="server_overloaded", headers={"retry-after": "2"}
        )
    return APIError(f"Generation failed: {exc}")
