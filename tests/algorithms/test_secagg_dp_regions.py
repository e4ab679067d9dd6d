"""Central DP on a hierarchical plan with secure regions (issue 12).

root (FedBuff, buffer_size 1, [privacy]) <- region (secure cohorts of N = 5) <- 5 sites.
The sites clip and noise inside the region's cohort (σ_member in the region's seal; each
site refuses a seal with less noise than its own [privacy] z asks); the region forwards the
cohort's noised sum; the root adds nothing, divides by the fixed N and records one release
per version at z. Built through the factory both drivers use, driven by hand (no network).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.dp.ledger import PrivacyEvent
from fedloom.algorithms.dp.release import PrivacyConfig, member_noise_sigma
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Weights
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.federation.secagg_params import SecureAggregationConfig
from fedloom.transport.wire import MaskedUpdate, SecAggSeal, Update
from tests.algorithms.alg_helpers import MiniNet, model
from tests.algorithms.test_secagg_nodes import TRAINING, Fed, examples

N = 5  # the region's cohort: every site
D = 8  # the helper model's coordinates


def central(z: float = 1.0, **kw: Any) -> PrivacyConfig:
    return PrivacyConfig(mechanism="central", noise_multiplier=z, clip=1.0, **kw)


def cfg(**kw: Any) -> SecureAggregationConfig:
    base: dict[str, Any] = {
        "enabled": True,
        "min_cohort": 3,
        "cohort_size": N,
        "max_dropout": 0.2,  # t = 4 of 5 with max_colluders = 1
        "precision_bits": 16,
    }
    return SecureAggregationConfig(**{**base, **kw})


ROOT_P = AlgorithmConfig(buffer_size=1, concurrency=1)
REGION_P = AlgorithmConfig(buffer_size=N, concurrency=N)


def uniform_delta(node: str, seq: int) -> Weights:
    """Site k's delta: 0.3 + 0.001·k on every coordinate (any seq): sums are easy to check."""
    k = int(node.split("-")[1])
    return {n: np.full(v.shape, 0.3 + 0.001 * k, v.dtype) for n, v in model().items()}


class HierFed(Fed):
    """root <- region <- sites, each with its own [privacy] (None: that node has none)."""

    def __init__(
        self,
        *,
        root_privacy: PrivacyConfig | None,
        region_privacy: PrivacyConfig | None,
        site_privacy: PrivacyConfig | None,
    ) -> None:
        self.sites = [f"site-{i}" for i in range(N)]
        self.agg = "region"
        self.keys = derived_secagg_keys(["root", "region", *self.sites], seed=7)
        self.cfg = cfg()
        self.p = REGION_P
        self.privacy = region_privacy
        self.root_privacy = root_privacy
        self.site_privacy = site_privacy
        nodes: dict[str, Any] = {"root": self.build_root()}
        nodes["region"] = build_node(
            "region",
            "region",
            "fedbuff",
            REGION_P,
            TRAINING,
            Neighbours(
                parent="root", parent_role="root", children=dict.fromkeys(self.sites, "site")
            ),
            seed=0,
            secagg=self.cfg,
            secagg_keys=self.keys["region"],
            privacy=region_privacy,
        )
        for s in self.sites:
            nodes[s] = self.build_site(s)
        MiniNet.__init__(self, nodes)
        self.trained: dict[tuple[str, int], Weights] = {}
        self.link("region", "root", True)
        for s in self.sites:
            self.link(s, "region", True)
        self.drain()

    @property
    def root(self) -> FedBuffAggregator:
        node = self.nodes["root"]
        assert isinstance(node, FedBuffAggregator)
        return node

    def build_root(self) -> FedBuffAggregator:
        node = build_node(
            "root",
            "root",
            "fedbuff",
            ROOT_P,
            TRAINING,
            Neighbours(children={"region": "region"}),
            seed=0,
            weights=model(0.0),
            secagg=self.cfg,
            secagg_keys=self.keys["root"],
            privacy=self.root_privacy,
        )
        assert isinstance(node, FedBuffAggregator)
        return node

    def build_site(self, s: str) -> SiteNode:
        node = build_node(
            "site",
            s,
            "fedbuff",
            REGION_P,
            TRAINING,
            Neighbours(parent="region", parent_role="region"),
            seed=0,
            n_examples=examples(s),
            secagg=self.cfg,
            secagg_keys=self.keys[s],
            privacy=self.site_privacy,
        )
        assert isinstance(node, SiteNode)
        return node

    def train(self, sites: Any = None) -> None:
        """Each site's delta: 0.3 on every coordinate (norm 0.85 < clip 1) plus a little
        of its own, so ÷N and ÷|U| are far apart next to the noise."""
        chosen = set(self.sites if sites is None else sites)
        self.finish_jobs_of(chosen, uniform_delta, examples, self.trained)

    def restart_root(self) -> FedBuffAggregator:
        ckpt, records = self.durable("root")
        self.link("region", "root", False)
        fresh = self.build_root()
        fresh.restore(ckpt, records)
        self.nodes["root"] = fresh
        self.link("region", "root", True)
        return fresh


def flat(w: Weights) -> np.ndarray[Any, Any]:
    return np.concatenate([np.ravel(np.asarray(w[k], np.float64)) for k in sorted(w)])


def private(z: float = 0.1, **kw: Any) -> HierFed:
    p = central(z, **kw)
    return HierFed(root_privacy=p, region_privacy=central(z), site_privacy=central(z))


def test_the_root_releases_each_region_cohorts_noised_sum_over_n() -> None:
    """The region seals with σ_member for its cohort (weight_cap 1); one site drops after
    the seal; the region forwards the four survivors' noised sum; the root's version is
    Σ x_i / N (not / 4) within the members' noise, and its ledger holds exactly one
    release of z for that version."""
    fed = private(0.1)
    region = fed.nodes["region"]
    assert isinstance(region, RegionalAggregator)
    t = fed.cfg.threshold(fed.cfg.threshold(N))  # t_min: the smallest cohort's threshold
    sigma = member_noise_sigma(0.1, 1.0, 16, D, t)
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "region")  # joins: the fifth seals the cohort
    fed.drop("site-0")  # its seal and upload are lost
    fed.drain()
    seal = fed.sent_by("region", SecAggSeal)[0]
    assert seal.weight_cap == 1 and seal.noise_sigma == sigma
    (fwd,) = fed.sent_by("region", Update)
    assert fwd.count == 4
    root = fed.root
    assert root.version == 1
    survivors = fed.sites[1:]
    total = sum(flat(fed.trained[(s, 1)]) for s in survivors)
    got = flat(root.current_model()[1])
    noise_sd = np.sqrt(4) * sigma / 2.0**16 / N
    assert abs(np.mean(got - total / N)) < 3 * noise_sd
    assert abs(np.mean(got - total / 4)) > 0.05
    assert 0.2 * noise_sd < np.std(got - total / N) < 3 * noise_sd
    dp = root._dp
    assert dp is not None
    assert [(r.version, r.event) for r in dp.ledger.releases] == [(1, PrivacyEvent(0.1))]
    assert fed.metric("root", "privacy_epsilon")
    for s in fed.sites:
        assert fed.sent_by(s, Update) == []


def test_sites_refuse_a_region_that_asks_for_less_noise() -> None:
    """A region that got no [privacy] (or lies about it) seals with no noise: every site,
    whose own [privacy] asks z, refuses the seal (noise_too_low) and uploads nothing, so
    the root never sees an un-noised sum and releases nothing."""
    fed = HierFed(root_privacy=central(1.0), region_privacy=None, site_privacy=central(1.0))
    fed.train()
    fed.drain()
    seals = fed.sent_by("region", SecAggSeal)
    assert seals and seals[0].noise_sigma == 0.0
    for s in fed.sites:
        assert fed.sent_by(s, MaskedUpdate) == []
        reasons = [(m.labels or {}).get("reason") for m in fed.metric(s, "secagg_refused")]
        assert "noise_too_low" in reasons
    assert fed.sent_by("region", Update) == []
    assert fed.root.version == 0


def test_a_region_with_a_smaller_z_is_refused_by_sites_asking_more() -> None:
    fed = HierFed(root_privacy=central(1.0), region_privacy=central(0.5), site_privacy=central(1.0))
    fed.train()
    fed.drain()
    assert fed.sent_by("region", SecAggSeal)[0].noise_sigma > 0
    assert all(fed.sent_by(s, MaskedUpdate) == [] for s in fed.sites)
    assert fed.root.version == 0


def test_the_budget_stops_the_root_and_survives_a_restart() -> None:
    from fedloom.algorithms.dp.ledger import PrivacyLedger

    ledger = PrivacyLedger("rdp")
    for v in (1, 2):
        ledger.record(v, PrivacyEvent(1.0))
    two = ledger.epsilon(1e-5)
    ledger.record(3, PrivacyEvent(1.0))
    budget = (two + ledger.epsilon(1e-5)) / 2
    fed = private(1.0, epsilon_budget=budget)
    for _ in range(4):
        fed.train()
        fed.drain()
    root = fed.root
    assert root.version == 2
    dp = root._dp
    assert dp is not None and dp.exhausted
    releases = dp.ledger.releases
    assert [(r.version, r.event) for r in releases] == [
        (1, PrivacyEvent(1.0)),
        (2, PrivacyEvent(1.0)),
    ]
    assert dp.ledger.epsilon(1e-5) <= budget
    assert fed.metric("root", "privacy_budget_exhausted")
    fresh = fed.restart_root()
    fed.drain()
    assert fresh.version == 2
    assert fresh._dp is not None and fresh._dp.exhausted
    assert fresh._dp.ledger.releases == releases


def build_root(children: dict[str, str], p: AlgorithmConfig, **kw: Any) -> Any:
    keys = derived_secagg_keys(["root", *children], seed=1)
    return build_node(
        "root",
        "root",
        kw.pop("algorithm", "fedbuff"),
        p,
        TRAINING,
        Neighbours(children=children),
        seed=0,
        weights=model(0.0),
        secagg_keys=keys["root"],
        privacy=central(1.0),
        **kw,
    )


@pytest.mark.parametrize(
    ("children", "p", "secagg_cfg", "match"),
    [
        ({"r": "region"}, ROOT_P, None, r"secure aggregation in the regions"),
        ({"r": "region"}, ROOT_P, SecureAggregationConfig(), r"secure aggregation in the regions"),
        ({"r": "region"}, replace(ROOT_P, buffer_size=2), cfg(), r"buffer_size = 2"),
        ({"r": "region"}, ROOT_P, cfg(cohort_size=0), r"cohort_size"),
        ({"r": "region", "s": "site"}, ROOT_P, cfg(), r"every child of the root"),
        ({"r": "region"}, ROOT_P, cfg(clip=0.5), r"privacy\.clip = 1.*secure_aggregation\.clip"),
    ],
)
def test_plans_central_dp_cannot_run_on_over_regions_are_config_errors(
    children: dict[str, str], p: AlgorithmConfig, secagg_cfg: Any, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        build_root(children, p, secagg=secagg_cfg)


@pytest.mark.parametrize("role", ["region", "site"])
def test_a_region_or_site_privacy_needs_secure_aggregation(role: str) -> None:
    keys = derived_secagg_keys(["root", "region", "site-0"], seed=1)
    neighbours = (
        Neighbours(parent="root", parent_role="root", children={"site-0": "site"})
        if role == "region"
        else Neighbours(parent="region", parent_role="region")
    )
    with pytest.raises(ConfigError, match=r"needs \[secure_aggregation\]"):
        build_node(
            role,
            "region" if role == "region" else "site-0",
            "fedbuff",
            REGION_P,
            TRAINING,
            neighbours,
            seed=0,
            secagg_keys=keys["region"],
            privacy=central(1.0),
        )
    with pytest.raises(ConfigError, match=r"privacy\.clip = 1.*secure_aggregation\.clip"):
        build_node(
            role,
            "region" if role == "region" else "site-0",
            "fedbuff",
            REGION_P,
            TRAINING,
            neighbours,
            seed=0,
            secagg=cfg(clip=0.5),
            secagg_keys=keys["region"],
            privacy=central(1.0),
        )


def test_a_simulated_hierarchical_arm_records_one_release_per_region_cohort() -> None:
    """The simulator (same factory, nodes and cryptography): two secure regions of six
    sites under a FedBuff root with [privacy]; every completed region cohort is one
    release, and ε is the accountant's over exactly those releases at z."""
    from fedloom.sim.dp_calibration import epsilon_after
    from fedloom.sim.runner import run_scenario
    from fedloom.sim.scenario import parse_scenario
    from tests.sim.test_privacy_scenarios import scenario

    arm = {
        "name": "hier-dp",
        "algorithm": "fedbuff",
        "topology": "hierarchical",
        "buffer_size": 4,
        "root_buffer_size": 1,
        "secure_aggregation": {
            "enabled": True,
            "min_cohort": 3,
            "max_dropout": 0.25,
            "clip": 1.0,
            "cohort_size": 4,
        },
        "privacy": {"mechanism": "central", "noise_multiplier": 2.0, "clip": 1.0},
    }
    raw = scenario(
        [arm],
        sites={"count": 12, "regions": ["a", "b"]},
        algorithm={"concurrency": 10, "weighting": "uniform"},
        duration_h=0.5,
    )
    extra = run_scenario(parse_scenario(raw)).arms[0].extra
    releases = int(extra["dp_releases"])
    assert releases > 0 and releases == int(extra["secagg_cohorts_completed"])
    assert float(extra["dp_epsilon"]) == pytest.approx(epsilon_after(2.0, 1e-5, releases, None))
