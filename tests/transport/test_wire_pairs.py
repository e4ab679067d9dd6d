"""The failover fields on the wire: a forward's site pairs, ``Incorporated`` and ``Overlap``
(``algorithms.incorporation``): round trips, and hostile lists refused by the decoder."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from fedloom.transport import wire
from fedloom.transport.errors import MalformedMessage
from fedloom.transport.wire import Incorporated, Overlap, Update, decode, encode

PAIRS = (("site-1", 3), ("site-2", 1))


def forward(pairs: tuple[tuple[str, int], ...] = PAIRS) -> Update:
    delta = {"w": np.ones((2, 2), dtype=np.float32)}
    return Update("region-0", 4, 2, delta, n_examples=20, count=2, pairs=pairs)


@pytest.mark.parametrize(
    "msg", [forward(), forward(()), Incorporated("site-1", 3), Overlap("region-0", 4, PAIRS)]
)
def test_failover_messages_round_trip(msg: Any) -> None:
    back = decode(encode(msg))
    assert type(back) is type(msg)
    if isinstance(msg, Update):
        assert back.pairs == msg.pairs  # type: ignore[union-attr]
    else:
        assert back == msg


def envelope_with(pairs: object) -> bytes:
    env = msgpack.unpackb(encode(Overlap("region-0", 4, PAIRS)), raw=False)
    env["pairs"] = pairs
    data: bytes = msgpack.packb(env, use_bin_type=True)
    return data


@pytest.mark.parametrize(
    ("pairs", "why"),
    [
        ({"site-1": 3}, "must be an array"),
        ([["site-1"]], "entries must be"),
        ([["site-1", 3, 4]], "entries must be"),
        ([["", 3]], "non-empty str"),
        ([["site-1", 0]], "int >= 1"),
        ([["site-1", -2]], "int >= 1"),
        ([["site-1", "3"]], "int >= 1"),
        ([[3, "site-1"]], "non-empty str"),
        ([["site-1", 1.0]], "int >= 1"),
        ([["site-1", 3], ["site-1", 3]], "twice"),
    ],
)
def test_hostile_pair_lists_are_refused(pairs: object, why: str) -> None:
    with pytest.raises(MalformedMessage, match=why):
        decode(envelope_with(pairs))


def test_a_pair_list_over_the_cap_is_refused() -> None:
    pairs = [[f"s{i}", 1] for i in range(wire.MAX_PAIRS + 1)]
    with pytest.raises(MalformedMessage, match="limit"):
        decode(envelope_with(pairs), wire.Limits(max_array_len=wire.MAX_PAIRS + 2))


def test_a_missing_pairs_field_is_refused_like_any_other() -> None:
    env = msgpack.unpackb(encode(forward()), raw=False)
    del env["pairs"]
    with pytest.raises(MalformedMessage, match="missing field 'pairs'"):
        decode(msgpack.packb(env, use_bin_type=True))


def test_encoding_refuses_local_misuse() -> None:
    with pytest.raises(TypeError):
        encode(forward(((3, 1),)))  # type: ignore[arg-type]
