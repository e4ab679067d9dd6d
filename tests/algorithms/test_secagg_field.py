"""Field encoding for secure aggregation: clipping, weighting, rounding, capacity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.secagg import field
from fedloom.algorithms.secagg.field import FieldSpec

TEMPLATE = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
D = 17


def _delta(values: np.ndarray) -> dict[str, np.ndarray]:
    return {"w": values[:12].reshape(3, 4), "b": values[12:]}


vectors = st.lists(
    st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False), min_size=D, max_size=D
).map(lambda xs: np.array(xs, dtype=np.float64))


def _clipped(x: np.ndarray, clip: float) -> np.ndarray:
    norm = float(np.linalg.norm(x))
    return x * (clip / norm) if norm > clip else x


def test_flatten_unflatten_round_trip_keeps_order_shapes_dtypes() -> None:
    w = {"z": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([7.0, 8.0])}
    flat = field.flatten(w)
    assert flat.dtype == np.float64
    assert flat.tolist() == [0, 1, 2, 3, 4, 5, 7, 8]  # dict order, not sorted
    back = field.unflatten(flat, w)
    assert list(back) == ["z", "a"]
    assert back["z"].dtype == np.float32 and back["z"].shape == (2, 3)
    np.testing.assert_array_equal(back["a"], w["a"])
    with pytest.raises(ValueError):
        field.unflatten(flat[:-1], w)


@settings(max_examples=200, deadline=None)
@given(
    x=vectors,
    weight=st.floats(0.0, 1.0),
    bits=st.integers(8, 24),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_within_rounding_error(
    x: np.ndarray, weight: float, bits: int, seed: int
) -> None:
    spec = FieldSpec(clip=2.0, precision_bits=bits, weight_cap=10)
    enc = field.encode(_delta(x), weight, spec, np.random.default_rng(seed))
    assert enc.dtype == np.uint32 and enc.shape == (D + 1,)
    total, wsum = field.decode_sum(enc, spec, TEMPLATE)
    expected = weight * _clipped(x, 2.0)
    err = np.linalg.norm(field.flatten(total) - expected)
    # float32 template adds its own rounding on top of the 2^-f of the encoding.
    assert err <= 2.0**-bits * math.sqrt(D) + 1e-6 * (1 + np.linalg.norm(expected))
    assert wsum == round(weight * 2**bits) / 2**bits


@settings(max_examples=100, deadline=None)
@given(
    xs=st.lists(vectors, min_size=1, max_size=40),
    weights=st.lists(st.floats(0.0, 1.0), min_size=40, max_size=40),
    seed=st.integers(0, 2**32 - 1),
)
def test_ring_sum_of_encodings_decodes_to_the_float_sum(
    xs: list[np.ndarray], weights: list[float], seed: int
) -> None:
    spec = FieldSpec(clip=1.5, precision_bits=16, weight_cap=100)
    field.check_capacity(len(xs), spec.clip, spec.precision_bits)
    rng = np.random.default_rng(seed)
    total = np.zeros(D + 1, dtype=np.uint32)
    for x, w in zip(xs, weights, strict=False):
        total += field.encode(_delta(x), w, spec, rng)  # wraps mod 2^32
    got, wsum = field.decode_sum(
        total, spec, {"w": np.zeros((3, 4)), "b": np.zeros(5)}, members=len(xs)
    )  # an honest sum always passes the range check
    expected = sum(w * _clipped(x, 1.5) for x, w in zip(xs, weights, strict=False))
    n = len(xs)
    assert np.max(np.abs(field.flatten(got) - expected)) < n * 2.0**-16
    assert abs(wsum - sum(weights[:n])) <= n * 2.0**-17


def test_negative_values_wrap_and_decode() -> None:
    spec = FieldSpec(clip=10.0, precision_bits=8, weight_cap=1)
    x = -np.ones(D) * 0.5
    enc = field.encode(_delta(x), 1.0, spec, np.random.default_rng(0))
    assert enc[0] == 2**32 - 128  # -0.5 * 2^8 mod 2^32
    got, _ = field.decode_sum(enc, spec, TEMPLATE)
    np.testing.assert_allclose(field.flatten(got), x)


def test_stochastic_rounding_is_unbiased() -> None:
    spec = FieldSpec(clip=10.0, precision_bits=2, weight_cap=1)
    x = np.full(D, 0.1)  # 0.4 in units of 2^-2: rounds to 0 or 1 unit
    rng = np.random.default_rng(7)
    trials = 4000
    total = np.zeros(D + 1, dtype=np.uint32)
    for _ in range(trials):
        total += field.encode(_delta(x), 1.0, spec, rng)
    got, wsum = field.decode_sum(total, spec, TEMPLATE)
    assert wsum == trials
    mean = field.flatten(got) / trials
    assert np.all(np.abs(mean - 0.1) < 0.01)  # deterministic rounding would give 0.0


def test_clipping_bounds_the_l2_norm() -> None:
    spec = FieldSpec(clip=1.0, precision_bits=20, weight_cap=1)
    x = np.arange(D, dtype=np.float64)
    got, _ = field.decode_sum(
        field.encode(_delta(x), 1.0, spec, np.random.default_rng(1)), spec, TEMPLATE
    )
    flat = field.flatten(got)
    assert abs(np.linalg.norm(flat) - 1.0) < 1e-4
    np.testing.assert_allclose(flat / np.linalg.norm(flat), x / np.linalg.norm(x), atol=1e-5)


def test_noise_is_added_to_the_vector_but_not_the_weight() -> None:
    spec = FieldSpec(clip=1.0, precision_bits=10, weight_cap=1)
    noise = np.arange(D, dtype=np.int64) - 8
    plain = field.encode(_delta(np.zeros(D)), 1.0, spec, np.random.default_rng(0))
    noisy = field.encode(_delta(np.zeros(D)), 1.0, spec, np.random.default_rng(0), noise=noise)
    assert (noisy[:D].view(np.int32) - plain[:D].view(np.int32)).tolist() == noise.tolist()
    assert noisy[D] == plain[D] == 2**10
    with pytest.raises(ValueError, match="noise"):
        field.encode(_delta(np.zeros(D)), 1.0, spec, np.random.default_rng(0), noise=noise[:-1])
    with pytest.raises(ValueError, match="noise"):
        field.encode(_delta(np.zeros(D)), 1.0, spec, np.random.default_rng(0), noise=noise * 0.5)


def test_encode_refuses_non_finite_and_bad_weights() -> None:
    spec = FieldSpec(clip=1.0, precision_bits=10, weight_cap=1)
    bad = np.zeros(D)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        field.encode(_delta(bad), 1.0, spec, np.random.default_rng(0))
    for w in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="weight"):
            field.encode(_delta(np.zeros(D)), w, spec, np.random.default_rng(0))


def test_encode_leaves_the_delta_untouched() -> None:
    spec = FieldSpec(clip=0.5, precision_bits=10, weight_cap=1)
    x = np.ones(D)
    delta = _delta(x.copy())
    field.encode(delta, 0.5, spec, np.random.default_rng(0))
    np.testing.assert_array_equal(field.flatten(delta), x)


def test_decode_checks_length_and_dtype() -> None:
    spec = FieldSpec(clip=1.0, precision_bits=10, weight_cap=1)
    with pytest.raises(ValueError):
        field.decode_sum(np.zeros(D, dtype=np.uint32), spec, TEMPLATE)
    with pytest.raises(ValueError):
        field.decode_sum(np.zeros(D + 1, dtype=np.int64), spec, TEMPLATE)


def test_capacity_names_the_fields_and_matches_the_bound() -> None:
    field.check_capacity(50, 1.0, 24)  # 50 * (2^24 + 1) < 2^31
    with pytest.raises(ValueError, match="precision_bits") as err:
        field.check_capacity(200, 1.0, 24)
    assert "clip" in str(err.value)
    # The bound is exact: the largest cohort that fits, and one more.
    m = int((2**31 - 1) // (4.0 * 2**20 + 1))
    field.check_capacity(m, 4.0, 20)
    with pytest.raises(ValueError):
        field.check_capacity(m + 1, 4.0, 20)
    # Noise uses the 10-sigma tail of the summed noise.
    with pytest.raises(ValueError, match="noise_sigma"):
        field.check_capacity(10, 1.0, 20, noise_sigma=2**31 / (10 * math.sqrt(10)))
    # clip < 1 still leaves room for the weight coordinate (2^f per member).
    with pytest.raises(ValueError):
        field.check_capacity(2**11, 0.01, 20)
    with pytest.raises(ValueError):
        FieldSpec(clip=1e6, precision_bits=16, weight_cap=1)  # one member does not fit


@pytest.mark.parametrize(
    ("clip", "bits", "cap"),
    [(0.0, 16, 1), (math.inf, 16, 1), (1.0, 0, 1), (1.0, 31, 1), (1.0, 16, 0), (1.0, True, 1)],
)
def test_fieldspec_validates(clip: float, bits: int, cap: int) -> None:
    with pytest.raises(ValueError):
        FieldSpec(clip=clip, precision_bits=bits, weight_cap=cap)


def test_worst_case_cohort_at_capacity_decodes_exactly() -> None:
    # Members at the clip bound in the same direction: the sum reaches the capacity
    # bound's main term and must not wrap.
    bits, clip = 20, 4.0
    m = int((2**31 - 1) // (clip * 2**bits + 1))
    spec = FieldSpec(clip=clip, precision_bits=bits, weight_cap=1)
    x = np.zeros(D)
    x[0] = -clip
    one = field.encode(_delta(x), 1.0, spec, np.random.default_rng(0))
    total = (one.astype(np.uint64) * m % 2**32).astype(np.uint32)
    got, wsum = field.decode_sum(total, spec, {"w": np.zeros((3, 4)), "b": np.zeros(5)})
    assert field.flatten(got)[0] == -clip * m
    assert wsum == m


def test_member_weight() -> None:
    assert field.member_weight(5, "uniform", 10) == 1.0
    assert field.member_weight(5, "examples", 10) == 0.5
    assert field.member_weight(50, "examples", 10) == 1.0
    assert field.member_weight(0, "examples", 10) == 0.0
    for args in ((5, "median", 10), (-1, "examples", 10), (5, "examples", 0), (True, "uniform", 1)):
        with pytest.raises(ValueError):
            field.member_weight(*args)  # type: ignore[arg-type]


def test_range_check_refuses_sums_no_honest_cohort_can_produce() -> None:
    spec = FieldSpec(clip=1.0, precision_bits=16, weight_cap=1)
    rng = np.random.default_rng(11)
    total = np.zeros(D + 1, dtype=np.uint32)
    for _ in range(5):
        total += field.encode(_delta(rng.normal(size=D)), 1.0, spec, rng)
    field.decode_sum(total, spec, TEMPLATE, members=5)
    # Fewer members than were summed: the weight coordinate gives it away.
    with pytest.raises(field.SumOutOfRangeError, match="weight"):
        field.decode_sum(total, spec, TEMPLATE, members=4)
    # Uniform garbage (a mask that did not cancel) in the vector part.
    garbage = total.copy()
    garbage[:D] = rng.integers(0, 2**32, size=D, dtype=np.uint32)
    with pytest.raises(field.SumOutOfRangeError, match="did not cancel"):
        field.decode_sum(garbage, spec, TEMPLATE, members=5)
    # One coordinate just past the bound.
    edge = total.copy()
    edge[0] = int(field.capacity_bound(5, 1.0, 16)) + 1
    with pytest.raises(field.SumOutOfRangeError):
        field.decode_sum(edge, spec, TEMPLATE, members=5)
    # Without members, no check (the caller's choice).
    field.decode_sum(garbage, spec, TEMPLATE)
