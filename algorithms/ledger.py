"""Which ``(src, seq)`` updates a receiver has already recorded: dedup for at-most-once apply.

Per source the ledger keeps a watermark — the highest seq such that every seq up to it has
been recorded — plus the (normally empty) set of seqs recorded above a gap. Sources number
their updates 1, 2, 3, ... and resend unacknowledged ones in order, so the set stays empty in
practice; it exists so an update overtaken by a later one (a lossy link, or one a receiver
dropped unacknowledged under its rate limit) is still applied once rather than mistaken for
a duplicate. ``seen`` and ``record`` are O(1) amortised.

The set is bounded (``MAX_ABOVE`` seqs per source), so a peer that numbers its updates with
ever fresh, sparse seqs cannot grow the ledger or the checkpoints that carry it: when the
set would overflow, the watermark jumps to the lowest seq in it (then through any run above
that). The seqs jumped over were never recorded, hence never acknowledged; should one come
later it is taken for a duplicate (re-acked, not applied), which loses nothing acked.
The snapshot is therefore O(sources).

The ledger is pure bookkeeping: callers persist a record of each decision (``Persist``
"applied", append) *before* acknowledging it, and rebuild the ledger from those records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["MAX_ABOVE", "AppliedLedger"]

MAX_ABOVE = 64


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
            above = self._above.setdefault(src, set())
            above.add(seq)
            if len(above) <= MAX_ABOVE:
                return
            mark = min(above)  # overflow: give up the gap below the lowest early seq
            above.discard(mark)
        else:
            mark = seq
            above = self._above.get(src, set())
        if above:
            # Close the gap: advance the watermark through any seqs recorded early.
            while mark + 1 in above:
                mark += 1
                above.discard(mark)
        if not above:
            self._above.pop(src, None)
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
        for src, seqs in state.get("above", {}).items():
            for seq in sorted(int(s) for s in seqs):  # re-bounds an older, larger snapshot
                ledger.record(str(src), seq)
        return ledger

    @classmethod
    def from_records(cls, records: Iterable[tuple[str, int]]) -> AppliedLedger:
        ledger = cls()
        for src, seq in records:
            ledger.record(src, seq)
        return ledger
