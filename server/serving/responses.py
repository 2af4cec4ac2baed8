"""Responses API requests: input items -> chat messages -> an engine request, continuing `previous_response_id`.

A response continues its predecessor's whole conversation: the stored items
before it, its input and its output, then the new input. The prompt is that
conversation rendered with the chat template, so it starts with the tokens
the previous turn computed, and the chain's conversation key (its root's, or
the `prompt_cache_key` it began with) finds them pinned in the engine: only
the new input is prefilled. `instructions`, `tools` and `text` are not
inherited, as in OpenAI's API. Prompt building, tools and grammars are shared
with chat completions (`server.serving.generation.build_request`).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from server.engine import ValidRequest
from server.errors import InvalidRequestError
from server.metrics import TokenTimer
from server.persistence.responses import ResponseStore
from server.registry import ServedModel
from server.serving.chat import joined_text
from server.serving.generation import build_request, tool_mode
from server.serving.model_output import ChoiceOutput, output_parser
from server.serving.reasoning import ReasoningMode
from server.serving.scope import RequestScope
from server.serving.template_inputs import past_reasoning, template_kwargs
from server.serving.tool_names import check_tool_name, check_tool_names
from server.serving.tools import ToolFormat, tool_call_entry
from server.wire.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    InputContent,
    InputItem,
    InputText,
    Item,
    MessageItem,
    OutputText,
    Reasoning,
    ReasoningItem,
    ReasoningText,
    Response,
    ResponseRequest,
    TextConfig,
    TextFormat,
    ToolChoiceObject,
)

MESSAGE_ROLES = frozenset({"user", "system", "developer", "assistant"})
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
# chat's parameter names in errors, as this API calls them
_PARAMS = {"messages": "input", "prompt": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}
MAX_METADATA = 16


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class ResponsePlan:
    """One response to generate: the engine request, the response as created, and what storing it needs."""

    served: ServedModel
    request: ValidRequest
    response: Response  # status "in_progress", no output yet
    tenant: str
    conversation: str | None  # the chain's conversation key (stored with the response)
    history: list[Item]  # the conversation before this response's input
    input: list[Item]
    tools: list[dict[str, Any]] | None = None  # set when tool calls are parsed from the output
    tool_format: ToolFormat | None = None
    max_calls: int | None = None
    reasoning: ReasoningMode | None = None  # set for a model with think markers
    timer: TokenTimer | None = None  # set by the route: TTFT and inter-token metrics

    def output(self) -> ChoiceOutput:
        """The output parser (reasoning, answer and tool calls) and its counts."""
        tools = self.tools if self.tools and self.tool_format else None
        parser = output_parser(self.served, tools, self.tool_format, self.max_calls, self.reasoning)
        return ChoiceOutput(parser, self.reasoning)


# -- input items ------------------------------------------------------------------------------------
def _text(content: str | list[InputContent] | None, param: str) -> str:
    if content is None:
        raise InvalidRequestError(f"'{param}' is required.", param=param)
    if isinstance(content, str):
        return content
    return joined_text(content, TEXT_PARTS, param)


def _item(raw: InputItem, i: int) -> Item:
    kind = raw.type or ("message" if raw.role else None)
    where = f"input[{i}]"
    if kind == "message":
        if raw.role not in MESSAGE_ROLES:
            raise InvalidRequestError(
                f"Invalid role '{raw.role}'; expected one of {sorted(MESSAGE_ROLES)}.", param=f"{where}.role"
            )
        text = _text(raw.content, f"{where}.content")
        part: InputText | OutputText = OutputText(text) if raw.role == "assistant" else InputText(text)
        return MessageItem(id=raw.id or new_id("msg"), role=raw.role, content=[part])
    if kind == "function_call":
        if not raw.call_id or not raw.name:
            missing = "call_id" if not raw.call_id else "name"
            raise InvalidRequestError(f"A function_call item needs '{missing}'.", param=f"{where}.{missing}")
        return FunctionCallItem(
            id=raw.id or new_id("fc"), call_id=raw.call_id, name=raw.name, arguments=raw.arguments or ""
        )
    if kind == "reasoning":
        parts = raw.content if isinstance(raw.content, list) else []
        text = "".join(p.text or "" for p in parts if p.type == "reasoning_text")
        return ReasoningItem(id=raw.id or new_id("rs"), content=[ReasoningText(text)] if text else [])
    if kind == "function_call_output":
        if not raw.call_id:
            raise InvalidRequestError("A function_call_output item needs 'call_id'.", param=f"{where}.call_id")
        return FunctionCallOutputItem(
            id=raw.id or new_id("fco"), call_id=raw.call_id, output=_text(raw.output, f"{where}.output")
        )
    raise InvalidRequestError(
        f"Input items of type '{kind}' are not supported; send messages, function_call and function_call_output items.",
        param=f"{where}.type",
        code="unsupported_item_type",
    )


def input_items(given: str | list[InputItem] | None) -> list[Item]:
    """The request's `input` as stored items (ids assigned where the client sent none)."""
    if given is None or given == [] or given == "":
        raise InvalidRequestError("'input' must be a non-empty string or list of items.", param="input")
    if isinstance(given, str):
        return [MessageItem(id=new_id("msg"), role="user", content=[InputText(given)])]
    return [_item(raw, i) for i, raw in enumerate(given)]


def check_call_ids(history: list[Item], items: list[Item]) -> None:
    """Every function_call_output in `items` answers a function_call made before it in the conversation."""
    calls = {item.call_id for item in history if isinstance(item, FunctionCallItem)}
    for i, item in enumerate(items):
        if isinstance(item, FunctionCallItem):
            calls.add(item.call_id)
        elif isinstance(item, FunctionCallOutputItem) and item.call_id not in calls:
            raise InvalidRequestError(
                f"No tool call found for function call output with call_id {item.call_id}.", param=f"input[{i}].call_id"
            )


def chat_messages(items: list[Item], instructions: str | None) -> list[dict[str, Any]]:
    """A conversation's items as chat-template messages; a function call joins the assistant turn before it."""
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    reasoning = ""  # a reasoning item's text joins the assistant turn after it
    for item in items:
        if isinstance(item, ReasoningItem):
            reasoning += "".join(part.text for part in item.content)
        elif isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": "".join(part.text for part in item.content)})
        elif isinstance(item, FunctionCallItem):
            call = tool_call_entry(item.call_id, item.name, item.arguments)
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        if reasoning and not isinstance(item, ReasoningItem) and out and out[-1]["role"] == "assistant":
            out[-1].update(past_reasoning(reasoning))  # under every name templates read (gpt-oss: `thinking`)
            reasoning = ""
    return out


def _conversation(items: list[Item], instructions: str | None) -> list[dict[str, Any]]:
    """chat_messages, refusing a conversation with nothing but reasoning in it."""
    messages = chat_messages(items, instructions)
    if not messages:
        raise InvalidRequestError("'input' must contain a message, not only reasoning items.", param="input")
    return messages


# -- tools and formats ------------------------------------------------------------------------------
def _tools(tools: list[FunctionTool] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools or []):
        if tool.type != "function":
            raise InvalidRequestError(
                f"Tools of type '{tool.type}' are not supported; only function tools are.",
                param=f"tools[{i}].type",
                code="unsupported_tool_type",
            )
        if tool.name is None:
            raise InvalidRequestError(
                f"Missing required parameter: 'tools[{i}].name'.",
                param=f"tools[{i}].name",
                code="missing_required_parameter",
            )
        function = {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
            "strict": tool.strict,
        }
        out.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    check_tool_names([t["function"]["name"] for t in out], "tools[{}].name")
    return out


def _tool_mode(choice: str | ToolChoiceObject | None, names: list[str]) -> tuple[str, str | None]:
    if isinstance(choice, ToolChoiceObject):
        if choice.type != "function" or not choice.name:
            raise InvalidRequestError(
                f"tool_choice of type '{choice.type}' is not supported; use 'none', 'auto', 'required' or "
                '{"type": "function", "name": ...}.',
                param="tool_choice",
            )
        check_tool_name(choice.name, "tool_choice.name")
        return tool_mode(None, choice.name, names)
    return tool_mode(choice, None, names)


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format`."""
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.type == "json_schema":
        if fmt.schema is None:
            raise InvalidRequestError("text.format of type 'json_schema' needs a 'schema'.", param="text.format.schema")
        return {
            "type": "json_schema",
            "json_schema": {"name": fmt.name or "response", "schema": fmt.schema, "strict": fmt.strict},
        }
    raise InvalidRequestError(
        f"text.format.type must be 'text', 'json_object' or 'json_schema', got '{fmt.type}'.", param="text.format.type"
    )


def _effort(reasoning: dict[str, Any] | None) -> str | None:
    """`reasoning.effort`, the one field of `reasoning` that reaches the prompt."""
    effort = (reasoning or {}).get("effort")
    if effort is not None and not isinstance(effort, str):
        raise InvalidRequestError("'reasoning.effort' must be a string.", param="reasoning.effort")
    return effort


def _refuse_unsupported(body: ResponseRequest) -> None:
    """Fields this server knows but cannot honour are a 400, never silently dropped."""
    if body.background:
        raise InvalidRequestError("Background responses are not supported.", param="background")
    if body.conversation is not None:
        raise InvalidRequestError(
            "The Conversations API is not supported; continue with 'previous_response_id'.", param="conversation"
        )
    if body.prompt is not None:
        raise InvalidRequestError("Stored prompt templates are not supported; send 'input'.", param="prompt")
    if body.top_logprobs:
        raise InvalidRequestError(
            "Logprobs are not supported on /v1/responses; use /v1/chat/completions.", param="top_logprobs"
        )
    if body.max_tool_calls is not None and body.max_tool_calls < 1:
        raise InvalidRequestError("'max_tool_calls' must be at least 1.", param="max_tool_calls")
    metadata = body.metadata or {}
    if len(metadata) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise InvalidRequestError(
            "'metadata' holds at most 16 pairs, keys up to 64 and values up to 512 characters.", param="metadata"
        )


@contextlib.contextmanager
def _responses_params() -> Iterator[None]:
    """Errors raised by the shared generation helpers name this API's fields."""
    try:
        yield
    except InvalidRequestError as exc:
        param = "messages" if (exc.param or "").startswith("messages[") else exc.param  # messages are not input items
        exc.param = _PARAMS.get(param or "", param)
        raise


def prepare(
    body: ResponseRequest, served: ServedModel, scope: RequestScope, conversation: str | None, store: ResponseStore
) -> ResponsePlan:
    """Check the request, load the conversation it continues, and build its engine request."""
    _refuse_unsupported(body)
    history: list[Item] = []
    if body.previous_response_id:
        previous = store.load(scope.tenant, body.previous_response_id)
        if previous is None:
            raise InvalidRequestError(
                f"Previous response with id '{body.previous_response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        history, conversation = previous.items, previous.conversation
    items = input_items(body.input)
    check_call_ids(history, items)
    tools = _tools(body.tools)
    mode, forced = _tool_mode(body.tool_choice, [t["function"]["name"] for t in tools])
    response_id = new_id("resp")
    store_it = body.store is not False
    if conversation is None and store_it:
        conversation = response_id  # a new chain: its follow-ups find its KV under this key
    effort = _effort(body.reasoning)
    with _responses_params():
        kwargs = template_kwargs(served.tokenizer, body.chat_template_kwargs, effort, effort_param="reasoning.effort")
        built = build_request(
            served,
            scope,
            conversation,
            _conversation(history + items, body.instructions),
            tools,
            mode,
            forced,
            _response_format(body.text),
            request_id=f"resp-{uuid.uuid4().hex}",
            streamed=bool(body.stream),
            template_kwargs=kwargs,
            max_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
        )
    max_calls = 1 if body.parallel_tool_calls is False else None
    if body.max_tool_calls is not None:
        max_calls = min(max_calls or body.max_tool_calls, body.max_tool_calls)
    response = Response(
        id=response_id,
        created_at=int(time.time()),
        model=served.id,
        status="in_progress",
        output=[],
        tools=body.tools or [],
        tool_choice=body.tool_choice or "auto",
        parallel_tool_calls=body.parallel_tool_calls is not False,
        text=TextConfig(
            format=(body.text.format if body.text else None) or TextFormat(type="text"),
            verbosity=(body.text.verbosity if body.text else None) or "medium",
        ),
        instructions=body.instructions,
        metadata=body.metadata or {},
        previous_response_id=body.previous_response_id,
        max_output_tokens=body.max_output_tokens,
        max_tool_calls=body.max_tool_calls,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        store=store_it,
        user=body.user,
        prompt_cache_key=body.prompt_cache_key,
        safety_identifier=body.safety_identifier,
        reasoning=Reasoning(effort=effort),
    )
    fmt = built.tool_format
    return ResponsePlan(
        served,
        built.request,
        response,
        scope.tenant,
        conversation,
        history,
        items,
        tools if fmt else None,
        fmt,
        max_calls,
        built.reasoning,
    )
