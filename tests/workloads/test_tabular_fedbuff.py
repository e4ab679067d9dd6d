"""Federated standardisation of the tabular plan under FedBuff (workloads.tabular), run
through the simulator's driver with the real FedBuff root and site nodes: two hospitals
whose features sit on very different scales converge, and the scaler approaches the
pooled moments; a site's std stays safe whatever global values it receives; and the daemon
config refuses the combinations that cannot work (runtime.config)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import TrainResult, Weights
from fedloom.algorithms.server_opt import ServerSGD
from fedloom.algorithms.site import SiteNode
from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.config import parse_config
from fedloom.sim.compute import ComputeModel
from fedloom.sim.driver import SimDriver
from fedloom.sim.network import UniformLinks
from fedloom.workloads.tabular import SCALER_MEAN, SCALER_VAR, TabularPlan
from tests.workloads.test_tabular import PLAN, daemon_config, site, spec, table

SITES = ("h0", "h1")


def hospital(n: int, seed: int, age: float, chol: float, scale: float) -> Any:
    """Patients of one hospital around its own (age, chol); the label follows one rule for
    everybody (so one model fits both), in raw units far apart between the hospitals."""
    rng = np.random.default_rng(seed)
    a = rng.normal(age, 8 * scale, n)
    c = rng.normal(chol, 30 * scale, n)
    sex = rng.choice(["F", "M"], n)
    score = (a - 57) / 10 + (c - 270) / 60 + 0.5 * (sex == "M")
    return pd.DataFrame(
        {"age": a, "chol": c, "sex": sex, "outcome": np.where(score > 0, "sick", "well")}
    )


def federation(
    tmp_path: Path, *, weighting: str, server_lr: float, momentum: float
) -> tuple[FedBuffAggregator, dict[str, TabularPlan]]:
    frames = [hospital(600, 1, 45, 200, 1.0), hospital(300, 2, 70, 360, 2.0)]
    plans = {
        s: TabularPlan(spec(), site(tmp_path, f, name=s))
        for s, f in zip(SITES, frames, strict=True)
    }
    root = FedBuffAggregator(
        "root",
        dict.fromkeys(SITES, "site"),
        TabularPlan(spec()).init(0),
        buffer_size=2,
        concurrency=2,
        server_opt=ServerSGD(server_lr, momentum),
        train_config={"lr": 0.1, "local_steps": 10, "batch_size": 32},
        task_timeout_s=60.0,
        weighting=weighting,
        clip_norm=None,  # what the config check asks of a federated scaler
    )

    def trained(node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        return plans[node_id].train(weights, config)

    nodes: dict[str, Any] = {"root": root, **{s: SiteNode(s, "root") for s in SITES}}
    driver = SimDriver(
        nodes,
        {"root": "root", **dict.fromkeys(SITES, "site")},
        UniformLinks(latency_s=0.01, bandwidth_bps=1e9),
        neighbours=[("root", s) for s in SITES],
        # concurrency 2 with K = 2: every flush has one update a version stale.
        compute=ComputeModel.from_config({"distribution": "constant", "mean_s": 1.0}, seed=1),
        trainer=trained,
    )
    driver.run(until=120.0)
    return root, plans


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("weighting", "server_lr", "momentum"),
    [("examples", 1.0, 0.0), ("uniform", 1.5, 0.0)],
)
def test_fedbuff_converges_and_the_scaler_nears_the_pooled_moments(
    tmp_path: Path, weighting: str, server_lr: float, momentum: float
) -> None:
    root, plans = federation(tmp_path, weighting=weighting, server_lr=server_lr, momentum=momentum)
    assert root.version >= 20
    _, w = root.current_model()
    xs = [p._current().x_train[:, :2] for p in plans.values()]
    pooled = np.concatenate(xs)
    mean_by_site = np.array([x.mean(axis=0) for x in xs])
    var_by_site = np.array([x.var(axis=0) for x in xs])
    w_site = (
        np.array([len(x) for x in xs], np.float64)
        if weighting == "examples"
        else np.ones(len(xs))  # uniform: each site's moments count alike (equal reports)
    )[:, None] / (len(xs) if weighting != "examples" else sum(len(x) for x in xs))
    mean = (w_site * mean_by_site).sum(0)
    # The sites' E[(x - mean)²], averaged: their variances plus their means' spread.
    var = (w_site * (var_by_site + (mean_by_site - mean) ** 2)).sum(0)
    if weighting == "examples":
        np.testing.assert_allclose(mean, pooled.mean(axis=0))  # the pooled moments
        np.testing.assert_allclose(var, pooled.var(axis=0))
    # FedBuff's staleness discount leans toward fresher updates: within a few %.
    np.testing.assert_allclose(w[SCALER_MEAN], mean, rtol=0.06)
    np.testing.assert_allclose(w[SCALER_VAR], var, rtol=0.2)
    if weighting == "examples":
        std = np.sqrt(w[SCALER_VAR])
        np.testing.assert_allclose(w[SCALER_MEAN], pooled.mean(axis=0), rtol=0.06)
        np.testing.assert_allclose(std, pooled.std(axis=0), rtol=0.2)
    # The sites differ: their own means are far from the global one (the test means something).
    assert (np.abs(mean_by_site - w[SCALER_MEAN]) > 0.5 * np.sqrt(var_by_site)).all()
    # A sensible model at both sites (each one's own rows, far apart in raw units).
    for p in plans.values():
        ev = p.evaluate(w)
        assert ev["accuracy"] >= 0.9 and np.isfinite(ev["loss"]) and ev["loss"] < 1.0


def test_a_site_std_is_safe_whatever_global_values_it_receives(tmp_path: Path) -> None:
    plan = TabularPlan(spec(), site(tmp_path, table(200, 4)))
    w = plan.init(0)
    w = plan.train(w, {"lr": 0.1, "local_steps": 20, "batch_size": 16, "seed": 0}).weights
    local = plan._current()
    for var in (-5.0, 0.0, 1e-12, float("nan"), float("inf")):
        bad = dict(w)
        bad[SCALER_VAR] = np.full_like(w[SCALER_VAR], var)
        ev = plan.evaluate(bad)
        assert np.isfinite(ev["loss"]) and ev["loss"] < 100.0, (var, ev)
        _, std = plan._scale(plan._params(bad), local)
        assert (std >= 0.01 * np.sqrt(local.var) - 1e-12).all()
    result = plan.train(bad, {"lr": 0.1, "local_steps": 5, "batch_size": 16, "seed": 1})
    assert all(np.isfinite(v).all() for v in result.weights.values())
    np.testing.assert_allclose(result.weights[SCALER_VAR], local.var, rtol=1e-5)


@pytest.mark.parametrize(
    ("role", "extra", "named"),
    [
        ("root", {"aggregation": {}}, r"aggregation\.clip_norm.*clip_norm = \"off\""),
        ("region", {"aggregation": {"clip_norm": 5.0}}, r"aggregation\.clip_norm"),
        (
            "root",
            {"aggregation": {"clip_norm": "off", "server_momentum": 0.9}},
            r"server_momentum.*server_momentum = 0",
        ),
        (
            "root",
            {"aggregation": {"clip_norm": "off"}, "secure_aggregation": {"enabled": True}},
            r"secure_aggregation\.enabled",
        ),
        (
            "root",
            {
                "aggregation": {"clip_norm": "off"},
                "privacy": {"mechanism": "central", "noise_multiplier": 1.0, "clip": 1.0},
            },
            r"privacy\.mechanism",
        ),
    ],
)
def test_the_config_refuses_a_federated_scaler_that_cannot_work(
    tmp_path: Path, role: str, extra: dict[str, Any], named: str
) -> None:
    raw = daemon_config("root", tmp_path) | extra
    if role == "region":
        raw |= {
            "role": "region",
            "node_id": "region-1",
            "parent": {"id": "root-1", "url": "ws://127.0.0.1:1/fedloom"},
        }
    with pytest.raises(ConfigError) as info:
        parse_config(raw, check_files=False)
    text = str(info.value)
    assert "\n" not in text and text.startswith("plan.standardize:")
    assert 'standardize = "declared"' in text
    assert re.search(named, text), text
    # The same node with declared scaling is accepted.
    raw["plan"] = dict(PLAN) | {
        "standardize": "declared",
        "declared_scaling": {"age": [60, 10], "chol": [200, 40]},
    }
    parse_config(raw, check_files=False)


def test_clip_off_is_accepted_and_a_site_is_not_checked(tmp_path: Path) -> None:
    assert parse_config(daemon_config("root", tmp_path), check_files=False).plan is not None
    raw = daemon_config("site", tmp_path) | {"aggregation": {"clip_norm": "auto"}}
    assert parse_config(raw, check_files=False).plan is not None
