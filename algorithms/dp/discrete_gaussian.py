"""The discrete Gaussian N_Z(0, σ²) over the integers, sampled as Canonne, Kamath and
Steinke do ("The Discrete Gaussian for Differential Privacy", NeurIPS 2020, Alg. 3 over a
discrete Laplace proposal), vectorised with numpy.

    P(X = x) = exp(−x²/2σ²) / Σ_{y∈Z} exp(−y²/2σ²),     x ∈ Z.

Alg. 3: t = ⌊σ⌋ + 1; draw Y from the discrete Laplace with scale t, P(Y = y) ∝ exp(−|y|/t);
accept it with probability exp(−(|Y| − σ²/t)² / 2σ²); else draw again. Here a whole batch
of proposals is drawn at once and the accepted ones kept (batch rejection; a proposal is
accepted with probability 0.44 to 0.76 depending on σ, so a few rounds fill any batch).

The discrete Laplace proposal is the difference of two independent geometric variables
with success probability 1 − exp(−1/t) (counting failures): its pmf is exactly
∝ exp(−|y|/t), the same law as CKS Alg. 2 produces (Alg. 2 builds it from a uniform
remainder and a geometric quotient so that every step is an exact Bernoulli(exp(−γ)) trial
in rational arithmetic). numpy draws the geometric and uniform variables in float64, so
the probabilities behind each draw are the formula's up to float64 rounding (relative
2^-52): the samples follow the discrete Gaussian to that precision, far below anything a
statistical test or a privacy analysis at δ ≥ 1e-12 can see. What this sampler is NOT is
CKS's bit-exact rational-arithmetic version, whose cost would be Python-level loops per
sample.

Measured on this repository's CI machine: 1M samples at σ = 3·10^4 (a secure-aggregation
member's σ for z = 1, clip 1, 16 fractional bits) in about 0.1 s; see the report of issue 12.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_SIGMA", "sample", "variance"]

# Above this the proposal's geometric variables lose integer precision in float64
# (they stay far below 2^53 up to here) and the centred int64 sums of members stay exact.
MAX_SIGMA = 2.0**40
# Proposals per wanted sample (acceptance is about 0.44 for σ < 1, 0.54 to 0.76 above).
_OVERDRAW_SMALL = 2.4
_OVERDRAW = 1.45


def sample(rng: np.random.Generator, sigma: float, n: int) -> npt.NDArray[np.int64]:
    """``n`` independent draws of the discrete Gaussian N_Z(0, sigma²), as int64.

    ``sigma == 0`` gives zeros (no noise). ValueError for a negative, non-finite or too
    large ``sigma`` (> ``MAX_SIGMA``) or a negative ``n``.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a whole number >= 0, got {n!r}")
    sigma = float(sigma)
    if not (0.0 <= sigma <= MAX_SIGMA):
        raise ValueError(f"sigma must be in [0, {MAX_SIGMA:g}], got {sigma!r}")
    n = int(n)
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    if sigma == 0.0:
        out[:] = 0
        return out
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # 1 − exp(−1/t), accurate for large t
    s2 = sigma * sigma
    centre = s2 / t
    filled = 0
    while filled < n:
        want = n - filled
        m = int(want * (_OVERDRAW_SMALL if sigma < 1.0 else _OVERDRAW)) + 16
        # numpy's geometric counts trials (>= 1): the difference of two is the same.
        y = rng.geometric(p, size=m).astype(np.int64)
        y -= rng.geometric(p, size=m)
        a = np.abs(y).astype(np.float64)
        a -= centre
        np.square(a, out=a)
        a *= -1.0 / (2.0 * s2)
        np.exp(a, out=a)
        accepted = y[rng.random(m) < a]
        take = min(want, accepted.size)
        out[filled : filled + take] = accepted[:take]
        filled += take
    return out


def variance(sigma: float, *, tail: float = 40.0) -> float:
    """The exact variance of N_Z(0, sigma²) (a sum over |x| ≤ tail·σ + 1; slightly below
    σ² for small σ, equal to it within 1e-12 relative for σ ≥ 3): for tests and reports."""
    if not sigma > 0.0:
        return 0.0
    m = int(tail * sigma) + 1
    x = np.arange(-m, m + 1, dtype=np.float64)
    w = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return float(np.sum(x * x * w) / np.sum(w))
