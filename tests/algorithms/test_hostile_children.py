"""Children that lie: inflated claims, overflowing deltas, floods of fresh sequence numbers.

Each test performs the attack through the real aggregator nodes (``handle`` with the hostile
``Update``s) and checks that it is refused or bounded, that the node keeps training, and
that whatever it acknowledged stays recorded.
"""

from __future__ import annotations

import numpy as np

from fedloom.algorithms.aggregator_base import APPLIED_KEY, MAX_HELD_SITE
from fedloom.algorithms.fedasync import FedAsyncAggregator
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.ledger import MAX_ABOVE, AppliedLedger
from fedloom.algorithms.protocol import Deadline, Effect, LogRecords, Metric, PeerDown, Weights
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.sync import SyncAggregator
from fedloom.algorithms.weights_math import is_finite, l2_norm, sub
from fedloom.transport.wire import ModelBroadcast, Update
from tests.algorithms.alg_helpers import (
    acks,
    hello,
    labels,
    metrics,
    model,
    persists,
    recv,
    requests,
    sends,
    upd,
)

SITES = {"s1": "site", "s2": "site", "s3": "site", "evil": "site"}
NEAR_MAX = float(np.finfo(np.float32).max) * 0.9


def root(**kw: object) -> FedBuffAggregator:
    args: dict[str, object] = {"buffer_size": 3, "concurrency": 4}
    args.update(kw)
    children = args.pop("children", SITES)
    return FedBuffAggregator("root", children, model(1.0), **args)  # type: ignore[arg-type]


def tasks_for(agg: FedBuffAggregator | SyncAggregator, sites: object) -> dict[str, int]:
    """Say Hello for every site; return the task each one was given."""
    tasks: dict[str, int] = {}
    for s in sites:  # type: ignore[attr-defined]
        for peer, req in requests(agg.handle(hello(s), 0.0)):
            tasks[peer] = req.task
    return tasks


def step(before: Weights, after: Weights) -> float:
    return l2_norm(sub(after, before))


# ---------------------------------------------------------------------------- claims
def test_site_claiming_a_huge_count_moves_the_model_no_more_than_an_honest_site() -> None:
    honest = root()
    attacked = root()
    for agg, evil_count in ((honest, 1), (attacked, 10**15)):
        tasks = tasks_for(agg, SITES)
        before = agg.current_model()[1]
        for s in ("s1", "s2"):
            agg.handle(recv(s, upd(s, 1, value=0.01, task=tasks[s])), 1.0)
        out = agg.handle(
            recv("evil", upd("evil", 1, value=0.01, count=evil_count, task=tasks["evil"])), 1.0
        )
        if evil_count != 1:
            assert [labels(m)["reason"] for m in metrics(out, "update_rejected")] == ["bad_count"]
            assert ("evil", "evil", 1) in acks(out)  # recorded and acked: not resent forever
            agg.handle(recv("s3", upd("s3", 1, value=0.01, task=tasks["s3"])), 1.0)
        assert agg.version == 1
        assert is_finite(agg.current_model()[1])
        agg.step_norm = step(before, agg.current_model()[1])  # type: ignore[attr-defined]
    # The inflated update carried no weight at all: the step is an honest one.
    np.testing.assert_allclose(attacked.step_norm, honest.step_norm, rtol=1e-6)  # type: ignore[attr-defined]


def test_region_claiming_a_huge_count_is_clamped_to_its_subtree_bound() -> None:
    children = {"r1": "region", "r2": "region"}
    agg = root(
        children=children,
        buffer_size=2,
        clip_norm=None,
        claim_bounds=ClaimBounds(region_counts={"r1": 3, "r2": 3}),
    )
    for r in children:
        agg.handle(hello(r, "region"), 0.0)
    out = agg.handle(recv("r1", upd("r1", 1, value=10.0, count=10**15)), 1.0)
    assert [labels(m)["field"] for m in metrics(out, "update_claim_clamped")] == ["count"]
    assert persists(out, "applied")[0].data["count"] == 3  # the bounded claim is what is kept
    agg.handle(recv("r2", upd("r2", 1, value=-2.0, count=3)), 1.0)
    # (3·10 + 3·(−2)) / 6 = 4: equal weights, not 10**15 to 3.
    np.testing.assert_allclose(agg.current_model()[1]["w"], 1.0 + 4.0, rtol=1e-6)


def test_examples_claims_are_clamped_to_the_declared_examples() -> None:
    agg = root(
        buffer_size=2,
        weighting="examples",
        clip_norm=None,
        claim_bounds=ClaimBounds(site_examples={"evil": 10}, max_examples_per_site=50),
    )
    tasks = tasks_for(agg, SITES)
    agg.handle(recv("s1", upd("s1", 1, value=0.0, n=10, task=tasks["s1"])), 1.0)
    out = agg.handle(recv("evil", upd("evil", 1, value=5.0, n=10**12, task=tasks["evil"])), 1.0)
    assert [labels(m)["field"] for m in metrics(out, "update_claim_clamped")] == ["n_examples"]
    np.testing.assert_allclose(agg.current_model()[1]["w"], 1.0 + 2.5, rtol=1e-6)  # 10 vs 10


def test_region_clamps_its_sites_so_its_forward_claims_only_its_own_count() -> None:
    r = RegionalAggregator(
        "r1", "root", {"s1": "site", "evil": "site"}, buffer_size=2, concurrency=2
    )
    r.handle(recv("root", ModelBroadcast(0, model(1.0))), 0.0)
    r.handle(recv("s1", upd("s1", 1, value=0.01)), 1.0)
    out = r.handle(recv("evil", upd("evil", 1, value=0.01, count=10**15, n=10**15)), 1.0)
    assert metrics(out, "update_rejected")  # bad_count: a site counts once
    out = r.handle(recv("evil", upd("evil", 2, value=0.01)), 1.0)
    (fwd,) = [e.msg for e in sends(out, Update)]
    assert isinstance(fwd, Update) and fwd.count == 2


# ------------------------------------------------------------------------ overflow
def test_deltas_near_float32_max_never_reach_the_model_and_training_goes_on() -> None:
    for clip in ("auto", None):
        agg = root(buffer_size=2, clip_norm=clip)
        huge = model(NEAR_MAX)
        seq = {s: 0 for s in SITES}
        nonfinite = 0
        for rnd in range(3):  # without the guard the second step overflows to inf
            for s in ("evil", "s1"):
                seq[s] += 1
                value = None if s == "evil" else 0.01
                u = upd(
                    s,
                    seq[s],
                    base=agg.version,
                    value=value or 0.0,
                    delta=huge if value is None else None,
                )
                out = agg.handle(recv(s, u), float(rnd))
                nonfinite += len(metrics(out, "aggregate_nonfinite"))
                assert (s, s, seq[s]) in acks(out)  # decided, recorded, acked
            assert is_finite(agg.current_model()[1]), clip
        if clip == "auto":
            assert nonfinite == 0 and agg.version == 3
            assert float(np.abs(agg.current_model()[1]["w"]).max()) < 100.0
        else:
            assert nonfinite >= 1  # dropped loudly, the previous model kept
        # Honest training continues from a finite model.
        v = agg.version
        for s in ("s1", "s2"):
            seq[s] += 1
            agg.handle(recv(s, upd(s, seq[s], base=agg.version, value=0.01)), 9.0)
        assert agg.version == v + 1 and is_finite(agg.current_model()[1])


def test_a_delta_whose_norm_overflows_is_rejected() -> None:
    agg = root(buffer_size=1)
    delta: Weights = {k: np.full(v.shape, 1e300, dtype=np.float64) for k, v in model().items()}
    out = agg.handle(recv("evil", upd("evil", 1, delta=delta)), 1.0)
    assert [labels(m)["reason"] for m in metrics(out, "update_rejected")] == ["norm_overflow"]
    assert agg.version == 0 and is_finite(agg.current_model()[1])


def test_a_region_never_forwards_a_non_finite_aggregate() -> None:
    r = RegionalAggregator(
        "r1", "root", {"s1": "site", "s2": "site"}, buffer_size=2, concurrency=2, clip_norm=None
    )
    r.handle(recv("root", ModelBroadcast(0, model(0.0))), 0.0)
    big: Weights = {k: np.full(v.shape, 1e300, dtype=np.float64) for k, v in model().items()}
    # Norms of 1e300-sized entries overflow: rejected at intake. Just below: finite norm,
    # but the float32 aggregate overflows; it must not go up.
    ok: Weights = {k: np.full(v.shape, 1e150, dtype=np.float64) for k, v in model().items()}
    out = r.handle(recv("s1", upd("s1", 1, delta=big)), 1.0)
    assert metrics(out, "update_rejected")
    r.handle(recv("s1", upd("s1", 2, delta=ok)), 1.0)
    out = r.handle(recv("s2", upd("s2", 1, delta=ok)), 1.0)
    assert metrics(out, "aggregate_nonfinite") and r.forwarded == 0


def test_fedasync_and_sync_clip_by_default_and_stay_finite() -> None:
    fa = FedAsyncAggregator("root", SITES, model(1.0), concurrency=2)
    fa.handle(recv("evil", upd("evil", 1, delta=model(NEAR_MAX))), 1.0)
    assert is_finite(fa.current_model()[1])
    assert float(np.abs(fa.current_model()[1]["w"]).max()) < 10.0
    sy = SyncAggregator("root", SITES, model(1.0), clients_per_round=2, round_timeout_s=5.0)
    tasks = tasks_for(sy, SITES)
    for s in list(tasks)[:2]:
        sy.handle(recv(s, upd(s, 1, delta=model(NEAR_MAX), task=tasks[s])), 1.0)
    assert sy.version == 1 and is_finite(sy.current_model()[1])
    assert float(np.abs(sy.current_model()[1]["w"]).max()) < 10.0


# --------------------------------------------------------------------------- floods
def flood(
    agg: FedBuffAggregator, n: int, *, first: int = 1, stride: int = 1, **kw: object
) -> list[Effect]:
    out: list[Effect] = []
    for i in range(n):
        out += agg.handle(recv("evil", upd("evil", first + i * stride, value=0.01, **kw)), 1.0)  # type: ignore[arg-type]
    return out


def test_one_site_with_100_fresh_unsolicited_updates_gets_one_slot_per_flush() -> None:
    agg = root(buffer_size=3, robust="median")
    tasks = tasks_for(agg, SITES)
    out = flood(agg, 100)
    # One taken, MAX_HELD_SITE held for later, the rest dropped: not recorded, not acked.
    assert len(persists(out, "applied")) == 1 and len(acks(out)) == 1
    assert len(metrics(out, "update_dropped")) == 100 - 1 - MAX_HELD_SITE
    assert agg.buffer_fill == 1 and agg.version == 0
    # Still serving: the honest answers flush the buffer, and "evil" keeps one slot per flush.
    for s in ("s1", "s2"):
        agg.handle(recv(s, upd(s, 1, value=0.01, task=tasks[s])), 2.0)
    assert agg.version == 1
    assert agg.buffer_fill == 1  # the first held "evil" update, taken in the new epoch


def test_flood_contributes_at_most_one_update_to_each_flush() -> None:
    agg = root(buffer_size=3, clip_norm=None)
    tasks_for(agg, SITES)
    evil_seq = 0
    stream: list[Effect] = []
    for rnd in range(6):
        for s in ("evil", "s1", "evil", "evil", "s2", "evil", "s3"):
            if s == "evil":
                evil_seq += 1
                u = upd("evil", evil_seq, base=agg.version, value=0.01)
            else:
                u = upd(s, rnd + 1, base=agg.version, value=0.01)
            stream += agg.handle(recv(s, u), float(rnd))
    # Split the effect stream at each new model version: who filled that buffer?
    per_flush: list[int] = [0]
    for e in stream:
        if isinstance(e, Metric) and e.name == "update_applied" and labels(e)["src"] == "evil":
            per_flush[-1] += 1
        elif isinstance(e, Metric) and e.name == "model_version":
            per_flush.append(0)
    assert agg.version >= 5
    assert max(per_flush) == 1, per_flush


def test_malformed_flood_costs_one_durable_write_per_epoch() -> None:
    agg = root(buffer_size=3)
    tasks_for(agg, SITES)
    bad = {"w": np.zeros((7, 7), np.float32), "b": np.zeros(2, np.float32)}
    out = flood(agg, 100, delta=bad)
    assert len(persists(out)) == 1  # the first is recorded as rejected; the rest never touch disk
    assert len(metrics(out, "update_rejected")) == 1
    # Still alive and serving the others.
    for s in ("s1", "s2", "s3"):
        agg.handle(recv(s, upd(s, 1, value=0.01)), 1.0)
    assert agg.version == 1


def test_ledger_stays_bounded_under_sparse_fresh_seqs() -> None:
    led = AppliedLedger()
    for i in range(1, 10_000):
        led.record("evil", 3 * i)
    snap = led.snapshot()
    assert len(snap["above"].get("evil", [])) <= MAX_ABOVE
    assert led.seen("evil", 3 * 9_999) and not led.seen("evil", 3 * 10_000)
    # Through a node: every flush takes one sparse seq; the checkpoint's ledger stays small.
    agg = root(buffer_size=1, children={"evil": "site"})
    agg.handle(hello("evil"), 0.0)
    for i in range(1, 400):
        agg.handle(recv("evil", upd("evil", 2 * i, base=agg.version, value=0.001)), 1.0)
    assert agg.version >= 399
    ledger = agg.snapshot()["ledger"]
    assert sum(len(v) for v in ledger["above"].values()) <= MAX_ABOVE


def test_after_a_restart_resent_unsolicited_updates_are_taken_and_acked_ones_kept() -> None:
    agg = root(buffer_size=4, checkpoint_every=1)
    tasks = tasks_for(agg, SITES)
    log: list[dict[str, object]] = []
    for s in ("s1", "s2"):
        out = agg.handle(recv(s, upd(s, 1, value=0.01, task=tasks[s])), 1.0)
        log += [p.data for p in persists(out, "applied")]
    # Restart from the (empty) initial state plus the log: the two acked updates come back.
    back = root(buffer_size=4, checkpoint_every=1)
    back.restore(root(buffer_size=4).snapshot(), LogRecords({APPLIED_KEY: log}))
    assert back.buffer_fill == 2
    for s in SITES:
        back.handle(hello(s), 2.0)
    # Every site resends what it holds unacked, now answering no task of this node.
    resent: list[Effect] = []
    resent += back.handle(recv("s1", upd("s1", 1, value=0.01, task=tasks["s1"])), 2.0)  # acked
    resent += back.handle(recv("s3", upd("s3", 1, value=0.01, task=tasks["s3"])), 2.0)
    resent += back.handle(recv("evil", upd("evil", 1, value=0.01, task=tasks["evil"])), 2.0)
    assert metrics(resent, "update_duplicate")  # s1's acked update is not applied twice
    assert {("s3", "s3", 1), ("evil", "evil", 1), ("s1", "s1", 1)} <= set(acks(resent))
    assert back.version == 1  # 2 replayed + s3 + evil


def test_a_flooding_region_never_fills_a_flush_alone_while_its_sibling_is_active() -> None:
    """Under the median a region gets its fair share of a buffer while its sibling is
    active (the mean takes every forward: see the next test)."""
    children = {"r1": "region", "r2": "region"}
    agg = root(children=children, buffer_size=3, robust="median")
    for r in children:
        agg.handle(hello(r, "region"), 0.0)
    agg.handle(recv("r2", upd("r2", 1, value=0.01)), 0.5)  # r2 is active
    out: list[Effect] = []
    for seq in range(1, 6):
        out += agg.handle(recv("r1", upd("r1", seq, base=agg.version, value=0.01)), 1.0)
    # ⌈3/2⌉ = 2 slots: r2 + two of r1 flush; the next buffer takes two more and r1's
    # fifth forward waits (unacked) for the next flush.
    assert len(acks(out)) == 4 and agg.version == 1 and agg.buffer_fill == 2
    assert len(metrics(out, "update_held")) == 1
    out = agg.handle(recv("r2", upd("r2", 2, base=1, value=0.01)), 1.0)
    assert agg.version == 2 and agg.buffer_fill == 1  # then the held r1 forward
    assert ("r1", "r1", 5) in acks(out)
    # Alone (r2 down), r1 has the whole epoch: a region is not paced by one that is gone.
    agg.handle(PeerDown("r2"), 2.0)
    agg.handle(recv("r1", upd("r1", 6, base=2, value=0.01)), 2.0)
    agg.handle(recv("r1", upd("r1", 7, base=2, value=0.01)), 2.0)
    assert agg.version == 3


def test_under_the_mean_a_region_forwarding_just_often_enough_paces_nobody() -> None:
    """The third review's throttle: a region that forwards once every 110 s (enough to
    count as active) must not hold its sibling's forwards back under the mean; every
    forward is taken at once and each flush is bounded by the clip."""
    children = {"r1": "region", "slow": "region"}
    agg = root(children=children, buffer_size=2, robust="mean")
    for r in children:
        agg.handle(hello(r, "region"), 0.0)
    out: list[Effect] = []
    for second in range(1, 601):  # ten minutes: r1 forwards every second (seq = second)
        t = float(second)
        out += agg.handle(recv("r1", upd("r1", second, base=agg.version, value=0.01)), t)
        if second % 110 == 0:
            s = second // 110
            out += agg.handle(recv("slow", upd("slow", s, base=agg.version, value=0.0)), t)
        agg.handle(Deadline(), t)
    assert not metrics(out, "update_held") and not metrics(out, "update_dropped")
    assert len(acks(out)) == 600 + 5 and agg.version == (600 + 5) // 2


def test_fedasync_without_a_clip_drops_a_mix_that_overflows() -> None:
    fa = FedAsyncAggregator("root", SITES, model(1.0), concurrency=2, clip_norm=None, alpha=1.0)
    out = fa.handle(recv("evil", upd("evil", 1, delta=model(NEAR_MAX))), 1.0)
    assert fa.version == 1 and is_finite(fa.current_model()[1])  # 1 + 0.9·max: finite
    out = fa.handle(recv("s1", upd("s1", 1, base=1, delta=model(NEAR_MAX))), 1.0)
    assert metrics(out, "aggregate_nonfinite") and fa.version == 1
    assert is_finite(fa.current_model()[1])
