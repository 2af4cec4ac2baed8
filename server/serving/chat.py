"""Chat completions: messages -> prompt tokens -> engine request; engine events -> OpenAI objects.

The route decodes the request and calls `prepare`; `complete` collects a
non-streamed answer and `stream` yields SSE payloads: the role chunk, content
deltas, one finish chunk per choice, the usage chunk when asked, `[DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from server import __version__
from server.engine.block_pool import PoolExhaustedError
from server.engine.engine import Engine, GenerationError
from server.engine.request import GenerationRequest, TokenEvent
from server.errors import APIError, InvalidRequestError, ServiceUnavailableError
from server.models.registry import ServedModel
from server.serving.logprobs import TokenText
from server.serving.params import build_params, stop_list
from server.serving.scope import RequestScope
from server.wire.chat import (
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Choice,
    ChoiceLogprobs, ChunkChoice, Delta, PromptTokensDetails, TokenLogprob, TopLogprob, Usage,
)
from server.wire.codec import encode

SYSTEM_FINGERPRINT = f"fp_mlx_dropin_{__version__.replace('.', '_')}"
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _text_of(message: ChatMessage, index: int) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    pieces = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidRequestError(
                f"Content parts of type '{part.type}' are not supported by this model; send text parts only.",
                param=f"messages[{index}].content[{j}]", code="unsupported_content_type")
        pieces.append(part.text)
    return "".join(pieces)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as the dicts Hugging Face chat templates expect."""
    if not messages:
        raise InvalidRequestError("'messages' must contain at least one message.", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidRequestError(f"Invalid role '{message.role}'; expected one of {sorted(ROLES)}.",
                                      param=f"messages[{i}].role")
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                 "content": _text_of(message, i) or ""}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                   for c in message.tool_calls]
        if message.role == "tool":
            if not message.tool_call_id:
                raise InvalidRequestError("Messages with role 'tool' need a 'tool_call_id'.",
                                          param=f"messages[{i}].tool_call_id")
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return raw


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True)
    except TemplateError as exc:
        raise InvalidRequestError(f"The model's chat template rejected these messages: {exc}",
                                  param="messages") from exc
    return list(ids)


@dataclass
class ChatPlan:
    """Everything needed to run one chat request and shape its answer."""

    served: ServedModel
    request: GenerationRequest
    include_usage: bool
    want_logprobs: bool
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def engine(self) -> Engine:
        return self.served.engine  # type: ignore[no-any-return]


def prepare(body: ChatCompletionRequest, served: ServedModel, scope: RequestScope,
            conversation: str | None) -> ChatPlan:
    if body.response_format is not None and body.response_format.type not in ("text",):
        raise InvalidRequestError(f"response_format type '{body.response_format.type}' is not supported yet.",
                                  param="response_format")
    if body.tools:
        raise InvalidRequestError("Tool calling is not supported yet.", param="tools")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
    params = build_params(
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty, logit_bias=body.logit_bias, seed=body.seed,
        stop=stop_list(body.stop), logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0, n=body.n)
    prompt = render_prompt(served.tokenizer, template_messages(body.messages), None)
    request = GenerationRequest(
        request_id=f"chat-{uuid.uuid4().hex}", prompt_token_ids=prompt, params=params,
        conversation_key=scope.conversation_key(served.id, conversation), salt=scope.salt(served.id))
    served.engine.validate(request)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return ChatPlan(served, request, include_usage, bool(body.logprobs))


def engine_failure(exc: Exception) -> APIError:
    if isinstance(exc, PoolExhaustedError):
        return ServiceUnavailableError(f"The server is at capacity ({exc}); retry shortly.",
                                       code="server_overloaded", headers={"retry-after": "2"})
    return APIError(f"Generation failed: {exc}")


class _Logprobs:
    """Builds OpenAI logprob entries from engine samples."""

    def __init__(self, served: ServedModel) -> None:
        self.text = TokenText(served.tokenizer)
        self.eos = served.engine.eos_ids

    def entry(self, event: TokenEvent) -> TokenLogprob | None:
        if event.token_id is None or event.logprob is None or event.token_id in self.eos:
            return None
        token, raw = self.text(event.token_id)
        tops = []
        for token_id, logprob in event.top_logprobs or []:
            alt, alt_raw = self.text(token_id)
            tops.append(TopLogprob(alt, logprob, alt_raw))
        return TokenLogprob(token, event.logprob, raw, tops)


def _usage(plan: ChatPlan, completion_tokens: int, cached: int) -> Usage:
    prompt = len(plan.request.prompt_token_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


async def complete(plan: ChatPlan) -> ChatCompletion:
    n = plan.request.params.n
    texts = [""] * n
    finish: list[str | None] = [None] * n
    counts = [0] * n
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    builder = _Logprobs(plan.served) if plan.want_logprobs else None
    cached = 0
    try:
        async for event in plan.engine.stream(plan.request):
            texts[event.index] += event.text
            if builder is not None and (entry := builder.entry(event)) is not None:
                logprobs[event.index].append(entry)
            if event.finish_reason is not None:
                finish[event.index] = event.finish_reason
                counts[event.index] = event.completion_tokens
                if event.index == 0:
                    cached = event.cached_tokens
    except (PoolExhaustedError, GenerationError) as exc:
        raise engine_failure(exc) from exc
    choices = [Choice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=finish[i],
                      logprobs=ChoiceLogprobs(content=logprobs[i]) if builder is not None else None)
               for i in range(n)]
    return ChatCompletion(id=plan.id, created=plan.created, model=plan.served.id, choices=choices,
                          usage=_usage(plan, sum(counts), cached), system_fingerprint=SYSTEM_FINGERPRINT)


def _chunk(plan: ChatPlan, choices: list[ChunkChoice], usage: Usage | None = None) -> dict[str, str]:
    chunk = ChatCompletionChunk(id=plan.id, created=plan.created, model=plan.served.id, choices=choices,
                                system_fingerprint=SYSTEM_FINGERPRINT, usage=usage)
    return {"data": encode(chunk).decode()}


async def stream(plan: ChatPlan) -> AsyncIterator[dict[str, str]]:
    """SSE payloads for a streamed chat completion; errors after the start become an error event."""
    n = plan.request.params.n
    builder = _Logprobs(plan.served) if plan.want_logprobs else None
    yield _chunk(plan, [ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(n)])
    counts = [0] * n
    cached = 0
    try:
        async for event in plan.engine.stream(plan.request):
            entry = builder.entry(event) if builder is not None else None
            if event.text or entry is not None:
                logprobs = ChoiceLogprobs(content=[entry]) if entry is not None else None
                yield _chunk(plan, [ChunkChoice(index=event.index, delta=Delta(content=event.text),
                                                logprobs=logprobs)])
            if event.finish_reason is not None:
                counts[event.index] = event.completion_tokens
                if event.index == 0:
                    cached = event.cached_tokens
                yield _chunk(plan, [ChunkChoice(index=event.index, delta=Delta(),
                                                finish_reason=event.finish_reason)])
    except (PoolExhaustedError, GenerationError) as exc:
        yield {"data": encode(engine_failure(exc).body()).decode()}
        return
    if plan.include_usage:
        yield _chunk(plan, [], _usage(plan, sum(counts), cached))
    yield {"data": "[DONE]"}
