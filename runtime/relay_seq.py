"""Sequence numbers of relayed envelopes (``transport.relay``) that survive a restart.

Two numbers must outlive the process, or a relay could replay old envelopes to a
restarted receiver (in push-sum mode each replayed share adds its mass again), and a
restarted sender whose clock stepped back would be refused as a replayer:

* receiving: the last ``seq`` accepted from each source. ``persist`` is awaited after the
  floor is raised and before the message is delivered, so a crash can lose a message
  (gossip absorbs loss) but never accept it a second time. Writes coalesce (group
  commit): an envelope admitted while a write is in flight waits for the next write,
  which snapshots every floor raised before it starts; so each message is still delivered
  only after a write that holds its own floor, and one write serves every waiter.
* sending: a reservation. Before this node uses a number above it, the reservation is
  raised durably to that number plus an hour of ``time_ns`` (numbers follow the clock),
  so there is about one write an hour; after a restart the node numbers above the
  reservation, whatever its clock says.

Both live in one value of the node's ``StateStore`` (key ``relay-seq``, replaced
atomically: tmp -> fsync -> ``os.replace`` -> fsync the directory), written from the
channels' thread pool. Without a store (tests, in-memory runs) they live in memory only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from fedloom.algorithms.protocol import Persist
from fedloom.transport.channel import offload

__all__ = ["RELAY_SEQ_KEY", "RESERVE_NS", "RelaySeqState"]

RELAY_SEQ_KEY = "relay-seq"
RESERVE_NS = 3600 * 10**9  # numbers a sender reserves per write (an hour of time_ns)


class Store(Protocol):
    """What is written to: ``federation.store.StateStore`` (durable when ``apply`` returns)."""

    def apply(self, persist: Persist) -> None: ...


def _seq(value: Any) -> bool:
    return type(value) is int and value >= 0  # numbers follow time_ns: never negative


def _parse(recovered: Any) -> tuple[int, dict[str, int]]:
    if recovered is None:
        return 0, {}
    ok = (
        isinstance(recovered, Mapping)
        and _seq(recovered.get("sent"))
        and isinstance(recovered.get("seen"), Mapping)
        and all(type(k) is str and _seq(v) for k, v in recovered["seen"].items())
    )
    if not ok:
        raise ValueError(
            f"key {RELAY_SEQ_KEY!r}: expected {{'sent': int >= 0, 'seen': {{str: int >= 0}}}}"
        )
    return int(recovered["sent"]), dict(recovered["seen"])


class RelaySeqState:
    """The durable relay numbers of one node (see the module docstring).

    ``recovered`` is the value last written under ``RELAY_SEQ_KEY`` (``Recovery.values``),
    ``None`` at first. ``sent`` and ``seen`` are where a sender and an inbox start from.
    """

    def __init__(self, store: Store | None = None, recovered: Any = None) -> None:
        self._store = store
        self.sent, self.seen = _parse(recovered)
        self._reserve_to = self.sent  # the reservation the next write carries
        self._floors: Callable[[], Mapping[str, int]] = lambda: self.seen
        self._changes = 0  # bumped by every persist() call
        self._written = 0  # the last change a finished write holds
        self._writing: asyncio.Future[None] | None = None
        self.writes = 0

    def bind(self, floors: Callable[[], Mapping[str, int]]) -> None:
        """Where the receiving floors are read from at each write (the inbox's)."""
        self._floors = floors

    async def reserve(self, seq: int) -> None:
        """Return once ``seq`` is at or below the durable reservation."""
        while seq > self.sent:
            self._reserve_to = max(self._reserve_to, seq + RESERVE_NS)
            await self.persist()

    async def persist(self) -> None:
        """Return once a write that began after this call has finished (group commit)."""
        self._changes += 1
        wanted = self._changes
        while self._written < wanted:
            if self._writing is not None:
                await asyncio.shield(self._writing)
                continue
            self._writing = asyncio.get_running_loop().create_future()
            change, sent = self._changes, self._reserve_to
            value = {"sent": sent, "seen": dict(self._floors())}  # snapshot on the loop
            try:
                if self._store is not None:
                    await offload(self._store.apply, Persist(RELAY_SEQ_KEY, value))
                    self.writes += 1
                self._written = max(self._written, change)
                self.sent = max(self.sent, sent)
            finally:
                done, self._writing = self._writing, None
                done.set_result(None)
