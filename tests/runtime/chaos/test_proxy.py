"""The fault proxy over real sockets on 127.0.0.1: each toxic, the group API, clean shutdown."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from fedloom.algorithms.protocol import PeerDown, PeerUp, Received
from fedloom.runtime.chaos.proxy import (
    MAX_RETRANSMITS,
    MSS,
    READ_SIZE,
    FaultNetwork,
    Toxics,
    _Chunk,
    _rst,
    _stall_s,
)
from fedloom.runtime.network_peers import DialTarget
from fedloom.transport.wire import Ack, Update
from tests.runtime.test_peers import Pki, Sink, delta, peers

LIMIT = 5.0


class Upstream:
    """A real TCP server: records what it receives and, when ``echo``, sends it back."""

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.received = bytearray()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[Any]] = set()
        self.ended: list[str] = []  # per connection: "eof" or "reset"

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return "127.0.0.1", int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.append(writer)
        try:
            while data := await reader.read(65536):
                self.received += data
                if self.echo:
                    writer.write(data)
                    await writer.drain()
            self.ended.append("eof")
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            self.ended.append("reset")
        finally:
            writer.transport.abort()
            self.handlers.discard(task)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()


@asynccontextmanager
async def proxied(
    echo: bool = True, **kwargs: Any
) -> AsyncIterator[tuple[FaultNetwork, int, Upstream]]:
    """A running upstream behind one link named "l"; both closed after, errors recorded."""
    upstream = Upstream(echo)
    address = await upstream.start()
    net = FaultNetwork(seed=1, **kwargs)
    try:
        port = await net.add_link("l", address)
        yield net, port, upstream
    finally:
        await net.close()
        await upstream.stop()


@pytest.fixture
async def loop_errors() -> list[dict[str, Any]]:
    """Everything that reaches the event loop's exception handler (an escaped error)."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    return errors


async def dial(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await reader.readexactly(n)


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


async def still_open(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Nothing arrives and no end of stream within ``seconds``."""
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return True
    return False


async def test_latency_delays_each_direction_by_at_least_its_setting() -> None:
    async with asyncio.timeout(LIMIT), proxied() as (net, port, _):
        reader, writer = await dial(port)
        writer.write(b"warm")
        await read_exactly(reader, 4)
        net.apply("l", "up", Toxics(latency_ms=150))
        net.apply("l", "down", Toxics(latency_ms=100))
        started = time.monotonic()
        writer.write(b"ping")
        assert await read_exactly(reader, 4) == b"ping"
        assert time.monotonic() - started >= 0.25
        # Healing applies to the live connection: no toxic left on the way back.
        net.heal()
        assert net.link("l").up == Toxics() and net.link("l").down == Toxics()
        writer.close()


async def test_jitter_never_reorders_the_byte_stream() -> None:
    async with asyncio.timeout(LIMIT), proxied() as (net, port, _):
        net.apply("l", "both", Toxics(latency_ms=20, jitter_ms=20))
        reader, writer = await dial(port)
        sent = b""
        for i in range(40):
            piece = f"<{i}>".encode()
            sent += piece
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.002)
        assert await read_exactly(reader, len(sent)) == sent
        writer.close()


async def test_rate_limits_throughput() -> None:
    rate_kbps = 800.0  # 100,000 bytes/s
    n = 120_000
    async with asyncio.timeout(LIMIT), proxied(echo=False) as (net, port, upstream):
        net.apply("l", "up", Toxics(rate_kbps=rate_kbps))
        _, writer = await dial(port)
        started = time.monotonic()
        writer.write(b"x" * n)
        await until(lambda: len(upstream.received) == n)
        elapsed = time.monotonic() - started
        burst = rate_kbps * 125 * 0.05
        assert elapsed >= (n - burst) / (rate_kbps * 125) * 0.9
        writer.close()


async def test_a_reset_toxic_cuts_mid_transfer_and_later_connections_work() -> None:
    async with asyncio.timeout(LIMIT), proxied() as (net, port, _):
        cut = Toxics(reset_after_bytes=1000)
        net.apply("l", "down", cut)
        reader, writer = await dial(port)
        writer.write(b"m" * 600)
        got = bytearray(await read_exactly(reader, 600))
        net.apply("l", "down", cut)  # the same toxics again: the budget keeps counting
        writer.write(b"m" * 10_000)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            while True:
                data = await reader.read(65536)
                if not data:
                    raise asyncio.IncompleteReadError(bytes(got), None)
                got += data
        assert len(got) == 1000  # cut mid-message, exactly at the budget
        assert (net.stats("l").resets, net.stats("l").broken) == (1, 0)
        writer.close()
        # New connections are accepted; once healed they carry everything.
        net.heal()
        reader, writer = await dial(port)
        writer.write(b"n" * 10_000)
        assert await read_exactly(reader, 10_000) == b"n" * 10_000
        writer.close()


async def test_reset_cuts_live_connections_only() -> None:
    async with asyncio.timeout(LIMIT), proxied() as (net, port, _):
        reader, writer = await dial(port)
        writer.write(b"a")
        await read_exactly(reader, 1)
        assert net.reset("l") == 1
        with pytest.raises(ConnectionResetError):
            await reader.read(1)  # an RST, not an orderly end of stream
        again_r, again_w = await dial(port)
        again_w.write(b"b")
        assert await read_exactly(again_r, 1) == b"b"
        again_w.close()
        writer.close()


async def test_blackhole_holds_bytes_with_tcp_open_and_heal_delivers_them() -> None:
    async with asyncio.timeout(LIMIT), proxied() as (net, port, upstream):
        reader, writer = await dial(port)
        net.apply("l", "both", Toxics(blackhole=True))
        writer.write(b"held")
        await until(lambda: net.stats("l").held_up == 4)
        assert await still_open(reader, 0.3)
        assert upstream.received == b""
        # A new connection is accepted and swallowed as well.
        other_r, other_w = await dial(port)
        other_w.write(b"also")
        assert await still_open(other_r, 0.1)
        net.heal()
        assert await read_exactly(reader, 4) == b"held"  # held bytes are delivered, in order
        assert await read_exactly(other_r, 4) == b"also"
        fresh_r, fresh_w = await dial(port)
        fresh_w.write(b"new")
        assert await read_exactly(fresh_r, 3) == b"new"
        for w in (writer, other_w, fresh_w):
            w.close()


async def test_a_one_way_partition_delivers_one_direction_only() -> None:
    async with asyncio.timeout(LIMIT), proxied() as (net, port, upstream):
        net.apply("l", "down", Toxics(blackhole=True))
        reader, writer = await dial(port)
        writer.write(b"to-parent")
        await until(lambda: bytes(upstream.received) == b"to-parent")
        assert await still_open(reader, 0.3)  # the echo is held on the way back
        assert net.stats("l").held_down == len(b"to-parent")
        writer.close()


async def test_refuse_closes_new_connections_at_once() -> None:
    async with asyncio.timeout(LIMIT), proxied() as (net, port, upstream):
        net.refuse("l")
        reader, writer = await dial(port)
        with pytest.raises(ConnectionResetError):
            await reader.read(1)
            await reader.read(1)  # some kernels report the RST on the second read
        writer.close()
        assert net.stats("l").refused == 1 and net.stats("l").accepted == 0
        assert upstream.received == b""
        net.heal()
        reader, writer = await dial(port)
        writer.write(b"ok")
        assert await read_exactly(reader, 2) == b"ok"
        writer.close()


async def test_counters_count_connections_and_bytes() -> None:
    async with asyncio.timeout(LIMIT), proxied() as (net, port, _):
        for _ in range(3):
            reader, writer = await dial(port)
            writer.write(b"12345")
            await read_exactly(reader, 5)
            writer.write_eof()
            assert await reader.read() == b""  # end of stream passes through both ways
            writer.close()
        await until(lambda: net.stats("l").active == 0)
        stats = net.stats("l")
        assert (stats.accepted, stats.bytes_up, stats.bytes_down) == (3, 15, 15)
        assert (stats.refused, stats.resets, stats.broken) == (0, 0, 0)
        assert (stats.held_up, stats.held_down, stats.upstream_failed) == (0, 0, 0)
        assert net.all_stats() == {"l": stats}


async def test_an_endpoint_reset_is_passed_on_and_counted_apart_from_faults() -> None:
    async with asyncio.timeout(LIMIT), proxied(echo=False) as (net, port, upstream):
        _, writer = await dial(port)
        writer.write(b"hello")
        await until(lambda: bytes(upstream.received) == b"hello")
        _rst(writer)
        await until(lambda: upstream.ended == ["reset"])  # an RST, not an end of stream
        await until(lambda: net.stats("l").active == 0)
        assert (net.stats("l").broken, net.stats("l").resets) == (1, 0)


async def test_an_unreachable_upstream_closes_the_client_and_is_counted() -> None:
    async with asyncio.timeout(LIMIT):
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        dead_port = int(probe.sockets[0].getsockname()[1])
        probe.close()
        await probe.wait_closed()
        net = FaultNetwork()
        try:
            port = await net.add_link("dead", ("127.0.0.1", dead_port))
            reader, writer = await dial(port)
            with pytest.raises(ConnectionResetError):
                await reader.read(1)
                await reader.read(1)
            writer.close()
            assert net.stats("dead").upstream_failed == 1
        finally:
            await net.close()


async def test_a_held_direction_stops_reading_at_its_cap() -> None:
    cap = 256 * 1024
    async with asyncio.timeout(LIMIT), proxied(cap_bytes=cap) as (net, port, upstream):
        net.apply("l", "up", Toxics(blackhole=True))
        _, writer = await dial(port)
        writer.transport.set_write_buffer_limits(high=64 * 1024)
        stalls = 0
        for _ in range(400):  # up to 25 MB offered; the kernels' buffers take a few MB at most
            writer.write(b"z" * 64 * 1024)
            try:
                await asyncio.wait_for(writer.drain(), 0.02)
            except TimeoutError:
                stalls += 1
                if stalls == 5:
                    break
        assert stalls == 5  # the sender was blocked
        assert net.stats("l").held_up <= cap + READ_SIZE
        assert writer.transport.get_write_buffer_size() > 0  # TCP pushed back on the sender
        net.heal()
        await until(lambda: len(upstream.received) > cap)  # flow resumes once healed
        writer.transport.abort()


async def test_close_leaves_no_task_and_no_socket(loop_errors: list[dict[str, Any]]) -> None:
    upstream = Upstream()
    address = await upstream.start()
    before = asyncio.all_tasks()
    net = FaultNetwork()
    port = await net.add_link("a", address)
    await net.add_link("b", address)
    reader, writer = await dial(port)
    net.apply("a", "down", Toxics(blackhole=True))
    writer.write(b"x")
    await until(lambda: net.stats("a").held_down == 1)
    async with asyncio.timeout(LIMIT):
        await net.close()
        assert await reader.read() == b""  # the client's connection was closed
    assert asyncio.all_tasks() - before == set()
    for name in ("a", "b"):
        server = net.link(name).server
        assert server is not None and not server.is_serving()
    with pytest.raises(OSError):
        await dial(port)
    with pytest.raises(RuntimeError):
        await net.add_link("c", address)
    writer.close()
    await upstream.stop()
    assert loop_errors == []


async def test_random_toxic_changes_during_a_transfer_never_break_the_proxy(
    loop_errors: list[dict[str, Any]],
) -> None:
    rng = random.Random(13)
    payload = bytes(rng.getrandbits(8) for _ in range(400_000))

    def random_toxics(resets: bool) -> Toxics:
        return Toxics(
            latency_ms=rng.choice([0, 1, 5, 20]),
            jitter_ms=rng.choice([0, 3, 10]),
            rate_kbps=rng.choice([0, 0, 4000, 40_000]),
            loss=rng.choice([0.0, 0.01, 0.2]),
            rto_ms=rng.choice([1.0, 5.0]),
            reorder=rng.choice([0.0, 0.3]),
            reorder_ms=rng.choice([1.0, 4.0]),
            reset_after_bytes=rng.choice([None, None, 0, 1, 5000]) if resets else None,
            blackhole=rng.random() < 0.2,
        )

    async with asyncio.timeout(LIMIT), proxied(cap_bytes=64 * 1024) as (net, port, _):
        # Without resets the stream arrives whole and in order, whatever changes midway.
        reader, writer = await dial(port)

        async def churn(resets: bool, rounds: int) -> None:
            for _ in range(rounds):
                net.apply("l", rng.choice(["up", "down", "both"]), random_toxics(resets))
                net.refuse("l", rng.random() < 0.1)
                await asyncio.sleep(rng.uniform(0, 0.02))
            net.heal()

        churning = asyncio.create_task(churn(False, 40))
        writer.write(payload)
        assert await read_exactly(reader, len(payload)) == payload
        await churning
        writer.close()
        # With resets too: connections die, the proxy does not.
        churning = asyncio.create_task(churn(True, 40))
        while not churning.done():
            try:
                r, w = await dial(port)
                w.write(payload[:50_000])
                await asyncio.wait_for(r.read(65536), 0.05)
                w.transport.abort()
            except (ConnectionError, TimeoutError):
                pass
        await churning
        r, w = await dial(port)
        w.write(b"still here")
        assert await read_exactly(r, 10) == b"still here"
        w.close()
    assert loop_errors == []


def chunk(size: int, loss_u: float = 0.5, reorder_u: float = 0.5) -> _Chunk:
    return _Chunk(memoryview(b"x" * size), size, 0.0, 0.0, loss_u, reorder_u)


def test_loss_is_a_retransmission_stall_that_backs_off() -> None:
    lossy = Toxics(loss=0.1, rto_ms=200)
    assert _stall_s(lossy, chunk(MSS, loss_u=0.5)) == 0.0  # not lost
    assert _stall_s(lossy, chunk(MSS, loss_u=0.05)) == pytest.approx(0.2)  # lost once
    assert _stall_s(lossy, chunk(MSS, loss_u=0.005)) == pytest.approx(0.6)  # and again: 200+400
    worst = 0.2 * (2**MAX_RETRANSMITS - 1)
    assert _stall_s(lossy, chunk(MSS, loss_u=1e-300)) == pytest.approx(worst)
    assert _stall_s(lossy, chunk(MSS, loss_u=0.0)) == pytest.approx(worst)
    # A chunk of many segments meets a loss more often: 1 - 0.9**45 is about 0.99.
    assert _stall_s(lossy, chunk(45 * MSS, loss_u=0.9)) > 0
    assert _stall_s(Toxics(), chunk(45 * MSS, loss_u=0.0)) == 0.0


def test_reordering_is_seen_as_delay() -> None:
    toxics = Toxics(reorder=0.25, reorder_ms=30)
    assert _stall_s(toxics, chunk(10, reorder_u=0.1)) == pytest.approx(0.03)
    assert _stall_s(toxics, chunk(10, reorder_u=0.3)) == 0.0


async def test_each_link_draws_from_its_own_seeded_generator() -> None:
    draws: list[list[float]] = []
    for _ in range(2):
        net = FaultNetwork(seed=3)
        try:
            for name in ("a", "b"):
                await net.add_link(name, ("127.0.0.1", 9))
            draws.append([net.link(n).rng.random() for n in ("a", "b")])
        finally:
            await net.close()
    assert draws[0] == draws[1]  # the same seed and names: the same draws
    assert draws[0][0] != draws[0][1]  # links do not share a stream


def test_toxics_and_names_are_checked() -> None:
    for bad in (
        {"latency_ms": -1},
        {"rate_kbps": float("nan")},
        {"loss": 1.0},
        {"reorder": -0.1},
        {"reset_after_bytes": -5},
    ):
        with pytest.raises(ValueError):
            Toxics(**bad)
    net = FaultNetwork()
    with pytest.raises(KeyError, match="nope"):
        net.apply("nope", "up", Toxics())
    with pytest.raises(ValueError, match="direction"):
        net.apply(None, "sideways", Toxics())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FaultNetwork(cap_bytes=0)


async def test_encrypted_websocket_peers_reconnect_and_deliver_through_the_proxy() -> None:
    pki = Pki()
    agg_sink, site_sink = Sink(), Sink()
    agg = peers(pki.agg, pki.roster, listen=("127.0.0.1", 0), accept_from={"site-1"})
    net = FaultNetwork(seed=5)
    try:
        async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
            agg_task = tg.create_task(agg.run(agg_sink))
            await until(lambda: agg.listen_url is not None)
            assert agg.listen_url is not None
            url = urlsplit(agg.listen_url)
            assert url.port is not None
            port = await net.add_link("site-1->agg", ("127.0.0.1", url.port))
            via_proxy = url._replace(netloc=f"127.0.0.1:{port}").geturl()
            site = peers(pki.site, pki.roster, dial=[DialTarget("agg", via_proxy)])
            site_task = tg.create_task(site.run(site_sink))
            await until(lambda: "site-1" in agg.connected() and "agg" in site.connected())

            def received(seq: int) -> list[Update]:
                return [
                    e.msg
                    for e in agg_sink.events()
                    if isinstance(e, Received) and isinstance(e.msg, Update) and e.msg.seq == seq
                ]

            # With latency both ways an update and its ack still go through, only later.
            net.apply("site-1->agg", "both", Toxics(latency_ms=100))
            started = time.monotonic()
            assert agg.send("site-1", Ack("site-1", 0))
            await until(lambda: Received("agg", Ack("site-1", 0)) in site_sink.events())
            assert time.monotonic() - started >= 0.1
            assert site.send("agg", Update("site-1", 1, 0, delta(), 10))
            await until(lambda: len(received(1)) == 1)

            # A 1.2 MB update cut by an RST mid-message: both sides see the link go down ...
            net.apply("site-1->agg", "up", Toxics(reset_after_bytes=200_000))
            assert site.send("agg", Update("site-1", 2, 0, delta(), 10))
            await until(lambda: PeerDown("agg") in site_sink.all())
            await until(lambda: PeerDown("site-1") in agg_sink.all())
            assert net.stats("site-1->agg").resets >= 1
            assert received(2) == []  # a torn message is never delivered
            # ... and once healed the site redials through the proxy and delivers.
            net.heal()
            await until(lambda: site_sink.all().count(PeerUp("agg")) >= 2)
            await until(lambda: "site-1" in agg.connected())
            update = Update("site-1", 2, 0, delta(), 10)
            assert site.send("agg", update)
            await until(lambda: len(received(2)) == 1)
            np.testing.assert_array_equal(received(2)[0].delta["w"], update.delta["w"])
            assert net.stats("site-1->agg").accepted >= 2
            site_task.cancel()
            agg_task.cancel()
    finally:
        await net.close()
