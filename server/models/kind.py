"""What a served model does: `ModelKind`, "chat" (generation endpoints) or "embedding" (/v1/embeddings)."""

from __future__ import annotations

from typing import Literal

ModelKind = Literal["chat", "embedding"]
