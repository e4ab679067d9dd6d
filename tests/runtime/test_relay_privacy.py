"""A relay that reads and replays (issue 10, item 7): relayed shares are ciphertext to
the relay, and a relay that replays recorded envelopes to a receiver restarted on the
same state directory is refused, so push-sum mass is not added twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from fedloom.algorithms.gossip import GossipPeer
from fedloom.algorithms.protocol import Effect, Event, PeerUp, Received, Send
from fedloom.algorithms.relay import RelayNode
from fedloom.federation.store import StateStore
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.network_peers import DialTarget, NetworkPeers
from fedloom.runtime.relay_seq import RELAY_SEQ_KEY, RelaySeqState
from fedloom.runtime.signing import EndToEnd
from fedloom.transport import wire
from fedloom.transport.relay import PAYLOAD
from fedloom.transport.wire import GossipShare, Relayed
from tests.runtime.test_relaying import RELAY as RELAY_ID
from tests.runtime.test_relaying import ROSTER, B, make_peers, peers_of, share
from tests.runtime.test_relaying import A as PEER_A
from tests.runtime.test_signatures import LIMIT, Hub, Sink, until


class RecordingRelay(RelayNode):
    """Forwards honestly and keeps every envelope it handles; with ``replay`` on, sends a
    peer every recorded envelope for it again whenever that peer (re)connects."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.carried: list[Relayed] = []
        self.replay = False

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, Received) and isinstance(event.msg, Relayed):
            self.carried.append(event.msg)
        out = super().handle(event, now)
        if isinstance(event, PeerUp) and self.replay:
            out += [Send(event.peer, m) for m in self.carried if m.dst == event.peer]
        return out


class Receiver:
    """peer-b with its relay numbers kept in ``state_dir`` (as the daemon keeps them)."""

    def __init__(self, hub: Hub, url: str, state_dir: Path, *, durable: bool = True) -> None:
        self.store = StateStore(state_dir)
        recovered = self.store.load().values.get(RELAY_SEQ_KEY)
        self.e2e = EndToEnd(B, ROSTER)
        if durable:
            self.e2e.keep_relay_seq(RelaySeqState(self.store, recovered))
        self.peers: NetworkPeers = make_peers(
            hub, B, dial=[DialTarget("relay", url)], routes={"peer-a": "relay"}, e2e=self.e2e
        )
        self.sink = Sink()
        self.task = asyncio.ensure_future(self.peers.run(self.sink))

    def from_a(self) -> list[GossipShare]:
        got = [e.msg for e in self.sink.posted if isinstance(e, Received) and e.peer == "peer-a"]
        return [m for m in got if isinstance(m, GossipShare)]

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.store.close()


@contextlib.asynccontextmanager
async def relay_world() -> AsyncIterator[tuple[Hub, RecordingRelay, str, NetworkPeers]]:
    hub = Hub()
    relay = make_peers(hub, RELAY_ID, listen=("relay", 0), allowed_roles=("peer",))
    node = RecordingRelay("relay")
    driver = AsyncDriver(node, peers=relay)
    tasks = [asyncio.ensure_future(driver.run())]
    try:
        await until(lambda: relay.listen_url is not None)
        assert relay.listen_url is not None
        a = peers_of(hub, PEER_A, relay.listen_url, {"peer-b": "relay"})
        tasks.append(asyncio.ensure_future(a.run(Sink())))
        yield hub, node, relay.listen_url, a
    finally:
        driver.stop()
        for t in tasks[1:]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        hub.close()


def pushsum_b() -> GossipPeer:
    w = {"w": np.zeros(500, np.float32)}
    return GossipPeer(
        "peer-b", {"peer-a": 0.5}, 0.5, w, mode="pushsum", rng=np.random.default_rng(0)
    )


def deliver(node: GossipPeer, events: list[Event]) -> None:
    node.handle(PeerUp("peer-a"), 0.0)
    for e in events:
        if isinstance(e, Received):
            node.handle(e, 0.0)


async def test_the_relay_sees_only_ciphertext(tmp_path: Path) -> None:
    async with asyncio.timeout(LIMIT), relay_world() as (hub, relay, url, a):
        b = Receiver(hub, url, tmp_path / "b")
        try:
            await until(lambda: relay.connected() == {"peer-a", "peer-b"})
            sent = share("peer-a", 1, n=50_000)
            assert a.send("peer-b", sent)
            await until(lambda: len(b.from_a()) == 1)
            assert np.array_equal(b.from_a()[0].x["w"], sent.x["w"])
        finally:
            await b.stop()
    (env,) = relay.carried
    handled = wire.encode(env)  # every byte of the envelope the relay decrypted off its hop
    assert len(handled) > sent.x["w"].nbytes  # the share is in there, encrypted
    assert wire.encode(sent) not in handled
    weights = sent.x["w"].tobytes()
    assert not any(weights[i : i + 32] in handled for i in range(0, len(weights), 4096))
    assert b"gossip_share" not in bytes(env.payload[PAYLOAD])


@pytest.mark.parametrize("durable", [True, False])
async def test_a_replay_to_a_restarted_receiver_is_refused(tmp_path: Path, durable: bool) -> None:
    async with asyncio.timeout(LIMIT), relay_world() as (hub, relay, url, a):
        b = Receiver(hub, url, tmp_path / "b", durable=durable)
        await until(lambda: relay.connected() == {"peer-a", "peer-b"})
        assert a.send("peer-b", share("peer-a", 1))
        await until(lambda: len(b.from_a()) == 1)
        node = pushsum_b()
        deliver(node, b.sink.posted)
        assert node.mass()[0] == pytest.approx(1.5)  # 1 of its own + 0.5 from the share
        await b.stop()
        await until(lambda: "peer-b" not in relay.connected())

        relay.replay = True  # the relay replays what it recorded once peer-b is back
        again = Receiver(hub, url, tmp_path / "b", durable=durable)
        try:
            await until(lambda: "peer-b" in relay.connected())
            if not durable:  # the attack, against a floor kept in memory only
                await until(lambda: len(again.from_a()) == 1)
                restarted = pushsum_b()
                deliver(restarted, again.sink.posted)
                assert restarted.mass()[0] == pytest.approx(1.5)  # the same mass again
                return
            await until(lambda: again.e2e.rejected["replay"] == 1)
            assert again.from_a() == []
            restarted = pushsum_b()
            deliver(restarted, again.sink.posted)
            assert restarted.mass()[0] == pytest.approx(1.0)  # no mass from the replay
            # Still serving: a fresh share gets through and adds its mass once.
            assert a.send("peer-b", share("peer-a", 2))
            await until(lambda: len(again.from_a()) == 1)
            assert again.from_a()[0].step == 2
            restarted = pushsum_b()
            deliver(restarted, again.sink.posted)
            assert restarted.mass()[0] == pytest.approx(1.5)
            assert "relay" in again.peers.connected()
        finally:
            await again.stop()
