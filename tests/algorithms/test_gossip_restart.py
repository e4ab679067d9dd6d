"""A durable gossip peer keeps its model, step and push-sum mass across a restart."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.gossip import GOSSIP_IN_KEY, GossipPeer
from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    LogRecords,
    PeerUp,
    Persist,
    Received,
    Send,
)
from fedloom.transport.wire import GossipShare

PEERS = ("a", "b", "c")


def start(i: int) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 3), float(i), np.float32), "b": np.full((3,), -float(i), np.float32)}


def peer(name: str, mode: str = "pushsum") -> GossipPeer:
    others = {p: 1.0 / 3.0 for p in PEERS if p != name}
    return GossipPeer(
        name,
        others,
        1.0 / 3.0,
        start(PEERS.index(name)),
        mode=mode,
        gossip_interval_s=1.0,
        heartbeat_interval_s=2.0,
        suspect_after_s=60.0,
        prune_after_s=120.0,
        max_share_weight=3.0,
        rng=np.random.default_rng(PEERS.index(name)),
        durable=True,
    )


class Disk:
    """One peer's state directory: its last checkpoint and the records appended since."""

    def __init__(self) -> None:
        self.checkpoint: Any = None
        self.records: list[Any] = []

    def write(self, p: Persist) -> None:
        if p.append:
            assert p.key == GOSSIP_IN_KEY
            self.records.append(p.data)
        else:
            self.checkpoint, self.records = p.data, []


class Net:
    """Three peers; Persists are durable at once, shares delivered in order unless lost."""

    def __init__(self, mode: str = "pushsum") -> None:
        self.mode = mode
        self.nodes = {p: peer(p, mode) for p in PEERS}
        self.disks = {p: Disk() for p in PEERS}
        self.queue: list[tuple[str, Send]] = []
        self.now = 0.0
        self.persists_before_sends = True
        for name in PEERS:
            self.links_up(name)

    def links_up(self, name: str) -> None:
        """PeerUp for every neighbour of ``name``, as a driver says it once linked."""
        node = self.nodes[name]
        for other in node.peer_states():
            self.effects(name, node.handle(PeerUp(other), self.now))

    def effects(self, name: str, out: list[Effect]) -> None:
        sent = False
        for e in out:
            if isinstance(e, Persist):
                assert not sent or e.append, "a step's checkpoint follows one of its shares"
                self.disks[name].write(e)
            elif isinstance(e, Send):
                sent = sent or isinstance(e.msg, GossipShare)
                self.queue.append((name, e))

    def tick(self, deliver: bool = True) -> None:
        self.now += 0.25
        for name, node in self.nodes.items():
            due = node.next_deadline()
            if due is not None and due <= self.now:
                self.effects(name, node.handle(Deadline(), self.now))
        if deliver:
            self.deliver_all()

    def deliver_all(self) -> None:
        while self.queue:
            src, send = self.queue.pop(0)
            self.effects(send.peer, self.nodes[send.peer].handle(Received(src, send.msg), self.now))

    def in_flight_w(self) -> float:
        return sum(float(s.msg.w) for _, s in self.queue if isinstance(s.msg, GossipShare))

    def total_w(self) -> float:
        return sum(n.mass()[0] for n in self.nodes.values()) + self.in_flight_w()

    def restart(self, name: str) -> GossipPeer:
        fresh = peer(name, self.mode)
        disk = self.disks[name]
        fresh.restore(disk.checkpoint, LogRecords({GOSSIP_IN_KEY: disk.records}))
        self.nodes[name] = fresh
        self.links_up(name)  # a restored peer too: its neighbours are down until then
        return fresh


def test_a_restarted_push_sum_peer_keeps_its_model_and_mass() -> None:
    net = Net()
    for _ in range(20):
        net.tick()
    live = net.nodes["b"]
    w, x = live.mass()
    step = live.current_model()[0]
    assert step > 0 and net.disks["b"].records  # shares taken in since its last step
    back = net.restart("b")
    assert back.mass()[0] == pytest.approx(w, rel=0, abs=1e-12)
    for k in x:
        np.testing.assert_allclose(back.mass()[1][k], x[k], rtol=0, atol=1e-6)
    assert back.current_model()[0] == step
    assert net.total_w() == pytest.approx(3.0, abs=1e-9)


def test_mass_is_conserved_across_a_restart_within_what_was_in_flight() -> None:
    net = Net()
    for _ in range(12):
        net.tick()
    # b steps; one of its two shares is delivered, then b is killed: the other was in flight.
    net.now += 5.0
    net.effects("b", net.nodes["b"].handle(Deadline(), net.now))
    shares = [(s, e) for s, e in net.queue if s == "b" and isinstance(e.msg, GossipShare)]
    assert len(shares) == 2
    net.queue.remove(shares[0])
    dropped = shares[0][1].msg
    assert isinstance(dropped, GossipShare)
    lost = float(dropped.w)
    net.queue = [(s, e) for s, e in net.queue if s != "b"] + [shares[1]]
    net.restart("b")
    net.deliver_all()
    assert net.total_w() == pytest.approx(3.0 - lost, abs=1e-9)
    for _ in range(200):  # gossip goes on and reaches consensus on x/w
        net.tick()
    assert net.total_w() == pytest.approx(3.0 - lost, abs=1e-9)
    models = [n.current_model()[1]["w"] for n in net.nodes.values()]
    assert max(float(np.max(np.abs(m - models[0]))) for m in models) < 1e-3


def test_a_peer_restored_without_the_records_would_lose_mass() -> None:
    """The records are what keep the mass taken in since the last step (guards the test)."""
    net = Net()
    for _ in range(20):
        net.tick()
    disk = net.disks["b"]
    assert disk.records
    fresh = peer("b")
    fresh.restore(disk.checkpoint)
    assert fresh.mass()[0] < net.nodes["b"].mass()[0] - 1e-6


def test_a_restarted_dpsgd_peer_keeps_its_model_and_step() -> None:
    net = Net("dpsgd")
    for _ in range(20):
        net.tick()
    live = net.nodes["c"]
    step, model = live.current_model()
    back = net.restart("c")
    assert back.current_model()[0] == step
    for k in model:
        np.testing.assert_array_equal(back.current_model()[1][k], model[k])


def test_foreign_or_damaged_state_is_refused() -> None:
    net = Net()
    for _ in range(8):
        net.tick()
    state = dict(net.disks["a"].checkpoint)
    with pytest.raises(ValueError, match="not a gossip snapshot"):
        peer("b").restore(state)
    with pytest.raises(ValueError, match="runs 'dpsgd'"):
        peer("a", "dpsgd").restore(state)
    bad = {**state, "x": np.full_like(state["x"], np.nan)}
    with pytest.raises(ValueError, match="finite"):
        peer("a").restore(bad)


def test_mass_taken_from_a_peer_no_longer_listed_is_kept() -> None:
    net = Net()
    for _ in range(8):
        net.tick()
    disk = net.disks["a"]
    w = net.nodes["a"].mass()[0]
    gone = {"peer": "d", "x": np.zeros_like(disk.checkpoint["x"]), "w": 0.25}
    back = peer("a")
    back.restore(disk.checkpoint, LogRecords({GOSSIP_IN_KEY: [*disk.records, gone]}))
    assert back.mass()[0] == pytest.approx(w + 0.25, abs=1e-12)
