"""The names OpenAI allows for function tools: `^[a-zA-Z0-9_-]{1,64}$`, and no two tools of a request alike.

Chat completions and the Responses API check their `tools` and a `tool_choice`
that names a function here, with OpenAI's messages and codes; each caller
says how its API spells the parameter (`tools[0].function.name` in chat,
`tools[0].name` in Responses).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from server.errors import InvalidRequestError

MAX_NAME = 64
_ALLOWED = re.compile(r"[a-zA-Z0-9_-]+")


def check_tool_name(name: str, param: str) -> None:
    """A 400 naming `param` unless `name` is 1 to 64 letters, digits, underscores and dashes."""
    if not name:
        raise InvalidRequestError(
            f"Invalid '{param}': empty string. Expected a string with minimum length 1, but got "
            f"an empty string instead.",
            param=param,
            code="empty_string",
        )
    if len(name) > MAX_NAME:
        raise InvalidRequestError(
            f"Invalid '{param}': string too long. Expected a string with maximum length "
            f"{MAX_NAME}, but got a string with length {len(name)} instead.",
            param=param,
            code="string_above_max_length",
        )
    if not _ALLOWED.fullmatch(name):
        raise InvalidRequestError(
            f"Invalid '{param}': string does not match pattern. Expected a string that matches "
            f"the pattern '^[a-zA-Z0-9_-]+$'.",
            param=param,
            code="invalid_value",
        )


def check_tool_names(names: Sequence[str], param: str) -> None:
    """Each name valid and none repeated; `param` holds `{}` where the tool's index goes (`tools[{}].name`)."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        check_tool_name(name, param.format(i))
        if name in seen:
            raise InvalidRequestError(
                f"Invalid '{param.format(i)}': tools[{seen[name]}] is already named '{name}'; "
                f"tool names must be unique.",
                param=param.format(i),
                code="invalid_value",
            )
        seen[name] = i
