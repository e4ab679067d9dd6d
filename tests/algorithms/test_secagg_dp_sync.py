"""Central DP + secure aggregation on a synchronous FedAvg/FedProx root (issue 12).

The round's cohort is masked AND noised by its members (discrete Gaussian, σ_member in
the seal): the root weighs every member 1 (the seal's weight_cap), divides the survivors'
sum by the fixed K = clients_per_round, checks the budget before the release and records
it with the effective z of the |U| members' noise at the round's sampling rate q. Driven
through the factory both drivers use (``SyncFed`` of the secure sync tests), no network.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.dp.ledger import PrivacyEvent, PrivacyLedger
from fedloom.algorithms.dp.release import (
    PrivacyConfig,
    effective_noise_multiplier,
    member_noise_sigma,
)
from fedloom.algorithms.protocol import Deadline, Weights
from fedloom.algorithms.sync import SyncAggregator
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.secagg_params import SecureAggregationConfig
from fedloom.transport.wire import SecAggSeal, TrainRequest
from tests.algorithms.alg_helpers import model
from tests.algorithms.test_secagg_dp_regions import uniform_delta
from tests.algorithms.test_secagg_sync import (
    ROUND_S,
    TRAINING,
    SyncFed,
    examples,
    no_plain_updates_from_sites,
    secagg,
)

D = 8  # the helper model's coordinates


def central(z: float = 1.0, **kw: Any) -> PrivacyConfig:
    return PrivacyConfig(mechanism="central", noise_multiplier=z, clip=1.0, **kw)


class DpSyncFed(SyncFed):
    """A secure sync root with [privacy] and its sites. Each site's delta is 0.3 on every
    coordinate (norm 0.85 < clip 1) plus a small per-site part, so the mean (÷|U|) and the
    fixed-denominator mean (÷K) are far apart next to the noise."""

    def __init__(self, n_sites: int, *, k: int, privacy: PrivacyConfig, **kw: Any) -> None:
        self.privacy = privacy
        super().__init__(n_sites, k=k, cfg=secagg(min_cohort=3), **kw)

    def build_root(self) -> SyncAggregator:
        node = build_node(
            "root",
            "root",
            self.algorithm,
            # Central DP's own checks: the privacy clip bounds updates, uniform weighting.
            replace(self.p, clip_norm="auto", weighting="uniform"),
            TRAINING,
            Neighbours(children=dict.fromkeys(self.sites, "site")),
            seed=0,
            weights=model(0.0),
            secagg=self.cfg,
            secagg_keys=self.keys["root"],
            privacy=self.privacy,
        )
        assert isinstance(node, SyncAggregator)
        return node

    def train(self, sites: Any = None) -> None:
        chosen = set(self.busy() if sites is None else sites)
        self.finish_jobs_of(chosen, uniform_delta, examples, self.trained)


def flat(w: Weights) -> np.ndarray[Any, Any]:
    return np.concatenate([np.ravel(np.asarray(w[k], np.float64)) for k in sorted(w)])


def eff_z(fed: DpSyncFed, survivors: int) -> float:
    noise = fed.root.secagg_noise
    assert noise is not None
    sigma, clip, bits, dim = noise
    return effective_noise_multiplier(sigma, survivors, clip, bits, dim)


def test_each_round_releases_the_members_noised_sum_over_k_with_its_own_q() -> None:
    """Six sites, K = 5: the seal asks every member to weigh 1 and add σ_member; the root
    steps by Σ x_i / K within the noise, adding none itself; the ledger holds one release
    per version, with the effective z of the five members' noise and the q of the round's
    own draw (round 1 opened when 5 sites were idle: q = 1; round 2 drew 5 of 6)."""
    privacy = central(0.1)
    fed = DpSyncFed(6, k=5, privacy=privacy)
    root = fed.root
    noise = root.secagg_noise
    assert noise is not None
    sigma, clip, bits, dim = noise
    t = fed.cfg.threshold(5)
    assert (clip, dim) == (1.0, D)
    assert sigma == member_noise_sigma(0.1, 1.0, bits, D, t)
    for r in (1, 2):
        before = flat(root.current_model()[1])
        mark = len(fed.effects)
        fed.train()
        fed.drain()
        seal = fed.sent_by("root", SecAggSeal, since=mark)[0]
        assert seal.weight_cap == 1 and seal.noise_sigma == sigma
        assert root.version == r
        total = sum(flat(fed.trained[(s, fed.nodes[s].seq)]) for s in seal.members)
        err = flat(root.current_model()[1]) - before - total / 5
        noise_sd = np.sqrt(5) * sigma / 2.0**bits / 5  # σ_total in model units, ÷K
        assert 0.2 * noise_sd < np.std(err) < 3 * noise_sd
    releases = root._dp.ledger.releases  # type: ignore[union-attr]
    z = eff_z(fed, 5)
    assert z >= privacy.noise_multiplier
    assert [(r.version, r.event) for r in releases] == [
        (1, PrivacyEvent(z, None)),
        (2, PrivacyEvent(z, 5 / 6)),
    ]
    assert [m.value for m in fed.metric("root", "model_version")] == [1.0, 2.0]
    no_plain_updates_from_sites(fed)


def test_dropouts_divide_by_k_and_record_the_survivors_effective_z() -> None:
    privacy = central(0.1)
    fed = DpSyncFed(5, k=5, privacy=privacy)
    root = fed.root
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # joins: the fifth seals the cohort
    gone = fed.sites[0]
    fed.link(gone, "root", False)  # its seal and upload are lost
    fed.drain()
    survivors = fed.sites[1:]
    assert root.version == 1
    total = sum(flat(fed.trained[(s, 1)]) for s in survivors)
    got = flat(root.current_model()[1])
    # ÷K = 5: about 0.24 per coordinate; ÷|U| = 4 would be about 0.30.
    assert abs(np.mean(got - total / 5)) < 0.01
    assert abs(np.mean(got - total / 4)) > 0.05
    (release,) = root._dp.ledger.releases  # type: ignore[union-attr]
    assert release.event == PrivacyEvent(eff_z(fed, 4), None)  # all 5 sites drawn: q = 1
    assert eff_z(fed, 4) < eff_z(fed, 5)


def eps(delta: float, *events: PrivacyEvent) -> float:
    ledger = PrivacyLedger("rdp")
    for v, e in enumerate(events, 1):
        ledger.record(v, e)
    return ledger.epsilon(delta)


def budget_for_two(fed: DpSyncFed, delta: float) -> float:
    """A budget that admits exactly two releases of five survivors: round 1 at q = 1,
    then rounds at q = 5/6 (a round's opening check counts the nominal z, the worst case:
    a cohort of t members)."""
    first, eff, nominal = (
        PrivacyEvent(eff_z(fed, 5), None),
        PrivacyEvent(eff_z(fed, 5), 5 / 6),
        PrivacyEvent(1.0, 5 / 6),
    )
    # Round 2 opens (nominal) and releases (eff); round 3's opening check (nominal) fails.
    low, high = eps(delta, first, nominal), eps(delta, first, eff, nominal)
    assert eps(delta, first, eff) <= low < high
    return (low + high) / 2


def test_the_budget_stops_the_rounds_and_survives_a_restart() -> None:
    probe = DpSyncFed(6, k=5, privacy=central(1.0))
    budget = budget_for_two(probe, 1e-5)
    fed = DpSyncFed(6, k=5, privacy=central(1.0, epsilon_budget=budget))
    for _ in range(4):
        fed.train()
        fed.drain()
    fed.now += ROUND_S + 1
    fed.feed("root", Deadline())
    fed.drain()
    root = fed.root
    assert root.version == 2 and root.rounds_closed == 2
    dp = root._dp
    assert dp is not None and dp.exhausted
    releases = dp.ledger.releases
    assert [r.version for r in releases] == [1, 2]
    assert [r.event.q for r in releases] == [None, 5 / 6]
    assert all(r.event.z == eff_z(fed, 5) for r in releases)
    assert dp.ledger.epsilon(1e-5) <= budget
    assert fed.metric("root", "privacy_budget_exhausted")
    assert not [m for m in fed.sent_by("root", TrainRequest) if m.version == 2]
    # Restarted from its own durable state (no checkpoint yet: the cohort records are
    # replayed, each with its round's q): the same ledger, still stopped, nothing sent.
    mark = len(fed.effects)
    fresh = fed.restart_root()
    fed.drain()
    fed.now += ROUND_S + 1
    fed.feed("root", Deadline())
    fed.drain()
    assert fresh._dp is not None and fresh._dp.exhausted
    assert fresh._dp.ledger.releases == releases
    assert fresh.version == 2
    assert not fed.sent_by("root", TrainRequest, since=mark)
    no_plain_updates_from_sites(fed)


def test_restarts_rebuild_the_exact_ledger_and_the_rounds_go_on() -> None:
    """The root restarts (no checkpoint yet: every cohort record is replayed, each with
    its own round's q, while the restored round's nominal q is 5/6) and goes on; a second
    restart rebuilds the same ledger, release for release."""
    fed = DpSyncFed(6, k=5, privacy=central(1.0))
    fed.train()
    fed.drain()
    before = fed.root._dp.ledger.releases  # type: ignore[union-attr]
    assert [r.event.q for r in before] == [None]
    fresh = fed.restart_root()
    assert fresh._dp is not None and fresh._dp.ledger.releases == before
    fed.drain()
    for _ in range(2):
        fed.train()
        fed.drain()
    assert fed.root.version == 3
    releases = fresh._dp.ledger.releases
    assert [(r.version, r.event.q) for r in releases] == [(1, None), (2, 5 / 6), (3, 5 / 6)]
    again = fed.restart_root()
    assert again._dp is not None and again._dp.ledger.releases == releases
    assert again._dp.ledger.epsilon(1e-5) == pytest.approx(fresh._dp.ledger.epsilon(1e-5))


def test_privacy_and_secure_aggregation_clips_must_agree() -> None:
    sites = {f"site-{i}": "site" for i in range(6)}
    from fedloom.federation.params import AlgorithmConfig
    from fedloom.federation.secagg_keys import derived_secagg_keys

    keys = derived_secagg_keys(["root", *sites], 0)
    for algorithm in ("fedavg", "fedbuff"):
        with pytest.raises(ConfigError, match=r"privacy\.clip = 0\.5.*secure_aggregation\.clip"):
            build_node(
                "root",
                "root",
                algorithm,
                AlgorithmConfig(clients_per_round=6, over_selection=1.0, buffer_size=6),
                TRAINING,
                Neighbours(children=sites),
                seed=0,
                weights=model(0.0),
                secagg=SecureAggregationConfig(enabled=True, min_cohort=3, clip=1.0),
                secagg_keys=keys["root"],
                privacy=PrivacyConfig(mechanism="central", noise_multiplier=1.0, clip=0.5),
            )
