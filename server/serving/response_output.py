"""Responses API output: the model's text -> output items, as one response object or OpenAI's event stream.

    response.created, response.in_progress
    reasoning:  output_item.added, content_part.added, reasoning_text.delta ..., reasoning_text.done,
                content_part.done, output_item.done
    a message:  output_item.added, content_part.added, output_text.delta ..., output_text.done,
                content_part.done, output_item.done
    a call:     output_item.added, function_call_arguments.delta, function_call_arguments.done,
                output_item.done
    response.completed | response.incomplete (max_output_tokens, or interrupted) | response.failed

JSON and streamed answers run the same `_generate`. A stored response is saved
before its final event, so a client that has it can continue it at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncGenerator, AsyncIterator

import msgspec

from server.engine import GenerationError, PoolExhaustedError
from server.metrics import timed
from server.persistence.responses import ResponseStore
from server.serving.generation import engine_failure
from server.serving.model_output import ChoiceOutput
from server.serving.responses import ResponsePlan, new_id
from server.serving.tools import ParsedCall
from server.wire.codec import encode
from server.wire.responses import (
    ContentPartAdded,
    ContentPartDone,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    Item,
    MessageItem,
    OutputItemAdded,
    OutputItemDone,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    ReasoningTextDelta,
    ReasoningTextDone,
    Response,
    ResponseCompleted,
    ResponseCreated,
    ResponseError,
    ResponseFailed,
    ResponseIncomplete,
    ResponseInProgress,
    ResponseUsage,
    StreamEvent,
)
from server.wire.sse import named_event

# engine finish reasons that leave a response incomplete, and the reason it then gives: "abort" is a
# generation the server cut short (its graceful shutdown's deadline, see server/shutdown.py)
INCOMPLETE = {"length": "max_output_tokens", "abort": "interrupted"}


class OutputBuilder:
    """Builds output items from streamed text (reasoning and tool calls parsed out) and says each step as
    stream events.

    A thinking model's reasoning becomes a `reasoning` item before the message. Whitespace before a
    message's first visible text is held back, so a tool call the model starts after a newline does not
    leave an empty message in front of it.
    """

    def __init__(self, output: ChoiceOutput) -> None:
        self.output = output
        self.items: list[Item] = []  # finished items; an open message becomes items[len(items)]
        self.finish_reason: str | None = None
        self.usage: ResponseUsage | None = None
        self._message_id: str | None = None
        self._text = ""
        self._pending = ""
        self._reasoning_id: str | None = None
        self._reasoning = ""

    def feed(self, token_id: int | None, text: str, finish_reason: str | None) -> list[StreamEvent]:
        """The events for one token's text (`finish_reason` set on the last): a call the generation cut
        short is dropped, never shown as output_text."""
        delta = self.output.add(token_id, text, finish_reason)
        events = self._add_reasoning(delta.reasoning)
        if delta.content or delta.calls:
            events += self._close_reasoning("completed")
        events += self._add_text(delta.content)
        for call in delta.calls:
            events += self._close_message("completed") + self._add_call(call)
        return events

    def close(self, finish_reason: str) -> list[StreamEvent]:
        """End of generation: the open items are closed; a response that said nothing gets an empty message."""
        status = "incomplete" if finish_reason in INCOMPLETE else "completed"
        events = self._close_reasoning(status)
        if not any(not isinstance(item, ReasoningItem) for item in self.items) and self._message_id is None:
            events += self._open_message()
        return events + self._close_message(status)

    def _add_reasoning(self, text: str) -> list[StreamEvent]:
        if not text:
            return []
        events: list[StreamEvent] = []
        index = len(self.items)
        if self._reasoning_id is None:
            self._reasoning_id, self._reasoning = new_id("rs"), ""
            started = ReasoningItem(id=self._reasoning_id, content=[], status="in_progress")
            events += [
                OutputItemAdded(output_index=index, item=started),
                ContentPartAdded(
                    item_id=self._reasoning_id, output_index=index, content_index=0, part=ReasoningText("")
                ),
            ]
        self._reasoning += text
        delta = ReasoningTextDelta(item_id=self._reasoning_id, output_index=index, content_index=0, delta=text)
        return [*events, delta]

    def _close_reasoning(self, status: str) -> list[StreamEvent]:
        item_id, text, index = self._reasoning_id, self._reasoning, len(self.items)
        if item_id is None:
            return []
        item = ReasoningItem(id=item_id, content=[ReasoningText(text)], status=status)
        self.items.append(item)
        self._reasoning_id = None
        return [
            ReasoningTextDone(item_id=item_id, output_index=index, content_index=0, text=text),
            ContentPartDone(item_id=item_id, output_index=index, content_index=0, part=ReasoningText(text)),
            OutputItemDone(output_index=index, item=item),
        ]

    def _add_text(self, text: str) -> list[StreamEvent]:
        if self._message_id is not None:
            return self._delta(text)
        self._pending += text
        return self._open_message() if self._pending.strip() else []

    def _open_message(self) -> list[StreamEvent]:
        self._message_id, self._text = new_id("msg"), ""
        index = len(self.items)
        started = MessageItem(id=self._message_id, role="assistant", content=[], status="in_progress")
        events: list[StreamEvent] = [
            OutputItemAdded(output_index=index, item=started),
            ContentPartAdded(item_id=self._message_id, output_index=index, content_index=0, part=OutputText("")),
        ]
        text, self._pending = self._pending, ""
        return events + self._delta(text)

    def _delta(self, text: str) -> list[StreamEvent]:
        if not text or self._message_id is None:
            return []
        self._text += text
        return [OutputTextDelta(item_id=self._message_id, output_index=len(self.items), content_index=0, delta=text)]

    def _close_message(self, status: str) -> list[StreamEvent]:
        item_id, text, index = self._message_id, self._text, len(self.items)
        if item_id is None:
            return []
        item = MessageItem(id=item_id, role="assistant", content=[OutputText(text)], status=status)
        self.items.append(item)
        self._message_id = None
        return [
            OutputTextDone(item_id=item_id, output_index=index, content_index=0, text=text),
            ContentPartDone(item_id=item_id, output_index=index, content_index=0, part=OutputText(text)),
            OutputItemDone(output_index=index, item=item),
        ]

    def _add_call(self, call: ParsedCall) -> list[StreamEvent]:
        self._pending = ""
        index, item_id = len(self.items), new_id("fc")
        item = FunctionCallItem(id=item_id, call_id=call.id, name=call.name, arguments=call.arguments)
        self.items.append(item)
        started = FunctionCallItem(id=item_id, call_id=call.id, name=call.name, arguments="", status="in_progress")
        return [
            OutputItemAdded(output_index=index, item=started),
            FunctionCallArgumentsDelta(item_id=item_id, output_index=index, delta=call.arguments),
            FunctionCallArgumentsDone(item_id=item_id, output_index=index, name=call.name, arguments=call.arguments),
            OutputItemDone(output_index=index, item=item),
        ]


_DELTAS = (OutputTextDelta, ReasoningTextDelta, FunctionCallArgumentsDelta)


def _joined(events: list[StreamEvent]) -> list[StreamEvent]:
    """Consecutive deltas of one kind into the same item and part, as one delta (a batch of tokens, one event)."""
    out: list[StreamEvent] = []
    for event in events:
        last = out[-1] if out else None
        if (
            isinstance(event, _DELTAS)
            and type(last) is type(event)
            and last.item_id == event.item_id
            and getattr(last, "content_index", None) == getattr(event, "content_index", None)
        ):
            out[-1] = msgspec.structs.replace(last, delta=last.delta + event.delta)
        else:
            out.append(event)
    return out


async def _generate(plan: ResponsePlan, output: OutputBuilder) -> AsyncIterator[list[StreamEvent]]:
    """Engine event batches -> output events, one list per batch, ending with every item closed and the usage
    known."""
    async for events in timed(plan.timer, plan.served.running_engine.stream(plan.request)):
        steps: list[StreamEvent] = []
        for event in events:
            steps += output.feed(event.token_id, event.text, event.finish_reason)
            if event.finish_reason is None:
                continue
            output.finish_reason = event.finish_reason
            output.usage = ResponseUsage(
                input_tokens=event.prompt_tokens,
                output_tokens=event.completion_tokens,
                total_tokens=event.prompt_tokens + event.completion_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=event.cached_tokens),
                output_tokens_details=OutputTokensDetails(reasoning_tokens=output.output.reasoning_tokens),
            )
            steps += output.close(event.finish_reason)
        yield _joined(steps)


def _finished(plan: ResponsePlan, output: OutputBuilder) -> Response:
    reason = INCOMPLETE.get(output.finish_reason or "")
    incomplete = reason is not None
    return msgspec.structs.replace(
        plan.response,
        status="incomplete" if incomplete else "completed",
        output=output.items,
        usage=output.usage,
        incomplete_details=IncompleteDetails(reason) if reason is not None else None,
        completed_at=None if incomplete else int(time.time()),
    )


async def _save(plan: ResponsePlan, response: Response, store: ResponseStore) -> None:
    if response.store and plan.conversation is not None:
        await asyncio.to_thread(store.save, plan.tenant, response, plan.conversation, plan.history, plan.input)


async def complete(plan: ResponsePlan, store: ResponseStore) -> Response:
    output = OutputBuilder(plan.output())
    try:
        async for _ in _generate(plan, output):
            pass
    except (PoolExhaustedError, GenerationError) as exc:
        raise engine_failure(exc) from exc
    response = _finished(plan, output)
    await _save(plan, response, store)
    return response


async def stream(plan: ResponsePlan, store: ResponseStore) -> AsyncGenerator[bytes, None]:
    """SSE bytes (`event:` + `data:`), one item per engine batch; a failure after the start ends the stream with
    response.failed."""
    numbers = itertools.count()

    def sse(event: StreamEvent) -> bytes:
        event.sequence_number = next(numbers)
        # msgspec types a tag as str | int | None; every StreamEvent's tag is its type string
        return named_event(type(event).__struct_config__.tag, encode(event))  # type: ignore[arg-type]

    yield sse(ResponseCreated(response=plan.response)) + sse(ResponseInProgress(response=plan.response))
    output = OutputBuilder(plan.output())
    try:
        async for events in _generate(plan, output):
            if events:
                yield b"".join(sse(event) for event in events)
    except (PoolExhaustedError, GenerationError) as exc:
        error = engine_failure(exc)
        yield sse(
            ResponseFailed(
                response=msgspec.structs.replace(
                    plan.response,
                    status="failed",
                    output=output.items,
                    error=ResponseError(code=error.code or "server_error", message=error.message),
                )
            )
        )
        return
    response = _finished(plan, output)
    await _save(plan, response, store)
    yield sse(
        ResponseCompleted(response=response)
        if response.status == "completed"
        else ResponseIncomplete(response=response)
    )
