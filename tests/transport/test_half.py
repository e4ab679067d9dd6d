"""float16 conversions: torch's fast path rounds exactly as numpy does, for every case."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.transport import half
from fedloom.transport.half import F16, F32, half_all_finite, half_to_float, to_half

ALL_HALVES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(F16)


def same_bits_or_both_nan(a: np.ndarray, b: np.ndarray) -> bool:
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan], b[~nan]))


def test_every_half_converts_to_the_float_numpy_gives() -> None:
    got = half_to_float(ALL_HALVES)  # 65,536 elements: the torch path
    assert got.dtype == F32
    assert same_bits_or_both_nan(got, ALL_HALVES.astype(F32))


def test_every_half_is_judged_finite_as_numpy_judges_it() -> None:
    for i in range(0, ALL_HALVES.size, 1024):
        block = ALL_HALVES[i : i + 1024]
        assert half_all_finite(block) == bool(np.isfinite(block).all())
    assert half_all_finite(np.zeros(0, F16))


def test_one_nan_or_inf_anywhere_among_finite_halves_is_found() -> None:
    finite = ALL_HALVES[np.isfinite(ALL_HALVES)]
    assert half_all_finite(finite)
    for bits in (0x7C00, 0xFC00, 0x7C01, 0x7E00, 0x7FFF, 0xFFFF):
        for where in (0, 1000, finite.size - 1):
            bad = finite.copy()
            bad.view(np.uint16)[where] = bits
            assert not half_all_finite(bad)
            assert not half_all_finite(bad[where : where + 1])
            assert half_all_finite(np.delete(bad, where))


def test_float_to_half_rounds_like_numpy_at_the_edges() -> None:
    edges = np.array(
        [
            0.0,
            -0.0,
            65504.0,  # the largest half
            65519.99,  # still rounds down to it
            65520.0,  # the first float that rounds to Inf
            -65520.0,
            1e6,
            np.inf,
            -np.inf,
            6.1e-5,  # around the smallest normal half
            5.96e-8,  # the smallest subnormal half
            2.98e-8,  # half of it: a tie, rounds to even (zero)
            2.99e-8,
            1.0 + 2.0**-11,  # a tie between 1 and the next half: rounds to even
            1.0 + 3 * 2.0**-11,
        ],
        dtype=F32,
    )
    x = np.tile(edges, 1000)  # above the size where torch takes over
    with np.errstate(over="ignore"):
        expected = x.astype(F16)
    assert np.array_equal(to_half(x).view(np.uint16), expected.view(np.uint16))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_random_float_bit_patterns_round_like_numpy(seed: int) -> None:
    bits = np.random.default_rng(seed).integers(0, 2**32, size=20_000, dtype=np.uint32)
    x = bits.view(F32)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(F16)
    assert same_bits_or_both_nan(to_half(x), expected)
    finite = np.isfinite(expected)
    assert np.array_equal(to_half(x)[finite].view(np.uint16), expected[finite].view(np.uint16))


@pytest.mark.parametrize("size", [10, 100_000])  # numpy path and torch path
def test_read_only_inputs_and_outputs_work_without_warnings(size: int) -> None:
    x = np.linspace(-3, 3, size, dtype=F32)
    x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = to_half(x)
        h.flags.writeable = False
        back = half_to_float(h)
        out = np.empty(size, F32)
        assert half_to_float(h, out=out) is out
    assert np.array_equal(back, x.astype(F16).astype(F32))
    assert np.array_equal(out, back)


def test_shapes_are_flattened() -> None:
    x = np.ones((300, 40), F32)
    assert to_half(x).shape == (12_000,)
    assert half_to_float(to_half(x)).shape == (12_000,)


class _NoForeach:
    """torch as a version without ``_foreach_copy_`` sees it (every other name passes)."""

    def __init__(self, torch: object) -> None:
        self._torch = torch

    def __getattr__(self, name: str) -> object:
        if name == "_foreach_copy_":
            raise AttributeError(name)
        return getattr(self._torch, name)

    @staticmethod
    def get_num_threads() -> int:
        return 2  # the sliced path, whatever an earlier test set this process's count to


class _RefusingForeach(_NoForeach):
    """torch whose ``_foreach_copy_`` refuses (as one that cannot mix dtypes would)."""

    def __getattr__(self, name: str) -> object:
        if name == "_foreach_copy_":

            def refuse(*_: object) -> None:
                raise RuntimeError("foreach: mixed dtypes")

            return refuse
        return getattr(self._torch, name)


@pytest.mark.parametrize("stand_in", [_NoForeach, _RefusingForeach])
def test_without_torchs_foreach_copy_the_slices_are_converted_one_by_one(
    monkeypatch: pytest.MonkeyPatch, stand_in: type[_NoForeach]
) -> None:
    """``_foreach_copy_`` is torch's private name: a torch without it, or one that refuses
    the copy, converts slice by slice, with the same bits (both directions)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(half, "_torch", lambda: stand_in(torch))
    monkeypatch.setattr(half, "_foreach_refused", False)
    got = half_to_float(ALL_HALVES)
    assert same_bits_or_both_nan(got, ALL_HALVES.astype(F32))
    x = np.linspace(-60_000, 60_000, 100_003, dtype=F32)
    assert np.array_equal(to_half(x).view(np.uint16), x.astype(F16).view(np.uint16))
    assert half._foreach_refused == (stand_in is _RefusingForeach)


def test_torchs_foreach_copy_is_used_where_it_exists() -> None:
    torch = pytest.importorskip("torch")
    if not hasattr(torch, "_foreach_copy_"):
        pytest.skip("this torch has no _foreach_copy_")
    assert half._foreach_copy(torch) is torch._foreach_copy_


def test_one_thread_makes_each_conversion_one_call_with_the_same_bits() -> None:
    """An aggregator daemon calls ``one_thread`` at start: torch, imported afterwards for a
    conversion, runs on one intra-op thread (so no slices are needed), and converts exactly
    as before; a fresh process, since the setting is process-wide."""
    pytest.importorskip("torch")
    code = (
        "import sys, numpy as np\n"
        "from fedloom.transport import half\n"
        "assert 'torch' not in sys.modules\n"
        "half.one_thread()\n"
        "h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)\n"
        "got = half.half_to_float(np.concatenate([h, h]))\n"
        "import torch\n"
        "assert torch.get_num_threads() == 1, torch.get_num_threads()\n"
        "want = np.concatenate([h, h]).astype(np.float32)\n"
        "nan = np.isnan(want)\n"
        "assert np.array_equal(np.isnan(got), nan) and np.array_equal(got[~nan], want[~nan])\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
