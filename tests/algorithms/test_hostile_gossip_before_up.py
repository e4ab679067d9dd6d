"""Gossip shares that arrive before the link's first PeerUp (a neighbour that dials and
sends at once, or one racing its own peer set), and shares from strangers: the real
``GossipPeer.handle`` path. A neighbour stays down until PeerUp whatever it sends, so
nothing goes back on a link the driver has not opened; push-sum keeps the mass it is
given (none created, none lost); D-PSGD does not adopt a down neighbour's model."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.algorithms.gossip import GossipPeer, PeerState
from fedloom.algorithms.protocol import Deadline, PeerUp, Received, Send
from fedloom.transport.wire import GossipShare, Heartbeat


def peer(mode: str) -> GossipPeer:
    return GossipPeer(
        "a",
        {"b": 0.25, "c": 0.25},
        0.5,
        {"w": np.full((2, 3), 4.0)},
        mode=mode,
        clip="off",
        rng=np.random.default_rng(0),
    )


def share(src: str, value: float, w: float = 0.25, step: int = 1) -> Received:
    return Received(src, GossipShare(src, step, {"w": np.full((2, 3), value)}, w))


def sent_to(p: GossipPeer, until: float) -> set[str]:
    """Peers sent anything while ``p`` runs its deadlines up to ``until``."""
    t, peers = 0.0, set()
    while (due := p.next_deadline()) is not None and due <= until:
        t = max(t, due)
        peers |= {e.peer for e in p.handle(Deadline(), t) if isinstance(e, Send)}
    return peers


def test_a_pushsum_share_before_peer_up_is_kept_but_the_link_stays_down() -> None:
    p = peer("pushsum")
    w0, x0 = p.mass()
    out = p.handle(share("b", 8.0, w=0.25), 0.0)
    assert not [e for e in out if isinstance(e, Send)]
    w1, x1 = p.mass()
    assert w1 == pytest.approx(w0 + 0.25)  # its mass is ours now: none created or lost
    assert np.allclose(x1["w"], x0["w"] + 8.0)  # x is mass: the share's x added whole
    assert p.peer_states()["b"] is PeerState.DOWN
    assert sent_to(p, 5.0) == set()  # nothing to b (or c) before their PeerUp
    p.handle(PeerUp("b"), 5.0)
    assert sent_to(p, 10.0) == {"b"}


@pytest.mark.parametrize("mode", ["pushsum", "dpsgd"])
def test_a_heartbeat_before_peer_up_opens_nothing(mode: str) -> None:
    p = peer(mode)
    for t in range(5):
        p.handle(Received("b", Heartbeat("b", t)), float(t))
    assert p.peer_states()["b"] is PeerState.DOWN
    assert sent_to(p, 5.0) == set()


def test_a_dpsgd_model_from_a_neighbour_not_yet_up_is_not_adopted() -> None:
    honest, hostile = peer("dpsgd"), peer("dpsgd")
    hostile.handle(share("b", 1e6, w=0.25, step=50), 0.0)  # before b's PeerUp
    for q in (honest, hostile):
        q.handle(PeerUp("b"), 0.0)
        q.handle(PeerUp("c"), 0.0)
        sent_to(q, 3.0)
    assert np.allclose(hostile.current_model()[1]["w"], honest.current_model()[1]["w"])


@pytest.mark.parametrize("mode", ["pushsum", "dpsgd"])
def test_a_strangers_share_is_refused_before_and_after_any_peer_up(mode: str) -> None:
    p = peer(mode)
    before = p.mass()
    for up in (False, True):
        if up:
            p.handle(PeerUp("b"), 0.0)
            p.handle(PeerUp("zed"), 0.0)  # a PeerUp for a non-neighbour opens nothing
        p.handle(share("zed", 1e6, w=0.9), 0.0)
        p.handle(Received("b", GossipShare("c", 1, {"w": np.full((2, 3), 1e6)}, 0.9)), 0.0)
        assert p.mass()[0] == pytest.approx(before[0])
        assert np.allclose(p.mass()[1]["w"], before[1]["w"])
    assert "zed" not in p.peer_states()
