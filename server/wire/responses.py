"""The Responses API on the wire: the request, the items of a conversation, the response object, stream events.

Incoming items are decoded loosely (`InputItem`: a message may omit `type`,
content may be a string or parts) and checked in `server.serving.responses`;
what the server stores and returns are the tagged items `MessageItem`,
`FunctionCallItem`, `FunctionCallOutputItem` and `ReasoningItem` (a thinking
model's reasoning), in the shapes the `openai` SDK's types
(openai/types/responses) declare.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# -- the request ----------------------------------------------------------------------------------


class InputContent(msgspec.Struct):
    type: str
    text: str | None = None


class InputItem(msgspec.Struct):
    """One element of `input`: a message (`type` optional), a `function_call` or a `function_call_output`."""

    type: str | None = None
    role: str | None = None
    content: str | list[InputContent] | None = None
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputContent] | None = None


class FunctionTool(msgspec.Struct, omit_defaults=True):
    """A flat function tool (`{"type": "function", "name", "parameters", ...}`); other types are refused."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceObject(msgspec.Struct, omit_defaults=True):
    type: str
    name: str | None = None


class TextFormat(msgspec.Struct, omit_defaults=True):
    type: str
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, omit_defaults=True):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponseRequest(msgspec.Struct):
    model: str | None = None
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    stream: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    top_logprobs: int | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    # accepted and ignored: what a model without reasoning or hosted tools has nothing to do with
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None  # its "effort" reaches templates that read reasoning_effort (gpt-oss)
    truncation: str | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None


# -- items: what the model saw and said -----------------------------------------------------------


class InputText(msgspec.Struct, tag_field="type", tag="input_text"):
    text: str


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class MessageItem(msgspec.Struct, tag_field="type", tag="message"):
    id: str
    role: str
    content: list[InputText | OutputText]
    status: str = "completed"


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str = "completed"


class FunctionCallOutputItem(msgspec.Struct, tag_field="type", tag="function_call_output"):
    id: str
    call_id: str
    output: str
    status: str = "completed"


class ReasoningText(msgspec.Struct, tag_field="type", tag="reasoning_text"):
    text: str


class ReasoningItem(msgspec.Struct, tag_field="type", tag="reasoning"):
    id: str
    content: list[ReasoningText]
    summary: list[Any] = msgspec.field(default_factory=list)
    status: str = "completed"


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


# -- the response object --------------------------------------------------------------------------


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class ResponseError(msgspec.Struct):
    code: str
    message: str


class IncompleteDetails(msgspec.Struct):
    reason: str


class Reasoning(msgspec.Struct):
    effort: str | None = None
    summary: str | None = None


class Response(msgspec.Struct):
    id: str
    created_at: int
    model: str
    status: str
    output: list[Item]
    tools: list[FunctionTool]
    tool_choice: str | ToolChoiceObject
    parallel_tool_calls: bool
    text: TextConfig
    object: Literal["response"] = "response"
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_logprobs: int = 0
    store: bool = True
    background: bool = False
    truncation: str = "disabled"
    reasoning: Reasoning = msgspec.field(default_factory=Reasoning)
    service_tier: str = "default"
    user: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    usage: ResponseUsage | None = None
    completed_at: int | None = None


class ResponseDeleted(msgspec.Struct):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class ItemList(msgspec.Struct):
    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


# -- stream events (`event: <type>` + `data: {"type", "sequence_number", ...}`) ---------------------


class StreamEvent(msgspec.Struct, tag_field="type", kw_only=True):
    sequence_number: int = 0


class LifecycleEvent(StreamEvent):
    response: Response


class ResponseCreated(LifecycleEvent, tag="response.created"):
    pass


class ResponseInProgress(LifecycleEvent, tag="response.in_progress"):
    pass


class ResponseCompleted(LifecycleEvent, tag="response.completed"):
    pass


class ResponseIncomplete(LifecycleEvent, tag="response.incomplete"):
    pass


class ResponseFailed(LifecycleEvent, tag="response.failed"):
    pass


class ItemEvent(StreamEvent):
    output_index: int
    item: Item


class OutputItemAdded(ItemEvent, tag="response.output_item.added"):
    pass


class OutputItemDone(ItemEvent, tag="response.output_item.done"):
    pass


class InItemEvent(StreamEvent):
    item_id: str
    output_index: int


class InContentEvent(InItemEvent):
    content_index: int


class ContentPartAdded(InContentEvent, tag="response.content_part.added"):
    part: OutputText | ReasoningText


class ContentPartDone(InContentEvent, tag="response.content_part.done"):
    part: OutputText | ReasoningText


class OutputTextDelta(InContentEvent, tag="response.output_text.delta"):
    delta: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class OutputTextDone(InContentEvent, tag="response.output_text.done"):
    text: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ReasoningTextDelta(InContentEvent, tag="response.reasoning_text.delta"):
    delta: str


class ReasoningTextDone(InContentEvent, tag="response.reasoning_text.done"):
    text: str


class FunctionCallArgumentsDelta(InItemEvent, tag="response.function_call_arguments.delta"):
    delta: str


class FunctionCallArgumentsDone(InItemEvent, tag="response.function_call_arguments.done"):
    name: str
    arguments: str
