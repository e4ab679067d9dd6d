"""Links: ordered, reliable, message-preserving byte pipes between two nodes.

A ``Link`` carries whole frames (one ``send`` is one ``recv`` on the other side) and is
what the secure channel runs over. Two implementations satisfy the same conformance
suite: the in-memory pair below (tests, single-process runs) and the WebSocket link in
``transport.ws``. Links know nothing about encryption: frames are opaque bytes.

Semantics every link follows:

* ``send`` waits while the peer is slow (bounded buffering: back-pressure, never an
  unbounded queue) and raises ``LinkClosed`` once either side has closed.
* ``recv`` returns the next frame, or raises ``LinkClosed`` once the peer closed and every
  frame it sent before closing has been delivered (``LinkTimeout`` when nothing came
  within the receive time-out; ``FrameTooLarge`` for a frame above the link's cap, after
  which the link is closed).
* ``close`` is idempotent; after it, ``send`` and ``recv`` raise ``LinkClosed`` and frames
  not yet received are dropped.
"""

# The names are the shared contract (the brief names them), hence no "Error" suffix.
# ruff: noqa: N818

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from fedloom.transport.errors import FrameTooLarge

DEFAULT_MAX_QUEUE = 16  # frames buffered per direction in a memory link


class LinkClosed(ConnectionError):
    """The link is closed (by either side, or because the connection broke)."""


class LinkTimeout(LinkClosed):
    """Nothing arrived within the receive time-out; the link has been closed."""


@runtime_checkable
class Link(Protocol):
    """A bidirectional frame pipe (see the module docstring for its exact semantics)."""

    @property
    def closed(self) -> bool: ...

    async def send(self, data: bytes | bytearray | memoryview) -> None: ...

    async def recv(self) -> bytes | memoryview: ...

    async def close(self) -> None: ...


def address_key(address: str | None) -> str:
    """The budget a source address counts against: an IPv4 address itself (an IPv6-mapped
    one too), an IPv6 address's /64 (what one subscriber is usually given, so that one
    host cannot take a fresh budget per address of its prefix). Links whose address is
    unknown (None or empty) share one budget. IPv4 is not grouped by /24: the sites of
    one hospital network, or behind one carrier NAT, would share a budget, while whoever
    rents addresses for a flood gets them in many /24s (``KnownAddresses`` is what keeps
    a returning site in)."""
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # without an IPv6 zone
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


DEFAULT_KNOWN_ADDRESSES = 4096
KNOWN_ADDRESSES_PER_PEER = 4


class KnownAddresses:
    """Source addresses (``address_key``) that rostered peers recently authenticated
    from: admission keeps a reserve of its slots for them, so a flood from addresses
    never seen to authenticate cannot keep a returning site out.

    In memory only, bounded: at most ``per_peer`` addresses per peer id (its latest; a
    rostered peer cannot make a whole prefix "known") and ``capacity`` in all (least
    recently authenticated out first). Unknown source addresses ("") are never known.
    """

    def __init__(
        self, capacity: int = DEFAULT_KNOWN_ADDRESSES, per_peer: int = KNOWN_ADDRESSES_PER_PEER
    ) -> None:
        if capacity < 1 or per_peer < 1:
            raise ValueError(f"capacity and per_peer must be >= 1, got {capacity}, {per_peer}")
        self.capacity = capacity
        self.per_peer = per_peer
        self._peer_of: OrderedDict[str, str] = OrderedDict()  # key -> peer, oldest first
        self._of_peer: dict[str, deque[str]] = {}  # peer -> its keys, oldest first

    def __contains__(self, key: object) -> bool:
        return key in self._peer_of

    def __len__(self) -> int:
        return len(self._peer_of)

    def peer_of(self, key: str) -> str | None:
        """The peer that last authenticated from ``key``; None if ``key`` is not known."""
        return self._peer_of.get(key)

    def add(self, key: str, peer: str) -> None:
        """``peer`` authenticated from ``key`` (an ``address_key``) just now."""
        if not key:
            return
        self._remove(key)
        self._peer_of[key] = peer
        keys = self._of_peer.setdefault(peer, deque())
        keys.append(key)
        if len(keys) > self.per_peer:
            self._remove(keys[0])
        while len(self._peer_of) > self.capacity:
            self._remove(next(iter(self._peer_of)))

    def seed(self, peer: str, endpoints: Iterable[str]) -> None:
        """Know the IP literals among ``peer``'s roster endpoints (URLs) before it ever
        connects: a node that listens there usually dials from there too. Host names
        are not resolved (no DNS lookups on the admission path)."""
        for url in endpoints:
            host = url.partition("://")[2].partition("/")[0].rpartition("@")[2]
            host = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
            try:
                ipaddress.ip_address(host)
            except ValueError:
                continue
            if address_key(host) not in self:
                self.add(address_key(host), peer)

    def forget_peers(self, keep: Iterable[str]) -> None:
        """Drop the addresses of every peer not in ``keep`` (a newer roster's ids)."""
        listed = set(keep)
        for peer in [p for p in self._of_peer if p not in listed]:
            for key in list(self._of_peer[peer]):
                self._remove(key)

    def _remove(self, key: str) -> None:
        peer = self._peer_of.pop(key, None)
        if peer is None:
            return
        keys = self._of_peer[peer]
        keys.remove(key)
        if not keys:
            del self._of_peer[peer]


# One source address, and one rostered peer (over the addresses it made known), may hold
# at most this share of the slots kept for known addresses (reserve // 8, at least 1):
# an insider, or a host behind a site's NAT or in its IPv6 /64, leaves the rest of the
# reserve to the other sites.
RESERVE_SHARE_PER_HOLDER = 8


def reserve_share(reserve: int) -> int:
    """How many of ``reserve`` slots one address, and one peer, may hold."""
    return max(1, reserve // RESERVE_SHARE_PER_HOLDER) if reserve > 0 else 0


class ReserveHolders:
    """Who holds the slots kept for known addresses right now, by ``address_key`` and by
    the peer that made the address known (``KnownAddresses.peer_of``)."""

    def __init__(self) -> None:
        self._by_key: Counter[str] = Counter()
        self._by_peer: Counter[str] = Counter()

    def fits(self, key: str, peer: str | None, share: int) -> bool:
        """Whether a link from ``key`` (known through ``peer``; None: unknown) may take
        a reserved slot: neither its address nor its peer holds ``share`` already."""
        return peer is not None and self._by_key[key] < share and self._by_peer[peer] < share

    def take(self, key: str, peer: str) -> None:
        self._by_key[key] += 1
        self._by_peer[peer] += 1

    def release(self, key: str, peer: str) -> None:
        for counts, name in ((self._by_key, key), (self._by_peer, peer)):
            counts[name] -= 1
            if counts[name] <= 0:
                del counts[name]

    def held_by(self, peer: str) -> int:
        """Reserved slots links known through ``peer`` hold now."""
        return self._by_peer[peer]


class _Pipe:
    """One direction of a memory link: a bounded FIFO of frames with a closed flag."""

    def __init__(self, max_queue: int) -> None:
        self._frames: deque[bytes] = deque()
        self._max = max_queue
        self._changed = asyncio.Condition()
        self.writer_closed = False  # no more frames will be put; queued ones still count
        self.reader_closed = False  # nobody reads any more; puts fail at once

    async def put(self, frame: bytes) -> None:
        async with self._changed:
            await self._changed.wait_for(
                lambda: len(self._frames) < self._max or self.reader_closed or self.writer_closed
            )
            if self.reader_closed or self.writer_closed:
                raise LinkClosed("link closed")
            self._frames.append(frame)
            self._changed.notify_all()

    async def get(self) -> bytes:
        async with self._changed:
            await self._changed.wait_for(
                lambda: bool(self._frames) or self.writer_closed or self.reader_closed
            )
            if self.reader_closed or not self._frames:
                raise LinkClosed("link closed by peer" if self.writer_closed else "link closed")
            frame = self._frames.popleft()
            self._changed.notify_all()
            return frame

    async def shut(self, *, reader: bool) -> None:
        async with self._changed:
            if reader:
                self.reader_closed = True
                self._frames.clear()
            else:
                self.writer_closed = True
            self._changed.notify_all()


class MemoryLink:
    """One end of an in-memory link; make a connected pair with ``memory_link_pair``."""

    def __init__(
        self,
        outbound: _Pipe,
        inbound: _Pipe,
        *,
        max_frame: int | None,
        receive_timeout: float | None,
    ) -> None:
        self._out = outbound
        self._in = inbound
        self._max_frame = max_frame
        self._receive_timeout = receive_timeout
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self._out.reader_closed

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise LinkClosed("link closed")
        # A copy, as a socket would make: the caller may reuse its buffer.
        await self._out.put(bytes(data))

    async def recv(self) -> bytes:
        if self._closed:
            raise LinkClosed("link closed")
        try:
            async with asyncio.timeout(self._receive_timeout):
                frame = await self._in.get()
        except TimeoutError:
            await self.close()
            raise LinkTimeout(f"nothing received for {self._receive_timeout} s") from None
        except LinkClosed:
            self._closed = True
            await self._out.shut(reader=False)
            raise
        if self._max_frame is not None and len(frame) > self._max_frame:
            await self.close()
            raise FrameTooLarge(f"frame of {len(frame)} bytes, link limit {self._max_frame}")
        return frame

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._out.shut(reader=False)
        await self._in.shut(reader=True)


def memory_link_pair(
    *,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_frame: int | None = None,
    receive_timeout: float | None = None,
) -> tuple[MemoryLink, MemoryLink]:
    """Two connected in-memory links (``a.send`` -> ``b.recv`` and back).

    ``max_queue`` frames may wait per direction before ``send`` blocks (back-pressure);
    ``max_frame`` and ``receive_timeout`` mirror the WebSocket link's caps.
    """
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    if max_frame is not None and max_frame < 1:
        raise ValueError(f"max_frame must be >= 1, got {max_frame}")
    if receive_timeout is not None and receive_timeout <= 0:
        raise ValueError(f"receive_timeout must be > 0, got {receive_timeout}")
    a_to_b, b_to_a = _Pipe(max_queue), _Pipe(max_queue)
    a = MemoryLink(a_to_b, b_to_a, max_frame=max_frame, receive_timeout=receive_timeout)
    b = MemoryLink(b_to_a, a_to_b, max_frame=max_frame, receive_timeout=receive_timeout)
    return a, b
