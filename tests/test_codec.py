"""Request bodies decode into Structs; bad ones become 400s naming the param."""

from __future__ import annotations

import msgspec
import pytest

from server.errors import InvalidRequestError
from server.wire.codec import decode_json


class Inner(msgspec.Struct):
    content: str


class Body(msgspec.Struct):
    model: str
    max_tokens: int | None = None
    messages: list[Inner] = []


def test_unknown_fields_and_nulls_are_accepted() -> None:
    body = decode_json(b'{"model": "m", "max_tokens": null, "store": true, "metadata": {}}', Body)
    assert body.model == "m" and body.max_tokens is None


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe{}", b"", b"   ", b'{"model": "m"'])
def test_malformed_bodies_are_400(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_json(raw, Body)
    assert info.value.status == 400


def test_wrong_type_names_the_param() -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_json(b'{"model": "m", "messages": [{"content": 5}]}', Body)
    assert info.value.param == "messages[0].content"
    with pytest.raises(InvalidRequestError) as info:
        decode_json(b'{"model": "m", "max_tokens": "ten"}', Body)
    assert info.value.param == "max_tokens"


def test_missing_required_field() -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_json(b"{}", Body)
    assert info.value.param == "model"
    with pytest.raises(InvalidRequestError) as info:
        decode_json(b'{"model": "m", "messages": [{}]}', Body)
    assert info.value.param == "messages[0].content"
