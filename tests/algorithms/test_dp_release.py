"""Central DP at the root (algorithms.dp.release, FedBuff and FedAvg roots from the factory):
calibrated noise on the sum of clipped contributions over a fixed denominator, the ledger
persisted with the model, and a budget that stops releases and dispatch, across restarts."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.dp.gaussian import add_gaussian, clip_contribution
from fedloom.algorithms.dp.ledger import PrivacyEvent, PrivacyLedger
from fedloom.algorithms.dp.release import (
    DpRelease,
    PrivacyConfig,
    effective_noise_multiplier,
    member_noise_sigma,
)
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Effect, Log, LogRecords, Persist
from fedloom.algorithms.sync import SyncAggregator
from fedloom.algorithms.weights_math import l2_norm
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.transport.wire import TrainRequest, Update
from tests.algorithms.alg_helpers import hello, metrics, model, recv, requests

TRAINING = TrainingConfig(lr=0.1, local_steps=1, batch_size=4, mu=0.0)
SITES = {f"s{i}": "site" for i in range(4)}
DELTA = 1e-5


def central(**kw: Any) -> PrivacyConfig:
    args: dict[str, Any] = {"mechanism": "central", "noise_multiplier": 1.0, "clip": 1.0}
    args.update(kw)
    return PrivacyConfig(**args)


def budget_for(releases: int, event: PrivacyEvent) -> float:
    """A budget that allows exactly ``releases`` releases of ``event``."""
    ledger = PrivacyLedger()
    now = ledger.epsilon_if(event, DELTA, releases)
    after = ledger.epsilon_if(event, DELTA, releases + 1)
    return (now + after) / 2


def fedbuff_root(privacy: PrivacyConfig, *, key: int = 1, **p: Any) -> FedBuffAggregator:
    params = AlgorithmConfig(buffer_size=2, concurrency=2, **p)
    node = build_node(
        "root",
        "root",
        "fedbuff",
        params,
        TRAINING,
        Neighbours(children=SITES),
        seed=0,
        weights=model(0.0),
        privacy=privacy,
        noise_key=key,
    )
    assert isinstance(node, FedBuffAggregator)
    return node


def answer(
    root: Any, effects: list[Effect], seqs: dict[str, int], log: list[Persist], limit: int = 40
) -> list[Effect]:
    """Answer every TrainRequest in ``effects`` with a delta of norm 3 (clipped to 1),
    recording the Persists; follow-up requests are answered too (``limit`` in all)."""
    pending = list(requests(effects))
    seen: list[Effect] = []
    while pending and limit > 0:
        limit -= 1
        site, req = pending.pop(0)
        seqs[site] = seqs.get(site, 0) + 1
        delta = {
            k: np.full(v.shape, 3.0 / math.sqrt(8), dtype=np.float32) for k, v in model().items()
        }
        msg = Update(site, seqs[site], req.version, delta, 10, 1, req.task)
        out = root.handle(recv(site, msg), 1.0)
        log.extend(e for e in out if isinstance(e, Persist))
        seen.extend(out)
        pending.extend(requests(out))
    return seen


def start(root: Any, log: list[Persist]) -> list[Effect]:
    log.append(Persist("checkpoint", root.snapshot()))  # what a daemon writes at start
    out: list[Effect] = []
    for s in root.children:
        out.extend(root.handle(hello(s), 0.0))
    return out


def restored(log: list[Persist], make: Any) -> Any:
    cps = [p.data for p in log if p.key == "checkpoint"]
    logs: dict[str, list[Any]] = {}
    for p in log:
        if p.append:
            logs.setdefault(p.key, []).append(p.data)
    node = make()
    node.restore(cps[-1], LogRecords(logs))
    return node


def test_noise_is_calibrated_to_z_clip_over_the_fixed_denominator() -> None:
    dp = DpRelease(central(noise_multiplier=1.5, clip=2.0), denominator=4, noise_key=9)
    template = {"w": np.zeros((300, 300), dtype=np.float32)}
    zero = {"w": np.zeros((300, 300), dtype=np.float32)}
    out: list[Effect] = []
    got = dp.noised_mean([("a", zero, 1.0)], template, 1, out)
    assert got["w"].dtype == np.float32
    assert float(np.std(got["w"])) == pytest.approx(1.5 * 2.0 / 4, rel=0.01)
    # Another version: other noise; the same version: the same noise (a replay).
    again = dp.noised_mean([("a", zero, 1.0)], template, 1, out)
    other = dp.noised_mean([("a", zero, 1.0)], template, 2, out)
    assert np.array_equal(got["w"], again["w"])
    assert not np.array_equal(got["w"], other["w"])


def test_each_sites_total_is_clipped_once_and_staleness_scales_it() -> None:
    dp = DpRelease(central(noise_multiplier=0.1, clip=1.0), denominator=5, noise_key=3)
    template = {"w": np.zeros(4, dtype=np.float32)}
    big = {"w": np.array([10.0, 0.0, 0.0, 0.0], dtype=np.float32)}
    small = {"w": np.array([0.0, 0.5, 0.0, 0.0], dtype=np.float32)}
    out: list[Effect] = []
    # Site a sends two big updates (a fast site filling two slots): its TOTAL is clipped
    # to 1, not each; b's small update passes whole, discounted by its staleness 0.5.
    got = dp.noised_mean([("a", big, 1.0), ("a", big, 1.0), ("b", small, 0.5)], template, 1, out)
    # The sum that was noised: [1, 0.25, 0, 0] (computed as the release does, bit for bit),
    # plus the noise of version 1 over that sum (the smallest z is 0.1: not negligible).
    a_total, _ = clip_contribution({"w": big["w"].astype(np.float64) * 2.0}, 1.0)
    total = {"w": np.zeros(4) + a_total["w"] + small["w"].astype(np.float64) * 0.5}
    assert np.allclose(total["w"], [1.0, 0.25, 0.0, 0.0])
    want = add_gaussian(total, 0.1 * 1.0, dp._noise_rng(1, total))["w"] / 5
    assert np.allclose(got["w"], want.astype(np.float32), atol=1e-6)
    assert metrics(out, "privacy_clipped")[0].value == 1.0
    with pytest.raises(ValueError, match="staleness"):
        dp.noised_mean([("a", small, 1.5)], template, 1, out)


def test_secure_aggregation_noise_scale_round_trips() -> None:
    sigma = member_noise_sigma(1.2, 0.5, 16, 10_000, 7)
    assert effective_noise_multiplier(sigma, 7, 0.5, 16, 10_000) == pytest.approx(1.2)
    # More surviving members than the threshold: more noise, a larger effective z.
    assert effective_noise_multiplier(sigma, 9, 0.5, 16, 10_000) > 1.2


def test_fedbuff_releases_noised_means_and_records_each_version() -> None:
    root = fedbuff_root(central())
    log: list[Persist] = []
    answer(root, start(root, log), {}, log)
    # Without a budget it never stops: requests answered, versions released.
    assert root.version >= 1
    assert [r.version for r in root._dp.ledger.releases] == list(range(1, root.version + 1))  # type: ignore[union-attr]
    assert all(r.q is None and r.z == 1.0 for r in root._dp.ledger.releases)  # type: ignore[union-attr]
    # Every update had norm 3, clipped to 1, two per version: without noise the model would
    # move by exactly 1 per version in norm; the noise (σ = 1/2 per coordinate) changes it.
    w = root.current_model()[1]
    plain = float(root.version)
    assert abs(l2_norm(w) - plain) > 1e-3


def test_budget_stops_releases_and_dispatch_and_survives_a_restart() -> None:
    privacy = central(epsilon_budget=budget_for(3, PrivacyEvent(1.0)))
    root = fedbuff_root(privacy)
    log: list[Persist] = []
    out = start(root, log)
    out += answer(root, out, {}, log)
    assert root.version == 3  # the budget allowed three releases, then no further task
    assert root.in_flight == 0
    dp = root._dp
    assert dp is not None and dp.exhausted
    eps = dp.ledger.epsilon(DELTA)
    assert eps <= privacy.epsilon_budget  # type: ignore[operator]

    # It said so once, as it happened; later events send no task and say nothing more.
    later = root.handle(hello("s0"), 2.0) + root.handle(hello("s1"), 2.0)
    warned = [e for e in out + later if isinstance(e, Log) and "budget exhausted" in e.text]
    assert len(warned) == 1 and not requests(later)
    assert len(metrics(out + later, "privacy_budget_exhausted")) == 1

    # Restart from the start checkpoint and the log, with ANOTHER noise key (a daemon
    # draws a fresh one): the checkpointed key wins, models and ledger come back exactly.
    back = restored(log, lambda: fedbuff_root(privacy, key=777))
    assert back.version == 3
    for k, v in root.current_model()[1].items():
        assert np.array_equal(back.current_model()[1][k], v)
    assert back._dp is not None
    assert back._dp.ledger.to_records() == dp.ledger.to_records()
    assert back._dp.ledger.epsilon(DELTA) == eps
    assert back._dp.exhausted
    after = [e for s in SITES for e in back.handle(hello(s), 5.0)]
    assert not requests(after)
    assert [e for e in after if isinstance(e, Log) and "budget exhausted" in e.text]
    gauges = metrics(after, "privacy_epsilon")
    assert gauges and gauges[0].value == eps


def test_a_restart_mid_run_recovers_the_exact_ledger_and_goes_on() -> None:
    root = fedbuff_root(central(epsilon_budget=budget_for(6, PrivacyEvent(1.0))))
    log: list[Persist] = []
    out = start(root, log)
    # Answer only the first few requests, then "crash".
    pending = requests(out)
    seqs: dict[str, int] = {}
    partial: list[Effect] = []
    for site, req in pending[:2]:
        seqs[site] = 1
        delta = {k: np.full(v.shape, 0.2, dtype=np.float32) for k, v in model().items()}
        partial += root.handle(
            recv(site, Update(site, 1, req.version, delta, 10, 1, req.task)), 1.0
        )
    log.extend(e for e in partial if isinstance(e, Persist))
    assert root.version == 1
    back = restored(
        log, lambda: fedbuff_root(central(epsilon_budget=budget_for(6, PrivacyEvent(1.0))), key=5)
    )
    assert back.version == 1
    assert back._dp.ledger.to_records() == root._dp.ledger.to_records()  # type: ignore[union-attr]
    for k, v in root.current_model()[1].items():
        assert np.array_equal(back.current_model()[1][k], v)
    # It goes on until its budget: six releases in all.
    answer(back, [e for s in SITES for e in back.handle(hello(s), 2.0)], seqs, [])
    assert back.version == 6 and back._dp.exhausted  # type: ignore[union-attr]


def test_a_root_that_published_without_dp_cannot_start_accounting() -> None:
    plain = fedbuff_root(None)  # type: ignore[arg-type]
    log: list[Persist] = []
    answer(plain, start(plain, log), {}, log)
    state = plain.snapshot()
    assert state["version"] > 0 and "privacy" not in state
    with pytest.raises(ValueError, match="without differential privacy"):
        fedbuff_root(central()).restore(state)


def sync_root(privacy: PrivacyConfig, sites: int = 10, quorum: int | str = "all") -> SyncAggregator:
    """A FedAvg root drawing 3 of its sites a round, the first round once ``quorum`` are up
    (else it would start with the first 3 that say Hello: a draw of 3 of 3, q = 1)."""
    children = {f"s{i}": "site" for i in range(sites)}
    params = AlgorithmConfig(
        clients_per_round=3, over_selection=1.0, min_cohort=2, start_quorum=quorum
    )
    node = build_node(
        "root",
        "root",
        "fedavg",
        params,
        TRAINING,
        Neighbours(children=children),
        seed=0,
        weights=model(0.0),
        privacy=privacy,
        noise_key=11,
    )
    assert isinstance(node, SyncAggregator)
    return node


def test_sync_rounds_record_their_sampling_rate_and_stop_at_the_budget() -> None:
    q = 3 / 10
    privacy = central(noise_multiplier=0.9, epsilon_budget=budget_for(4, PrivacyEvent(0.9, q)))
    root = sync_root(privacy)
    log: list[Persist] = []
    answer(root, start(root, log), {}, log)
    dp = root._dp
    assert dp is not None
    assert root.version == 4 and dp.exhausted and root.in_flight == 0
    assert [(r.version, r.q) for r in dp.ledger.releases] == [(v, q) for v in range(1, 5)]
    # The round's fixed cohort is the denominator, and restarting keeps it all.
    assert dp.denominator == 3
    back = restored(log, lambda: sync_root(privacy))
    assert back.version == 4
    assert back._dp.ledger.to_records() == dp.ledger.to_records()  # type: ignore[union-attr]
    assert not requests([e for s in back.children for e in back.handle(hello(s), 9.0)])


def test_sync_round_samples_only_the_idle_sites() -> None:
    root = sync_root(central(), sites=10, quorum=6)
    out: list[Effect] = []
    for s in ["s0", "s1", "s2", "s3", "s4", "s5"]:  # six sites up: q = 3/6
        out += root.handle(hello(s), 0.0)
    reqs = [r for _, r in requests(out) if isinstance(r, TrainRequest)]
    assert len(reqs) == 3
    assert root._dp is not None and root._dp.pending_q == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("algorithm", "children", "params", "match"),
    [
        ("fedbuff", SITES, {"weighting": "examples"}, "weighting"),
        ("fedbuff", SITES, {"robust": "median"}, "robust"),
        ("fedbuff", SITES, {"clip_norm": 0.5}, "clip_norm"),
        ("fedbuff", SITES, {"clip_norm": None}, "clip_norm"),
        ("fedasync", SITES, {}, "fedasync"),
        ("fedbuff", {"r0": "region", "r1": "region"}, {}, "hierarchical"),
    ],
)
def test_plans_central_dp_cannot_run_on_are_config_errors(
    algorithm: str, children: dict[str, str], params: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        build_node(
            "root",
            "root",
            algorithm,
            replace(AlgorithmConfig(), **params),
            TRAINING,
            Neighbours(children=children),
            seed=0,
            weights=model(0.0),
            privacy=central(),
        )


def test_a_budget_too_small_for_one_release_dispatches_nothing() -> None:
    root = fedbuff_root(central(epsilon_budget=0.01))
    out = start(root, [])
    assert not requests(out)
    assert metrics(out, "privacy_budget_exhausted")
    assert root._dp is not None and len(root._dp.ledger) == 0


def test_a_lost_release_is_refused_at_restore_not_under_counted() -> None:
    root = fedbuff_root(central())
    log: list[Persist] = []
    answer(root, start(root, log), {}, log, limit=6)
    assert root.version == 3
    # A repair dropped the last applied records, but their release's log record survived.
    applied = [p for p in log if p.key == "applied"]
    kept = [p for p in log if p not in applied[-2:]]
    with pytest.raises(ValueError, match="under-count epsilon"):
        restored(kept, lambda: fedbuff_root(central()))
    # Without the loss it restores.
    assert restored(log, lambda: fedbuff_root(central())).version == 3


def test_the_same_version_of_another_sum_gets_other_noise() -> None:
    dp = DpRelease(central(), denominator=1, noise_key=4)
    template = {"w": np.zeros(1000, dtype=np.float32)}
    a = {"w": np.zeros(1000, dtype=np.float32)}
    b = {"w": np.full(1000, 0.01, dtype=np.float32)}
    out: list[Effect] = []
    ra = dp.noised_mean([("s", a, 1.0)], template, 7, out)["w"].astype(np.float64)
    rb = dp.noised_mean([("s", b, 1.0)], template, 7, out)["w"].astype(np.float64)
    # Were the noise the same, rb - ra would be exactly the 0.01 difference of the sums.
    assert not np.allclose(rb - ra, 0.01, atol=1e-3)


def test_a_secure_sync_root_with_central_dp_seals_uniform_noised_cohorts() -> None:
    """Central DP + secure aggregation on a FedAvg root (tests/algorithms/
    test_secagg_dp_sync.py runs it): its coordinator seals weight_cap 1 and the members'
    noise, and its release divides by clients_per_round."""
    from fedloom.federation.secagg_keys import derived_secagg_keys
    from fedloom.federation.secagg_params import SecureAggregationConfig

    children = {f"s{i}": "site" for i in range(6)}
    keys = derived_secagg_keys(["root", *children], 0)
    root = build_node(
        "root",
        "root",
        "fedavg",
        AlgorithmConfig(clients_per_round=6, over_selection=1.0),
        TRAINING,
        Neighbours(children=children),
        seed=0,
        weights=model(0.0),
        secagg=SecureAggregationConfig(enabled=True, min_cohort=3, max_dropout=0.3),
        secagg_keys=keys["root"],
        privacy=central(),
    )
    assert isinstance(root, SyncAggregator)
    coord = root.secure_aggregation
    assert coord.spec.weight_cap == 1 and coord.noise_sigma > 0
    assert root.secagg_noise is not None and root.secagg_noise[0] == coord.noise_sigma
    assert root._dp is not None and root._dp.denominator == 6
