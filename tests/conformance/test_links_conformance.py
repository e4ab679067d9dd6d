"""One suite, every link: the in-memory pair and loopback WebSockets behave the same."""

from __future__ import annotations

import asyncio
import os

import pytest

from fedloom.transport.errors import FrameTooLarge
from fedloom.transport.links import Link, LinkClosed, LinkTimeout
from tests.transport.link_pairs import LINK_KINDS, link_pair

pytestmark = pytest.mark.parametrize("kind", LINK_KINDS)

MAX_FRAME = (1 << 20) + 4096
TEST_TIMEOUT_S = 10.0


async def test_echo_both_ways(kind: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S), link_pair(kind) as (a, b):
        await a.send(b"ping")
        assert await b.recv() == b"ping"
        await b.send(b"pong")
        assert await a.recv() == b"pong"
        await a.send(b"")  # empty frames are frames too
        assert await b.recv() == b""
        assert not a.closed
        assert not b.closed


async def test_frames_arrive_in_order_with_boundaries_kept(kind: str) -> None:
    frames = [os.urandom(n) for n in (0, 1, 7, 100, 4096, 65_537, 300_000) * 20]

    async def produce(link: Link) -> None:
        for frame in frames:
            await link.send(frame)

    async with asyncio.timeout(TEST_TIMEOUT_S), link_pair(kind) as (a, b):
        producer = asyncio.create_task(produce(a))
        received = [await b.recv() for _ in frames]
        await producer
    assert received == frames


async def test_full_duplex(kind: str) -> None:
    async def exchange(link: Link, tag: bytes) -> list[bytes | memoryview]:
        async def send_all() -> None:
            for i in range(200):
                await link.send(tag + i.to_bytes(4, "big") * 1000)

        sender = asyncio.create_task(send_all())
        got = [await link.recv() for _ in range(200)]
        await sender
        return got

    async with asyncio.timeout(TEST_TIMEOUT_S), link_pair(kind) as (a, b):
        got_a, got_b = await asyncio.gather(exchange(a, b"A"), exchange(b, b"B"))
    assert got_a == [b"B" + i.to_bytes(4, "big") * 1000 for i in range(200)]
    assert got_b == [b"A" + i.to_bytes(4, "big") * 1000 for i in range(200)]


async def test_largest_frame_passes(kind: str) -> None:
    big = os.urandom(MAX_FRAME)
    async with asyncio.timeout(TEST_TIMEOUT_S), link_pair(kind, max_frame=MAX_FRAME) as (a, b):
        await a.send(big)
        assert await b.recv() == big
        await b.send(big)
        assert await a.recv() == big


async def test_oversize_frame_is_rejected_and_closes(kind: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S), link_pair(kind, max_frame=MAX_FRAME) as (a, b):
        await a.send(b"ok")
        await a.send(bytes(MAX_FRAME + 1))
        assert await b.recv() == b"ok"
        with pytest.raises(FrameTooLarge):
            await b.recv()
        assert b.closed
        with pytest.raises(LinkClosed):
            await b.recv()
        with pytest.raises(LinkClosed):
            await a.recv()  # the sender learns that the link is gone


async def test_local_close(kind: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S), link_pair(kind) as (a, _b):
        await a.close()
        assert a.closed
        await a.close()  # idempotent
        with pytest.raises(LinkClosed):
            await a.send(b"x")
        with pytest.raises(LinkClosed):
            await a.recv()


async def test_peer_close_delivers_what_was_sent_then_link_closed(kind: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S), link_pair(kind) as (a, b):
        await a.send(b"one")
        await a.send(b"two")
        await a.close()
        assert await b.recv() == b"one"
        assert await b.recv() == b"two"
        with pytest.raises(LinkClosed):
            await b.recv()
        with pytest.raises(LinkClosed):
            await b.recv()  # and stays closed
        with pytest.raises(LinkClosed):
            await b.send(b"too late")


async def test_peer_close_wakes_a_blocked_receiver(kind: str) -> None:
    async with asyncio.timeout(TEST_TIMEOUT_S), link_pair(kind) as (a, b):
        waiting = asyncio.create_task(b.recv())
        await asyncio.sleep(0.05)
        await a.close()
        with pytest.raises(LinkClosed):
            await waiting


async def test_receive_timeout(kind: str) -> None:
    options: dict[str, float | None] = {"receive_timeout": 0.3}
    if kind == "ws":
        options["heartbeat"] = None  # nothing at all arrives, not even pongs
    async with asyncio.timeout(TEST_TIMEOUT_S), link_pair(kind, **options) as (a, _b):
        with pytest.raises(LinkTimeout):
            await a.recv()
        assert a.closed
