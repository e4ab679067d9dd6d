from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedloom.sim.compute import (
    ComputeModel,
    Constant,
    Exponential,
    Gaussian,
    HalfNormal,
    LogNormal,
    distribution_from_config,
)


def _draws(model: ComputeModel, site: str, n: int) -> np.ndarray:
    return np.array([model.duration(site) for _ in range(n)])


@pytest.mark.parametrize(
    "cfg",
    [
        {"distribution": "constant", "mean_s": 30.0},
        {"distribution": "gaussian", "mean_s": 30.0, "sd_s": 5.0, "min_s": 1.0},
        {"distribution": "halfnormal", "sd_s": 10.0, "min_s": 20.0},
        {"distribution": "exponential", "mean_s": 30.0, "min_s": 5.0},
        {"distribution": "lognormal", "mean_s": 30.0, "sigma": 0.5},
        {"distribution": "lognormal", "median_s": 30.0, "sigma": 0.3, "min_s": 2.0},
    ],
)
def test_sample_means_match_the_distribution(cfg: dict[str, Any]) -> None:
    model = ComputeModel.from_config(cfg, seed=3)
    draws = _draws(model, "site-1", 4000)
    assert draws.min() >= cfg.get("min_s", 0.0)
    expected = model.distribution.mean
    assert draws.mean() == pytest.approx(expected, rel=0.05)


def test_means_are_what_the_names_say() -> None:
    assert Constant(4.0).mean == 4.0
    assert HalfNormal(sd_s=1.0, min_s=2.0).mean == pytest.approx(2 + math.sqrt(2 / math.pi))
    assert Exponential(mean_s=10.0, min_s=2.0).mean == 10.0
    assert LogNormal(median_s=10.0, sigma=0.0).mean == 10.0
    assert Gaussian(mean_s=10.0, sd_s=1.0).mean == pytest.approx(10.0)
    # Clipping at min_s raises the mean of a gaussian centred on it.
    assert Gaussian(mean_s=0.0, sd_s=1.0).mean == pytest.approx(1 / math.sqrt(2 * math.pi))


def test_gaussian_is_truncated_at_min() -> None:
    model = ComputeModel(Gaussian(mean_s=1.0, sd_s=5.0, min_s=0.5), seed=1)
    draws = _draws(model, "s", 500)
    assert draws.min() == 0.5


def test_speed_divides_duration() -> None:
    model = ComputeModel(Constant(10.0), speeds={"fast": 2.0, "slow": 0.5})
    assert model.duration("fast") == 5.0
    assert model.duration("slow") == 20.0
    assert model.duration("other") == 10.0


def test_deterministic_per_seed_and_per_site() -> None:
    cfg = {"distribution": "exponential", "mean_s": 10.0}
    a = ComputeModel.from_config(cfg, seed=5)
    b = ComputeModel.from_config(cfg, seed=5)
    # Interleaving other sites does not change a site's stream.
    seq_a = [a.duration("s1") for _ in range(5)]
    seq_b = []
    for _ in range(5):
        b.duration("s2")
        seq_b.append(b.duration("s1"))
    assert seq_a == seq_b
    c = ComputeModel.from_config(cfg, seed=6)
    assert [c.duration("s1") for _ in range(5)] != seq_a
    assert _draws(ComputeModel.from_config(cfg, seed=5), "s2", 5).tolist() != seq_a


def test_empty_config_is_a_constant_minute() -> None:
    assert ComputeModel.from_config({}).duration("s") == 60.0


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"distribution": "weibull"}, "unknown 'weibull'"),
        ({"distribution": "gaussian", "mean_s": 1.0}, "needs sd_s"),
        ({"distribution": "constant", "mean_s": 1.0, "sd_s": 1.0}, "unknown field"),
        ({"distribution": "constant", "mean_s": -1.0}, "non-negative"),
        ({"distribution": "constant", "mean_s": "1"}, "must be a number"),
        ({"distribution": "exponential", "mean_s": 1.0, "min_s": 2.0}, "below mean_s"),
        ({"distribution": "lognormal", "sigma": 1.0}, "exactly one of median_s or mean_s"),
        ({"distribution": 3}, "must be a string"),
    ],
)
def test_config_errors_are_clear(cfg: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        distribution_from_config(cfg)


def test_bad_speeds_are_rejected() -> None:
    with pytest.raises(ValueError, match="speed"):
        ComputeModel(Constant(1.0), speeds={"s": 0.0})
