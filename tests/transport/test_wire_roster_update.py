"""``RosterUpdate`` on the wire: exact schema, strict types, text capped like any string."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from fedloom.transport.errors import MalformedMessage
from fedloom.transport.wire import Limits, RosterUpdate, decode, encode


def envelope(**fields: Any) -> bytes:
    env = {"v": 1, "type": "roster_update", "version": 2, "text": "version = 2", **fields}
    packed: bytes = msgpack.packb(env, use_bin_type=True)
    return packed


def test_round_trip() -> None:
    for msg in (RosterUpdate(3), RosterUpdate(4, 'version = 4\n[[nodes]]\nid = "é"\n')):
        assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"version": True}, "roster_update.version must be an int"),
        ({"version": "2"}, "roster_update.version must be an int"),
        ({"text": b"version = 2"}, "roster_update.text must be a str"),
        ({"text": ["version = 2"]}, "roster_update.text must be a str"),
        ({"extra": 1}, "unexpected field"),
    ],
)
def test_strict_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedMessage, match=message):
        decode(envelope(**fields))


def test_missing_text_is_refused() -> None:
    env = {"v": 1, "type": "roster_update", "version": 2}
    with pytest.raises(MalformedMessage, match="missing field 'text'"):
        decode(msgpack.packb(env, use_bin_type=True))


def test_the_text_is_capped_by_max_str_len() -> None:
    data = envelope(text="x" * 5000)
    assert isinstance(decode(data), RosterUpdate)
    with pytest.raises(MalformedMessage):
        decode(data, Limits(max_str_len=4096))
