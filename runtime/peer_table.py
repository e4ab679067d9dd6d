"""Peer sets: how a driver reaches its neighbours, and how their messages reach it.

A ``PeerSet`` turns connections into driver events: ``PeerUp(peer)`` when a connection
to ``peer`` is usable, ``Received(peer, msg)`` for each message, ``PeerDown(peer)`` when
it ends. ``send(peer, msg)`` queues a message on the current connection (or drops it when
there is none, which the protocols absorb: they resend after the next ``PeerUp``).

Guarantees to the node: per peer, events alternate ``PeerUp`` ... ``PeerDown``; every
``Received`` from a connection is posted with a validity check, so the driver drops the
ones still waiting in its inbox once that connection has gone (a node never sees a
message from a peer between its ``PeerDown`` and the next ``PeerUp``).

This module holds what every peer set shares: the protocols (``EventSink``, ``PeerSet``)
and the connection table that keeps those guarantees (``ConnectionTable``). The peer sets:

* ``runtime.memory_network``: ``MemoryNetwork`` / ``MemoryPeers``, in-process links
  (``transport.links``) between drivers in one event loop, with partitions and kills
  (tests, the conformance suite).
* ``runtime.network_peers``: ``NetworkPeers``, for daemons. Sites dial out (WebSocket +
  ``SecureChannel``) and reconnect with jittered exponential back-off; aggregators
  listen and admit roster members only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from fedloom.algorithms.protocol import Event, PeerDown, PeerUp, Received
from fedloom.algorithms.warn_limit import WarnLimiter
from fedloom.runtime.connection import Connection, Gate, Via
from fedloom.transport.error_text import describe
from fedloom.transport.wire import Message, RosterUpdate

# Every peer set module logs under one name, as before the split (log configs and
# ``--log-level fedloom.runtime.peers=debug`` name it).
log = logging.getLogger("fedloom.runtime.peers")

Valid = Callable[[], bool]


class EventSink(Protocol):
    """Where a peer set posts events (the driver's inbox)."""

    def post_nowait(self, event: Event, valid: Valid | None = None) -> None:
        """Post at once (link events, job ends): never waits, never drops."""
        ...

    async def post(self, event: Event, valid: Valid | None = None) -> None:
        """Post, waiting while the inbox is full (back-pressure onto the links)."""
        ...


class PeerSet(Protocol):
    """The driver's view of its neighbours (see the module docstring)."""

    async def run(self, sink: EventSink) -> None:
        """Connect, accept and deliver until cancelled."""
        ...

    def send(self, peer: str, msg: Message, after: Gate | None = None) -> bool:
        """Queue ``msg`` for ``peer``; False (message dropped) when not connected.

        ``after``: the message is not delivered before this future is done (see
        ``Connection.send``)."""
        ...

    def connected(self) -> frozenset[str]:
        """Peers with an open connection now."""
        ...


class ConnectionTable:
    """The open connection per peer, shared by every peer set.

    ``open`` installs a connection (posting ``PeerUp``; an older connection to the same
    peer is dropped first, posting its ``PeerDown``), ``serve`` runs it and drops it when
    it ends. Whoever removes a connection from the table posts its ``PeerDown``, so each
    ``PeerUp`` is matched by exactly one ``PeerDown``.
    """

    def __init__(self, node_id: str, routes: Mapping[str, str] | None = None) -> None:
        self.node_id = node_id
        self.sink: EventSink | None = None
        self._conns: dict[str, Connection] = {}
        # Peers reached through a relay: {peer: relay}. A routed peer counts as connected
        # while its relay is (its own liveness is the node's business: gossip heartbeats).
        self.routes: dict[str, str] = dict(routes or {})
        self._routed: dict[str, list[str]] = {}
        for peer, relay in self.routes.items():
            self._routed.setdefault(relay, []).append(peer)
        self.sent = 0
        self.dropped = 0  # messages for peers without a connection
        self.dropped_relayed = 0  # relayed messages from a relay that is not the sender's
        # Where ``RosterUpdate`` messages go (the peer set's own control traffic).
        self.control: Callable[[Connection, RosterUpdate], Awaitable[None]] | None = None
        # Messages refused per peer: one log line per peer and reason a minute.
        self.warn = WarnLimiter()

    def warn_due(self, peer: str, reason: str) -> str | None:
        """None: stay quiet; else a suffix for the log line (refusals left out before)."""
        unlogged = self.warn.due(peer, reason, time.monotonic())
        if unlogged is None:
            return None
        return f" ({unlogged} more since the last line)" if unlogged else ""

    def connected(self) -> frozenset[str]:
        routed = (p for r in self._conns for p in self._routed.get(r, ()))
        return frozenset(self._conns).union(routed)

    def get(self, peer: str) -> Connection | None:
        return self._conns.get(peer)

    def send(self, peer: str, msg: Message, after: Gate | None = None) -> bool:
        conn = self._conns.get(peer)
        out: Message | Via = msg
        if conn is None and peer in self.routes:
            conn, out = self._conns.get(self.routes[peer]), Via(peer, msg)
        if conn is None or not conn.send(out, after):
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def open(self, conn: Connection) -> None:
        old = self._conns.get(conn.peer)
        if old is not None:
            self.drop(old, "replaced by a newer connection")
        self._conns[conn.peer] = conn
        log.info("%s: connected to %s", self.node_id, conn.peer, extra={"peer": conn.peer})
        if self.sink is not None:
            self.sink.post_nowait(PeerUp(conn.peer))
            for peer in self._routed.get(conn.peer, ()):
                self.sink.post_nowait(PeerUp(peer))

    def drop(self, conn: Connection, reason: str) -> None:
        conn.abort(reason)
        if self._conns.get(conn.peer) is not conn:
            return
        del self._conns[conn.peer]
        log.info(
            "%s: connection to %s ended: %s",
            self.node_id,
            conn.peer,
            conn.reason,
            extra={"peer": conn.peer, "reason": conn.reason},
        )
        if self.sink is not None:
            self.sink.post_nowait(PeerDown(conn.peer))
            for peer in self._routed.get(conn.peer, ()):
                self.sink.post_nowait(PeerDown(peer))

    async def serve(self, conn: Connection) -> str:
        """Run an opened connection to its end, then drop it; return why it ended."""
        reason = "cancelled"
        try:
            reason = await conn.run(self._deliver)
        except Exception as exc:  # one connection's failure never reaches the peer set
            reason = f"unexpected {type(exc).__name__}: {describe(exc)}"
            log.warning(
                "%s: connection to %s failed: %s",
                self.node_id,
                conn.peer,
                reason,
                exc_info=exc,
                extra={"peer": conn.peer, "reason": "unexpected_error"},
            )
        finally:
            self.drop(conn, reason)
        return reason

    def drop_all(self, reason: str) -> None:
        for conn in list(self._conns.values()):
            self.drop(conn, reason)

    async def _deliver(self, conn: Connection, msg: Message | Via) -> None:
        if type(msg) is RosterUpdate:
            if self.control is not None:
                await self.control(conn, msg)
            return
        if self.sink is None:
            return
        if isinstance(msg, Via):
            if type(msg.msg) is RosterUpdate:
                return  # rosters come from a parent, never through a relay
            if self.routes.get(msg.peer) != conn.peer:
                self.dropped_relayed += 1
                more = self.warn_due(conn.peer, "unexpected_relay")
                if more is not None:
                    log.warning(
                        "%s: dropped a message from %s relayed by %s, which is not its relay%s",
                        self.node_id,
                        msg.peer,
                        conn.peer,
                        more,
                        extra={"peer": msg.peer, "relay": conn.peer, "reason": "unexpected_relay"},
                    )
                return
            await self.sink.post(Received(msg.peer, msg.msg), conn.is_open)
            return
        await self.sink.post(Received(conn.peer, msg), conn.is_open)


async def wait_forever() -> None:
    """Wait until cancelled (a peer set runs until its driver stops it)."""
    await asyncio.get_running_loop().create_future()
