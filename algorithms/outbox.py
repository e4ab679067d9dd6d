"""The sender side of at-least-once delivery: numbered updates kept until acknowledged.

An update gets the next ``seq`` (1, 2, 3, ...), is persisted (``Persist(key, {"op": "add",
...}, append=True)``) and only then sent; it stays pending until the parent's ``Ack`` for
exactly that seq, and every pending update is resent, in seq order, when the link comes
back. The receiver's ledger turns the resulting duplicates into re-acks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from algorithms.protocol import Effect, Persist, Send
from transport.wire import Update

__all__ = ["Outbox"]


class Outbox:
    """Pending updates from one source to one parent, in seq order."""

    __slots__ = ("_key", "_pending", "seq")

    def __init__(self, key: str) -> None:
        self._key = key
        self._pending: dict[int, Update] = {}  # insertion order == seq order
        self.seq = 0

    def __len__(self) -> int:
        return len(self._pending)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def push(self, parent: str, update: Update) -> list[Effect]:
        """Record ``update`` (numbered by ``next_seq``) and send it: Persist, then Send."""
        self._pending[update.seq] = update
        return [
            Persist(self._key, {"op": "add", "seq": update.seq, "update": update}, append=True),
            Send(parent, update),
        ]

    def ack(self, seq: int) -> list[Effect]:
        """Forget update ``seq``; an ack for something not pending is ignored."""
        if self._pending.pop(seq, None) is None:
            return []
        return [Persist(self._key, {"op": "ack", "seq": seq}, append=True)]

    def resend(self, parent: str) -> list[Effect]:
        return [Send(parent, u) for u in self._pending.values()]

    def pending(self) -> list[Update]:
        return list(self._pending.values())

    def snapshot(self) -> dict[str, Any]:
        return {"seq": self.seq, "pending": list(self._pending.values())}

    def restore(self, state: Mapping[str, Any], records: Iterable[Mapping[str, Any]] = ()) -> None:
        """Load a snapshot, then ``replay`` the log records written after it."""
        self.seq = int(state["seq"])
        self._pending = {u.seq: u for u in state["pending"]}
        self.replay(records)

    def replay(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Apply ``add``/``ack`` log records; adds of seqs already known are skipped."""
        for rec in records:
            seq = int(rec["seq"])
            if rec["op"] == "add":
                if seq > self.seq:
                    self.seq = seq
                    self._pending[seq] = rec["update"]
            elif rec["op"] == "ack":
                self._pending.pop(seq, None)
        self._pending = dict(sorted(self._pending.items()))
