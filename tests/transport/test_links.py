"""The in-memory link: back-pressure, copies, caps (shared behaviour: tests/conformance)."""

from __future__ import annotations

import asyncio

import pytest

from transport.errors import FrameTooLarge
from transport.links import Link, LinkClosed, MemoryLink, memory_link_pair
from transport.ws import WebSocketLink

TIMEOUT_S = 5.0


def test_both_links_satisfy_the_protocol() -> None:
    a, _ = memory_link_pair()
    assert isinstance(a, Link)
    # Static check as well (mypy): both classes are structurally Links.
    links: list[type[Link]] = [MemoryLink, WebSocketLink]
    assert all(hasattr(cls, "closed") for cls in links)


async def test_send_blocks_when_the_queue_is_full() -> None:
    async with asyncio.timeout(TIMEOUT_S):
        a, b = memory_link_pair(max_queue=2)
        await a.send(b"1")
        await a.send(b"2")
        third = asyncio.create_task(a.send(b"3"))
        await asyncio.sleep(0.05)
        assert not third.done()  # back-pressure: the reader is behind
        assert await b.recv() == b"1"
        await asyncio.wait_for(third, 1.0)
        assert [await b.recv(), await b.recv()] == [b"2", b"3"]


async def test_a_blocked_sender_is_released_by_close() -> None:
    async with asyncio.timeout(TIMEOUT_S):
        a, b = memory_link_pair(max_queue=1)
        await a.send(b"1")
        blocked = asyncio.create_task(a.send(b"2"))
        await asyncio.sleep(0.02)
        await b.close()
        with pytest.raises(LinkClosed):
            await blocked


async def test_send_copies_the_buffer() -> None:
    async with asyncio.timeout(TIMEOUT_S):
        a, b = memory_link_pair()
        buf = bytearray(b"abc")
        await a.send(buf)  # type: ignore[arg-type]  # any bytes-like works
        buf[0] = ord("z")
        assert await b.recv() == b"abc"


async def test_frame_cap_closes_both_ends() -> None:
    async with asyncio.timeout(TIMEOUT_S):
        a, b = memory_link_pair(max_frame=10)
        await a.send(b"x" * 11)
        with pytest.raises(FrameTooLarge, match="limit 10"):
            await b.recv()
        assert a.closed and b.closed
        with pytest.raises(LinkClosed):
            await a.send(b"x")


@pytest.mark.parametrize(
    "options",
    [{"max_queue": 0}, {"max_frame": 0}, {"receive_timeout": 0.0}],
)
def test_bad_options(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        memory_link_pair(**options)  # type: ignore[arg-type]
