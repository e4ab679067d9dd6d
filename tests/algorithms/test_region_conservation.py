"""A region's durable per-child counts of where its applied updates went (forwarded,
dropped as a non-finite aggregate, still buffered): what the chaos checker's
``conservation`` verdict reads."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedloom.algorithms.aggregator_base import APPLIED_KEY, CHECKPOINT_KEY
from fedloom.algorithms.incorporation import FORWARDS_KEY
from fedloom.algorithms.protocol import Effect, LogRecords, Persist, Weights
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.transport.wire import ModelBroadcast, Overlap
from tests.algorithms.alg_helpers import hello, model, recv, upd

SITES = ("s1", "s2")


class Disk:
    """A checkpoint and the records after it, as a StateStore keeps them."""

    def __init__(self) -> None:
        self.checkpoint: Any = None
        self.logs: dict[str, list[Any]] = {}

    def apply(self, effects: list[Effect]) -> None:
        for p in effects:
            if not isinstance(p, Persist):
                continue
            if p.append:
                self.logs.setdefault(p.key, []).append(p.data)
            elif p.key == CHECKPOINT_KEY:
                self.checkpoint, self.logs = p.data, {}


def region(**kw: Any) -> RegionalAggregator:
    args: dict[str, Any] = {"buffer_size": 2, "concurrency": 2, "checkpoint_every": 2, **kw}
    return RegionalAggregator("r0", "root", dict.fromkeys(SITES, "site"), **args)


def started(disk: Disk, **kw: Any) -> RegionalAggregator:
    node = region(**kw)
    disk.apply(node.handle(recv("root", ModelBroadcast(0, model(0.0))), 0.0))
    for s in SITES:
        disk.apply(node.handle(hello(s), 0.0))
    return node


def restored(disk: Disk, **kw: Any) -> RegionalAggregator:
    node = region(**kw)
    node.restore(disk.checkpoint, LogRecords(disk.logs))
    return node


def test_every_applied_update_is_forwarded_or_buffered_and_a_restart_counts_the_same() -> None:
    disk = Disk()
    node = started(disk)
    # s1: 4 updates, s2: 3 -> 7 applied, 3 forwards of 2, one entry still buffered.
    for i, src in enumerate(["s1", "s2", "s1", "s2", "s1", "s2", "s1"]):
        disk.apply(node.handle(recv(src, upd(src, i // 2 + 1)), 1.0 + i))
    live = node.conservation()
    assert live == {
        "s1": {"applied": 4, "forwarded": 3, "nonfinite": 0, "buffered": 1},
        "s2": {"applied": 3, "forwarded": 3, "nonfinite": 0, "buffered": 0},
    }
    # Forward 2 checkpointed; forward 3 and the buffered entry are records after it.
    assert disk.logs[APPLIED_KEY] and disk.checkpoint["flushed"]["s1"]["forwarded"] == 2
    assert restored(disk).conservation() == live
    flushed = [r for r in disk.logs[FORWARDS_KEY] if r["op"] == "flushed"]
    assert flushed == [{"op": "flushed", "seq": 3, "forwarded": {"s1": 1, "s2": 1}}]


def test_a_rebuilt_forward_takes_nothing_from_the_buffer_and_is_not_counted_again() -> None:
    disk = Disk()
    node = started(disk, keep_parts=True)
    for src in SITES:
        disk.apply(node.handle(recv(src, upd(src, 1)), 1.0))
    before = node.conservation()
    assert before["s1"]["forwarded"] == before["s2"]["forwarded"] == 1
    # The root took s1's update through the standby: the forward is rebuilt from s2's.
    out = node.handle(recv("root", Overlap("r0", 1, (("s1", 1),))), 2.0)
    disk.apply(out)
    [rebuilt] = node.pending_forwards()
    assert rebuilt.pairs == (("s2", 1),)
    assert node.conservation() == before
    assert not [r for r in disk.logs.get(FORWARDS_KEY, []) if r["op"] == "flushed"][1:]
    assert restored(disk, keep_parts=True).conservation() == before


def test_a_non_finite_aggregate_is_counted_as_dropped_not_forwarded() -> None:
    disk = Disk()
    node = started(disk, clip_norm=None)
    # A finite norm, but the float32 aggregate overflows (as in test_hostile_children).
    big: Weights = {k: np.full(v.shape, 1e150, dtype=np.float64) for k, v in model().items()}
    for src in SITES:
        disk.apply(node.handle(recv(src, upd(src, 1, delta=big)), 1.0))
    assert node.pending == 0
    assert node.conservation()["s1"] == {
        "applied": 1,
        "forwarded": 0,
        "nonfinite": 1,
        "buffered": 0,
    }
    assert restored(disk, clip_norm=None).conservation() == node.conservation()
