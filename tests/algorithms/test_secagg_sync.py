"""Secure aggregation on the synchronous FedAvg/FedProx root (``SyncAggregator``): each
round is one cohort, built by the factory both drivers use and driven by hand through
``MiniNet`` (no network, no clock).

Each test checks the model step the root took against the deltas the sites trained (the
examples-weighted mean of the survivors', within the field's precision), that no site ever
sends a plain ``Update``, and the round bookkeeping (closed, abandoned, late).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloom.algorithms.aggregator_base import APPLIED_KEY
from fedloom.algorithms.protocol import (
    Deadline,
    LogRecords,
    Metric,
    Persist,
    Received,
    Send,
    Weights,
)
from fedloom.algorithms.secagg.cohort import threshold
from fedloom.algorithms.secagg.field import flatten, member_weight
from fedloom.algorithms.secagg.masking import pair_sign
from fedloom.algorithms.secagg.prg import expand
from fedloom.algorithms.secagg.shamir import ShareError, reconstruct
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.sync import RoundState, SyncAggregator
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.federation.secagg_params import SecureAggregationConfig
from fedloom.transport.wire import (
    Ack,
    MaskedUpdate,
    SecAggAbort,
    SecAggJoin,
    SecAggSeal,
    SecAggShares,
    TrainRequest,
    Update,
)
from tests.algorithms.alg_helpers import MiniNet, model

TRAINING = TrainingConfig(lr=0.1, local_steps=1, batch_size=1, mu=0.0)
PRECISION = 16
CAP = 100  # max_examples_per_site: members weigh themselves n / CAP
TOL = 64 * 2.0**-PRECISION  # a few units in the last place of the fixed-point encoding
ROUND_S = 100.0


def secagg(**kw: Any) -> SecureAggregationConfig:
    # max_colluders = 0: these tests drive dropouts at t = max(3, N // 2 + 1); the
    # collusion bound (c >= 1) has its own tests (test_secagg_malicious.py).
    base: dict[str, Any] = {
        "enabled": True,
        "min_cohort": 3,
        "precision_bits": PRECISION,
        "max_colluders": 0,
    }
    return SecureAggregationConfig(**{**base, **kw})


def site_delta(site: str, seq: int) -> Weights:
    k = int(site.split("-")[1])
    rng = np.random.default_rng(1000 * k + seq)
    return {
        name: (0.02 * rng.standard_normal(v.shape)).astype(v.dtype) for name, v in model().items()
    }


def examples(site: str) -> int:
    return 10 + 7 * int(site.split("-")[1])  # distinct per site: weighting matters


class SyncFed(MiniNet):
    """A secure sync root and its secure sites."""

    def __init__(
        self,
        n_sites: int,
        *,
        k: int,
        cfg: SecureAggregationConfig,
        over_selection: float = 1.0,
        min_cohort: int = 1,
        algorithm: str = "fedavg",
    ) -> None:
        self.sites = [f"site-{i}" for i in range(n_sites)]
        self.keys = derived_secagg_keys(["root", *self.sites], seed=11)
        self.cfg = cfg
        self.algorithm = algorithm
        self.p = AlgorithmConfig(
            clients_per_round=k,
            over_selection=over_selection,
            round_timeout_s=ROUND_S,
            min_cohort=min_cohort,
            clip_norm=None,
            max_examples_per_site=CAP,
        )
        nodes: dict[str, Any] = {"root": self.build_root()}
        for s in self.sites:
            nodes[s] = self.build_site(s)
        super().__init__(nodes)
        self.trained: dict[tuple[str, int], Weights] = {}
        for s in self.sites:
            self.link(s, "root", True)
        self.drain()

    @property
    def root(self) -> SyncAggregator:
        node = self.nodes["root"]
        assert isinstance(node, SyncAggregator)
        return node

    def build_root(self) -> SyncAggregator:
        node = build_node(
            "root",
            "root",
            self.algorithm,
            self.p,
            TRAINING,
            Neighbours(children=dict.fromkeys(self.sites, "site")),
            seed=0,
            weights=model(0.0),
            secagg=self.cfg,
            secagg_keys=self.keys["root"],
        )
        assert isinstance(node, SyncAggregator)
        return node

    def build_site(self, s: str) -> SiteNode:
        node = build_node(
            "site",
            s,
            self.algorithm,
            self.p,
            TRAINING,
            Neighbours(parent="root", parent_role="root"),
            seed=0,
            n_examples=examples(s),
            secagg=self.cfg,
            secagg_keys=self.keys[s],
        )
        assert isinstance(node, SiteNode)
        return node

    def busy(self) -> list[str]:
        return sorted({node for node, _ in self.jobs})

    def train(self, sites: Iterable[str] | None = None) -> None:
        """Finish the running jobs of ``sites`` (all) with each site's own delta."""
        chosen = set(self.busy() if sites is None else sites)
        self.finish_jobs_of(chosen, site_delta, examples, self.trained)

    def sent_by(self, node: str, kind: type, since: int = 0) -> list[Any]:
        return [
            e.msg
            for n, e in self.effects[since:]
            if n == node and isinstance(e, Send) and isinstance(e.msg, kind)
        ]

    def sent_to(self, node: str, kind: type) -> list[tuple[str, Any]]:
        return [
            (n, e.msg)
            for n, e in self.effects
            if isinstance(e, Send) and e.peer == node and isinstance(e.msg, kind)
        ]

    def metric(self, node: str, name: str) -> list[Metric]:
        return [
            e for n, e in self.effects if n == node and isinstance(e, Metric) and e.name == name
        ]

    def flush_link(self, src: str, dst: str) -> None:
        for _ in range(len(self.queues.get((src, dst), []))):
            self.deliver_one(src, dst)

    def durable(self, node: str) -> tuple[Any, LogRecords]:
        ckpt: Any = None
        logs: dict[str, list[Any]] = {}
        for n, e in self.effects:
            if n != node or not isinstance(e, Persist):
                continue
            if e.append:
                logs.setdefault(e.key, []).append(e.data)
            else:
                ckpt, logs = e.data, {}
        return ckpt, LogRecords(logs)

    def restart_root(self) -> SyncAggregator:
        """The root crashes (links drop, queued messages lost) and comes back from its
        own durable state; its sites reconnect."""
        ckpt, records = self.durable("root")
        for s in self.sites:
            self.link(s, "root", False)
        fresh = self.build_root()
        fresh.restore(ckpt, records)
        self.nodes["root"] = fresh
        for s in self.sites:
            self.link(s, "root", True)
        return fresh

    def cohort_records(self) -> list[dict[str, Any]]:
        return [
            e.data
            for n, e in self.effects
            if n == "root"
            and isinstance(e, Persist)
            and e.key == APPLIED_KEY
            and e.data.get("op") == "cohort"
        ]

    def outcomes(self, outcome: str) -> list[tuple[str, int]]:
        return [
            (e.data["src"], e.data["seq"])
            for n, e in self.effects
            if n == "root"
            and isinstance(e, Persist)
            and e.key == APPLIED_KEY
            and e.data.get("outcome") == outcome
        ]


def fedavg_step(fed: SyncFed, cohort: Iterable[tuple[str, int]]) -> Weights:
    """Σ n_i Δ_i / Σ n_i over ``cohort`` (the plain FedAvg step with server lr 1)."""
    total = {k: np.zeros(v.shape) for k, v in model().items()}
    weight = 0.0
    for site, seq in cohort:
        w = min(examples(site), CAP) / CAP
        weight += w
        for k in total:
            total[k] += w * fed.trained[(site, seq)][k].astype(np.float64)
    return {k: v / weight for k, v in total.items()}


def plus(*steps: Weights) -> Weights:
    return {k: sum(np.asarray(s[k], np.float64) for s in steps) for k in steps[0]}


def close(a: Weights, b: Weights) -> bool:
    return all(np.allclose(np.asarray(a[k], np.float64), b[k], atol=TOL) for k in b)


def no_plain_updates_from_sites(fed: SyncFed) -> None:
    for s in fed.sites:
        assert fed.sent_by(s, Update) == [], f"{s} sent a plain update"


def run_round(fed: SyncFed) -> None:
    fed.train()
    fed.drain()


# ---------------------------------------------------------------- dropouts


@pytest.mark.parametrize("dropped", [0, 1, 3])  # 0 %, 10 %, 30 % of a cohort of 10
def test_sync_round_applies_the_survivors_weighted_sum_with_dropouts(dropped: int) -> None:
    fed = SyncFed(10, k=10, cfg=secagg(min_cohort=5))
    root = fed.root
    assert root.secure_aggregation is not None and root.state is RoundState.COLLECTING
    assert len(fed.jobs) == 10  # round 1: every site got a task
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # joins: the tenth seals the round's cohort
    seals = fed.sent_by("root", SecAggSeal)
    assert len(seals) == 10 and set(seals[0].members) == set(fed.sites)
    assert seals[0].threshold == 6  # max(min_cohort, 10 // 2 + 1)
    gone = fed.sites[:dropped]
    for s in gone:
        fed.link(s, "root", False)  # dropout after the seal: its seal and upload are lost
    fed.drain()
    survivors = [s for s in fed.sites if s not in gone]
    assert root.version == 1 and root.rounds_closed == 1 and root.rounds_abandoned == 0
    assert close(root.current_model()[1], fedavg_step(fed, [(s, 1) for s in survivors]))
    assert sorted(a.src for a in fed.sent_by("root", Ack)) == sorted(survivors)
    (record,) = fed.cohort_records()
    assert record["round"] == 1 and sorted(p[0] for p in record["pairs"]) == survivors
    # The next round goes out on the new model: at once with every site up, else once
    # the sites that are up have waited the round's time (min_available is 10).
    if dropped:
        assert root.state is RoundState.WAITING
        fed.now += ROUND_S + 1
        fed.feed("root", Deadline())
    requests = [m for m in fed.sent_by("root", TrainRequest) if m.version == 1]
    assert root.round == 2 and len(requests) == 10 - dropped
    no_plain_updates_from_sites(fed)


def test_dropout_after_upload_before_unmask_still_closes_the_round() -> None:
    fed = SyncFed(10, k=10, cfg=secagg(min_cohort=5))
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # joins -> seals
    for s in fed.sites:
        fed.flush_link("root", s)  # every site uploads
    for s in fed.sites:
        fed.flush_link(s, "root")  # uploads arrive: the view goes out
    for s in fed.sites[:3]:
        fed.link(s, "root", False)  # never sign, never reveal
    fed.drain()
    # They uploaded: their updates are in the sum, unmasked from the others' shares.
    assert fed.root.version == 1
    assert close(fed.root.current_model()[1], fedavg_step(fed, [(s, 1) for s in fed.sites]))


def test_several_rounds_and_fedprox() -> None:
    fed = SyncFed(6, k=5, cfg=secagg(min_cohort=3), over_selection=1.2, algorithm="fedprox")
    steps = []
    for r in range(1, 4):
        fed.train()
        fed.drain()
        (record,) = [c for c in fed.cohort_records() if c["round"] == r]
        steps.append(fedavg_step(fed, [(str(p[0]), int(p[1])) for p in record["pairs"]]))
        assert fed.root.version == r
    assert close(fed.root.current_model()[1], plus(*steps))
    assert fed.root.rounds_closed == 3 and fed.root.late == 3
    no_plain_updates_from_sites(fed)


def test_over_selected_stragglers_are_late_and_never_masked() -> None:
    # K = 5 of 8 sites, over-selection 1.4: 7 tasks, the fastest 5 make the cohort.
    fed = SyncFed(8, k=5, cfg=secagg(min_cohort=3), over_selection=1.4)
    busy = fed.busy()
    assert len(busy) == 7
    fast, slow = busy[:5], busy[5:]
    fed.train(fast)
    fed.drain()
    root = fed.root
    assert root.version == 1
    assert close(root.current_model()[1], fedavg_step(fed, [(s, 1) for s in fast]))
    mark = len(fed.effects)
    fed.train(slow)  # the stragglers answer the closed round
    for s in slow:
        fed.deliver_one(s, "root")
    fed.drain()
    assert sorted(fed.outcomes("late")) == [(s, 1) for s in slow]
    for s in slow:
        # Acked (the site drops the update), never sealed, never masked.
        assert Ack(s, 1) in fed.sent_by("root", Ack, mark)
        assert not fed.sent_by(s, MaskedUpdate, mark)
        assert not [m for m in fed.sent_by("root", SecAggSeal, mark) if s in m.members]
        assert fed.nodes[s].pending == 0
    assert root.version == 1 and root.late == 2


def test_a_straggler_that_joins_after_the_seal_is_late() -> None:
    fed = SyncFed(7, k=5, cfg=secagg(min_cohort=3), over_selection=1.4)
    busy = fed.busy()
    fed.train(busy[:5])
    for s in busy[:5]:
        fed.deliver_one(s, "root")  # the cohort is sealed (uploads not yet delivered)
    assert fed.sent_by("root", SecAggSeal)
    fed.train(busy[5:6])
    fed.deliver_one(busy[5], "root")  # joins while the cohort is in progress
    assert fed.outcomes("late") == [(busy[5], 1)]
    fed.drain()
    assert fed.root.version == 1
    assert close(fed.root.current_model()[1], fedavg_step(fed, [(s, 1) for s in busy[:5]]))


# ------------------------------------------------------------ too few survivors


def test_too_few_joins_by_the_deadline_abandons_the_round_and_the_next_proceeds() -> None:
    fed = SyncFed(5, k=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    root = fed.root
    first = fed.busy()
    fed.train(first[:2])  # only two finish in time (t = 3)
    fed.drain()
    assert not fed.sent_by("root", SecAggSeal)
    fed.now += ROUND_S + 1
    fed.feed("root", Deadline())
    fed.drain()
    assert root.rounds_abandoned == 1 and root.version == 0
    assert not fed.sent_by("root", SecAggSeal)  # nothing was ever masked
    # The two joins are discarded (recorded late, acked: the sites drop them).
    assert sorted(fed.outcomes("late")) == [(s, 1) for s in first[:2]]
    assert fed.metric("root", "update_discarded")
    # The stragglers of round 1 answer late; round 2 went out and completes.
    fed.train(first[2:])
    fed.drain()
    assert root.round == 2 and root.version == 0
    fed.train()
    fed.drain()
    assert root.version == 1 and root.rounds_closed == 1
    (record,) = fed.cohort_records()
    assert record["round"] == 2
    pairs = [(str(p[0]), int(p[1])) for p in record["pairs"]]
    assert close(root.current_model()[1], fedavg_step(fed, pairs))
    no_plain_updates_from_sites(fed)


def test_a_deadline_with_enough_joins_seals_the_ones_there_are() -> None:
    fed = SyncFed(6, k=6, cfg=secagg(min_cohort=3, max_dropout=0.3))
    busy = fed.busy()
    fed.train(busy[:4])  # 4 of 6 by the deadline; t(6) = 4
    fed.drain()
    assert not fed.sent_by("root", SecAggSeal)
    fed.now += ROUND_S + 1
    fed.feed("root", Deadline())
    fed.drain()
    assert fed.root.version == 1
    assert close(fed.root.current_model()[1], fedavg_step(fed, [(s, 1) for s in busy[:4]]))


def test_too_few_uploads_aborts_the_cohort_and_abandons_the_round() -> None:
    fed = SyncFed(5, k=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    root = fed.root
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # joins -> seals queued
    lost = fed.sites[:3]
    for s in lost:
        fed.link(s, "root", False)  # their seals are lost: they never upload
    fed.drain()
    assert fed.metric("root", "secagg_cohort_aborted")
    assert root.rounds_abandoned == 1 and root.version == 0
    assert fed.sent_by("root", Ack) == []
    # The two that uploaded lost their updates (masked once, never again).
    for s in fed.sites[3:]:
        assert fed.nodes[s].pending == 0 and fed.metric(s, "secagg_update_lost")
    # The three come back; their unmasked updates of the abandoned round are late.
    for s in lost:
        fed.link(s, "root", True)
    fed.drain()
    assert sorted(fed.outcomes("late")) == [(s, 1) for s in lost]
    # A new round with all five completes.
    assert root.state is RoundState.COLLECTING and len(fed.busy()) == 5
    fed.train()
    fed.drain()
    assert root.version == 1
    pairs = [(str(p[0]), int(p[1])) for p in fed.cohort_records()[0]["pairs"]]
    assert len(pairs) == 5
    assert close(root.current_model()[1], fedavg_step(fed, pairs))
    no_plain_updates_from_sites(fed)


def test_sites_lost_before_joining_end_the_round_at_once() -> None:
    # No task outstanding any more: the round seals what joined without the deadline.
    fed = SyncFed(5, k=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    busy = fed.busy()
    fed.train(busy[:3])
    fed.drain()
    for s in busy[3:]:
        fed.link(s, "root", False)  # still training: their tasks are lost
    fed.drain()
    assert fed.root.version == 1
    assert close(fed.root.current_model()[1], fedavg_step(fed, [(s, 1) for s in busy[:3]]))


FATES = ("ok", "no_join", "before_upload", "after_upload")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fates=st.lists(st.sampled_from(FATES), min_size=5, max_size=5))
def test_any_mix_of_dropouts_closes_the_round_with_the_survivors_sum_or_abandons_it(
    fates: list[str],
) -> None:
    """K = 5 (t = 3): each site goes down before joining, after joining (its seal lost),
    after uploading (never signs or reveals), or not at all. The round closes with the sum
    of exactly the uploads iff its cohort can finish (>= 3 joins, and t of the sealed
    cohort still live to sign and reveal), else it is abandoned; in bounded time either way."""
    fed = SyncFed(5, k=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    root = fed.root
    fate = dict(zip(fed.sites, fates, strict=True))
    of = {f: [s for s in fed.sites if fate[s] == f] for f in FATES}
    for s in of["no_join"]:
        fed.link(s, "root", False)  # down while training: its task is lost
    fed.train([s for s in fed.sites if fate[s] != "no_join"])
    for s in fed.sites:
        fed.deliver_one(s, "root")  # the joins
    for s in of["before_upload"]:
        fed.link(s, "root", False)  # its seal is lost: never uploads
    for s in fed.sites:
        fed.flush_link("root", s)  # seals -> uploads queued
    for s in of["after_upload"]:
        fed.flush_link(s, "root")  # the upload arrives, then the site is gone
        fed.link(s, "root", False)
    fed.drain()
    # Time runs only from deadline to deadline: the round is decided (closed or abandoned)
    # by round_timeout_s + upload_timeout_s + unmask_timeout_s at the latest.
    bound = ROUND_S + fed.cfg.upload_timeout_s + fed.cfg.unmask_timeout_s
    for _ in range(10):
        due = root.next_deadline()
        if root.rounds_closed + root.rounds_abandoned or due is None or due > bound:
            break
        fed.now = max(fed.now, due)
        fed.feed("root", Deadline())
        fed.drain()
    assert root.rounds_closed + root.rounds_abandoned == 1
    joined = len(fed.sites) - len(of["no_join"])
    uploads = [*of["ok"], *of["after_upload"]]
    completes = joined >= 3 and len(of["ok"]) >= threshold(joined, 3, 0)
    if completes:
        assert root.version == 1 and root.rounds_closed == 1
        (record,) = fed.cohort_records()
        assert sorted(p[0] for p in record["pairs"]) == sorted(uploads)
        assert close(root.current_model()[1], fedavg_step(fed, [(s, 1) for s in uploads]))
        assert sorted(a.src for a in fed.sent_by("root", Ack)) == sorted(uploads)
    else:
        assert root.version == 0 and root.rounds_abandoned == 1
        assert fed.cohort_records() == []
        # Nothing applied: no site update was acked as applied.
        assert fed.outcomes("applied") == []
    no_plain_updates_from_sites(fed)


# ------------------------------------------------------------------- restarts


def test_root_restarted_before_the_seal_resumes_the_round() -> None:
    fed = SyncFed(5, k=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    fed.train(fed.sites[:3])
    fed.drain()  # three joins wait for the round's cohort
    assert not fed.sent_by("root", SecAggSeal)
    fresh = fed.restart_root()
    assert fresh.state is RoundState.COLLECTING and fresh.round == 1
    fed.drain()  # the three join again as they reconnect
    fed.train()  # the other two finish
    fed.drain()
    assert fresh.version == 1 and fresh.round == 2 and fresh.rounds_abandoned == 0
    (record,) = fed.cohort_records()
    assert record["round"] == 1 and len(record["pairs"]) == 5
    assert close(fresh.current_model()[1], fedavg_step(fed, [(s, 1) for s in fed.sites]))
    no_plain_updates_from_sites(fed)


def test_root_restarted_after_the_uploads_aborts_the_cohort_and_training_goes_on() -> None:
    fed = SyncFed(5, k=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # joins -> seal
    for s in fed.sites:
        fed.flush_link("root", s)  # every site uploads (queued to the root, then lost)
    fresh = fed.restart_root()
    fed.drain()
    # The orphaned cohort was aborted: every uploaded update is dropped, never re-masked.
    assert fed.sent_by("root", SecAggAbort)
    for s in fed.sites:
        assert fed.nodes[s].pending == 0 and fed.metric(s, "secagg_update_lost")
    # The restored round has nothing left to wait for but its deadline: then abandoned.
    assert fresh.state is RoundState.COLLECTING and fresh.version == 0
    fed.now += ROUND_S + 1
    fed.feed("root", Deadline())
    fed.drain()
    assert fresh.rounds_abandoned == 1 and fresh.round == 2
    fed.train()
    fed.drain()
    assert fresh.version == 1
    assert close(fresh.current_model()[1], fedavg_step(fed, [(s, 2) for s in fed.sites]))
    no_plain_updates_from_sites(fed)


def test_root_restarted_mid_cohort_closes_the_round_with_the_members_that_rejoin() -> None:
    fed = SyncFed(5, k=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # joins -> the cohort is sealed
    uploaded = fed.sites[:2]
    for s in uploaded:
        fed.flush_link("root", s)  # these two upload (lost in the crash); three never saw it
    fresh = fed.restart_root()
    fed.drain()
    # The two uploaders lost their updates; the other three joined the restored round again.
    for s in uploaded:
        assert fed.nodes[s].pending == 0 and fed.metric(s, "secagg_update_lost")
    assert fresh.state is RoundState.COLLECTING and fresh.round == 1 and fresh.version == 0
    fed.now += ROUND_S + 1  # the uploaders' tasks stay unanswered: the deadline seals
    fed.feed("root", Deadline())
    fed.drain()
    rest = fed.sites[2:]
    assert fresh.version == 1 and fresh.rounds_abandoned == 0
    (record,) = fed.cohort_records()
    assert record["round"] == 1 and sorted(p[0] for p in record["pairs"]) == rest
    assert close(fresh.current_model()[1], fedavg_step(fed, [(s, 1) for s in rest]))
    no_plain_updates_from_sites(fed)


def test_root_restarted_after_the_round_keeps_the_model_and_dedupes() -> None:
    fed = SyncFed(5, k=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    run_round(fed)
    run_round(fed)
    root = fed.root
    assert root.version == 2 and root.round == 3
    weights = root.current_model()[1]
    fresh = fed.restart_root()
    assert fresh.version == 2 and fresh.rounds_closed == root.rounds_closed
    assert all(np.array_equal(fresh.current_model()[1][k], weights[k]) for k in weights)
    # A resent join of an applied update is re-acked, never applied again.
    out = fresh.handle(Received("site-0", SecAggJoin("site-0", 1, 0)), fed.now)
    assert [e.msg for e in out if isinstance(e, Send)] == [Ack("site-0", 1)]
    fed.drain()
    run_round(fed)
    assert fresh.version == 3


def test_replay_of_cohort_records_after_an_older_checkpoint() -> None:
    # checkpoint_every = 3: rounds 2 and 3 are rebuilt from their cohort records alone.
    fed = SyncFed(5, k=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    root = fed.root
    root.checkpoint_every = 3
    for _ in range(4):
        run_round(fed)
    assert root.version == 4
    ckpt, records = fed.durable("root")
    assert ckpt["round"] == 3  # the last checkpointed round start
    fresh = fed.build_root()
    fresh.restore(ckpt, records)
    assert fresh.version == 4 and fresh.round == 4 and fresh.state is RoundState.WAITING
    for k, v in root.current_model()[1].items():
        assert np.array_equal(fresh.current_model()[1][k], v)


# ------------------------------------------------------------- what the root sees


def rebuilt_seeds(
    answers: list[tuple[str, SecAggShares]], members: tuple[str, ...]
) -> tuple[dict[str, bytes], dict[tuple[str, str], bytes]]:
    t = threshold(len(members), 2)
    index = {m: k + 1 for k, m in enumerate(members)}
    own: dict[str, dict[int, bytes]] = {}
    pair: dict[tuple[str, str], dict[int, bytes]] = {}
    for site, answer in answers:
        for owner, share in answer.self_shares:
            own.setdefault(owner, {})[index[site]] = share
        for i, j, share in answer.pair_shares:
            pair.setdefault((i, j), {})[index[site]] = share
    b: dict[str, bytes] = {}
    s: dict[tuple[str, str], bytes] = {}
    for owner, got in own.items():
        with contextlib.suppress(ShareError):
            b[owner] = reconstruct(got, t)
    for key, got in pair.items():
        with contextlib.suppress(ShareError):
            s[key] = reconstruct(got, t)
    return b, s


@pytest.mark.parametrize("dropped", [0, 2])
def test_the_root_never_holds_an_individual_update(dropped: int) -> None:
    """Everything the sync root received in a round (masked uploads, every share revealed
    to it) leaves each member's update masked: stripping every mask whose seed those shares
    rebuild gives a vector nowhere near the update, while the sum over the survivors is
    exactly what it applied."""
    fed = SyncFed(6, k=6, cfg=secagg(min_cohort=3, max_dropout=0.3))
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")
    for s in fed.sites[:dropped]:
        fed.link(s, "root", False)  # dropped before uploading: their pair seeds revealed
    fed.drain()
    assert fed.root.version == 1
    (seal,) = {m for _, m in fed.sent_to("site-5", SecAggSeal)}
    members = tuple(seal.members)
    masked = {src: m for src, m in fed.sent_to("root", MaskedUpdate)}
    answers = [(src, m) for src, m in fed.sent_to("root", SecAggShares)]
    assert len(masked) == 6 - dropped and answers
    b, s = rebuilt_seeds(answers, members)
    for target, up in masked.items():
        y = np.frombuffer(up.data, dtype="<u4").astype(np.uint32)
        if target in b:
            y = y - expand(b[target], y.size)
        for (i, j), seed in s.items():
            if target == i:
                y = y - expand(seed, y.size) * np.uint32(pair_sign(i, j) % 2**32)
            elif target == j:
                y = y - expand(seed, y.size) * np.uint32(pair_sign(j, i) % 2**32)
        estimate = y.view(np.int32).astype(np.float64)[:-1] / 2.0**PRECISION
        truth = member_weight(examples(target), "examples", CAP) * flatten(fed.trained[(target, 1)])
        # The pair masks with the other survivors remain: uniform noise of size ~2^15.
        assert np.linalg.norm(estimate - truth) > 1000 * np.linalg.norm(truth)
    no_plain_updates_from_sites(fed)


# ------------------------------------------------------------------ config


def test_config_errors_name_the_field() -> None:
    def build(k: int | None, cfg: SecureAggregationConfig, n: int = 5) -> Any:
        sites = [f"site-{i}" for i in range(n)]
        keys = derived_secagg_keys(["root", *sites], seed=1)
        return build_node(
            "root",
            "root",
            "fedavg",
            AlgorithmConfig(clients_per_round=k, clip_norm=None),
            TRAINING,
            Neighbours(children=dict.fromkeys(sites, "site")),
            seed=0,
            weights=model(0.0),
            secagg=cfg,
            secagg_keys=keys["root"],
        )

    with pytest.raises(ConfigError, match=r"secure_aggregation\.min_cohort.*clients_per_round"):
        build(4, secagg(min_cohort=5))
    # clients_per_round not written: the round is as big as the children.
    with pytest.raises(ConfigError, match=r"min_cohort: 6 is more than the 5 sites"):
        build(None, secagg(min_cohort=6), n=5)
    # written above the site children: an error of its own, never a clamp (issue 15)
    with pytest.raises(ConfigError, match=r"clients_per_round: 10 is more than the 5 sites"):
        build(10, secagg(min_cohort=3), n=5)
    with pytest.raises(ConfigError, match=r"secure_aggregation\.cohort_size"):
        build(5, secagg(cohort_size=4))
    with pytest.raises(ConfigError, match=r"max_dropout"):
        build(5, secagg(min_cohort=3, max_dropout=0.45))
    root = build(5, secagg(min_cohort=3, max_dropout=0.4))
    assert isinstance(root, SyncAggregator) and root.secure_aggregation.threshold == 3
