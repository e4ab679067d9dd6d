"""The discrete Gaussian sampler (Canonne, Kamath, Steinke 2020) against its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedloom.algorithms.dp.discrete_gaussian import MAX_SIGMA, sample, variance


def pmf(sigma: float, xs: np.ndarray) -> np.ndarray:
    """P(X = x) ∝ exp(−x²/2σ²), normalised over a range wide enough to hold all the mass."""
    m = int(12 * sigma) + 2  # exp(-72): nothing left beyond
    support = np.arange(-m, m + 1, dtype=np.float64)
    norm = np.exp(-(support**2) / (2 * sigma * sigma)).sum()
    return np.exp(-(xs.astype(np.float64) ** 2) / (2 * sigma * sigma)) / norm


def test_shape_dtype_and_reproducibility() -> None:
    a = sample(np.random.default_rng(7), 3.5, 1000)
    b = sample(np.random.default_rng(7), 3.5, 1000)
    assert a.dtype == np.int64 and a.shape == (1000,)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample(np.random.default_rng(8), 3.5, 1000))
    assert sample(np.random.default_rng(0), 2.0, 0).shape == (0,)
    assert not sample(np.random.default_rng(0), 0.0, 50).any()


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, MAX_SIGMA * 2])
def test_bad_sigma_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="sigma"):
        sample(np.random.default_rng(0), bad, 10)


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_n_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="n must"):
        sample(np.random.default_rng(0), 1.0, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("sigma", [0.4, 1.0, 1.7, 4.0, 12.5])
def test_empirical_pmf_matches_the_formula(sigma: float) -> None:
    n = 200_000
    x = sample(np.random.default_rng(int(sigma * 1000)), sigma, n)
    # Bins |x| <= k (each value its own bin) and the two tails pooled; every bin expects
    # at least 20 draws.
    k = 0
    while n * pmf(sigma, np.array([k + 1]))[0] >= 20:
        k += 1
    values = np.arange(-k, k + 1)
    expected = n * pmf(sigma, values)
    observed = np.array([(x == v).sum() for v in values], dtype=np.float64)
    tail_e = n - expected.sum()
    tail_o = n - observed.sum()
    if tail_e >= 5:
        expected = np.append(expected, tail_e)
        observed = np.append(observed, tail_o)
    else:
        expected[-1] += tail_e
        observed[-1] += tail_o
    p = stats.chisquare(observed, expected).pvalue
    assert p > 1e-4, (sigma, p)


def test_symmetric_and_centred() -> None:
    x = sample(np.random.default_rng(3), 2.0, 200_000)
    for k in (1, 2, 3):
        a, b = (x == k).sum(), (x == -k).sum()
        assert abs(a - b) < 5 * math.sqrt(a + b)


def test_variance_formula() -> None:
    # Slightly below σ² for small σ (the lattice), equal to it for larger σ.
    assert variance(0.3) < 0.3**2
    assert variance(5.0) == pytest.approx(25.0, rel=1e-10)
    assert variance(0.0) == 0.0


@settings(max_examples=25, deadline=None)
@given(
    sigma=st.floats(min_value=0.2, max_value=1e5, allow_nan=False),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_mean_and_variance_for_any_sigma(sigma: float, seed: int) -> None:
    n = 40_000
    x = sample(np.random.default_rng(seed), sigma, n).astype(np.float64)
    var = variance(sigma, tail=12.0)
    # Mean and variance within 6 of their standard errors, from the exact moments.
    m = int(12 * sigma) + 2
    support = np.arange(-m, m + 1, dtype=np.float64)
    fourth = float((pmf(sigma, support) * support**4).sum())
    assert abs(x.mean()) <= 6 * math.sqrt(var / n) + 1e-12
    assert abs(x.var() - var) <= 6 * math.sqrt((fourth - var * var) / n) + 1e-12


def test_large_batch_has_the_right_spread() -> None:
    # A secure-aggregation member's scale: z = 1, clip 1, 16 fractional bits, t = 5.
    sigma = (2.0**16 + math.sqrt(1e6)) / math.sqrt(5)
    x = sample(np.random.default_rng(11), sigma, 1_000_000)
    assert x.std() == pytest.approx(sigma, rel=0.005)
    assert abs(x.mean()) < 5 * sigma / 1000
