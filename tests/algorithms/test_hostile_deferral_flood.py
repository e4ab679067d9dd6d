"""A site flooding its region with updates on a model the region does not hold yet.

A region holds such updates unacked until that model arrives (``RegionalAggregator.
_defer``), at most ``max_deferred`` (10,000) of them, and takes them all up again with each
new model version. The attacker's updates need no delta (nothing is checked before the
model they claim exists), so 10,000 of them are about 1 MB on the wire. Finding a resend
among the held ones scanned the whole list per update: the flood, and then every model
version, cost the region's event loop time quadratic in what it held (here 23 s for the
flood and 8 to 17 s per model version). Each must stay linear, and one child may hold no
more than its outbox window's worth: the rest of the room is the other children's.
"""

from __future__ import annotations

import time
from typing import Any

from fedloom.algorithms.protocol import PeerDown, Received
from fedloom.algorithms.regional import MAX_DEFERRED_PER_CHILD, RegionalAggregator
from fedloom.transport.wire import ModelBroadcast, Update
from tests.algorithms.alg_helpers import acks, hello, metrics, model, recv, upd

FLOOD = 10_000  # the region's default max_deferred
FUTURE = 10**9  # a model version the root will not publish for a long while


class CountingList(list[Any]):
    """A list that counts the items every iteration over it yields."""

    yielded = 0

    def __iter__(self) -> Any:
        for item in super().__iter__():
            CountingList.yielded += 1
            yield item


CROWD = [f"c{i:03d}" for i in range(FLOOD // MAX_DEFERRED_PER_CHILD + 1)]


def region() -> RegionalAggregator:
    children = {"evil": "site", "s1": "site", **{c: "site" for c in CROWD}}
    r = RegionalAggregator("r1", "root", children, buffer_size=2, concurrency=2)
    r.handle(Received("root", ModelBroadcast(1, model(0.0))), 0.0)
    r.handle(hello("evil"), 0.0)
    r.handle(hello("s1"), 0.0)
    return r


def test_a_flood_of_future_updates_costs_the_region_linear_work() -> None:
    """The flood from many children (one holds its window's worth at most), up to the
    region's whole room."""
    r = region()
    CountingList.yielded = 0
    r._deferred = CountingList()
    sent = 0
    for child in CROWD:
        for seq in range(1, MAX_DEFERRED_PER_CHILD + 1):
            if sent == FLOOD:
                break
            out = r.handle(recv(child, Update(child, seq, FUTURE, {}, 1)), 1.0)
            assert metrics(out, "update_deferred") and not acks(out)
            sent += 1
    out = r.handle(recv(CROWD[0], Update(CROWD[0], 7, FUTURE, {}, 1)), 1.0)  # a resend
    assert not metrics(out, "update_deferred") and not acks(out)
    assert len(r._deferred) == FLOOD
    # No scan of what is held per update (it was FLOOD**2 / 2 = 50 million items).
    assert CountingList.yielded <= 2 * FLOOD
    # Each new model version takes them up again in linear time (it took 8 to 17 s here).
    for version in (2, 3):
        start = time.perf_counter()
        r.handle(Received("root", ModelBroadcast(version, model(0.0))), 2.0)
        assert time.perf_counter() - start < 3.0
        assert len(r._deferred) == FLOOD
    # The region still serves its honest site.
    out = r.handle(recv("s1", upd("s1", 1, base=3)), 3.0)
    assert acks(out) == [("s1", "s1", 1)]
    # A child going away takes what it left with it.
    r.handle(PeerDown(CROWD[0]), 4.0)
    assert len(r._deferred) == len(r._deferred_keys) == FLOOD - MAX_DEFERRED_PER_CHILD


def test_one_child_cannot_take_the_room_other_childrens_deferrals_need() -> None:
    """One child's flood of 10,000, then an honest site that failed over and back brings
    an update on a model newer than the region's (it lags): it is deferred, not refused for
    want of room, and applied once that model arrives."""
    r = region()
    refused = 0
    for seq in range(1, FLOOD + 1):
        out = r.handle(recv("evil", Update("evil", seq, FUTURE, {}, 1)), 1.0)
        refused += len(metrics(out, "update_rejected"))
    assert len(r._deferred) == MAX_DEFERRED_PER_CHILD and refused == FLOOD - len(r._deferred)
    out = r.handle(recv("s1", upd("s1", 1, base=2)), 2.0)
    assert metrics(out, "update_deferred") and not metrics(out, "update_rejected")
    out = r.handle(Received("root", ModelBroadcast(2, model(0.0))), 3.0)
    assert ("s1", "s1", 1) in acks(out)
