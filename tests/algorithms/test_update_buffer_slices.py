"""The buffer's mean, summed slice by slice, is exactly the float64 sum cast once."""

from __future__ import annotations

import numpy as np

from fedloom.algorithms.protocol import Weights
from fedloom.algorithms.update_buffer import UpdateBuffer

TEMPLATE: Weights = {
    "big": np.zeros((300, 700), np.float32),  # several slices, the last one partial
    "vec": np.zeros(5, np.float32),
    "scalar": np.zeros((), np.float32),
    "f64": np.zeros(70_000, np.float64),
    "empty": np.zeros(0, np.float32),
}


def test_mean_is_the_float64_sum_in_order_cast_once() -> None:
    rng = np.random.default_rng(3)
    buf = UpdateBuffer(TEMPLATE, clip_norm=None, weighting="examples")
    added: list[tuple[Weights, float, int]] = []
    for _ in range(7):
        d: Weights = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in TEMPLATE.items()}
        s, n = float(rng.uniform(0.1, 1.0)), int(rng.integers(1, 50))
        buf.add(d, s, n, 1)
        added.append((d, s, n))
    agg = buf.flush()
    total = sum(n for _, _, n in added)
    for k, v in TEMPLATE.items():
        # The whole-array computation the slices replace: each term into float64, summed.
        ref, term = np.zeros(v.shape, np.float64), np.empty(v.shape, np.float64)
        for d, s, n in added:
            np.multiply(d[k], s * n / total, out=term, casting="unsafe")
            ref += term
        want = ref.astype(v.dtype)
        assert agg.delta[k].dtype == v.dtype and agg.delta[k].shape == v.shape
        assert agg.delta[k].tobytes() == want.tobytes(), k
