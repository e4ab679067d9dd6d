"""Secure aggregation hosted in the real nodes (site, FedBuff root, region), built by the
factory both drivers use, driven by hand through ``MiniNet`` (no network, no clock).

Each test checks the sum the aggregator applied against the deltas the sites trained
(within the field's precision), that acks go out only once the cohort is recorded, and
that no site ever sends a plain ``Update``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloom.algorithms.aggregator_base import APPLIED_KEY
from fedloom.algorithms.dp.ledger import PrivacyEvent
from fedloom.algorithms.dp.release import PrivacyConfig, effective_noise_multiplier
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import (
    Deadline,
    LogRecords,
    Metric,
    Persist,
    Received,
    Send,
    Weights,
)
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.federation.factory import Neighbours, build_node, claim_bounds
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.federation.secagg_params import SecureAggregationConfig
from fedloom.transport.wire import (
    Ack,
    Incorporated,
    MaskedUpdate,
    SecAggAbort,
    SecAggJoin,
    SecAggSeal,
    Update,
)
from tests.algorithms.alg_helpers import MiniNet, labels, model

TRAINING = TrainingConfig(lr=0.1, local_steps=1, batch_size=1, mu=0.0)
PRECISION = 16
TOL = 64 * 2.0**-PRECISION  # a few units in the last place of the fixed-point encoding


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


def examples(site: str) -> int:
    """site-k trains on 10 (k + 1) examples (what the roster declares for it)."""
    return 10 * (int(site.split("-")[1]) + 1)


def site_delta(site: str, seq: int) -> Weights:
    """Each site's own small delta (distinct per site and seq, far below the clip)."""
    k = int(site.split("-")[1])
    rng = np.random.default_rng(1000 * k + seq)
    return {
        name: (0.02 * rng.standard_normal(v.shape)).astype(v.dtype) for name, v in model().items()
    }


class Fed(MiniNet):
    """A root (or a region under a plain root) and its secure sites."""

    def __init__(
        self,
        n_sites: int,
        *,
        buffer_size: int,
        cfg: SecureAggregationConfig,
        region: bool = False,
        concurrency: int | None = None,
        weighting: str = "uniform",
        privacy: PrivacyConfig | None = None,
    ) -> None:
        self.sites = [f"site-{i}" for i in range(n_sites)]
        self.agg = "region" if region else "root"
        ids = ["root", *(["region"] if region else []), *self.sites]
        self.keys = derived_secagg_keys(ids, seed=7)
        self.cfg = cfg
        self.privacy = privacy
        self.p = AlgorithmConfig(
            buffer_size=buffer_size,
            concurrency=concurrency or n_sites,
            clip_norm="auto" if privacy is not None else None,
            root_buffer_size=1,
            weighting=weighting,
        )
        nodes: dict[str, Any] = {}
        children = {s: "site" for s in self.sites}
        if region:
            nodes["root"] = build_node(
                "root",
                "root",
                "fedbuff",
                AlgorithmConfig(buffer_size=1, concurrency=1, clip_norm=None),
                TRAINING,
                Neighbours(children={"region": "region"}),
                seed=0,
                weights=model(0.0),
                secagg=cfg,
                secagg_keys=self.keys["root"],
            )
        nodes[self.agg] = self.build_agg(children)
        for s in self.sites:
            nodes[s] = self.build_site(s)
        super().__init__(nodes)
        self.trained: dict[tuple[str, int], Weights] = {}
        if region:
            self.link("region", "root", True)
        for s in self.sites:
            self.link(s, self.agg, True)
        self.drain()

    def build_agg(self, children: Mapping[str, str]) -> Any:
        if self.agg == "region":
            return build_node(
                "region",
                "region",
                "fedbuff",
                self.p,
                TRAINING,
                Neighbours(parent="root", parent_role="root", children=children),
                seed=0,
                secagg=self.cfg,
                secagg_keys=self.keys["region"],
            )
        return build_node(
            "root",
            "root",
            "fedbuff",
            self.p,
            TRAINING,
            Neighbours(children=children),
            seed=0,
            weights=model(0.0),
            bounds=claim_bounds(self.p, site_examples={s: examples(s) for s in children}),
            secagg=self.cfg,
            secagg_keys=self.keys["root"],
            privacy=self.privacy,
        )

    def build_site(self, s: str) -> SiteNode:
        node = build_node(
            "site",
            s,
            "fedbuff",
            self.p,
            TRAINING,
            Neighbours(parent=self.agg, parent_role="root"),
            seed=0,
            n_examples=examples(s),
            secagg=self.cfg,
            secagg_keys=self.keys[s],
        )
        assert isinstance(node, SiteNode)
        return node

    def train(self, sites: Iterable[str] | None = None) -> None:
        """Finish the running jobs of ``sites`` (all) with each site's own delta."""
        chosen = set(self.sites if sites is None else sites)
        self.finish_jobs_of(chosen, site_delta, examples, self.trained)

    def sent_by(self, node: str, kind: type) -> list[Any]:
        return [
            e.msg
            for n, e in self.effects
            if n == node and isinstance(e, Send) and isinstance(e.msg, kind)
        ]

    def metric(self, node: str, name: str) -> list[Metric]:
        return [
            e for n, e in self.effects if n == node and isinstance(e, Metric) and e.name == name
        ]

    def flush_link(self, src: str, dst: str) -> None:
        """Deliver what is queued on ``src -> dst`` now (not what that causes)."""
        for _ in range(len(self.queues.get((src, dst), []))):
            self.deliver_one(src, dst)

    def base_of(self, site: str, seq: int) -> int:
        """The model version ``site`` trained update ``seq`` on (from its join)."""
        joins = [j for j in self.sent_by(site, SecAggJoin) if j.seq == seq]
        return int(joins[0].base_version)

    def drop(self, site: str) -> None:
        """The site's link goes down (what it had queued is lost)."""
        self.link(site, self.agg, False)

    def durable(self, node: str) -> tuple[Any, LogRecords]:
        """The node's last checkpoint and the log records written after it."""
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


def no_plain_updates_from_sites(fed: Fed) -> None:
    for s in fed.sites:
        assert fed.sent_by(s, Update) == [], f"{s} sent a plain update"


def applied_step(fed: Fed, cohort: list[tuple[str, int]], version: int) -> Weights:
    """The step a cohort of (site, seq) applied at ``version`` must be: s̄ · mean of the
    deltas (uniform weighting), s̄ the mean polynomial(0.5) factor of their staleness."""
    factors = [(1.0 + (version - fed.base_of(s, q))) ** -0.5 for s, q in cohort]
    s_bar = sum(factors) / len(factors)
    total = {k: np.zeros(v.shape) for k, v in model().items()}
    for site, seq in cohort:
        for k in total:
            total[k] += fed.trained[(site, seq)][k]
    return {k: s_bar * v / len(cohort) for k, v in total.items()}


def close(a: Weights, b: Weights) -> bool:
    return all(np.allclose(np.asarray(a[k], np.float64), b[k], atol=TOL) for k in b)


# ------------------------------------------------------------------- root, dropouts


@pytest.mark.parametrize("dropped", [0, 1, 3])  # 0 %, 10 %, 30 % of a cohort of 10
def test_root_applies_the_survivors_sum_with_dropouts(dropped: int) -> None:
    fed = Fed(10, buffer_size=10, cfg=secagg(min_cohort=5))
    root = fed.nodes["root"]
    assert isinstance(root, FedBuffAggregator) and root.secure_aggregation is not None
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # joins: the tenth seals a cohort of all 10
    seals = fed.sent_by("root", SecAggSeal)
    assert len(seals) == 10 and set(seals[0].members) == set(fed.sites)
    gone = fed.sites[:dropped]
    for s in gone:
        fed.drop(s)  # dropout after the seal: the seal and its upload are lost
    fed.drain()
    survivors = [s for s in fed.sites if s not in gone]
    assert root.version == 1
    step = applied_step(fed, [(s, 1) for s in survivors], 0)
    assert close(root.current_model()[1], step)
    acked = sorted(a.src for a in fed.sent_by("root", Ack))
    assert acked == sorted(survivors)
    # The cohort's record is durable before the first ack.
    root_effects = [e for n, e in fed.effects if n == "root"]
    first_ack = next(
        i for i, e in enumerate(root_effects) if isinstance(e, Send) and isinstance(e.msg, Ack)
    )
    record = next(
        i
        for i, e in enumerate(root_effects)
        if isinstance(e, Persist) and e.key == APPLIED_KEY and e.data.get("op") == "cohort"
    )
    assert record < first_ack
    assert sorted(p[0] for p in root_effects[record].data["pairs"]) == sorted(survivors)
    no_plain_updates_from_sites(fed)
    for s in survivors:
        assert fed.nodes[s].pending == 0  # acked: consumed


def test_dropout_after_upload_before_unmask_still_completes() -> None:
    fed = Fed(10, buffer_size=10, cfg=secagg(min_cohort=5))
    root = fed.nodes["root"]
    fed.train()
    fed.drain()  # seal, uploads, view, sigs, unmask, shares: all in one go here
    assert root.version == 1  # sanity: without dropouts it completed
    # Second round: two sites go silent after uploading, before revealing.
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # joins
    for s in fed.sites:
        fed.flush_link("root", s)  # seals -> masked uploads queued
    for s in fed.sites:
        fed.flush_link(s, "root")  # uploads arrive: the view goes out
    late = fed.sites[:2]
    for s in late:
        fed.drop(s)  # never sign, never reveal
    fed.drain()
    assert root.version == 2
    step = applied_step(fed, [(s, 2) for s in fed.sites], 1)
    base = applied_step(fed, [(s, 1) for s in fed.sites], 0)
    expect = {k: base[k] + step[k] for k in step}
    assert close(root.current_model()[1], expect)


def test_mixed_versions_in_one_cohort_apply_the_mean_staleness() -> None:
    # 8 sites, 5 tasks out, cohorts of 5: tasks handed out after a new version train on
    # it while older ones are still out, so cohorts mix base versions.
    fed = Fed(8, buffer_size=5, cfg=secagg(min_cohort=3), concurrency=5)
    root = fed.nodes["root"]
    for _ in range(20):  # three sites finish at a time: tasks overlap versions
        fed.train(sorted({node for node, _ in fed.jobs})[:3])
        fed.drain()
    records = [
        e.data
        for n, e in fed.effects
        if n == "root" and isinstance(e, Persist) and e.key == APPLIED_KEY
    ]
    cohorts = [r for r in records if r.get("op") == "cohort"]
    assert len(cohorts) == root.version >= 3
    assert any(len(set(r["taus"])) > 1 for r in cohorts), "no cohort mixed versions"
    expect = {k: np.zeros(v.shape) for k, v in model().items()}
    for r in cohorts:
        step = applied_step(fed, [(str(p[0]), int(p[1])) for p in r["pairs"]], r["version"])
        for k in expect:
            expect[k] += step[k]
    assert close(root.current_model()[1], expect)
    no_plain_updates_from_sites(fed)


def test_site_restarted_mid_cohort_answers_from_its_records_and_never_rejoins() -> None:
    fed = Fed(5, buffer_size=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    root = fed.nodes["root"]
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # joins
    for s in fed.sites:
        fed.flush_link("root", s)  # seals: every site uploads
    victim = "site-0"
    fed.link(victim, "root", False)  # it crashes: its queued upload is lost with the link
    ckpt, records = fed.durable(victim)
    mark = len(fed.effects)
    fresh = fed.build_site(victim)
    fresh.restore(ckpt, records)
    assert fresh.pending == 1 and fresh.secure is not None and fresh.secure.uploaded(1)
    fed.nodes[victim] = fresh
    fed.link(victim, "root", True)
    fed.drain()
    # Its upload is gone (not kept), so the root waits for it until the upload deadline.
    assert root.version == 0
    fed.now += fed.cfg.upload_timeout_s + 1
    fed.feed("root", Deadline())
    fed.drain()
    # The restarted site never joined again with its uploaded update.
    after = [e for n, e in fed.effects[mark:] if n == victim and isinstance(e, Send)]
    assert after and not any(isinstance(e.msg, SecAggJoin) and e.msg.seq == 1 for e in after)
    # The other four complete the cohort (the victim's upload was lost: it is in D).
    assert root.version == 1
    step = applied_step(fed, [(s, 1) for s in fed.sites[1:]], 0)
    assert close(root.current_model()[1], step)
    # The victim learns from the view that it was counted as dropped: update dropped.
    assert fresh.pending == 0
    no_plain_updates_from_sites(fed)


def test_aggregator_restarted_mid_cohort_aborts_it_and_training_goes_on() -> None:
    fed = Fed(5, buffer_size=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # joins -> seal
    for s in fed.sites:
        fed.flush_link("root", s)  # every site uploads (queued to the root)
    # The root crashes before reading the uploads: rebuilt from its own durable state.
    ckpt, records = fed.durable("root")
    for s in fed.sites:
        fed.link(s, "root", False)
    fresh = fed.build_agg({s: "site" for s in fed.sites})
    fresh.restore(ckpt, records)
    fed.nodes["root"] = fresh
    for s in fed.sites:
        fed.link(s, "root", True)
    fed.drain()
    # The orphaned cohort was aborted: every uploaded update is dropped, never re-masked.
    assert fresh.version == 0
    for s in fed.sites:
        assert fed.nodes[s].pending == 0
        assert fed.metric(s, "secagg_update_lost")
    assert any(isinstance(m, SecAggAbort) for m in fed.sent_by("root", SecAggAbort))
    # Training goes on: new tasks, a new cohort, a new version.
    fed.train()
    fed.drain()
    assert fresh.version == 1
    no_plain_updates_from_sites(fed)


def test_aggregator_restart_after_the_cohort_keeps_the_model_and_dedupes() -> None:
    fed = Fed(5, buffer_size=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    root = fed.nodes["root"]
    fed.train()
    fed.drain()
    assert root.version == 1
    weights = root.current_model()[1]
    ckpt, records = fed.durable("root")
    fresh = fed.build_agg({s: "site" for s in fed.sites})
    fresh.restore(ckpt, records)
    assert fresh.version == 1
    assert all(np.array_equal(fresh.current_model()[1][k], weights[k]) for k in weights)
    # A resent join for an applied update is re-acked, never applied again.
    out = fresh.handle(
        Received("site-0", SecAggJoin("site-0", 1, 0)),
        fed.now,
    )
    assert [e.msg for e in out if isinstance(e, Send)] == [Ack("site-0", 1)]


def test_too_few_uploads_aborts_and_sites_rejoin_within_the_deadline() -> None:
    fed = Fed(5, buffer_size=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    root = fed.nodes["root"]
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # joins -> seals queued
    for s in fed.sites[:3]:
        fed.drop(s)  # their seals are lost: they never upload
    fed.drain()
    fed.now += fed.cfg.upload_timeout_s + 1
    fed.feed("root", Deadline())
    fed.drain()
    assert root.version == 0
    assert fed.metric("root", "secagg_cohort_aborted")
    assert fed.sent_by("root", Ack) == []
    # The two that uploaded lost their update (masked once, never again).
    for s in fed.sites[3:]:
        assert fed.nodes[s].pending == 0
        assert fed.metric(s, "secagg_update_lost")
    # The three that never uploaded join again once back; a new cohort completes with
    # them and the two others' next updates.
    for s in fed.sites[:3]:
        fed.link(s, "root", True)
    fed.drain()
    fed.train()
    fed.drain()
    assert root.version == 1
    applied = sorted(a.src for a in fed.sent_by("root", Ack))
    assert applied == fed.sites
    no_plain_updates_from_sites(fed)


def test_secure_root_refuses_a_plain_update_from_a_site() -> None:
    fed = Fed(5, buffer_size=5, cfg=secagg())
    root = fed.nodes["root"]
    plain = Update("site-0", 1, 0, site_delta("site-0", 1), 10, 1)
    out = fed.feed("root", Received("site-0", plain))
    assert not [e for e in out if isinstance(e, Send) and isinstance(e.msg, Ack)]
    reasons = [(e.labels or {}).get("reason") for e in out if isinstance(e, Metric)]
    assert "plain_update" in reasons
    assert root.version == 0 and root.applied == 0


def test_region_forwards_one_cohort_as_one_update_and_settles_after_the_root() -> None:
    fed = Fed(5, buffer_size=5, cfg=secagg(min_cohort=3), region=True)
    region, root = fed.nodes["region"], fed.nodes["root"]
    assert isinstance(region, RegionalAggregator) and region.secure_aggregation is not None
    assert root.secure_aggregation is None  # only a region below: forwards are sums
    fed.train()
    fed.drain()
    forwards = fed.sent_by("region", Update)
    assert len(forwards) == 1
    fwd = forwards[0]
    assert fwd.count == 5 and fwd.n_examples == sum(examples(s) for s in fed.sites)
    assert sorted(fwd.pairs) == sorted((s, 1) for s in fed.sites)
    assert root.version == 1
    assert close(root.current_model()[1], applied_step(fed, [(s, 1) for s in fed.sites], 0))
    # Sites are acked by the region, then told their update is settled (root's ack).
    assert sorted(a.src for a in fed.sent_by("region", Ack)) == fed.sites
    assert sorted(i.src for i in fed.sent_by("region", Incorporated)) == fed.sites
    no_plain_updates_from_sites(fed)


def test_a_member_missing_from_a_sites_roster_is_refused_and_the_cohort_goes_on() -> None:
    """site-0's roster lacks site-4's key: it refuses the seal naming site-4 (reason
    ``unknown_key``) instead of crashing; the other members' sum is still applied."""
    from fedloom.federation.secagg_keys import derived_signing_key
    from fedloom.transport.secagg_keys import RosterSecAggKeys

    fed = Fed(5, buffer_size=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    root = fed.nodes["root"]
    table = {n: bytes(derived_signing_key(n, 7).verify_key) for n in ["root", *fed.sites[:4]]}
    partial = RosterSecAggKeys("site-0", derived_signing_key("site-0", 7), table)
    fed.keys["site-0"] = partial
    fed.nodes["site-0"] = fed.build_site("site-0")
    fed.jobs = [(n, job) for n, job in fed.jobs if n != "site-0"]  # the old node's
    fed.link("site-0", "root", False)
    fed.link("site-0", "root", True)
    fed.drain()
    fed.train()
    fed.drain()
    refusals = [
        labels.get("reason")
        for labels in (m.labels or {} for m in fed.metric("site-0", "secagg_refused"))
    ]
    assert "unknown_key" in refusals
    fed.now += fed.cfg.upload_timeout_s + 1
    fed.feed("root", Deadline())
    fed.drain()
    assert root.version >= 1
    assert close(root.current_model()[1], applied_step(fed, [(s, 1) for s in fed.sites[1:]], 0))
    # Once that cohort moved on without it, site-0's update joined again (never uploaded).
    assert len([j for j in fed.sent_by("site-0", SecAggJoin) if j.seq == 1]) >= 2
    no_plain_updates_from_sites(fed)


def test_examples_weighting_is_applied_by_the_members() -> None:
    """Under weighting = "examples" each member weighs its delta by n_i / cap (cap: the
    largest declared examples) and the root divides by Σ w_i: the example-weighted mean."""
    fed = Fed(5, buffer_size=5, cfg=secagg(), weighting="examples")
    root = fed.nodes["root"]
    fed.train()
    fed.drain()
    assert root.version == 1
    n = {s: examples(s) for s in fed.sites}
    expect = {k: np.zeros(v.shape) for k, v in model().items()}
    for s in fed.sites:
        for k in expect:
            expect[k] += n[s] * fed.trained[(s, 1)][k] / sum(n.values())
    assert close(root.current_model()[1], expect)
    seal = fed.sent_by("root", SecAggSeal)[0]
    assert seal.weight_cap == max(n.values())


def test_uniform_weighting_seals_a_cap_of_one() -> None:
    fed = Fed(5, buffer_size=5, cfg=secagg())
    fed.train()
    fed.drain()
    assert fed.sent_by("root", SecAggSeal)[0].weight_cap == 1


def test_central_dp_noise_is_added_by_the_members_and_recorded_once_per_release() -> None:
    """With [privacy] central DP the root adds nothing: every member adds discrete Gaussian
    noise before masking (the seal asks for it), the step divides by the fixed K, and the
    ledger records the release with the effective z of the survivors' noise (>= z)."""
    privacy = PrivacyConfig(mechanism="central", noise_multiplier=1.0, clip=1.0)
    fed = Fed(5, buffer_size=5, cfg=secagg(min_cohort=3, max_dropout=0.4), privacy=privacy)
    root = fed.nodes["root"]
    assert root.secagg_noise is not None
    sigma, clip, bits, dim = root.secagg_noise
    fed.train()
    fed.drain()
    seal = fed.sent_by("root", SecAggSeal)[0]
    assert seal.noise_sigma == sigma > 0
    assert root.version == 1
    z = effective_noise_multiplier(sigma, 5, clip, bits, dim)
    assert z >= privacy.noise_multiplier
    (release,) = root._dp.ledger.releases
    assert release.version == 1 and release.event == PrivacyEvent(z)
    # The model is the noised mean: close to the plain mean within the noise, not equal.
    plain = applied_step(fed, [(s, 1) for s in fed.sites], 0)
    got = root.current_model()[1]
    err = np.concatenate([np.ravel(np.asarray(got[k], np.float64) - plain[k]) for k in plain])
    noise_sd = np.sqrt(5) * sigma / 2.0**bits / 5  # σ_total in field units, /2^f, /K
    assert 0.0 < np.std(err) < 5 * noise_sd
    assert fed.metric("root", "privacy_epsilon")


def test_region_restarted_mid_cohort_aborts_it_and_forwards_later_cohorts() -> None:
    fed = Fed(5, buffer_size=5, cfg=secagg(min_cohort=3, max_dropout=0.4), region=True)
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "region")  # joins -> seal
    for s in fed.sites:
        fed.flush_link("region", s)  # every site uploads (queued to the region)
    ckpt, records = fed.durable("region")
    for peer in [*fed.sites, "root"]:
        fed.link(peer, "region", False)
    fresh = fed.build_agg({s: "site" for s in fed.sites})
    fresh.restore(ckpt, records)
    fed.nodes["region"] = fresh
    for peer in ["root", *fed.sites]:
        fed.link(peer, "region", True)
    fed.drain()
    assert fed.sent_by("region", Update) == []  # the orphaned cohort was never forwarded
    for s in fed.sites:
        assert fed.nodes[s].pending == 0 and fed.metric(s, "secagg_update_lost")
    fed.train()
    fed.drain()
    assert fed.nodes["root"].version == 1
    (fwd,) = fed.sent_by("region", Update)
    assert sorted(fwd.pairs) == sorted((s, 2) for s in fed.sites)
    no_plain_updates_from_sites(fed)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_dropout_pattern_applies_the_survivors_sum_or_nothing(data: st.DataObject) -> None:
    """Sites drop before uploading (B) or after uploading, before revealing (A): the root
    applies exactly the uploaders' mean when at least t live members remain to sign and
    reveal, else nothing at all (aborted within the deadlines), and acks only what it
    applied."""
    fed = Fed(8, buffer_size=8, cfg=secagg(min_cohort=3))
    root = fed.nodes["root"]
    t = fed.cfg.threshold(8)
    fate = data.draw(st.lists(st.sampled_from(["ok", "before", "after"]), min_size=8, max_size=8))
    before = [s for s, f in zip(fed.sites, fate, strict=True) if f == "before"]
    after = [s for s, f in zip(fed.sites, fate, strict=True) if f == "after"]
    fed.train()
    for s in fed.sites:
        fed.flush_link(s, "root")  # joins: the eighth seals the cohort
    for s in before:
        fed.drop(s)
    for s in fed.sites:
        fed.flush_link("root", s)  # seals: the live sites upload
    for s in fed.sites:
        fed.flush_link(s, "root")  # uploads: the view goes out
    for s in after:
        fed.drop(s)
    fed.drain()
    for _ in range(2):  # the upload deadline, then the view/reveal deadline
        fed.now += fed.cfg.upload_timeout_s + fed.cfg.unmask_timeout_s + 1
        fed.feed("root", Deadline())
        fed.drain()
    uploaders = [s for s in fed.sites if s not in before]
    acked = sorted(a.src for a in fed.sent_by("root", Ack))
    if len(uploaders) - len(after) >= t:
        assert root.version == 1
        assert close(root.current_model()[1], applied_step(fed, [(s, 1) for s in uploaders], 0))
        assert acked == sorted(uploaders)  # the sum holds every upload (A's too)
    else:
        assert root.version == 0 and acked == []
        assert fed.metric("root", "secagg_cohort_aborted")
    no_plain_updates_from_sites(fed)


def test_an_upload_nothing_is_heard_of_is_dropped_after_the_timeouts_never_rejoined() -> None:
    fed = Fed(5, buffer_size=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    site = fed.nodes["site-0"]
    fed.train()
    for s in fed.sites:
        fed.flush_link(s, "root")  # joins -> seal
    fed.flush_link("root", "site-0")  # site-0 uploads; the root never hears of it again
    assert site.secure is not None and site.secure.uploaded(1) and site.pending == 1
    lost_at = fed.now + fed.cfg.upload_timeout_s + 2 * fed.cfg.unmask_timeout_s
    fed.now = lost_at - 1
    fed.feed("site-0", Deadline())
    assert site.pending == 1  # not yet
    deadline = site.next_deadline()
    assert deadline is not None and deadline <= lost_at
    fed.now = lost_at
    mark = len(fed.effects)
    fed.feed("site-0", Deadline())
    assert site.pending == 0 and not site.secure.uploaded(1)
    assert [labels(m) for m in fed.metric("site-0", "secagg_update_lost")] == [
        {"reason": "no_outcome"}
    ]
    fed.link("site-0", "root", False)
    fed.link("site-0", "root", True)  # a reconnect resends nothing of it
    sent = [e.msg for n, e in fed.effects[mark:] if n == "site-0" and isinstance(e, Send)]
    assert not [m for m in sent if isinstance(m, SecAggJoin | MaskedUpdate | Update)]


def test_a_flood_of_unasked_stale_joins_writes_at_most_the_sites_share() -> None:
    fed = Fed(5, buffer_size=5, cfg=secagg(min_cohort=3, max_dropout=0.4))
    root = fed.nodes["root"]
    for _ in range(3):  # three versions, so that base version 0 is stale below
        fed.train()
        fed.drain()
    assert root.version == 3
    root.max_staleness = 1
    writes = 0
    for seq in range(100, 160):
        out = root.handle(Received("site-0", SecAggJoin("site-0", seq, 0)), fed.now)
        writes += sum(1 for e in out if isinstance(e, Persist))
    assert 1 <= writes <= 5  # ⌈K / active children⌉ at most, not 60
    assert root.dropped >= 55
