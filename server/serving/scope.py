"""Who is asking: the tenant behind an API key, and the keys that scope cached KV to it.

The tenant is the key's organization (``--api-keys-file``), or the key alone
when it has none (`server.keys.ApiKey.tenant`); AuthMiddleware puts the key in
the request's state. Two tenants never share KV: the tenant id is part of
every block hash's salt and of every conversation key, so a guessed
conversation id from another organization finds nothing, and identical
prompts from two tenants are computed twice. On an open server (no keys)
everyone is the one tenant "public".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.requests import Request

from server.keys import PUBLIC_TENANT


@dataclass(frozen=True)
class RequestScope:
    tenant: str

    @classmethod
    def of(cls, request: Request) -> RequestScope:
        key = getattr(request.state, "api_key", None)
        return cls(key.tenant if key is not None else PUBLIC_TENANT)

    def salt(self, model_id: str) -> bytes:
        """What changes KV besides tokens: the model (or adapter) and the tenant."""
        return f"{model_id}\x00{self.tenant}".encode()

    def conversation_key(self, model_id: str, conversation: str | None) -> str | None:
        if not conversation:
            return None
        return f"{self.tenant}\x00{model_id}\x00{conversation}"


_CONVERSATION_HEADER = re.compile(r"^[\x21-\x7e]{1,256}$")  # visible ASCII: safe in any proxy's hash and log


def conversation_header_safe(value: str) -> bool:
    """Whether `value` may travel as an X-Conversation-Id header (the middleware refuses others with a 400)."""
    return bool(_CONVERSATION_HEADER.match(value))


def conversation_id(request: Request, prompt_cache_key: str | None, user: str | None) -> str | None:
    """`prompt_cache_key`, else `user`, else the X-Conversation-Id header (checked by ConversationIdMiddleware).

    A NUL (JSON's \\u0000) becomes U+FFFD: the key is stored with a response, and PostgreSQL's text cannot hold
    NUL; the key only groups a tenant's own KV, so two keys differing only there share a group."""
    key = prompt_cache_key or user or request.headers.get("x-conversation-id") or None
    return key.replace("\x00", "\ufffd") if key else None
