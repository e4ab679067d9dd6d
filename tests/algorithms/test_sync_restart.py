"""A sync FedAvg root keeps its open round across a restart, and a dead site stalls nothing."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedloom.algorithms.aggregator_base import APPLIED_KEY
from fedloom.algorithms.protocol import Deadline, Effect, Log, LogRecords, PeerDown, Persist
from fedloom.algorithms.sync import RoundState, SyncAggregator
from fedloom.federation.factory import build_root
from fedloom.federation.params import AlgorithmConfig
from fedloom.transport.wire import TrainRequest, Update
from tests.algorithms.alg_helpers import acks, hello, metrics, model, recv, requests, upd

SITES = {f"s{i}": "site" for i in range(1, 5)}


def make(**kw: Any) -> SyncAggregator:
    args: dict[str, Any] = {"clients_per_round": 3, "round_timeout_s": 10.0, "clip_norm": None}
    args.update(kw)
    return SyncAggregator("root", SITES, model(0.0), **args)


class Disk:
    """The Persists a node returned, in order, as a store would keep them: the last
    checkpoint and the records appended after it."""

    def __init__(self) -> None:
        self.checkpoint: Any = None
        self.records: list[Any] = []

    def take(self, effects: list[Effect]) -> list[Effect]:
        for e in effects:
            if isinstance(e, Persist):
                if e.append:
                    self.records.append(e.data)
                else:
                    self.checkpoint, self.records = e.data, []
        return effects

    def restore(self, node: SyncAggregator) -> SyncAggregator:
        node.restore(self.checkpoint, LogRecords({APPLIED_KEY: self.records}))
        return node


def answer(peer: str, req: TrainRequest, value: float, seq: int = 1) -> Update:
    return upd(peer, seq, base=req.version, value=value, n=10 * int(peer[1:]), task=req.task)


def warnings(effects: list[Effect]) -> list[str]:
    return [e.text for e in effects if isinstance(e, Log) and e.level == "warning"]


def test_a_restart_in_the_middle_of_a_round_completes_it_counting_each_answer_once() -> None:
    disk = Disk()
    live = make()
    reqs: list[tuple[str, TrainRequest]] = []
    for s in SITES:
        reqs += requests(disk.take(live.handle(hello(s), 0.0)))
    assert live.state is RoundState.COLLECTING and len(reqs) == 3
    ups = {p: answer(p, r, value=float(i + 1)) for i, (p, r) in enumerate(reqs)}
    first, second, third = (p for p, _ in reqs)
    disk.take(live.handle(recv(first, ups[first]), 1.0))
    disk.take(live.handle(recv(second, ups[second]), 2.0))
    # The crash: a fresh node from what is on disk.
    back = disk.restore(make())
    assert back.state is RoundState.COLLECTING and back.round == 1 and back.version == 0
    # The sites reconnect; the two that were acked resend (their ack may have been lost).
    for s in SITES:
        back.handle(hello(s), 5.0)
    assert back.next_deadline() == 5.0 + 10.0  # the restored round's clock restarts
    for p in (first, second):
        out = back.handle(recv(p, ups[p]), 6.0)
        assert metrics(out, "update_duplicate") and acks(out) == [(p, p, 1)]
    assert back.applied == 0 and back.version == 0
    out = back.handle(recv(third, ups[third]), 7.0)  # answers its pre-crash task
    assert metrics(out, "update_applied") and back.version == 1
    live.handle(recv(third, ups[third]), 3.0)
    assert live.version == 1
    for k in ("w", "b"):
        np.testing.assert_array_equal(back.current_model()[1][k], live.current_model()[1][k])


def test_records_of_a_later_round_end_the_earlier_one_as_it_ended_live() -> None:
    disk = Disk()
    live = make(min_cohort=1, checkpoint_every=0)  # nothing but records on disk
    reqs: list[tuple[str, TrainRequest]] = []
    for s in SITES:
        reqs += requests(disk.take(live.handle(hello(s), 0.0)))
    p, r = reqs[0]
    disk.take(live.handle(recv(p, answer(p, r, 2.0)), 1.0))
    reqs = requests(disk.take(live.handle(Deadline(), 10.0)))  # closed with one answer
    assert live.version == 1 and live.round == 2
    q, r2 = reqs[0]
    disk.take(live.handle(recv(q, answer(q, r2, 5.0, seq=2 if q == p else 1)), 11.0))
    back = disk.restore(make(min_cohort=1, checkpoint_every=0))
    assert back.version == 1 and back.round == 2 and back.state is RoundState.COLLECTING
    np.testing.assert_array_equal(back.current_model()[1]["w"], live.current_model()[1]["w"])
    assert len(back._buffer) == 1


def test_a_selected_site_that_dies_ends_the_round_with_the_survivors() -> None:
    agg = make(clients_per_round=4, min_cohort=2)  # every site is selected
    reqs: list[tuple[str, TrainRequest]] = []
    for s in SITES:
        reqs += requests(agg.handle(hello(s), 0.0))
    assert len(reqs) == 4
    for p, r in reqs[:3]:
        agg.handle(recv(p, answer(p, r, 1.0)), 1.0)
    dead = reqs[3][0]
    out = agg.handle(PeerDown(dead), 2.0)  # long before the round's deadline (10 s)
    assert agg.version == 1 and metrics(out, "round_closed")[0].labels == {"reason": "survivors"}
    assert any("outstanding tasks" in w for w in warnings(out))


def test_too_few_survivors_abandon_the_round_and_a_new_one_is_drawn() -> None:
    agg = make(clients_per_round=2, min_cohort=2, min_available=4)
    reqs: list[tuple[str, TrainRequest]] = []
    for s in SITES:
        reqs += requests(agg.handle(hello(s), 0.0))
    (p1, r1), (p2, _r2) = reqs
    agg.handle(recv(p1, answer(p1, r1, 1.0)), 1.0)
    out = agg.handle(PeerDown(p2), 2.0)
    assert agg.rounds_abandoned == 1 and agg.state is RoundState.WAITING
    assert requests(out) == [] and agg.next_deadline() == 2.0 + 10.0  # 3 of 4 up: wait once
    out = agg.handle(Deadline(), 12.0)
    assert agg.round == 2 and metrics(out, "round_degraded")
    assert len(requests(out)) == 2 and p2 not in {p for p, _ in requests(out)}


def test_fedavg_over_every_site_keeps_going_when_one_site_dies() -> None:
    """The daemon's sync root (``build_root``): all sites selected, min_available = all."""
    p = AlgorithmConfig(clients_per_round=4, over_selection=1.0, round_timeout_s=30.0)
    agg = build_root(
        "fedavg",
        "root",
        SITES,
        model(0.0),
        p,
        buffer_size=1,
        concurrency=4,
        train_config={},
        rng=np.random.default_rng(0),
    )
    assert isinstance(agg, SyncAggregator) and agg.min_available == 4
    reqs: list[tuple[str, TrainRequest]] = []
    for s in SITES:
        reqs += requests(agg.handle(hello(s), 0.0))
    seq = dict.fromkeys(SITES, 0)
    seen: list[str] = []

    def step(out: list[Effect]) -> list[tuple[str, TrainRequest]]:
        seen.extend(warnings(out))
        return requests(out)

    pending = [x for x in reqs if x[0] != "s4"]
    pending += step(agg.handle(PeerDown("s4"), 0.5))  # a selected site dies mid-round
    now = 1.0
    while agg.version < 4:
        if not pending:
            deadline = agg.next_deadline()
            assert deadline is not None, "stalled: no round open and no deadline asked for"
            now = max(now, deadline)
            pending = step(agg.handle(Deadline(), now))
            continue
        site, r = pending.pop(0)
        assert site != "s4"
        seq[site] += 1
        pending += step(agg.handle(recv(site, answer(site, r, 1.0, seq=seq[site])), now))
        now += 1.0
    assert now < 4 * 30.0  # one wait of round_timeout_s at most, not one per round
    assert sum("fewer sites than min_available" in w for w in seen) == 1
    assert any("outstanding tasks" in w for w in seen)


def test_a_passed_wait_is_not_asked_for_again_while_no_cohort_is_idle() -> None:
    agg = make(clients_per_round=3, min_cohort=2, min_available=4)
    for s in ("s1", "s2"):
        agg.handle(hello(s), 0.0)
    assert agg.next_deadline() == 10.0  # 2 idle, 4 wanted: wait once
    agg.handle(PeerDown("s1"), 1.0)
    agg.handle(PeerDown("s2"), 1.0)  # now no site is up at all
    agg.handle(Deadline(), 10.0)
    assert agg.state is RoundState.WAITING and agg.next_deadline() is None
    # A site again, the wait is over: fewer sites are up than min_cohort, so the round
    # starts at once with the one that is (issue 15: it cannot fill, it must not stall).
    out = agg.handle(hello("s3"), 11.0)
    assert agg.state is RoundState.COLLECTING and len(requests(out)) == 1
    assert metrics(out, "round_unfillable")
