"""Secure channel: a mutually authenticated handshake, then encrypted records, over any Link.

Life of a channel (DESIGN.md, "Channel security"):

1. Handshake (``transport.handshake``, SIGMA style) under ``asyncio.timeout``; a peer
   whose key, id or role the roster does not admit is refused before any application
   data is read. Server side, a ``Gatekeeper`` caps concurrent unauthenticated links,
   in all and per source address, keeps a reserve of them for addresses rostered peers
   recently authenticated from, and gives each a short time to authenticate.
2. Each side sends its record stream header, then records (``transport.records``, in
   the cipher the handshake agreed on): one frame on the link is one record. A message
   is one or more records, the last one marking the end of the message; ``close()``
   sends a FINAL record. A link that ends without it raises ``ChannelTruncated``; any
   record that fails to open (flipped, truncated, reordered, duplicated) closes the
   channel with ``RecordError``.
3. Every message starts with a kind byte: ``KIND_BYTES`` (an opaque payload, e.g. one
   ``wire.encode`` envelope) or ``KIND_TENSORS`` (a streamed tensor message: a header
   message holding the envelope without its tensors and a stream manifest, then one
   payload message of pieces, see ``transport.streaming``).

Heavy work (secretstream sealing and opening, fp16/int8 conversion of pieces) runs in a
thread pool: libsodium, lz4, numpy and torch release the GIL, so both cores work, and
sending pipelines (record n+1 is encoded and sealed while record n is being written).
AEGIS-256 records of raw pieces cost about 0.25 ms per MiB, less than a hand-off to the
pool costs in CPU, so they are sealed and opened on the loop thread; on two cores that
measured faster (the site and the aggregator processes keep both cores busy), and an
incoming record is decrypted straight into its tensor. One record is worked on at a
time per direction (the stream state is sequential), so order is preserved.

Errors: bad bytes from the peer raise ``ProtocolError`` subclasses. Those that break the
record stream (``RecordError``, ``ChannelTruncated``, an oversize message) close the
channel; those inside one well-framed message (a malformed envelope, NaN tensors) skip
the rest of that message and leave the channel usable. ``ChannelClosed`` (a
``LinkClosed``) means the channel ended in order.
"""

# ruff: noqa: N818  (error names follow transport.errors)

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, NoReturn, TypeVar, cast

import msgpack
import numpy as np

from fedloom.transport import wire
from fedloom.transport.error_text import describe
from fedloom.transport.errors import FrameTooLarge, HandshakeError, MalformedMessage, ProtocolError
from fedloom.transport.handshake import (
    HANDSHAKE_TIMEOUT_S,
    MAX_HANDSHAKE_MESSAGE,
    ClientHandshake,
    ServerHandshake,
    SessionKeys,
    suites_for,
)
from fedloom.transport.identity import Identity
from fedloom.transport.limits import Limits, MiB
from fedloom.transport.links import (
    KnownAddresses,
    Link,
    LinkClosed,
    ReserveHolders,
    address_key,
    reserve_share,
)
from fedloom.transport.records import (
    CHUNK_SIZE,
    CIPHER_AEGIS256,
    REKEY_BYTES,
    REKEY_SECONDS,
    Record,
    RecordError,
    RecordReceiver,
    RecordSender,
)
from fedloom.transport.roster import Roster
from fedloom.transport.streaming import (
    TensorStreamDecoder,
    TensorStreamEncoder,
    encodes_in_place,
)
from fedloom.transport.strict_msgpack import unpack_strict
from fedloom.transport.tensors import DEFAULT_SPEC, CodecSpec

KIND_BYTES = 0x01
KIND_TENSORS = 0x02
_KIND_PREFIX = {KIND_BYTES: b"\x01", KIND_TENSORS: b"\x02"}

DEFAULT_MAX_PENDING = 256
# One source address may hold this share of the pending handshakes (max_pending // 8), so
# that one host flooding idle upgrades leaves the rest to the roster's sites.
PENDING_SHARE_PER_ADDRESS = 8
# This share of them (max_pending // 4) is kept for source addresses a rostered peer
# recently authenticated from, so that a flood from many addresses cannot hold them all.
PENDING_SHARE_RESERVED = 4
# Server side, a handshake is one round trip and about a millisecond of crypto: a link
# that has not authenticated within this many seconds is dropped.
DEFAULT_GATE_HANDSHAKE_TIMEOUT_S = 5.0
OFFLOAD_MODES = ("auto", "pool")
INLINE_BELOW = 64 * 1024  # records smaller than this are sealed/opened on the loop thread
STREAM_ABOVE = 1 * MiB  # tensor fields larger than this are streamed piece by piece
MAX_STREAM_HEADER = 64 * MiB  # envelope without tensors plus the manifest
DEFAULT_CLOSE_TIMEOUT_S = 5.0

# The one tensor field of each message type that has one.
TENSOR_FIELDS: dict[type, str] = {
    wire.ModelBroadcast: "weights",
    wire.TrainRequest: "weights",
    wire.Update: "delta",
    wire.GossipShare: "x",
    wire.Relayed: "payload",
}

_T = TypeVar("_T")


def tensor_bytes(msg: wire.Message) -> int:
    """Bytes of the tensor field of ``msg`` (0 for control messages)."""
    field = TENSOR_FIELDS.get(type(msg))
    if field is None:
        return 0
    return sum(int(np.asarray(v).nbytes) for v in getattr(msg, field).values())


class ChannelError(ProtocolError):
    """The channel's framing was broken by the peer."""

    reason: ClassVar[str] = "channel"


class ChannelTruncated(ChannelError):
    """The link ended without ``TAG_FINAL``: a crash, a broken connection, or truncation."""

    reason: ClassVar[str] = "truncated"


class UnexpectedMessage(ChannelError):
    """A message of another kind than the call expects (it was skipped)."""

    reason: ClassVar[str] = "unexpected_message"


class GateBusy(ChannelError):
    """Too many unauthenticated connections are in progress; this one was dropped."""

    reason: ClassVar[str] = "busy"


class AddressBusy(GateBusy):
    """Too many unauthenticated connections from this source address; this one was dropped."""

    reason: ClassVar[str] = "busy_address"


class HandshakeTimeout(HandshakeError):
    """The handshake did not complete in time."""

    reason: ClassVar[str] = "handshake_timeout"


class ChannelClosed(LinkClosed):
    """The channel ended in order (``TAG_FINAL`` received, or closed locally)."""


_DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelOptions:
    """Per-channel settings: decoding caps, rekeying, how long ``close`` may take, the
    record ciphers to offer or accept (preferred first; None: every cipher, the fastest on
    this CPU first), and where records are sealed and opened: ``"auto"`` keeps cheap
    AEGIS-256 records on the loop thread (see the module docstring), ``"pool"`` sends
    every large record to the thread pool (for machines with cores to spare)."""

    limits: Limits = _DEFAULT_LIMITS
    rekey_bytes: int = REKEY_BYTES
    rekey_seconds: float = REKEY_SECONDS
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S
    ciphers: tuple[str, ...] | None = None
    offload: str = "auto"

    def __post_init__(self) -> None:
        if self.ciphers is not None:
            suites_for(self.ciphers)  # raises ValueError naming the known ciphers
        if self.offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {self.offload!r}")
        if not isinstance(self.limits, Limits):
            raise ValueError(f"limits must be a Limits, got {self.limits!r}")
        if self.close_timeout <= 0:
            raise ValueError(f"close_timeout must be > 0, got {self.close_timeout}")


DEFAULT_OPTIONS = ChannelOptions()

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    """One pool for every channel (not the loop's default one, which training may fill)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="fedloom-channel"
        )
    return _pool


async def offload(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(*args)`` in the channels' thread pool (heavy calls that release the GIL)."""
    return await asyncio.get_running_loop().run_in_executor(_executor(), fn, *args)


_offload = offload


# ---------------------------------------------------------------------------- handshake


async def client_channel(
    link: Link,
    identity: Identity,
    roster: Roster,
    expected_peer: str | None = None,
    *,
    allowed_roles: Collection[str] | None = None,
    timeout: float = HANDSHAKE_TIMEOUT_S,
    options: ChannelOptions = DEFAULT_OPTIONS,
) -> SecureChannel:
    """Handshake as the dialling side and return the channel (the link is closed on error).

    Raises ``HandshakeError`` (``PeerRefused``, ``HandshakeTimeout``) on failure; a
    server that refuses us simply closes the link, which reads as a ``HandshakeError``.
    """
    handshake = ClientHandshake(
        identity, roster, expected_peer, allowed_roles=allowed_roles, ciphers=options.ciphers
    )

    async def run() -> tuple[SessionKeys, float]:
        sent = _now()
        await link.send(handshake.start())
        reply = await _recv_handshake(link)
        rtt = _now() - sent  # one network round trip plus the server's ~0.3 ms of crypto
        finish = handshake.receive(reply)
        if finish is None:  # pragma: no cover - the client always answers s1
            raise HandshakeError("handshake ended without the client's last flight")
        await link.send(finish)
        return handshake.keys, rtt

    return await _establish(link, run, timeout, options)


async def server_channel(
    link: Link,
    identity: Identity,
    roster: Roster,
    *,
    allowed_roles: Collection[str] | None = None,
    timeout: float = HANDSHAKE_TIMEOUT_S,
    options: ChannelOptions = DEFAULT_OPTIONS,
) -> SecureChannel:
    """Handshake as the listening side (prefer ``Gatekeeper.accept``, which caps them)."""
    handshake = ServerHandshake(
        identity, roster, allowed_roles=allowed_roles, ciphers=options.ciphers
    )

    async def run() -> tuple[SessionKeys, float]:
        reply = handshake.receive(await _recv_handshake(link))
        if reply is None:  # pragma: no cover - the server always answers c1
            raise HandshakeError("handshake ended without the server's flight")
        sent = _now()
        await link.send(reply)
        finish = await _recv_handshake(link)
        rtt = _now() - sent  # one network round trip plus the client's crypto
        if handshake.receive(finish) is not None or not handshake.done:
            raise HandshakeError("handshake did not complete after the client's last flight")
        return handshake.keys, rtt

    return await _establish(link, run, timeout, options)


async def _recv_handshake(link: Link) -> bytes | memoryview:
    frame = await link.recv()
    if len(frame) > MAX_HANDSHAKE_MESSAGE:
        raise HandshakeError(
            f"handshake message of {len(frame)} bytes, limit {MAX_HANDSHAKE_MESSAGE}"
        )
    return frame


async def _establish(
    link: Link,
    run: Callable[[], Awaitable[tuple[SessionKeys, float]]],
    timeout: float,
    options: ChannelOptions,
) -> SecureChannel:
    try:
        async with asyncio.timeout(timeout):
            keys, rtt = await run()
            channel = SecureChannel(link, keys, options)
            channel.handshake_rtt_s = rtt
            await link.send(channel.stream_header)
    except TimeoutError:
        await link.close()
        raise HandshakeTimeout(f"handshake not completed within {timeout} s") from None
    except LinkClosed as exc:
        await link.close()
        raise HandshakeError(
            f"the link closed during the handshake ({describe(exc)}): refused by the peer, or lost"
        ) from None
    except BaseException:
        await link.close()
        raise
    return channel


@dataclasses.dataclass(frozen=True, slots=True)
class GateLimits:
    """What a ``Gatekeeper`` admits: at most ``max_pending`` links handshaking at once, at
    most ``max_pending_per_address`` of them from one source address (None: a share of
    ``max_pending``, ``max_pending // PENDING_SHARE_PER_ADDRESS`` and at least 1), each
    given ``handshake_timeout`` seconds to authenticate. ``reserved_for_known`` of them
    (None: ``max_pending // PENDING_SHARE_RESERVED``) only links from addresses that a
    rostered peer recently authenticated from may take, at most ``reserve_share`` of
    them per address and per peer (the one it authenticated as); the others share the
    rest."""

    max_pending: int = DEFAULT_MAX_PENDING
    max_pending_per_address: int | None = None
    handshake_timeout: float = DEFAULT_GATE_HANDSHAKE_TIMEOUT_S
    reserved_for_known: int | None = None

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {self.max_pending}")
        per_address = self.max_pending_per_address
        if per_address is not None and not 1 <= per_address <= self.max_pending:
            raise ValueError(
                f"max_pending_per_address must be in [1, max_pending={self.max_pending}], "
                f"got {per_address}"
            )
        if not self.handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be > 0, got {self.handshake_timeout}")
        reserved = self.reserved_for_known
        if reserved is not None and not 0 <= reserved < self.max_pending:
            raise ValueError(
                f"reserved_for_known must be in [0, max_pending={self.max_pending}), got {reserved}"
            )

    @property
    def per_address(self) -> int:
        """The cap per source address, ``max_pending_per_address`` or its default."""
        if self.max_pending_per_address is not None:
            return self.max_pending_per_address
        return max(1, self.max_pending // PENDING_SHARE_PER_ADDRESS)

    @property
    def reserved(self) -> int:
        """Pending slots only known addresses may take, ``reserved_for_known`` or its default."""
        if self.reserved_for_known is not None:
            return self.reserved_for_known
        return self.max_pending // PENDING_SHARE_RESERVED


class Gatekeeper:
    """Server-side admission of unauthenticated links (``GateLimits``, the defaults above).

    A link beyond either cap is closed at once (``GateBusy``, ``AddressBusy``); an
    admitted one that has not authenticated within the time-out is closed
    (``HandshakeTimeout``). ``refused`` counts rejections by reason (``err.reason`` of the
    error raised), for metrics; ``limits`` and ``roster`` may be replaced at any time and
    apply to later links.

    ``known`` remembers where rostered peers authenticated from (every accepted link's
    address, and the IP literals among the roster's endpoints): links from there may
    take the ``GateLimits.reserved`` slots too, links from anywhere else share the
    rest. One address, and one peer over all the addresses it made known, holds at most
    ``reserve_share`` of the reserve; beyond that its links share the rest too. A peer's
    first connection ever (or since this process started) from an address not in its
    roster entry counts as unknown.
    """

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        *,
        limits: GateLimits | None = None,
        allowed_roles: Collection[str] | None = None,
        options: ChannelOptions = DEFAULT_OPTIONS,
        known: KnownAddresses | None = None,
    ) -> None:
        self.identity = identity
        self.known = known if known is not None else KnownAddresses()
        self.roster = roster  # replace it to apply a newer roster to later handshakes
        self.limits = limits if limits is not None else GateLimits()
        self.allowed_roles = allowed_roles
        self.options = options
        self.accepted = 0
        self.refused: Counter[str] = Counter()
        self._pending = 0
        self._pending_shared = 0  # of them, not in the reserve for known addresses
        self._reserve = ReserveHolders()
        self._pending_from: Counter[str] = Counter()  # by address_key

    @property
    def roster(self) -> Roster:
        return self._roster

    @roster.setter
    def roster(self, roster: Roster) -> None:
        self._roster = roster
        self.known.forget_peers(entry.node_id for entry in roster.entries)
        for entry in roster.entries:
            self.known.seed(entry.node_id, entry.endpoints)

    @property
    def pending(self) -> int:
        """Links handshaking right now."""
        return self._pending

    def pending_from(self, address: str | None) -> int:
        """Links handshaking right now from ``address`` (its ``address_key`` budget)."""
        return self._pending_from[address_key(address)]

    def reserved_by(self, peer: str) -> int:
        """Reserved slots held right now by links from addresses ``peer`` made known."""
        return self._reserve.held_by(peer)

    async def accept(self, link: Link, *, address: str | None = None) -> SecureChannel:
        """Authenticate ``link`` or close it and raise (a ``ProtocolError`` or ``LinkClosed``).

        ``address`` is where the link comes from (``WebSocketLink.remote_address``), for
        the per-address cap; links without one share a single budget.
        """
        limits, key = self.limits, address_key(address)
        holder = self.known.peer_of(key)  # who made ``key`` known, if anyone
        reserved = self._reserve.fits(key, holder, reserve_share(limits.reserved))
        refusal: GateBusy | None = None
        if self._pending >= limits.max_pending:
            refusal = GateBusy(f"{limits.max_pending} unauthenticated connections already pending")
        elif not reserved and self._pending_shared >= limits.max_pending - limits.reserved:
            refusal = GateBusy(
                f"{limits.max_pending - limits.reserved} unauthenticated connections outside "
                "the reserve for known addresses already pending"
            )
        elif self._pending_from[key] >= limits.per_address:
            refusal = AddressBusy(
                f"{limits.per_address} unauthenticated connections from {key or 'unknown'} "
                "already pending"
            )
        if refusal is not None:
            self.refused[refusal.reason] += 1
            await link.close()
            raise refusal
        self._pending += 1
        self._pending_shared += not reserved
        if reserved and holder is not None:
            self._reserve.take(key, holder)
        self._pending_from[key] += 1
        try:
            channel = await server_channel(
                link,
                self.identity,
                self.roster,
                allowed_roles=self.allowed_roles,
                timeout=limits.handshake_timeout,
                options=self.options,
            )
        except ProtocolError as exc:
            self.refused[exc.reason] += 1
            raise
        except LinkClosed:
            self.refused["link_closed"] += 1
            raise
        finally:
            self._pending -= 1
            self._pending_shared -= not reserved
            if reserved and holder is not None:
                self._reserve.release(key, holder)
            self._pending_from[key] -= 1
            if not self._pending_from[key]:
                del self._pending_from[key]
        self.known.add(key, channel.peer_id)
        self.accepted += 1
        return channel


# ---------------------------------------------------------------------------- channel


class SecureChannel:
    """Encrypted, authenticated messages over a link (build with ``client_channel`` /
    ``server_channel``). One task may send while another receives."""

    def __init__(self, link: Link, keys: SessionKeys, options: ChannelOptions) -> None:
        self._link = link
        self.peer_id = keys.peer_id
        self.peer_role = keys.peer_role
        self.transcript_hash = keys.transcript_hash
        self._limits = options.limits
        self._close_timeout = options.close_timeout
        self.cipher = keys.cipher
        # AEGIS-256 seals or opens 1 MiB in about 0.25 ms: less than a hand-off to the pool
        # costs in CPU on two cores, so such records stay on the loop thread unless codec
        # work (fp16/int8 conversion) comes with them; secretstream records (~1 ms) go to
        # the pool.
        self._cheap_records = keys.cipher == CIPHER_AEGIS256 and options.offload == "auto"
        self._sender = RecordSender(
            keys.send_key,
            cipher=keys.cipher,
            rekey_bytes=options.rekey_bytes,
            rekey_seconds=options.rekey_seconds,
        )
        # A backstop per message (the kind byte included); the exact caps of messages,
        # stream headers and streamed tensors are checked as they arrive.
        self._receiver = RecordReceiver(
            keys.recv_key,
            cipher=keys.cipher,
            max_message_bytes=max(options.limits.max_message_bytes, MAX_STREAM_HEADER) + 1,
        )
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._header_received = False
        self._records_taken = 0
        self._failure: BaseException | None = None
        self._closing = False
        self._peer_closed = False
        # The handshake's round trip (seconds): a sample of the link's RTT, taken before
        # any data moves (set by ``client_channel``/``server_channel``).
        self.handshake_rtt_s: float | None = None

    @property
    def stream_header(self) -> bytes:
        """This side's record stream header (sent once, right after the handshake)."""
        return self._sender.header()

    @property
    def closed(self) -> bool:
        """True once closed locally or broken; see also ``peer_closed``."""
        return self._closing or self._failure is not None

    @property
    def peer_closed(self) -> bool:
        """True once the peer's ``TAG_FINAL`` arrived."""
        return self._peer_closed

    @property
    def rekeys(self) -> int:
        """Rekeys this side has done so far (every ``rekey_bytes`` or ``rekey_seconds``)."""
        return self._sender.rekeys

    # -- sending

    async def send_message(self, payload: bytes | bytearray | memoryview) -> None:
        """Send one opaque message (any size up to the peer's ``max_message_bytes``)."""
        async with self._send_lock:
            await self._send_framed(KIND_BYTES, memoryview(payload).cast("B"))

    async def send_tensors(
        self,
        msg: wire.Message,
        spec: CodecSpec = DEFAULT_SPEC,
        *,
        after: Awaitable[None] | None = None,
    ) -> None:
        """Send a wire message; a large tensor field is streamed piece by piece.

        With ``after``, everything is encoded, sealed and sent at once except the
        message's last record, which waits for ``after`` (the peer cannot decode a
        message without it). A daemon streams a 100 MB update while the write that must
        precede its delivery is still being fsynced. If ``after`` raises, the channel
        breaks and the message is never delivered.

        Do not modify the message's arrays before this returns (they are read while
        the pieces are produced).
        """
        field = TENSOR_FIELDS.get(type(msg))
        if field is None or tensor_bytes(msg) <= STREAM_ABOVE:
            encoded = wire.encode(msg, spec)
            if after is not None:
                await asyncio.shield(after)  # not cancelled by us: others wait on it too
            await self.send_message(encoded)
            return
        tensors = getattr(msg, field)
        if encodes_in_place(tensors, spec):
            encoder = TensorStreamEncoder(tensors, spec)  # slices memory only: no thread hop
        else:
            encoder = await _offload(TensorStreamEncoder, tensors, spec)
        envelope = wire.encode(_with_tensors(msg, field, {}), spec)
        header: bytes = msgpack.packb(
            {"envelope": envelope, "stream": encoder.manifest}, use_bin_type=True
        )
        if len(header) > MAX_STREAM_HEADER:
            raise ValueError(f"stream header of {len(header)} bytes, limit {MAX_STREAM_HEADER}")
        count = encoder.n_pieces

        def seal_piece(i: int) -> Record:
            return self._sender.seal(encoder.next_piece(), last=i == count - 1, now=_now())

        async with self._send_lock:
            await self._send_framed(KIND_TENSORS, memoryview(header))
            cheap = self._cheap_records and not encoder.computes_pieces
            await self._pipeline(seal_piece, count, offload=not cheap, after=after)

    async def _send_framed(self, kind: int, view: memoryview) -> None:
        """One message: the kind byte, then ``view``, in records of <= CHUNK_SIZE bytes."""
        head = CHUNK_SIZE - 1
        count = 1 + max(0, -(-(view.nbytes - head) // CHUNK_SIZE))

        def seal_chunk(i: int) -> Record:
            if i == 0:
                chunk: bytes | memoryview = b"".join((_KIND_PREFIX[kind], view[:head]))
            else:
                start = head + (i - 1) * CHUNK_SIZE
                chunk = view[start : start + CHUNK_SIZE]
            return self._sender.seal(chunk, last=i == count - 1, now=_now())

        heavy = view.nbytes >= INLINE_BELOW and not self._cheap_records
        await self._pipeline(seal_chunk, count, offload=heavy)

    async def _pipeline(
        self,
        make: Callable[[int], Record],
        count: int,
        *,
        offload: bool,
        after: Awaitable[None] | None = None,
    ) -> None:
        """Send ``make(0) .. make(count - 1)``, making record i+1 while record i is sent;
        the last record waits for ``after`` (if given)."""
        self._check_can_send()
        try:
            if not offload:
                for i in range(count):
                    record = make(i)
                    if after is not None and i == count - 1:
                        await asyncio.shield(after)  # not cancelled by us: others wait on it too
                    await self._link_send(record)
                return
            pending = asyncio.ensure_future(_offload(make, 0))
            try:
                for i in range(count):
                    record = await pending
                    if i + 1 < count:
                        pending = asyncio.ensure_future(_offload(make, i + 1))
                    elif after is not None:
                        await asyncio.shield(after)  # not cancelled by us: others wait on it too
                    await self._link_send(record)
            finally:
                if not pending.done():  # stopped early: let the worker finish, ignore it
                    pending.add_done_callback(_ignore_result)
        except BaseException as exc:
            # Part of a message went out (or a sealed record was lost): the stream cannot
            # continue, whatever the cause (cancelled, link gone, a local bug).
            await self._break(exc)
            raise

    async def _link_send(self, record: Record) -> None:
        try:
            await self._link.send(record)
        except LinkClosed as exc:
            if self._peer_closed or self._closing:
                raise ChannelClosed(f"channel closed ({describe(exc)})") from None
            raise

    def _check_can_send(self) -> None:
        if self._failure is not None:
            raise ChannelClosed(f"channel broken earlier: {self._failure}")
        if self._closing:
            raise ChannelClosed("channel closed")

    # -- receiving

    async def recv_message(self) -> bytes:
        """The next opaque message; ``UnexpectedMessage`` (skipped) for a tensor stream."""
        async with self._recv_lock:
            taken = self._records_taken
            try:
                kind, first, end = await self._next_message()
                if kind == KIND_BYTES:
                    return await self._collect(first, end, self._limits.max_message_bytes)
                await self._skip(end)
                if kind == KIND_TENSORS:
                    await self._skip(False)  # the payload message that follows the header
                raise UnexpectedMessage("expected a bytes message, got a tensor stream")
            except asyncio.CancelledError:
                await self._cancelled(taken)
                raise

    async def recv_tensors(self, limits: Limits | None = None) -> wire.Message:
        """The next wire message, streamed or not, decoded and validated under ``limits``."""
        limits = self._limits if limits is None else limits
        async with self._recv_lock:
            taken = self._records_taken
            try:
                kind, first, end = await self._next_message()
                if kind == KIND_BYTES:
                    data = await self._collect(first, end, limits.max_message_bytes)
                    if len(data) < INLINE_BELOW:
                        return wire.decode(data, limits)
                    return await _offload(wire.decode, data, limits)
                header = await self._collect(first, end, MAX_STREAM_HEADER)
                return await self._recv_stream(header, limits)
            except asyncio.CancelledError:
                await self._cancelled(taken)
                raise

    async def _recv_stream(self, header: bytes, limits: Limits) -> wire.Message:
        try:
            if len(header) < INLINE_BELOW:
                msg, field, decoder = _parse_stream_header(header, limits)
            else:
                msg, field, decoder = await _offload(_parse_stream_header, header, limits)
        except ProtocolError:
            await self._skip(False)
            raise
        failure: list[ProtocolError] = []

        def feed(chunk: Record, direct: bool) -> None:
            try:
                if direct:
                    decoder.feed_direct()
                else:
                    decoder.feed_piece(chunk)
            except ProtocolError as exc:
                failure.append(exc)  # the rest of the message is read and dropped

        end = False
        while not end:
            if failure:
                _, end = await self._recv_record()
            else:
                _, end = await self._recv_record(
                    feed, decoder.direct_target, decoder.direct_decodes
                )
        if failure:
            raise failure[0]
        return _with_tensors(msg, field, decoder.finish())

    async def _next_message(self) -> tuple[int, Record, bool]:
        chunk, end = await self._recv_record()
        if not chunk or chunk[0] not in _KIND_PREFIX:
            await self._skip(end)
            raise UnexpectedMessage(
                "message without a known kind byte" if chunk else "empty message (no kind byte)"
            )
        return chunk[0], chunk[1:], end

    async def _collect(self, first: Record, end: bool, cap: int) -> bytes:
        parts, total = [first], len(first)
        while not end:
            chunk, end = await self._recv_record()
            total += len(chunk)
            if total > cap:
                await self._break_with(FrameTooLarge(f"message of more than {cap} bytes"))
            parts.append(chunk)
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    async def _skip(self, end: bool) -> None:
        """Read and drop records up to the end of the current message."""
        while not end:
            _, end = await self._recv_record()

    async def _recv_record(
        self,
        process: Callable[[Record, bool], None] | None = None,
        target: Callable[[], memoryview | None] | None = None,
        decodes: Callable[[], bool] | None = None,
    ) -> tuple[Record, bool]:
        """Read and open the next record: ``(chunk, end_of_message)``; ``process`` gets
        the chunk in the same worker call (one thread hop per record: on two cores, more
        stages cost more in hand-offs than they gain), with True if it was decrypted
        straight into the memory ``target()`` named. Cheap records (AEGIS-256 into
        ``target()``, or without ``process``) are opened on the loop thread, unless
        ``decodes()`` says that what goes into ``target()`` is still to be converted."""
        if self._failure is not None:
            raise ChannelClosed(f"channel broken earlier: {self._failure}")
        if self._peer_closed:
            raise ChannelClosed("the peer closed the channel")
        if self._closing:
            raise ChannelClosed("channel closed")
        if not self._header_received:
            header = await self._link_recv()
            try:
                self._receiver.start(header)
            except RecordError as exc:
                await self._break_with(exc)
            self._header_received = True
        frame = await self._link_recv()
        self._records_taken += 1
        into = None if target is None else target()
        heavy = len(frame) >= INLINE_BELOW and (
            not self._cheap_records
            or (process is not None and (into is None or (decodes is not None and decodes())))
        )
        try:
            if heavy:
                chunk, end = await _offload(self._open, frame, process, into)
            else:
                chunk, end = self._open(frame, process, into)
        except RecordError as exc:
            await self._break_with(exc)
        if self._receiver.closed:
            self._peer_closed = True
            raise ChannelClosed("the peer closed the channel")
        return chunk, end

    def _open(
        self,
        frame: bytes | memoryview,
        process: Callable[[Record, bool], None] | None,
        into: memoryview | None,
    ) -> tuple[Record, bool]:
        chunk, end = self._receiver.open(frame, into)
        if process is not None and not self._receiver.closed:
            process(chunk, into is not None and chunk is into)
        return chunk, end

    async def _link_recv(self) -> bytes | memoryview:
        try:
            return await self._link.recv()
        except ProtocolError as exc:  # e.g. an oversize or text frame from the link
            await self._break_with(exc)
        except LinkClosed as exc:
            if self._closing:
                raise ChannelClosed("channel closed") from None
            await self._break_with(
                ChannelTruncated(
                    f"the link ended without TAG_FINAL ({describe(exc)}): the peer crashed, the "
                    "connection broke, or the stream was truncated"
                )
            )

    async def _cancelled(self, taken: int) -> None:
        if self._records_taken != taken:  # a message was half read: the stream is lost
            await self._break(ChannelError("receive cancelled in the middle of a message"))

    # -- closing

    async def _break(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        await self._link.close()

    async def _break_with(self, exc: ProtocolError) -> NoReturn:
        await self._break(exc)
        raise exc

    async def close(self) -> None:
        """Send ``TAG_FINAL`` (within ``close_timeout``) and close the link; idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._failure is None and not self._sender.closed:
            try:
                async with asyncio.timeout(self._close_timeout), self._send_lock:
                    if self._failure is None:
                        await self._link.send(self._sender.close())
            except (LinkClosed, ProtocolError, TimeoutError):
                pass  # the peer will see a truncated stream; nothing more to do here
        await self._link.close()


def _with_tensors(msg: wire.Message, field: str, tensors: wire.Tensors) -> wire.Message:
    replaced: wire.Message = dataclasses.replace(cast(Any, msg), **{field: tensors})
    return replaced


def _now() -> float:
    return time.monotonic()


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


_HEADER_KEYS = frozenset(("envelope", "stream"))


def _parse_stream_header(
    data: bytes, limits: Limits
) -> tuple[wire.Message, str, TensorStreamDecoder]:
    """Decode and validate a stream header: (message without tensors, field, decoder)."""
    size = len(data)
    obj = unpack_strict(
        data,
        what="stream header",
        error=MalformedMessage,
        max_str=min(limits.max_str_len, size),
        max_bin=size,
        max_array=min(limits.max_array_len, size),
        max_map=min(limits.max_map_len, size),
    )
    if type(obj) is not dict or obj.keys() != _HEADER_KEYS or type(obj["envelope"]) is not bytes:
        raise MalformedMessage("stream header must be a map {envelope: bin, stream: map}")
    msg = wire.decode(obj["envelope"], limits)
    field = TENSOR_FIELDS.get(type(msg))
    if field is None:
        raise MalformedMessage(f"a {type(msg).__name__} has no tensors to stream")
    if getattr(msg, field):
        raise MalformedMessage(f"streamed {type(msg).__name__} carries tensors in its envelope")
    return msg, field, TensorStreamDecoder(obj["stream"], limits)
