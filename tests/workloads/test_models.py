"""Training plans: softmax regression (numpy) and the small torch models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import Weights
from fedloom.algorithms.training import TrainConfig, TrainingPlan
from fedloom.workloads.datasets import DirichletFederated, Split, SyntheticFederated
from fedloom.workloads.models import (
    SeededRng,
    SoftmaxRegression,
    TorchCNN,
    TorchMLP,
    make_model,
    minibatch_order,
)


def _toy(n: int = 40, d: int = 5, c: int = 3, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, c, n).astype(np.int64)
    return Split(x, y)


def _random_weights(d: int, c: int, seed: int, scale: float = 0.5) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "W": rng.normal(0, scale, (d, c)).astype(np.float32),
        "b": rng.normal(0, scale, c).astype(np.float32),
    }


def _copy(w: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in w.items()}


# -------------------------------------------------------------------------- train config


def test_train_config_defaults_and_validation() -> None:
    cfg = TrainConfig.from_mapping({})
    assert (cfg.lr, cfg.local_steps, cfg.batch_size, cfg.mu, cfg.seed) == (0.05, 5, 10, 0.0, 0)
    assert TrainConfig.from_mapping(cfg.to_dict()) == cfg
    for bad in (
        {"lr": 0},
        {"lr": float("nan")},
        {"local_steps": 0},
        {"batch_size": 2.5},
        {"mu": -1},
        {"seed": -3},
        {"seed": True},
        {"lr": "fast"},
    ):
        key = next(iter(bad))
        with pytest.raises(ValueError, match=key):
            TrainConfig.from_mapping(bad)


def test_plans_satisfy_the_protocol() -> None:
    assert isinstance(SoftmaxRegression(4, 3, _toy(d=4)), TrainingPlan)
    assert isinstance(TorchMLP(4, 3, _toy(d=4)), TrainingPlan)


# --------------------------------------------------------------------------- minibatches


def test_minibatch_order_walks_permutations() -> None:
    rng = SeededRng()
    idx = minibatch_order(rng.reset(5), 30, 30)
    np.testing.assert_array_equal(np.sort(idx), np.arange(30))
    two_epochs = minibatch_order(rng.reset(5), 30, 60)
    np.testing.assert_array_equal(np.sort(two_epochs[:30]), np.arange(30))
    np.testing.assert_array_equal(np.sort(two_epochs[30:]), np.arange(30))
    big = minibatch_order(rng.reset(5), 100_000, 50)
    assert len(set(big.tolist())) == 50 and big.max() < 100_000
    np.testing.assert_array_equal(minibatch_order(rng.reset(5), 30, 12), idx[:12])
    assert not np.array_equal(minibatch_order(rng.reset(6), 30, 30), idx)


@pytest.mark.parametrize(("n", "total"), [(40, 50), (7, 50), (10, 30), (1, 3), (3, 4)])
def test_minibatch_order_over_epochs_is_the_successive_permutations(n: int, total: int) -> None:
    """Past one epoch the order is exactly ``rng.permutation(n)`` drawn epoch after epoch
    (the stream every seeded run's results depend on), cut at ``total``."""
    rng = SeededRng()
    for seed in range(20):
        gen = rng.reset(seed)
        expected = np.concatenate([gen.permutation(n) for _ in range(-(-total // n))])[:total]
        got = minibatch_order(rng.reset(seed), n, total)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def test_seeded_rng_streams_are_distinct_for_adjacent_seeds() -> None:
    rng = SeededRng()
    draws = [rng.reset(s).random(4).tolist() for s in (0, 1, 2, 2**64 + 1)]
    assert len({tuple(d) for d in draws}) == 4
    assert rng.reset(1).random(4).tolist() == draws[1]


# ------------------------------------------------------------------------------- softmax


def test_softmax_gradient_matches_finite_differences() -> None:
    data = _toy(n=25, d=4, c=3, seed=1)
    plan = SoftmaxRegression(4, 3, data)
    w = {k: v.astype(np.float64) for k, v in _random_weights(4, 3, seed=2).items()}
    anchor = {k: v.astype(np.float64) for k, v in _random_weights(4, 3, seed=3).items()}
    for mu in (0.0, 0.7):
        _, grad = plan.objective(w, data.x, data.y, mu=mu, anchor=anchor)
        eps = 1e-6
        for name in ("W", "b"):
            num = np.zeros_like(w[name])
            for ix in np.ndindex(w[name].shape):
                hi, lo = _copy(w), _copy(w)
                hi[name][ix] += eps
                lo[name][ix] -= eps
                f_hi, _ = plan.objective(hi, data.x, data.y, mu=mu, anchor=anchor)
                f_lo, _ = plan.objective(lo, data.x, data.y, mu=mu, anchor=anchor)
                num[ix] = (f_hi - f_lo) / (2 * eps)
            np.testing.assert_allclose(grad[name], num, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_softmax_train_step_is_the_exact_full_batch_gradient_step(mu: float) -> None:
    data = _toy(n=16, d=6, c=4, seed=4)
    plan = SoftmaxRegression(6, 4, data)
    w0 = _random_weights(6, 4, seed=5)
    lr = 0.3
    cfg = {"lr": lr, "local_steps": 1, "batch_size": 16, "mu": mu, "seed": 9}
    out = plan.train(w0, cfg).weights
    # at w = w_global the proximal gradient is zero; the step is -lr * CE gradient
    _, g = plan.objective(w0, data.x, data.y)
    for k in ("W", "b"):
        np.testing.assert_allclose(out[k], w0[k] - lr * g[k], rtol=1e-5, atol=1e-6)
    # two steps: the second includes mu * (w1 - w0)
    out2 = plan.train(w0, dict(cfg, local_steps=2)).weights
    w1 = {k: (w0[k].astype(np.float64) - lr * g[k]) for k in w0}
    _, g1 = plan.objective(w1, data.x, data.y, mu=mu, anchor=w0)
    for k in ("W", "b"):
        np.testing.assert_allclose(out2[k], w1[k] - lr * g1[k], rtol=1e-5, atol=1e-6)


def test_fedprox_term_pulls_towards_the_global_weights() -> None:
    ds = SyntheticFederated(3, 1.0, 1.0, seed=0, samples_per_site=200)
    site = ds.site(0)
    plan = SoftmaxRegression(60, 10, site.train, site.test)
    w0 = plan.init(0)
    base = {"lr": 0.05, "local_steps": 50, "batch_size": 10, "seed": 1}

    def dist(mu: float) -> float:
        out = plan.train(w0, dict(base, mu=mu)).weights
        return float(sum(np.sum((out[k] - w0[k]) ** 2) for k in w0))

    d0, d1, d10 = dist(0.0), dist(1.0), dist(10.0)
    assert d10 < d1 < d0


def test_softmax_never_mutates_inputs_and_returns_float32() -> None:
    data = _toy()
    plan = SoftmaxRegression(5, 3, data)
    w = _random_weights(5, 3, seed=1)
    frozen = _copy(w)
    for arr in w.values():
        arr.setflags(write=False)  # read-only input must be fine too
    res = plan.train(w, {"lr": 0.1, "local_steps": 3, "batch_size": 4, "mu": 0.5, "seed": 0})
    for k in w:
        np.testing.assert_array_equal(w[k], frozen[k])
        assert res.weights[k].dtype == np.float32
        assert res.weights[k].shape == w[k].shape
        assert not np.shares_memory(res.weights[k], w[k])
    assert res.n_examples == 40


def test_softmax_is_deterministic_in_the_seed() -> None:
    data = _toy(n=50)
    plan = SoftmaxRegression(5, 3, data)
    w = _random_weights(5, 3, seed=1)
    cfg: dict[str, Any] = {"lr": 0.1, "local_steps": 5, "batch_size": 4, "seed": 3}
    a = plan.train(w, cfg).weights
    b = SoftmaxRegression(5, 3, data).train(w, cfg).weights
    c = plan.train(w, dict(cfg, seed=4)).weights
    np.testing.assert_array_equal(a["W"], b["W"])
    assert not np.array_equal(a["W"], c["W"])


def test_softmax_stays_exact_when_logits_are_huge() -> None:
    # logits around 1e3 overflow a plain exp: the stable fallback must take over
    data = _toy(n=20, d=5, c=3, seed=7)
    plan = SoftmaxRegression(5, 3, data)
    w = _random_weights(5, 3, seed=8, scale=400.0)
    cfg = {"lr": 0.01, "local_steps": 1, "batch_size": 20, "seed": 0}
    with np.errstate(over="ignore", invalid="ignore"):
        out = plan.train(w, cfg).weights
    _, g = plan.objective(w, data.x, data.y)
    assert all(np.isfinite(v).all() for v in out.values())
    np.testing.assert_allclose(out["W"], w["W"] - 0.01 * g["W"], rtol=1e-5, atol=1e-3)


def test_softmax_training_improves_breast_cancer_accuracy() -> None:
    ds = DirichletFederated("breast_cancer", 1, seed=0)
    test, _ = ds.test_set()
    plan = SoftmaxRegression(30, 2, ds.site(0).train, test)
    w0 = plan.init(0)
    before = plan.evaluate(w0)
    assert before["loss"] == pytest.approx(np.log(2))
    w = plan.train(w0, {"lr": 0.1, "local_steps": 200, "batch_size": 16, "seed": 0}).weights
    after = plan.evaluate(w)
    assert after["accuracy"] > 0.93 > before["accuracy"]
    assert after["loss"] < 0.3


def test_softmax_rejects_wrong_weights() -> None:
    plan = SoftmaxRegression(5, 3, _toy())
    with pytest.raises(ValueError, match="expected"):
        plan.train(_random_weights(4, 3, 0), {})
    with pytest.raises(ValueError, match="'b'"):
        plan.train({"W": np.zeros((5, 3), np.float32)}, {})
    with pytest.raises(ValueError, match="no training data"):
        SoftmaxRegression(5, 3).train(_random_weights(5, 3, 0), {})


def test_softmax_evaluates_on_train_when_no_test_split() -> None:
    data = _toy(n=30)
    w = _random_weights(5, 3, seed=2)
    assert SoftmaxRegression(5, 3, data).evaluate(w) == SoftmaxRegression(
        5, 3, None, data
    ).evaluate(w)


def test_plan_pickles() -> None:
    import pickle

    plan = SoftmaxRegression(5, 3, _toy())
    w = plan.init(0)
    plan.train(w, {"seed": 1})
    clone = pickle.loads(pickle.dumps(plan))
    a = plan.train(w, {"seed": 2}).weights
    b = clone.train(w, {"seed": 2}).weights
    np.testing.assert_array_equal(a["W"], b["W"])


# --------------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def digits() -> tuple[Split, Split]:
    ds = DirichletFederated("digits", 1, seed=0)
    return ds.site(0).train, ds.test_set()[0]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_torch_models_train_and_round_trip(name: str, digits: tuple[Split, Split]) -> None:
    train, test = digits
    plan = make_model(name, 64, 10, train=train, test=test)
    w0 = plan.init(0)
    assert all(v.dtype == np.float32 for v in w0.values())
    np.testing.assert_array_equal(plan.init(0)[next(iter(w0))], w0[next(iter(w0))])
    frozen = _copy(w0)
    # round trip: weights in, weights out, unchanged without training
    assert plan.evaluate(w0) == plan.evaluate(_copy(w0))
    cfg = {"lr": 0.1, "local_steps": 60, "batch_size": 32, "seed": 1}
    res = plan.train(w0, cfg)
    assert list(res.weights) == list(w0)  # state_dict order
    for k in w0:
        np.testing.assert_array_equal(w0[k], frozen[k])
        assert res.weights[k].shape == w0[k].shape and res.weights[k].dtype == np.float32
    before, after = plan.evaluate(w0), plan.evaluate(res.weights)
    assert after["accuracy"] > before["accuracy"] + 0.3
    assert after["loss"] < before["loss"]
    # deterministic given the seed, also in a fresh plan
    again = make_model(name, 64, 10, train=train, test=test).train(w0, cfg)
    for k in w0:
        np.testing.assert_array_equal(res.weights[k], again.weights[k])


def test_torch_fedprox_pulls_towards_global(digits: tuple[Split, Split]) -> None:
    train, test = digits
    plan = TorchMLP(64, 10, train, test, hidden=16)
    w0 = plan.init(3)
    base = {"lr": 0.1, "local_steps": 30, "batch_size": 16, "seed": 2}

    def dist(mu: float) -> float:
        out = plan.train(w0, dict(base, mu=mu)).weights
        return float(sum(np.sum((out[k] - w0[k]) ** 2) for k in w0))

    assert dist(5.0) < dist(0.0)


def test_torch_rejects_wrong_weights(digits: tuple[Split, Split]) -> None:
    train, _ = digits
    plan = TorchMLP(64, 10, train)
    w = plan.init(0)
    w.pop(next(iter(w)))
    with pytest.raises(ValueError, match="expected keys"):
        plan.train(w, {})


def test_cnn_needs_square_images() -> None:
    with pytest.raises(ValueError, match="square"):
        TorchCNN(30, 2)


def test_make_model_names() -> None:
    assert isinstance(make_model("softmax", 4, 2), SoftmaxRegression)
    with pytest.raises(ValueError, match="unknown model"):
        make_model("resnet", 4, 2)
