"""Clipping one site's contribution and the Gaussian mechanism's noise (algorithms.dp)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.dp.gaussian import add_gaussian, clip_contribution, l2_clip_factor
from fedloom.algorithms.weights_math import l2_norm


def weights(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {
        "w": (rng.normal(size=(4, 3)) * scale).astype(np.float32),
        "b": (rng.normal(size=(3,)) * scale).astype(np.float32),
    }


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(1e-6, 1e6),
    clip=st.floats(1e-3, 1e3),
)
def test_clip_bounds_the_norm_over_all_tensors(seed: int, scale: float, clip: float) -> None:
    delta = weights(np.random.default_rng(seed), scale)
    out, clipped = clip_contribution(delta, clip)
    norm = l2_norm(delta)
    assert l2_norm(out) <= clip
    assert clipped == (norm > clip)
    if not clipped:  # within the bound: unchanged (in float64)
        for k in delta:
            assert np.array_equal(out[k], delta[k].astype(np.float64))
    else:  # scaled as a whole: the direction is kept
        ratio = out["w"].reshape(-1)[0] / float(delta["w"].reshape(-1)[0])
        assert np.allclose(out["b"], delta["b"] * ratio, rtol=1e-5)


def test_non_finite_contribution_is_dropped_whole() -> None:
    delta = {"w": np.array([1.0, np.nan]), "b": np.array([np.inf])}
    out, clipped = clip_contribution(delta, 1.0)
    assert clipped and all(not v.any() for v in out.values())
    assert l2_clip_factor(math.inf, 1.0) == 0.0
    with pytest.raises(ValueError, match="clip"):
        l2_clip_factor(1.0, 0.0)


def test_gaussian_noise_has_the_calibrated_spread() -> None:
    total = {"w": np.zeros((500, 400)), "b": np.full(10, 3.0)}
    noised = add_gaussian(total, 0.25, np.random.default_rng(1))
    assert noised["w"].std() == pytest.approx(0.25, rel=0.01)
    assert abs(noised["w"].mean()) < 0.25 * 5 / math.sqrt(200_000)
    assert not np.array_equal(noised["b"], total["b"])
    # The same generator state gives the same noise; sigma 0 gives the input back.
    again = add_gaussian(total, 0.25, np.random.default_rng(1))
    assert np.array_equal(noised["w"], again["w"])
    assert np.array_equal(add_gaussian(total, 0.0, np.random.default_rng(1))["b"], total["b"])
    with pytest.raises(ValueError, match="sigma"):
        add_gaussian(total, -1.0, np.random.default_rng(1))
