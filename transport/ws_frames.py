"""A sans-I/O WebSocket frame parser (RFC 6455 §5) for the receiving end of a link.

Why fedloom parses frames itself: a secure link moves model-sized messages as 1 MiB
records, and aiohttp's reader handles each masked frame's payload five times (it slices
every socket read, joins the slices, copies the join into a bytearray, unmasks it in
place and copies it once more into ``bytes``): about 44 ms of CPU per 100 MB on the
machines the project measures on, as much as the network itself. Here a frame's payload
is written once: each socket read is unmasked straight into one frame-sized buffer with
a single vectorised XOR (``numpy.bitwise_xor``), and a large frame is handed on as a
``memoryview`` of that buffer, never copied again.

Everything else follows RFC 6455 and behaves like aiohttp's reader, so the links above
see the same messages and the same close codes (``tests/transport/test_ws_frames.py``
checks the two parsers against each other on arbitrary frame streams):

* reserved bits set, an unknown opcode, a fragmented or oversize (> 125 bytes) control
  frame, a continuation without a message, or a new message inside a fragmented one:
  ``PROTOCOL_ERROR`` (1002);
* a data message above ``max_message`` bytes: ``MESSAGE_TOO_BIG`` (1009), decided from
  the frame header, before any of its payload is buffered;
* a close frame with a one-byte body or a code not allowed on the wire: 1002; a close
  reason that is not UTF-8: ``INVALID_TEXT`` (1007).

Some differences are deliberate (``DELIBERATE_DIFFERENCES`` in the tests lists them):

* a server MUST fail a connection whose client sends an unmasked frame (RFC 6455 §5.1):
  aiohttp's reader accepts it, this parser answers 1002;
* close code 1006 is for local use only (§7.4.1), and §7.4 defines nothing from 5000
  on: aiohttp accepts both on the wire, this parser answers 1002;
* a 64-bit payload length whose most significant bit is set breaks §5.2 (that bit MUST
  be 0): 1002 here, where aiohttp answers 1009.

And two limits bound what an unauthenticated peer can make a server hold (every link
is unauthenticated until its handshake ends). The fragments of a message are unmasked
into one growing buffer, never larger than ``max_message``, so the memory a parser holds
is at most ``max_message`` bytes of message (half as much again for the moment the
buffer grows) plus one frame header and the repeated masking key, however the message
is cut. Fragmenting is legal (§5.4) but no fedloom
peer does it, so this parser refuses, with ``POLICY_VIOLATION`` (1008: a local policy,
not an RFC rule; aiohttp accepts both): an empty non-final data frame, which would cost
a header's parsing and add nothing, so that a stream of them could run for ever without
ever completing a message; and more than ``max_fragments`` non-final frames in one
message, which bounds the work one message can ask for. A server can also cap its
peer's first messages lower (``opening_messages``, ``max_opening_message``): a client
of a secure channel sends its handshake flights first, so nothing larger has a use
before its peer could have authenticated, and a data message above that cap fails the
connection with 1009 as any oversize message does.

The parser never raises on bad input: ``feed`` returns the messages completed before
the first error and records the error in ``error``; the parser then ignores its input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np

__all__ = [
    "CloseCode",
    "FrameParser",
    "FramingError",
    "Message",
    "Opcode",
    "apply_mask",
    "mask_pattern",
    "masked_frame",
]


class Opcode(IntEnum):
    """Frame opcodes (RFC 6455 §5.2); the values aiohttp's ``WSMsgType`` uses too."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    """The close codes this parser fails a connection with (RFC 6455 §7.4.1)."""

    PROTOCOL_ERROR = 1002
    INVALID_TEXT = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009


# Close codes below 3000 that may appear on the wire (1005, 1006 and 1015 are reserved
# for local use and 1004 is unassigned); 3000-4999 belong to applications and libraries,
# and nothing is defined from 5000 on.
_ALLOWED_WIRE_CLOSE_CODES: Final = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)
_LAST_CLOSE_CODE: Final = 4999
_LENGTH_64_MSB: Final = 1 << 63  # must be 0 (RFC 6455 §5.2)
_CLOSE_CODE = struct.Struct("!H")
_LENGTH_16 = struct.Struct("!H")
_LENGTH_64 = struct.Struct("!Q")
_MASKED_HEAD_16 = struct.Struct("!BBH")
_MASKED_HEAD_64 = struct.Struct("!BBQ")
_DATA_OPCODES: Final = frozenset({Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY})

# Payloads from this size on are handed on as views of their buffer; smaller ones (every
# handshake message, control frame and stream header) as ``bytes``, which every
# consumer handles and which costs nothing to copy at that size.
VIEW_FROM_BYTES: Final = 64 * 1024
# The repeated mask is built once per frame for at most this many bytes (it stays in
# the CPU cache); longer socket reads are unmasked in slices of this size.
_UNMASK_SLICE: Final = 256 * 1024
# Non-final frames allowed in one message (fedloom peers send none; a proxy that cuts
# a 1 MiB record into 1 KiB frames still fits).
DEFAULT_MAX_FRAGMENTS: Final = 1024
# A fragmented message's buffer starts at this size (or its first fragment's) and
# doubles as fragments arrive, up to the message cap.
_FIRST_MESSAGE_BUFFER: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class FramingError:
    """Why the connection must be failed: the close code to send and a reason."""

    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class Message:
    """A complete message: the data of a TEXT or BINARY message (its fragments joined),
    the payload of a PING or PONG, or a CLOSE frame's ``close_code`` (0 when the frame
    had no body) and ``reason``."""

    opcode: Opcode
    data: bytes | memoryview
    close_code: int = 0
    reason: str = ""


class _FramingFailureError(Exception):
    def __init__(self, error: FramingError) -> None:
        super().__init__(error.reason)
        self.error = error


def _fail(code: CloseCode, reason: str) -> _FramingFailureError:
    return _FramingFailureError(FramingError(code, reason))


class FrameParser:
    """Turns the bytes of one WebSocket connection into ``Message`` values.

    States: reading a frame header (``_head`` collects up to 14 bytes: 2, then the
    extended length, then the masking key), reading a payload into ``_payload``, or
    failed (``error`` set; all further input is ignored).

    The first ``opening_messages`` data messages may be at most ``max_opening_message``
    bytes each (never more than ``max_message``); the later ones ``max_message``.
    """

    def __init__(
        self,
        max_message: int,
        *,
        require_mask: bool = True,
        max_fragments: int = DEFAULT_MAX_FRAGMENTS,
        opening_messages: int = 0,
        max_opening_message: int = 0,
    ) -> None:
        for name, value in (
            ("max_message", max_message),
            ("max_fragments", max_fragments),
            ("opening_messages", opening_messages),
            ("max_opening_message", max_opening_message),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.max_message = max_message
        self.require_mask = require_mask
        self.max_fragments = max_fragments
        self.opening_messages = opening_messages
        self.max_opening_message = min(max_opening_message, max_message)
        self.data_messages = 0  # data messages completed so far
        self.error: FramingError | None = None
        # Where in the failing ``feed``'s data the refused frame begins (its header, if
        # refused there); the bytes before it parsed as valid frames.
        self.error_at = 0
        self._head = bytearray()
        self._head_size = 2
        # The frame whose payload is being read.
        self._opcode = Opcode.CONTINUATION
        self._fin = True
        self._payload: np.ndarray | None = None
        self._filled = 0
        self._mask_pattern: np.ndarray | None = None  # the masking key, repeated
        # The payload offset ``read_into`` last handed out (-1: none since the last feed).
        self._into = -1
        # A fragmented data message in progress (opcode CONTINUATION: none): its bytes
        # so far are _message[:_message_size], from _fragments non-final frames.
        self._message_opcode = Opcode.CONTINUATION
        self._message: np.ndarray | None = None
        self._message_size = 0
        self._fragments = 0

    def read_into(self) -> memoryview | None:
        """Where the next bytes received belong when they are a payload's: a writable
        view of the rest of the current frame's payload buffer (None between payloads,
        where a header comes next, and after an error).

        A connection may receive straight into it (``asyncio.BufferedProtocol``), then
        pass the bytes it received to ``feed`` as a view of that buffer: ``feed`` finds
        them already in place and only unmasks them there, instead of copying them from
        a read buffer. The view never reaches past this frame (whose size passed the
        caps at its header), and anything else given to ``feed`` is parsed as always.
        """
        payload = self._payload
        if payload is None or self.error is not None:
            self._into = -1
            return None
        self._into = self._filled
        return payload[self._filled :].data

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Parse ``data`` (the next bytes received) and return the messages it completed.

        On a protocol violation the messages completed before it are still returned,
        ``error`` says why the connection must be failed, and later calls return [].
        """
        if self.error is not None:
            return []
        try:
            return self._feed(data)
        finally:
            self._into = -1

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        messages: list[Message] = []
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        try:
            while pos < end:
                if self._payload is None:
                    take = min(self._head_size - len(self._head), end - pos)
                    self._head += view[pos : pos + take]
                    pos += take
                    if len(self._head) == self._head_size:
                        self._parse_head(messages)
                else:
                    take = min(len(self._payload) - self._filled, end - pos)
                    self._write_payload(view[pos : pos + take])
                    pos += take
                    if self._filled == len(self._payload):
                        self._end_frame(messages)
        except _FramingFailureError as failed:
            self.error = failed.error
            self.error_at = max(0, pos - len(self._head))
            self._payload = self._message = None  # nothing more will be read into them
        return messages

    def _parse_head(self, messages: list[Message]) -> None:
        head = self._head
        if self._head_size == 2:
            self._check_first_bytes(head[0], head[1])
            length_flag = head[1] & 0x7F
            extended = 2 if length_flag == 126 else 8 if length_flag == 127 else 0
            self._head_size = 2 + extended + (4 if head[1] & 0x80 else 0)
            if self._head_size > 2:
                return  # read the extended length and masking key first
        length = head[1] & 0x7F
        at = 2
        if length == 126:
            length = _LENGTH_16.unpack_from(head, 2)[0]
            at = 4
        elif length == 127:
            length = _LENGTH_64.unpack_from(head, 2)[0]
            at = 10
            if length & _LENGTH_64_MSB:
                raise _fail(CloseCode.PROTOCOL_ERROR, "64-bit payload length with its MSB set")
        masked = bool(head[1] & 0x80)
        data = self._opcode in _DATA_OPCODES
        if data and length > self._cap() - self._message_size:
            raise _fail(
                CloseCode.MESSAGE_TOO_BIG,
                f"Message size {length + self._message_size} exceeds limit {self._cap()}",
            )
        self._check_sequence()
        self._mask_pattern = mask_pattern(bytes(head[at : at + 4]), length) if masked else None
        self._head.clear()
        self._head_size = 2
        if data and (not self._fin or self._opcode is Opcode.CONTINUATION):
            self._payload = self._fragment_target(length)
        else:
            # np.empty, not bytearray: every byte is written before it is read.
            self._payload = np.empty(length, dtype=np.uint8)
        self._filled = 0
        if length == 0:
            self._end_frame(messages)

    def _cap(self) -> int:
        """The most bytes the data message being read may have."""
        if self.data_messages < self.opening_messages:
            return self.max_opening_message
        return self.max_message

    def _fragment_target(self, length: int) -> np.ndarray:
        """Where a fragment's payload goes: the next ``length`` bytes of the message
        buffer, grown (at most to the message cap) if need be."""
        if not self._fin:
            if length == 0:
                raise _fail(CloseCode.POLICY_VIOLATION, "Empty non-final data frame")
            if self._fragments >= self.max_fragments:
                raise _fail(
                    CloseCode.POLICY_VIOLATION,
                    f"More than {self.max_fragments} fragments in one message",
                )
        start, stop = self._message_size, self._message_size + length
        buffer = self._message
        if buffer is None or len(buffer) < stop:
            capacity = max(stop, _FIRST_MESSAGE_BUFFER, 2 * (0 if buffer is None else len(buffer)))
            grown = np.empty(min(capacity, self._cap()), dtype=np.uint8)
            if buffer is not None:
                grown[:start] = buffer[:start]
            self._message = buffer = grown
        return buffer[start:stop]

    def _check_first_bytes(self, first: int, second: int) -> None:
        if first & 0x70:
            raise _fail(CloseCode.PROTOCOL_ERROR, "Received frame with non-zero reserved bits")
        try:
            opcode = Opcode(first & 0x0F)
        except ValueError:
            raise _fail(CloseCode.PROTOCOL_ERROR, f"Unexpected opcode={first & 0x0F}") from None
        fin = bool(first & 0x80)
        if opcode >= Opcode.CLOSE:
            if not fin:
                raise _fail(CloseCode.PROTOCOL_ERROR, "Received fragmented control frame")
            if second & 0x7F > 125:
                raise _fail(
                    CloseCode.PROTOCOL_ERROR,
                    "Control frame payload cannot be larger than 125 bytes",
                )
        if self.require_mask and not second & 0x80:
            raise _fail(CloseCode.PROTOCOL_ERROR, "Received an unmasked frame from a client")
        self._opcode, self._fin = opcode, fin

    def _check_sequence(self) -> None:
        # After the size check, as aiohttp orders them: the same stream gets the same code.
        if self._opcode is Opcode.CONTINUATION:
            if self._message_opcode is Opcode.CONTINUATION:
                raise _fail(CloseCode.PROTOCOL_ERROR, "Continuation frame for non started message")
        elif self._opcode in _DATA_OPCODES and self._message_opcode is not Opcode.CONTINUATION:
            raise _fail(
                CloseCode.PROTOCOL_ERROR,
                f"The opcode in non-fin frame is expected to be zero, got {self._opcode!r}",
            )

    def _write_payload(self, piece: memoryview) -> None:
        assert self._payload is not None
        at, size = self._filled, len(piece)
        target = self._payload[at : at + size]
        source = np.frombuffer(piece, dtype=np.uint8)
        if at == self._into and source.ctypes.data == target.ctypes.data:
            # Received straight into place (``read_into``): only the mask is left to undo.
            if self._mask_pattern is not None:
                apply_mask(target, self._mask_pattern, at, target)
        elif self._mask_pattern is None:
            target[:] = source
        else:
            apply_mask(source, self._mask_pattern, at, target)
        self._filled = at + size

    def _end_frame(self, messages: list[Message]) -> None:
        payload, self._payload, self._mask_pattern = self._payload, None, None
        assert payload is not None
        opcode = self._opcode
        if opcode >= Opcode.CLOSE:
            messages.append(_control_message(opcode, payload.tobytes()))
            return
        if not self._fin:
            if opcode is not Opcode.CONTINUATION:
                self._message_opcode = opcode
            self._message_size += len(payload)  # written in place into _message
            self._fragments += 1
            return
        if opcode is Opcode.CONTINUATION:
            opcode, self._message_opcode = self._message_opcode, Opcode.CONTINUATION
            assert self._message is not None
            payload = self._message[: self._message_size + len(payload)]
            self._message, self._message_size, self._fragments = None, 0, 0
        data = payload.data if len(payload) >= VIEW_FROM_BYTES else payload.tobytes()
        self.data_messages += 1
        messages.append(Message(opcode, data))


def mask_pattern(key: bytes, payload_size: int) -> np.ndarray:
    """The 4-byte masking ``key`` repeated, as ``apply_mask`` needs it for a payload of
    ``payload_size`` bytes (at most one slice long: it stays in the CPU cache)."""
    size = min(payload_size, _UNMASK_SLICE) + 3  # + the largest phase
    return np.frombuffer(key * (size // 4 + 1), dtype=np.uint8)


def apply_mask(source: np.ndarray, pattern: np.ndarray, offset: int, out: np.ndarray) -> None:
    """Write ``source``, the payload bytes from ``offset`` on, masked or unmasked (the
    same XOR) into ``out``: byte i of a payload is XORed with key byte i % 4 (RFC 6455
    §5.3). One vectorised pass, which is also the copy."""
    for start in range(0, len(source), _UNMASK_SLICE):
        stop = min(start + _UNMASK_SLICE, len(source))
        phase = (offset + start) % 4
        np.bitwise_xor(
            source[start:stop], pattern[phase : phase + stop - start], out=out[start:stop]
        )


def masked_frame(first_byte: int, payload: np.ndarray, key: bytes) -> np.ndarray:
    """One client frame (RFC 6455 §5.2): header, the 4-byte masking ``key``, and
    ``payload`` (uint8) masked in the same pass that copies it into the frame."""
    size = payload.size
    if size < 126:
        header = bytes((first_byte, 0x80 | size))
    elif size < 1 << 16:
        header = _MASKED_HEAD_16.pack(first_byte, 0x80 | 126, size)
    else:
        header = _MASKED_HEAD_64.pack(first_byte, 0x80 | 127, size)
    start = len(header) + 4
    frame = np.empty(start + size, dtype=np.uint8)
    frame[:start] = np.frombuffer(header + key, dtype=np.uint8)
    apply_mask(payload, mask_pattern(key, size), 0, frame[start:])
    return frame


def _control_message(opcode: Opcode, payload: bytes) -> Message:
    if opcode is not Opcode.CLOSE or not payload:
        return Message(opcode, payload)
    if len(payload) == 1:
        raise _fail(CloseCode.PROTOCOL_ERROR, f"Invalid close frame: {payload!r}")
    code = _CLOSE_CODE.unpack_from(payload)[0]
    if code > _LAST_CLOSE_CODE or (code < 3000 and code not in _ALLOWED_WIRE_CLOSE_CODES):
        raise _fail(CloseCode.PROTOCOL_ERROR, f"Invalid close code: {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(CloseCode.INVALID_TEXT, "Invalid UTF-8 text message") from None
    return Message(opcode, payload, close_code=code, reason=reason)
