"""The Gaussian mechanism on model deltas: clip one site's contribution, noise a sum.

User-level DP (McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018): the unit of privacy is a site. Each site's contribution to one
released model is L2-clipped to ``clip`` = C over ALL its tensors together, the clipped
contributions are summed, and N(0, (z·C)²) is added to every coordinate of the SUM; the sum
is then divided by a fixed denominator (``algorithms.dp.release``). Adding or removing one
site moves the sum by at most C in L2, so one release is the Gaussian mechanism with noise
multiplier z.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.protocol import Weights
from fedloom.algorithms.weights_math import l2_norm

__all__ = ["add_gaussian", "clip_contribution", "l2_clip_factor"]


def l2_clip_factor(norm: float, clip: float) -> float:
    """The factor that brings an L2 norm of ``norm`` down to at most ``clip`` (1.0 when it
    is already within). A non-finite norm gives 0.0: such a contribution is dropped whole
    rather than let through unbounded."""
    if not clip > 0.0 or not math.isfinite(clip):
        raise ValueError(f"clip must be > 0 and finite, got {clip!r}")
    if not math.isfinite(norm):
        return 0.0
    if norm <= clip:
        return 1.0
    return clip / norm


def clip_contribution(
    delta: Mapping[str, npt.NDArray[np.floating]], clip: float
) -> tuple[dict[str, npt.NDArray[np.float64]], bool]:
    """``delta`` in float64 with its L2 norm (over all tensors) at most ``clip``; and
    whether it had to be scaled down. The result is a new dict of new arrays."""
    norm = l2_norm(delta)
    c = l2_clip_factor(norm, clip)
    if c == 0.0:  # not finite: nothing of it gets through (NaN * 0 would still be NaN)
        return {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in delta.items()}, True
    out = {k: np.asarray(v, dtype=np.float64) * c for k, v in delta.items()}
    # Rounding can leave the product a hair above the bound: scale again, each time by a
    # factor one ulp under clip/norm, until it is within (one or two rounds in practice).
    if c < 1.0:
        for _ in range(8):
            again = l2_norm(out)
            if again <= clip:
                break
            f = float(np.nextafter(clip / again, 0.0))
            out = {k: v * f for k, v in out.items()}
    return out, c < 1.0


def add_gaussian(total: Weights, sigma: float, rng: np.random.Generator) -> Weights:
    """``total`` + N(0, sigma²) on every coordinate, in float64 (new arrays, in the
    tensors' order, so a generator seeded alike gives the same noise)."""
    if not sigma >= 0.0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be >= 0 and finite, got {sigma!r}")
    out: Weights = {}
    for k, v in total.items():
        arr = np.asarray(v, dtype=np.float64)
        out[k] = arr + rng.normal(0.0, sigma, size=arr.shape) if sigma > 0.0 else arr.copy()
    return out
