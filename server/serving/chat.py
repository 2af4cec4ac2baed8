"""Chat completions: messages -> prompt tokens -> engine request; engine events -> OpenAI objects.

The route decodes the request and calls `prepare`; `complete` collects a
non-streamed answer and `stream` yields SSE payloads: the role chunk, content
deltas, one finish chunk per choice, the usage chunk when asked, `[DONE]`.
Each choice's text goes through an `OutputParser` (server/serving/model_output.py):
a thinking model's reasoning becomes `reasoning_content` (and `reasoning`), its
answer the content and tool calls; tokens generated inside the reasoning are
counted as `completion_tokens_details.reasoning_tokens`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from server.engine import Engine, EngineClient, GenerationError, PoolExhaustedError, TokenEvent, ValidRequest
from server.errors import InvalidRequestError
from server.metrics import TokenTimer, timed
from server.registry import ServedModel
from server.serving.chat_chunks import ChatChunks
from server.serving.generation import SYSTEM_FINGERPRINT, build_request, engine_failure, tool_mode
from server.serving.logprobs import TokenText
from server.serving.model_output import ChoiceOutput, OutputDelta, output_parser
from server.serving.params import sampling_fields
from server.serving.reasoning import ReasoningMode
from server.serving.scope import RequestScope
from server.serving.template_inputs import past_reasoning, template_kwargs
from server.serving.tool_names import check_tool_name, check_tool_names
from server.serving.tools import ParsedCall, ToolFormat, tool_call_entry
from server.wire.chat import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    CompletionTokensDetails,
    Delta,
    FunctionCall,
    NamedToolChoice,
    PromptTokensDetails,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from server.wire.codec import encode
from server.wire.sse import DONE, data_event

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_TEXT = frozenset({"text"})


class TextPart(Protocol):
    """A content part as chat and responses requests carry it."""

    type: str
    text: str | None


def joined_text(parts: Sequence[TextPart], accepted: frozenset[str], param: str) -> str:
    """The parts' text, joined; a 400 naming the part (`param[j]`) for a part not of an `accepted` type or without
    text."""
    pieces = []
    for j, part in enumerate(parts):
        if part.type not in accepted:
            raise InvalidRequestError(
                f"Content parts of type '{part.type}' are not supported by this model; send text parts only.",
                param=f"{param}[{j}]",
                code="unsupported_content_type",
            )
        if part.text is None:
            where = f"{param}[{j}].text"
            raise InvalidRequestError(
                f"Missing required parameter: '{where}'.", param=where, code="missing_required_parameter"
            )
        pieces.append(part.text)
    return "".join(pieces)


def _text_of(message: ChatMessage, index: int) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    return joined_text(content, _TEXT, f"messages[{index}].content")


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the dicts Hugging Face chat templates expect."""
    if not messages:
        raise InvalidRequestError("'messages' must contain at least one message.", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidRequestError(
                f"Invalid role '{message.role}'; expected one of {sorted(ROLES)}.", param=f"messages[{i}].role"
            )
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": _text_of(message, i) or "",
        }
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [
                tool_call_entry(c.id, c.function.name, c.function.arguments) for c in message.tool_calls
            ]
        past = message.reasoning_content if message.reasoning_content is not None else message.reasoning
        if past is not None:
            if message.role != "assistant":
                field = "reasoning_content" if message.reasoning_content is not None else "reasoning"
                raise InvalidRequestError(
                    f"'{field}' is only allowed on assistant messages.", param=f"messages[{i}].{field}"
                )
            entry.update(past_reasoning(past))
        if message.role == "tool":
            if not message.tool_call_id:
                raise InvalidRequestError(
                    "Messages with role 'tool' need a 'tool_call_id'.", param=f"messages[{i}].tool_call_id"
                )
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


@dataclass
class ChatPlan:
    """Everything needed to run one chat request and shape its answer."""

    served: ServedModel
    request: ValidRequest
    include_usage: bool
    want_logprobs: bool
    tools: list[dict[str, Any]] | None = None  # set when tool calls are parsed from the output
    tool_format: ToolFormat | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningMode | None = None  # set for a model with think markers
    timer: TokenTimer | None = None  # set by the route: TTFT and inter-token metrics
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def engine(self) -> Engine | EngineClient:
        return self.served.running_engine

    @property
    def requests(self) -> list[ValidRequest]:
        return [self.request]  # as CompletionPlan.requests

    def output(self) -> ChoiceOutput:
        """One choice's output parser (reasoning, answer and tool calls) and counts."""
        max_calls = None if self.parallel_tool_calls else 1
        return ChoiceOutput(
            output_parser(self.served, self.tools, self.tool_format, max_calls, self.reasoning), self.reasoning
        )


def _tool_choice(body: ChatCompletionRequest, names: list[str]) -> tuple[str, str | None]:
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return tool_mode(None, choice.function.name, names)
    return tool_mode(choice, None, names)


def prepare(
    body: ChatCompletionRequest, served: ServedModel, scope: RequestScope, conversation: str | None
) -> ChatPlan:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
    check_tool_names([t.function.name for t in body.tools or []], "tools[{}].function.name")
    if isinstance(body.tool_choice, NamedToolChoice):
        check_tool_name(body.tool_choice.function.name, "tool_choice.function.name")
    tools = [{"type": "function", "function": msgspec.to_builtins(t.function)} for t in body.tools or []]
    mode, forced = _tool_choice(body, [t["function"]["name"] for t in tools])
    messages = template_messages(body.messages)
    kwargs = template_kwargs(served.tokenizer, body.chat_template_kwargs, body.reasoning_effort)
    built = build_request(
        served,
        scope,
        conversation,
        messages,
        tools,
        mode,
        forced,
        msgspec.to_builtins(body.response_format) if body.response_format is not None else None,
        request_id=f"chat-{uuid.uuid4().hex}",
        streamed=bool(body.stream),
        template_kwargs=kwargs,
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        **sampling_fields(body),
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
        n=body.n,
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    fmt = built.tool_format
    return ChatPlan(
        served,
        built.request,
        include_usage,
        bool(body.logprobs),
        tools if fmt else None,
        fmt,
        body.parallel_tool_calls is not False,
        built.reasoning,
    )


class _Logprobs:
    """Builds OpenAI logprob entries from engine samples."""

    def __init__(self, served: ServedModel) -> None:
        self.text = TokenText(served.tokenizer)
        self.eos = served.running_engine.eos_ids

    def entry(self, event: TokenEvent) -> TokenLogprob | None:
        if event.token_id is None or event.logprob is None or event.token_id in self.eos:
            return None
        token, raw = self.text(event.token_id)
        tops = []
        for token_id, logprob in event.top_logprobs or []:
            alt, alt_raw = self.text(token_id)
            tops.append(TopLogprob(alt, logprob, alt_raw))
        return TokenLogprob(token, event.logprob, raw, tops)


def _usage(plan: ChatPlan, completion_tokens: int, cached: int, reasoning_tokens: int = 0) -> Usage:
    prompt = len(plan.request.prompt_token_ids)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion_tokens,
        total_tokens=prompt + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens),
    )


async def complete(plan: ChatPlan) -> ChatCompletion:
    n = plan.request.params.n
    outputs = [plan.output() for _ in range(n)]
    parts = [OutputDelta() for _ in range(n)]
    finish: list[str | None] = [None] * n
    counts = [0] * n
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    builder = _Logprobs(plan.served) if plan.want_logprobs else None
    cached = 0
    try:
        async for events in timed(plan.timer, plan.engine.stream(plan.request)):
            for event in events:
                i = event.index
                delta = outputs[i].add(event.token_id, event.text, event.finish_reason)
                parts[i].reasoning += delta.reasoning
                parts[i].content += delta.content
                parts[i].calls += delta.calls
                if builder is not None and (entry := builder.entry(event)) is not None:
                    logprobs[i].append(entry)
                if event.finish_reason is not None:
                    finish[i] = event.finish_reason
                    counts[i] = event.completion_tokens
                    if i == 0:
                        cached = event.cached_tokens
    except (PoolExhaustedError, GenerationError) as exc:
        raise engine_failure(exc) from exc
    choices = [_choice(plan, i, parts[i], finish[i], logprobs[i] if builder is not None else None) for i in range(n)]
    return ChatCompletion(
        id=plan.id,
        created=plan.created,
        model=plan.served.id,
        choices=choices,
        usage=_usage(plan, sum(counts), cached, sum(o.reasoning_tokens for o in outputs)),
        system_fingerprint=SYSTEM_FINGERPRINT,
    )


def _choice(
    plan: ChatPlan, index: int, part: OutputDelta, finish: str | None, logprobs: list[TokenLogprob] | None
) -> Choice:
    calls = part.calls if plan.tools is not None else []
    content = (part.content or None) if plan.tools is not None else part.content
    message = AssistantMessage(content=content, tool_calls=[_tool_call(c) for c in calls] or None)
    if plan.reasoning is not None or part.reasoning:  # think markers, or harmony's analysis channel
        message.reasoning_content = message.reasoning = part.reasoning
    reason = "tool_calls" if calls and finish == "stop" else finish
    return Choice(
        index=index,
        message=message,
        finish_reason=reason,
        logprobs=ChoiceLogprobs(content=logprobs) if logprobs is not None else None,
    )


def _tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _call_deltas(index: int, calls: list[ParsedCall], first: int) -> list[Delta]:
    """Two deltas per call: id, type and name (empty arguments), then the arguments."""
    deltas = []
    for k, call in enumerate(calls, start=first):
        deltas.append(
            Delta(
                tool_calls=[
                    ToolCallDelta(index=k, id=call.id, type="function", function={"name": call.name, "arguments": ""})
                ]
            )
        )
        deltas.append(Delta(tool_calls=[ToolCallDelta(index=k, function={"arguments": call.arguments})]))
    return deltas


def _usage_event(plan: ChatPlan, usage: Usage) -> bytes:
    chunk = ChatCompletionChunk(
        id=plan.id,
        created=plan.created,
        model=plan.served.id,
        choices=[],
        system_fingerprint=SYSTEM_FINGERPRINT,
        usage=usage,
    )
    return data_event(encode(chunk))


async def stream(plan: ChatPlan) -> AsyncGenerator[bytes, None]:
    """SSE bytes for a streamed chat completion, one item per engine batch; errors after the start become an
    error event.

    The role chunks go out with the first batch, and the last batch with the usage chunk and `[DONE]`: each
    item is a socket write, and a write before the request reaches the engine is paid on the event loop
    while a burst of requests waits to be admitted (bench/README.md, "Writes a request costs")."""
    n = plan.request.params.n
    builder = _Logprobs(plan.served) if plan.want_logprobs else None
    chunks = ChatChunks(plan.id, plan.created, plan.served.id)
    for i in range(n):
        chunks.chunk(i, Delta(role="assistant", content=""))
    counts = [0] * n
    cached = finished = 0
    outputs = [plan.output() for _ in range(n)]
    try:
        async for events in timed(plan.timer, plan.engine.stream(plan.request)):
            for event in events:
                i = event.index
                entry = builder.entry(event) if builder is not None else None
                first_call = outputs[i].num_calls
                out = outputs[i].add(event.token_id, event.text, event.finish_reason)
                if out.reasoning:
                    chunks.add(i, "reasoning", out.reasoning)
                if out.content or entry is not None:
                    chunks.add(i, "content", out.content, entry)
                for delta in _call_deltas(i, out.calls, first_call):
                    chunks.chunk(i, delta)
                if event.finish_reason is not None:
                    finished += 1
                    counts[i] = event.completion_tokens
                    if i == 0:
                        cached = event.cached_tokens
                    calls = outputs[i].num_calls
                    chunks.chunk(
                        i, Delta(), "tool_calls" if calls and event.finish_reason == "stop" else event.finish_reason
                    )
            if finished < n and (data := chunks.take()):
                yield data
    except (PoolExhaustedError, GenerationError) as exc:
        yield chunks.take() + data_event(encode(engine_failure(exc).body()))
        return
    tail = chunks.take()
    if plan.include_usage:
        tail += _usage_event(plan, _usage(plan, sum(counts), cached, sum(o.reasoning_tokens for o in outputs)))
    yield tail + DONE
