"""Flat-vector helpers for gossip mixing, and the bounds on what a neighbour can do.

A gossip peer mixes whole models at every step. Working on one contiguous float64 vector
per model (instead of a dict of small tensors) keeps a mix a handful of numpy calls, and
float64 keeps repeated mixing and push-sum mass bookkeeping from drifting. Tensors leave
the peer in their original names, shapes and dtypes.

``DistanceClip`` is the radius τ of ClippedGossip (He, Karimireddy & Jaggi 2022, arXiv
2202.01545): a neighbour's model ``x_j`` enters the mix only as ``clip(x_j − x_i, τ)``,
so one neighbour moves the model by at most ``W_ij·τ`` per step whatever it sends. The
paper's adaptive τ needs the Byzantine weight around each peer, which nobody here knows;
instead τ follows the tree's ``clip_norm = "auto"`` rule (``algorithms.robust``), made
per neighbour so that sending more often buys no more say. Each neighbour keeps its last
``PER_PEER_WINDOW`` distances ``‖x_j − x_i‖`` (before clipping) and proposes a radius,
``AUTO_FACTOR`` × their lower median; τ is the median of the proposals of every neighbour
in the plan (with an even number, the value between the middle two nearest the peer's own
scale, below). A neighbour not heard from yet (or whose median is zero: peers that start
from the same model) proposes the starting radius, the norm of the peer's initial model
(√(number of parameters) for an all-zero model), as the tree starts; so does everyone
until ``AUTO_MIN_SAMPLES`` distances have been seen.

A strict minority of neighbours can move the median neither above the largest nor below
the smallest honest proposal. That leaves the tie: with two neighbours (or any even number,
half of them hostile) the two middle proposals may be one honest and one hostile, and no
rule on the proposals alone resists both directions: the smaller one lets a neighbour
echoing the peer's own model at a tiny distance shrink τ to nothing and freeze the peer
(it no longer moves towards its honest neighbours), the larger one lets a far neighbour
raise it. So the peer casts the deciding vote from what it knows without any neighbour,
its own scale: ``AUTO_FACTOR`` × the lower median of its last ``PER_PEER_WINDOW`` local
training updates ``‖z' − z‖`` (honest neighbours that train between mixes differ by about
that much or more), or, in pure consensus (no training), the starting radius halved every
``FLOOR_HALF_LIFE`` of the peer's own steps, which no neighbour can hasten; a frozen peer
then still closes the initial disagreement, and a hostile half gets at most the larger of
the honest proposal and that scale. With an odd number of proposals, or with no tie, the
vote changes nothing; where it does, τ is at least the lower median used before, so an
honest run that was never clipped is unchanged. Distances at rounding level are never
clipped (``TAU_FLOOR``). A peer most of whose neighbours are hostile (or whose only
neighbour is) is not protected (nor is it in the paper). Thirty-two distances per
neighbour span many gossip steps, so τ lags behind consensus as it tightens rather than
clipping shares that arrive late.

``WeightBudget`` is a token bucket in push-sum weight, kept per neighbour by
``algorithms.gossip`` (see its docstring).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.protocol import Weights
from fedloom.algorithms.robust import AUTO_FACTOR, AUTO_MIN_SAMPLES, parse_clip_norm

# Distances remembered per neighbour for the "auto" clip (a few gossip steps' worth).
PER_PEER_WINDOW = 32
# τ never drops below this fraction of the starting radius (float rounding, not a model).
TAU_FLOOR = 1e-6
# Without training, the floor (the starting radius) halves every this many own steps.
FLOOR_HALF_LIFE = 32

Vector: TypeAlias = npt.NDArray[np.float64]


class ShareRejectedError(ValueError):
    """A peer's tensors do not fit this model; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FlatLayout:
    """Where each named tensor lives inside the flat vector (``offsets`` has n + 1 entries)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype[Any], ...]
    offsets: tuple[int, ...]

    @classmethod
    def of(cls, weights: Mapping[str, npt.NDArray[Any]]) -> FlatLayout:
        """The layout of a local model; raises ``ValueError`` on an unusable model."""
        if not weights:
            raise ValueError("weights must contain at least one tensor")
        names: list[str] = []
        shapes: list[tuple[int, ...]] = []
        dtypes: list[np.dtype[Any]] = []
        offsets = [0]
        for name, arr in weights.items():
            if not isinstance(name, str) or not isinstance(arr, np.ndarray):
                raise ValueError(f"weights must map str to numpy arrays (bad entry {name!r})")
            if arr.dtype.kind != "f":
                raise ValueError(f"tensor {name!r} has dtype {arr.dtype}, expected floating point")
            if not np.isfinite(arr).all():
                raise ValueError(f"tensor {name!r} contains non-finite values")
            names.append(name)
            shapes.append(tuple(int(s) for s in arr.shape))
            dtypes.append(arr.dtype)
            offsets.append(offsets[-1] + int(arr.size))
        return cls(tuple(names), tuple(shapes), tuple(dtypes), tuple(offsets))

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def flatten(self, tensors: Mapping[str, npt.NDArray[Any]]) -> Vector:
        """Trusted tensors (same names and shapes) to a fresh float64 vector."""
        out = np.empty(self.size, dtype=np.float64)
        for i, name in enumerate(self.names):
            out[self.offsets[i] : self.offsets[i + 1]] = np.ravel(tensors[name])
        return out

    def flatten_untrusted(self, tensors: object) -> Vector:
        """A peer's tensors to a fresh float64 vector, or ``ShareRejectedError`` saying why not.

        Any floating dtype is accepted (a lossy codec may deliver float16); integer,
        boolean, complex and object arrays, wrong names or shapes and NaN/inf are not.
        """
        if not isinstance(tensors, Mapping):
            raise ShareRejectedError("payload is not a tensor map")
        if len(tensors) != len(self.names) or any(n not in tensors for n in self.names):
            raise ShareRejectedError("tensor names differ")
        out = np.empty(self.size, dtype=np.float64)
        for i, name in enumerate(self.names):
            arr = tensors[name]
            if not isinstance(arr, np.ndarray):
                raise ShareRejectedError("tensor is not an array")
            if arr.dtype.kind != "f":
                raise ShareRejectedError("bad dtype")
            if tuple(arr.shape) != self.shapes[i]:
                raise ShareRejectedError("bad shape")
            out[self.offsets[i] : self.offsets[i + 1]] = arr.reshape(-1)
        if not np.isfinite(out).all():
            raise ShareRejectedError("non-finite values")
        return out

    def unflatten(self, vec: Vector) -> Weights:
        """A vector to fresh tensors in the model's dtypes (never views of ``vec``)."""
        return {
            name: vec[self.offsets[i] : self.offsets[i + 1]]
            .reshape(self.shapes[i])
            .astype(self.dtypes[i], copy=True)
            for i, name in enumerate(self.names)
        }


def finite_norm(v: Vector) -> float:
    """The L2 norm of ``v``, ``inf`` when it overflows float64 (finite-but-huge entries)."""
    with np.errstate(over="ignore", invalid="ignore"):
        norm = float(np.linalg.norm(v))
    return norm if math.isfinite(norm) else math.inf


class DistanceClip:
    """One peer's ClippedGossip radius: "auto" (see the module docstring), a number, or off."""

    __slots__ = ("_initial", "_own", "_recent", "_seen", "_steps", "setting")

    def __init__(self, setting: object, reference: Vector, peers: Iterable[str]) -> None:
        self.setting = parse_clip_norm(setting)
        norm = finite_norm(reference)
        self._initial = norm if 0.0 < norm < math.inf else max(1.0, math.sqrt(reference.size))
        self._recent = {peer: deque[float](maxlen=PER_PEER_WINDOW) for peer in peers}
        self._own = deque[float](maxlen=PER_PEER_WINDOW)  # own training updates' norms
        self._seen = 0
        self._steps = 0

    def bound(self) -> float | None:
        """The current τ (None: no clip)."""
        if self.setting is None or isinstance(self.setting, float):
            return self.setting
        if self._seen < AUTO_MIN_SAMPLES or not self._recent:
            return self._initial
        proposals = sorted(self._proposal(d) for d in self._recent.values())
        n = len(proposals)
        tau = proposals[(n - 1) // 2]
        if n % 2 == 0:  # any value between the middle two is a median: the one nearest ours
            tau = min(max(self.own_scale(), tau), proposals[n // 2])
        # Distances at rounding level are noise once peers agree: never clip below this.
        return max(tau, TAU_FLOOR * self._initial)

    def own_scale(self) -> float:
        """The peer's own vote on τ, which no neighbour can move (see the module docstring)."""
        own = statistics.median_low(self._own) if self._own else 0.0
        if own > 0.0:
            return AUTO_FACTOR * own
        # No training yet (or none at all): the starting radius, decaying with own steps.
        return self._initial * math.pow(0.5, self._steps / FLOOR_HALF_LIFE)

    def _proposal(self, recent: deque[float]) -> float:
        median = statistics.median_low(recent) if recent else 0.0
        return AUTO_FACTOR * median if median > 0.0 else self._initial

    def observe(self, peer: str, distance: float) -> None:
        """Remember one finite distance to neighbour ``peer``'s model ("auto" learns only)."""
        recent = self._recent.get(peer)
        if self.setting == "auto" and recent is not None:
            recent.append(distance)
            self._seen += 1

    def own_step(self, movement: float | None) -> None:
        """One step of the peer's own; ``movement`` is its local training update's norm."""
        self._steps += 1
        if movement is not None and 0.0 <= movement < math.inf:
            self._own.append(movement)

    def snapshot(self) -> dict[str, Any]:
        """What "auto" has learnt, as plain data (``restore`` takes it back)."""
        return {
            "initial": self._initial,
            "recent": {peer: list(d) for peer, d in self._recent.items()},
            "own": list(self._own),
            "seen": self._seen,
            "steps": self._steps,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a ``snapshot()``; ValueError for a value no live clip could have written
        (a NaN, negative or infinite distance would let neighbours through unclipped)."""

        def distance(value: object) -> float:
            if not isinstance(value, float | int) or not 0.0 <= float(value) < math.inf:
                raise ValueError(f"clip: a distance must be finite and >= 0, got {value!r:.40}")
            return float(value)

        initial = distance(state.get("initial", self._initial))
        if initial > 0.0:
            self._initial = initial
        for peer, values in dict(state.get("recent", {})).items():
            if peer in self._recent:  # a neighbour no longer listed is forgotten
                self._recent[peer].clear()
                self._recent[peer].extend(distance(v) for v in values)
        self._own.clear()
        self._own.extend(distance(v) for v in state.get("own", ()))
        self._seen = max(0, int(state.get("seen", 0)))
        self._steps = max(0, int(state.get("steps", 0)))


class WeightBudget:
    """A token bucket in push-sum weight: ``capacity``, refilled at ``rate`` per second."""

    __slots__ = ("_at", "_level", "capacity", "rate")

    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self._level = capacity
        self._at: float | None = None

    def available(self, now: float) -> float:
        """The weight that may pass at ``now`` (time never runs backwards here)."""
        if self._at is None or now > self._at:
            if self._at is not None:
                self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
            self._at = now
        return self._level

    def spend(self, weight: float) -> None:
        """Take ``weight`` (at most what ``available`` said) out of the bucket."""
        self._level = max(0.0, self._level - weight)


def clip_step(d: Vector, norm: float, tau: float | None) -> tuple[Vector, bool]:
    """``d · min(1, τ/‖d‖)`` given ``‖d‖`` (finite); says whether it was scaled."""
    if tau is None or norm <= tau:
        return d, False
    return d * (tau / norm), True
