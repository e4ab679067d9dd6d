"""Arithmetic on ``Weights`` (ordered name -> array dicts) and checks on peer input.

Every function returns new arrays and never writes into its inputs (arrays handed between
nodes are treated as immutable), except the ``*_inplace`` helpers, which only ever write into
an accumulator the caller created itself. Results keep the dtype of the first operand.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.protocol import Weights
from fedloom.transport.half import half_source
from fedloom.transport.tensors import fp32_lz4_payload_size

# Elements squared at a time by ``l2_norm``: their float64 squares stay in the CPU cache.
_NORM_CHUNK = 1 << 16

__all__ = [
    "MeasuredDelta",
    "add",
    "axpy",
    "axpy_inplace",
    "check_compatible",
    "check_delta",
    "checked_norm",
    "copy_weights",
    "is_finite",
    "l2_norm",
    "measure_delta",
    "scale",
    "sub",
    "weighted_sum",
    "zeros_like",
]


def zeros_like(w: Weights, dtype: npt.DTypeLike | None = None) -> Weights:
    """Fresh zero arrays with the names and shapes of ``w``."""
    return {k: np.zeros_like(v, dtype=dtype) for k, v in w.items()}


def copy_weights(w: Weights) -> Weights:
    """Deep copy (fresh arrays)."""
    return {k: np.array(v, copy=True) for k, v in w.items()}


def add(a: Weights, b: Weights) -> Weights:
    """a + b."""
    return {k: (v + b[k]).astype(v.dtype, copy=False) for k, v in a.items()}


def sub(a: Weights, b: Weights) -> Weights:
    """a - b."""
    return {k: (v - b[k]).astype(v.dtype, copy=False) for k, v in a.items()}


def scale(a: Weights, c: float) -> Weights:
    """c · a."""
    return {k: (v * c).astype(v.dtype, copy=False) for k, v in a.items()}


def axpy(alpha: float, x: Weights, y: Weights) -> Weights:
    """y + alpha · x (BLAS naming), as new arrays with y's dtypes."""
    return {k: (v + alpha * x[k]).astype(v.dtype, copy=False) for k, v in y.items()}


def axpy_inplace(alpha: float, x: Weights, acc: Weights) -> None:
    """acc += alpha · x, writing into ``acc`` (which must be the caller's own arrays)."""
    for k, v in acc.items():
        v += alpha * x[k]


def weighted_sum(ws: Sequence[Weights], coeffs: Sequence[float]) -> Weights:
    """Σ_i coeffs[i] · ws[i], with the dtypes of ``ws[0]``."""
    if len(ws) != len(coeffs):
        raise ValueError(f"{len(ws)} weight sets but {len(coeffs)} coefficients")
    if not ws:
        raise ValueError("weighted_sum of nothing")
    out: Weights = {k: np.zeros(v.shape, dtype=np.float64) for k, v in ws[0].items()}
    for w, c in zip(ws, coeffs, strict=True):
        axpy_inplace(float(c), w, out)
    return {k: v.astype(ws[0][k].dtype, copy=False) for k, v in out.items()}


def l2_norm(w: Mapping[str, npt.NDArray[Any]]) -> float:
    """The global L2 norm over all tensors, ‖w‖₂ (squares summed in float64).

    No BLAS: numpy's ``dot`` of a long vector wakes OpenBLAS's thread pool, whose threads
    then spin on the CPUs that the event loop, the channel's workers and the other
    processes need (a fifth of an aggregator's CPU under ingest went there)."""
    return math.sqrt(_sum_all_squares(w))


class MeasuredDelta(dict[str, Any]):
    """A delta with two facts about it measured where it was made (a simulator's training
    worker, on its own core), so that the process running the protocol does not measure
    them again: ``sum_squares``, what ``l2_norm`` squares and sums (its norm is the square
    root, bit for bit; inf or nan where that overflows), and ``lz4_payload``, the length
    of its tensors' payload as the fp32 codec with LZ4 sends it
    (``transport.tensors.fp32_lz4_payload_size``), or None where the tensors are not all
    C-contiguous little-endian float32 arrays (then the link's encoder sizes it).

    The constructor measures the facts itself; only unpickling (a worker's result, this
    process's own pipe) hands them over as they were measured. The wire's decoder builds
    plain dicts, so no peer brings facts of its own. Read-only, its arrays flagged
    read-only too, so an in-place change raises instead of leaving a stale norm behind
    (nothing in fedloom turns the flag back). Copy it (``dict(delta)``) to get a plain,
    writable mapping of the same arrays.
    """

    __slots__ = ("lz4_payload", "sum_squares")

    lz4_payload: int | None
    sum_squares: float

    def __init__(self, delta: Mapping[str, npt.NDArray[Any]]) -> None:
        arrays: list[Any] = list(delta.values())
        for value in arrays:
            if type(value) is not np.ndarray:
                raise TypeError(f"a MeasuredDelta holds arrays, got {type(value).__name__}")
        payload: int | None = None
        if all(a.flags.c_contiguous and a.dtype == _F32_LE for a in arrays):
            payload = fp32_lz4_payload_size(b"".join(arrays))
        _fill(self, delta, _sum_all_squares(delta), payload)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled by its items and facts
        return (_measured, (dict(self), self.sum_squares, self.lz4_payload))

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a MeasuredDelta is read-only: copy it with dict(delta) to change it")

    __setattr__ = __delattr__ = _read_only
    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only


def _fill(
    measured: MeasuredDelta,
    delta: Mapping[str, npt.NDArray[Any]],
    sum_squares: float,
    lz4_payload: int | None,
) -> None:
    dict.update(measured, delta)
    for value in measured.values():
        value.flags.writeable = False
    object.__setattr__(measured, "sum_squares", sum_squares)
    object.__setattr__(measured, "lz4_payload", lz4_payload)


def _measured(
    delta: Mapping[str, npt.NDArray[Any]], sum_squares: float, lz4_payload: int | None
) -> MeasuredDelta:
    """A ``MeasuredDelta`` unpickled: its facts as they were measured where it was made."""
    measured = MeasuredDelta.__new__(MeasuredDelta)
    _fill(measured, delta, sum_squares, lz4_payload)
    return measured


def measure_delta(delta: Weights) -> Weights:
    """``delta`` (its arrays, not copies) with its facts measured (``MeasuredDelta``), or
    ``delta`` itself where a value is not an array (the parent's checks then say so)."""
    for value in delta.values():
        if type(value) is not np.ndarray:
            return delta
    return MeasuredDelta(delta)


_F32_LE = np.dtype("<f4")


F = TypeVar("F", bound=Callable[..., Any])
_NUMPY_2 = int(np.__version__.split(".", 1)[0]) >= 2


def _quiet_state() -> tuple[Callable[[], Any], Any] | None:
    """numpy 2 keeps its error state as one immutable object in a context variable, which
    ``errstate`` replaces for its duration with one made from the current state. Returns
    ``(quiet, variable)``: ``quiet()`` is the state with overflow and invalid-value
    warnings off, made from the current one as ``errstate(over="ignore",
    invalid="ignore")`` makes it, once per current state (a dict lookup instead of a new
    state on every call). None where numpy keeps its state otherwise (numpy 1, or internals
    that moved): ``errstate`` then."""
    if not _NUMPY_2:
        return None
    try:
        from numpy._core._ufunc_config import (  # type: ignore[attr-defined]
            _extobj_contextvar as state,
        )
    except ImportError:
        return None
    made: dict[Any, Any] = {}  # current state -> quiet state (holding both: ids stay theirs)

    def quiet() -> Any:
        current = state.get()
        got = made.get(current)
        if got is None:
            with np.errstate(over="ignore", invalid="ignore"):
                got = state.get()
            if len(made) >= 64:  # states set by other code: rarely more than a few
                made.clear()
            made[current] = got
        return got

    return quiet, state


def quiet_overflow(fn: F) -> F:
    """``fn`` with numpy's overflow and invalid-value warnings off while it runs (callers
    see inf or nan and refuse them). numpy 2: the quiet error state made once per current
    state (``_quiet_state``) and set for the call, a third of the cost of the ``errstate``
    decorator, which builds it on every call. numpy 1's errstate keeps the state it
    restores on the one shared instance, which threads running ``fn`` at once would
    overwrite: a fresh one per call there."""
    if _QUIET is not None:
        quiet, state = _QUIET

        @functools.wraps(fn)
        def quick(*args: Any, **kwargs: Any) -> Any:
            token = state.set(quiet())
            try:
                return fn(*args, **kwargs)
            finally:
                state.reset(token)

        return cast(F, quick)
    if _NUMPY_2:
        return np.errstate(over="ignore", invalid="ignore")(fn)

    @functools.wraps(fn)
    def slow(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(over="ignore", invalid="ignore"):
            return fn(*args, **kwargs)

    return cast(F, slow)


_QUIET = _quiet_state()


# An overflow (or a NaN) is reported as inf (nan), for callers to refuse.
@quiet_overflow
def _sum_all_squares(w: Mapping[str, npt.NDArray[Any]]) -> float:
    total = 0.0
    for v in w.values():
        flat = v.reshape(-1)
        if flat.size <= _NORM_CHUNK:  # _sum_squares(flat), inline: the usual tensor
            # Cast (a copy), then square in place: the same squares and pairwise sum as
            # multiplying with dtype=float64, without the ufunc's casting buffers.
            squares = flat.astype(_F64)
            total += float(_add_reduce(_multiply(squares, squares, out=squares)))
        elif _HALF_PATH and half_source(v) is not None:
            total += _sum_half_squares(flat)
        else:
            total += _sum_squares(flat)
    return total


_multiply, _F64 = np.multiply, np.float64
_add_reduce = np.add.reduce  # what ndarray.sum() calls, without its Python wrapper


def _sum_squares(flat: npt.NDArray[Any]) -> float:
    if flat.size <= _NORM_CHUNK:
        return float(_add_reduce(np.multiply(flat, flat, dtype=np.float64)))
    buf = np.empty(_NORM_CHUNK, dtype=np.float64)
    total = 0.0
    for start in range(0, flat.size, _NORM_CHUNK):
        part = flat[start : start + _NORM_CHUNK]
        squares = buf[: part.size]
        # Cast once, then square in float64: the same squares and sums as multiplying
        # with dtype=float64 (which casts both operands), at half the cost.
        np.copyto(squares, part, casting="same_kind")
        np.multiply(squares, squares, out=squares)
        total += float(_add_reduce(squares))
    return total


# numpy 2 reduces a buffered chunk with one pairwise sum and restores the buffer size on
# leaving ``errstate``; numpy 1.26 sums the cast chunk otherwise (a different last bit) and
# keeps the size, so there the exact float64 path stays (tests/algorithms/test_weights_math.py).
_HALF_PATH = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


def _sum_half_squares(flat: npt.NDArray[Any]) -> float:
    """``_sum_squares`` of float32 values decoded from float16 (``transport.half``), bit
    for bit, cheaper: a float16's significand has 11 bits, so its square (22 bits) is
    exact in float32 and equals the float64 square; the squares of each chunk are summed
    in float64 with the ufunc's buffer as large as the chunk, so numpy's pairwise sum
    runs over the same 65,536 values in the same order as ``_sum_squares``'s (with the
    default 8,192-element buffer it would sum each 8,192 and add those in turn), and the
    chunks' sums are added in order. All squares in one call and all whole chunks summed
    in one call (one row each): each call releases the GIL, and one per chunk handed it
    back and forth with the channel threads. Only restores the buffer size it had
    (whatever ``errstate`` does with it)."""
    old = np.setbufsize(_NORM_CHUNK)
    try:
        squares = np.multiply(flat, flat, dtype=np.float32)
        whole = flat.size - flat.size % _NORM_CHUNK
        total = 0.0
        if whole:
            rows = squares[:whole].reshape(-1, _NORM_CHUNK)
            for chunk_sum in np.add.reduce(rows, axis=1, dtype=np.float64).tolist():
                total += chunk_sum
        if whole < flat.size:
            total += float(np.add.reduce(squares[whole:], dtype=np.float64))
        return total
    finally:
        np.setbufsize(old)


def is_finite(w: Weights) -> bool:
    """True when no tensor holds a NaN or an infinity."""
    for v in w.values():  # noqa: SIM110 - a loop: all() of a generator costs more
        # np.isfinite(v).all(), without the Python wrapper of ndarray.all()
        if not _and_reduce(_isfinite(v), axis=None):
            return False
    return True


_isfinite, _and_reduce = np.isfinite, np.logical_and.reduce


def check_compatible(reference: Weights, other: Mapping[str, Any]) -> str | None:
    """Why ``other`` cannot be combined with ``reference``, or None when it can.

    Compatible means: exactly the same tensor names, each value a numpy array of the same
    shape whose dtype is a real floating type castable to the reference's within its kind
    (fp16 or fp64 from a codec are fine for an fp32 model; ints and complex are not).
    Reasons: "not_a_mapping", "names", "not_array", "shape", "dtype".
    """
    if type(other) is not dict and not isinstance(other, Mapping):  # dict: no ABC check
        return "not_a_mapping"
    if len(other) != len(reference):
        return "names"
    for name, ref in reference.items():
        arr = other.get(name)
        if arr is None:
            return "names"
        if type(arr) is not _ndarray and not isinstance(arr, np.ndarray):
            return "not_array"
        if arr.shape != ref.shape:
            return "shape"
        dt, want = arr.dtype, ref.dtype
        # dt is want: the same dtype object (a model's own arrays), no comparison needed
        if (
            dt is not want
            and dt != want
            and (dt.kind != "f" or not np.can_cast(dt, want, "same_kind"))
        ):
            return "dtype"
    return None


_ndarray = np.ndarray


def check_delta(reference: Weights, delta: Mapping[str, Any]) -> str | None:
    """``check_compatible`` plus finiteness: the reason to reject a peer's delta, or None."""
    reason = check_compatible(reference, delta)
    if reason is not None:
        return reason
    isfinite = np.isfinite
    for arr in delta.values():
        if not isfinite(arr).all():
            return "non_finite"
    return None


def checked_norm(reference: Weights, delta: Mapping[str, Any]) -> tuple[str | None, float]:
    """``check_delta``'s reason and ``l2_norm(delta)`` in one pass over the data.

    The float64 sum of squares is finite exactly when every entry is, unless entries are
    float64 themselves (their squares can overflow): so the finiteness pass runs only when
    the sum is not finite, to tell "non_finite" from finite entries whose norm overflows
    (then the reason is None and the norm inf, for the caller to refuse). Returns
    ``(reason, inf)`` for a delta ``check_delta`` refuses.
    """
    reason = check_compatible(reference, delta)
    if reason is not None:
        return reason, math.inf
    # l2_norm(delta), one call fewer; or the sum a training worker measured
    total = delta.sum_squares if type(delta) is MeasuredDelta else _sum_all_squares(delta)
    norm = math.sqrt(total)
    if norm < math.inf:
        return None, norm
    isfinite = np.isfinite
    for arr in delta.values():
        if not isfinite(arr).all():
            return "non_finite", math.inf
    return None, math.inf
