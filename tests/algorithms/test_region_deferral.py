"""A region with no model holds its children's updates up to a byte bound (issue 10,
item 6): refused ones are not acknowledged, so their sites resend them later."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.algorithms.regional import DEFAULT_MAX_DEFERRED_BYTES, RegionalAggregator
from fedloom.transport.wire import ModelBroadcast, Update
from tests.algorithms.alg_helpers import acks, metrics, model, recv, upd

CHILDREN = {"s1": "site", "s2": "site", "s3": "site"}


def region(max_deferred_bytes: int = DEFAULT_MAX_DEFERRED_BYTES) -> RegionalAggregator:
    return RegionalAggregator(
        "r1",
        "root",
        CHILDREN,
        buffer_size=3,
        concurrency=3,
        max_deferred_bytes=max_deferred_bytes,
    )


def test_held_updates_are_bounded_by_bytes_and_nothing_acked_is_lost() -> None:
    one = sum(a.nbytes for a in model(1.0).values())  # 32 bytes
    r = region(max_deferred_bytes=2 * one)
    held = [upd(s, 1) for s in ("s1", "s2")]
    for u in held:
        out = r.handle(recv(u.src, u), 0.0)
        assert metrics(out, "update_deferred") and not acks(out)
    refused = upd("s3", 1)
    out = r.handle(recv("s3", refused), 0.0)
    assert metrics(out, "update_rejected")[0].labels == {"reason": "no_model"}
    assert not acks(out)  # s3 keeps it in its outbox
    assert r.deferred_bytes == 2 * one
    # The model arrives: what was held is applied and acknowledged ...
    out = r.handle(recv("root", ModelBroadcast(0, model(0.0))), 1.0)
    assert sorted(acks(out)) == [("s1", "s1", 1), ("s2", "s2", 1)]
    assert r.deferred_bytes == 0
    # ... and s3's resend (after its next reconnect) is taken now.
    out = r.handle(recv("s3", refused), 2.0)
    assert acks(out) == [("s3", "s3", 1)]


def test_a_flood_before_the_model_holds_at_most_the_default_bound() -> None:
    """The review's attack: 10,000 small-on-the-wire updates (a top-k or lz4 payload
    decodes to its full size) used to be held whole; now at most 64 MiB is."""
    r = region()
    delta = {"w": np.zeros(100_000, np.float32)}  # 400 kB decoded each
    refused = 0
    for seq in range(1, 3_334):  # from every child (one holds its window's worth at most)
        for s in CHILDREN:
            out = r.handle(recv(s, Update(s, seq, 0, delta, 10)), 0.0)
            assert not acks(out)
            refused += len(metrics(out, "update_rejected"))
    assert r.deferred_bytes <= DEFAULT_MAX_DEFERRED_BYTES
    held = DEFAULT_MAX_DEFERRED_BYTES // 400_000
    assert r.deferred_bytes == held * 400_000 and refused == 3 * 3_333 - held


def test_max_deferred_bytes_is_checked() -> None:
    with pytest.raises(ValueError, match="max_deferred_bytes"):
        region(max_deferred_bytes=-1)
    # Zero: nothing is held before a model (every update waits in its site's outbox).
    r = region(max_deferred_bytes=0)
    out = r.handle(recv("s1", upd("s1", 1)), 0.0)
    assert metrics(out, "update_rejected") and not acks(out)
