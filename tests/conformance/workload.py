"""A small learning task with a known optimum, for cases that must show convergence.

Least squares: every site holds ``N`` examples ``(x, y)`` with ``y = x·w* + b* + noise``
(its own draw of ``x``, one shared ``w*, b*``). A job takes ``STEPS`` full-batch gradient
steps from the weights it is given. The global optimum is ``(w*, b*)`` up to the noise, so
"how far from it" is a distance in weight space, not an accuracy figure from one run.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.protocol import TrainResult, Weights

DIM = 16
N = 64
STEPS = 5
LR = 0.1
NOISE = 0.01


def optimum() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12345)
    return {
        "w": rng.standard_normal(DIM).astype(np.float32),
        "b": rng.standard_normal(1).astype(np.float32),
    }


def start() -> dict[str, np.ndarray]:
    return {"w": np.zeros(DIM, dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}


def distance(weights: Mapping[str, np.ndarray]) -> float:
    """Euclidean distance from ``weights`` to the optimum."""
    best = optimum()
    return float(
        np.sqrt(sum(np.sum((np.asarray(weights[k], np.float64) - best[k]) ** 2) for k in best))
    )


def site_data(node_id: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(node_id.encode()))
    best = optimum()
    x = rng.standard_normal((N, DIM))
    y = x @ best["w"] + best["b"][0] + NOISE * rng.standard_normal(N)
    return x, y


class LeastSquaresTrainer:
    """``STEPS`` gradient steps on the site's own examples (picklable, deterministic)."""

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        x, y = site_data(node_id)
        w = np.asarray(weights["w"], np.float64).copy()
        b = float(np.asarray(weights["b"], np.float64)[0])
        for _ in range(STEPS):
            err = x @ w + b - y
            w -= LR * (x.T @ err) / N
            b -= LR * float(err.mean())
        loss = float(np.mean((x @ w + b - y) ** 2))
        out = {"w": w.astype(np.float32), "b": np.array([b], dtype=np.float32)}
        return TrainResult(out, N, {"loss": loss})
