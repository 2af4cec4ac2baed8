"""The `model` object and the model list (`GET /v1/models`)."""

from __future__ import annotations

from typing import Literal

import msgspec


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: Literal["model"] = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ModelDeleted(msgspec.Struct):
    id: str
    deleted: bool
    object: Literal["model"] = "model"
