"""Children that send too often: a site answering every task at once, a region flooding
the root, a stream of Hellos, a revoked site's deferred update (issue 10 review findings
1, 2, 7, 8).

Each test performs the attack through the real aggregator nodes (``handle`` with the
hostile messages), and checks what the attacker got, that the node still serves the honest
children, and that whatever it acknowledged is kept.
"""

from __future__ import annotations

import math

import numpy as np

from fedloom.algorithms.fedasync import FedAsyncAggregator
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Deadline, Effect, Metric, PeerDown
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.robust import AUTO_FACTOR, AUTO_WINDOW, NormClip
from fedloom.algorithms.weights_math import l2_norm, sub
from fedloom.transport.wire import ModelBroadcast, TrainRequest
from tests.algorithms.alg_helpers import (
    acks,
    hello,
    labels,
    metrics,
    model,
    recv,
    requests,
    sends,
    upd,
)

HONEST = ("s0", "s1", "s2", "s3", "s4")
SITES = {**{s: "site" for s in HONEST}, "evil": "site"}
HUGE = -1e6  # every entry of the attacker's delta
SMALL = 0.01  # every entry of an honest delta
W0 = model(0.5)


def norm_of(value: float) -> float:
    return l2_norm(model(value))


def applied_by(effects: list[Effect], src: str) -> int:
    return sum(labels(m)["src"] == src for m in metrics(effects, "update_applied"))


# ----------------------------------------------------------- finding 1: task answers
def test_a_site_answering_every_task_at_once_gets_its_share_per_flush_under_the_median() -> None:
    agg = FedBuffAggregator("root", SITES, W0, buffer_size=3, concurrency=6, robust="median")
    task: dict[str, int] = {}
    for s in SITES:
        task.update((p, r.task) for p, r in requests(agg.handle(hello(s), 0.0)))
    out: list[Effect] = []
    for seq in range(1, 61):  # answer at once whatever task it holds, else send unasked
        t = task.pop("evil", -1)
        step = agg.handle(recv("evil", upd("evil", seq, value=HUGE, task=t)), 1.0)
        task.update((p, r.task) for p, r in requests(step))
        out += step
    # One slot (⌈3/6⌉) of the epoch; no second task; the rest held or dropped, unacked.
    assert applied_by(out, "evil") == 1 and len(acks(out)) == 1
    assert not [p for p, _ in requests(out) if p == "evil"]
    assert agg.version == 0 and agg.buffer_fill == 1
    # Still serving: two honest answers flush; the median ignores the attacker.
    for s in ("s0", "s1"):
        out = agg.handle(recv(s, upd(s, 1, value=SMALL, task=task[s])), 2.0)
    assert agg.version == 1
    new = agg.current_model()[1]
    assert l2_norm(sub(new, W0)) <= norm_of(SMALL) * (1 + 1e-6)
    # The new epoch gives the attacker a task again (and its first held update a slot).
    assert [p for p, _ in requests(out)].count("evil") <= 1


def test_an_honest_fast_site_waits_for_the_next_flush_instead_of_being_held() -> None:
    sites = {"fast": "site", "a": "site", "b": "site"}
    agg = FedBuffAggregator("root", sites, W0, buffer_size=3, concurrency=3, robust="median")
    task: dict[str, int] = {}
    for s in sites:
        task.update((p, r.task) for p, r in requests(agg.handle(hello(s), 0.0)))
    seqs = dict.fromkeys(sites, 0)
    out: list[Effect] = []

    def answer(s: str) -> None:
        seqs[s] += 1
        step = agg.handle(recv(s, upd(s, seqs[s], agg.version, SMALL, task=task.pop(s))), 1.0)
        task.update((p, r.task) for p, r in requests(step))
        out.extend(step)

    for _ in range(5):
        answer("fast")
        assert "fast" not in task  # used its share: no task until the flush
        answer("a")
        answer("b")
    assert agg.version == 5
    assert not metrics(out, "update_held") and not metrics(out, "update_dropped")
    assert all(applied_by(out, s) == 5 for s in sites)


def test_a_site_that_takes_tasks_and_never_answers_does_not_stall_the_median() -> None:
    sites = {"a": "site", "b": "site", "mute": "site"}
    agg = FedBuffAggregator(
        "root", sites, W0, buffer_size=3, concurrency=3, robust="median", task_timeout_s=10.0
    )
    task: dict[str, int] = {}
    for s in sites:
        task.update((p, r.task) for p, r in requests(agg.handle(hello(s), 0.0)))
    for s in ("a", "b"):
        assert not requests(agg.handle(recv(s, upd(s, 1, value=SMALL, task=task[s])), 1.0))
    out = agg.handle(Deadline(), 11.0)  # mute's task times out: a and b share the epoch
    given = {p: r.task for p, r in requests(out)}
    assert {"a", "b"} <= set(given)
    agg.handle(recv("a", upd("a", 2, value=SMALL, task=given["a"])), 12.0)
    assert agg.version == 1


# -------------------------------------------------------------- the auto clip's learning
def test_the_clip_a_sender_meets_is_learnt_from_the_others_only() -> None:
    clip = NormClip("auto", {"w": np.array([3.0, 4.0], np.float32)})  # starts at 5
    big = {"w": np.array([6e6, 8e6], np.float32)}
    for _ in range(100):  # alone, the attacker never leaves the starting bound
        clip.apply(big, 1e7, "evil")
    assert clip.bound("evil") == 5.0
    for s in ("a", "b", "c", "d", "e"):
        clip.apply({"w": np.array([0.6, 0.8], np.float32)}, 1.0, s)
    for _ in range(1_000):  # 99% of the updates, all huge
        _, clipped = clip.apply(big, 1e7, "evil")
        assert clipped
    assert clip.bound("evil") == AUTO_FACTOR * 1.0  # the honest norms set it
    # The others meet a bound learnt from the attacker's CLIPPED norms: at most x3 more.
    honest_bound = clip.bound("a")
    assert honest_bound is not None and honest_bound <= AUTO_FACTOR * AUTO_FACTOR * 1.0
    # The attacker holds one entry of the window, however many updates it sent.
    state = clip.snapshot()["recent"]
    assert len(state) <= AUTO_WINDOW
    assert sum(s == "evil" for s, _ in state) == 1


def test_fedasync_fast_hostile_site_moves_the_model_at_most_the_clip_learnt_from_others() -> None:
    alpha = 0.6
    fa = FedAsyncAggregator("root", SITES, W0, concurrency=6, alpha=alpha)
    task: dict[str, int] = {}
    for s in SITES:
        task.update((p, r.task) for p, r in requests(fa.handle(hello(s), 0.0)))
    for i, s in enumerate(HONEST):  # each honest site answers once
        task.update(
            (p, r.task)
            for p, r in requests(fa.handle(recv(s, upd(s, 1, i, SMALL, task=task[s])), 1.0))
        )
    bound = alpha * AUTO_FACTOR * norm_of(SMALL)
    for seq in range(1, 201):  # then the attacker answers 200 tasks at once
        before = fa.current_model()[1]
        out = fa.handle(recv("evil", upd("evil", seq, fa.version, HUGE, task=task["evil"])), 2.0)
        task.update((p, r.task) for p, r in requests(out))
        assert l2_norm(sub(fa.current_model()[1], before)) <= bound * (1 + 1e-5)
    assert fa.clip_norm is not None and fa.clip_norm < 1.0
    # Still serving the honest sites.
    out = fa.handle(recv("s0", upd("s0", 2, fa.version, SMALL, task=task["s0"])), 3.0)
    assert acks(out) == [("s0", "s0", 2)]


# -------------------------------------------------------- finding 2: a flooding region
def test_a_flooding_region_moves_the_root_at_most_the_clip_per_flush() -> None:
    """Bound (robust="mean", K = 2 as in the demo): each flush moves the model by at most
    the clip the flooding region meets, because every flush is a weighted mean of clipped
    deltas; with one other sender (fewer than AUTO_MIN_SAMPLES) that clip is the model's own
    norm. The mean takes every forward (a slot limit per region would let a region that
    forwards just often enough to count as active pace its sibling), so the flood buys
    flushes, each bounded by that clip; under the median it buys only its share."""
    children = {"r1": "region", "r2": "region"}
    agg = FedBuffAggregator("root", children, W0, buffer_size=2, concurrency=0)
    for r in children:
        agg.handle(hello(r, "region"), 0.0)
    bound = l2_norm(W0)
    r1_seq = 0
    out: list[Effect] = []
    steps: list[float] = []
    for rnd in range(20):
        before = agg.current_model()[1]
        out += agg.handle(recv("r2", upd("r2", rnd + 1, agg.version, SMALL)), float(rnd))
        steps.append(l2_norm(sub(agg.current_model()[1], before)))
        for _ in range(5):  # the flood: fresh seqs, the largest count a region may claim
            r1_seq += 1
            before = agg.current_model()[1]
            out += agg.handle(
                recv("r1", upd("r1", r1_seq, agg.version, HUGE, count=100)), float(rnd)
            )
            steps.append(l2_norm(sub(agg.current_model()[1], before)))
    assert all(step <= bound * (1 + 1e-5) for step in steps)
    assert agg.version == (20 + 100) // 2 and applied_by(out, "r1") == 100
    assert {("r2", "r2", i) for i in range(1, 21)} <= set(acks(out))  # honest: all taken
    # The model drifted no more than one clip per flush.
    drift = l2_norm(sub(agg.current_model()[1], W0))
    assert drift <= agg.version * bound * (1 + 1e-5)


# ----------------------------------------------------------- finding 7: Hello floods
def test_a_thousand_hellos_buy_one_task_and_one_model() -> None:
    agg = FedBuffAggregator(
        "root", {"evil": "site", "sub": "region"}, W0, buffer_size=2, concurrency=2
    )
    out: list[Effect] = []
    for _ in range(1_000):
        out += agg.handle(hello("evil"), 0.0)
        out += agg.handle(hello("sub", "region"), 0.0)
    assert len(sends(out, TrainRequest)) == 1
    assert len(sends(out, ModelBroadcast)) == 1
    assert len(metrics(out, "hello_repeated")) == 1_998
    # Its task is still in flight and answerable; a real reconnect still gets a task.
    [(_, req)] = requests(out)
    assert acks(agg.handle(recv("evil", upd("evil", 1, value=SMALL, task=req.task)), 1.0))
    agg.handle(PeerDown("evil"), 2.0)
    assert len(requests(agg.handle(hello("evil"), 2.0))) == 1


# ---------------------------------------------- finding 8: a revoked child's deferred update
def test_a_revoked_sites_deferred_update_is_never_applied() -> None:
    r = RegionalAggregator(
        "r1", "root", {"s1": "site", "evil": "site"}, buffer_size=1, concurrency=2
    )
    for s in ("s1", "evil"):
        r.handle(hello(s), 0.0)
    for s in ("evil", "s1"):
        out = r.handle(recv(s, upd(s, 1, value=-0.4)), 0.1)
        assert metrics(out, "update_deferred") and not acks(out)
    held = r.deferred_bytes
    r.handle(PeerDown("evil"), 0.2)  # revoked: its session is cut
    assert r.deferred_bytes == held // 2
    out = r.handle(recv("root", ModelBroadcast(1, W0)), 0.3)
    assert acks(out) == [("s1", "s1", 1)]  # the honest site's deferred update is kept
    assert applied_by(out, "evil") == 0 and r.forwarded == 1
    assert all(not isinstance(e, Metric) or labels(e).get("src") != "evil" for e in out)
    assert math.isclose(r.deferred_bytes, 0)
