"""Robust aggregation: norm clipping, coordinate-wise median, coordinate-wise trimmed mean.

* Norm clipping bounds one update's influence: Δ ← Δ · min(1, C / ‖Δ‖₂)
  (as in DP-FedAvg, McMahan et al. 2018, and robust FL practice).
* Coordinate-wise median and β-trimmed mean (Yin et al., ICML 2018, "Byzantine-robust
  distributed learning"): per coordinate, sort the n values, drop ⌊βn⌋ from each end, average
  the rest. Both are unweighted over the inputs they are given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from algorithms.protocol import Weights
from algorithms.weights_math import l2_norm

__all__ = ["clip_by_norm", "coordinate_median", "trimmed_mean"]


def clip_by_norm(delta: Weights, max_norm: float) -> tuple[Weights, bool]:
    """Scale ``delta`` so its global L2 norm is at most ``max_norm``; say whether it was clipped."""
    if not max_norm > 0.0:
        raise ValueError(f"clip norm must be > 0, got {max_norm}")
    norm = l2_norm(delta)
    if norm <= max_norm:
        return delta, False
    factor = max_norm / norm
    return {k: (v * factor).astype(v.dtype, copy=False) for k, v in delta.items()}, True


def _stack(deltas: Sequence[Weights], name: str) -> np.ndarray:
    return np.stack([np.asarray(d[name], dtype=np.float64) for d in deltas])


def coordinate_median(deltas: Sequence[Weights]) -> Weights:
    """Per-coordinate median of the deltas (dtype of the first)."""
    if not deltas:
        raise ValueError("median of no deltas")
    first = deltas[0]
    return {
        k: np.median(_stack(deltas, k), axis=0).astype(v.dtype, copy=False)
        for k, v in first.items()
    }


def trimmed_mean(deltas: Sequence[Weights], beta: float) -> Weights:
    """Per-coordinate mean after dropping the ⌊β·n⌋ smallest and largest values.

    ``beta`` is in [0, 0.5); when it would trim everything the median's middle value(s) remain.
    """
    if not deltas:
        raise ValueError("trimmed mean of no deltas")
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {beta}")
    n = len(deltas)
    cut = min(math.floor(beta * n), (n - 1) // 2)
    first = deltas[0]
    out: Weights = {}
    for k, v in first.items():
        stacked = np.sort(_stack(deltas, k), axis=0)
        out[k] = stacked[cut : n - cut].mean(axis=0).astype(v.dtype, copy=False)
    return out
