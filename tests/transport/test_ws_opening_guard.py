"""The stock reader's opening guard (``transport.ws._OpeningGuard``) on its own: however
the bytes of a connection are cut into chunks, it passes on a client's handshake-sized
first messages whole and refuses an oversize one at its frame header, passing on exactly
the bytes before it."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from fedloom.transport.ws import _OpeningGuard
from fedloom.transport.ws_frames import CloseCode

CAP = 64  # the handshake-sized cap on the first two messages
FRAME = 4096  # the frame cap after them
HEAD = (
    b"GET /fedloom HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A masked frame (zero key: the payload reads as sent)."""
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    elif size < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
    return head + bytes(4) + payload


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def run(guard: _OpeningGuard, chunks: list[bytes]) -> bytes:
    """What the guard passes on to aiohttp (everything once it is done)."""
    passed = b""
    for chunk in chunks:
        if guard.done:
            passed += chunk
            continue
        accepted = guard.feed(chunk)
        passed += chunk[:accepted]
        if guard.error is not None:
            break
    return passed


@given(
    st.integers(0, CAP),
    st.integers(0, CAP),
    st.booleans(),
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_handshake_sized_first_messages_pass_whole_in_any_chunking(
    first: int, second: int, ping: bool, cuts: list[int]
) -> None:
    opening = frame(bytes(first)) + (frame(b"", 0x9) if ping else b"") + frame(bytes(second))
    after = frame(bytes(FRAME))  # a record, once the handshake is over
    data = HEAD + opening + after
    guard = _OpeningGuard(2, CAP, FRAME)
    assert run(guard, chunked(data, cuts)) == data
    assert guard.error is None and guard.done


@given(
    st.integers(CAP + 1, 1 << 40),
    st.booleans(),
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_an_oversize_first_message_is_refused_at_its_header(
    size: int, second: bool, cuts: list[int]
) -> None:
    before = HEAD + (frame(b"c1") if second else b"")
    header = bytes([0x82, 0x80 | 127]) + size.to_bytes(8, "big") + bytes(4)
    data = before + header + bytes(1000)  # the first 1000 bytes of what it announced
    guard = _OpeningGuard(2, CAP, FRAME)
    passed = run(guard, chunked(data, cuts))
    assert guard.error is not None and guard.error.code == CloseCode.MESSAGE_TOO_BIG
    # aiohttp got the head and the message before, at most the part of the refused
    # header that came in earlier chunks, and never a byte of its payload.
    assert passed == data[: len(passed)]
    assert len(before) <= len(passed) < len(before) + len(header)
    assert guard.forwarded == len(passed) - len(HEAD)
