"""Peer sets over the network, for daemons: ``NetworkPeers``.

Sites dial out (WebSocket + ``SecureChannel``) and reconnect with jittered exponential
back-off; aggregators listen and admit roster members only. Messages are wire-decoded;
bad bytes close that connection, never the daemon. The events they post follow
``runtime.peer_table``.

Rosters are the peer set's business, not the node's: ``NetworkPeers.set_roster`` swaps a
newer roster in (handshakes, end-to-end signatures), closes every connection of a peer it
no longer admits with that key and role, and pushes it to the peers that dialled this node
(its children). ``RosterUpdate`` messages are consumed here and never reach the node: a
dialler announces the version it holds, a parent answers an older one with its roster,
and a roster pushed by a parent goes to ``on_roster`` (the daemon verifies, persists and
installs it, ``runtime.roster_updates``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedloom.runtime.connection import (
    DEFAULT_MAX_QUEUE,
    QUEUE_MESSAGES_OF_CAP,
    ChannelPipe,
    Connection,
    Gate,
    MessagePipe,
    ProgressLink,
    check_timeouts,
)
from fedloom.runtime.peer_table import ConnectionTable, EventSink, wait_forever
from fedloom.runtime.signing import EndToEnd
from fedloom.transport.channel import (
    DEFAULT_OPTIONS,
    ChannelOptions,
    GateBusy,
    Gatekeeper,
    SecureChannel,
    client_channel,
)
from fedloom.transport.codec_policy import CodecPolicy
from fedloom.transport.error_text import describe
from fedloom.transport.errors import ProtocolError
from fedloom.transport.identity import Identity
from fedloom.transport.limits import Limits, ModelLayout
from fedloom.transport.links import Link, LinkClosed
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.wire import Message, RosterUpdate

# Every peer set module logs under one name, as before the split (log configs and
# ``--log-level fedloom.runtime.peers=debug`` name it).
log = logging.getLogger("fedloom.runtime.peers")


@dataclass(frozen=True, slots=True)
class DialTarget:
    """A neighbour this node connects to: its roster id and WebSocket URL."""

    peer: str
    url: str


@dataclass(frozen=True, slots=True)
class Backoff:
    """Jittered exponential back-off for reconnecting: the n-th wait after a failure is
    uniform in ``[0.5, 1] * min(cap_s, base_s * 2**n)``; a successful handshake resets n."""

    base_s: float = 0.5
    cap_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.base_s > 0:
            raise ValueError(f"backoff base_s must be > 0, got {self.base_s}")
        if not self.cap_s >= self.base_s:
            raise ValueError(f"backoff cap_s ({self.cap_s}) must be >= base_s ({self.base_s})")

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(attempt, 62))
        return ceiling * rng.uniform(0.5, 1.0)


def gossip_dial_targets(
    node_id: str, peers: Iterable[tuple[str, str | None]], *, listening: bool
) -> list[DialTarget]:
    """The gossip neighbours ``node_id`` dials, so that each pair opens one connection.

    ``peers`` are ``(id, url or None)``. A peer without a URL dials us. When both ends
    listen, the smaller id dials (both must list each other's URL); a node that does not
    listen (a hospital behind its firewall) dials every peer that has a URL.
    """
    return [
        DialTarget(peer, url)
        for peer, url in peers
        if url is not None and (not listening or node_id < peer)
    ]


Connect = Callable[[str], Awaitable[Link]]
OnLink = Callable[[Any], Awaitable[None]]


class Listener(Protocol):
    async def close(self) -> None: ...


Serve = Callable[[str, int, OnLink], Awaitable[Listener]]
OnRoster = Callable[[str, RosterUpdate], Awaitable[None]]

# Rosters up to this size are pushed down the tree; a child decodes them under its
# default string cap and the smallest model-derived message cap (``Limits.for_model``).
# A larger roster (thousands of nodes) is installed on each node by a reload.
MAX_PUSHED_ROSTER = 512 * 1024

# Lifetimes are drawn in [1 - LIFETIME_JITTER, 1] * max_session_s, so that the children
# of an aggregator that all connected at its start do not all reconnect at once.
LIFETIME_JITTER = 0.1

# An inbound session counts as live while something arrived on it within this many
# keep-alive intervals (a live peer sends at least one per interval). A second session of
# the same identity is refused while the first is live: two daemons with one identity
# would otherwise replace each other on every redial. A silent one (half-open TCP after
# a crash or a partition) is replaced, so a restarted daemon is locked out for at most
# this long.
LIVE_WITHIN_KEEPALIVES = 2.0


class ListenError(OSError):
    """Binding the listening socket failed (address in use or not local, no permission):
    told apart from any other OS error, which is not a listen failure."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.host, self.port, self.cause = host, port, cause

    def __str__(self) -> str:
        return f"cannot listen on {self.host}:{self.port}: {self.cause}"


async def _ws_connect(url: str) -> Link:
    from fedloom.transport import ws

    return await ws.connect(url)


async def _ws_serve(
    host: str, port: int, on_link: OnLink, known: Container[str] | None = None
) -> Listener:
    from fedloom.transport import ws

    return await ws.serve(host, port, on_link, known=known)


class NetworkPeers:
    """Peers over authenticated, encrypted links (see the module docstring).

    ``dial``: neighbours this node connects to (a site's parent; gossip peers). Each has
    a task that connects, handshakes (expecting that roster id), runs the connection,
    and after any failure or drop waits a jittered exponential back-off and tries again.
    ``listen``: ``(host, port)`` to accept on (aggregators); only roster members with a
    role in ``allowed_roles`` and, if given, an id in ``accept_from`` are admitted. A peer
    that reconnects replaces its older connection once that one is silent (nothing for
    ``LIVE_WITHIN_KEEPALIVES`` keep-alive intervals: a crash, a half-open link); while
    the older one is live the newer session is refused and counted in
    ``duplicate_identity`` (two daemons with one identity).

    ``routes``: ``{peer: relay}`` for gossip neighbours this node can neither dial nor be
    dialled by (both behind firewalls). Messages for such a peer go to its relay (which
    must be dialled) in a signed envelope; the peer counts as up while the relay link
    is, and what the relay brings from it is delivered as coming from it once its
    signature, destination and sequence number check out (``transport.relay``).

    Every connection signs and checks updates and models end to end with ``e2e`` (built
    from ``identity`` and ``roster`` unless given; it cannot be turned off), see
    ``runtime.signing``. Messages decode under ``limits`` (None: the channel's defaults)
    until the model's layout is known (``e2e.set_layout``), then under caps of the
    model's size (``Limits.for_model``) on every link.

    ``max_session_s``: every connection ends after at most this long (between two
    messages, ``runtime.connection``) and a dialled one is re-established with a fresh
    handshake, so no session outlives the roster that admitted it.

    ``set_roster`` installs a newer roster into the running peer set (see the module
    docstring); ``on_roster`` receives the rosters a dialled peer (a parent) pushes that
    claim to be newer than ours, for the caller to verify and install.

    ``connect``/``serve`` default to ``transport.ws``; tests may pass in-memory ones.
    """

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        *,
        dial: Sequence[DialTarget] = (),
        listen: tuple[str, int] | None = None,
        accept_from: Collection[str] | None = None,
        allowed_roles: Collection[str] | None = None,
        codecs: CodecPolicy | None = None,
        limits: Limits | None = None,
        keepalive_s: float = 10.0,
        down_after_s: float = 45.0,
        backoff: Backoff | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        options: ChannelOptions = DEFAULT_OPTIONS,
        connect: Connect = _ws_connect,
        serve: Serve | None = None,
        rng: random.Random | None = None,
        e2e: EndToEnd | None = None,
        routes: Mapping[str, str] | None = None,
        max_session_s: float | None = None,
        roster_text: str = "",
        max_queue_bytes: int | None = None,
    ) -> None:
        ids = [t.peer for t in dial]
        if len(set(ids)) != len(ids):
            raise ValueError(f"dial: a peer is listed twice in {ids}")
        if identity.node_id in ids:
            raise ValueError(f"dial: {identity.node_id!r} cannot dial itself")
        for peer, relay in (routes or {}).items():
            if relay not in ids:
                raise ValueError(f"routes: {peer!r} goes through {relay!r}, which is not dialled")
            if peer in ids or peer == identity.node_id:
                raise ValueError(f"routes: {peer!r} is dialled directly (or is this node)")
        if e2e is not None and e2e.node_id != identity.node_id:
            raise ValueError(f"e2e signs as {e2e.node_id!r}, not as {identity.node_id!r}")
        if max_session_s is not None and not max_session_s > 0:
            raise ValueError(f"max_session_s must be > 0 or None, got {max_session_s}")
        self.identity = identity
        self.roster = roster
        self._roster_text = ""
        self.roster_text = roster_text  # the signed text of ``roster``, pushed to children
        self.on_roster: OnRoster | None = None
        self.max_session_s = max_session_s
        self.e2e = e2e if e2e is not None else EndToEnd(identity, roster)
        self.dial = tuple(dial)
        self.listen = listen
        self.accept_from = None if accept_from is None else frozenset(accept_from)
        self.codecs = codecs if codecs is not None else CodecPolicy()
        self.limits = limits
        # Links this node accepts while it knows no model (a fresh region): capped small
        # (``Limits.before_model``) until the model's limits apply to every link.
        self.inbound_before_model: Limits | None = None
        self.e2e.on_layout = self._use_model_limits
        self.keepalive_s = keepalive_s
        self.down_after_s = down_after_s
        self.backoff = backoff if backoff is not None else Backoff()
        self.max_queue = max_queue
        # None: QUEUE_MESSAGES_OF_CAP messages of the links' size cap (``_queue_bytes``).
        self.max_queue_bytes = max_queue_bytes
        self.options = options
        self._connect = connect
        self._rng = rng if rng is not None else random.Random()
        self.table = ConnectionTable(identity.node_id, routes)
        self.table.control = self._roster_message
        # The roster entry each open connection was admitted with, and which side dialled.
        self._admitted: dict[Connection, RosterEntry] = {}
        self._inbound: set[Connection] = set()
        self._answered: set[Connection] = set()  # inbound links already sent our roster
        if self.e2e.layout is not None:  # (needs the table: it updates open connections)
            self._use_model_limits(self.e2e.layout)
        self.gate = Gatekeeper(identity, roster, allowed_roles=allowed_roles, options=options)
        # The TCP listener keeps a reserve for the addresses the gate knows, too.
        self._serve = serve or functools.partial(_ws_serve, known=self.gate.known)
        self.listener: Listener | None = None
        self.dial_failures = 0
        self.refused = 0
        # Second sessions refused while the peer's first one was live, per peer id.
        self.duplicate_identity: collections.Counter[str] = collections.Counter()
        self._address: dict[Connection, str] = {}  # where each inbound connection came from
        # Called with (peer, seconds) for every connection's handshake round trip.
        self.on_link_rtt: Callable[[str, float], None] | None = None
        # Told (peer, reason) when a connection refuses bad bytes (Connection.on_rejected).
        self.on_input_rejected: Callable[[str, str], None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._accepted: set[asyncio.Future[None]] = set()  # served inbound connections
        self._closing = False
        check_timeouts(keepalive_s, down_after_s, max_queue)

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def listen_url(self) -> str | None:
        """The URL peers reach this node at, once listening (``None`` before/without)."""
        url = getattr(self.listener, "url", None)
        return url if isinstance(url, str) else None

    def send(self, peer: str, msg: Message, after: Gate | None = None) -> bool:
        return self.table.send(peer, msg, after)

    def connected(self) -> frozenset[str]:
        return self.table.connected()

    async def run(self, sink: EventSink) -> None:
        self.table.sink = sink
        self._closing = False
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                if self.listen is not None:
                    host, port = self.listen
                    try:
                        self.listener = await self._serve(host, port, self._accept)
                    except OSError as exc:
                        raise ListenError(host, port, exc) from exc
                for target in self.dial:
                    tg.create_task(self._dial_loop(target), name=f"dial {target.peer}")
                try:
                    await wait_forever()
                finally:
                    self._closing = True  # before the dial loops are cancelled
        finally:
            self._tg = None
            self.table.drop_all("peer set stopped")
            if self._accepted:  # let inbound connections close in order (TAG_FINAL)
                await asyncio.wait(self._accepted, timeout=self.options.close_timeout)
            if self.listener is not None:
                listener, self.listener = self.listener, None
                with contextlib.suppress(Exception):
                    await listener.close()

    def _connection(self, peer: str, pipe: MessagePipe) -> Connection:
        lifetime = self.max_session_s
        if lifetime is not None:
            lifetime *= 1.0 - LIFETIME_JITTER * self._rng.random()
        return Connection(
            peer,
            pipe,
            local_id=self.node_id,
            keepalive_s=self.keepalive_s,
            down_after_s=self.down_after_s,
            max_queue=self.max_queue,
            max_session_s=lifetime,
            max_queue_bytes=self._queue_bytes(),
            on_rejected=self.on_input_rejected,
        )

    def _queue_bytes(self) -> int:
        """The byte cap on each send queue: a few messages of the size the links decode
        (the model's once known; a relay's envelope cap), so that a peer that reads
        nothing holds at most that much of this node's memory."""
        if self.max_queue_bytes is not None:
            return self.max_queue_bytes
        limits = self.limits if self.limits is not None else Limits()
        return QUEUE_MESSAGES_OF_CAP * limits.max_message_bytes

    # ------------------------------------------------------------------- rosters

    @property
    def roster_text(self) -> str:
        """The signed text of ``roster`` that is pushed to children ("" if none is)."""
        return self._roster_text

    @roster_text.setter
    def roster_text(self, text: str) -> None:
        size = len(text.encode())
        if size > MAX_PUSHED_ROSTER:
            log.warning(
                "%s: the roster (%d bytes) is larger than the %d bytes pushed down the "
                "tree; reload it on every node",
                self.node_id,
                size,
                MAX_PUSHED_ROSTER,
                extra={"reason": "roster_too_large_to_push"},
            )
            text = ""
        self._roster_text = text

    def set_roster(self, roster: Roster, text: str) -> list[str]:
        """Use ``roster`` (already verified and newer) from now on: for handshakes, for
        end-to-end signatures, and for every open connection, which is closed when the
        roster no longer lists its peer with the key and role it was admitted with.
        Pushes ``text`` to the peers that dialled this node; returns the peers cut off."""
        self.roster = roster
        self.roster_text = text
        self.gate.roster = roster
        self.e2e.use_roster(roster)
        revoked = []
        for conn, entry in list(self._admitted.items()):
            if _admits(roster, entry):
                continue
            revoked.append(conn.peer)
            self.table.drop(conn, f"revoked by roster version {roster.version}")
        if self.roster_text:
            for conn in list(self._inbound):
                if conn.is_open():
                    self._answered.add(conn)
                    conn.send(RosterUpdate(roster.version, self.roster_text))
        return sorted(set(revoked))

    def _admit(self, conn: Connection, used: Roster, inbound: bool) -> bool:
        """Track ``conn`` (authenticated against ``used``); False if the roster changed
        during its handshake and no longer admits its peer."""
        entry = used.lookup(conn.peer)
        if entry is None or (used is not self.roster and not _admits(self.roster, entry)):
            return False
        self._admitted[conn] = entry
        if inbound:
            self._inbound.add(conn)
        return True

    def _forget(self, conn: Connection) -> None:
        self._address.pop(conn, None)
        self._admitted.pop(conn, None)
        self._inbound.discard(conn)
        self._answered.discard(conn)

    async def _roster_message(self, conn: Connection, msg: RosterUpdate) -> None:
        if conn in self._inbound:
            # A child: it only says which version it holds; we never take a roster from it.
            if msg.text:
                more = self.table.warn_due(conn.peer, "roster_from_child")
                if more is not None:
                    log.warning(
                        "%s: ignored a roster pushed by %s (rosters come from a parent)%s",
                        self.node_id,
                        conn.peer,
                        more,
                        extra={"peer": conn.peer, "reason": "roster_from_child"},
                    )
            elif (
                msg.version < self.roster.version
                and self.roster_text
                and conn not in self._answered  # once per connection: no amplification
            ):
                self._answered.add(conn)
                conn.send(RosterUpdate(self.roster.version, self.roster_text))
            return
        if not msg.text or msg.version <= self.roster.version or self.on_roster is None:
            return  # an announcement, or not newer than ours by its own account
        await self.on_roster(conn.peer, msg)

    async def _dial_loop(self, target: DialTarget) -> None:
        attempt = 0
        while True:
            roster = self.roster
            try:
                link = ProgressLink(await self._connect(target.url))
                channel = await client_channel(
                    link, self.identity, roster, target.peer, options=self.options
                )
            except Exception as exc:  # LinkClosed, ProtocolError, OSError; anything else
                if self._closing:  # a cancellation may surface as a failed connect
                    return
                _reraise_pending_cancel()
                self.dial_failures += 1
                delay = self.backoff.delay(attempt, self._rng)
                attempt += 1
                expected = isinstance(exc, LinkClosed | ProtocolError | OSError)
                log.log(
                    logging.INFO if expected else logging.WARNING,
                    "%s: cannot reach %s at %s (%s); retrying in %.1f s",
                    self.node_id,
                    target.peer,
                    target.url,
                    describe(exc),
                    delay,
                    exc_info=None if expected else exc,  # a bug: keep its traceback
                    extra={"peer": target.peer, "url": target.url, "retry_s": delay},
                )
                await asyncio.sleep(delay)
                continue
            self._observe_rtt(channel)
            conn = self._connection(target.peer, ChannelPipe(channel, link, **self._pipe_opts()))
            if not self._admit(conn, roster, inbound=False):
                await channel.close()
                log.info("%s: %s was revoked during its handshake", self.node_id, target.peer)
                await asyncio.sleep(self.backoff.delay(attempt, self._rng))
                attempt += 1
                continue
            opened_at = time.monotonic()
            try:
                self.table.open(conn)
                conn.send(RosterUpdate(self.roster.version))  # "this is the roster I hold"
                await self.table.serve(conn)
            finally:
                self._forget(conn)
            # The back-off resets only after a session that outlived a keep-alive interval:
            # one refused at once (another daemon holds this identity) keeps backing off.
            if time.monotonic() - opened_at >= self.keepalive_s:
                attempt = 0
            if self._closing:
                return
            # On 3.11 a link that ends as the task is cancelled can swallow the
            # cancellation: honour it rather than redial forever after a shutdown.
            _reraise_pending_cancel()
            # Dropped: wait a little before redialling (a flapping link must not spin).
            await asyncio.sleep(self.backoff.delay(attempt, self._rng))
            attempt += 1

    def _observe_rtt(self, channel: SecureChannel) -> None:
        rtt = channel.handshake_rtt_s
        if self.on_link_rtt is not None and rtt is not None:
            self.on_link_rtt(channel.peer_id, rtt)

    def _use_model_limits(self, layout: ModelLayout) -> None:
        """Every link decodes under caps of the model's size from now on: the end-to-end
        checks know its layout (``EndToEnd.set_layout``: at start, or from the first
        verified model). Open links change at their next message."""
        self.limits = Limits.for_model(layout, base=self.limits)
        for conn in {*self.table._conns.values(), *self._admitted}:
            conn.max_queue_bytes = self._queue_bytes()
            if isinstance(conn.pipe, ChannelPipe):
                conn.pipe.limits = self.limits

    def _pipe_opts(self) -> dict[str, Any]:
        return {
            "codecs": self.codecs,
            "limits": self.limits,
            "e2e": self.e2e,
            "warn": self.table.warn,
        }

    async def _refuse(self, channel: SecureChannel, why: str, reason: str) -> None:
        """Close an authenticated channel this node will not serve, saying why."""
        self.refused += 1
        peer = channel.peer_id
        log.warning(
            "%s: refused %s: %s", self.node_id, peer, why, extra={"peer": peer, "reason": reason}
        )
        await channel.close()

    def _live(self, conn: Connection) -> bool:
        """Whether ``conn`` heard from its peer recently (see ``LIVE_WITHIN_KEEPALIVES``):
        within a few of this node's keep-alive intervals or of the peer's own largest
        recent gap between frames (its keep-alive may be longer), never longer than
        ``down_after_s`` (which ends a silent session anyway: the lock-out stays bounded)."""
        progress = conn.pipe.progress
        pace = max(self.keepalive_s, max(progress.gaps, default=0.0))
        window = min(LIVE_WITHIN_KEEPALIVES * pace, self.down_after_s)
        silent = time.monotonic() - progress.last_progress
        return conn.is_open() and silent < window

    async def _refuse_duplicate(
        self, channel: SecureChannel, old: Connection, address: str
    ) -> None:
        """Refuse a second session of ``old``'s peer while ``old`` is live: counted per
        peer, and a WARNING per peer a minute naming both addresses."""
        peer = channel.peer_id
        self.duplicate_identity[peer] += 1
        more = self.table.warn_due(peer, "duplicate_identity")
        if more is not None:
            log.warning(
                "%s: refused a second session of %s from %s: its session from %s is live "
                "(two daemons with one identity?)%s",
                self.node_id,
                peer,
                address,
                self._address.get(old, "?"),
                more,
                extra={
                    "peer": peer,
                    "address": address,
                    "live_address": self._address.get(old),
                    "reason": "duplicate_identity",
                },
            )
        await channel.close()

    async def _accept(self, raw: Link) -> None:
        link = ProgressLink(raw)
        roster = self.gate.roster  # the one this handshake is checked against
        try:
            # WebSocket links know their source address, for the per-address cap.
            channel = await self.gate.accept(link, address=getattr(raw, "remote_address", None))
        except (ProtocolError, LinkClosed) as exc:
            self.refused += 1
            # A flood is refused by the thousand: counted in the metrics, not logged each.
            level = logging.DEBUG if isinstance(exc, GateBusy) else logging.INFO
            why = describe(exc)
            log.log(level, "%s: refused a connection: %s", self.node_id, why, extra={"reason": why})
            return
        except Exception as exc:  # a bug in the handshake ends this connection only
            self.refused += 1
            log.warning(
                "%s: refused a connection: unexpected %s",
                self.node_id,
                type(exc).__name__,
                exc_info=exc,
                extra={"reason": "unexpected_error"},
            )
            await link.close()
            return
        peer = channel.peer_id
        if self.accept_from is not None and peer not in self.accept_from:
            await self._refuse(channel, "not a neighbour of this node", "not_a_neighbour")
            return
        address = str(getattr(raw, "peer", None) or getattr(raw, "remote_address", "?"))
        old = self.table.get(peer)
        if old is not None and old in self._inbound and self._live(old):
            await self._refuse_duplicate(channel, old, address)
            return
        self._observe_rtt(channel)
        opts = self._pipe_opts()
        if self.e2e.layout is None and self.inbound_before_model is not None:
            opts["limits"] = self.inbound_before_model
        conn = self._connection(peer, ChannelPipe(channel, link, **opts))
        if not self._admit(conn, roster, inbound=True):
            await self._refuse(channel, "revoked during its handshake", "revoked")
            return
        self._address[conn] = address
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._accepted.add(done)
        try:
            self.table.open(conn)
            await self.table.serve(conn)
        finally:
            self._forget(conn)
            self._accepted.discard(done)
            done.set_result(None)


def _admits(roster: Roster, entry: RosterEntry) -> bool:
    """Whether ``roster`` still lists ``entry``'s node with the same key and role."""
    now = roster.lookup(entry.node_id)
    return now is not None and now.public_key == entry.public_key and now.role == entry.role


def _reraise_pending_cancel() -> None:
    """Raise ``CancelledError`` if the running task has a cancellation pending."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
