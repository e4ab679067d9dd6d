"""Connections and peer sets: bad bytes, progress time-outs, back-off, real encrypted links."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import Event, PeerDown, PeerUp, Received
from fedloom.runtime.connection import (
    KEEPALIVE_STEP,
    ChannelPipe,
    Connection,
    ProgressLink,
    WirePipe,
)
from fedloom.runtime.network_peers import Backoff, DialTarget, NetworkPeers, gossip_dial_targets
from fedloom.runtime.peer_table import ConnectionTable
from fedloom.transport import records, wire, ws
from fedloom.transport.channel import ChannelOptions, client_channel, server_channel
from fedloom.transport.identity import Identity
from fedloom.transport.links import Link, memory_link_pair
from fedloom.transport.records import CIPHER_AEGIS256, CIPHER_SECRETSTREAM
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.wire import Ack, Heartbeat, Update
from tests.transport.cipher_params import needs_aegis

LIMIT = 15.0


class Sink:
    """Collects posted events (and honours the validity checks when read)."""

    def __init__(self) -> None:
        self.posted: list[tuple[Event, Callable[[], bool] | None]] = []

    def post_nowait(self, event: Event, valid: Callable[[], bool] | None = None) -> None:
        self.posted.append((event, valid))

    async def post(self, event: Event, valid: Callable[[], bool] | None = None) -> None:
        self.posted.append((event, valid))

    def events(self) -> list[Event]:
        return [e for e, v in self.posted if v is None or v()]

    def all(self) -> list[Event]:
        return [e for e, _ in self.posted]


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


def opened(peer: str, link: Link, sink: Sink, **kwargs: Any) -> tuple[ConnectionTable, Connection]:
    table = ConnectionTable("me")
    table.sink = sink
    conn = Connection(peer, WirePipe(link), local_id="me", **kwargs)
    table.open(conn)
    return table, conn


async def test_messages_arrive_and_keepalives_are_swallowed() -> None:
    sink = Sink()
    mine, theirs = memory_link_pair()
    table, conn = opened("peer", mine, sink)
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        served = tg.create_task(table.serve(conn))
        await theirs.send(wire.encode(Heartbeat("peer", KEEPALIVE_STEP)))
        await theirs.send(wire.encode(Ack("peer", 4)))
        assert table.send("peer", Heartbeat("me", 9))
        assert wire.decode(await theirs.recv()) == Heartbeat("me", 9)
        await until(lambda: len(sink.all()) == 2)
        await theirs.close()
        reason = await served
    assert "link closed" in reason
    assert sink.all() == [PeerUp("peer"), Received("peer", Ack("peer", 4)), PeerDown("peer")]
    assert table.connected() == frozenset()


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\xc1", b"not msgpack at all", wire.encode(Ack("x", 1))[:-1]],
    ids=["empty", "reserved-byte", "text", "truncated"],
)
async def test_bad_bytes_close_the_connection_not_the_node(garbage: bytes) -> None:
    sink = Sink()
    mine, theirs = memory_link_pair()
    table, conn = opened("evil", mine, sink)
    async with asyncio.timeout(LIMIT):
        served = asyncio.ensure_future(table.serve(conn))
        await theirs.send(garbage)
        reason = await served
    assert reason.startswith("bad bytes from the peer")
    assert sink.all() == [PeerUp("evil"), PeerDown("evil")]
    assert not table.send("evil", Ack("me", 1))  # gone: dropped, not raised


async def test_cancelling_a_connection_that_is_ending_still_cancels() -> None:
    # A TaskGroup reports a child's error over its own cancellation; the connection
    # must not turn "cancelled while ending" into a normal return (a retry loop around
    # it would then never stop).
    sink = Sink()
    mine, _theirs = memory_link_pair()
    table, conn = opened("peer", mine, sink)
    async with asyncio.timeout(LIMIT):
        served = asyncio.ensure_future(table.serve(conn))
        await asyncio.sleep(0.01)
        conn.abort("ending on its own")
        await asyncio.sleep(0)  # the connection's stopper raises ...
        served.cancel()  # ... while its task is cancelled
        with pytest.raises(asyncio.CancelledError):
            await served
    assert sink.all() == [PeerUp("peer"), PeerDown("peer")]


async def test_a_silent_peer_is_declared_down_after_no_progress() -> None:
    sink = Sink()
    mine, theirs = memory_link_pair()
    table, conn = opened("quiet", mine, sink, keepalive_s=0.02, down_after_s=0.2)
    async with asyncio.timeout(LIMIT):
        reason = await table.serve(conn)  # the other end never sends a byte
    assert reason.startswith("nothing received for")
    assert sink.all()[-1] == PeerDown("quiet")
    await theirs.close()


async def test_keepalives_keep_an_idle_connection_up() -> None:
    sink_a, sink_b = Sink(), Sink()
    la, lb = memory_link_pair()
    ta, ca = opened("b", la, sink_a, keepalive_s=0.02, down_after_s=0.5)
    tb, cb = opened("a", lb, sink_b, keepalive_s=0.02, down_after_s=0.5)
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        tg.create_task(ta.serve(ca))
        tg.create_task(tb.serve(cb))
        await asyncio.sleep(1.2)  # several down_after_s with nothing but keep-alives
        assert ca.is_open() and cb.is_open()
        assert ca.pipe.progress.bytes_in > 0  # keep-alives flowed, none was delivered
        ta.drop_all("test over")
        tb.drop_all("test over")
    assert sink_a.all() == [PeerUp("b"), PeerDown("b")]


class SlowLink:
    """Delivers the frames of its inner link one per ``gap`` seconds (a slow uplink)."""

    def __init__(self, inner: Link, gap: float) -> None:
        self.inner = inner
        self.gap = gap

    @property
    def closed(self) -> bool:
        return self.inner.closed

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send(data)

    async def recv(self) -> bytes | memoryview:
        frame = await self.inner.recv()
        await asyncio.sleep(self.gap)
        return frame

    async def close(self) -> None:
        await self.inner.close()


async def test_a_slow_large_transfer_is_progress_not_a_time_out(pki: Pki) -> None:
    """A message taking longer than ``down_after_s`` stays up while its records arrive."""
    a, b = memory_link_pair()
    slow = ProgressLink(SlowLink(b, gap=0.06))  # every 1 MiB record takes a while
    client, server = await asyncio.gather(
        client_channel(ProgressLink(a), pki.site, pki.roster, "agg"),
        server_channel(slow, pki.agg, pki.roster),
    )
    sink = Sink()
    table = ConnectionTable("agg")
    table.sink = sink
    conn = Connection(
        "site-1", ChannelPipe(server, slow), local_id="agg", keepalive_s=0.1, down_after_s=0.5
    )
    table.open(conn)
    big = Update("site-1", 1, 0, {"w": np.ones(3_000_000, dtype=np.float32)}, 5)  # 12 MB
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        served = tg.create_task(table.serve(conn))
        t0 = time.monotonic()
        await client.send_tensors(big)
        await until(lambda: any(isinstance(e, Received) for e in sink.all()))
        took = time.monotonic() - t0
        assert conn.is_open()
        conn.abort("done")
        await served
        await client.close()
    got = next(e for e in sink.all() if isinstance(e, Received))
    assert isinstance(got.msg, Update) and got.msg.delta["w"].shape == (3_000_000,)
    assert took > 0.5  # the premise: longer than down_after_s (not a timing claim on us)


async def test_a_peer_that_does_not_read_is_disconnected_not_waited_for() -> None:
    sink = Sink()
    mine, _theirs = memory_link_pair(max_queue=1)
    table, conn = opened("stuck", mine, sink, max_queue=3)
    async with asyncio.timeout(LIMIT):
        served = asyncio.ensure_future(table.serve(conn))
        sent = [table.send("stuck", Ack("me", i)) for i in range(10)]
        reason = await served
    assert sent[:3] == [True] * 3 and not any(sent[4:])
    assert "send queue overflow" in reason


async def test_a_newer_connection_replaces_the_old_one() -> None:
    sink = Sink()
    table = ConnectionTable("me")
    table.sink = sink
    first = Connection("p", WirePipe(memory_link_pair()[0]), local_id="me")
    second = Connection("p", WirePipe(memory_link_pair()[0]), local_id="me")
    table.open(first)
    table.open(second)
    assert not first.is_open() and second.is_open()
    assert table.get("p") is second
    table.drop(first, "late end of the old one")  # must not take the new one down
    assert sink.all() == [PeerUp("p"), PeerDown("p"), PeerUp("p")]
    table.drop(second, "done")
    assert sink.all()[-1] == PeerDown("p")


def test_backoff_grows_jittered_up_to_the_cap() -> None:
    policy = Backoff(base_s=0.5, cap_s=8.0)
    rng = random.Random(3)
    delays = [policy.delay(n, rng) for n in range(12)]
    for n, d in enumerate(delays):
        ceiling = min(8.0, 0.5 * 2**n)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 8.0
    assert policy.delay(10_000, rng) <= 8.0  # no overflow for long outages
    with pytest.raises(ValueError):
        Backoff(base_s=0)
    with pytest.raises(ValueError):
        Backoff(base_s=2, cap_s=1)


def test_each_gossip_pair_dials_once() -> None:
    peers = [("a", "ws://a:1/f"), ("c", "ws://c:1/f"), ("d", None)]
    # Both listen: only the smaller id dials; a peer without a URL dials us.
    assert gossip_dial_targets("b", peers, listening=True) == [DialTarget("c", "ws://c:1/f")]
    # Behind a firewall: dial everyone reachable.
    assert [t.peer for t in gossip_dial_targets("b", peers, listening=False)] == ["a", "c"]


# --------------------------------------------------------- real WebSocket + channel


class Pki:
    def __init__(self) -> None:
        self.agg = Identity.generate("agg", "root")
        self.site = Identity.generate("site-1", "site")
        self.stranger = Identity.generate("site-9", "site")
        entries = [RosterEntry(i.node_id, i.role, i.public_key) for i in (self.agg, self.site)]
        self.roster = Roster(1, entries)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


async def fast_connect(url: str) -> Link:
    return await ws.connect(url, close_timeout=0.5)


async def fast_serve(host: str, port: int, on_link: Any) -> ws.WsServer:
    return await ws.serve(host, port, on_link, close_timeout=0.5)


def peers(identity: Identity, roster: Roster, **kwargs: Any) -> NetworkPeers:
    """Peers on real WebSockets with fast test timings; ``kwargs`` override any of them."""
    options: dict[str, Any] = {
        "connect": fast_connect,
        "serve": fast_serve,
        "backoff": Backoff(base_s=0.05, cap_s=0.2),
        "keepalive_s": 0.5,
        "down_after_s": 5.0,
        "rng": random.Random(0),
    }
    return NetworkPeers(identity, roster, **(options | kwargs))


def delta() -> dict[str, np.ndarray]:
    return {"w": np.arange(300_000, dtype=np.float32)}  # 1.2 MB: streamed in pieces


@pytest.fixture(params=["fast", "stock-aiohttp", "no-aegis"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The transport as this aiohttp and PyNaCl allow it (``fast``), as an aiohttp without
    the internals of the one-copy reader and writer would (``transport.ws.fast_path``),
    and as a PyNaCl without AEGIS-256 would (``transport.records.aegis_available``)."""
    if request.param == "stock-aiohttp":
        forced = ("forced by the test",)
        monkeypatch.setattr(ws, "_fast_path", ws.FastPath(forced, forced))
    elif request.param == "no-aegis":
        monkeypatch.setattr(records, "aegis_available", lambda: False)
    return str(request.param)


@pytest.mark.usefixtures("transport")
async def test_site_dials_the_aggregator_over_encrypted_websockets(pki: Pki) -> None:
    agg_sink, site_sink = Sink(), Sink()
    agg = peers(pki.agg, pki.roster, listen=("127.0.0.1", 0), accept_from={"site-1"})
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        agg_task = tg.create_task(agg.run(agg_sink))
        await until(lambda: agg.listen_url is not None)
        assert agg.listen_url is not None
        site = peers(pki.site, pki.roster, dial=[DialTarget("agg", agg.listen_url)])
        site_task = tg.create_task(site.run(site_sink))
        await until(lambda: "site-1" in agg.connected() and "agg" in site.connected())
        update = Update("site-1", 1, 0, delta(), 10)
        assert site.send("agg", update)
        await until(lambda: any(isinstance(e, Received) for e in agg_sink.events()))
        got = next(e for e in agg_sink.events() if isinstance(e, Received))
        assert got.peer == "site-1" and isinstance(got.msg, Update)
        np.testing.assert_array_equal(got.msg.delta["w"], update.delta["w"])
        assert agg.send("site-1", Ack("site-1", 1))
        await until(lambda: Received("agg", Ack("site-1", 1)) in site_sink.events())

        # The aggregator goes away: the site sees PeerDown and keeps redialling ...
        port = int(agg.listen_url.rsplit(":", 1)[1].split("/")[0])
        agg_task.cancel()
        await until(lambda: PeerDown("agg") in site_sink.all())
        await until(lambda: site.dial_failures >= 2)
        # ... and reconnects once an aggregator listens there again.
        again = peers(pki.agg, pki.roster, listen=("127.0.0.1", port))
        again_sink = Sink()
        again_task = tg.create_task(again.run(again_sink))
        await until(lambda: site_sink.all().count(PeerUp("agg")) == 2)
        await until(lambda: PeerUp("site-1") in again_sink.all())
        site_task.cancel()
        again_task.cancel()
    assert site_sink.all()[:1] == [PeerUp("agg")]


async def test_a_key_outside_the_roster_is_refused(pki: Pki) -> None:
    agg = peers(pki.agg, pki.roster, listen=("127.0.0.1", 0))
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        agg_task = tg.create_task(agg.run(Sink()))
        await until(lambda: agg.listen_url is not None)
        assert agg.listen_url is not None
        stranger = peers(pki.stranger, pki.roster, dial=[DialTarget("agg", agg.listen_url)])
        stranger_sink = Sink()
        stranger_task = tg.create_task(stranger.run(stranger_sink))
        await until(lambda: agg.refused >= 1 and stranger.dial_failures >= 1)
        assert agg.connected() == frozenset() and stranger_sink.all() == []
        stranger_task.cancel()
        agg_task.cancel()


async def test_a_roster_member_that_is_not_a_neighbour_is_refused(pki: Pki) -> None:
    agg = peers(pki.agg, pki.roster, listen=("127.0.0.1", 0), accept_from={"site-7"})
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        agg_task = tg.create_task(agg.run(Sink()))
        await until(lambda: agg.listen_url is not None)
        assert agg.listen_url is not None
        site = peers(pki.site, pki.roster, dial=[DialTarget("agg", agg.listen_url)])
        site_task = tg.create_task(site.run(Sink()))
        await until(lambda: agg.refused >= 1)
        assert agg.connected() == frozenset()
        site_task.cancel()
        agg_task.cancel()


@needs_aegis
async def test_record_ciphers_are_negotiated_and_a_mismatch_is_refused(pki: Pki) -> None:
    only_aegis = ChannelOptions(ciphers=(CIPHER_AEGIS256,))
    agg = peers(pki.agg, pki.roster, listen=("127.0.0.1", 0), options=only_aegis)
    agg_sink = Sink()
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        agg_task = tg.create_task(agg.run(agg_sink))
        await until(lambda: agg.listen_url is not None)
        assert agg.listen_url is not None
        # A site that speaks only secretstream has no cipher in common: refused, clearly.
        old = ChannelOptions(ciphers=(CIPHER_SECRETSTREAM,))
        stale = peers(pki.site, pki.roster, dial=[DialTarget("agg", agg.listen_url)], options=old)
        stale_task = tg.create_task(stale.run(Sink()))
        await until(lambda: agg.refused >= 1 and stale.dial_failures >= 1)
        assert agg.connected() == frozenset()
        stale_task.cancel()
        # A site offering both (the default) gets through, and the aggregator lives on.
        site = peers(pki.site, pki.roster, dial=[DialTarget("agg", agg.listen_url)])
        site_task = tg.create_task(site.run(Sink()))
        await until(lambda: "site-1" in agg.connected())
        assert site.send("agg", Update("site-1", 1, 0, delta(), 10))
        await until(lambda: any(isinstance(e, Received) for e in agg_sink.events()))
        site_task.cancel()
        agg_task.cancel()


def test_network_peers_check_their_arguments(pki: Pki) -> None:
    with pytest.raises(ValueError, match="twice"):
        NetworkPeers(
            pki.site, pki.roster, dial=[DialTarget("a", "ws://x"), DialTarget("a", "ws://y")]
        )
    with pytest.raises(ValueError, match="itself"):
        NetworkPeers(pki.site, pki.roster, dial=[DialTarget("site-1", "ws://x")])
    with pytest.raises(ValueError, match="down_after_s"):
        NetworkPeers(pki.site, pki.roster, keepalive_s=10, down_after_s=5)
