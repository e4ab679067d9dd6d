"""fedloom's WebSocket frame parser (``transport.ws_frames``): RFC 6455 framing, chunking
invariance, agreement with aiohttp's own reader, and its use by the server (loopback only).

Frames are built here byte by byte, and masked with a big-integer XOR rather than numpy,
so the expected payloads do not share code with the parser under test.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import struct
import tracemalloc
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import aiohttp
import pytest
from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
from aiohttp.base_protocol import BaseProtocol
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from fedloom.transport import ws
from fedloom.transport.errors import ProtocolError
from fedloom.transport.ws_frames import (
    DEFAULT_MAX_FRAGMENTS,
    VIEW_FROM_BYTES,
    CloseCode,
    FrameParser,
    Message,
    Opcode,
)
from tests.transport.link_pairs import echo_server

TIMEOUT_S = 10.0
KEY = b"\x37\xfa\x21\x3d"
CONT, TEXT, BINARY = Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY
CLOSE, PING, PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG

# A message as both parsers are compared: (opcode, payload, "") for data, PING and PONG;
# (CLOSE, close code, reason) for a close frame.
Normal: TypeAlias = tuple[int, "bytes | int", str]


# --- building frames -------------------------------------------------------------------


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``key`` (RFC 6455 §5.3); also unmasks."""
    n = len(payload)
    if n == 0:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    key: bytes | None = KEY,
    rsv: int = 0,
    declared: int | None = None,
    width: int | None = None,
) -> bytes:
    """One frame as a client sends it (masked unless ``key`` is None). ``declared`` puts
    another length in the header than ``len(payload)``; ``width`` (7, 16 or 64) forces a
    length encoding instead of the shortest one."""
    length = len(payload) if declared is None else declared
    if width is None:
        width = 7 if length < 126 else 16 if length < 1 << 16 else 64
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if key is not None else 0
    if width == 7:
        head = bytes([first, mask_bit | length])
    elif width == 16:
        head = bytes([first, mask_bit | 126]) + struct.pack("!H", length)
    else:
        head = bytes([first, mask_bit | 127]) + struct.pack("!Q", length)
    if key is None:
        return head + payload
    return head + key + mask(payload, key)


def close_body(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def noise(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def normal(message: Message) -> Normal:
    if message.opcode is CLOSE:
        return (int(CLOSE), message.close_code, message.reason)
    return (int(message.opcode), bytes(message.data), "")


def parse(stream: bytes, max_message: int = 1 << 20, **options: Any) -> FrameParser:
    """A parser that was fed ``stream`` whole and returned no message (error cases)."""
    parser = FrameParser(max_message, **options)
    assert parser.feed(stream) == []
    return parser


# --- unit tests: payloads --------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "width"),
    [
        (0, 7),
        (1, 7),
        (125, 7),  # the largest 7-bit length
        (126, 16),  # the smallest 16-bit length
        (65_535, 16),  # the largest 16-bit length
        (65_536, 64),  # the smallest 64-bit length
        (300_001, 64),  # above the parser's 256 KiB unmasking slice, not a multiple of 4
    ],
)
def test_masked_binary_frame_of_each_length_encoding(size: int, width: int) -> None:
    payload = noise(size, seed=size)
    data = frame(BINARY, payload)
    extended = {7: 0, 16: 2, 64: 8}[width]
    assert len(data) == 2 + extended + 4 + size  # the encoding this case is about
    [message] = FrameParser(1 << 20).feed(data)
    assert message.opcode is BINARY
    assert bytes(message.data) == payload


@pytest.mark.parametrize("size", [0, 125, VIEW_FROM_BYTES - 1, VIEW_FROM_BYTES, 300_001])
def test_large_payloads_are_views_small_ones_bytes(size: int) -> None:
    payload = noise(size, seed=size)
    [message] = FrameParser(1 << 20).feed(frame(BINARY, payload))
    assert type(message.data) is (memoryview if size >= VIEW_FROM_BYTES else bytes)
    assert bytes(message.data) == payload
    if isinstance(message.data, memoryview):
        assert message.data.format == "B" and message.data.nbytes == size


def test_views_are_not_overwritten_by_later_frames() -> None:
    parser = FrameParser(1 << 20)
    first, second = noise(VIEW_FROM_BYTES, 21), noise(VIEW_FROM_BYTES, 22)
    [one] = parser.feed(frame(BINARY, first))
    [two] = parser.feed(frame(BINARY, second, fin=False) + frame(CONT, b"!"))
    # Each message owns its buffer: the consumer may keep a view as long as it likes.
    assert bytes(one.data) == first and bytes(two.data) == second + b"!"


def test_text_frame_is_returned_undecoded() -> None:
    [message] = FrameParser(100).feed(frame(TEXT, "héllo".encode()))
    assert message == Message(TEXT, "héllo".encode())


@pytest.mark.parametrize("opcode", [BINARY, TEXT])
def test_empty_data_frame(opcode: Opcode) -> None:
    assert FrameParser(0).feed(frame(opcode)) == [Message(opcode, b"")]


def test_fragmented_message_with_interleaved_ping_delivers_the_ping_first() -> None:
    parser = FrameParser(1 << 20)
    # Together, not alone, the fragments reach VIEW_FROM_BYTES.
    third = noise(VIEW_FROM_BYTES // 4, 3)
    first, second = noise(VIEW_FROM_BYTES // 2, 1), noise(VIEW_FROM_BYTES // 4, 2)
    stream = (
        frame(BINARY, first, fin=False, key=b"\x01\x02\x03\x04")
        + frame(PING, b"are you there?", key=b"\xff\x00\xff\x00")
        + frame(CONT, second, fin=False, key=b"\xaa\xbb\xcc\xdd")
        + frame(PONG, b"", key=b"\x00\x00\x00\x01")
        + frame(CONT, third, key=b"\x10\x20\x30\x40")
    )
    messages = parser.feed(stream)
    assert [normal(m) for m in messages] == [
        (PING, b"are you there?", ""),
        (PONG, b"", ""),
        (BINARY, first + second + third, ""),
    ]
    assert isinstance(messages[-1].data, memoryview)
    assert parser.error is None


def test_fragmented_text_message_ending_with_an_empty_fragment() -> None:
    stream = frame(TEXT, b"a", fin=False) + frame(CONT, b"bc", fin=False) + frame(CONT, b"")
    assert FrameParser(3).feed(stream) == [Message(TEXT, b"abc")]


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(frame(BINARY, b"", fin=False) + frame(CONT, b"x"), id="empty-first"),
        pytest.param(
            frame(TEXT, b"ab", fin=False) + frame(CONT, b"", fin=False) + frame(CONT, b"c"),
            id="empty-continuation",
        ),
        pytest.param(
            frame(BINARY, b"", fin=False) + frame(CONT, b"", fin=False) + frame(TEXT, b"v"),
            id="empty-then-new-message",
        ),
    ],
)
def test_empty_non_final_data_frame_is_a_policy_violation(stream: bytes) -> None:
    parser = parse(stream)
    assert parser.error is not None and parser.error.code == POLICY


def test_fragmented_message_across_feeds() -> None:
    parser = FrameParser(1 << 20)
    assert parser.feed(frame(BINARY, b"abc", fin=False)) == []
    assert parser.feed(frame(CONT, b"def", fin=False)) == []
    assert parser.feed(frame(CONT, b"g")) == [Message(BINARY, b"abcdefg")]
    # The message is over: the next one starts afresh.
    assert parser.feed(frame(TEXT, b"h")) == [Message(TEXT, b"h")]


@pytest.mark.parametrize("opcode", [PING, PONG])
@pytest.mark.parametrize("payload", [b"", b"x", noise(125, 7)])
def test_ping_and_pong_payloads(opcode: Opcode, payload: bytes) -> None:
    # Control frames are not data: max_message does not apply to them.
    assert FrameParser(0).feed(frame(opcode, payload)) == [Message(opcode, payload)]


def test_close_without_body() -> None:
    [message] = FrameParser(100).feed(frame(CLOSE))
    assert (message.opcode, message.close_code, message.reason) == (CLOSE, 0, "")


def test_close_with_code_and_utf8_reason() -> None:
    reason = "au revoir ✓ 🜁"
    body = close_body(1001, reason.encode())
    [message] = FrameParser(0).feed(frame(CLOSE, body))
    assert (message.opcode, message.close_code, message.reason) == (CLOSE, 1001, reason)
    assert bytes(message.data) == body


def test_close_reason_of_123_bytes() -> None:
    # 2 + 123 = 125, the largest control payload.
    [message] = FrameParser(0).feed(frame(CLOSE, close_body(3000, b"r" * 123)))
    assert message.reason == "r" * 123


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 3999, 4000, 4999])
def test_allowed_close_codes(code: int) -> None:
    parser = FrameParser(100)
    [message] = parser.feed(frame(CLOSE, close_body(code, b"ok")))
    assert (message.close_code, message.reason) == (code, "ok")
    assert parser.error is None


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 5001, 65_535]
)
def test_disallowed_close_codes_are_protocol_errors(code: int) -> None:
    parser = parse(frame(CLOSE, close_body(code)))
    assert parser.error is not None
    assert parser.error.code == CloseCode.PROTOCOL_ERROR


def test_unmasked_frames_accepted_when_masking_is_not_required() -> None:
    payload = noise(70_000, 9)
    stream = (
        frame(BINARY, b"a", key=None)
        + frame(TEXT, b"bc", fin=False, key=None)
        + frame(PING, b"p", key=None)
        + frame(CONT, b"d", key=None)
        + frame(BINARY, payload, key=None)
        + frame(BINARY, b"e")  # a masked frame is still fine
    )
    parser = FrameParser(1 << 20, require_mask=False)
    assert [normal(m) for m in parser.feed(stream)] == [
        (BINARY, b"a", ""),
        (PING, b"p", ""),
        (TEXT, b"bcd", ""),
        (BINARY, payload, ""),
        (BINARY, b"e", ""),
    ]
    assert parser.error is None


def test_max_message_is_inclusive() -> None:
    parser = FrameParser(10)
    assert parser.feed(frame(BINARY, b"x" * 10)) == [Message(BINARY, b"x" * 10)]
    assert parser.feed(frame(BINARY, b"x" * 6, fin=False) + frame(CONT, b"y" * 4)) == [
        Message(BINARY, b"x" * 6 + b"y" * 4)
    ]
    assert parser.error is None


def test_negative_max_message_is_refused() -> None:
    with pytest.raises(ValueError):
        FrameParser(-1)


# --- unit tests: errors ----------------------------------------------------------------

PROTOCOL_ERROR, INVALID_TEXT, POLICY, TOO_BIG = (
    CloseCode.PROTOCOL_ERROR,
    CloseCode.INVALID_TEXT,
    CloseCode.POLICY_VIOLATION,
    CloseCode.MESSAGE_TOO_BIG,
)

# (stream, max_message, expected close code): each stream is refused before it
# completes any message. Shared with the comparison with aiohttp below.
ERROR_CASES: dict[str, tuple[bytes, int, CloseCode]] = {
    "rsv1": (frame(BINARY, b"x", rsv=0b100), 100, PROTOCOL_ERROR),
    "rsv2": (frame(BINARY, b"x", rsv=0b010), 100, PROTOCOL_ERROR),
    "rsv3 on ping": (frame(PING, b"x", rsv=0b001), 100, PROTOCOL_ERROR),
    "opcode 3": (frame(3, b"x"), 100, PROTOCOL_ERROR),
    "opcode 7": (frame(7), 100, PROTOCOL_ERROR),
    "opcode 0xB": (frame(0xB, b"x"), 100, PROTOCOL_ERROR),
    "opcode 0xF": (frame(0xF), 100, PROTOCOL_ERROR),
    "fragmented ping": (frame(PING, b"x", fin=False), 100, PROTOCOL_ERROR),
    "fragmented close": (frame(CLOSE, close_body(1000), fin=False), 100, PROTOCOL_ERROR),
    "ping of 126 bytes": (frame(PING, b"p" * 126), 1000, PROTOCOL_ERROR),
    "pong of 200 bytes": (frame(PONG, b"p" * 200), 1000, PROTOCOL_ERROR),
    "close of 126 bytes": (frame(CLOSE, close_body(1000, b"r" * 124)), 1000, PROTOCOL_ERROR),
    "continuation without message": (frame(CONT, b"x"), 100, PROTOCOL_ERROR),
    "final continuation without message": (frame(CONT, b"x", fin=False), 100, PROTOCOL_ERROR),
    "new text inside fragmented message": (
        frame(BINARY, b"a", fin=False) + frame(TEXT, b"b"),
        100,
        PROTOCOL_ERROR,
    ),
    "new non-final binary inside fragmented message": (
        frame(TEXT, b"a", fin=False) + frame(BINARY, b"b", fin=False),
        100,
        PROTOCOL_ERROR,
    ),
    "empty new message inside fragmented message": (
        frame(BINARY, b"a", fin=False) + frame(BINARY),
        100,
        PROTOCOL_ERROR,
    ),
    "message above max_message": (frame(BINARY, b"x" * 101), 100, TOO_BIG),
    "16-bit length above max_message": (frame(TEXT, b"x" * 300), 299, TOO_BIG),
    "any data above max_message 0": (frame(BINARY, b"x"), 0, TOO_BIG),
    "fragments above max_message": (
        frame(BINARY, b"x" * 60, fin=False)
        + frame(CONT, b"y" * 30, fin=False)
        + frame(CONT, b"z" * 11),
        100,
        TOO_BIG,
    ),
    "one-byte close body": (frame(CLOSE, b"\x03"), 100, PROTOCOL_ERROR),
    "close code 1004": (frame(CLOSE, close_body(1004)), 100, PROTOCOL_ERROR),
    "close code 2999": (frame(CLOSE, close_body(2999, b"x")), 100, PROTOCOL_ERROR),
    "close reason not UTF-8": (frame(CLOSE, close_body(1000, b"ok\xff")), 100, INVALID_TEXT),
    "close reason truncated UTF-8": (
        frame(CLOSE, close_body(4000, "✓".encode()[:2])),
        100,
        INVALID_TEXT,
    ),
    "close reason surrogate": (frame(CLOSE, close_body(1000, b"\xed\xa0\x80")), 100, INVALID_TEXT),
}


def many_fragments(count: int) -> bytes:
    """A message of ``count`` one-byte non-final frames and an empty final one."""
    return frame(BINARY, b"x", fin=False) + frame(CONT, b"x", fin=False) * (count - 1) + frame(CONT)


# Refused by fedloom's parser on purpose (module docstring): the stream, max_message,
# fedloom's close code, and aiohttp's answer to the same stream (None: it accepts it).
DELIBERATE_DIFFERENCES: dict[str, tuple[bytes, int, CloseCode, CloseCode | None]] = {
    "unmasked frame": (frame(BINARY, b"hello", key=None), 100, PROTOCOL_ERROR, None),
    "unmasked empty ping": (frame(PING, key=None), 100, PROTOCOL_ERROR, None),
    "close code 1006": (frame(CLOSE, close_body(1006)), 100, PROTOCOL_ERROR, None),
    "close code 5000": (frame(CLOSE, close_body(5000, b"x")), 100, PROTOCOL_ERROR, None),
    "close code 65535": (frame(CLOSE, close_body(65_535)), 100, PROTOCOL_ERROR, None),
    "64-bit length with its MSB set": (
        frame(BINARY, declared=1 << 63, width=64),
        100,
        PROTOCOL_ERROR,
        TOO_BIG,
    ),
    "64-bit length 2**64 - 1": (
        frame(TEXT, declared=2**64 - 1, width=64),
        100,
        PROTOCOL_ERROR,
        TOO_BIG,
    ),
    "empty first fragment": (frame(BINARY, b"", fin=False) + frame(CONT, b"x"), 100, POLICY, None),
    "empty continuation": (
        frame(TEXT, b"a", fin=False) + frame(CONT, b"", fin=False) + frame(CONT, b"b"),
        100,
        POLICY,
        None,
    ),
    "one fragment too many": (
        many_fragments(DEFAULT_MAX_FRAGMENTS + 1),
        1 << 20,
        POLICY,
        None,
    ),
}
# Every case of ERROR_CASES and DELIBERATE_DIFFERENCES: stream, max_message, close code.
ALL_ERRORS: dict[str, tuple[bytes, int, CloseCode]] = {
    **ERROR_CASES,
    **{
        case: (stream, cap, code) for case, (stream, cap, code, _) in DELIBERATE_DIFFERENCES.items()
    },
}


@pytest.mark.parametrize("case", ALL_ERRORS)
def test_error(case: str) -> None:
    stream, max_message, code = ALL_ERRORS[case]
    parser = parse(stream, max_message)
    assert parser.error is not None
    assert parser.error.code == code
    assert parser.error.reason


@pytest.mark.parametrize("case", ALL_ERRORS)
def test_error_is_the_same_fed_byte_by_byte(case: str) -> None:
    stream, max_message, code = ALL_ERRORS[case]
    parser = FrameParser(max_message)
    for i in range(len(stream)):
        assert parser.feed(stream[i : i + 1]) == []
    assert parser.error is not None and parser.error.code == code


@pytest.mark.parametrize(
    ("declared", "width"), [(1001, 16), (65_536, 64), (1 << 40, 64), ((1 << 63) - 1, 64)]
)
def test_oversize_message_is_refused_from_its_header(declared: int, width: int) -> None:
    parser = FrameParser(1000)
    header = frame(BINARY, declared=declared, width=width)  # no payload at all
    assert parser.feed(header[:-1]) == []
    assert parser.error is None  # the masking key is still incomplete
    assert parser.feed(header[-1:]) == []
    assert parser.error is not None and parser.error.code == TOO_BIG


@pytest.mark.parametrize("declared", [1 << 63, (1 << 63) + 5, 2**64 - 1])
@pytest.mark.parametrize("opcode", [BINARY, CONT, TEXT])
def test_64_bit_length_with_its_msb_set_is_a_protocol_error(declared: int, opcode: Opcode) -> None:
    # RFC 6455 §5.2: "the most significant bit MUST be 0"; whatever max_message is.
    parser = FrameParser(2**64)
    assert parser.feed(frame(opcode, declared=declared, width=64)) == []
    assert parser.error is not None and parser.error.code == PROTOCOL_ERROR


def test_as_many_fragments_as_allowed_make_a_message() -> None:
    parser = FrameParser(1 << 20)
    [message] = parser.feed(many_fragments(DEFAULT_MAX_FRAGMENTS))
    assert message == Message(BINARY, b"x" * DEFAULT_MAX_FRAGMENTS)
    assert parser.error is None
    # The count starts again with each message.
    assert parser.feed(many_fragments(DEFAULT_MAX_FRAGMENTS)) == [message]


def test_the_fragment_cap_is_a_parameter() -> None:
    assert FrameParser(100, max_fragments=3).feed(many_fragments(3)) == [Message(BINARY, b"xxx")]
    parser = parse(many_fragments(4), 100, max_fragments=3)
    assert parser.error is not None and parser.error.code == POLICY
    with pytest.raises(ValueError):
        FrameParser(100, max_fragments=-1)


def test_a_fragment_flood_is_refused_within_the_cap() -> None:
    # The attack: one message that never ends, in one-byte fragments. The parser fails
    # the connection at the first fragment past the cap, and ignores the rest.
    parser = FrameParser(1 << 20)
    fragment = frame(CONT, b"x", fin=False)
    assert parser.feed(frame(BINARY, b"x", fin=False)) == []
    fed = 1
    while parser.error is None:
        assert parser.feed(fragment) == []
        fed += 1
        assert fed <= DEFAULT_MAX_FRAGMENTS + 1
    assert fed == DEFAULT_MAX_FRAGMENTS + 1
    assert parser.error.code == POLICY
    assert parser.feed(fragment * 1000 + frame(CONT, b"end")) == []


def _held_while_feeding(parser: FrameParser, chunks: Iterable[bytes]) -> int:
    """The most memory (bytes, as tracemalloc counts it, numpy buffers included) that
    was allocated and still held after any one ``feed`` of ``chunks``."""
    most = 0
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for chunk in chunks:
            assert parser.feed(chunk) == []
            most = max(most, tracemalloc.get_traced_memory()[0] - before)
    finally:
        tracemalloc.stop()
    return most


def test_memory_held_for_a_fragmented_message_is_bounded_by_max_message() -> None:
    # The attack: 30,000 one-byte fragments of a message that never ends (210 kB on
    # the wire). One array per fragment held about 100 bytes per byte of payload (3 MB
    # here, 23 times the bound); one growing buffer holds at most max_message, whatever
    # the fragment size.
    max_message = 1 << 16
    parser = FrameParser(max_message, max_fragments=10**9)
    fragments = frame(CONT, b"x", fin=False) * 10_000
    chunks = [frame(BINARY, b"x", fin=False), *[fragments] * 3]
    assert _held_while_feeding(parser, chunks) <= max_message + 64 * 1024
    assert parser.error is None
    [message] = parser.feed(frame(CONT, b"y"))  # and the message is intact
    assert message == Message(BINARY, memoryview(b"x" * 30_001 + b"y"))


def test_a_stream_of_empty_fragments_is_refused_at_the_first() -> None:
    # The attack: empty non-final frames, which used to add nothing to the size count
    # and an array each to the parser's list, for ever.
    parser = FrameParser(1 << 20)
    empties = frame(CONT, b"", fin=False) * 20_000
    flood = [frame(BINARY, b"", fin=False) + empties, empties]
    assert _held_while_feeding(parser, flood) <= 64 * 1024
    assert parser.error is not None and parser.error.code == POLICY


def test_opening_messages_have_their_own_cap() -> None:
    parser = FrameParser(1000, opening_messages=2, max_opening_message=10)
    stream = (
        frame(BINARY, b"a" * 10)
        + frame(PING, b"p")  # control frames do not count
        + frame(BINARY, b"b" * 6, fin=False)
        + frame(CONT, b"c" * 4)
        + frame(BINARY, b"d" * 1000)  # the third message: max_message
    )
    assert [normal(m) for m in parser.feed(stream)] == [
        (BINARY, b"a" * 10, ""),
        (PING, b"p", ""),
        (BINARY, b"b" * 6 + b"c" * 4, ""),
        (BINARY, b"d" * 1000, ""),
    ]
    assert parser.error is None


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(frame(BINARY, b"x" * 11), id="first"),
        pytest.param(frame(BINARY, b"x") + frame(TEXT, b"y" * 11), id="second"),
        pytest.param(frame(BINARY, b"x" * 6, fin=False) + frame(CONT, b"y" * 5), id="fragments"),
        pytest.param(frame(BINARY, declared=1000), id="header-only"),
    ],
)
def test_an_opening_message_above_its_cap_is_too_big(stream: bytes) -> None:
    parser = FrameParser(1000, opening_messages=2, max_opening_message=10)
    feed_all(parser, [stream])
    assert parser.error is not None and parser.error.code == TOO_BIG
    assert "limit 10" in parser.error.reason


def test_memory_held_before_the_opening_messages_end_is_bounded_by_their_cap() -> None:
    # A fragmented opening message grows its buffer up to the opening cap, not to
    # max_message (nor to the usual first buffer of 64 KiB).
    parser = FrameParser(1 << 20, opening_messages=2, max_opening_message=4096, max_fragments=10**9)
    chunks = [frame(BINARY, b"x", fin=False), frame(CONT, b"x", fin=False) * 4095]
    assert _held_while_feeding(parser, chunks) <= 4096 + 8 * 1024
    assert parser.feed(frame(CONT, b"x")) == []
    assert parser.error is not None and parser.error.code == TOO_BIG


def test_oversize_continuation_is_refused_from_its_header() -> None:
    parser = FrameParser(1000)
    assert parser.feed(frame(BINARY, b"x" * 600, fin=False)) == []
    assert parser.feed(frame(CONT, declared=401)) == []  # header and mask key only
    assert parser.error is not None and parser.error.code == TOO_BIG


def test_messages_before_an_error_are_returned_and_later_input_ignored() -> None:
    parser = FrameParser(1 << 20)
    big = noise(VIEW_FROM_BYTES + 5, 4)
    before = frame(BINARY, b"one") + frame(PING, b"p") + frame(BINARY, big)
    bad = frame(BINARY, b"x", rsv=0b100)
    after = frame(BINARY, b"never")
    messages = parser.feed(before + bad + after)
    assert [normal(m) for m in messages] == [
        (BINARY, b"one", ""),
        (PING, b"p", ""),
        (BINARY, big, ""),
    ]
    assert parser.error is not None and parser.error.code == PROTOCOL_ERROR
    error = parser.error
    # Once failed, the parser ignores everything, valid frames included.
    assert parser.feed(frame(BINARY, b"valid")) == []
    assert parser.feed(b"") == []
    assert parser.feed(frame(CLOSE, close_body(1000))) == []
    assert parser.error is error


def test_error_in_a_later_feed_keeps_earlier_messages() -> None:
    parser = FrameParser(100)
    assert parser.feed(frame(BINARY, b"ok") + frame(CLOSE, b"\x03")[:3]) == [Message(BINARY, b"ok")]
    assert parser.error is None
    assert parser.feed(frame(CLOSE, b"\x03")[3:] + frame(BINARY, b"later")) == []
    assert parser.error is not None and parser.error.code == PROTOCOL_ERROR


# --- generated streams -----------------------------------------------------------------

# Lengths around each encoding boundary, VIEW_FROM_BYTES and the unmasking slice.
BOUNDARY_LENGTHS = (
    *(0, 1, 3, 4, 5, 125, 126, 127, 65_535, 65_536, 65_537, 300_003),
    *(VIEW_FROM_BYTES - 1, VIEW_FROM_BYTES),
)
VALID_CLOSE_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)

keys = st.binary(min_size=4, max_size=4)
lengths = st.one_of(st.integers(0, 300), st.sampled_from(BOUNDARY_LENGTHS))
seeds = st.integers(0, 2**32)


class Stream:
    """Frames (each complete) and the messages a correct parser makes of them."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.expected: list[Normal] = []

    def data(self) -> bytes:
        return b"".join(self.frames)


@st.composite
def control_frames(draw: st.DrawFn) -> tuple[bytes, Normal]:
    opcode = draw(st.sampled_from((PING, PONG, CLOSE)))
    key = draw(keys)
    if opcode is not CLOSE:
        payload = noise(draw(st.integers(0, 125)), draw(seeds))
        return frame(opcode, payload, key=key), (int(opcode), payload, "")
    if draw(st.booleans()):
        return frame(CLOSE, key=key), (int(CLOSE), 0, "")
    code = draw(st.one_of(st.sampled_from(VALID_CLOSE_CODES), st.integers(3000, 4999)))
    reason = draw(st.text(max_size=30))  # at most 120 bytes of UTF-8
    return frame(CLOSE, close_body(code, reason.encode()), key=key), (int(CLOSE), code, reason)


@st.composite
def valid_streams(draw: st.DrawFn) -> Stream:
    """Data messages (some fragmented, with control frames between their fragments) and
    control frames, each frame with its own masking key. Only a final frame may be
    empty (fedloom refuses empty non-final data frames, aiohttp accepts them)."""
    stream = Stream()
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 3)) == 0:
            control, expected = draw(control_frames())
            stream.frames.append(control)
            stream.expected.append(expected)
            continue
        opcode = draw(st.sampled_from((BINARY, TEXT)))
        payload = noise(draw(lengths), draw(seeds))
        cuts = sorted(set(draw(st.lists(st.integers(1, max(len(payload) - 1, 1)), max_size=3))))
        bounds = [0, *(c for c in cuts if c < len(payload)), len(payload)]
        pieces = [payload[a:b] for a, b in itertools.pairwise(bounds)]
        if len(pieces) > 1 or payload:
            pieces += [b""] * draw(st.integers(0, 1))  # an empty final frame
        for i, piece in enumerate(pieces):
            if i > 0 and draw(st.integers(0, 3)) == 0:
                control, expected = draw(control_frames())
                stream.frames.append(control)
                stream.expected.append(expected)  # delivered before the data message
            last = i == len(pieces) - 1
            stream.frames.append(frame(CONT if i else opcode, piece, fin=last, key=draw(keys)))
        stream.expected.append((int(opcode), payload, ""))
    return stream


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c for c in cuts if 0 < c < len(data))})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def draw_chunks(data: st.DataObject, stream: Stream) -> list[bytes]:
    """``stream`` split at arbitrary points, many of them close to frame boundaries
    (where the header states change), sometimes one byte at a time."""
    whole = stream.data()
    if len(whole) <= 4096 and data.draw(st.integers(0, 4)) == 0:
        return [whole[i : i + 1] for i in range(len(whole))]
    starts = list(itertools.accumulate((len(f) for f in stream.frames), initial=0))
    near = st.builds(lambda s, d: s + d, st.sampled_from(starts), st.integers(-2, 16))
    anywhere = st.integers(0, max(len(whole), 1))
    return split(whole, data.draw(st.lists(st.one_of(near, anywhere), max_size=24)))


def feed_all(parser: FrameParser, chunks: Sequence[bytes]) -> list[Message]:
    messages: list[Message] = []
    for chunk in chunks:
        messages += parser.feed(chunk)
    return messages


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_chunking_does_not_change_the_messages(data: st.DataObject) -> None:
    stream = data.draw(valid_streams())
    chunks = draw_chunks(data, stream)
    whole = FrameParser(1 << 20)
    in_pieces = FrameParser(1 << 20)
    whole_messages = whole.feed(stream.data())
    piece_messages = feed_all(in_pieces, chunks)
    assert whole.error is None and in_pieces.error is None
    assert [normal(m) for m in whole_messages] == stream.expected
    assert [normal(m) for m in piece_messages] == stream.expected
    for got in (*whole_messages, *piece_messages):
        large = got.opcode in (TEXT, BINARY) and len(got.data) >= VIEW_FROM_BYTES
        assert type(got.data) is (memoryview if large else bytes)


# --- differential tests against aiohttp's reader ---------------------------------------


def aiohttp_parse(chunks: Sequence[bytes], max_message: int) -> tuple[list[Normal], int | None]:
    """Feed ``chunks`` to aiohttp's reader, capped like ``FrameParser(max_message)``:
    the messages it queues and the close code it fails with (None if it does not)."""

    async def run() -> tuple[list[Normal], int | None]:
        loop = asyncio.get_running_loop()
        queue = WebSocketDataQueue(BaseProtocol(loop), 2**30, loop=loop)
        # aiohttp refuses a message of exactly max_msg_size: + 1 to match.
        reader = WebSocketReader(queue, max_message + 1, compress=False, decode_text=False)
        messages: list[Normal] = []
        for chunk in chunks:
            reader.feed_data(chunk)
            while queue._buffer:
                msg, _ = queue._buffer.popleft()
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    messages.append((int(CLOSE), msg.data, str(msg.extra)))
                else:
                    messages.append((int(msg.type), bytes(msg.data), ""))
        exc = queue.exception()
        if exc is None:
            return messages, None
        assert isinstance(exc, aiohttp.WebSocketError), exc
        return messages, int(exc.code)

    return asyncio.run(run())


def fedloom_parse(chunks: Sequence[bytes], max_message: int) -> tuple[list[Normal], int | None]:
    parser = FrameParser(max_message)
    messages = [normal(m) for m in feed_all(parser, chunks)]
    return messages, None if parser.error is None else int(parser.error.code)


@pytest.mark.parametrize("case", ERROR_CASES)
def test_aiohttp_refuses_the_error_cases_alike(case: str) -> None:
    stream, max_message, code = ERROR_CASES[case]
    # Delivered by both (empty data fits any max_message), then the error.
    prefix = frame(BINARY, b"") + frame(PONG, b"before")
    chunks = [prefix + stream + frame(BINARY, b"")]
    expected: list[Normal] = [(int(BINARY), b"", ""), (int(PONG), b"before", "")]
    assert fedloom_parse(chunks, max_message) == (expected, code)
    assert aiohttp_parse(chunks, max_message) == (expected, code)


@pytest.mark.parametrize("case", DELIBERATE_DIFFERENCES)
def test_aiohttp_answers_otherwise_where_fedloom_differs_on_purpose(case: str) -> None:
    stream, max_message, code, aiohttp_code = DELIBERATE_DIFFERENCES[case]
    assert fedloom_parse([stream], max_message) == ([], code)
    messages, error = aiohttp_parse([stream], max_message)
    assert error == aiohttp_code
    assert len(messages) == (1 if aiohttp_code is None else 0)


_ERROR_KIND = re.compile(r"[:=\d]")  # a reason up to its first detail: the kind of error


def _deliberately_different(close_payload: bytes) -> bool:
    """A close body whose code is one of the DELIBERATE_DIFFERENCES (1006, above 4999)."""
    code = int.from_bytes(close_payload[:2], "big")
    return code == 1006 or code > 4999


@st.composite
def corrupt_frames(draw: st.DrawFn, max_message: int) -> bytes:
    """A frame that is often, not always, a protocol violation, but never one of the
    DELIBERATE_DIFFERENCES: always masked, no close code 1006 or above 4999, no 64-bit
    length with its MSB set, no empty non-final data frame."""
    key = draw(keys)
    kinds = ("header", "header", "rsv", "opcode", "control", "fragmented", "close", "close")
    kind = draw(st.sampled_from((*kinds, "close", "big", "width")))
    if kind == "header":  # any first byte: fin, reserved bits and opcode at random
        first = draw(st.integers(0, 255))
        fin, opcode = bool(first & 0x80), first & 0x0F
        size = draw(st.integers(1 if opcode in (CONT, TEXT, BINARY) and not fin else 0, 130))
        payload = noise(size, draw(seeds))
        if opcode == CLOSE and size >= 2 and _deliberately_different(payload):
            payload = close_body(1000, payload[2:])  # noise read as a code fedloom refuses
        return frame(opcode, payload, fin=fin, rsv=first >> 4 & 7, key=key)
    if kind == "rsv":
        opcode = draw(st.sampled_from((TEXT, BINARY, CONT, PING, PONG, CLOSE)))
        return frame(opcode, b"r", rsv=draw(st.integers(1, 7)), key=key)
    if kind == "opcode":
        opcode = draw(st.sampled_from((3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)))
        return frame(opcode, noise(draw(st.integers(0, 10)), 5), fin=draw(st.booleans()), key=key)
    if kind == "control":  # above 125 bytes
        opcode = draw(st.sampled_from((PING, PONG, CLOSE)))
        return frame(opcode, noise(draw(st.integers(126, 140)), 6), key=key)
    if kind == "fragmented":  # a control frame without FIN
        opcode = draw(st.sampled_from((PING, PONG, CLOSE)))
        return frame(opcode, close_body(1000), fin=False, key=key)
    if kind == "close":
        code = draw(
            st.one_of(
                st.integers(0, 4999),
                st.sampled_from((0, 999, 1004, 1005, 1015, 1016, 2999, 4999)),
                st.sampled_from(VALID_CLOSE_CODES),
                st.integers(3000, 4999),
            ).filter(lambda c: c != 1006)
        )
        reason = draw(
            st.one_of(
                st.binary(max_size=20),
                st.text(max_size=10).map(str.encode),
                st.sampled_from(
                    (b"\xff", b"\xc3", b"ok\xe2\x9c", b"\xed\xa0\x80", b"\xf4\x90\x80\x80")
                ),
            )
        )
        body = draw(st.sampled_from((close_body(code, reason), close_body(code)[:1])))
        return frame(CLOSE, body, key=key)
    if kind == "big":  # declared above max_message, followed by some of its payload
        opcode = draw(st.sampled_from((TEXT, BINARY, CONT)))
        declared = draw(
            st.one_of(
                st.integers(max_message + 1, max_message + 70_000),
                st.sampled_from((1 << 32, (1 << 62) + 1, (1 << 63) - 1)),
            )
        )
        head = frame(opcode, fin=draw(st.booleans()), declared=declared, key=key)
        return head + noise(draw(st.integers(0, 50)), 8)
    # A valid frame with a longer length encoding than needed, which both accept.
    opcode = draw(st.sampled_from((TEXT, BINARY)))
    return frame(opcode, noise(draw(st.integers(1, 200)), 9), width=64, key=key)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_same_messages_and_close_code_as_aiohttp(data: st.DataObject) -> None:
    # Often a cap no generated message reaches, so that other errors get their turn.
    max_message = data.draw(
        st.one_of(st.just(1 << 20), st.sampled_from((0, 1, 125, 126, 65_535, 65_536, 300_003)))
    )
    stream = data.draw(valid_streams())
    for _ in range(data.draw(st.integers(0, 2))):
        at = data.draw(st.integers(0, len(stream.frames)))
        stream.frames.insert(at, data.draw(corrupt_frames(max_message)))
    chunks = draw_chunks(data, stream)
    note(f"frames: {[f[:64].hex() for f in stream.frames]}, chunk sizes {[len(c) for c in chunks]}")
    parser = FrameParser(max_message)
    messages = [normal(m) for m in feed_all(parser, chunks)]
    error = parser.error
    event("no error" if error is None else f"{error.code} {_ERROR_KIND.split(error.reason)[0]}")
    ours = (messages, None if error is None else int(error.code))
    assert ours == aiohttp_parse(chunks, max_message)


# --- through the server ----------------------------------------------------------------


async def test_server_uses_fedloom_reader_and_echoes_a_full_size_record() -> None:
    payload = noise(ws.MAX_FRAME, 11)
    assert len(payload) == (1 << 20) + 33  # one record: the largest frame a link sends
    seen: list[object] = []
    async with (
        asyncio.timeout(TIMEOUT_S),
        echo_server(seen=seen) as (server, errors),
        aiohttp.ClientSession() as session,
        session.ws_connect(server.url, max_msg_size=0) as raw,
    ):
        await raw.send_bytes(payload)
        assert await raw.receive_bytes() == payload
        await raw.send_bytes(b"small")
        assert await raw.receive_bytes() == b"small"
        assert isinstance(seen[0], ws.OneCopyWebSocketResponse)
        # The record reached the link as a view of the parser's buffer, unchanged.
        assert seen[1:] == [memoryview, bytes]
        assert errors == []


async def _upgrade(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /fedloom HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    response = await reader.readuntil(b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 101"), response
    return reader, writer


async def _read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame from the server (servers do not mask): (first byte, payload)."""
    first, second = await reader.readexactly(2)
    assert not second & 0x80
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first, await reader.readexactly(length)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(frame(BINARY, b"plain", key=None), id="unmasked-frame"),
        pytest.param(frame(CLOSE, close_body(1006)), id="close-code-1006"),
    ],
)
async def test_server_fails_with_1002_where_aiohttp_would_not(bad: bytes) -> None:
    async with asyncio.timeout(TIMEOUT_S), echo_server() as (server, errors):
        reader, writer = await _upgrade(server.port)
        try:
            writer.write(frame(BINARY, b"hello"))  # a valid frame first: echoed
            assert await _read_server_frame(reader) == (0x80 | BINARY, b"hello")
            writer.write(bad)
            first, body = await _read_server_frame(reader)
            assert first == 0x80 | CLOSE
            assert struct.unpack("!H", body[:2])[0] == CloseCode.PROTOCOL_ERROR
            writer.write(frame(CLOSE, close_body(1000)))
        finally:
            writer.close()
        async with asyncio.timeout(5.0):
            while not errors:
                await asyncio.sleep(0.02)
        assert isinstance(errors[0], ProtocolError)  # the link saw a framing error
        link = await ws.connect(server.url)  # and the server goes on serving others
        try:
            await link.send(b"still here")
            assert await link.recv() == b"still here"
        finally:
            await link.close()


@pytest.mark.parametrize(
    "flood",
    [
        pytest.param(
            frame(BINARY, b"", fin=False) + frame(CONT, b"", fin=False) * 50_000, id="empty"
        ),
        pytest.param(
            frame(BINARY, b"x", fin=False) + frame(CONT, b"x", fin=False) * 50_000, id="one-byte"
        ),
    ],
)
async def test_server_fails_a_fragment_flood_with_1008_and_serves_others(flood: bytes) -> None:
    # The attack, over raw TCP before any handshake: one message that never ends, cut
    # into 50,000 empty or one-byte fragments (350 kB).
    async with asyncio.timeout(TIMEOUT_S), echo_server() as (server, errors):
        reader, writer = await _upgrade(server.port)
        try:
            writer.write(frame(BINARY, b"hello"))
            assert await _read_server_frame(reader) == (0x80 | BINARY, b"hello")
            writer.write(flood)
            first, body = await _read_server_frame(reader)
            assert first == 0x80 | CLOSE
            assert struct.unpack("!H", body[:2])[0] == CloseCode.POLICY_VIOLATION
        finally:
            writer.close()
        async with asyncio.timeout(5.0):
            while not errors:
                await asyncio.sleep(0.02)
        assert isinstance(errors[0], ProtocolError)
        link = await ws.connect(server.url)  # the server goes on serving a legitimate link
        try:
            await link.send(b"still here")
            assert await link.recv() == b"still here"
        finally:
            await link.close()


# --- the client-side writer ------------------------------------------------------------


class _CapturingTransport:
    """Just enough of an asyncio transport for aiohttp's frame writer: keeps the writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes | memoryview) -> None:
        self.writes.append(bytes(data))


@pytest.mark.parametrize("size", [0, 125, 4095, 4096, 65_535, 65_536, 300_001, ws.MAX_FRAME])
@pytest.mark.parametrize("as_view", [False, True])
def test_masking_writer_frames_parse_identically_in_both_readers(size: int, as_view: bool) -> None:
    # Sizes on both sides of the one-pass threshold and of each length encoding; the
    # channel hands the writer memoryviews of numpy buffers, callers may hand it bytes.
    payload = noise(size, seed=size)
    transport = _CapturingTransport()
    writer = ws._MaskingWriter(None, transport, use_mask=True)  # type: ignore[arg-type]
    writer._write_websocket_frame(
        memoryview(payload) if as_view else payload, aiohttp.WSMsgType.BINARY, 0
    )
    stream = b"".join(transport.writes)
    assert stream[1] & 0x80, "client frames are masked"
    if size >= VIEW_FROM_BYTES:
        assert payload not in stream, "the payload went out unmasked"
    expected = [(int(BINARY), payload, "")]
    assert aiohttp_parse([stream], ws.MAX_FRAME) == (expected, None)
    assert fedloom_parse([stream], ws.MAX_FRAME) == (expected, None)


def test_masking_writer_uses_a_fresh_key_per_frame() -> None:
    transport = _CapturingTransport()
    writer = ws._MaskingWriter(None, transport, use_mask=True)  # type: ignore[arg-type]
    payload = noise(100_000)
    for _ in range(2):
        writer._write_websocket_frame(payload, aiohttp.WSMsgType.BINARY, 0)
    first, second = transport.writes
    assert first[10:14] != second[10:14]  # 2 header bytes + 8 length bytes, then the key
    assert first[14:] != second[14:]


async def test_client_links_use_the_masking_writer() -> None:
    async def on_link(link: ws.WebSocketLink) -> None:
        await link.send(await link.recv())

    server = await ws.serve("127.0.0.1", 0, on_link, close_timeout=0.5, handshake_messages=0)
    try:
        link = await ws.connect(server.url)
        try:
            assert isinstance(link._ws, ws.OneCopyClientWebSocketResponse)
            assert isinstance(link._ws._writer, ws._MaskingWriter)
            payload = noise(ws.MAX_FRAME, seed=7)
            async with asyncio.timeout(10):
                await link.send(memoryview(payload))
                assert bytes(await link.recv()) == payload
        finally:
            await link.close()
    finally:
        await server.close()
