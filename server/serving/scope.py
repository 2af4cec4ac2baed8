"""Who is asking: the tenant behind an API key, and the keys that scope cached KV to it.

Two tenants never share KV: the tenant id is part of every block hash's salt
and of every conversation key, so a guessed conversation id from another key
finds nothing, and identical prompts from two keys are computed twice. On an
open server (no keys) everyone is the one tenant "public".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from starlette.requests import Request


@dataclass(frozen=True)
class RequestScope:
    tenant: str

    @classmethod
    def of(cls, request: Request) -> RequestScope:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        settings = request.app.state.settings
        if not settings.auth_enabled or not token:
            return cls("public")
        return cls("key-" + hashlib.sha256(token.encode()).hexdigest()[:16])

    def salt(self, model_id: str) -> bytes:
        """What changes KV besides tokens: the model (or adapter) and the tenant."""
        return f"{model_id}\x00{self.tenant}".encode()

    def conversation_key(self, model_id: str, conversation: str | None) -> str | None:
        if not conversation:
            return None
        return f"{self.tenant}\x00{model_id}\x00{conversation}"


def conversation_id(request: Request, prompt_cache_key: str | None, user: str | None) -> str | None:
    """`prompt_cache_key`, else `user`, else the X-Conversation-Id header."""
    return prompt_cache_key or user or request.headers.get("x-conversation-id") or None
