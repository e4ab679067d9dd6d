"""The buffer's mean, summed slice by slice, is exactly the float64 sum cast once."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _old_flush_formula(deltas: list[Weights], coefs: list[float], template: Weights) -> Weights:
    """The flush as it was before the delta-dtype scratch (bd9f05e): each term multiplied
    straight into a float64 slice (casting="unsafe"), then added, slice by slice."""
    out: Weights = {}
    for k, v in template.items():
        flat = np.empty(v.size, dtype=v.dtype)
        acc = np.empty(min(flat.size, 1 << 15), dtype=np.float64)
        tmp = np.empty_like(acc)
        parts = [d[k].reshape(-1) for d in deltas]
        for start in range(0, flat.size, 1 << 15):
            summed = acc[: flat[start : start + (1 << 15)].size]
            scaled = tmp[: summed.size]
            summed[...] = 0.0
            for c, part in zip(coefs, parts, strict=True):
                np.multiply(part[start : start + (1 << 15)], c, out=scaled, casting="unsafe")
                summed += scaled
            with np.errstate(over="ignore"):
                flat[start : start + (1 << 15)] = summed
        out[k] = flat.reshape(v.shape)
    return out


_SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 6e-8, 65504.0, -65504.0, 3.4e38, -3.4e38, 1e-300]


@settings(max_examples=60, deadline=None)
@given(
    dtypes=st.lists(st.sampled_from(["<f2", "<f4", "<f8"]), min_size=1, max_size=6),
    model=st.sampled_from(["<f4", "<f8"]),
    seed=st.integers(0, 2**32 - 1),
    special=st.booleans(),
    weights=st.lists(st.integers(0, 1000), min_size=6, max_size=6),
    discounts=st.lists(st.floats(1e-3, 1.0), min_size=6, max_size=6),
)
def test_flush_is_bit_identical_to_the_float64_slice_formula(
    dtypes: list[str],
    model: str,
    seed: int,
    special: bool,
    weights: list[int],
    discounts: list[float],
) -> None:
    """fp16, fp32 and fp64 deltas (a codec's) into a float32 or float64 model, with signed
    zeros, subnormals and values near each type's maximum (overflow to inf included): the
    same bits as the former formula, over several slices and a partial last one."""
    rng = np.random.default_rng(seed)
    template: Weights = {"big": np.zeros(70_001, model), "small": np.zeros((3, 2), model)}
    buf = UpdateBuffer(template, clip_norm=None, weighting="examples")
    deltas: list[Weights] = []
    for i, dt in enumerate(dtypes):
        d: Weights = {}
        for k, v in template.items():
            values = rng.standard_normal(v.shape) * 10.0 ** float(rng.integers(-6, 3))
            if special:
                flat = values.reshape(-1)
                picks = rng.integers(0, flat.size, size=min(flat.size, 50))
                flat[picks] = rng.choice(_SPECIAL, size=picks.size)
            with np.errstate(over="ignore"):
                d[k] = values.astype(dt)
        buf.add(d, discounts[i], max(1, weights[i]), 1, norm=1.0)
        deltas.append(d)
    total = float(sum(max(1, w) for w in weights[: len(dtypes)]))
    coefs = [discounts[i] * max(1, weights[i]) / total for i in range(len(dtypes))]
    with np.errstate(over="ignore", invalid="ignore"):
        got = buf.flush().delta
        want = _old_flush_formula(deltas, coefs, template)
    for k in template:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert got[k].tobytes() == want[k].tobytes(), k
