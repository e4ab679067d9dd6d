"""Children that are connected but quiet (second review, finding 1): a region that said Hello
and sends nothing (hostile, or its hospitals offline for the night), a region that falls
quiet, a site that holds its task and never answers. None of them may stall the others: a
child shares an aggregation epoch only while it is active (an update of it entered the
aggregation, or it was given the task it holds, within ``quiet_after_s``).

Each test sends the messages through the real aggregator nodes (``handle``).
"""

from __future__ import annotations

import pytest

from fedloom.algorithms.aggregator_base import QUIET_AFTER_S
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Deadline, Effect
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.transport.wire import ModelBroadcast
from tests.algorithms.alg_helpers import acks, hello, metrics, model, recv, requests, upd

ROBUST = ("mean", "median", "trimmed_mean")


def root(children: dict[str, str], k: int, robust: str, **kw: object) -> FedBuffAggregator:
    return FedBuffAggregator(
        "root",
        children,
        model(0.5),
        buffer_size=k,
        concurrency=k,
        robust=robust,
        trim_fraction=0.2,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("robust", ROBUST)
@pytest.mark.parametrize(
    ("k", "regions"),
    [
        (2, ["r1", "mute"]),
        (3, ["r1", "mute"]),
        (2, ["r1", "r2", "mute"]),
        (5, ["r1", "r2", "mute"]),
    ],
)
def test_a_region_that_says_hello_and_nothing_else_does_not_stall_the_root(
    robust: str, k: int, regions: list[str]
) -> None:
    agg = root({r: "region" for r in regions}, k, robust, task_timeout_s=10.0)
    for r in regions:
        agg.handle(hello(r, "region"), 0.0)
    honest = [r for r in regions if r != "mute"]
    out: list[Effect] = []
    t, sent = 0.0, 0
    for _ in range(10):
        for _ in range(k):  # each honest region forwards K updates a round, in turn
            for r in honest:
                sent += 1
                t += 1.0
                out += agg.handle(recv(r, upd(r, sent, agg.version, 0.01)), t)
        agg.handle(Deadline(), t)
    # Every honest forward was taken and acknowledged at once; none had to wait.
    assert len(acks(out)) == sent
    assert not metrics(out, "update_held") and not metrics(out, "update_dropped")
    assert agg.version == sent // k
    assert "mute" in agg._regions_up  # it is still connected: only its silence counts


@pytest.mark.parametrize("task_timeout_s", [None, 1800.0])
@pytest.mark.parametrize("robust", ["median", "trimmed_mean"])
def test_a_region_that_falls_quiet_stalls_its_sibling_at_most_quiet_after_s(
    robust: str, task_timeout_s: float | None
) -> None:
    """Robust aggregation shares each flush among the active children. A region takes no
    tasks: however long the sites' task time-out (1800 s by default in scenarios and
    daemons), a quiet region holds its sibling back ``QUIET_AFTER_S``. (The mean takes
    every forward and holds nobody back: see test_hostile_children.)"""
    agg = root({"r1": "region", "r2": "region"}, 2, robust, task_timeout_s=task_timeout_s)
    assert agg.quiet_after_s == (task_timeout_s or QUIET_AFTER_S)
    for r in ("r1", "r2"):
        agg.handle(hello(r, "region"), 0.0)
    for seq in range(1, 4):  # by day both forward: the root alternates between them
        for r in ("r1", "r2"):
            agg.handle(recv(r, upd(r, seq, agg.version, 0.01)), 10.0 * seq)
    assert agg.version == 3
    # By night r2 sends nothing. While it is active r1 fills its share (one slot) and waits.
    out: list[Effect] = []
    for seq in range(4, 7):
        out += agg.handle(recv("r1", upd("r1", seq, agg.version, 0.01)), 31.0)
    assert agg.version == 3 and len(acks(out)) == 1 and len(metrics(out, "update_held")) == 2
    # The root asks to be woken when r2 turns quiet, and then takes r1's held forwards.
    wake = agg.next_deadline()
    assert wake == 30.0 + QUIET_AFTER_S
    out = agg.handle(Deadline(), wake)
    assert {("r1", "r1", 5), ("r1", "r1", 6)} <= set(acks(out)) and agg.version == 4
    # r1 alone keeps training the root; r2 shares the epochs again once it forwards.
    for seq in range(7, 9):
        agg.handle(recv("r1", upd("r1", seq, agg.version, 0.01)), wake + seq)
    assert agg.version == 5
    agg.handle(recv("r2", upd("r2", 4, agg.version, 0.01)), wake + 10.0)
    out = []
    for seq in range(9, 12):
        out += agg.handle(recv("r1", upd("r1", seq, agg.version, 0.01)), wake + 11.0)
    assert len(metrics(out, "update_held")) >= 1  # back to its share per flush


def test_a_site_that_holds_its_task_without_a_timeout_stalls_the_median_for_a_while_only() -> None:
    """No task_timeout_s: the task of a site that never answers stays in flight for ever,
    but the site stops sharing the epochs ``quiet_after_s`` after it was given it."""
    sites = {"a": "site", "b": "site", "mute": "site"}
    agg = root(sites, 3, "median")
    task: dict[str, int] = {}
    for s in sites:
        task.update((p, r.task) for p, r in requests(agg.handle(hello(s), 0.0)))
    for s in ("a", "b"):
        agg.handle(recv(s, upd(s, 1, value=0.01, task=task.pop(s))), 1.0)
    assert agg.version == 0 and agg.in_flight == 1  # a and b used their share: benched
    wake = agg.next_deadline()
    assert wake == QUIET_AFTER_S  # mute turns quiet then
    out = agg.handle(Deadline(), wake)
    given = {p: r.task for p, r in requests(out)}
    assert {"a", "b"} <= set(given)  # their share grew (⌈3/2⌉ = 2): new tasks
    agg.handle(recv("a", upd("a", 2, value=0.01, task=given["a"])), wake + 1.0)
    assert agg.version == 1


def test_a_region_is_not_stalled_by_a_site_that_holds_its_task_and_never_answers() -> None:
    """The same rule at a region (median, no task_timeout_s): its buffer fills from the
    site that answers once the quiet one has held its task for ``quiet_after_s``."""
    r = RegionalAggregator(
        "r1",
        "root",
        {"s1": "site", "quiet": "site"},
        buffer_size=2,
        concurrency=2,
        robust="median",
    )
    r.handle(recv("root", ModelBroadcast(0, model(0.5))), 0.0)
    task: dict[str, int] = {}
    for s in ("s1", "quiet"):
        task.update((p, q.task) for p, q in requests(r.handle(hello(s), 0.0)))
    out = r.handle(recv("s1", upd("s1", 1, value=0.01, task=task.pop("s1"))), 1.0)
    assert acks(out) and not requests(out) and r.forwarded == 0  # s1 used its share
    wake = r.next_deadline()
    assert wake == QUIET_AFTER_S
    (req,) = [q for p, q in requests(r.handle(Deadline(), wake)) if p == "s1"]
    r.handle(recv("s1", upd("s1", 2, value=0.01, task=req.task)), wake + 1.0)
    assert r.forwarded == 1
