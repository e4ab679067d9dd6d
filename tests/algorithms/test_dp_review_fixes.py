"""Regression tests for the DP review of issue 12 (each performs its attack or failure
through the real code path): restarts with a changed z or C, a secure cohort replayed
under another [privacy], a restart without [privacy], a ledger below the model version,
a lowered budget with releases to replay, the sync root's secret draw, the |U| - 1
members' noise, and the numeric bounds."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.dp.ledger import Z_MAX, Z_MIN, LedgerError, PrivacyEvent, PrivacyLedger
from fedloom.algorithms.dp.release import (
    DpRelease,
    PrivacyConfig,
    effective_noise_multiplier,
    member_noise_sigma,
)
from fedloom.algorithms.protocol import Effect, LogRecords, Persist
from fedloom.algorithms.sync import SyncAggregator
from fedloom.algorithms.weights_math import l2_norm
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig
from fedloom.federation.privacy import read_privacy
from fedloom.transport.wire import TrainRequest
from tests.algorithms.alg_helpers import hello, model, requests
from tests.algorithms.test_dp_release import (
    TRAINING,
    answer,
    budget_for,
    central,
    fedbuff_root,
    restored,
    start,
)


def released(privacy: PrivacyConfig, versions: int, key: int = 5) -> tuple[Any, list[Persist]]:
    """A FedBuff root with central DP that published ``versions`` models after its start
    checkpoint (a daemon checkpoints at start and every 10 versions: these are replayed)."""
    root = fedbuff_root(privacy, key=key)
    log: list[Persist] = []
    answer(root, start(root, log), {}, log, limit=2 * versions)
    assert root.version == versions
    return root, log


# ------------------------------------------------------------------ F1: z or C changed


@pytest.mark.parametrize(
    ("changed", "field"),
    [({"noise_multiplier": 1.5}, "noise_multiplier"), ({"clip": 2.0}, "clip")],
)
def test_a_restart_with_another_z_or_clip_is_refused_naming_the_field(
    changed: dict[str, float], field: str
) -> None:
    root, log = released(central(noise_multiplier=1.0, clip=1.0), 2)
    # The same [privacy]: the replay rebuilds the very models and ledger.
    same = restored(log, lambda: fedbuff_root(central(noise_multiplier=1.0, clip=1.0), key=9))
    assert same.version == 2
    for k, v in root.current_model()[1].items():
        assert np.array_equal(same.current_model()[1][k], v)
    # Another z or C would re-release versions 1 and 2 with other noise: refused.
    with pytest.raises(ValueError, match=f"privacy.{field} changed across the restart"):
        restored(log, lambda: fedbuff_root(central(**{"noise_multiplier": 1.0, **changed})))


def test_the_same_sum_under_another_z_or_clip_never_reuses_the_noise() -> None:
    """The attack: m0 + (S + a·g)/K and m0 + (S + b·g)/K of one g give S away. With the
    noise keyed by z and C, the standardised noises of the two releases differ."""
    template = {"w": np.zeros(5000)}
    delta = {"w": np.full(5000, 0.001)}
    total = np.full(5000, 0.001)
    noises = []
    for z, c in ((1.0, 1.0), (1.5, 1.0), (1.0, 2.0)):
        dp = DpRelease(central(noise_multiplier=z, clip=c), denominator=1, noise_key=7)
        got = dp.noised_mean([("a", delta, 1.0)], template, 1, [])["w"]
        noises.append((got - total) / (z * c))
    for i in range(3):
        assert float(np.std(noises[i])) == pytest.approx(1.0, rel=0.05)
        for j in range(i):
            assert abs(float(np.corrcoef(noises[i], noises[j])[0, 1])) < 0.1


def test_a_secure_cohort_replayed_under_another_z_keeps_the_z_it_was_noised_with() -> None:
    from tests.algorithms.test_secagg_nodes import Fed, secagg

    fed = Fed(
        5,
        buffer_size=5,
        cfg=secagg(min_cohort=3, max_dropout=0.2, max_colluders=0),
        privacy=central(noise_multiplier=1.0),
    )
    root = fed.nodes["root"]
    fed.train()
    fed.drain()
    assert root.version == 1
    live = [(r.version, r.z) for r in root._dp.ledger.releases]
    checkpoint, records = fed.durable("root")
    (cohort,) = [r for r in records.records("applied") if r.get("op") == "cohort"]
    assert cohort["noise"] == list(root.secagg_noise)
    fed.privacy = central(noise_multiplier=3.0)
    back = fed.build_agg({s: "site" for s in fed.sites})
    back.restore(checkpoint, records)
    assert back.version == 1
    assert [(r.version, r.z) for r in back._dp.ledger.releases] == live
    assert back.secagg_noise[0] > root.secagg_noise[0]  # its next cohorts: the new sigma


# ------------------------------------------------------------- F5: the ledger lost


def test_a_restart_without_privacy_is_refused() -> None:
    root, log = released(central(), 2)
    plain = fedbuff_root(None)  # type: ignore[arg-type]
    # The checkpoint holds the ledger ...
    with pytest.raises(ValueError, match="ran with \\[privacy\\]"):
        plain.restore(root.snapshot())
    # ... or, before any checkpoint with it, the log holds the private releases.
    with pytest.raises(ValueError, match=r"ran with \[privacy\] .* 2 private releases"):
        restored(log, lambda: fedbuff_root(None))  # type: ignore[arg-type]
    assert not plain.snapshot().get("privacy")


def test_a_ledger_ending_below_the_model_version_is_refused() -> None:
    fresh = fedbuff_root(central())
    state = dict(fresh.snapshot())
    state["version"] = 500  # what `fedloom state reseed --above 499` wrote
    with pytest.raises(ValueError, match="ends at version 0 but its model is at version 500"):
        fedbuff_root(central()).restore(state)


# ---------------------------------------------------------- F6: lowered budget + replay


def test_a_lowered_budget_replays_what_was_released_then_stops() -> None:
    event = PrivacyEvent(1.0)
    root, log = released(central(epsilon_budget=budget_for(6, event)), 3)
    back = restored(log, lambda: fedbuff_root(central(epsilon_budget=budget_for(2, event))))
    # Versions 1..3 were published: all rebuilt, whatever the budget says now ...
    assert back.version == 3
    assert [r.version for r in back._dp.ledger.releases] == [1, 2, 3]
    for k, v in root.current_model()[1].items():
        assert np.array_equal(back.current_model()[1][k], v)
    # ... and the root starts, releases nothing more and dispatches no task.
    assert back._dp.exhausted
    out: list[Effect] = []
    for s in back.children:
        out.extend(back.handle(hello(s), 5.0))
    assert not requests(out)
    assert any(getattr(e, "name", "") == "privacy_budget_exhausted" for e in out)


def test_a_raised_budget_after_a_replay_lets_the_root_go_on() -> None:
    event = PrivacyEvent(1.0)
    _, log = released(central(epsilon_budget=budget_for(6, event)), 3)
    back = restored(log, lambda: fedbuff_root(central(epsilon_budget=budget_for(9, event))))
    assert not back._dp.exhausted and back.version == 3


# ----------------------------------------------------------- F3: the sync root's draw


def sync_root(key: int, seed: int = 0, sites: int = 10) -> SyncAggregator:
    params = AlgorithmConfig(
        clients_per_round=3, over_selection=1.0, min_cohort=2, start_quorum="all"
    )
    node = build_node(
        "root",
        "root",
        "fedavg",
        params,
        TRAINING,
        Neighbours(children={f"s{i}": "site" for i in range(sites)}),
        seed=seed,
        weights=model(0.0),
        privacy=central(),
        noise_key=key,
    )
    assert isinstance(node, SyncAggregator)
    return node


def first_draw(root: SyncAggregator) -> list[str]:
    out: list[Effect] = []
    for s in root.children:
        out.extend(root.handle(hello(s), 0.0))
    return sorted(s for s, _ in requests(out))


def test_the_sync_roots_draw_comes_from_its_noise_secret_not_the_seed() -> None:
    # The same config seed, different secrets: different draws (the seed predicts nothing).
    draws = {tuple(first_draw(sync_root(key=k, seed=0))) for k in range(20)}
    assert len(draws) > 10
    # The same secret: the same draw whatever the seed (it is the secret's).
    assert first_draw(sync_root(key=3, seed=0)) == first_draw(sync_root(key=3, seed=1))
    # Uniform: each site is drawn at about q = 3/10 over 400 secrets.
    counts = dict.fromkeys((f"s{i}" for i in range(10)), 0)
    for k in range(400):
        for s in first_draw(sync_root(key=1000 + k)):
            counts[s] += 1
    assert all(0.22 < n / 400 < 0.38 for n in counts.values()), counts


def test_a_sync_root_without_privacy_still_draws_from_its_seed() -> None:
    def plain(seed: int) -> list[str]:
        params = AlgorithmConfig(clients_per_round=3, over_selection=1.0, min_cohort=2)
        node = build_node(
            "root",
            "root",
            "fedavg",
            params,
            TRAINING,
            Neighbours(children={f"s{i}": "site" for i in range(10)}),
            seed=seed,
            weights=model(0.0),
        )
        out: list[Effect] = []
        for s in node.children:
            out.extend(node.handle(hello(s), 0.0))
        return sorted(s for s, m in requests(out) if isinstance(m, TrainRequest))

    assert plain(4) == plain(4)


# ------------------------------------------------------- F7: |U| - 1 members' noise


@given(
    z=st.floats(0.3, 20.0),
    t=st.integers(2, 40),
    extra=st.integers(0, 20),
    dim=st.integers(1, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_the_effective_z_counts_every_member_but_the_one_at_stake(
    z: float, t: int, extra: int, dim: int
) -> None:
    sigma = member_noise_sigma(z, 1.0, 16, dim, t)
    sensitivity = 2.0**16 + math.sqrt(dim)
    # t members, one of whom knows its own noise: the others' is exactly z·Δ.
    assert math.sqrt(t - 1) * sigma == pytest.approx(z * sensitivity, rel=1e-9)
    assert effective_noise_multiplier(sigma, t, 1.0, 16, dim) == pytest.approx(z, rel=1e-9)
    u = t + extra
    got = effective_noise_multiplier(sigma, u, 1.0, 16, dim)
    assert got == pytest.approx(math.sqrt(u - 1) * sigma / sensitivity, rel=1e-9)


def test_one_member_cohorts_are_refused_under_dp() -> None:
    with pytest.raises(ValueError, match="threshold must be >= 2"):
        member_noise_sigma(1.0, 1.0, 16, 10, 1)
    with pytest.raises(ValueError, match="threshold >= 2"):
        effective_noise_multiplier(100.0, 1, 1.0, 16, 10)


# ------------------------------------------------------------------ F8: bounds


def table(**fields: Any) -> Table:
    return Table(
        {"mechanism": "central", "noise_multiplier": 1.0, "clip": 1.0, **fields}, "privacy"
    )


@pytest.mark.parametrize("z", [1e-300, 0.05, 1e5, 1e300])
def test_privacy_refuses_a_noise_multiplier_outside_the_bounds(z: float) -> None:
    with pytest.raises(ConfigError, match=r"privacy\.noise_multiplier"):
        read_privacy(table(noise_multiplier=z))
    with pytest.raises(LedgerError):
        PrivacyEvent(z)
    with pytest.raises(ValueError):
        central(noise_multiplier=z)


@pytest.mark.parametrize("delta", [0.002, 0.1, 0.5])
def test_privacy_refuses_a_large_delta(delta: float) -> None:
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        read_privacy(table(delta=delta))


def test_the_bounds_are_usable_and_epsilon_is_never_negative() -> None:
    assert read_privacy(table(noise_multiplier=Z_MIN)).noise_multiplier == Z_MIN
    assert read_privacy(table(noise_multiplier=Z_MAX)).noise_multiplier == Z_MAX
    for accountant in ("rdp", "pld"):
        ledger = PrivacyLedger(accountant)
        ledger.record(1, PrivacyEvent(Z_MAX, 0.01))
        assert ledger.epsilon(1e-3) >= 0.0
    # The largest z releases without overflow.
    dp = DpRelease(central(noise_multiplier=Z_MAX, clip=1.0), denominator=2, noise_key=1)
    out = dp.noised_mean([("a", model(0.1), 1.0)], model(0.0), 1, [])
    assert math.isfinite(l2_norm(out))


def test_the_privacy_log_carries_the_clip() -> None:
    _, log = released(central(clip=1.0), 1)
    (rec,) = [p.data for p in log if p.key == "privacy"]
    assert rec["clip"] == 1.0 and rec["z"] == 1.0 and rec["version"] == 1


def test_a_damaged_log_still_names_lost_releases() -> None:
    _, log = released(central(), 2)
    logs: dict[str, list[Any]] = {}
    for p in log:
        if p.append and p.key != "applied":
            logs.setdefault(p.key, []).append(p.data)
    checkpoint = next(p.data for p in log if p.key == "checkpoint")
    with pytest.raises(ValueError, match="versions \\[1, 2\\] that replaying"):
        fedbuff_root(central()).restore(checkpoint, LogRecords(logs))
