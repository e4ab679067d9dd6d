"""Gossip through a relay: two peers that accept no inbound connections reach each other
via a relay daemon, end-to-end signed (issue 4, "gossips through a relay")."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import Effect, Event, PeerDown, PeerUp, Received, Send
from fedloom.algorithms.relay import RelayNode
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.network_peers import DialTarget, NetworkPeers
from fedloom.transport.identity import Identity
from fedloom.transport.relay import PAYLOAD
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.wire import GossipShare, Heartbeat, Message, Relayed
from tests.runtime.test_signatures import LIMIT, Hub, Sink, node, until

RELAY = Identity.generate("relay", "relay")
A = Identity.generate("peer-a", "peer")
B = Identity.generate("peer-b", "peer")
C = Identity.generate("peer-c", "peer")
ROSTER = Roster(1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (RELAY, A, B, C)])


def share(src: str, step: int, n: int = 500) -> GossipShare:
    x = np.random.default_rng(step).standard_normal(n).astype(np.float32)
    return GossipShare(src, step, {"w": x}, 0.5)


class TamperingRelay(RelayNode):
    """Flips one payload bit of every second envelope it forwards, from the first on."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.n = 0

    def handle(self, event: Event, now: float) -> list[Effect]:
        out = super().handle(event, now)
        for i, e in enumerate(out):
            if isinstance(e, Send) and isinstance(e.msg, Relayed):
                self.n += 1
                if self.n % 2 == 1:
                    data = e.msg.payload[PAYLOAD].copy()
                    data[-1] ^= 1
                    out[i] = Send(e.peer, dataclasses.replace(e.msg, payload={PAYLOAD: data}))
        return out


class ReplayingRelay(RelayNode):
    """Forwards every envelope twice."""

    def handle(self, event: Event, now: float) -> list[Effect]:
        out = super().handle(event, now)
        return out + [e for e in out if isinstance(e, Send)]


@dataclasses.dataclass
class World:
    hub: Hub
    relay: NetworkPeers
    relay_driver: AsyncDriver
    peers: dict[str, NetworkPeers]
    sinks: dict[str, Sink]
    tasks: list[asyncio.Task[Any]]

    def got(self, node: str, src: str) -> list[Message]:
        sink = self.sinks[node]
        return [e.msg for e in sink.posted if isinstance(e, Received) and e.peer == src]


def make_peers(hub: Hub, identity: Identity, **kwargs: Any) -> NetworkPeers:
    return node(hub, identity, roster=ROSTER, **kwargs)


def peers_of(hub: Hub, identity: Identity, url: str, routes: dict[str, str]) -> NetworkPeers:
    return make_peers(hub, identity, dial=[DialTarget("relay", url)], routes=routes)


@contextlib.asynccontextmanager
async def world(relay_node: RelayNode | None = None) -> AsyncIterator[World]:
    hub = Hub()
    relay = make_peers(hub, RELAY, listen=("relay", 0), allowed_roles=("peer",))
    relay_driver = AsyncDriver(relay_node or RelayNode("relay"), peers=relay)
    tasks = [asyncio.ensure_future(relay_driver.run())]
    await until(lambda: relay.listen_url is not None)
    assert relay.listen_url is not None
    routes = {
        "peer-a": {"peer-b": "relay"},
        "peer-b": {"peer-a": "relay"},
        "peer-c": {"peer-b": "relay"},
    }
    peers = {
        n: peers_of(hub, i, relay.listen_url, routes[n])
        for n, i in (("peer-a", A), ("peer-b", B), ("peer-c", C))
    }
    sinks = {n: Sink() for n in peers}
    tasks += [asyncio.ensure_future(p.run(sinks[n])) for n, p in peers.items()]
    w = World(hub, relay, relay_driver, peers, sinks, tasks)
    try:
        await until(lambda: len(relay_driver.node.connected()) == 3)  # type: ignore[attr-defined]
        yield w
    finally:
        relay_driver.stop()
        for t in tasks[1:]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        hub.close()


async def test_two_firewalled_peers_gossip_through_the_relay() -> None:
    async with asyncio.timeout(LIMIT), world() as w:
        a, b = w.peers["peer-a"], w.peers["peer-b"]
        assert PeerUp("peer-b") in w.sinks["peer-a"].posted  # up while the relay link is
        assert a.connected() == {"relay", "peer-b"}
        big = share("peer-a", 2, n=2_000_000)  # 8 MB: streamed, sealed off the loop
        assert a.send("peer-b", share("peer-a", 1))
        assert a.send("peer-b", big)
        assert b.send("peer-a", Heartbeat("peer-b", 7))
        await until(lambda: len(w.got("peer-b", "peer-a")) == 2)
        await until(lambda: len(w.got("peer-a", "peer-b")) == 1)
        first, second = w.got("peer-b", "peer-a")
        assert isinstance(first, GossipShare) and first.step == 1
        assert isinstance(second, GossipShare) and second.step == 2
        assert np.array_equal(second.x["w"], big.x["w"])
        assert w.got("peer-a", "peer-b") == [Heartbeat("peer-b", 7)]
        assert not w.got("peer-b", "relay")  # envelopes never reach the node as such
        assert w.relay_driver.node.forwarded == 3  # type: ignore[attr-defined]


async def test_an_altered_envelope_is_dropped_and_the_relay_link_stays_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with asyncio.timeout(LIMIT), world(TamperingRelay("relay")) as w:
        caplog.set_level(logging.WARNING)
        a = w.peers["peer-a"]
        assert a.send("peer-b", share("peer-a", 1))  # tampered on the way
        assert a.send("peer-b", share("peer-a", 2))  # passes
        await until(lambda: len(w.got("peer-b", "peer-a")) == 1)
        assert [m.step for m in w.got("peer-b", "peer-a")] == [2]  # type: ignore[union-attr]
        assert "dropped a relayed message from peer-a via relay (bad_signature)" in caplog.text
        assert w.peers["peer-b"].e2e.rejected["bad_signature"] == 1
        assert "relay" in w.peers["peer-b"].connected()
        assert PeerDown("relay") not in w.sinks["peer-b"].posted


async def test_a_relay_cannot_replay(caplog: pytest.LogCaptureFixture) -> None:
    async with asyncio.timeout(LIMIT), world(ReplayingRelay("relay")) as w:
        caplog.set_level(logging.WARNING)
        assert w.peers["peer-a"].send("peer-b", share("peer-a", 1))
        assert w.peers["peer-a"].send("peer-b", share("peer-a", 2))
        await until(lambda: w.peers["peer-b"].e2e.rejected["replay"] == 2)
        assert [m.step for m in w.got("peer-b", "peer-a")] == [1, 2]  # type: ignore[union-attr]


async def test_only_neighbours_routed_through_the_relay_get_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with asyncio.timeout(LIMIT), world() as w:
        caplog.set_level(logging.WARNING)
        # peer-c signs its envelope properly, but peer-b expects nothing from it.
        assert w.peers["peer-c"].send("peer-b", share("peer-c", 1))
        assert w.peers["peer-a"].send("peer-b", share("peer-a", 1))
        await until(lambda: len(w.got("peer-b", "peer-a")) == 1)
        await until(lambda: "which is not its relay" in caplog.text)
        assert not w.got("peer-b", "peer-c")


FLOOD = 2_000


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(r.levelno >= logging.WARNING and text in r.getMessage() for r in caplog.records)


async def send_all(
    peers: NetworkPeers, dst: str, msgs: list[Message], arrived: Callable[[], int]
) -> None:
    """Send ``msgs`` to ``dst`` a batch at a time, each once ``arrived()`` (messages the
    receiver has taken or refused) shows the previous ones through: the send queue is
    bounded, and overflowing it ends the connection."""
    for start in range(0, len(msgs), 100):
        batch = msgs[start : start + 100]
        for msg in batch:
            assert peers.send(dst, msg)
        sent = start + len(batch)
        while arrived() < sent:
            await asyncio.sleep(0.005)


async def test_a_flood_of_altered_envelopes_makes_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The attack (second review, finding 6): 2,000 envelopes that fail their signature
    check reach peer-b (here a relay alters them; a forging peer is the same path). Each
    is counted; the log gets one line per relay and reason a minute, not one each; the
    relay link stays up and the 2,000 genuine messages in between all arrive."""
    async with asyncio.timeout(LIMIT), world(TamperingRelay("relay")) as w:
        caplog.set_level(logging.WARNING)
        msgs: list[Message] = [Heartbeat("peer-a", i) for i in range(1, 2 * FLOOD + 1)]
        b = w.peers["peer-b"]
        await send_all(
            w.peers["peer-a"],
            "peer-b",
            msgs,
            lambda: len(w.got("peer-b", "peer-a")) + b.e2e.rejected["bad_signature"],
        )
        assert w.got("peer-b", "peer-a") == msgs[1::2]  # every genuine one, in order
        assert w.peers["peer-b"].e2e.rejected["bad_signature"] == FLOOD
        assert warnings_with(caplog, "dropped a relayed message") == 1
        assert "relay" in w.peers["peer-b"].connected()
        assert PeerDown("relay") not in w.sinks["peer-b"].posted


async def test_a_flood_from_a_peer_not_routed_through_the_relay_makes_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The attack: a rostered peer (peer-c) that peer-b expects nothing from sends it
    2,000 properly signed messages through the relay. Each is dropped and counted, with
    one log line; peer-a's messages still arrive."""
    async with asyncio.timeout(LIMIT), world() as w:
        caplog.set_level(logging.WARNING)
        flood: list[Message] = [Heartbeat("peer-c", i) for i in range(1, FLOOD + 1)]
        table = w.peers["peer-b"].table
        await send_all(w.peers["peer-c"], "peer-b", flood, lambda: table.dropped_relayed)
        assert w.peers["peer-a"].send("peer-b", Heartbeat("peer-a", 1))
        await until(lambda: len(w.got("peer-b", "peer-a")) == 1)
        assert not w.got("peer-b", "peer-c")
        assert warnings_with(caplog, "which is not its relay") == 1


async def test_every_connection_reports_its_handshake_round_trip() -> None:
    hub = Hub()
    relay = make_peers(hub, RELAY, listen=("relay", 0), allowed_roles=("peer",))
    samples: list[tuple[str, str, float]] = []
    relay.on_link_rtt = lambda peer, s: samples.append(("relay", peer, s))
    tasks = [asyncio.ensure_future(relay.run(Sink()))]
    try:
        async with asyncio.timeout(LIMIT):
            await until(lambda: relay.listen_url is not None)
            assert relay.listen_url is not None
            a = make_peers(hub, A, dial=[DialTarget("relay", relay.listen_url)])
            a.on_link_rtt = lambda peer, s: samples.append(("peer-a", peer, s))
            tasks.append(asyncio.ensure_future(a.run(Sink())))
            await until(lambda: len(samples) == 2)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        hub.close()
    assert sorted((me, peer) for me, peer, _ in samples) == [
        ("peer-a", "relay"),
        ("relay", "peer-a"),
    ]
    assert all(s > 0 for _, _, s in samples)


async def test_the_routed_peer_goes_down_with_the_relay() -> None:
    async with asyncio.timeout(LIMIT), world() as w:
        w.relay_driver.stop()
        await until(lambda: PeerDown("peer-b") in w.sinks["peer-a"].posted)
        assert PeerDown("relay") in w.sinks["peer-a"].posted
        assert not w.peers["peer-a"].send("peer-b", share("peer-a", 1))  # dropped, counted


def test_routes_must_go_through_a_dialled_relay() -> None:
    hub = Hub()
    with pytest.raises(ValueError, match="not dialled"):
        make_peers(hub, A, routes={"peer-b": "relay"})
    with pytest.raises(ValueError, match="dialled directly"):
        make_peers(
            hub,
            A,
            dial=[DialTarget("relay", "mem://x"), DialTarget("peer-b", "mem://y")],
            routes={"peer-b": "relay"},
        )
