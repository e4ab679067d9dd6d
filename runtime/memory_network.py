"""In-process peer sets: ``MemoryNetwork`` links the ``MemoryPeers`` of drivers that
share one event loop (tests, the conformance suite), through the real wire codec, with
partitions, heals and kills. The events they post follow ``runtime.peer_table``. A pair
whose connection ends on its own (bad bytes, a send-queue overflow, silence) is joined
again after a jittered exponential back-off, as ``NetworkPeers`` redials.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine, Iterable
from typing import Any

from fedloom.runtime.connection import (
    DEFAULT_MAX_QUEUE,
    Connection,
    Gate,
    MessagePipe,
    WirePipe,
    check_timeouts,
)
from fedloom.runtime.network_peers import Backoff
from fedloom.runtime.peer_table import ConnectionTable, EventSink, wait_forever
from fedloom.transport.codec_policy import CodecPolicy
from fedloom.transport.limits import Limits
from fedloom.transport.links import Link, memory_link_pair
from fedloom.transport.wire import Message


class MemoryNetwork:
    """In-process links between the peer sets of drivers sharing one event loop.

    ``link(a, b)`` makes ``a`` and ``b`` neighbours: whenever both peer sets run and the
    pair is not cut, a memory link joins them (``PeerUp`` on both ends). Messages go
    through the real wire codec (``codecs``), so what a node sends is what a remote
    node would decode. ``partition``/``heal`` cut and restore pairs; ``isolate`` cuts
    a node from everyone (a kill). Cutting is synchronous: messages of the cut
    connections that were not yet handled are dropped. A connection that ends otherwise
    (its peer set stopped, or bad input, an overflowing send queue or silence ended it)
    is redialled after ``backoff`` (its n-th wait since the pair last held a connection
    for ``backoff.cap_s``), unless the pair is cut, a node isolated or a peer set stopped
    by then; ``redials`` counts the joins made so.
    """

    def __init__(
        self,
        *,
        codecs: CodecPolicy | None = None,
        limits: Limits | None = None,
        keepalive_s: float | None = None,
        down_after_s: float | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        backoff: Backoff | None = None,
        seed: int = 0,
    ) -> None:
        check_timeouts(keepalive_s, down_after_s, max_queue)
        # Short by default: in-process links come back at once if nothing else is wrong.
        self.backoff = backoff if backoff is not None else Backoff(base_s=0.05, cap_s=1.0)
        self._rng = random.Random(seed)
        self._attempts: dict[frozenset[str], int] = {}  # failed sessions in a row, per pair
        self._redialling: set[frozenset[str]] = set()
        self.redials = 0
        self.codecs = codecs if codecs is not None else CodecPolicy()
        self.limits = limits
        self.keepalive_s = keepalive_s
        self.down_after_s = down_after_s
        self.max_queue = max_queue
        self._members: dict[str, MemoryPeers] = {}
        self._neighbours: dict[str, set[str]] = {}
        self._cut: set[frozenset[str]] = set()
        self._isolated: set[str] = set()

    def peers(self, node_id: str) -> MemoryPeers:
        """The peer set of ``node_id`` (one per node)."""
        member = self._members.get(node_id)
        if member is None:
            member = self._members[node_id] = MemoryPeers(self, node_id)
            self._neighbours.setdefault(node_id, set())
        return member

    def link(self, a: str, b: str) -> None:
        if a == b:
            raise ValueError(f"link: a node cannot be its own neighbour ({a!r})")
        self.peers(a)
        self.peers(b)
        self._neighbours[a].add(b)
        self._neighbours[b].add(a)
        self._maybe_connect(a, b)

    def neighbours(self, node_id: str) -> frozenset[str]:
        return frozenset(self._neighbours.get(node_id, ()))

    def partition(self, group: Iterable[str]) -> list[tuple[str, str]]:
        """Cut every neighbour pair with one end in ``group``; return the pairs cut."""
        inside = set(group)
        unknown = sorted(inside - set(self._members))
        if unknown:
            raise ValueError(f"partition: unknown node(s) {', '.join(unknown)}")
        pairs = sorted((a, b) for a in inside for b in self._neighbours[a] if b not in inside)
        for a, b in pairs:
            self.cut(a, b)
        return pairs

    def heal(self, pairs: Iterable[tuple[str, str]]) -> None:
        for a, b in pairs:
            self.restore(a, b)

    def cut(self, a: str, b: str) -> None:
        self._cut.add(frozenset((a, b)))
        self._disconnect(a, b, "link cut (partition)")

    def restore(self, a: str, b: str) -> None:
        self._cut.discard(frozenset((a, b)))
        self._maybe_connect(a, b)

    def isolate(self, node_id: str) -> None:
        """Cut ``node_id`` from everyone for good (its neighbours get ``PeerDown`` now)."""
        self.peers(node_id)
        self._isolated.add(node_id)
        for other in sorted(self._neighbours[node_id]):
            self._disconnect(node_id, other, f"{node_id} is gone")

    # -- internals

    def _attached(self, node_id: str) -> None:
        for other in sorted(self._neighbours[node_id]):
            self._maybe_connect(node_id, other)

    def _maybe_connect(self, a: str, b: str) -> None:
        pa, pb = self._members[a], self._members[b]
        if not (pa.running and pb.running) or frozenset((a, b)) in self._cut:
            return
        if a in self._isolated or b in self._isolated:
            return
        if pa.table.get(b) is not None or pb.table.get(a) is not None:
            return
        la, lb = memory_link_pair(max_queue=16)
        pa.spawn(self._connection(a, b, la))
        pb.spawn(self._connection(b, a, lb))

    def _ended(self, local: str, peer: str, lasted_s: float) -> None:
        """``local``'s connection to ``peer`` has ended: redial the pair after a back-off
        (one redial per pair at a time; ``_maybe_connect`` then decides)."""
        pair = frozenset((local, peer))
        if lasted_s >= self.backoff.cap_s:
            self._attempts.pop(pair, None)  # a session that held: start the back-off over
        if pair in self._redialling or not self._members[local].running:
            return
        attempt = self._attempts.get(pair, 0)
        self._attempts[pair] = attempt + 1
        self._redialling.add(pair)
        delay = self.backoff.delay(attempt, self._rng)
        self._members[local].spawn_task(self._redial(local, peer, delay), f"redial {peer}")

    async def _redial(self, local: str, peer: str, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            self._redialling.discard(frozenset((local, peer)))
        before = self._members[local].table.get(peer)
        self._maybe_connect(local, peer)
        if before is None and self._members[local].table.get(peer) is not None:
            self.redials += 1

    def _connection(self, local: str, peer: str, link: Link) -> Connection:
        pipe: MessagePipe = WirePipe(link, codecs=self.codecs, limits=self.limits)
        return Connection(
            peer,
            pipe,
            local_id=local,
            keepalive_s=self.keepalive_s,
            down_after_s=self.down_after_s,
            max_queue=self.max_queue,
        )

    def _disconnect(self, a: str, b: str, reason: str) -> None:
        for local, peer in ((a, b), (b, a)):
            member = self._members.get(local)
            conn = member.table.get(peer) if member is not None else None
            if member is not None and conn is not None:
                member.table.drop(conn, reason)


class MemoryPeers:
    """One node's peer set on a ``MemoryNetwork`` (make it with ``network.peers(id)``)."""

    def __init__(self, network: MemoryNetwork, node_id: str) -> None:
        self.network = network
        self.node_id = node_id
        self.table = ConnectionTable(node_id)
        self.running = False
        self._tg: asyncio.TaskGroup | None = None

    def send(self, peer: str, msg: Message, after: Gate | None = None) -> bool:
        return self.table.send(peer, msg, after)

    def connected(self) -> frozenset[str]:
        return self.table.connected()

    async def run(self, sink: EventSink) -> None:
        if self.running:
            raise RuntimeError(f"{self.node_id}: this peer set is already running")
        self.table.sink = sink
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self.running = True
                self.network._attached(self.node_id)
                await wait_forever()
        finally:
            self.running = False
            self._tg = None
            self.table.drop_all("peer set stopped")

    def spawn(self, conn: Connection) -> None:
        self.table.open(conn)
        self.spawn_task(self._serve(conn), f"{self.node_id}->{conn.peer}")

    def spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        assert self._tg is not None
        self._tg.create_task(coro, name=name)

    async def _serve(self, conn: Connection) -> None:
        opened = time.monotonic()
        await self.table.serve(conn)
        self.network._ended(self.node_id, conn.peer, time.monotonic() - opened)
