"""A TCP fault proxy for chaos runs, in the spirit of Toxiproxy's toxics (asyncio, no dependency).

Each *link* listens on one local port and forwards every accepted connection to one upstream
``(host, port)``; a federation's child dials the link's port instead of its parent's.  Each
direction of a link ("up": client -> upstream, "down": upstream -> client) carries a frozen
:class:`Toxics` value that can be replaced at run time and applies at once to live connections
as well as to new ones.

What each toxic models, and how honestly (a proxy sees a byte stream, not packets):

* ``latency_ms`` / ``jitter_ms``: every chunk read is delivered ``latency ± jitter`` after it
  arrived, never before an earlier chunk (a TCP stream never reorders bytes), so jitter shows
  up as bunching, not as reordering.
* ``rate_kbps``: a token bucket over bytes (burst ``BURST_S`` worth of the rate, at least one
  MSS) paces delivery.
* ``loss``: TCP turns a lost segment into a retransmission stall, never into missing bytes.
  A chunk of ``k`` segments (``MSS`` bytes each) meets a loss with probability
  ``1 - (1 - loss)**k``; it is then held back for a retransmission time-out ``rto_ms``, doubled
  for each further loss of the retransmission (probability ``loss`` each, up to
  ``MAX_RETRANSMITS``), as Linux's back-off does.  Every later byte waits behind it
  (head-of-line blocking).  Congestion-window shrinkage after a loss is not modelled.
* ``reorder``: a receiver's TCP holds out-of-order segments until the gap is filled, so an
  application only ever sees reordering as delay: with probability ``reorder`` a chunk is held
  ``reorder_ms`` longer (and everything behind it).  Spurious fast retransmits are not modelled.
* ``reset_after_bytes``: every connection is cut with an RST (``SO_LINGER`` 0, both sides)
  after it has delivered that many more bytes in this direction, i.e. mid-message; new
  connections keep being accepted (each gets its own budget).  :meth:`FaultNetwork.reset`
  is the one-shot form: it cuts the live connections only.
* ``blackhole``: bytes are read (up to the memory cap) and held, never delivered; both TCP
  connections stay open.  When the blackhole is lifted the held bytes are delivered in order,
  as a real network's TCP would after a partition healed within the retransmission time-out
  (Linux gives up after ~15 minutes; the application's own keep-alives decide sooner).  A
  one-way partition is a blackhole in one direction only.
* ``refuse`` (per link, :meth:`FaultNetwork.refuse`): new connections are closed at once with
  an RST, a hard partition; live connections are left alone (add :meth:`FaultNetwork.reset`
  to cut them too).
* heal: all toxics off, refusal lifted.

Memory is bounded: a direction that holds more than ``cap_bytes`` undelivered bytes stops
reading from its source, so TCP flow control pushes back on the sender as a slow or dead link
would, instead of buffering without limit.

Random draws come from one ``random.Random(seed)`` per link (seeded from the network's seed and
the link's name), so a run's draws repeat given a seed; chunk boundaries still depend on the
kernel's timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down", "both"]

MSS = 1448  # bytes of payload per TCP segment on a 1500-byte MTU with timestamps
BURST_S = 0.05  # a token bucket holds this many seconds' worth of its rate
MAX_RETRANSMITS = 6  # a chunk is stalled by at most rto * (2**6 - 1)
READ_SIZE = 64 * 1024
DEFAULT_CAP_BYTES = 4 * 1024 * 1024
CONNECT_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Toxics:
    """The faults of one direction of a link; ``Toxics()`` is a healthy link."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rate_kbps: float = 0.0  # 0: unlimited
    loss: float = 0.0  # probability that a segment is lost (see the module docstring)
    rto_ms: float = 200.0  # first retransmission time-out after a loss (Linux's minimum)
    reorder: float = 0.0  # probability that a chunk is held back by reorder_ms
    reorder_ms: float = 10.0
    reset_after_bytes: int | None = None  # RST each connection after this many more bytes
    blackhole: bool = False

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "rate_kbps", "rto_ms", "reorder_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"toxic {name} must be a finite number >= 0, not {value!r}")
        for name in ("loss", "reorder"):
            value = getattr(self, name)
            if not (0.0 <= value < 1.0):
                raise ValueError(f"toxic {name} must be a probability in [0, 1), not {value!r}")
        if self.reset_after_bytes is not None and self.reset_after_bytes < 0:
            raise ValueError(f"toxic reset_after_bytes must be >= 0, not {self.reset_after_bytes}")


HEALTHY = Toxics()


@dataclass(frozen=True)
class LinkStats:
    """Counters of one link since it was added."""

    accepted: int  # connections accepted and forwarded to the upstream
    refused: int  # connections closed at once because the link refuses
    upstream_failed: int  # connections closed because the upstream could not be reached
    resets: int  # connections cut with an RST by a fault (toxic or reset())
    broken: int  # connections an endpoint ended with an error (RST passed on to the other)
    active: int  # connections open now
    bytes_up: int  # bytes delivered to the upstream
    bytes_down: int  # bytes delivered to the clients
    held_up: int  # bytes read from clients, not yet delivered
    held_down: int


@dataclass
class _Chunk:
    data: memoryview  # empty: the source's end of stream; sliced as it is delivered
    size: int  # as read: the segments a loss is drawn over
    arrived: float
    jitter_u: float  # uniform in [-1, 1]
    loss_u: float  # uniform in [0, 1)
    reorder_u: float


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN: SO_LINGER on, timeout 0, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _stall_s(toxics: Toxics, chunk: _Chunk) -> float:
    """Extra delay of a chunk from loss (retransmission back-off) and reordering."""
    extra = 0.0
    if toxics.loss > 0 and chunk.size:
        segments = -(-chunk.size // MSS)
        hit = 1.0 - (1.0 - toxics.loss) ** segments
        if chunk.loss_u < hit:
            # Inverse CDF of the number of losses r >= 1: P(r >= j) = hit * loss**(j-1).
            tail = chunk.loss_u / hit
            retries = (
                1 + int(math.log(tail) / math.log(toxics.loss)) if tail > 0 else MAX_RETRANSMITS
            )
            retries = min(retries, MAX_RETRANSMITS)
            extra += toxics.rto_ms * (2**retries - 1) / 1000.0
    if toxics.reorder > 0 and chunk.reorder_u < toxics.reorder:
        extra += toxics.reorder_ms / 1000.0
    return extra


class _Pipe:
    """One direction of one connection: a reader filling a queue, a writer draining it."""

    def __init__(
        self,
        conn: _Conn,
        direction: Literal["up", "down"],
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
    ) -> None:
        self.conn = conn
        self.direction = direction
        self.src = src
        self.dst = dst
        self.queue: deque[_Chunk] = deque()
        self.held = 0
        self.wake = asyncio.Event()  # new data, new toxics, or closing: the writer re-checks
        self.space = asyncio.Event()  # the writer freed room: the reader re-checks
        self.reset_budget: int | None = None
        self.tokens = 0.0
        self.tokens_at = time.monotonic()
        self.eof_delivered = False

    @property
    def toxics(self) -> Toxics:
        return self.conn.link.toxics(self.direction)

    def on_toxics(self) -> None:
        """New toxics for this direction: a reset budget counts from now."""
        self.reset_budget = self.toxics.reset_after_bytes
        self.wake.set()

    async def pump(self) -> None:
        link = self.conn.link
        while not self.conn.closing:
            self.space.clear()
            if self.held > link.cap_bytes:
                await self.space.wait()
                continue
            try:
                data = await self.src.read(READ_SIZE)
            except (ConnectionError, OSError):
                self.conn.abort(rst=True)  # pass an endpoint's RST on to the other one
                return
            rng = link.rng
            self.queue.append(
                _Chunk(
                    memoryview(data),
                    len(data),
                    time.monotonic(),
                    rng.uniform(-1, 1),
                    rng.random(),
                    rng.random(),
                )
            )
            self.held += len(data)
            self.wake.set()
            if not data:
                return

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; wakes early when toxics change or the connection closes."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)

    async def deliver(self) -> None:
        link = self.conn.link
        while not self.conn.closing:
            self.wake.clear()
            if not self.queue:
                await self.wake.wait()
                continue
            toxics = self.toxics
            if toxics.blackhole:
                await self.wake.wait()
                continue
            chunk = self.queue[0]
            if not chunk.data:
                self.queue.popleft()
                self.eof_delivered = True
                if self.dst.can_write_eof():
                    with contextlib.suppress(OSError, RuntimeError):
                        self.dst.write_eof()
                self.conn.on_eof()
                return
            delay = toxics.latency_ms + chunk.jitter_u * toxics.jitter_ms
            due = chunk.arrived + max(0.0, delay) / 1000.0 + _stall_s(toxics, chunk)
            wait = due - time.monotonic()
            if wait > 0:
                await self._sleep(wait)
                continue
            piece = chunk.data
            if toxics.rate_kbps > 0:
                rate = toxics.rate_kbps * 125.0  # bytes per second
                burst = max(float(MSS), rate * BURST_S)
                now = time.monotonic()
                self.tokens = min(burst, self.tokens + (now - self.tokens_at) * rate)
                self.tokens_at = now
                if self.tokens < min(len(piece), burst):
                    await self._sleep((min(len(piece), burst) - self.tokens) / rate)
                    continue
                piece = piece[: int(self.tokens)]
                self.tokens -= len(piece)
            if self.reset_budget is not None:
                if self.reset_budget <= 0:
                    self.conn.abort(rst=True, injected=True)
                    return
                piece = piece[: self.reset_budget]
                self.reset_budget -= len(piece)
            self.dst.write(piece)
            try:
                await self.dst.drain()
            except (ConnectionError, OSError):
                self.conn.abort(rst=True)  # the receiving endpoint went away
                return
            if len(piece) == len(chunk.data):
                self.queue.popleft()
            else:
                chunk.data = chunk.data[len(piece) :]  # a view: no copy
            self.held -= len(piece)
            link.count_delivered(self.direction, len(piece))
            self.space.set()
            if self.reset_budget == 0:
                self.conn.abort(rst=True, injected=True)
                return


class _Conn:
    """One proxied connection: two pipes, closed together."""

    def __init__(
        self,
        link: ProxyLink,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.link = link
        self.client_w = client[1]
        self.upstream_w = upstream[1]
        self.closing = False
        self.up = _Pipe(self, "up", client[0], upstream[1])
        self.down = _Pipe(self, "down", upstream[0], client[1])
        self.on_toxics("both")

    def pipes(self) -> tuple[_Pipe, _Pipe]:
        return self.up, self.down

    def on_toxics(self, direction: Direction) -> None:
        for pipe in self.pipes():
            if direction in (pipe.direction, "both"):
                pipe.on_toxics()

    def on_eof(self) -> None:
        """Both directions ended cleanly: close both sockets with a FIN."""
        if self.up.eof_delivered and self.down.eof_delivered and not self.closing:
            self.closing = True
            self.client_w.close()
            self.upstream_w.close()
            self._wake_all()

    def abort(self, rst: bool, injected: bool = False) -> None:
        """Close both sockets now; ``injected`` counts it as a fault, else as an endpoint's."""
        if self.closing:
            return
        self.closing = True
        if injected:
            self.link.resets += 1
        elif rst:
            self.link.broken += 1
        if rst:
            _rst(self.client_w)
            _rst(self.upstream_w)
        else:
            self.client_w.transport.abort()
            self.upstream_w.transport.abort()
        self._wake_all()

    def _wake_all(self) -> None:
        for pipe in self.pipes():
            pipe.wake.set()
            pipe.space.set()

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(coro)
            for pipe in self.pipes()
            for coro in (pipe.pump(), pipe.deliver())
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            self.abort(rst=False)  # no-op when already closed
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ProxyLink:
    """One proxied link: a listening port forwarding to one upstream."""

    name: str
    upstream: tuple[str, int]
    rng: random.Random
    cap_bytes: int = DEFAULT_CAP_BYTES
    up: Toxics = HEALTHY
    down: Toxics = HEALTHY
    refusing: bool = False
    accepted: int = 0
    refused: int = 0
    upstream_failed: int = 0
    resets: int = 0
    broken: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    conns: set[_Conn] = field(default_factory=set)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def toxics(self, direction: Literal["up", "down"]) -> Toxics:
        return self.up if direction == "up" else self.down

    def count_delivered(self, direction: Literal["up", "down"], n: int) -> None:
        if direction == "up":
            self.bytes_up += n
        else:
            self.bytes_down += n

    def set_toxics(self, direction: Direction, toxics: Toxics) -> None:
        """Replace a direction's toxics; setting equal ones again changes nothing (a reset
        budget keeps counting), so a runner may re-apply a link's whole state freely."""
        for side in ("up", "down"):
            if direction not in (side, "both") or self.toxics(side) == toxics:
                continue
            if side == "up":
                self.up = toxics
            else:
                self.down = toxics
            for conn in self.conns:
                conn.on_toxics(side)

    def stats(self) -> LinkStats:
        return LinkStats(
            accepted=self.accepted,
            refused=self.refused,
            upstream_failed=self.upstream_failed,
            resets=self.resets,
            broken=self.broken,
            active=len(self.conns),
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            held_up=sum(c.up.held for c in self.conns),
            held_down=sum(c.down.held for c in self.conns),
        )

    async def _dial_upstream(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Connect to the upstream, or None when it fails or the link is closed meanwhile.

        The handler is never cancelled (Python 3.11 logs a cancelled client_connected_cb
        task as an error), so closing wakes it through ``closed`` instead.
        """
        dial = asyncio.create_task(
            asyncio.wait_for(asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT_S)
        )
        closed = asyncio.create_task(self.closed.wait())
        await asyncio.wait((dial, closed), return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        if not dial.done():
            dial.cancel()
        results = await asyncio.gather(dial, closed, return_exceptions=True)
        upstream = results[0]
        if isinstance(upstream, BaseException):
            return None
        if self.closed.is_set():
            upstream[1].transport.abort()
            return None
        return upstream

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            if self.closed.is_set():
                return
            if self.refusing:
                self.refused += 1
                _rst(writer)
                return
            upstream = await self._dial_upstream()
            if upstream is None:
                if not self.closed.is_set():
                    self.upstream_failed += 1
                    _rst(writer)
                return
            if self.refusing:  # refused while we were dialling
                self.refused += 1
                _rst(writer)
                _rst(upstream[1])
                return
            self.accepted += 1
            conn = _Conn(self, (reader, writer), upstream)
            self.conns.add(conn)
            try:
                await conn.run()
            finally:
                self.conns.discard(conn)
        finally:
            if not writer.transport.is_closing():
                writer.transport.abort()
            self.handlers.discard(task)


def _names(names: str | Iterable[str] | None, links: dict[str, ProxyLink]) -> list[ProxyLink]:
    if names is None:
        return list(links.values())
    wanted = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in links]
    if unknown:
        raise KeyError(f"no such link: {', '.join(unknown)}")
    return [links[n] for n in wanted]


class FaultNetwork:
    """Many named links, each a fault proxy to one upstream; faults apply per link or group.

    Use from one event loop::

        net = FaultNetwork(seed=7)
        port = await net.add_link("site-1->region-a", ("127.0.0.1", 9001))
        net.apply(["site-1->region-a"], "up", Toxics(latency_ms=50))
        ...
        net.heal()
        await net.close()
    """

    def __init__(
        self, seed: int = 0, host: str = "127.0.0.1", cap_bytes: int = DEFAULT_CAP_BYTES
    ) -> None:
        if cap_bytes <= 0:
            raise ValueError(f"cap_bytes must be > 0, not {cap_bytes}")
        self.seed = seed
        self.host = host
        self.cap_bytes = cap_bytes
        self._links: dict[str, ProxyLink] = {}
        self._closed = False

    def names(self) -> list[str]:
        return list(self._links)

    def link(self, name: str) -> ProxyLink:
        return _names(name, self._links)[0]

    async def add_link(self, name: str, upstream: tuple[str, int], port: int = 0) -> int:
        """Listen for ``name`` (on ``port``, 0 for any free one); returns the listening port."""
        if self._closed:
            raise RuntimeError("the fault network is closed")
        if name in self._links:
            raise ValueError(f"link {name!r} exists already")
        link = ProxyLink(
            name,
            (upstream[0], int(upstream[1])),
            random.Random(f"{self.seed}/{name}"),
            cap_bytes=self.cap_bytes,
        )
        link.server = await asyncio.start_server(link.handle, self.host, port)
        link.port = int(link.server.sockets[0].getsockname()[1])
        self._links[name] = link
        return link.port

    def apply(
        self, names: str | Iterable[str] | None, direction: Direction, toxics: Toxics
    ) -> None:
        """Replace the toxics of one or both directions of the links (None: every link)."""
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")
        for link in _names(names, self._links):
            link.set_toxics(direction, toxics)

    def refuse(self, names: str | Iterable[str] | None, on: bool = True) -> None:
        """Close new connections at once (a hard partition), or stop doing so."""
        for link in _names(names, self._links):
            link.refusing = on

    def heal(self, names: str | Iterable[str] | None = None) -> None:
        """All toxics off and refusal lifted; held bytes are then delivered in order."""
        for link in _names(names, self._links):
            link.refusing = False
            link.set_toxics("both", HEALTHY)

    def reset(self, names: str | Iterable[str] | None) -> int:
        """Cut every live connection of the links with an RST now; returns how many."""
        cut = 0
        for link in _names(names, self._links):
            for conn in list(link.conns):
                if not conn.closing:
                    conn.abort(rst=True, injected=True)
                    cut += 1
        return cut

    def stats(self, name: str) -> LinkStats:
        return self.link(name).stats()

    def all_stats(self) -> dict[str, LinkStats]:
        return {name: link.stats() for name, link in self._links.items()}

    async def close(self) -> None:
        """Stop listening, cut every connection, and wait for every task to end."""
        self._closed = True
        links = list(self._links.values())
        for link in links:
            link.closed.set()
            if link.server is not None:
                link.server.close()
            for conn in list(link.conns):
                conn.abort(rst=False)
        # A connection accepted just before the listener closed starts its handler later:
        # look again until none is left (each sees ``closed`` and ends at once).
        while True:
            await asyncio.sleep(0)
            handlers = {task for link in links for task in link.handlers}
            if not handlers:
                break
            _, stuck = await asyncio.wait(handlers, timeout=CLOSE_TIMEOUT_S)
            for task in stuck:  # a bug if it happens; never leave a task pending
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        for link in links:
            if link.server is not None:
                await link.server.wait_closed()

    async def __aenter__(self) -> FaultNetwork:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
