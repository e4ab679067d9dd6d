"""The in-memory link: back-pressure, copies, caps (shared behaviour: tests/conformance)."""

from __future__ import annotations

import asyncio

import pytest

from fedloom.transport.errors import FrameTooLarge
from fedloom.transport.links import (
    KnownAddresses,
    Link,
    LinkClosed,
    MemoryLink,
    ReserveHolders,
    memory_link_pair,
    reserve_share,
)
from fedloom.transport.ws import WebSocketLink

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


def test_known_addresses_are_bounded_per_peer_and_in_all() -> None:
    known = KnownAddresses(capacity=6, per_peer=2)
    known.add("", "site-1")  # links without an address are never known
    assert len(known) == 0
    for i in range(5):  # a peer that authenticates from many addresses: its latest two
        known.add(f"10.0.0.{i}", "site-1")
    assert [f"10.0.0.{i}" in known for i in range(5)] == [False, False, False, True, True]
    for peer in ("site-2", "site-3", "site-4"):
        known.add(f"{peer}-a", peer)
        known.add(f"{peer}-b", peer)
    assert len(known) == 6 and "10.0.0.3" not in known  # the least recent went first
    known.add("site-2-a", "site-5")  # an address now used by another peer moves to it
    known.forget_peers(["site-1", "site-3", "site-4", "site-5"])  # site-2 is revoked
    assert "site-2-b" not in known and "site-2-a" in known and len(known) == 5


def test_known_addresses_seeded_from_ip_literal_endpoints() -> None:
    known = KnownAddresses()
    known.seed(
        "region-1",
        [
            "wss://192.0.2.7:8443/fedloom",
            "ws://[2001:db8::1]:9000/fedloom",
            "wss://region.example.org/fedloom",  # names are not resolved
            "not a url",
        ],
    )
    assert "192.0.2.7" in known and "2001:db8::/64" in known and len(known) == 2


def test_reserve_holders_cap_each_address_and_each_peer() -> None:
    known = KnownAddresses()
    for key, peer in (("10.0.0.1", "site-2"), ("10.0.0.2", "site-2"), ("10.0.0.3", "site-1")):
        known.add(key, peer)
    assert known.peer_of("10.0.0.1") == "site-2" and known.peer_of("192.0.2.1") is None
    assert [reserve_share(n) for n in (0, 1, 8, 64)] == [0, 1, 1, 8]
    holders, share = ReserveHolders(), 2
    taken = []
    for key in ["10.0.0.1"] * 3 + ["10.0.0.2"] * 3 + ["10.0.0.3"] * 3 + ["192.0.2.1"]:
        holder = known.peer_of(key)
        if holders.fits(key, holder, share) and holder is not None:
            holders.take(key, holder)
            taken.append(key)
    # site-2 gets two slots over both its addresses, site-1 two, an unknown address none.
    assert taken == ["10.0.0.1", "10.0.0.1", "10.0.0.3", "10.0.0.3"]
    holders.release("10.0.0.1", "site-2")
    assert holders.held_by("site-2") == 1 and holders.fits("10.0.0.2", "site-2", share)
