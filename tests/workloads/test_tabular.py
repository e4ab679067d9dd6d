"""The built-in tabular plan (workloads.tabular) over a real registry (runtime.datasets):
it learns a separable table, standardises federatedly (the pooled moments after FedAvg
rounds), follows the training config, and refuses revoked, missing, swapped or
mismatched data with its code."""

from __future__ import annotations

import pickle
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedloom.algorithms.protocol import Weights
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.training import TrainingRefusedError
from fedloom.runtime.config import parse_config
from fedloom.runtime.datasets import DatasetRegistry, DatasetWatch
from fedloom.runtime.trainer import plan_from_config
from fedloom.workloads.tabular import (
    SCALER_MEAN,
    SCALER_VAR,
    TabularPlan,
    TabularSpec,
    _descend,
    _logits,
    read_tabular,
)

PLAN: dict[str, Any] = {
    "kind": "tabular",
    "dataset_tag": "heart",
    "features": ["age", "chol", "sex"],
    "label": "outcome",
    "classes": ["well", "sick"],
    "categories": {"sex": ["F", "M"]},
}


def table(n: int, seed: int, *, age: float = 60.0, chol: float = 200.0, scale: float = 1.0) -> Any:
    """A separable table: sick iff a linear score of the standardised features is > 0.5."""
    rng = np.random.default_rng(seed)
    a = rng.normal(age, 10 * scale, n)
    c = rng.normal(chol, 40 * scale, n)
    sex = rng.choice(["F", "M"], n)
    score = (a - age) / (10 * scale) + (c - chol) / (40 * scale) + (sex == "M")
    return pd.DataFrame(
        {
            "age": a.round(2),
            "chol": c.round(2),
            "sex": sex,
            "outcome": np.where(score > 0.5, "sick", "well"),
        }
    )


def site(
    tmp_path: Path, frame: Any, name: str = "s", fmt: str = "csv", tag: str = "heart"
) -> DatasetWatch:
    file = tmp_path / f"{name}.{fmt}"
    if fmt == "csv":
        frame.to_csv(file, index=False)
    else:
        frame.to_parquet(file)
    DatasetRegistry(tmp_path / name).add(file, name=name, tags=[tag], label="outcome")
    return DatasetWatch(tmp_path / name)


def spec(**over: Any) -> TabularSpec:
    return read_tabular(Table({**PLAN, **over}, "plan"))


def fit(plan: TabularPlan, w: Weights, rounds: int, lr: float = 0.1) -> Weights:
    for r in range(rounds):
        w = plan.train(w, {"lr": lr, "local_steps": 20, "batch_size": 16, "seed": r}).weights
    return w


@pytest.mark.parametrize(("model", "fmt"), [("logreg", "csv"), ("mlp", "parquet")])
def test_learns_a_separable_table(tmp_path: Path, model: str, fmt: str) -> None:
    plan = TabularPlan(spec(model=model), site(tmp_path, table(400, 0), fmt=fmt))
    w0 = plan.init(1)
    before = plan.evaluate(w0)
    w = fit(plan, w0, 30)
    after = plan.evaluate(w)
    assert after["n_examples"] == 80.0  # test_fraction 0.2 of 400, held out
    assert after["accuracy"] >= 0.9 > before["accuracy"]
    assert after["loss"] < before["loss"]
    result = plan.train(w, {"lr": 0.1, "local_steps": 1, "batch_size": 8, "seed": 0})
    assert result.n_examples == 320


def test_shapes_follow_the_config_and_a_root_needs_no_data() -> None:
    s = spec(model="mlp", hidden=7)
    root = TabularPlan(s)  # no source: a root or region
    w = root.init(3)
    assert {k: v.shape for k, v in w.items()} == {
        "W1": (4, 7),  # age, chol, sex=F, sex=M
        "b1": (7,),
        "W2": (7, 2),
        "b2": (2,),
        SCALER_MEAN: (2,),
        SCALER_VAR: (2,),
    }
    assert all(v.dtype == np.float32 for v in w.values())
    assert root.evaluate(w) == {}
    with pytest.raises(TrainingRefusedError) as info:
        root.train(w, {})
    assert info.value.code == "dataset_missing"
    declared = TabularPlan(
        spec(standardize="declared", declared_scaling={"age": [60, 10], "chol": [200, 40]})
    ).init(0)
    assert set(declared) == {"W", "b"}


def test_federated_standardisation_reaches_the_pooled_moments(tmp_path: Path) -> None:
    # Two hospitals on different scales; FedAvg (example-weighted mean, server lr 1).
    frames = [table(300, 1, age=40, chol=150), table(100, 2, age=75, chol=260, scale=3.0)]
    plans = [TabularPlan(spec(), site(tmp_path, f, name=f"h{i}")) for i, f in enumerate(frames)]
    xs = [p._current().x_train[:, :2] for p in plans]
    x = np.concatenate(xs)
    mean = x.mean(axis=0)
    # Round 0 (no global mean yet): the example-weighted average of the sites' variances;
    # then their spreads around the global (pooled) mean average to the pooled variance.
    within = sum(len(xi) * xi.var(axis=0) for xi in xs) / len(x)
    w = plans[0].init(0)
    for r in range(4):
        results = [
            p.train(w, {"lr": 0.05, "local_steps": 5, "batch_size": 16, "seed": r}) for p in plans
        ]
        total = sum(res.n_examples for res in results)
        w = {
            k: (
                w[k] + sum(res.n_examples * (res.weights[k] - w[k]) for res in results) / total
            ).astype(np.float32)
            for k in w
        }
        np.testing.assert_allclose(w[SCALER_MEAN], mean, rtol=1e-5)
        np.testing.assert_allclose(w[SCALER_VAR], x.var(axis=0) if r else within, rtol=1e-5)
    assert (x.var(axis=0) > 1.5 * within).all()  # the sites' means are far apart
    # Each site's own moments differ a lot from the pooled ones (the test means something).
    assert abs(plans[1]._current().mean[0] - mean[0]) > 10
    # And the federated model classifies both sites' held-out rows.
    for p in plans:
        assert p.evaluate(fit(p, w, 0))["accuracy"] > 0.5


def test_a_site_standardises_with_the_global_moments_it_receives(tmp_path: Path) -> None:
    plan = TabularPlan(spec(), site(tmp_path, table(200, 4)))
    w = fit(plan, plan.init(0), 20)
    shifted = dict(w)
    shifted[SCALER_MEAN] = w[SCALER_MEAN] + np.float32(1000.0)  # a global mean far away
    shifted[SCALER_VAR] = w[SCALER_VAR] * np.float32(1e3)
    assert plan.evaluate(shifted)["accuracy"] != plan.evaluate(w)["accuracy"]


def test_declared_and_no_standardisation(tmp_path: Path) -> None:
    watch = site(tmp_path, table(400, 5))
    declared = TabularPlan(
        spec(standardize="declared", declared_scaling={"age": [60, 10], "chol": [200, 40]}), watch
    )
    assert declared.evaluate(fit(declared, declared.init(0), 30))["accuracy"] >= 0.9
    raw = TabularPlan(spec(standardize="none"), watch)
    w = raw.init(0)
    x = raw._current().x_train
    # "none": the model sees raw values: the first step's gradient scales with them.
    step = raw.train(w, {"lr": 1e-6, "local_steps": 1, "batch_size": len(x), "seed": 0}).weights
    std = declared.train(
        w | {}, {"lr": 1e-6, "local_steps": 1, "batch_size": len(x), "seed": 0}
    ).weights
    assert np.abs(step["W"]).max() > 10 * np.abs(std["W"]).max()


def test_fedprox_pulls_toward_the_global_weights(tmp_path: Path) -> None:
    plan = TabularPlan(spec(), site(tmp_path, table(300, 6)))
    w = plan.init(0)
    cfg = {"lr": 0.2, "local_steps": 30, "batch_size": 16, "seed": 1}
    free = plan.train(w, cfg).weights
    prox = plan.train(w, cfg | {"mu": 2.0}).weights
    again = plan.train(w, cfg).weights
    np.testing.assert_array_equal(free["W"], again["W"])  # same seed, same result
    assert np.linalg.norm(prox["W"]) < np.linalg.norm(free["W"])


def test_refusals_reach_the_job_with_their_code(tmp_path: Path) -> None:
    frame = table(100, 7)
    watch = site(tmp_path, frame)
    plan = TabularPlan(spec(), watch)
    w = plan.init(0)
    cfg = {"lr": 0.1, "local_steps": 2, "batch_size": 8, "seed": 0}
    plan.train(w, cfg)

    def code(p: TabularPlan = plan) -> str:
        with pytest.raises(TrainingRefusedError) as info:
            p.train(w, cfg)
        return info.value.code

    file = tmp_path / "s.csv"
    table(100, 8).to_csv(file, index=False)  # swapped under the registry's feet
    assert code() == "dataset_changed"
    with pytest.raises(TrainingRefusedError):
        plan.evaluate(w)
    frame.to_csv(file, index=False)  # the registered bytes again
    plan.train(w, cfg)
    DatasetRegistry(tmp_path / "s").revoke("s")
    assert code() == "dataset_revoked"  # the very next job
    assert code(TabularPlan(spec(dataset_tag="lung"), watch)) == "dataset_missing"


def test_a_table_that_does_not_fit_the_plan_is_refused(tmp_path: Path) -> None:
    frame = table(50, 9)
    frame.loc[7, "outcome"] = "unknown"
    plan = TabularPlan(spec(), site(tmp_path, frame, name="a"))
    with pytest.raises(TrainingRefusedError, match=r"label 'unknown' \(row 8\)") as info:
        plan.train(plan.init(0), {})
    assert info.value.code == "dataset_mismatch"
    # sex is a category: without [plan.categories] the plan cannot use it as a number.
    other = TabularPlan(spec(categories={}), site(tmp_path, table(50, 9), name="b"))
    with pytest.raises(TrainingRefusedError, match="'sex' is a category") as info:
        other.train(other.init(0), {})
    assert info.value.code == "dataset_mismatch"


def test_undeclared_category_values_encode_as_zeros(tmp_path: Path) -> None:
    frame = table(60, 10)
    frame.loc[:9, "sex"] = "X"
    plan = TabularPlan(spec(test_fraction=0.0), site(tmp_path, frame))
    data = plan._current()
    onehot = data.x_train[:, 2:]
    assert onehot.shape[1] == 2
    assert sorted(onehot.sum(axis=1).tolist()).count(0.0) == 10


def test_the_plan_pickles_small_and_rechecks(tmp_path: Path) -> None:
    plan = TabularPlan(spec(), site(tmp_path, table(100, 11)))
    w = plan.init(0)
    plan.train(w, {"seed": 0})
    blob = pickle.dumps(plan)
    assert len(blob) < 4000  # no data travels to a process pool
    copy = pickle.loads(blob)
    np.testing.assert_array_equal(
        copy.train(w, {"seed": 0}).weights["W"], plan.train(w, {"seed": 0}).weights["W"]
    )


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"classes": ["one"]}, "plan.classes: list at least two"),
        ({"classes": [1, "1"]}, "plan.classes: a label value is listed twice"),
        ({"features": []}, "plan.features: expected a non-empty list"),
        ({"label": "age"}, "plan.label: 'age' is also a feature"),
        ({"model": "forest"}, "plan.model: 'forest' is not one of logreg, mlp"),
        ({"hidden": 8}, 'plan.hidden: only model = "mlp"'),
        ({"standardize": "declared"}, "plan.declared_scaling.age: required field is missing"),
        (
            {"standardize": "declared", "declared_scaling": {"age": [1, 0], "chol": [1, 1]}},
            "plan.declared_scaling.age: expected [mean, std] with std > 0",
        ),
        ({"declared_scaling": {"age": [1, 2]}}, 'only standardize = "declared" uses it'),
        ({"categories": {"bmi": ["a"]}}, "plan.categories.bmi: unknown field"),
        ({"test_fraction": 0.95}, "plan.test_fraction: expected a number <= 0.9"),
        ({"dataset_tag": 3}, "plan.dataset_tag: expected a string"),
    ],
)
def test_config_mistakes_name_the_field(over: Mapping[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        spec(**over)
    assert message in str(info.value)


def daemon_config(role: str, tmp_path: Path) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "role": role,
        "node_id": f"{role}-1",
        "state_dir": str(tmp_path / role),
        "identity": {"key": "k"},
        "roster": {"path": "r", "consortium_key": "A" * 43 + "="},
        "plan": dict(PLAN),
    }
    if role == "site":
        raw["parent"] = {"id": "root-1", "url": "ws://127.0.0.1:1/fedloom"}
    else:
        raw["listen"] = {"port": 0}
        raw["children"] = ["site-1"]
        raw["aggregation"] = {"clip_norm": "off"}  # federated scaling needs it (below)
    return raw


def test_daemon_config_builds_the_plan_for_site_and_root(tmp_path: Path) -> None:
    frame = table(100, 12)
    file = tmp_path / "data.csv"
    frame.to_csv(file, index=False)
    DatasetRegistry(tmp_path / "site").add(file, name="d", tags=["heart"], label="outcome")
    site_cfg = parse_config(daemon_config("site", tmp_path))
    assert site_cfg.plan is not None and site_cfg.plan.state_dir == tmp_path / "site"
    site_plan = plan_from_config(site_cfg.plan, seed=1)
    assert isinstance(site_plan, TabularPlan) and site_plan.source is not None
    assert site_plan.train(site_plan.init(1), {"seed": 0}).n_examples == 80
    root_cfg = parse_config(daemon_config("root", tmp_path))
    assert root_cfg.plan is not None and root_cfg.plan.state_dir is None
    root_plan = plan_from_config(root_cfg.plan, seed=1)
    assert isinstance(root_plan, TabularPlan) and root_plan.source is None
    assert {k: v.shape for k, v in root_plan.init(1).items()} == {
        k: v.shape for k, v in site_plan.init(1).items()
    }
    bad = daemon_config("site", tmp_path)
    bad["plan"]["n_sites"] = 3
    with pytest.raises(ConfigError, match=r"plan.n_sites: unknown field"):
        parse_config(bad)


def readme_section() -> str:
    text = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    start = text.index("## Bringing your own data")
    return text[start : text.index("\n## ", start + 10)]


def test_the_readme_plan_is_a_valid_plan() -> None:
    section = readme_section()
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    plan = tomllib.loads(block)["plan"]
    s = read_tabular(Table(plan, "plan"))
    assert (s.dataset_tag, s.features, s.classes) == (
        "heart",
        ("age", "chol", "sex"),
        ("well", "sick"),
    )
    # The commented-out declared scaling is valid too.
    declared = "\n".join(
        line.removeprefix("# ") for line in block.splitlines() if line.startswith("# ")
    ).split("instead needs, for every numeric feature:\n", 1)[1]
    scaling = tomllib.loads(declared)["plan"]["declared_scaling"]
    read_tabular(Table({**plan, "standardize": "declared", "declared_scaling": scaling}, "plan"))


def _loss(p: Mapping[str, Any], x: Any, y: Any, mu: float, anchor: Mapping[str, Any]) -> float:
    z = _logits(p, x)
    z = z - z.max(axis=1, keepdims=True)
    ce = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))
    return ce + 0.5 * mu * sum(float(((p[k] - anchor[k]) ** 2).sum()) for k in p)


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_one_step_follows_the_exact_gradient(model: str) -> None:
    # _descend's step on the whole batch equals lr x the finite-difference gradient of
    # mean cross-entropy + (mu/2)||p - anchor||^2.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4))
    y = rng.integers(0, 3, 12)
    shapes = (
        {"W1": (4, 5), "b1": (5,), "W2": (5, 3), "b2": (3,)}
        if model == "mlp"
        else {"W": (4, 3), "b": (3,)}
    )
    anchor = {k: rng.normal(size=s) for k, s in shapes.items()}
    p0 = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in anchor.items()}
    lr, mu = 1e-3, 0.7
    p1 = _descend(anchor, {k: v.copy() for k, v in p0.items()}, x, y, np.arange(12), 12, lr, mu)
    for k in shapes:
        numeric = np.zeros_like(p0[k])
        for idx in np.ndindex(p0[k].shape):
            hi = {n: v.copy() for n, v in p0.items()}
            lo = {n: v.copy() for n, v in p0.items()}
            hi[k][idx] += 1e-6
            lo[k][idx] -= 1e-6
            numeric[idx] = (_loss(hi, x, y, mu, anchor) - _loss(lo, x, y, mu, anchor)) / 2e-6
        np.testing.assert_allclose((p0[k] - p1[k]) / lr, numeric, rtol=1e-4, atol=1e-6)
