import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms import weights_math as wm
from fedloom.transport.half import half_source, half_to_float, remember_half
from tests.algorithms.alg_helpers import model


def test_arithmetic_returns_new_arrays_and_keeps_dtype() -> None:
    a, b = model(1.0), model(2.0)
    s = wm.add(a, b)
    assert s["w"].dtype == np.float32
    np.testing.assert_allclose(s["w"], 3.0)
    np.testing.assert_allclose(wm.sub(a, b)["b"], -1.0)
    np.testing.assert_allclose(wm.scale(b, 0.5)["w"], 1.0)
    np.testing.assert_allclose(wm.axpy(2.0, a, b)["w"], 4.0)
    np.testing.assert_allclose(a["w"], 1.0)  # inputs untouched
    np.testing.assert_allclose(b["w"], 2.0)


def test_axpy_inplace_and_weighted_sum() -> None:
    acc = wm.zeros_like(model(), dtype=np.float64)
    wm.axpy_inplace(3.0, model(1.0), acc)
    np.testing.assert_allclose(acc["b"], 3.0)
    ws = wm.weighted_sum([model(1.0), model(3.0)], [0.25, 0.75])
    np.testing.assert_allclose(ws["w"], 2.5)
    assert ws["w"].dtype == np.float32
    with pytest.raises(ValueError):
        wm.weighted_sum([model()], [1.0, 2.0])


def test_l2_norm_is_global_over_tensors() -> None:
    w = {"a": np.array([3.0], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)}
    assert wm.l2_norm(w) == pytest.approx(5.0)


def test_copy_is_deep() -> None:
    a = model(1.0)
    c = wm.copy_weights(a)
    c["w"][0, 0] = 9.0
    assert a["w"][0, 0] == 1.0


@pytest.mark.parametrize(
    ("other", "reason"),
    [
        ({"w": np.zeros((3, 2), np.float32)}, "names"),
        ({"w": np.zeros((3, 2), np.float32), "x": np.zeros(2, np.float32)}, "names"),
        ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, "shape"),
        ({"w": np.zeros((3, 2), np.int32), "b": np.zeros(2, np.float32)}, "dtype"),
        ({"w": [[0.0] * 2] * 3, "b": np.zeros(2, np.float32)}, "not_array"),
        ([1, 2], "not_a_mapping"),
    ],
)
def test_compatibility_reasons(other: object, reason: str) -> None:
    assert wm.check_compatible(model(), other) == reason  # type: ignore[arg-type]


def test_codec_dtypes_are_compatible_but_nan_is_not() -> None:
    half = {k: v.astype(np.float16) for k, v in model(1.0).items()}
    assert wm.check_delta(model(), half) is None
    bad = model(1.0)
    bad["b"] = np.array([np.nan, 0.0], dtype=np.float32)
    assert wm.check_delta(model(), bad) == "non_finite"
    assert not wm.is_finite(bad)
    inf = model(1.0)
    inf["w"] = np.full((3, 2), np.inf, dtype=np.float32)
    assert wm.check_delta(model(), inf) == "non_finite"


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from([np.float16, np.float32, np.float64]),
    st.integers(0, 700),
    st.integers(0, 2**32 - 1),
    st.floats(1e-30, 1e30),
)
def test_l2_norm_squares_each_chunk_in_float64_as_a_float64_multiply_would(
    dtype: type, n: int, seed: int, scale: float
) -> None:
    # The chunked path (a small chunk here) casts once and squares in float64: bit for
    # bit the sums of multiplying with dtype=float64, chunk by chunk in the same order.
    with np.errstate(over="ignore"):  # float16 saturates to inf: that is summed alike
        x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(dtype)
    chunk = 64
    want = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for start in range(0, n, chunk):
            part = x[start : start + chunk]
            want += float(np.multiply(part, part, dtype=np.float64).sum())
    original = wm._NORM_CHUNK
    wm._NORM_CHUNK = chunk
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            got = wm._sum_squares(x)
    finally:
        wm._NORM_CHUNK = original
    assert got == want or (np.isnan(got) and np.isnan(want))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(wm._NORM_CHUNK + 1, 3 * wm._NORM_CHUNK + 100),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["normal", "all_bits", "inf", "nan"]),
)
def test_l2_norm_of_a_tensor_decoded_from_float16_is_bit_for_bit_the_float32_one(
    n: int, seed: int, kind: str
) -> None:
    # Squares in float32 (exact for float16 values) summed in float64 chunk by chunk:
    # the same norm, bit for bit, as the float64 squares of the same float32 values.
    rng = np.random.default_rng(seed)
    if kind == "normal":
        half = (rng.standard_normal(n) * 0.01).astype(np.float16)
    else:  # every finite float16 bit pattern, subnormals and 65504 included
        bits = rng.integers(0, 0x7C00, n, dtype=np.uint16) | (
            rng.integers(0, 2, n, dtype=np.uint16) << 15
        )
        half = bits.view(np.float16)
        if kind != "all_bits":
            half[int(rng.integers(0, n))] = np.inf if kind == "inf" else np.nan
    decoded = remember_half(half_to_float(half), half)
    assert half_source(decoded) is not None  # the float16 path is the one measured
    plain = np.array(decoded, dtype=np.float32, copy=True)
    got, want = wm.l2_norm({"d": decoded}), wm.l2_norm({"d": plain})
    assert got == want or (np.isnan(got) and np.isnan(want))
    if kind == "inf":
        assert got == np.inf
    assert np.getbufsize() == 8192  # the chunk-sized ufunc buffer did not leak out


def test_l2_norm_gives_back_the_callers_ufunc_buffer_size() -> None:
    half = (np.random.default_rng(1).standard_normal(3 * wm._NORM_CHUNK) * 0.01).astype(np.float16)
    decoded = remember_half(half_to_float(half), half)
    before = np.setbufsize(16384)
    try:
        wm.l2_norm({"d": decoded})
        assert np.getbufsize() == 16384
    finally:
        np.setbufsize(before)


@pytest.mark.parametrize("form", ["state", "numpy_2", "numpy_1"])
def test_quiet_overflow_is_silent_and_leaves_each_threads_error_state(
    form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each form (numpy 2's quiet error state set directly where its private context
    variable is found; otherwise numpy 2's shared errstate decorator, numpy 1's errstate
    per call) silences an overflow inside the function only, with threads running it at
    once."""
    import threading
    import warnings

    from fedloom.algorithms import weights_math

    if form == "state":
        if weights_math._QUIET is None:
            pytest.skip("this numpy keeps its error state elsewhere: the errstate forms run")
    else:  # the fallbacks, as where numpy's internals moved
        monkeypatch.setattr(weights_math, "_QUIET", None)
        monkeypatch.setattr(weights_math, "_NUMPY_2", form == "numpy_2")

    @weights_math.quiet_overflow
    def overflow() -> float:
        return float(np.float32(3e38) * np.float32(10))

    states: list[dict[str, str]] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a warning would raise here
                for _ in range(300):
                    assert overflow() == float("inf")
            states.append(np.geterr())
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert all(s["over"] == np.geterr()["over"] == "warn" for s in states)
    with pytest.warns(RuntimeWarning):  # outside the function: warnings as before
        np.float32(3e38) * np.float32(10)


def _measured() -> tuple[dict[str, np.ndarray], wm.MeasuredDelta]:
    rng = np.random.default_rng(7)
    plain = {"w": rng.standard_normal((5, 4)).astype(np.float32), "b": np.ones(4, np.float32)}
    return plain, wm.measure_delta({k: v.copy() for k, v in plain.items()})


def test_a_measured_delta_gives_the_norm_and_checks_of_the_plain_one() -> None:
    plain, measured = _measured()
    reference = {k: np.zeros_like(v) for k, v in plain.items()}
    assert wm.checked_norm(reference, measured) == wm.checked_norm(reference, plain)
    assert math.sqrt(measured.sum_squares) == wm.l2_norm(plain)
    # Its facts do not stand in for the layout check.
    assert wm.checked_norm({"w": reference["w"]}, measured) == ("names", math.inf)
    overflowing = wm.measure_delta({"x": np.full(4, 1e300)})
    assert wm.checked_norm({"x": np.zeros(4)}, overflowing) == (None, math.inf)
    assert overflowing.lz4_payload is None  # not float32: sized by the encoder


def test_the_norm_of_a_measured_delta_is_the_one_measured() -> None:
    # What makes the measurement pay: the region does not sum the squares again.
    plain, _ = _measured()
    planted = wm._measured(plain, 16.0, None)  # as unpickled from a worker that measured 16
    assert wm.checked_norm({k: np.zeros_like(v) for k, v in plain.items()}, planted) == (None, 4.0)


def test_a_measured_delta_is_read_only_and_pickles_with_its_facts() -> None:
    import pickle

    plain, measured = _measured()
    for change in (
        lambda d: d.__setitem__("w", plain["w"]),
        lambda d: d.__delitem__("w"),
        lambda d: d.update(plain),
        lambda d: d.pop("w"),
        lambda d: d.popitem(),
        lambda d: d.setdefault("z", plain["w"]),
        lambda d: d.clear(),
        lambda d: setattr(d, "sum_squares", 0.0),
    ):
        with pytest.raises(TypeError, match="read-only"):
            change(measured)
    with pytest.raises(ValueError, match="read-only"):
        measured["w"][0, 0] = 1.0  # the arrays too: the facts stay true of them
    copy = pickle.loads(pickle.dumps(measured))
    assert type(copy) is wm.MeasuredDelta
    assert (copy.sum_squares, copy.lz4_payload) == (measured.sum_squares, measured.lz4_payload)
    assert not copy["w"].flags.writeable
    assert all(np.array_equal(copy[k], plain[k]) for k in plain)
    writable = dict(measured)  # a plain mapping of the same arrays
    assert type(writable) is dict and writable.keys() == plain.keys()


def test_only_arrays_are_measured_and_the_constructor_measures_them_itself() -> None:
    plain, _ = _measured()
    assert math.sqrt(wm.MeasuredDelta(plain).sum_squares) == wm.l2_norm(plain)
    with pytest.raises(TypeError):
        wm.MeasuredDelta(plain, 1.0, None)  # type: ignore[call-arg]  # no facts from outside
    scalar = {"w": plain["w"], "t": np.float32(0.5)}  # not an array: left to the checks
    assert wm.measure_delta(scalar) is scalar
    with pytest.raises(TypeError, match="holds arrays"):
        wm.MeasuredDelta(scalar)


def test_a_decoded_update_never_carries_a_peers_measurements() -> None:
    # Facts are trusted only where this process measured them: the wire builds plain dicts.
    from fedloom.transport import wire

    _, measured = _measured()
    decoded = wire.decode(wire.encode(wire.Update("s1", 1, 0, measured, 3, 1)))
    assert type(decoded.delta) is dict
