"""A buffer of K staleness-discounted deltas and its aggregate (FedBuff, Nguyen et al. 2022).

Convention (documented because FedBuff implementations differ): the aggregate is an
AVERAGE normalised by the raw weights,

    Δ̄ = Σ_i s(τ_i) · w_i · Δ_i  /  Σ_i w_i,

with w_i = the update's ``count`` ("uniform": each site update counts once, a regional
aggregate of c site updates counts c times) or its ``n_examples`` ("examples"). Dividing by
Σ w rather than Σ s·w means staleness still discounts: a buffer of stale updates moves the
model less than a fresh one. (The paper divides by K; FLSim sums and scales the server lr.)

``robust="median"`` / ``"trimmed_mean"`` replace the weighted mean by the coordinate-wise
median / trimmed mean of the discounted deltas s(τ_i)·Δ_i (unweighted; see ``robust``), and
``clip_norm`` clips each incoming delta's L2 norm before it is used: ``"auto"`` (the default,
a bound that follows the median norm of recent deltas; see ``robust.NormClip``), a number,
or None / ``"off"``.

Overflow: the sum is formed in float64 (a handful of float32 deltas near float32's maximum
cannot overflow it), and ``Aggregate.finite`` says whether the result, cast back to the
model's dtypes, is finite; callers never publish or forward an aggregate that is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.algorithms.protocol import Weights
from fedloom.algorithms.robust import NormClip, coordinate_median, trimmed_mean
from fedloom.algorithms.weights_math import is_finite, l2_norm, quiet_overflow

__all__ = ["ROBUST_MODES", "WEIGHTINGS", "Aggregate", "UpdateBuffer"]

WEIGHTINGS = ("uniform", "examples")
# Elements summed over the K deltas at a time (1 MiB of float64: in the CPU's L2 or L3).
# Each slice costs 2K ufunc calls, each releasing the GIL: 32,768 made 650 of them per
# flush of 10 one-million-element deltas, handing the GIL back and forth with the
# channel threads; the sum of each element is the same whatever the slice.
_FLUSH_SLICE = 1 << 17
ROBUST_MODES = ("mean", "median", "trimmed_mean")


@dataclass(frozen=True, slots=True)
class Aggregate:
    """A flushed buffer: the averaged delta and what went into it."""

    delta: Weights
    n_updates: int
    n_examples: int
    count: int

    @property
    def finite(self) -> bool:
        """No NaN or infinity in the delta (as cast to the model's dtypes)."""
        return is_finite(self.delta)


def _small_mean(
    arrays: list[Any], coefs: list[float], shape: tuple[int, ...], dtype: np.dtype[Any]
) -> Any:
    """``flush``'s mean of one tensor, in a few numpy calls instead of a few per delta, for
    a tensor of at most ``_FLUSH_SLICE`` elements whose K deltas share its shape and one
    dtype (a small model's; None otherwise: the slice loop). The same operations per
    element in the same order, so the same bits: each term c·Δ formed in the deltas' dtype
    (the coefficients, Python floats, cast to it as numpy casts a Python float that
    multiplies such an array), widened to float64 exactly, added to a float64 sum that
    starts at 0.0 (not at the first term: -0.0 + 0.0 is 0.0) one delta after the other,
    and cast once (tests/algorithms/test_update_buffer_slices.py)."""
    first = arrays[0]
    kind = first.dtype
    if first.size > _FLUSH_SLICE:
        return None
    for c in coefs:
        if type(c) is not float:  # a numpy scalar is not cast to the deltas' dtype
            return None
    for a in arrays:
        if type(a) is not np.ndarray or a.shape != shape or a.dtype != kind:
            return None
    count = len(arrays)
    weights = np.array(coefs, dtype=kind).reshape(count, 1)
    # np.array of same-shaped arrays: np.stack's copy, without its Python-level checks.
    terms = np.multiply(np.array(arrays).reshape(count, -1), weights).astype(np.float64)
    acc = np.zeros(terms.shape[1], dtype=np.float64)
    add = np.add
    for row in terms:
        add(acc, row, acc)  # out=acc, passed by position: no keyword to parse
    return _quiet_cast(acc, dtype).reshape(shape)


@quiet_overflow  # an overflow shows as inf: ``Aggregate.finite`` says so
def _quiet_cast(values: Any, dtype: np.dtype[Any]) -> Any:
    """``values.astype(dtype)`` without overflow warnings (``quiet_overflow``: no
    ``errstate`` object built per call)."""
    return values.astype(dtype)


@quiet_overflow  # an overflow shows as inf: ``Aggregate.finite`` says so
def _quiet_cast_all(delta: Weights, dtypes: Mapping[str, np.dtype[Any]]) -> Weights:
    """Each tensor of ``delta`` cast to its dtype in ``dtypes`` (no copy when it has it)."""
    return {k: v.astype(dtypes[k], copy=False) for k, v in delta.items()}


class UpdateBuffer:
    """Holds up to K discounted deltas until ``flush``.

    ``add`` only keeps a reference to the (immutable) delta and its coefficient; the weighted
    sum is formed once per flush with one matrix product per tensor, which costs far fewer
    numpy calls than accumulating update by update (small models are call-bound, not
    FLOP-bound).
    """

    def __init__(
        self,
        template: Weights,
        *,
        weighting: str = "uniform",
        robust: str = "mean",
        trim_fraction: float = 0.1,
        clip_norm: object = "auto",
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if robust not in ROBUST_MODES:
            raise ValueError(f"robust must be one of {ROBUST_MODES}, got {robust!r}")
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self._clip = NormClip(clip_norm, template)
        self.weighting = weighting
        self._uniform = weighting == "uniform"  # read per update
        self.robust = robust
        self.trim_fraction = trim_fraction
        self._dtypes = {k: v.dtype for k, v in template.items()}
        self._shapes = {k: v.shape for k, v in template.items()}
        self._kept: list[Weights] = []  # deltas as received (or clipped)
        self._coefs: list[float] = []  # s(τ)·w for each kept delta
        self._discounts: list[float] = []  # s(τ) for each kept delta (robust modes)
        self._srcs: list[str | None] = []  # the sender of each kept delta (central DP)
        self._total_w = 0.0
        self.n_updates = 0
        self.n_examples = 0
        self.count = 0

    def __len__(self) -> int:
        return self.n_updates

    @property
    def clip_norm(self) -> float | None:
        """The clip bound the next delta will meet (None: no clip)."""
        return self._clip.bound()

    def add(
        self,
        delta: Weights,
        s: float,
        n_examples: int,
        count: int,
        norm: float | None = None,
        src: str | None = None,
    ) -> bool:
        """Fold in s·w·Δ; return whether ``delta`` had to be norm-clipped.

        ``norm`` is ‖Δ‖₂ if the caller measured it already (it must be finite: callers
        refuse a delta whose norm overflows before it gets here); ``src`` is its sender,
        whose own norms do not set the "auto" clip it meets (``robust.NormClip``).
        """
        measured = l2_norm(delta) if norm is None else norm
        delta, clipped = self._clip.apply(delta, measured, src)
        w = float(count if self._uniform else n_examples)
        self._kept.append(delta)
        self._coefs.append(s * w)
        self._discounts.append(s)
        self._srcs.append(src)
        self._total_w += w
        self.n_updates += 1
        self.n_examples += n_examples
        self.count += count
        return clipped

    def entries(self) -> list[tuple[Weights, float]]:
        """The buffered (delta as kept, i.e. clipped; discount s(τ)) pairs, in order: what
        a region needs to rebuild an aggregate without some of them."""
        return list(zip(self._kept, self._discounts, strict=True))

    def contributions(self) -> list[tuple[str | None, Weights, float]]:
        """The buffered (sender, delta as kept, s(τ)), in order: central DP clips each
        sender's total (``algorithms.dp.release``)."""
        return list(zip(self._srcs, self._kept, self._discounts, strict=True))

    def flush(self) -> Aggregate:
        """Return the aggregate of everything added since the last flush, and empty the buffer.

        With a total weight of zero (e.g. "examples" weighting and only empty sites) the
        aggregate is a zero delta.
        """
        if self.n_updates == 0:
            raise ValueError("flush of an empty buffer")
        delta: Weights
        if self.robust != "mean":
            discounted: list[Weights] = [
                {k: s * np.asarray(v, dtype=np.float64) for k, v in d.items()}
                for d, s in zip(self._kept, self._discounts, strict=True)
            ]
            if self.robust == "median":
                delta = coordinate_median(discounted)
            else:
                delta = trimmed_mean(discounted, self.trim_fraction)
        elif self._total_w > 0.0:
            coefs = [c / self._total_w for c in self._coefs]
            delta = {}
            for k, shape in self._shapes.items():
                small = _small_mean([d[k] for d in self._kept], coefs, shape, self._dtypes[k])
                if small is not None:
                    delta[k] = small
                    continue
                # Accumulate in float64 (no stack of K upcast deltas): a sum of float32
                # deltas near float32's maximum must not overflow on the way. Slice by
                # slice: the float64 slice stays in the CPU cache across the K deltas and
                # is cast into the result at once, so no model-sized float64 array is made
                # (the same operations per element, in the same order: the same result).
                # Each term c·Δ is formed in the delta's own dtype (the loop numpy picks
                # for an array times a Python float) into a scratch slice of that dtype,
                # and added to the float64 sum, which widens it exactly: the same values
                # as writing the product into a float64 slice first, without the extra
                # float64 pass (tests/algorithms/test_update_buffer_slices.py).
                result = np.empty(shape, dtype=self._dtypes[k])
                flat = result.reshape(-1)
                acc = np.empty(min(flat.size, _FLUSH_SLICE), dtype=np.float64)
                parts = [d[k].reshape(-1) for d in self._kept]
                scratch = {p.dtype: np.empty(acc.size, dtype=p.dtype) for p in parts}
                for start in range(0, flat.size, _FLUSH_SLICE):
                    end = start + _FLUSH_SLICE
                    summed = acc[: flat[start:end].size]
                    summed[...] = 0.0
                    for c, part in zip(coefs, parts, strict=True):
                        piece = part[start:end]
                        scaled = scratch[piece.dtype][: summed.size]
                        np.multiply(piece, c, out=scaled)
                        np.add(summed, scaled, out=summed)
                    with np.errstate(over="ignore"):  # inf: ``Aggregate.finite`` says so
                        flat[start:end] = summed
                delta[k] = result
        else:
            delta = {k: np.zeros(shape) for k, shape in self._shapes.items()}
        out = Aggregate(
            delta=_quiet_cast_all(delta, self._dtypes),
            n_updates=self.n_updates,
            n_examples=self.n_examples,
            count=self.count,
        )
        self._reset()
        return out

    def _reset(self) -> None:
        self._kept = []
        self._coefs = []
        self._discounts = []
        self._srcs = []
        self._total_w = 0.0
        self.n_updates = 0
        self.n_examples = 0
        self.count = 0

    def snapshot(self) -> dict[str, Any]:
        # Deltas are immutable once received: the snapshot shares them.
        return {
            "kept": [dict(d) for d in self._kept],
            "coefs": list(self._coefs),
            "discounts": list(self._discounts),
            "srcs": list(self._srcs),
            "total_w": self._total_w,
            "n_updates": self.n_updates,
            "n_examples": self.n_examples,
            "count": self.count,
            "clip": self._clip.snapshot(),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self._kept = [dict(d) for d in state["kept"]]
        self._coefs = [float(c) for c in state["coefs"]]
        self._discounts = [float(s) for s in state["discounts"]]
        srcs = state.get("srcs")  # older checkpoints: senders unknown
        self._srcs = [None if s is None else str(s) for s in srcs or [None] * len(self._kept)]
        self._total_w = float(state["total_w"])
        self.n_updates = int(state["n_updates"])
        self.n_examples = int(state["n_examples"])
        self.count = int(state["count"])
        self._clip.restore(state.get("clip"))  # older checkpoints: no clip history
