"""Robust aggregation: norm clipping, coordinate-wise median, coordinate-wise trimmed mean.

* Norm clipping bounds one update's influence: Δ ← Δ · min(1, C / ‖Δ‖₂)
  (as in DP-FedAvg, McMahan et al. 2018, and robust FL practice). ``NormClip`` holds the
  setting of one aggregator: a fixed C, no clip ("off"), or ``"auto"`` (the default): C is
  ``AUTO_FACTOR`` × the lower median of the OTHER senders' latest norms (one per sender,
  the ``AUTO_WINDOW`` most recent distinct senders), each learnt as clipped (min(‖Δ‖, C)),
  and while fewer than ``AUTO_MIN_SAMPLES`` other senders are known, the norm of the model
  itself (√(number of parameters) for an all-zero model). A child thus never raises the
  bound it meets itself, however many updates it supplies, and colluders that make up at
  most half of the other senders cannot raise it above ``AUTO_FACTOR`` × an honest norm
  (each holds one entry, itself clipped to that bound); an honest delta (typically within
  a few times the median) is left untouched; a delta whose norm is not finite is refused
  outright (callers measure the norm).
* Coordinate-wise median and β-trimmed mean (Yin et al., ICML 2018, "Byzantine-robust
  distributed learning"): per coordinate, sort the n values, drop ⌊βn⌋ from each end, average
  the rest. Both are unweighted over the inputs they are given.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedloom.algorithms.protocol import Weights
from fedloom.algorithms.weights_math import l2_norm

__all__ = [
    "AUTO_FACTOR",
    "AUTO_MIN_SAMPLES",
    "AUTO_WINDOW",
    "NormClip",
    "clip_by_norm",
    "coordinate_median",
    "parse_clip_norm",
    "trimmed_mean",
]

AUTO_FACTOR = 3.0
AUTO_WINDOW = 32
AUTO_MIN_SAMPLES = 5


def parse_clip_norm(setting: object) -> float | str | None:
    """A validated clip setting: "auto", None (no clip; also spelt "off"), or a number > 0."""
    if setting is None or setting == "off":
        return None
    if setting == "auto":
        return "auto"
    if isinstance(setting, int | float) and not isinstance(setting, bool):
        value = float(setting)
        if value > 0.0 and math.isfinite(value):
            return value
    raise ValueError(f'clip_norm must be "auto", "off" (or None) or a number > 0, got {setting!r}')


class NormClip:
    """One aggregator's norm clip; ``reference`` is the model (sets the "auto" start).

    The "auto" bound applied to an update from ``src`` is learnt from the OTHER senders'
    latest norms, one per sender: ``AUTO_FACTOR`` × their lower median, or the starting
    bound while fewer than ``AUTO_MIN_SAMPLES`` other senders are known. A sender's entry is
    its newest norm AFTER clipping (min(‖Δ‖, C)), so however many updates it supplies it
    holds one entry, which is at most the bound it met; it cannot raise its own bound, and
    colluders move the median only once they outnumber the honest senders among the
    others. The ``AUTO_WINDOW`` most recently heard distinct senders are kept (a flood from
    one sender cannot push the others out). An unattributed norm (``src`` None) counts as a
    sender of its own. Each update costs O(``AUTO_WINDOW``).
    """

    __slots__ = ("_anon", "_initial", "_latest", "_sorted", "setting")

    def __init__(self, setting: object, reference: Weights) -> None:
        self.setting = parse_clip_norm(setting)
        size = sum(int(v.size) for v in reference.values())
        norm = l2_norm(reference) if reference else 0.0
        self._initial = norm if 0.0 < norm < math.inf else max(1.0, math.sqrt(size))
        # sender -> its latest clipped norm, least recently heard first; an int key is an
        # unattributed norm (never equal to a sender's name).
        self._latest: dict[str | int, float] = {}
        # The same norms, ascending: the lower median of the others is read off it by
        # index instead of copying and sorting the window on every update.
        self._sorted: list[float] = []
        self._anon = 0

    def bound(self, src: str | None = None) -> float | None:
        """The C an update from ``src`` meets now (None: no clip)."""
        if self.setting is None:
            return None
        if isinstance(self.setting, float):
            return self.setting
        return self._auto_bound(src)

    def _auto_bound(self, src: str | None) -> float:
        """``bound(src)`` under "auto"."""
        norms = self._sorted
        own = None if src is None else self._latest.get(src)
        m = len(norms) if own is None else len(norms) - 1  # the others' norms
        if m < AUTO_MIN_SAMPLES:
            return self._initial
        # The lower median (statistics.median_low) of the others: with up to half of them
        # hostile it is still an honest norm. Index k of the others' sorted norms is index
        # k of all of them below src's own entry, k + 1 from it on (any equal copy of it
        # may stand for it: the values are the same).
        k = (m - 1) // 2
        if own is not None and k >= bisect_left(norms, own):
            k += 1
        median = norms[k]
        return AUTO_FACTOR * median if median > 0.0 else self._initial

    def apply(self, delta: Weights, norm: float, src: str | None = None) -> tuple[Weights, bool]:
        """Clip ``delta`` from ``src`` (whose finite L2 norm the caller measured) and learn
        its clipped norm."""
        c: float | None
        if self.setting == "auto":  # the default: bound(src)'s checks skipped
            auto = self._auto_bound(src)
            self._learn(src, auto if auto < norm else norm)  # min(norm, auto), no call
            c = auto
        else:
            c = self.bound(src)
        if c is None or norm <= c:
            return delta, False
        factor = c / norm
        return {k: (v * factor).astype(v.dtype, copy=False) for k, v in delta.items()}, True

    def _learn(self, src: str | None, norm: float) -> None:
        latest = self._latest
        key: str | int
        if src is None:
            self._anon += 1
            key = self._anon
        else:
            key = src
        norms = self._sorted
        old = latest.pop(key, None)  # re-inserted last: the most recently heard
        if old is not None:
            del norms[bisect_left(norms, old)]
        latest[key] = norm
        insort(norms, norm)
        if len(latest) > AUTO_WINDOW:
            del norms[bisect_left(norms, latest.pop(next(iter(latest))))]

    def snapshot(self) -> dict[str, Any]:
        # The starting bound too: it still applies to a sender whose others are few, and a
        # restored node may be built on a later model than the one it started from.
        recent = [[s if isinstance(s, str) else None, n] for s, n in self._latest.items()]
        return {"recent": recent, "initial": self._initial}

    def restore(self, state: Mapping[str, Any] | None) -> None:
        """Load a ``snapshot()``; ValueError for a value no live clip could have written.

        A checkpoint is this node's own state, protected by the state directory's file
        permissions: the checks catch corruption (a NaN, a negative or infinite norm
        would let updates through unclipped), not an attacker who can write the disk."""
        if state is None:
            state = {}
        if not isinstance(state, Mapping):
            raise ValueError(f"clip: expected a mapping, got {type(state).__name__}")
        initial = _norm(state.get("initial", self._initial), "clip.initial")
        if initial > 0.0:
            self._initial = initial
        self._latest = {}
        self._sorted = []
        self._anon = 0
        recent = state.get("recent", ())
        if not isinstance(recent, list | tuple):
            raise ValueError(f"clip.recent: expected a list, got {type(recent).__name__}")
        # Oldest first. Older checkpoints kept several norms per sender (the newest wins)
        # or bare norms without senders (each unattributed).
        for item in recent:
            if isinstance(item, list | tuple):
                if len(item) != 2 or not (item[0] is None or isinstance(item[0], str)):
                    raise ValueError(f"clip.recent: expected [sender, norm], got {item!r:.80}")
                self._learn(item[0], _norm(item[1], "clip.recent"))
            else:
                self._learn(None, _norm(item, "clip.recent"))


def _norm(value: object, what: str) -> float:
    """A restored norm: a finite real >= 0 (0.0 is a zero delta's)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what}: expected a number, got {type(value).__name__}")
    norm = float(value)
    if not 0.0 <= norm < math.inf:
        raise ValueError(f"{what}: {norm} is not a finite norm >= 0")
    return norm


def clip_by_norm(delta: Weights, max_norm: float) -> tuple[Weights, bool]:
    """Scale ``delta`` so its global L2 norm is at most ``max_norm``; say whether it was clipped."""
    if not max_norm > 0.0:
        raise ValueError(f"clip norm must be > 0, got {max_norm}")
    norm = l2_norm(delta)
    if norm <= max_norm:
        return delta, False
    factor = max_norm / norm
    return {k: (v * factor).astype(v.dtype, copy=False) for k, v in delta.items()}, True


def _stack(deltas: Sequence[Weights], name: str) -> np.ndarray:
    return np.stack([np.asarray(d[name], dtype=np.float64) for d in deltas])


def coordinate_median(deltas: Sequence[Weights]) -> Weights:
    """Per-coordinate median of the deltas (dtype of the first)."""
    if not deltas:
        raise ValueError("median of no deltas")
    first = deltas[0]
    return {
        k: np.median(_stack(deltas, k), axis=0).astype(v.dtype, copy=False)
        for k, v in first.items()
    }


def trimmed_mean(deltas: Sequence[Weights], beta: float) -> Weights:
    """Per-coordinate mean after dropping the ⌊β·n⌋ smallest and largest values.

    ``beta`` is in [0, 0.5); when it would trim everything the median's middle value(s) remain.
    """
    if not deltas:
        raise ValueError("trimmed mean of no deltas")
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {beta}")
    n = len(deltas)
    cut = min(math.floor(beta * n), (n - 1) // 2)
    first = deltas[0]
    out: Weights = {}
    for k, v in first.items():
        stacked = np.sort(_stack(deltas, k), axis=0)
        out[k] = stacked[cut : n - cut].mean(axis=0).astype(v.dtype, copy=False)
    return out
