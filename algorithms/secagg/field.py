"""Encoding of clipped, weighted deltas into the ring Z_{2^32}, and decoding of sums.

A member's delta ``x`` is flattened in the model's tensor order (float64), L2-clipped to
``clip``, multiplied by its weight ``w`` in [0, 1], scaled by ``2^precision_bits`` and
stochastically rounded (unbiased: ``E[round(y)] = y``) with the member's own generator;
an optional integer noise vector (distributed DP) is added; one trailing coordinate
carries ``round(w * 2^f)`` (rounded deterministically, so the aggregator can check the
sum of the weights exactly: ``check_cohort_sum``). Everything is stored mod 2^32
(``uint32``), so masked sums wrap around exactly like the masks do.

Decoding lifts the sum to the centred range [-2^31, 2^31) and divides by ``2^f``. That is
exact as long as the true integer sum stays inside that range: ``check_capacity`` bounds
it. Per coordinate a member's encoding is at most ``max(clip, 1) * 2^f + 1`` in absolute
value (``|x_k| <= ||x||_2 <= clip``, ``w <= 1``, rounding adds < 1; the weight coordinate
is at most ``2^f``), and the members' summed noise stays below ``10 * sigma * sqrt(members)``
except with probability < 1e-23, so the cohort fits when

    members * (max(clip, 1) * 2^f + 1) + 10 * noise_sigma * sqrt(members) < 2^31.

Rounding error: each coordinate of one encoding is off by less than ``2^-f`` (after
decoding), so a sum of N encodings is within ``N * 2^-f`` per coordinate of the exact
weighted sum, ``N * 2^-f * sqrt(d)`` in L2 norm (less in expectation: the errors are
independent and zero-mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.protocol import Weights

RING_BITS = 32
HALF_RING = 1 << (RING_BITS - 1)  # 2^31: sums must stay in [-2^31, 2^31)
MAX_PRECISION_BITS = 30
WEIGHTINGS = ("uniform", "examples")
NOISE_TAIL = 10.0  # summed noise is bounded by NOISE_TAIL * sigma * sqrt(members)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How a cohort encodes: L2 clip ``clip``, ``precision_bits`` fractional bits, and
    ``weight_cap`` (example weighting: ``w = min(n, weight_cap) / weight_cap``).

    A spec must at least fit one member (``check_capacity(1, ...)``); whether a whole
    cohort fits is checked against its size when it is sealed.
    """

    clip: float
    precision_bits: int
    weight_cap: int

    def __post_init__(self) -> None:
        if not isinstance(self.clip, int | float) or isinstance(self.clip, bool):
            raise ValueError(f"clip must be a positive number, got {self.clip!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, got {self.clip!r}")
        _check_precision(self.precision_bits)
        if (
            isinstance(self.weight_cap, bool)
            or not isinstance(self.weight_cap, int)
            or self.weight_cap < 1
        ):
            raise ValueError(f"weight_cap must be an int >= 1, got {self.weight_cap!r}")
        check_capacity(1, self.clip, self.precision_bits)

    @property
    def scale(self) -> float:
        """``2^precision_bits``."""
        return float(1 << self.precision_bits)


def _check_precision(precision_bits: object) -> int:
    if (
        isinstance(precision_bits, bool)
        or not isinstance(precision_bits, int)
        or not 1 <= precision_bits <= MAX_PRECISION_BITS
    ):
        raise ValueError(
            f"precision_bits must be an int from 1 to {MAX_PRECISION_BITS}, got {precision_bits!r}"
        )
    return precision_bits


def capacity_bound(
    members: int, clip: float, precision_bits: int, noise_sigma: float = 0.0
) -> float:
    """The largest absolute value a coordinate of the members' summed encodings can take
    (noise: at ``NOISE_TAIL`` standard deviations)."""
    scale = float(1 << precision_bits)
    return members * (max(clip, 1.0) * scale + 1.0) + NOISE_TAIL * noise_sigma * math.sqrt(members)


def check_capacity(
    members: int, clip: float, precision_bits: int, noise_sigma: float = 0.0
) -> None:
    """``ValueError`` naming ``precision_bits`` and ``clip`` when a cohort of ``members``
    could overflow the ring: ``members * (max(clip, 1) * 2^f + 1) + 10 * noise_sigma *
    sqrt(members) >= 2^31`` (see the module docstring)."""
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be an int >= 1, got {members!r}")
    _check_precision(precision_bits)
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    if not (math.isfinite(noise_sigma) and noise_sigma >= 0):
        raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma!r}")
    bound = capacity_bound(members, clip, precision_bits, noise_sigma)
    if bound >= HALF_RING:
        noise = (
            f" + {NOISE_TAIL:g} x noise_sigma={noise_sigma:g} x sqrt({members})"
            if noise_sigma
            else ""
        )
        raise ValueError(
            f"secure aggregation would overflow its 32-bit ring: {members} member(s) x "
            f"(max(clip={clip:g}, 1) x 2^precision_bits={precision_bits} + 1){noise} = "
            f"{bound:.4g} >= 2^31; lower precision_bits or clip (or the cohort size)"
        )


def flatten(weights: Weights) -> npt.NDArray[np.float64]:
    """All tensors of ``weights`` in dict order, raveled into one float64 vector."""
    arrays = [np.asarray(v) for v in weights.values()]
    out = np.empty(sum(int(a.size) for a in arrays), dtype=np.float64)
    offset = 0
    for a in arrays:  # one pass: each tensor is converted straight into its slice
        out[offset : offset + a.size] = a.ravel()
        offset += a.size
    return out


def template_size(template: Weights) -> int:
    """The number of coordinates ``flatten(template)`` has."""
    return sum(int(np.asarray(v).size) for v in template.values())


def unflatten(vec: npt.NDArray[Any], template: Weights) -> Weights:
    """Split ``vec`` back into ``template``'s tensors (names, order, shapes and dtypes from
    the template); ``ValueError`` if the lengths differ."""
    flat = np.asarray(vec)
    if flat.ndim != 1 or flat.size != template_size(template):
        raise ValueError(
            f"vector of shape {flat.shape} does not match the template's "
            f"{template_size(template)} coordinates"
        )
    out: Weights = {}
    offset = 0
    for name, tensor in template.items():
        t = np.asarray(tensor)
        out[name] = flat[offset : offset + t.size].reshape(t.shape).astype(t.dtype, copy=True)
        offset += t.size
    return out


def sum_of_squares(x: npt.NDArray[np.float64]) -> float:
    """Σ x_k² of a float64 vector (``inf`` on overflow, NaN if any x_k is NaN), without
    BLAS: ``x.dot(x)`` of a long vector runs in OpenBLAS's thread pool, whose threads then
    spin for a while: ~12 ms of CPU per million coordinates on a 2-core machine where the
    sum itself takes ~0.4 ms (and a host running several sites pays it in each)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.einsum("i,i->", x, x))


_BLOCK = 1 << 15  # coordinates per block of encode's rounding (256 KiB of float64)


def encode(
    delta: Weights,
    weight: float,
    spec: FieldSpec,
    rng: np.random.Generator,
    noise: npt.NDArray[np.int64] | None = None,
) -> npt.NDArray[np.uint32]:
    """``delta`` as d+1 ring elements: clipped to ``spec.clip`` (L2), times ``weight``,
    times ``2^f``, stochastically rounded with ``rng``, plus ``noise`` (integers, length
    d, not on the weight coordinate), and a trailing ``round(weight * 2^f)``; mod 2^32.

    ``ValueError`` for a non-finite delta, a weight outside [0, 1], or noise of the wrong
    shape or dtype (local misuse: a site encodes its own delta).
    """
    if not (
        isinstance(weight, int | float | np.floating)
        and not isinstance(weight, bool)
        and math.isfinite(weight)
        and 0.0 <= weight <= 1.0
    ):
        raise ValueError(f"weight must be in [0, 1], got {weight!r}")
    x = flatten(delta)
    d = x.size
    if noise is not None:
        noise_arr = np.asarray(noise)
        if noise_arr.shape != (d,) or not np.issubdtype(noise_arr.dtype, np.integer):
            raise ValueError(
                f"noise must be an integer vector of length {d}, got dtype {noise_arr.dtype} "
                f"and shape {noise_arr.shape}"
            )
    # A NaN or inf shows in the sum of squares, so the finiteness pass runs only then (a
    # finite sum of squares that overflows clips everything to 0).
    sq = sum_of_squares(x)
    if not math.isfinite(sq) and not np.all(np.isfinite(x)):
        raise ValueError("cannot encode a delta with NaN or infinite values")
    norm = math.sqrt(sq)
    factor = float(weight) * spec.scale
    if norm > spec.clip:
        factor *= spec.clip / norm
    out = np.empty(d + 1, dtype=np.uint32)
    # Stochastic rounding: floor(y) + [u < frac(y)], so E[result] = y exactly. Block by
    # block, so each block's passes stay in cache; the uniforms are drawn in order, so
    # they are the draws of one rng.random(d).
    step = min(d, _BLOCK) or 1
    frac = np.empty(step, dtype=np.float64)
    floor = np.empty(step, dtype=np.float64)
    ints = np.empty(step, dtype=np.int64)
    for lo in range(0, d, step):
        hi = min(d, lo + step)
        k = hi - lo
        y, fl, iv = frac[:k], floor[:k], ints[:k]
        np.multiply(x[lo:hi], factor, out=y)
        np.floor(y, out=fl)
        y -= fl  # the fractional part, in [0, 1)
        fl += rng.random(k) < y  # integral floats (|y| < 2^53): the sum is exact
        iv[...] = fl
        if noise is not None:
            np.add(iv, noise_arr[lo:hi], out=iv, casting="unsafe")
        out[lo:hi] = iv  # C conversion to uint32: two's-complement wrap, value mod 2^32
    out[d] = round(float(weight) * spec.scale)
    return out


class SumOutOfRangeError(ValueError):
    """An unmasked sum has a coordinate no honest cohort of that size can produce: some
    mask did not cancel (a member masked with wrong seeds, or a wrong seed was rebuilt),
    so the vector is garbage and must not be applied."""

    reason = "sum_out_of_range"


def decode_sum(
    total: npt.NDArray[np.uint32],
    spec: FieldSpec,
    template: Weights,
    *,
    members: int | None = None,
    noise_sigma: float = 0.0,
) -> tuple[Weights, float]:
    """``(sum_i w_i x_i, sum_i w_i)`` from the ring sum of encodings (centred lift, then
    divided by ``2^f``); the weighted sum is shaped like ``template``.

    With ``members`` (the number of encodings summed) the sum is range-checked first:
    every coordinate within ``capacity_bound(members, ...)`` and the weight coordinate in
    [0, members * 2^f], else ``SumOutOfRangeError``. A mask that failed to cancel leaves
    uniform garbage, which passes that check with probability about
    (bound / 2^31)^(d+1), i.e. never for a real model; an honest sum always passes.
    """
    arr = np.asarray(total)
    if arr.dtype != np.uint32 or arr.ndim != 1 or arr.size != template_size(template) + 1:
        raise ValueError(
            f"sum must be a uint32 vector of {template_size(template) + 1} coordinates, got "
            f"dtype {arr.dtype} and shape {arr.shape}"
        )
    # Reinterpreting as int32 is exactly the centred lift (>= 2^31 -> negative).
    lifted = arr.view(np.int32)
    if members is not None:
        bound = capacity_bound(members, spec.clip, spec.precision_bits, noise_sigma)
        weight_units = int(lifted[-1])
        if not 0 <= weight_units <= members * (1 << spec.precision_bits):
            raise SumOutOfRangeError(
                f"unmasked sum's weight coordinate {weight_units} is outside "
                f"[0, {members} x 2^{spec.precision_bits}]: the masks did not cancel"
            )
        largest = int(np.max(np.abs(lifted[:-1].astype(np.int64)), initial=0))
        if largest > bound:
            raise SumOutOfRangeError(
                f"unmasked sum has a coordinate of {largest} > {bound:.4g}, more than "
                f"{members} clipped member(s) can produce: the masks did not cancel"
            )
    centred = lifted.astype(np.float64)
    centred /= spec.scale
    return unflatten(centred[:-1], template), float(centred[-1])


class WeightMismatchError(SumOutOfRangeError):
    """The sum's weight coordinate is not the sum of the survivors' weights as their joins
    declare them (``weight_units``): a member lied about its weight (reason
    ``weight_mismatch``)."""

    reason = "weight_mismatch"


class NormOutOfRangeError(SumOutOfRangeError):
    """The weighted sum is longer than its members' clipped deltas can make it (reason
    ``norm_out_of_range``)."""

    reason = "norm_out_of_range"


def weight_units(n_examples: int, cap: int, precision_bits: int) -> int:
    """The weight coordinate an honest member with ``n_examples`` encodes under the seal's
    ``cap``: ``round(min(n, cap) / cap * 2^f)`` (deterministic rounding, as ``encode``)."""
    return round(member_weight(n_examples, "examples", cap) * float(1 << precision_bits))


def check_cohort_sum(
    total: npt.NDArray[np.uint32],
    spec: FieldSpec,
    n_examples: list[int],
    *,
    noise_sigma: float = 0.0,
) -> None:
    """Check an unmasked cohort sum against what its survivors (their joins'
    ``n_examples``) can honestly produce, before anything is decoded or applied:

    * weight: the trailing coordinate must EQUAL Σ_i ``weight_units(n_i, cap, f)``, else
      ``WeightMismatchError`` (a member cannot shrink Σ w to blow up Δ̄ = Σ w x / Σ w);
    * norm: ‖Σ_i w_i x_i‖₂ (in units of 2^-f) must be at most
      ``clip · 2^f · Σ w_i + |U| · √d + noise_sigma · √|U| · (√d + NOISE_TAIL)``, else
      ``NormOutOfRangeError``. Each honest encoding is within ``w_i · clip · 2^f`` of zero
      before rounding; stochastic rounding moves each coordinate by less than 1 (so at most
      √d in L2 per member); the members' summed discrete Gaussian noise is sub-Gaussian
      with parameter σ√|U| per coordinate, so its norm exceeds σ√|U|(√d + 10) with
      probability below exp(-50). An honest cohort always passes.

    What this cannot stop without range proofs: a malicious member may still add any
    vector that keeps the sum within the norm bound, so one member moves a cohort's sum by
    up to |U| · clip in norm (a plain update: clip)."""
    arr = np.asarray(total)
    lifted = arr.view(np.int32)
    members = len(n_examples)
    want = sum(weight_units(n, spec.weight_cap, spec.precision_bits) for n in n_examples)
    got = int(lifted[-1])
    if got != want:
        raise WeightMismatchError(
            f"unmasked sum's weight coordinate is {got}, the survivors' joins give {want}: "
            "a member encoded a weight other than its own"
        )
    d = int(lifted.size) - 1
    norm = math.sqrt(sum_of_squares(lifted[:-1].astype(np.float64)))
    weights = sum(member_weight(n, "examples", spec.weight_cap) for n in n_examples)
    root_d = math.sqrt(d)
    bound = (
        spec.clip * spec.scale * weights
        + members * root_d
        + noise_sigma * math.sqrt(members) * (root_d + NOISE_TAIL)
    )
    if norm > bound:
        raise NormOutOfRangeError(
            f"unmasked sum has L2 norm {norm / spec.scale:.4g}, more than {members} "
            f"member(s) weighing {weights:.4g} with clip {spec.clip:g} can produce "
            f"({bound / spec.scale:.4g})"
        )


def member_weight(n_examples: int, weighting: str, cap: int) -> float:
    """A member's own weight: 1 for ``"uniform"``, ``min(n_examples, cap) / cap`` for
    ``"examples"`` (the aggregator cannot scale one masked update, so the site does)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap must be an int >= 1, got {cap!r}")
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 0:
        raise ValueError(f"n_examples must be an int >= 0, got {n_examples!r}")
    if weighting == "uniform":
        return 1.0
    return min(n_examples, cap) / cap
