"""A hostile gossip peer inside a running, training gossip network (every driver).

The honest peers are real ``GossipPeer``s built as the simulator builds them (plan mixing
weights, ``max_share_weight`` from the number of peers, clip on by default); the hostile
one is a real ``GossipPeer`` whose outgoing shares are rewritten on the way out, as a
modified peer would: models of 1e30, or push-sum weights of 1e15 carrying a chosen model.
The honest peers must keep training a finite model that the hostile one does not capture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.gossip import GossipPeer, share_weight_bound
from fedloom.algorithms.protocol import Effect, Event, Send
from fedloom.topology.gossip import gossip
from fedloom.topology.specs import Site
from fedloom.topology.wan import WanModel
from fedloom.transport.wire import GossipShare, Heartbeat
from tests.conformance.harness import Federation
from tests.conformance.toy_nodes import NoisyTrainer

EVIL = "p0"
TARGET = 1e6  # where a weight-inflating peer tries to set its neighbours' models


class HostilePeer:
    """A ``GossipPeer`` whose every share is rewritten before it leaves.

    Under push-sum it also sends a rewritten share wherever the peer would send a
    heartbeat: an attacker does not pace itself. (Its inner peer may otherwise withhold
    every share: the weight attacker's neighbours refuse what it sends, so they take none
    of its mass and seem to owe it more. Without this the attack could go unsent.)
    """

    def __init__(self, inner: GossipPeer, attack: str, mode: str) -> None:
        self.inner = inner
        self.attack = attack
        self.mode = mode

    @property
    def node_id(self) -> str:
        return self.inner.node_id

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def current_model(self) -> Any:
        return self.inner.current_model()

    def _rewrite(self, s: GossipShare) -> GossipShare:
        if self.attack == "weight":
            x = {k: np.full(v.shape, 1e15 * TARGET, v.dtype) for k, v in s.x.items()}
            return dataclasses.replace(s, x=x, w=1e15)
        # finite in float32, 1e30 from anything honest
        return dataclasses.replace(
            s, x={k: np.full(v.shape, 1e30, v.dtype) for k, v in s.x.items()}
        )

    def handle(self, event: Event, now: float) -> list[Effect]:
        out: list[Effect] = []
        for e in self.inner.handle(event, now):
            if isinstance(e, Send) and isinstance(e.msg, GossipShare):
                e = Send(e.peer, self._rewrite(e.msg))
            elif isinstance(e, Send) and isinstance(e.msg, Heartbeat) and self.mode == "pushsum":
                step, model = self.inner.current_model()
                w = 0.01  # a light share (within the receiver's weight budget) ...
                share = GossipShare(self.node_id, step, {k: w * v for k, v in model.items()}, w)
                out.append(Send(e.peer, self._rewrite(share)))  # ... before rewriting
            out.append(e)
        return out


@pytest.mark.parametrize(
    ("mode", "attack"), [("dpsgd", "huge"), ("pushsum", "huge"), ("pushsum", "weight")]
)
def test_hostile_gossip_peer_neither_captures_nor_stalls_its_neighbours(
    federation: Federation, mode: str, attack: str
) -> None:
    plan = gossip([Site(f"p{i}", region="eu") for i in range(8)], WanModel(), graph="exponential")
    bound = share_weight_bound("auto", len(plan.nodes))
    nodes: dict[str, Any] = {}
    for i, spec in enumerate(plan.nodes):
        peer = GossipPeer(
            spec.id,
            dict(spec.mixing),
            spec.self_weight,
            {"w": np.zeros((2, 2), dtype=np.float32)},
            mode=mode,
            train_config={"lr": 0.1, "seed": i},
            gossip_interval_s=1.0,
            max_share_weight=bound,
            rng=np.random.default_rng(i),
        )
        nodes[spec.id] = HostilePeer(peer, attack, mode) if spec.id == EVIL else peer
    victims = set(plan.node(EVIL).peers)
    assert victims and len(victims) < len(nodes) - 1
    roles = {n: "peer" for n in nodes}
    pairs = sorted({tuple(sorted((n.id, p))) for n in plan.nodes for p in n.peers})
    federation.start(nodes, roles, pairs, trainer=NoisyTrainer())  # type: ignore[arg-type]

    honest = [n for n in nodes if n != EVIL]

    def steps() -> int:
        return min(int(nodes[n].current_model()[0]) for n in honest)

    assert federation.run_until(lambda: steps() >= 20, timeout_s=600)
    # Under D-PSGD every training step adds ~0.1 (NoisyTrainer.step) and clipping bounds
    # what a 1e30 neighbour can do: it moves a victim by at most W·τ per step (the mix
    # takes p0's latest model once), τ the victim's ClippedGossip radius (a few times the
    # honest distances; it grows as the network is dragged up, so the largest at the end
    # bounds the run's); mixing never raises the largest honest model, so the bound is
    # the run's own drift plus the victims' pulls. Under push-sum a share moves x/w by at
    # most τ·w_s/(w + w_s), but a training step moves x/w by its step over w, and the
    # victims' w shrinks as they send mass to p0, which keeps what it is sent (under the
    # weight attack p0's refused shares return none of it): their x/w takes larger
    # training steps (tens here, up to ~7 on the network driver under load against ~2
    # without an attacker), so only capture is ruled out there: nothing near 1e30, or
    # the 1e6 a claimed weight was meant to set.
    limit = 1e3
    if mode == "dpsgd":
        tau = max(nodes[n].clip_radius() or 0.0 for n in honest)
        drift = NoisyTrainer().step * max(nodes[n].current_model()[0] for n in honest)
        limit = drift + sum(
            nodes[v].current_model()[0] * dict(plan.node(v).mixing)[EVIL] * tau for v in victims
        )
    for n in honest:
        w = np.asarray(nodes[n].current_model()[1]["w"], dtype=np.float64)
        assert np.isfinite(w).all()
        assert float(np.abs(w).max()) < limit, (n, w, limit)
    seen = [m for m in federation.journal.metrics if m.node != EVIL]
    if attack == "weight":
        rejected = [m for m in seen if m.metric.name == "update_rejected"]
        assert rejected and {m.labels["reason"] for m in rejected} == {"share weight over bound"}
        assert {m.node for m in rejected} <= victims
    else:
        # Every victim clipped p0 (honest peers it dragged may also clip each other a little).
        clipped = [m for m in seen if m.metric.name == "gossip_clipped"]
        assert {m.node for m in clipped if m.labels["peer"] == EVIL} == victims
