"""``fedloom_input_rejected_total{reason}`` names what was wrong: a connected peer's bytes
over a limit, carrying NaN, or not a wire message each end its connection through the
real reader (``Connection`` over a ``WirePipe``) and tell the hook once, with the reason of
the refusal, and the daemon's sink counts them apart."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from fedloom.runtime.connection import Connection, WirePipe
from fedloom.runtime.metrics import MetricsSink
from fedloom.transport import wire
from fedloom.transport.limits import Limits
from fedloom.transport.links import memory_link_pair

LIMIT = 30.0  # a bound on each test, never a timing assertion
REJECTED = "fedloom_input_rejected_total"
LIMITS = Limits(max_message_bytes=4096)


def update(value: float) -> bytes:
    return bytes(wire.encode(wire.Update("p", 1, 0, {"w": np.full(8, value, np.float32)}, 10)))


def oversize() -> bytes:
    """16 KiB of random weights (no codec shrinks them) against the 4 KiB cap."""
    w = np.random.default_rng(1).standard_normal(4096).astype(np.float32)
    data = bytes(wire.encode(wire.Update("p", 1, 0, {"w": w}, 10)))
    assert len(data) > LIMITS.max_message_bytes
    return data


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (oversize(), "too_large"),
        (update(float("nan")), "non_finite"),
        (update(float("inf")), "non_finite"),
        (b"\x93 not a wire message", "malformed"),
    ],
    ids=["oversize", "nan", "inf", "garbage"],
)
async def test_each_refusal_is_told_once_with_its_reason(payload: bytes, reason: str) -> None:
    told: list[tuple[str, str]] = []
    delivered: list[Any] = []
    sink = MetricsSink()

    async def deliver(conn: Connection, msg: Any) -> None:
        delivered.append(msg)

    def hook(peer: str, why: str) -> None:
        told.append((peer, why))
        sink.input_rejected(peer, why)

    ours, theirs = memory_link_pair()
    conn = Connection("p", WirePipe(ours, limits=LIMITS), local_id="me", on_rejected=hook)
    job = asyncio.ensure_future(conn.run(deliver))
    await theirs.send(update(0.25))  # an honest message first: delivered
    await theirs.send(payload)
    async with asyncio.timeout(LIMIT):
        ended = await job
    assert f"bad bytes from the peer ({reason})" in ended
    assert told == [("p", reason)]
    assert [type(m) for m in delivered] == [wire.Update]
    assert sink.value(REJECTED, {"reason": reason}) == 1.0
