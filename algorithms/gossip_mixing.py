"""Flat-vector helpers for gossip mixing, and the clip that bounds what a neighbour can do.

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
``AUTO_FACTOR`` × their lower median; τ is the lower median of the proposals of every
neighbour in the plan. A neighbour not heard from yet (or whose median is zero: peers that
start from the same model) proposes the starting radius, the norm of the peer's initial
model (√(number of parameters) for an all-zero model), as the tree starts; so does
everyone until ``AUTO_MIN_SAMPLES`` distances have been seen. A minority of neighbours
cannot raise τ above what honest ones propose (with two neighbours the lower median is the
smaller proposal, so a lone hostile neighbour next to a silent one gets the starting
radius), and honest distances, typically within a few times their median, are left
alone. A peer most of whose neighbours are hostile is not protected (nor is it in the
paper). Thirty-two distances per neighbour span many gossip steps, so τ lags behind
consensus as it tightens rather than clipping shares that arrive late.
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

from algorithms.protocol import Weights
from algorithms.robust import AUTO_FACTOR, AUTO_MIN_SAMPLES, parse_clip_norm

# Distances remembered per neighbour for the "auto" clip (a few gossip steps' worth).
PER_PEER_WINDOW = 32
# τ never drops below this fraction of the starting radius (float rounding, not a model).
TAU_FLOOR = 1e-6

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

    __slots__ = ("_initial", "_recent", "_seen", "setting")

    def __init__(self, setting: object, reference: Vector, peers: Iterable[str]) -> None:
        self.setting = parse_clip_norm(setting)
        norm = finite_norm(reference)
        self._initial = norm if 0.0 < norm < math.inf else max(1.0, math.sqrt(reference.size))
        self._recent = {peer: deque[float](maxlen=PER_PEER_WINDOW) for peer in peers}
        self._seen = 0

    def bound(self) -> float | None:
        """The current τ (None: no clip)."""
        if self.setting is None or isinstance(self.setting, float):
            return self.setting
        if self._seen < AUTO_MIN_SAMPLES or not self._recent:
            return self._initial
        tau = statistics.median_low(self._proposal(d) for d in self._recent.values())
        # Distances at rounding level are noise once peers agree: never clip below this.
        return max(tau, TAU_FLOOR * self._initial)

    def _proposal(self, recent: deque[float]) -> float:
        median = statistics.median_low(recent) if recent else 0.0
        return AUTO_FACTOR * median if median > 0.0 else self._initial

    def observe(self, peer: str, distance: float) -> None:
        """Remember one finite distance to neighbour ``peer``'s model ("auto" learns only)."""
        recent = self._recent.get(peer)
        if self.setting == "auto" and recent is not None:
            recent.append(distance)
            self._seen += 1


def clip_step(d: Vector, norm: float, tau: float | None) -> tuple[Vector, bool]:
    """``d · min(1, τ/‖d‖)`` given ``‖d‖`` (finite); says whether it was scaled."""
    if tau is None or norm <= tau:
        return d, False
    return d * (tau / norm), True
