"""Workloads: lazy per-site plans, global evaluation, pickling, strict config."""

from __future__ import annotations

import pickle
import tracemalloc
from typing import Any

import numpy as np
import pytest

from fedloom.workloads.datasets import Split
from fedloom.workloads.models import SoftmaxRegression
from fedloom.workloads.workload import ModelSpec, SklearnSpec, SyntheticSpec, Workload, from_config

TRAIN = {"lr": 0.05, "local_steps": 5, "batch_size": 10, "mu": 0.0, "seed": 0}


def _fedavg_round(wl: Workload, w: dict[str, np.ndarray], rnd: int) -> dict[str, np.ndarray]:
    results = [
        wl.site_plan(i).train(w, dict(TRAIN, seed=rnd * 1000 + i)) for i in range(wl.n_sites)
    ]
    total = sum(r.n_examples for r in results)
    out: dict[str, np.ndarray] = {}
    for k in w:
        out[k] = np.sum([r.n_examples * r.weights[k] for r in results], axis=0) / total
    return out


def test_synthetic_workload_basics() -> None:
    wl = Workload(SyntheticSpec(samples_per_site=50), 30, ModelSpec("softmax"), seed=2)
    assert (wl.n_sites, wl.n_features, wl.n_classes) == (30, 60, 10)
    assert wl.n_examples(4) == 45
    w = wl.init_weights(0)
    assert set(w) == {"W", "b"} and w["W"].shape == (60, 10)
    ev = wl.evaluate(w)
    assert ev["eval_sites"] == 30 and ev["n_test"] == 30 * 5
    assert ev["accuracy"] >= 0 and ev["loss"] == pytest.approx(np.log(10))
    desc = wl.describe()
    assert desc["n_params"] == 610 and desc["eval_sites"] == 30
    assert desc["dataset"]["name"] == "synthetic"


def test_eval_sites_caps_the_pooled_sites() -> None:
    wl = Workload(SyntheticSpec(samples_per_site=60), 500, seed=1, eval_sites=20)
    ev = wl.evaluate(wl.init_weights(0))
    assert ev["eval_sites"] == 20 and ev["n_test"] == 20 * 6


def test_site_plans_are_cached_lru() -> None:
    wl = Workload(SyntheticSpec(samples_per_site=50), 10, cache_size=3)
    p0 = wl.site_plan(0)
    assert wl.site_plan(0) is p0
    for i in (1, 2, 3):
        wl.site_plan(i)
    assert len(wl._plans) == 3
    assert wl.site_plan(0) is not p0  # evicted and rebuilt
    # rebuilt plan trains identically
    w = wl.init_weights(0)
    a = p0.train(w, TRAIN).weights["W"]
    b = wl.site_plan(0).train(w, TRAIN).weights["W"]
    np.testing.assert_array_equal(a, b)


def test_workload_pickles_small_and_deterministic() -> None:
    wl = Workload(SyntheticSpec(alpha=0.5, beta=0.5), 200, seed=7)
    wl.site_plan(3)
    wl.evaluate(wl.init_weights(0))
    blob = pickle.dumps(wl)
    assert len(blob) < 2000  # specs only, no data, no cached plans
    clone = pickle.loads(blob)
    assert [clone.n_examples(i) for i in range(20)] == [wl.n_examples(i) for i in range(20)]
    w = wl.init_weights(1)
    a = wl.site_plan(3).train(w, TRAIN).weights
    b = clone.site_plan(3).train(w, TRAIN).weights
    np.testing.assert_array_equal(a["W"], b["W"])
    assert wl.evaluate(a) == clone.evaluate(a)


def test_sklearn_workload_pickles() -> None:
    wl = Workload(SklearnSpec("digits", dirichlet_alpha=0.3), 10, seed=1)
    clone = pickle.loads(pickle.dumps(wl))
    assert [clone.n_examples(i) for i in range(10)] == [wl.n_examples(i) for i in range(10)]


def test_federated_training_improves_breast_cancer() -> None:
    wl = from_config({"dataset": "breast_cancer", "dirichlet_alpha": 0.5}, n_sites=5, seed=0)
    w = wl.init_weights(0)
    before = wl.evaluate(w)
    for rnd in range(15):
        w = _fedavg_round(wl, w, rnd)
    after = wl.evaluate(w)
    assert after["eval_sites"] == 0 and after["n_test"] == 114
    assert after["accuracy"] > 0.9 and after["accuracy"] > before["accuracy"] + 0.2


def test_ten_thousand_site_workload_is_lazy() -> None:
    tracemalloc.start()
    try:
        wl = from_config(
            {"dataset": "synthetic", "alpha": 1.0, "beta": 1.0, "model": "softmax"},
            n_sites=10_000,
            seed=0,
        )
        sizes = [wl.n_examples(i) for i in range(wl.n_sites)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(sizes) == 10_000 and min(sizes) >= 45
    # the data of all sites would be ~5M examples x 60 floats (> 1 GB); we hold ints only
    assert peak < 20_000_000
    assert len(wl._plans) == 0


def test_mlp_and_cnn_workloads() -> None:
    mlp = from_config({"dataset": "breast_cancer", "model": "mlp", "hidden": 8}, n_sites=3)
    assert mlp.describe()["n_params"] == 30 * 8 + 8 + 8 * 2 + 2
    cnn = from_config({"dataset": "digits", "model": "cnn"}, n_sites=3)
    w = cnn.init_weights(0)
    res = cnn.site_plan(1).train(w, TRAIN)
    assert res.n_examples == cnn.n_examples(1)
    assert set(cnn.evaluate(res.weights)) >= {"accuracy", "loss"}


def test_from_config_examples_from_the_brief() -> None:
    wl = from_config(
        {"dataset": "synthetic", "alpha": 1.0, "beta": 1.0, "iid": False, "samples_per_site": 50},
        n_sites=4,
    )
    assert isinstance(wl.site_plan(0), SoftmaxRegression)
    assert wl.dataset_spec == SyntheticSpec(1.0, 1.0, False, 50, None)
    assert Workload.from_config({"dataset": "digits", "n_sites": 3}).n_classes == 10
    # a seed in the table wins over the run seed
    pinned = from_config({"dataset": "synthetic", "seed": 5}, n_sites=3, seed=9)
    assert pinned.seed == 5
    assert from_config({"dataset": "synthetic"}, n_sites=3, seed=9).seed == 9


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"dataset": "mnist"}, "dataset"),
        ({"dataset": "synthetic", "alpha": -1}, "alpha"),
        ({"dataset": "synthetic", "beta": "x"}, "beta"),
        ({"dataset": "synthetic", "iid": 1}, "iid"),
        ({"dataset": "synthetic", "samples_per_site": 1}, "samples_per_site"),
        ({"dataset": "synthetic", "dirichlet_alpha": 0.5}, "dirichlet_alpha"),
        ({"dataset": "digits", "alpha": 0.5}, "alpha"),
        ({"dataset": "digits", "dirichlet_alpha": 0}, "dirichlet_alpha"),
        ({"dataset": "digits", "test_fraction": 1.5}, "test_fraction"),
        ({"dataset": "digits", "model": "resnet"}, "model"),
        ({"dataset": "breast_cancer", "model": "cnn"}, "model"),
        ({"dataset": "digits", "hidden": 0}, "hidden"),
        ({"dataset": "digits", "eval_sites": 0}, "eval_sites"),
        ({"dataset": "digits", "learning_rate": 0.1}, "learning_rate"),
        ({"dataset": "digits", "n_sites": 0}, "n_sites"),
        ({"dataset": "digits", "n_sites": 5}, "n_sites"),  # disagrees with the keyword
    ],
)
def test_from_config_names_the_bad_field(cfg: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        from_config(cfg, n_sites=3)


def test_from_config_needs_n_sites() -> None:
    with pytest.raises(ValueError, match="n_sites"):
        from_config({"dataset": "digits"})
    with pytest.raises(ValueError, match="at least"):
        from_config({"dataset": "breast_cancer"}, n_sites=500)


def test_a_cached_plan_is_counted_at_what_it_holds() -> None:
    # The cache's byte budget must see what a plan keeps alive (its training rows and its
    # evaluation split), not only the data it was built from: 100,000 sites thrashed a
    # cache that counted a third of each plan.
    wl = Workload(SyntheticSpec(samples_per_site=50), 200, seed=1)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(200):
            wl.site_plan(i)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    counted = wl._cached_bytes
    assert counted >= 0.8 * held  # the rest: Python objects around the arrays
    # Budgeted in bytes: a cache of 10 plans' bytes keeps 10 plans.
    one = wl._sizes[0]
    small = Workload(SyntheticSpec(samples_per_site=50), 200, seed=1, cache_bytes=10 * one)
    for i in range(30):
        small.site_plan(i)
    assert len(small._plans) == 10 and small._cached_bytes <= 10 * one


def test_float32_rows_train_exactly_as_float64_rows() -> None:
    # Plans keep float32 features in float32 (half the memory); a job widens the rows it
    # draws, so its arithmetic and result are those of float64 rows, bit for bit.
    site = Workload(SyntheticSpec(samples_per_site=80), 3, seed=4).dataset.site(1)
    wide = Split(site.train.x.astype(np.float64), site.train.y)  # type: ignore[arg-type]
    narrow = SoftmaxRegression(60, 10, train=site.train, test=site.test)
    reference = SoftmaxRegression(60, 10, train=wide, test=site.test)
    w = narrow.init(0)
    w = {k: v + 0.01 for k, v in w.items()}
    for seed in range(5):
        config = dict(TRAIN, seed=seed, mu=0.1 * seed)
        a, b = narrow.train(w, config).weights, reference.train(w, config).weights
        for k in w:
            np.testing.assert_array_equal(a[k], b[k])
    assert narrow.nbytes < 0.6 * reference.nbytes


def test_cache_mb_sets_the_byte_budget() -> None:
    wl = from_config({"dataset": "synthetic", "cache_mb": 3}, n_sites=10)
    assert wl.cache_bytes == 3 << 20
    with pytest.raises(ValueError, match="cache_mb"):
        from_config({"dataset": "synthetic", "cache_mb": 0}, n_sites=10)
