"""Direct reads (``transport.ws._DirectReads``): a WebSocket connection read by fedloom's
frame parser receives large payloads straight into their frame's buffer.

The parser must see the same messages and the same errors however the bytes reach it
(copied from a read buffer, or already in place), and a real link must carry every byte
intact on both event loops, with the bulk of a large message read into place."""

from __future__ import annotations

import asyncio

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloom.transport import ws
from fedloom.transport.ws_frames import FrameParser, Message, Opcode, masked_frame
from tests.transport.link_pairs import echo_server

TIMEOUT_S = 10.0


def _messages(found: list[Message]) -> list[tuple[Opcode, bytes, int]]:
    return [(m.opcode, bytes(m.data), m.close_code) for m in found]


def _frames(draw: st.DrawFn) -> bytes:
    """Masked client frames: binary messages, some fragmented, pings, and at times a
    broken frame (a reserved bit) or an oversize one, so errors are compared too."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["binary", "fragmented", "ping", "broken", "oversize"]))
        key = draw(st.binary(min_size=4, max_size=4))
        if kind == "ping":
            out += masked_frame(0x80 | Opcode.PING, bytes_of(draw, 0, 125), key).tobytes()
        elif kind == "binary":
            out += masked_frame(0x80 | Opcode.BINARY, bytes_of(draw, 0, 3000), key).tobytes()
        elif kind == "fragmented":
            out += masked_frame(Opcode.BINARY, bytes_of(draw, 1, 700), key).tobytes()
            out += masked_frame(0x80 | Opcode.CONTINUATION, bytes_of(draw, 0, 700), key).tobytes()
        elif kind == "broken":
            out += masked_frame(0x80 | 0x40 | Opcode.BINARY, bytes_of(draw, 0, 50), key).tobytes()
        else:
            out += masked_frame(0x80 | Opcode.BINARY, bytes_of(draw, 4001, 4100), key).tobytes()
    return bytes(out)


def bytes_of(draw: st.DrawFn, low: int, high: int) -> npt.NDArray[np.uint8]:
    size = draw(st.integers(low, high))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bytes_received_in_place_parse_as_bytes_copied(data: st.DataObject) -> None:
    stream = data.draw(st.composite(lambda draw: _frames(draw))())
    plain = FrameParser(4000)
    expected = _messages(plain.feed(stream))

    direct = FrameParser(4000)
    found: list[Message] = []
    pos = 0
    while pos < len(stream):
        into = direct.read_into()
        size = data.draw(st.integers(1, 5000))
        if into is not None and data.draw(st.booleans()):  # a read straight into place
            size = min(size, len(into), len(stream) - pos)
            into[:size] = stream[pos : pos + size]
            found += direct.feed(into[:size])
        else:  # a read into the connection's read buffer
            chunk = bytearray(stream[pos : pos + size])
            found += direct.feed(memoryview(chunk))
            chunk[:] = bytes(len(chunk))  # the buffer is reused: nothing may point into it
        pos += size
    assert _messages(found) == expected
    assert direct.error == plain.error


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_links_read_large_messages_into_place_on_both_sides(loop: str) -> None:
    """Three links at once, both ends on one loop: the read buffer they share (one per
    thread, no connection holds its own) never mixes their bytes."""

    async def exchange(link: ws.WebSocketLink, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for size in [3 * ws.MAX_FRAME // 4, 1, ws.MAX_FRAME - 1, 70_000, 0, 5]:
            payload = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            await link.send(payload)
            assert bytes(await link.recv()) == payload

    async def run() -> list[ws._DirectReads]:
        seen: list[object] = []
        async with asyncio.timeout(TIMEOUT_S), echo_server(seen=seen) as (server, errors):
            links = [await ws.connect(server.url) for _ in range(3)]
            try:
                await asyncio.gather(*(exchange(link, i) for i, link in enumerate(links)))
            finally:
                for link in links:
                    await link.close()
            assert errors == []
        clients = [link._ws.direct_reads for link in links]  # type: ignore[attr-defined]
        servers = [r.direct_reads for r in seen if isinstance(r, ws.OneCopyWebSocketResponse)]
        return [r for r in clients + servers if r is not None]

    if ws.fast_path() != ws.FastPath():
        pytest.skip("no fast path on this aiohttp: its readers copy every read")
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        reads = uvloop.run(run())
    else:
        reads = asyncio.run(run())
    assert len(reads) == 6
    assert len({id(r._buffer) for r in reads}) == 1
    # Most of the ~1.8 MiB each way went straight into frames (reads into the read
    # buffer carry frame headers and the first bytes after them).
    assert all(r.direct_bytes > ws.MAX_FRAME for r in reads)


class _Keeps(asyncio.Protocol):
    """A protocol that keeps what it is handed without copying it (as a buffering one may)."""

    def __init__(self) -> None:
        self.kept: list[object] = []

    def data_received(self, data: bytes) -> None:
        self.kept.append(data)


def test_reads_into_the_shared_buffer_go_on_as_their_own_bytes() -> None:
    """The shared read buffer is overwritten by the next read (of any connection): what a
    protocol kept from an earlier read must not change with it."""
    inner = _Keeps()
    reads = ws._DirectReads(inner, FrameParser(4000))
    first = reads.get_buffer(-1)  # between frames: the shared buffer
    first[:5] = b"hello"
    reads.buffer_updated(5)
    second = reads.get_buffer(-1)
    second[:5] = b"xxxxx"
    reads.buffer_updated(5)
    assert [bytes(k) for k in inner.kept] == [b"hello", b"xxxxx"]  # type: ignore[call-overload]


def test_a_transport_that_hands_over_bytes_reaches_the_protocol() -> None:
    inner = _Keeps()
    ws._DirectReads(inner, FrameParser(4000)).data_received(b"plain")
    assert inner.kept == [b"plain"]
