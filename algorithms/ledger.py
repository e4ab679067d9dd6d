"""Which ``(src, seq)`` updates a receiver has already recorded: dedup for at-most-once apply.

Per source the ledger keeps a watermark — the highest seq such that every seq up to it has
been recorded — plus the (normally empty) set of seqs recorded above a gap. Sources number
their updates 1, 2, 3, ... and resend unacknowledged ones in order, so the set stays empty in
practice; it exists so an update overtaken by a later one (a lossy link) is still applied
once rather than mistaken for a duplicate. ``seen`` and ``record`` are O(1) amortised.

The ledger is pure bookkeeping: callers persist a record of each decision (``Persist``
"applied", append) *before* acknowledging it, and rebuild the ledger from those records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["AppliedLedger"]


class AppliedLedger:
    """Per-source watermark (+ out-of-order seqs) of recorded updates."""

    __slots__ = ("_above", "_mark")

    def __init__(self) -> None:
        self._mark: dict[str, int] = {}
        self._above: dict[str, set[int]] = {}

    def seen(self, src: str, seq: int) -> bool:
        """Has ``(src, seq)`` been recorded already?"""
        if seq <= self._mark.get(src, 0):
            return True
        above = self._above.get(src)
        return above is not None and seq in above

    def record(self, src: str, seq: int) -> None:
        """Mark ``(src, seq)`` as recorded (idempotent)."""
        mark = self._mark.get(src, 0)
        if seq <= mark:
            return
        if seq != mark + 1:
            self._above.setdefault(src, set()).add(seq)
            return
        mark = seq
        above = self._above.get(src)
        if above:
            # Close the gap: advance the watermark through any seqs recorded early.
            while mark + 1 in above:
                mark += 1
                above.discard(mark)
            if not above:
                del self._above[src]
        self._mark[src] = mark

    def watermark(self, src: str) -> int:
        """Highest seq with every seq up to it recorded (0 when none)."""
        return self._mark.get(src, 0)

    def snapshot(self) -> dict[str, Any]:
        """Plain data: ``{"mark": {src: seq}, "above": {src: [seq, ...]}}``."""
        return {
            "mark": dict(self._mark),
            "above": {src: sorted(seqs) for src, seqs in self._above.items() if seqs},
        }

    @classmethod
    def from_snapshot(cls, state: Mapping[str, Any]) -> AppliedLedger:
        ledger = cls()
        ledger._mark = {str(k): int(v) for k, v in state.get("mark", {}).items()}
        ledger._above = {str(k): {int(s) for s in v} for k, v in state.get("above", {}).items()}
        return ledger

    @classmethod
    def from_records(cls, records: Iterable[tuple[str, int]]) -> AppliedLedger:
        ledger = cls()
        for src, seq in records:
            ledger.record(src, seq)
        return ledger
