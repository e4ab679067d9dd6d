"""Gossip consensus experiments: how fast do peers agree on one graph or another?

Each peer starts from its own random vector; no training happens, peers only mix
(``GossipPeer`` in pure-consensus mode) through the simulator's network. The consensus
error at time t is max_i ||x_i - mean|| / ||x_0 - mean_0||, over the peers alive then
(for D-PSGD with symmetric doubly-stochastic weights, the mean of the alive peers is what
they converge to; after a death the survivors converge to a new common value). Theory
says the error shrinks like (1 - gap)^steps, gap the spectral gap of the mixing matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedloom.algorithms.gossip import GossipPeer
from fedloom.algorithms.protocol import ModelHolder, Node
from fedloom.sim.driver import SimDriver
from fedloom.topology.gossip import gossip
from fedloom.topology.specs import Site
from fedloom.topology.wan import WanModel

VECTOR_LEN = 32


@dataclass(frozen=True, slots=True)
class ConsensusRun:
    graph: str
    n: int
    spectral_gap: float
    times: tuple[float, ...]
    errors: tuple[float, ...]
    time_to_tolerance: float | None
    pruned: int  # peer_pruned metrics emitted (each neighbour of a dead peer prunes it once)
    killed: str | None


def run_consensus(
    graph: str,
    n: int = 64,
    *,
    seed: int = 0,
    degree: int = 4,
    interval_s: float = 1.0,
    until_s: float = 400.0,
    tolerance: float = 1e-3,
    kill: str | None = None,
    kill_at_s: float = 0.0,
) -> ConsensusRun:
    """Run pure-consensus gossip on ``graph`` with ``n`` peers; optionally kill one peer."""
    sites = [Site(id=f"p{i:03d}", region="r0") for i in range(n)]
    plan = gossip(sites, WanModel(default_intra_rtt_s=0.02), graph=graph, k=degree, seed=seed)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    nodes: dict[str, Node] = {}
    for spec in plan.nodes:
        x = rng.normal(size=VECTOR_LEN).astype(np.float32)
        nodes[spec.id] = GossipPeer(
            spec.id,
            dict(spec.mixing),
            spec.self_weight,
            {"x": x},
            mode="dpsgd",
            train_config=None,
            gossip_interval_s=interval_s,
            heartbeat_interval_s=interval_s,
            suspect_after_s=5 * interval_s,
            prune_after_s=10 * interval_s,
            rng=np.random.default_rng([seed, len(nodes)]),
        )
    driver = SimDriver.from_plan(plan, nodes, seed=seed)
    pruned = [0]
    driver.on_metric(lambda node, now, m: _count_prune(pruned, m.name))
    if kill is not None:
        driver.kill_at(kill_at_s, kill)
    times: list[float] = []
    errors: list[float] = []
    scale: list[float] = []

    def observe(now: float) -> None:
        xs = []
        for pid, node in nodes.items():
            if not driver.is_alive(pid):
                continue
            assert isinstance(node, ModelHolder)
            cur = node.current_model()
            assert cur is not None
            xs.append(np.asarray(cur[1]["x"], dtype=np.float64))
        stack = np.stack(xs)
        spread = float(np.max(np.linalg.norm(stack - stack.mean(axis=0), axis=1)))
        if not scale:
            scale.append(spread)
        times.append(now)
        errors.append(spread / scale[0])

    driver.observe(interval_s, observe)
    driver.run(until=until_s)
    reached = next(
        (t for t, e in zip(times, errors, strict=True) if e <= tolerance and t > kill_at_s), None
    )
    return ConsensusRun(
        graph=graph,
        n=n,
        spectral_gap=float(plan.spectral_gap or 0.0),
        times=tuple(times),
        errors=tuple(errors),
        time_to_tolerance=reached,
        pruned=pruned[0],
        killed=kill,
    )


def _count_prune(counter: list[int], name: str) -> None:
    if name == "peer_pruned":
        counter[0] += 1
