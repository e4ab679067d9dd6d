"""Flat-vector helpers for gossip mixing.

A gossip peer mixes whole models at every step. Working on one contiguous float64 vector
per model (instead of a dict of small tensors) keeps a mix a handful of numpy calls, and
float64 keeps repeated mixing and push-sum mass bookkeeping from drifting. Tensors leave
the peer in their original names, shapes and dtypes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from algorithms.protocol import Weights

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


def weighted_mix(self_weight: float, x: Vector, others: Iterable[tuple[float, Vector]]) -> Vector:
    """``self_weight·x + Σ w_j·x_j`` as a fresh vector."""
    out = x * self_weight
    for w, xj in others:
        out += w * xj
    return out
