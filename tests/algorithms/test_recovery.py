"""Checkpoint + "applied" log replay reproduces exactly what an aggregator had acknowledged."""

from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.aggregator_base import APPLIED_KEY
from fedloom.algorithms.fedasync import FedAsyncAggregator
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import LogRecords, Persist
from fedloom.algorithms.regional import PENDING_KEY, RegionalAggregator
from fedloom.algorithms.server_opt import ServerAdam
from fedloom.transport.wire import ModelBroadcast, Update
from tests.algorithms.alg_helpers import model, recv

SITES = {f"s{i}": "site" for i in range(4)}


def stream(n: int, seed: int = 0) -> list[Update]:
    """n updates from 4 sites with random deltas, bases lagging the version a little."""
    rng = np.random.default_rng(seed)
    seqs = dict.fromkeys(SITES, 0)
    out = []
    for i in range(n):
        src = f"s{rng.integers(4)}"
        seqs[src] += 1
        delta = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in model().items()}
        out.append(Update(src, seqs[src], max(0, i // 3 - int(rng.integers(3))), delta, 10))
    return out


def feed(node: Any, msgs: list[Update], log: list[Persist]) -> None:
    for m in msgs:
        for e in node.handle(recv(m.src, m), 0.0):
            if isinstance(e, Persist):
                log.append(e)


def split(log: list[Persist]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The last checkpoint and the applied records (all of them: restore skips old ones)."""
    cps = [p.data for p in log if p.key == "checkpoint"]
    return cps[-1], [p.data for p in log if p.key == "applied"]


def fedbuff() -> FedBuffAggregator:
    return FedBuffAggregator(
        "root",
        SITES,
        model(0.0),
        buffer_size=3,
        concurrency=0,
        server_opt=ServerAdam(lr=0.1),
        checkpoint_every=2,
    )


@pytest.mark.parametrize("crash_at", [7, 10, 11, 12, 13, 20])
def test_fedbuff_restore_replays_acked_buffer(crash_at: int) -> None:
    msgs = stream(30)
    base = msgs[:crash_at]
    live, log = fedbuff(), list[Persist]()
    feed(live, base, log)
    snap, records = split(log)
    back = fedbuff()
    back.restore(snap, LogRecords({APPLIED_KEY: records}))
    assert back.version == live.version and back.buffer_fill == live.buffer_fill
    rest = msgs[crash_at:]
    feed(live, rest, [])
    feed(back, rest, [])
    assert back.version == live.version
    for k in live.current_model()[1]:
        np.testing.assert_array_equal(back.current_model()[1][k], live.current_model()[1][k])
    # everything seen before the crash is a duplicate after the restore
    assert all(back._ledger.seen(m.src, m.seq) for m in base)
    # The per-child outcome counts come back as they were (checkpoint plus replay), one
    # decision per update seen, none for a redelivery.
    assert back.snapshot()["outcomes"] == live.snapshot()["outcomes"]
    counts = live.snapshot()["outcomes"]
    assert sum(sum(c.values()) for c in counts.values()) == len(msgs)
    feed(live, msgs[:3], [])
    assert live.snapshot()["outcomes"] == counts


def test_fedasync_restore_replays() -> None:
    def make() -> FedAsyncAggregator:
        return FedAsyncAggregator("root", SITES, model(0.0), concurrency=0, checkpoint_every=4)

    msgs = stream(15, seed=1)
    live, log = make(), list[Persist]()
    feed(live, msgs[:10], log)
    snap, records = split(log)
    back = make()
    back.restore(snap, LogRecords({APPLIED_KEY: records}))
    feed(live, msgs[10:], [])
    feed(back, msgs[10:], [])
    assert back.version == live.version
    np.testing.assert_array_equal(back.current_model()[1]["w"], live.current_model()[1]["w"])


def test_regional_restore_rebuilds_forwards_with_the_same_seqs() -> None:
    def make() -> RegionalAggregator:
        return RegionalAggregator(
            "r", "root", SITES, buffer_size=2, concurrency=0, checkpoint_every=2
        )

    msgs = [Update(m.src, m.seq, 0, m.delta, m.n_examples) for m in stream(20, seed=2)]
    live, log = make(), list[Persist]()
    for e in live.handle(recv("root", ModelBroadcast(0, model(0.0))), 0.0):
        if isinstance(e, Persist):
            log.append(e)
    feed(live, msgs[:11], log)
    snap = [p.data for p in log if p.key == "checkpoint"][-1]
    applied = [p.data for p in log if p.key == "applied"]
    pending = [p.data for p in log if p.key == "region/pending"]
    back = make()
    back.restore(snap, LogRecords({APPLIED_KEY: applied, PENDING_KEY: pending}))
    assert back.seq == live.seq == 5 and back.pending == live.pending
    assert [u.seq for u in back._outbox.pending()] == [u.seq for u in live._outbox.pending()]
    for a, b in zip(back._outbox.pending(), live._outbox.pending(), strict=True):
        np.testing.assert_array_equal(a.delta["w"], b.delta["w"])


def test_a_region_restarted_with_a_smaller_buffer_forwards_its_overfull_buffer_at_once() -> None:
    """A checkpoint written with buffer_size 4 and 3 updates buffered, restored with
    buffer_size 2: the 3 leave in one forward as the restore loads them (the buffer never
    holds a full buffer's worth, the chaos checker's bound), and the replayed records after
    the checkpoint fill the next buffer as they did."""

    def make(size: int) -> RegionalAggregator:
        return RegionalAggregator("r", "root", SITES, buffer_size=size, concurrency=0)

    msgs = [Update(m.src, m.seq, 0, m.delta, m.n_examples) for m in stream(5, seed=3)]
    live, log = make(4), list[Persist]()
    for e in live.handle(recv("root", ModelBroadcast(0, model(0.0))), 0.0):
        if isinstance(e, Persist):
            log.append(e)
    feed(live, msgs[:3], [])
    snap = live.snapshot()
    assert live.buffer_fill == 3 and live.seq == 0
    later: list[Persist] = []
    feed(live, msgs[3:4], later)  # one more update after the checkpoint: in the log
    applied = [p.data for p in later if p.key == APPLIED_KEY]
    back = make(2)
    back.restore(snap, LogRecords({APPLIED_KEY: applied}))
    assert back.seq == 1 and back.buffer_fill == 1  # 3 forwarded, then the logged one
    (forward,) = back._outbox.pending()
    assert forward.count == 3
    assert sorted(forward.pairs) == sorted((m.src, m.seq) for m in msgs[:3])


def test_a_fedbuff_root_restarted_with_a_smaller_buffer_steps_at_once() -> None:
    def make(size: int) -> FedBuffAggregator:
        return FedBuffAggregator("root", SITES, model(0.0), buffer_size=size, concurrency=0)

    msgs = stream(3, seed=4)
    live = make(5)
    feed(live, msgs, [])
    assert live.version == 0 and live.buffer_fill == 3
    back = make(3)
    back.restore(live.snapshot())
    assert back.version == 1 and back.buffer_fill == 0
    assert not np.array_equal(back.current_model()[1]["w"], live.current_model()[1]["w"])
