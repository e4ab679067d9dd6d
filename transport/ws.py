"""WebSocket links over aiohttp (the only module of ``transport`` that imports aiohttp).

aiohttp's defaults are permissive (REFERENCES.md, "Transport and crypto pitfalls"):
4 MiB frames, permessage-deflate on server side, no receive time-out. Here every link
has a frame cap just above one encrypted record, compression off in both directions
(deflate would leak plaintext sizes and costs CPU on data that does not compress),
a heartbeat (ping/pong) and a receive time-out longer than the heartbeat, so an idle
but live link stays up while a dead one is closed. Only binary frames are accepted: a
text frame closes the link with code 1003.

Payload bytes are handled once on each side: servers install fedloom's frame reader
(``transport.ws_frames``) in place of aiohttp's, which unmasks each payload in the copy
that assembles it, and clients mask each large frame in the pass that copies it into the
frame (``_MaskingWriter``); once fedloom's parser reads a connection (either side), its
socket is read straight into the payload buffer of the frame being read
(``_DirectReads``, an ``asyncio.BufferedProtocol`` in front of aiohttp's protocol), so a
large payload is not copied on the way in at all (a transport that cannot switch
protocols is read as before). These hook into aiohttp internals, so they sit behind feature
detection (``fast_path``): on first use every internal they need is checked (that it
exists, its signature, the names aiohttp's own ``_post_start`` uses, and a probe frame
written through the writer hook and parsed back); whatever is missing or changed is
logged once as a WARNING (saying what differs) and that side uses stock aiohttp
(``ws.receive()``, ``ws.send_bytes()``) with the same frame cap, time-outs and
compression off. The handshake-sized cap on a client's first messages holds there too,
from the frame headers: aiohttp's reader would buffer a message up to the frame cap
before the link sees it (and a response's ``max_msg_size`` cannot be changed once the
handshake is over), so until those messages are whole each received chunk is shown
first to an ``_OpeningGuard`` on the connection's wrapped protocol, which follows the
frames with ``transport.ws_frames``' parser and refuses an oversize first message at
its header, before aiohttp holds any of it (unauthenticated connections hold a few KiB
each on both paths; 640 connections each announcing a 1 MiB first frame: +6 MiB of RSS
on either path, +653 MiB on the stock path without the guard). What differs on the
stock reader: a refusal before the upgrade was answered cuts the connection without a
close frame; after the first messages unmasked client frames, close codes 1006 and
>= 5000 and long fragment trains are accepted as aiohttp accepts them; and payloads are
copied five times instead of once. The connection caps below use no aiohttp internal
(each connection's protocol is wrapped, ``_CountedProtocol``).
``tests/transport/test_ws_frames.py`` checks that the fast path is in use on the
aiohttp this project pins; ``tests/transport/test_ws.py`` runs its link tests on both
paths.

The server side also bounds what a connection may cost before it is authenticated:
an HTTP request must arrive within ``idle_timeout`` (connections that send nothing
are dropped); at most ``max_connections`` TCP connections are open at once, and at
most ``max_connections_per_address`` from one source address (an eighth of them by
default: one host cannot take every slot; with ``known``, a quarter of them is kept for
the addresses rostered peers recently authenticated from, as the channel's gate does,
so that a flood from a few addresses cannot hold them all); and a client's first
``handshake_messages``
messages (its handshake flights) may be at most ``max_handshake_message`` bytes, so
that before it could have authenticated a connection holds a few KiB, not a record
(``transport.ws_frames``; fragments are bounded too; on the stock reader, by the
opening guard, from the frame headers too). A connection carries at most one request
that is not a WebSocket upgrade (the 404 or 426 answer closes it). The cap on unauthenticated
WebSocket links, per source address too, and the handshake time-out live in the
channel layer (``transport.channel.Gatekeeper``), which ``on_link`` is expected to
call with ``link.remote_address``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import aiohttp
import numpy as np
from aiohttp import web
from aiohttp.http import WebSocketWriter

from fedloom.transport.error_text import describe
from fedloom.transport.errors import FrameTooLarge, MalformedMessage, ProtocolError
from fedloom.transport.handshake import MAX_HANDSHAKE_MESSAGE
from fedloom.transport.links import (
    KnownAddresses,
    LinkClosed,
    LinkTimeout,
    ReserveHolders,
    address_key,
    reserve_share,
)
from fedloom.transport.records import MAX_RECORD_BYTES
from fedloom.transport.ws_frames import CloseCode, FrameParser, FramingError, Opcode, masked_frame


def _optional(module: str, name: str) -> Any:
    """``module.name``, or None where this aiohttp has no such thing (``fast_path`` then
    reports it missing)."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


# aiohttp internals the fast reader needs (private modules: imported without failing).
_DataQueue: Any = _optional("aiohttp._websocket.reader", "WebSocketDataQueue")
_CHUNK_SIZE: Any = _optional("aiohttp.helpers", "DEFAULT_CHUNK_SIZE")

log = logging.getLogger(__name__)

# The largest frame a secure channel sends: one record (a 1 MiB chunk, its flags byte,
# tag and MAC). Handshake messages and stream headers are far smaller.
MAX_FRAME = MAX_RECORD_BYTES
DEFAULT_PATH = "/fedloom"
DEFAULT_HEARTBEAT_S = 15.0
DEFAULT_RECEIVE_TIMEOUT_S = 60.0  # > heartbeat: pongs arrive at least every heartbeat
DEFAULT_IDLE_TIMEOUT_S = 10.0  # a new TCP connection must send its HTTP upgrade by then
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_CLOSE_TIMEOUT_S = 2.0  # how long close() waits for the peer's close frame
DEFAULT_MAX_CONNECTIONS = 4096
CONNECTION_SHARE_PER_ADDRESS = 8  # default per-address cap: max_connections // 8
CONNECTION_SHARE_RESERVED = 4  # with ``known``: max_connections // 4 kept for known addresses
# A secure channel's client sends two handshake flights (c1, c2) before anything else.
HANDSHAKE_MESSAGES = 2
_MASK_IN_ONE_PASS_FROM = 4096  # bytes; below, aiohttp's copies cost less than numpy calls

_WebSocket: TypeAlias = "aiohttp.ClientWebSocketResponse[Any] | web.WebSocketResponse[Any]"
OnLink = Callable[["WebSocketLink"], Awaitable[None]]


class WebSocketLink:
    """A ``Link`` over one WebSocket connection (client or server side)."""

    def __init__(
        self,
        ws: _WebSocket,
        *,
        session: aiohttp.ClientSession | None = None,
        peer: str = "",
        remote_address: str | None = None,
        opening_messages: int = 0,
        max_opening_message: int = 0,
        opening_guard: _OpeningGuard | None = None,
    ) -> None:
        self._ws = ws
        self._session = session  # owned by a client link, closed with it
        self.peer = peer
        # Server side: the IP address the connection comes from (the TCP peer's, never
        # a forwarding header), for per-address admission caps.
        self.remote_address = remote_address
        # Where aiohttp's own reader assembles messages (no fast path), the cap on the
        # peer's first messages is checked here, once each message is whole.
        self._opening_messages = opening_messages
        self._max_opening_message = max_opening_message
        # ... and their frame headers, before aiohttp buffers them (``_OpeningGuard``).
        self._opening_guard = opening_guard

    @property
    def closed(self) -> bool:
        return self._ws.closed

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        if self._ws.closed:
            raise LinkClosed("link closed")
        try:
            # aiohttp takes any bytes-like object (its annotation says bytes).
            await self._ws.send_bytes(cast(bytes, data))
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise LinkClosed(f"send failed: {describe(exc)}") from None

    async def recv(self) -> bytes | memoryview:
        try:
            msg = await self._ws.receive()
        except TimeoutError:
            await self.close()
            raise LinkTimeout("receive time-out: nothing arrived, not even a pong") from None
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as failure:
            # e.g. the pong that answers a ping meets a reset connection: the link ended
            await self.close()
            raise LinkClosed(f"receive failed: {describe(failure)}") from None
        kind = msg.type
        if kind is aiohttp.WSMsgType.BINARY:
            data: bytes | memoryview = msg.data  # a view for large frames (ws_frames)
            if self._opening_messages:
                self._opening_messages -= 1
                if len(data) > self._max_opening_message:
                    await self._close(aiohttp.WSCloseCode.MESSAGE_TOO_BIG, b"")
                    raise FrameTooLarge(
                        f"frame rejected: message of {len(data)} bytes exceeds the limit of "
                        f"{self._max_opening_message} on a peer's first messages"
                    )
            return data
        guard = self._opening_guard
        if guard is not None and guard.error is not None:
            await self.close()  # the guard failed the connection: say why
            if guard.error.code == CloseCode.MESSAGE_TOO_BIG:
                raise FrameTooLarge(
                    f"frame rejected: {guard.error.reason} on a peer's first messages "
                    "(refused at its frame header)"
                )
            raise _WsProtocolError(f"websocket protocol error: {guard.error.reason}")
        if kind is aiohttp.WSMsgType.TEXT:
            await self._close(aiohttp.WSCloseCode.UNSUPPORTED_DATA, b"binary frames only")
            raise MalformedMessage("text frame on a binary-only link")
        if kind is aiohttp.WSMsgType.ERROR:
            exc = msg.data
            await self.close()
            if (
                isinstance(exc, aiohttp.WebSocketError)
                and exc.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            ):
                raise FrameTooLarge(f"frame rejected: {describe(exc)}")
            if isinstance(exc, aiohttp.WebSocketError):
                raise _WsProtocolError(f"websocket protocol error: {describe(exc)}")
            raise LinkClosed(f"websocket error: {describe(exc)}")
        # CLOSE, CLOSING, CLOSED (PING/PONG are answered inside aiohttp).
        await self.close()
        raise LinkClosed("link closed by peer")

    async def close(self) -> None:
        await self._close(aiohttp.WSCloseCode.OK, b"")

    async def fail_opening(self) -> None:
        """Close with the opening guard's code (a ``recv`` waiting returns and raises why)."""
        guard = self._opening_guard
        code = (
            aiohttp.WSCloseCode.PROTOCOL_ERROR
            if guard is None or guard.error is None
            else guard.error.code
        )
        await self._close(code, b"")

    async def _close(self, code: int, message: bytes) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close(code=code, message=message)
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


# Pings and pongs one socket read may carry before the link is failed (1008). A peer sends
# one ping per heartbeat; a thousand in one read only come from a flood (or a backlog of
# hours, which the heartbeat time-out ends first).
MAX_CONTROLS_PER_READ = 1024
_CONTROL = (Opcode.PING, Opcode.PONG)


class _FrameReader:
    """aiohttp's payload-parser interface (``feed_data``/``feed_eof``) over ``FrameParser``:
    the messages it completes go to the response's queue, as aiohttp's own reader would
    put them there, and a framing error fails the queue with the close code to send."""

    def __init__(self, queue: Any, parser: FrameParser) -> None:
        self.queue = queue
        self._parser = parser
        self._flooded = False

    @property
    def parser(self) -> FrameParser:
        return self._parser

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        parser = self._parser
        if parser.error is not None or self._flooded:
            return True, b""
        controls = 0
        for message in parser.feed(data):
            if message.opcode is Opcode.CLOSE:
                self.queue.feed_data(
                    aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, message.close_code, message.reason),
                    0,
                )
            elif message.opcode in _CONTROL and (controls := controls + 1) > MAX_CONTROLS_PER_READ:
                # A peer pings every 15 s: this many in one read is a flood, each would sit
                # in the queue as a message object (~140 bytes for 2 bytes on the wire).
                self._flooded = True
                self.queue.set_exception(
                    aiohttp.WebSocketError(
                        CloseCode.POLICY_VIOLATION,
                        f"more than {MAX_CONTROLS_PER_READ} pings/pongs in one read",
                    )
                )
                return True, b""
            else:
                kind = aiohttp.WSMsgType(message.opcode)
                self.queue.feed_data(aiohttp.WSMessage(kind, message.data, ""), len(message.data))
        if parser.error is not None:
            self.queue.set_exception(aiohttp.WebSocketError(parser.error.code, parser.error.reason))
            return True, b""
        return False, b""

    def feed_eof(self) -> None:
        self.queue.feed_eof()


# A socket read goes straight into the payload buffer of the frame being read while at
# least this many of its bytes are still to come; shorter remainders, frame headers and
# small messages are read into a read buffer of this size and copied from there, as the
# event loop's own reads would be. One read buffer per thread serves every connection
# whose loop runs there (as uvloop's own does): a connection holds none of its own, so a
# flood of idle upgraded connections costs no more memory than before.
DIRECT_READ_FROM = 64 * 1024
READ_BUFFER_BYTES = 64 * 1024
_read_buffers = threading.local()


def _read_buffer() -> memoryview:
    """This thread's read buffer. Safe to share: a loop runs its transports' reads one at
    a time, and what a read delivers is parsed (copied out) before the next one."""
    buffer: memoryview | None = getattr(_read_buffers, "buffer", None)
    if buffer is None:
        buffer = _read_buffers.buffer = memoryview(bytearray(READ_BUFFER_BYTES))
    return buffer


class _DirectReads(asyncio.BufferedProtocol):
    """A connection's protocol once fedloom's frame parser reads it (both fast paths):
    the event loop reads the socket straight into the payload buffer of the frame being
    read (``FrameParser.read_into``) where at least ``DIRECT_READ_FROM`` of it is still to
    come, else into a reused read buffer. Either way the bytes read go on, as a view, to
    the connection's protocol (aiohttp's, or the server's counting wrapper around it),
    exactly where ``data_received`` would have taken them, so every check, time-out and
    heartbeat there still sees every byte; the parser finds payload bytes already in
    place and unmasks them there. What this saves is the event loop's copy of each read
    into a new ``bytes`` and the parser's copy of it into the frame: about 4 MB of copies
    per model a site receives. The other protocol events are passed on unchanged."""

    __slots__ = ("_buffer", "_given", "_parser", "_protocol", "direct_bytes")

    def __init__(self, protocol: asyncio.BaseProtocol, parser: FrameParser) -> None:
        self._protocol = cast(asyncio.Protocol, protocol)
        self._parser = parser
        self._buffer = _read_buffer()
        self._given = self._buffer  # what the last get_buffer handed out
        self.direct_bytes = 0  # bytes received straight into a frame's payload

    @property
    def protocol(self) -> asyncio.BaseProtocol:
        """The protocol the bytes go on to."""
        return self._protocol

    def get_buffer(self, sizehint: int) -> memoryview:
        into = self._parser.read_into()
        self._given = into if into is not None and len(into) >= DIRECT_READ_FROM else self._buffer
        return self._given

    def buffer_updated(self, nbytes: int) -> None:
        given = self._given
        if given is not self._buffer:
            self.direct_bytes += nbytes
            # A view of the frame's own payload buffer, which nothing else reuses; aiohttp's
            # protocols take any bytes-like object (their annotation says bytes).
            self._protocol.data_received(cast(bytes, given[:nbytes]))
        else:
            # The shared read buffer is overwritten by the next read of any connection:
            # what goes on must not depend on the protocol copying it before it keeps it.
            self._protocol.data_received(bytes(given[:nbytes]))

    def data_received(self, data: bytes) -> None:
        """A transport that does not read into buffers hands over bytes: passed on."""
        self._protocol.data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self._protocol.eof_received()

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()


def read_directly(transport: Any, parser: FrameParser) -> _DirectReads | None:
    """Make ``transport`` read through ``_DirectReads`` into ``parser``'s frames, around
    the protocol it has; None (nothing changed) where the transport cannot switch
    protocols or is closing. Call it between two reads, once ``parser`` is the only
    reader of the connection's bytes (the parser's state tells where each read goes)."""
    set_protocol = getattr(transport, "set_protocol", None)
    get_protocol = getattr(transport, "get_protocol", None)
    if set_protocol is None or get_protocol is None or transport.is_closing():
        return None
    reads = _DirectReads(get_protocol(), parser)
    set_protocol(reads)
    return reads


class OneCopyWebSocketResponse(web.WebSocketResponse):
    """aiohttp's server-side WebSocket with fedloom's frame reader (``transport.ws_frames``:
    one copy of each payload instead of five). Everything else (the upgrade, heartbeat,
    close handshake, the writer) is aiohttp's; this repeats what
    ``WebSocketResponse._post_start`` does, with the other reader. The client's first
    ``handshake_messages`` messages may be at most ``max_handshake_message`` bytes."""

    def __init__(
        self, *args: Any, handshake_messages: int = 0, max_handshake_message: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._handshake_messages = handshake_messages
        self._max_handshake_message = max_handshake_message
        self.direct_reads: _DirectReads | None = None  # once started, where it could

    def _post_start(
        self, request: web.BaseRequest, protocol: str | None, writer: WebSocketWriter
    ) -> None:
        self._ws_protocol = protocol
        self._writer = writer
        self._reset_heartbeat()
        loop = self._loop
        assert loop is not None
        self._reader = _DataQueue(request.protocol, _CHUNK_SIZE, loop=loop)
        parser = _FrameReader(
            self._reader,
            FrameParser(
                self._max_msg_size - 1,
                require_mask=True,
                opening_messages=self._handshake_messages,
                max_opening_message=self._max_handshake_message,
            ),
        )
        callback = None if self._heartbeat is None else self._on_data_received
        request.protocol.set_parser(parser, data_received_cb=callback)  # type: ignore[arg-type]
        request.protocol.keep_alive(False)
        self.direct_reads = read_directly(request.transport, parser.parser)


class _MaskingWriter(WebSocketWriter):
    """aiohttp's client-side frame writer, except that a large payload is masked in the
    same pass that copies it into its frame (aiohttp copies it into a bytearray, masks
    that, then copies it again to prepend the header)."""

    def _write_websocket_frame(self, message: bytes | memoryview, opcode: int, rsv: int) -> None:
        source = np.frombuffer(message, dtype=np.uint8)
        size = source.size
        if not self.use_mask or size < _MASK_IN_ONE_PASS_FROM:
            super()._write_websocket_frame(cast(bytes, message), opcode, rsv)  # any buffer
            return
        if self.transport.is_closing():
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        key = self.get_random_bits().to_bytes(4, "big")
        frame = masked_frame(0x80 | rsv | opcode, source, key)  # FIN set, as aiohttp does
        self.transport.write(frame.data)  # the transport may keep it: it is never reused
        self._output_size += len(frame)


class OneCopyClientWebSocketResponse(aiohttp.ClientWebSocketResponse):
    """aiohttp's client-side WebSocket with a writer that masks in one copy
    (``_MaskingWriter``); passed to ``aiohttp.ClientSession(ws_response_class=...)``."""

    def __init__(self, reader: Any, writer: WebSocketWriter, *args: Any, **kwargs: Any) -> None:
        masking = _MaskingWriter(
            writer.protocol,
            writer.transport,
            use_mask=writer.use_mask,
            limit=writer._limit,
            compress=writer.compress,
            notakeover=writer.notakeover,
        )
        super().__init__(reader, masking, *args, **kwargs)


class OneCopyReadingClientWebSocketResponse(OneCopyClientWebSocketResponse):
    """``OneCopyClientWebSocketResponse`` that also reads with fedloom's frame reader
    (``transport.ws_frames``): each payload byte the server sends is copied once, from
    the socket read into its frame's buffer, where aiohttp's reader slices every read and
    joins the slices (two copies; the client of a 4 MB model pays them per model).

    ``ClientSession._ws_connect`` assigns its ``WebSocketReader`` to ``_parser`` and, in
    the same step, hands ``_parser`` to the connection (``set_parser``): the assignment
    here keeps a ``_FrameReader`` over the same queue in its place, so no byte of the
    connection is parsed by the other reader. Frames may be at most ``max_message``
    bytes (a subclass per cap: ``_reading_client_class``); unmasked or masked, as
    aiohttp's client reader accepts both."""

    max_message = MAX_FRAME
    direct_reads: _DirectReads | None = None  # ``read_directly`` switched it on

    def read_directly(self) -> None:
        """Read the connection's socket straight into frames (``_DirectReads``); called
        once ``ClientSession._ws_connect`` has handed our frame reader to the connection."""
        reader = self._parser
        if isinstance(reader, _FrameReader) and self.direct_reads is None:
            self.direct_reads = read_directly(self._writer.transport, reader.parser)

    @property
    def _parser(self) -> Any:
        return self._fedloom_parser

    @_parser.setter
    def _parser(self, parser: Any) -> None:
        queue = getattr(self, "_reader", None)
        if parser is not None and queue is not None:
            parser = _FrameReader(queue, FrameParser(self.max_message, require_mask=False))
        self._fedloom_parser = parser


class _WsProtocolError(ProtocolError):
    """The peer broke the WebSocket framing rules (bad opcode, bad UTF-8 close reason...)."""

    reason = "websocket"


# ------------------------------------------------------------------ feature detection

# Every name aiohttp 3.14's ``WebSocketResponse._post_start`` uses: the override in
# ``OneCopyWebSocketResponse`` repeats all it does (with another parser). A later
# ``_post_start`` that uses anything else does something the override would not.
_POST_START_NAMES = frozenset(
    {
        "DEFAULT_CHUNK_SIZE",
        "WebSocketDataQueue",
        "WebSocketReader",
        "_compress",
        "_decode_text",
        "_heartbeat",
        "_loop",
        "_max_msg_size",
        "_on_data_received",
        "_parser",
        "_protocol",
        "_reader",
        "_reset_heartbeat",
        "_writer",
        "_ws_protocol",
        "bool",
        "keep_alive",
        "protocol",
        "set_parser",
    }
)
# Attributes a WebSocketResponse has before ``prepare`` that ``_post_start`` reads or sets.
_RESPONSE_ATTRIBUTES = (
    "_heartbeat",
    "_loop",
    "_max_msg_size",
    "_reader",
    "_writer",
    "_ws_protocol",
)
# Attributes of a WebSocketWriter that ``OneCopyClientWebSocketResponse`` copies or
# ``_MaskingWriter`` uses.
_WRITER_ATTRIBUTES = (
    "protocol",
    "transport",
    "use_mask",
    "_limit",
    "compress",
    "notakeover",
    "get_random_bits",
    "_output_size",
)


@dataclass(frozen=True, slots=True)
class FastPath:
    """Which of fedloom's one-copy WebSocket paths the installed aiohttp supports: the
    server-side frame reader, the client-side masking writer and the client-side frame
    reader (used with the writer), each with what is missing or changed (empty: in use)."""

    reader_missing: tuple[str, ...] = ()
    writer_missing: tuple[str, ...] = ()
    client_reader_missing: tuple[str, ...] = ()

    @property
    def reader(self) -> bool:
        return not self.reader_missing

    @property
    def writer(self) -> bool:
        return not self.writer_missing

    @property
    def client_reader(self) -> bool:
        return not self.client_reader_missing


_fast_path: FastPath | None = None


def fast_path() -> FastPath:
    """What ``detect_fast_path`` found, checked once per process (the first link), with
    one WARNING for each path that falls back to stock aiohttp."""
    global _fast_path
    if _fast_path is None:
        found = detect_fast_path()
        for side, missing, stock, differs in (
            (
                "reader",
                found.reader_missing,
                "server links read with aiohttp's reader",
                "same frame cap; a client's first messages are still held to the handshake "
                "size from their frame headers (by a guard on the connection; one that "
                "breaks the cap before the upgrade is answered is cut without a close "
                "frame); after them aiohttp's framing rules apply (unmasked frames, close "
                "codes 1006 and >= 5000, long fragment trains accepted); each payload is "
                "copied five times instead of once",
            ),
            (
                "writer",
                found.writer_missing,
                "client links write with aiohttp's writer",
                "same limits; each large payload is copied twice and masked in a pass of its "
                "own, instead of masked as it is copied once",
            ),
            (
                "client reader",
                found.client_reader_missing,
                "client links read with aiohttp's reader",
                "same frame cap; each payload is copied twice instead of once",
            ),
        ):
            if missing:
                log.warning(
                    "aiohttp %s: fedloom's one-copy WebSocket %s is off, %s (%s); missing or "
                    "changed: %s",
                    aiohttp.__version__,
                    side,
                    stock,
                    differs,
                    "; ".join(missing),
                )
        _fast_path = found
    return _fast_path


def detect_fast_path(
    *,
    response_cls: Any = web.WebSocketResponse,
    data_queue: Any = None,
    chunk_size: Any = None,
    request_cls: Any = web.BaseRequest,
    writer_cls: Any = WebSocketWriter,
    client_cls: Any = aiohttp.ClientWebSocketResponse,
    session_cls: Any = aiohttp.ClientSession,
) -> FastPath:
    """Check every aiohttp internal the fast reader and writer use (the defaults: the
    installed aiohttp's; ``data_queue``/``chunk_size`` None: ``WebSocketDataQueue`` and
    ``DEFAULT_CHUNK_SIZE`` as found at import). Never raises: whatever cannot be checked
    counts as missing."""
    queue = _DataQueue if data_queue is None else data_queue
    chunk = _CHUNK_SIZE if chunk_size is None else chunk_size
    try:
        reader = tuple(_reader_missing(response_cls, queue, chunk, request_cls))
    except Exception as exc:  # a shape so different that checking it failed
        reader = (f"the reader check failed: {describe(exc)}",)
    try:
        writer = tuple(_writer_missing(writer_cls, client_cls))
    except Exception as exc:
        writer = (f"the writer check failed: {describe(exc)}",)
    try:
        client_reader = tuple(_client_reader_missing(session_cls, client_cls, queue))
    except Exception as exc:
        client_reader = (f"the client reader check failed: {describe(exc)}",)
    return FastPath(reader, writer, client_reader)


def _parameters(fn: Any) -> list[str] | None:
    """The parameter names of ``fn`` (None: not a callable with a signature)."""
    if not callable(fn):
        return None
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def _needs(where: str, fn: Any, first: Iterable[str], also: Iterable[str] = ()) -> list[str]:
    """[] where ``fn`` takes ``first`` as its first parameters and ``also`` somewhere."""
    names = _parameters(fn)
    if names is None:
        return [f"{where} (not callable)"]
    first, also = list(first), list(also)
    if names[: len(first)] != first or not set(also) <= set(names):
        return [f"{where}{tuple(first + also)} (has {tuple(names)})"]
    return []


def _reader_missing(response_cls: Any, queue: Any, chunk: Any, request_cls: Any) -> list[str]:
    missing: list[str] = []
    if queue is None:
        missing.append("aiohttp._websocket.reader.WebSocketDataQueue")
    else:
        for method in ("feed_data", "feed_eof", "set_exception", "read"):
            if not callable(getattr(queue, method, None)):
                missing.append(f"WebSocketDataQueue.{method}")
        if not missing:
            missing += _queue_probe(queue)
    if not isinstance(chunk, int):
        missing.append("aiohttp.helpers.DEFAULT_CHUNK_SIZE")
    post_start = getattr(response_cls, "_post_start", None)
    missing += _needs(
        "WebSocketResponse._post_start", post_start, ["self", "request", "protocol", "writer"]
    )
    code = getattr(post_start, "__code__", None)
    if code is None:
        missing.append("WebSocketResponse._post_start's code (not a Python function)")
    else:
        extra = sorted(set(code.co_names) - _POST_START_NAMES)
        if extra:
            missing.append(f"WebSocketResponse._post_start uses what fedloom's does not: {extra}")
    for method in ("_reset_heartbeat", "_on_data_received"):
        if not callable(getattr(response_cls, method, None)):
            missing.append(f"WebSocketResponse.{method}")
    response = response_cls()
    missing += [
        f"WebSocketResponse().{name}"
        for name in _RESPONSE_ATTRIBUTES
        if not hasattr(response, name)
    ]
    if not isinstance(getattr(request_cls, "protocol", None), property):
        missing.append("BaseRequest.protocol")
    handler = _optional("aiohttp.web_protocol", "RequestHandler")
    if handler is None:
        missing.append("aiohttp.web_protocol.RequestHandler")
    else:
        missing += _needs(
            "RequestHandler.set_parser",
            getattr(handler, "set_parser", None),
            ["self", "parser"],
            ["data_received_cb"],
        )
        missing += _needs(
            "RequestHandler.keep_alive", getattr(handler, "keep_alive", None), ["self", "val"]
        )
    return missing


class _ProbeProtocol:
    """What a ``WebSocketDataQueue`` asks of its protocol (flow control)."""

    _reading_paused = False

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False


def _queue_probe(queue: Any) -> list[str]:
    """A message fed into a queue as ``_FrameReader`` feeds it must read back (the queue
    is compiled: its signature cannot be inspected)."""
    loop = asyncio.new_event_loop()
    try:
        probe = queue(_ProbeProtocol(), 2**16, loop=loop)
        sent = aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, b"probe", "")
        probe.feed_data(sent, len(sent.data))
        probe.feed_eof()
        reading = probe.read()
        try:
            reading.send(None)  # the message is buffered: read() returns at once
        except StopIteration as done:
            if done.value == sent:
                return []
        else:
            reading.close()
        return ["WebSocketDataQueue(protocol, limit, loop=): a probe message did not read back"]
    except Exception as exc:
        return [f"WebSocketDataQueue(protocol, limit, loop=): {describe(exc)}"]
    finally:
        loop.close()


def _writer_missing(writer_cls: Any, client_cls: Any) -> list[str]:
    missing = _needs(
        "WebSocketWriter",
        writer_cls,
        ["protocol", "transport"],
        ["use_mask", "limit", "compress", "notakeover"],
    )
    hook = getattr(writer_cls, "_write_websocket_frame", None)
    missing += _needs(
        "WebSocketWriter._write_websocket_frame", hook, ["self", "message", "opcode", "rsv"]
    )
    send_code = getattr(getattr(writer_cls, "send_frame", None), "__code__", None)
    if send_code is None or "_write_websocket_frame" not in send_code.co_names:
        missing.append("WebSocketWriter.send_frame calling _write_websocket_frame")
    missing += _needs("ClientWebSocketResponse", client_cls, ["reader", "writer"])
    if missing:
        return missing
    # A probe: a frame written through the hook must parse back as the payload sent.
    sink = _ProbeTransport()
    writer = writer_cls(None, sink, use_mask=True)
    missing += [f"WebSocketWriter().{n}" for n in _WRITER_ATTRIBUTES if not hasattr(writer, n)]
    if missing:
        return missing
    payload = bytes(range(256)) * (_MASK_IN_ONE_PASS_FROM // 256 + 1)
    _MaskingWriter._write_websocket_frame(writer, payload, Opcode.BINARY, 0)
    messages = FrameParser(len(payload), require_mask=True).feed(b"".join(sink.written))
    if [(m.opcode, bytes(m.data)) for m in messages] != [(Opcode.BINARY, payload)]:
        missing.append("a probe frame through _MaskingWriter did not parse back")
    elif writer._output_size != sum(map(len, sink.written)):
        missing.append("WebSocketWriter._output_size (flow control) not as expected")
    return missing


def _client_reader_missing(session_cls: Any, client_cls: Any, queue: Any) -> list[str]:
    """What ``OneCopyReadingClientWebSocketResponse`` relies on: ``_ws_connect`` makes a
    ``WebSocketReader``, assigns it to the response's ``_parser`` and passes ``_parser`` to
    ``set_parser`` (its code names all three), the response keeps its queue in ``_reader``,
    and the queue takes messages as ``_FrameReader`` feeds them."""
    if queue is None:
        return ["aiohttp._websocket.reader.WebSocketDataQueue"]
    code = getattr(getattr(session_cls, "_ws_connect", None), "__code__", None)
    if code is None:
        return ["ClientSession._ws_connect's code (not a Python function)"]
    missing = [
        f"ClientSession._ws_connect using {name}"
        for name in ("WebSocketReader", "_parser", "set_parser")
        if name not in code.co_names
    ]
    init_code = getattr(getattr(client_cls, "__init__", None), "__code__", None)
    if init_code is None or "_reader" not in init_code.co_names:
        missing.append("ClientWebSocketResponse keeping its queue in _reader")
    return missing + _queue_probe(queue)


class _ProbeTransport:
    """Just enough of an ``asyncio.Transport`` for a writer to write a probe frame into."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))


async def connect(
    url: str,
    *,
    max_frame: int = MAX_FRAME,
    heartbeat: float | None = DEFAULT_HEARTBEAT_S,
    receive_timeout: float | None = DEFAULT_RECEIVE_TIMEOUT_S,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S,
) -> WebSocketLink:
    """Open a WebSocket link to ``url`` (``ws://host:port/fedloom``).

    Raises ``LinkClosed`` when the connection cannot be made (refused, time-out, the
    server answered without upgrading).
    """
    _check_options(max_frame, heartbeat, receive_timeout)
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
        ws_response_class=_client_class(max_frame),
    )
    try:
        async with asyncio.timeout(connect_timeout):
            ws = await session.ws_connect(
                url,
                max_msg_size=max_frame + 1,  # aiohttp rejects a frame of exactly its cap
                heartbeat=heartbeat,
                timeout=aiohttp.ClientWSTimeout(ws_receive=receive_timeout, ws_close=close_timeout),
                compress=0,  # never offer permessage-deflate
                autoping=True,
                decode_text=False,
            )
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        await session.close()
        raise LinkClosed(f"cannot connect to {url}: {describe(exc)}") from None
    except BaseException:
        await session.close()
        raise
    if isinstance(ws, OneCopyReadingClientWebSocketResponse):
        ws.read_directly()  # no read has run since ws_connect handed the frames to it
    return WebSocketLink(ws, session=session, peer=url)


def _client_class(max_frame: int) -> type[aiohttp.ClientWebSocketResponse]:
    """The response class a client link uses: one-copy writing and reading where this
    aiohttp allows them (``fast_path``), reading frames of at most ``max_frame`` bytes."""
    found = fast_path()
    if not found.writer:
        return aiohttp.ClientWebSocketResponse
    if not found.client_reader:
        return OneCopyClientWebSocketResponse
    return _reading_client_class(max_frame)


@functools.cache
def _reading_client_class(max_frame: int) -> type[OneCopyReadingClientWebSocketResponse]:
    if max_frame == OneCopyReadingClientWebSocketResponse.max_message:
        return OneCopyReadingClientWebSocketResponse
    return type(
        "OneCopyReadingClientWebSocketResponse",
        (OneCopyReadingClientWebSocketResponse,),
        {"max_message": max_frame},
    )


class _OpeningGuard:
    """The handshake-sized cap on a client's first messages, on the stock reader's path.

    aiohttp's reader buffers a message up to the frame cap before the link sees it, and
    a response's ``max_msg_size`` is fixed when it is made (aiohttp offers no public way
    to raise it once the handshake is over), so on that path the connection's protocol
    wrapper (``_CountedProtocol``) shows each chunk it receives to this guard before
    aiohttp gets it. Past the HTTP request's head, fedloom's frame parser
    (``transport.ws_frames``, frame headers as the fast path reads them) follows the
    frames: a first data message announced larger than ``max_message``, or framing it
    refuses, fails the connection at that frame's header, before aiohttp has buffered a
    byte of its payload. Once the client's first ``messages`` data messages are whole,
    the guard is done and the connection is aiohttp's alone.
    """

    __slots__ = (
        "_head_end",
        "_max_frame",
        "_max_message",
        "_messages",
        "_parser",
        "error",
        "forwarded",
    )

    def __init__(self, messages: int, max_message: int, max_frame: int) -> None:
        self._max_message = max_message
        self._max_frame = max_frame
        self._head_end = b""  # the last bytes of the request head seen (to find its end)
        self._parser: FrameParser | None = None  # None: still reading the request head
        self._messages = messages
        self.error: FramingError | None = None
        self.forwarded = 0  # WebSocket bytes passed on to aiohttp while watching

    def feed(self, data: bytes) -> int:
        """Look at the next chunk received; return how many of its first bytes aiohttp
        may have: all of them, unless the guard refused a frame (``error`` says why):
        then those before that frame, and the connection must fail."""
        view = memoryview(data)
        start = 0  # where the frames begin in this chunk
        if self._parser is None:
            seen = self._head_end + data
            at = seen.find(b"\r\n\r\n")
            if at < 0:  # still in the head (whose size aiohttp bounds)
                self._head_end = seen[-3:]
                return len(data)
            self._parser = FrameParser(
                self._max_frame,
                require_mask=False,  # aiohttp's reader accepts unmasked frames
                opening_messages=self._messages,
                max_opening_message=self._max_message,
            )
            start = at + 4 - len(self._head_end)
            self._head_end = b""
        parser = self._parser
        parser.feed(view[start:])
        if parser.error is not None:
            self.error = parser.error
            self.forwarded += parser.error_at
            return start + parser.error_at
        self.forwarded += len(data) - start
        return len(data)

    @property
    def done(self) -> bool:
        """The client's first messages are whole (and were within the cap)."""
        return self._parser is not None and self._parser.data_messages >= self._messages


class _CountedProtocol(asyncio.Protocol):
    """One connection of a ``_CappedServer``: aiohttp's protocol for it, with every call
    passed on, and the server told when the connection opens and closes. With an
    ``opening`` guard (the stock reader's path), each chunk received is shown to it
    first, until it is done; once it refuses a frame, aiohttp gets only the bytes before
    that frame and nothing after, and the server fails the connection
    (``WsServer._refuse_opening``)."""

    __slots__ = ("_inner", "_server", "_transport", "_watching", "opening")

    def __init__(
        self, inner: asyncio.Protocol, server: _CappedServer, opening: _OpeningGuard | None
    ) -> None:
        self._inner = inner
        self._server = server
        self._transport: asyncio.BaseTransport | None = None
        self.opening = opening  # kept for the link, which reports why it failed
        self._watching = opening

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._inner.connection_made(transport)
        self._server.opened(self, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.closed(self)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        guard = self._watching
        if guard is not None:
            if guard.error is not None:
                return  # failed (the abort is on its way): nothing more reaches aiohttp
            accepted = guard.feed(data)
            if guard.error is not None:
                if accepted:  # the messages before the refused frame
                    self._inner.data_received(data[:accepted])
                assert self._transport is not None
                self._server.refused_opening(self._transport)
                return
            if guard.done:
                self._watching = None
            else:  # what aiohttp holds of first messages not yet whole
                self._server.note_opening_bytes(guard.forwarded)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _CappedServer(web.Server):
    """aiohttp's low-level server, refusing TCP connections beyond ``max_connections``,
    or beyond ``max_per_address`` from one source address (``address_key``); with
    ``known``, connections from addresses not in it may hold only ``max_connections``
    less a reserve (``CONNECTION_SHARE_RESERVED``) together. One known address, and one
    peer over the addresses it made known (with a ``KnownAddresses``), holds at most
    ``reserve_share`` of the reserve; its connections beyond that count as unknown.

    Connections are counted by wrapping each protocol the server makes (a ``web.Server``
    is the protocol factory its site hands to ``loop.create_server``): no aiohttp hook
    is overridden, so this works whatever aiohttp does inside a connection."""

    def __init__(
        self,
        *args: Any,
        max_connections: int | None,
        max_per_address: int | None,
        known: Container[str] | None = None,
        opening_guard: Callable[[], _OpeningGuard | None] = lambda: None,
        on_refused_opening: Callable[[asyncio.BaseTransport], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._opening_guard = opening_guard
        self._on_refused_opening = on_refused_opening
        self.refused_openings = 0  # connections failed by their opening guard
        self.max_opening_bytes = 0  # the most WebSocket bytes a guard passed on, watching
        self._by_transport: dict[asyncio.BaseTransport, _CountedProtocol] = {}
        self._max_connections = max_connections
        self._max_per_address = max_per_address
        self._known = known
        self._max_unknown = max_connections
        self._share = 0
        if max_connections is not None and known is not None:
            reserve = max_connections // CONNECTION_SHARE_RESERVED
            self._max_unknown = max_connections - reserve
            self._share = reserve_share(reserve)
        self.open_connections = 0
        self.refused_connections = 0
        self._open_unknown = 0  # connections outside the reserve for known addresses
        self._reserve = ReserveHolders()
        self._open_from: collections.Counter[str] = collections.Counter()
        # connection -> its address_key, and the peer whose reserve share it holds (if any)
        self._address_of: dict[_CountedProtocol, tuple[str, str | None]] = {}

    def __call__(self) -> Any:  # a protocol per accepted connection, as asyncio asks
        return _CountedProtocol(super().__call__(), self, self._opening_guard())

    def opening_guard(self, transport: asyncio.BaseTransport | None) -> _OpeningGuard | None:
        """The opening guard of the connection on ``transport`` (None: it has none)."""
        handler = self._by_transport.get(transport) if transport is not None else None
        return None if handler is None else handler.opening

    def refused_opening(self, transport: asyncio.BaseTransport) -> None:
        """A guard failed the connection on ``transport``: its link (if it has one yet)
        is told, else the connection is aborted."""
        self.refused_openings += 1
        if self._on_refused_opening is not None:
            self._on_refused_opening(transport)
        else:
            cast(asyncio.Transport, transport).abort()

    def note_opening_bytes(self, forwarded: int) -> None:
        if forwarded > self.max_opening_bytes:
            self.max_opening_bytes = forwarded

    def opened(self, handler: _CountedProtocol, transport: asyncio.BaseTransport) -> None:
        self.open_connections += 1
        self._by_transport[transport] = handler
        peer = transport.get_extra_info("peername")
        key = address_key(str(peer[0]) if isinstance(peer, tuple) and peer else None)
        holder = self._holder(key)
        if not self._reserve.fits(key, holder, self._share):
            holder = None
        if holder is not None:
            self._reserve.take(key, holder)
        self._address_of[handler] = (key, holder)
        self._open_from[key] += 1
        self._open_unknown += holder is None
        if (
            (self._max_connections is not None and self.open_connections > self._max_connections)
            or (self._max_unknown is not None and self._open_unknown > self._max_unknown)
            or (self._max_per_address is not None and self._open_from[key] > self._max_per_address)
        ):
            self.refused_connections += 1
            cast(asyncio.Transport, transport).abort()

    def closed(self, handler: _CountedProtocol) -> None:
        self.open_connections -= 1
        if handler._transport is not None:
            self._by_transport.pop(handler._transport, None)
        entry = self._address_of.pop(handler, None)
        if entry is not None:
            key, holder = entry
            self._open_unknown -= holder is None
            if holder is not None:
                self._reserve.release(key, holder)
            self._open_from[key] -= 1
            if not self._open_from[key]:
                del self._open_from[key]

    def _holder(self, key: str) -> str | None:
        """Whose reserve share a connection from ``key`` takes: the peer that made it
        known (the address itself for a plain container); None if it is not known."""
        if isinstance(self._known, KnownAddresses):
            return self._known.peer_of(key)
        return key if self._known is not None and key in self._known else None


class WsServer:
    """A listening WebSocket server; ``await server.close()`` stops it and its links."""

    def __init__(
        self,
        on_link: OnLink,
        *,
        path: str,
        max_frame: int,
        heartbeat: float | None,
        receive_timeout: float | None,
        idle_timeout: float,
        close_timeout: float,
        max_connections: int | None,
        max_connections_per_address: int | None,
        handshake_messages: int,
        max_handshake_message: int,
        known: Container[str] | None = None,
    ) -> None:
        self._on_link = on_link
        self._close_timeout = close_timeout
        self._path = path
        self._max_frame = max_frame
        self._heartbeat = heartbeat
        self._receive_timeout = receive_timeout
        self._handshake_messages = handshake_messages
        self._max_handshake_message = max_handshake_message
        self._links: set[WebSocketLink] = set()
        self._link_on: dict[asyncio.BaseTransport, WebSocketLink] = {}
        self._failing: set[asyncio.Task[None]] = set()  # links closed by an opening guard
        self._server = _CappedServer(
            self._handle,
            max_connections=max_connections,
            max_per_address=max_connections_per_address,
            known=known,
            opening_guard=self._new_opening_guard,
            on_refused_opening=self._refuse_opening,
            handler_cancellation=True,  # a dropped connection cancels its on_link
            keepalive_timeout=idle_timeout,  # also bounds a connection that never sends
            access_log=None,
            max_line_size=4096,
            max_field_size=4096,
            max_headers=32,
        )
        self._runner = web.ServerRunner(self._server, handle_signals=False, shutdown_timeout=1.0)
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{self._path}"

    @property
    def open_connections(self) -> int:
        """TCP connections open now (authenticated or not)."""
        return self._server.open_connections

    @property
    def refused_connections(self) -> int:
        """TCP connections refused so far because ``max_connections`` were open."""
        return self._server.refused_connections

    @property
    def refused_openings(self) -> int:
        """Connections failed at a first message's frame header, before aiohttp's reader
        buffered it (the stock reader's path only: the fast path's reader refuses those
        itself, with close code 1009)."""
        return self._server.refused_openings

    @property
    def max_opening_bytes(self) -> int:
        """On the stock reader's path, the most WebSocket bytes one connection had passed
        on to aiohttp while its first messages were not yet whole (at most those
        handshake-sized messages' frames and the control frames between them)."""
        return self._server.max_opening_bytes

    def _refuse_opening(self, transport: asyncio.BaseTransport) -> None:
        """An opening guard failed the connection on ``transport``: it reads no more,
        and its link (once upgraded) closes with the guard's code, its ``recv`` raising
        why (``FrameTooLarge`` for a first message over the cap), as on the fast path;
        before the upgrade there is no link to tell: the connection is aborted."""
        link = self._link_on.get(transport)
        if link is None:
            cast(asyncio.Transport, transport).abort()
            return
        cast(asyncio.Transport, transport).pause_reading()
        task = asyncio.get_running_loop().create_task(link.fail_opening())
        self._failing.add(task)
        task.add_done_callback(self._failing.discard)

    def _new_opening_guard(self) -> _OpeningGuard | None:
        if not self._handshake_messages or fast_path().reader:
            return None  # the fast path's reader caps the first messages itself
        return _OpeningGuard(self._handshake_messages, self._max_handshake_message, self._max_frame)

    async def start(self, host: str, port: int) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        address = self._runner.addresses[0]
        self.host, self.port = str(address[0]), int(address[1])

    async def close(self) -> None:
        # Concurrently: each close may wait up to close_timeout for the peer's answer.
        await asyncio.gather(*(link.close() for link in list(self._links)), *self._failing)
        await self._runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path != self._path:
            return _closing(web.Response(status=404))
        options: dict[str, Any] = {
            "max_msg_size": self._max_frame + 1,  # aiohttp rejects a frame of exactly its cap
            "heartbeat": self._heartbeat,
            "receive_timeout": self._receive_timeout,
            "timeout": self._close_timeout,
            "compress": False,  # never accept permessage-deflate
            "autoping": True,
            "decode_text": False,
        }
        fast = fast_path().reader
        if fast:
            ws: web.WebSocketResponse = OneCopyWebSocketResponse(
                **options,
                handshake_messages=self._handshake_messages,
                max_handshake_message=self._max_handshake_message,
            )
        else:  # aiohttp's reader; the link checks the opening messages' cap
            ws = web.WebSocketResponse(**options)
        if not ws.can_prepare(request).ok:
            return _closing(web.Response(status=426, text="WebSocket upgrade required"))
        try:
            await ws.prepare(request)
        except ConnectionError as exc:  # the client went away before our 101 reached it
            log.debug("upgrade from %s abandoned: %s", _source(request), describe(exc))
            return ws
        link = WebSocketLink(
            ws,
            peer=_source(request),
            remote_address=request.remote,
            opening_messages=0 if fast else self._handshake_messages,
            max_opening_message=self._max_handshake_message,
            opening_guard=None if fast else self._server.opening_guard(request.transport),
        )
        self._links.add(link)
        if request.transport is not None:
            self._link_on[request.transport] = link
        try:
            await self._on_link(link)
        except (ProtocolError, LinkClosed) as exc:
            log.info("link from %s ended: %s: %s", link.peer, type(exc).__name__, exc)
        except Exception:  # the server outlives any one link's bug
            log.exception("link handler for %s failed", link.peer)
        finally:
            self._links.discard(link)
            if request.transport is not None:
                self._link_on.pop(request.transport, None)
            await link.close()
        return ws


def _closing(response: web.Response) -> web.Response:
    """``response``, after which the connection closes: a connection carries at most one
    request that is not a WebSocket upgrade (the opening guard reads what follows the
    first request's head as WebSocket frames)."""
    response.force_close()
    return response


def _source(request: web.BaseRequest) -> str:
    """``host:port`` a request came from (two daemons on one host differ by port)."""
    transport = request.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = str(peername[0])
        return f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
    return str(request.remote)


async def serve(
    host: str,
    port: int,
    on_link: OnLink,
    *,
    path: str = DEFAULT_PATH,
    max_frame: int = MAX_FRAME,
    heartbeat: float | None = DEFAULT_HEARTBEAT_S,
    receive_timeout: float | None = DEFAULT_RECEIVE_TIMEOUT_S,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S,
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
    max_connections_per_address: int | None = None,
    handshake_messages: int = HANDSHAKE_MESSAGES,
    max_handshake_message: int = MAX_HANDSHAKE_MESSAGE,
    known: Container[str] | None = None,
) -> WsServer:
    """Listen on ``host:port`` (0 picks a free port: see ``server.port``/``server.url``).

    Each accepted WebSocket becomes a ``WebSocketLink`` handed to ``await on_link(link)``,
    which owns it until it returns; the link is closed afterwards. Errors raised by
    ``on_link`` are logged, never propagated: one bad peer does not stop the server.

    ``max_connections_per_address`` None: ``max_connections // 8`` (at least 1), or no
    cap when ``max_connections`` is None. ``handshake_messages``: how many of a client's
    first messages are capped at ``max_handshake_message`` bytes (the flights of a secure
    channel's handshake); 0 for links that carry something else. ``known``: the
    ``address_key`` of addresses rostered peers recently authenticated from (the gate's
    ``Gatekeeper.known``); connections from anywhere else hold at most three quarters of
    ``max_connections`` together.
    """
    _check_options(max_frame, heartbeat, receive_timeout)
    if idle_timeout <= 0:
        raise ValueError(f"idle_timeout must be > 0, got {idle_timeout}")
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    if max_connections_per_address is None and max_connections is not None:
        max_connections_per_address = max(1, max_connections // CONNECTION_SHARE_PER_ADDRESS)
    if max_connections_per_address is not None and max_connections_per_address < 1:
        raise ValueError(
            f"max_connections_per_address must be >= 1, got {max_connections_per_address}"
        )
    if handshake_messages < 0 or max_handshake_message < 0:
        raise ValueError("handshake_messages and max_handshake_message must be >= 0")
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {path!r}")
    server = WsServer(
        on_link,
        path=path,
        max_frame=max_frame,
        heartbeat=heartbeat,
        receive_timeout=receive_timeout,
        idle_timeout=idle_timeout,
        close_timeout=close_timeout,
        max_connections=max_connections,
        max_connections_per_address=max_connections_per_address,
        handshake_messages=handshake_messages,
        max_handshake_message=max_handshake_message,
        known=known,
    )
    await server.start(host, port)
    return server


def _check_options(max_frame: int, heartbeat: float | None, receive_timeout: float | None) -> None:
    if max_frame < 1:
        raise ValueError(f"max_frame must be >= 1, got {max_frame}")
    if heartbeat is not None and heartbeat <= 0:
        raise ValueError(f"heartbeat must be > 0 or None, got {heartbeat}")
    if receive_timeout is not None and receive_timeout <= 0:
        raise ValueError(f"receive_timeout must be > 0 or None, got {receive_timeout}")
    if heartbeat is not None and receive_timeout is not None and receive_timeout <= heartbeat:
        raise ValueError(
            f"receive_timeout ({receive_timeout}) must exceed heartbeat ({heartbeat}): "
            "an idle link only receives pongs"
        )
