"""One node factory: a scenario arm and the daemon configs written from it build nodes
with the same settings, and the rules that used to differ between the two callers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.aggregator_base import AggregatorBase
from fedloom.algorithms.buffered import BufferedAggregator
from fedloom.algorithms.fedasync import FedAsyncAggregator
from fedloom.algorithms.gossip import GossipPeer
from fedloom.algorithms.protocol import (
    Deadline,
    Metric,
    Node,
    PeerUp,
    Received,
    Restorable,
)
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.relay import RelayNode
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.training import TrainingPlan
from fedloom.federation.factory import (
    DEFAULT_LINK_DOWN_AFTER_S,
    Neighbours,
    NodeOptions,
    build_node,
    gossip_liveness,
    node_params,
)
from fedloom.federation.params import AlgorithmConfig, CodecConfig, TrainingConfig
from fedloom.runtime.config import DaemonConfig, parse_config
from fedloom.runtime.nodes import build_node as daemon_build_node
from fedloom.runtime.nodes import build_plan
from fedloom.sim.runner import build_nodes
from fedloom.sim.scenario import Arm, AvailabilityConfig
from fedloom.topology.gossip import gossip
from fedloom.topology.hierarchical import hierarchical
from fedloom.topology.plan import Plan
from fedloom.topology.specs import Site
from fedloom.topology.wan import WanModel
from fedloom.transport.identity import Identity, key_text
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.wire import Hello

SEED = 7
WORKLOAD = {"dataset": "synthetic", "model": "softmax", "samples_per_site": 40}
TRAINING = TrainingConfig(lr=0.05, local_steps=2, batch_size=8, mu=0.0)
CONSORTIUM = key_text(Identity.generate("consortium", "consortium").public_key)
REGIONS = ("eu", "us", "asia")


def arm(algorithm: str, topology: str, params: AlgorithmConfig) -> Arm:
    return Arm(
        name="a",
        algorithm=algorithm,
        topology=topology,
        params=params,
        training=TRAINING,
        codec=CodecConfig(up="fp32", down="fp32", topk_fraction=0.01),
        availability=AvailabilityConfig(
            dropout=0.0, death_fraction=0.0, death_at_s=0.0, partitions=()
        ),
        compute={},
    )


def sites(n: int) -> list[Site]:
    return [Site(id=f"site-{i:03d}", region=REGIONS[i % len(REGIONS)]) for i in range(n)]


# ------------------------------------------------------------- the daemons' side


def aggregation_table(p: AlgorithmConfig, algorithm: str) -> dict[str, Any]:
    """``p`` as a daemon config's ``[aggregation]`` table."""
    table: dict[str, Any] = {"algorithm": algorithm}
    for key, value in asdict(p).items():
        if key == "clients_per_round" and value is None:
            continue  # not written: every site up to DEFAULT_CLIENTS_PER_ROUND
        table[key] = "off" if value is None else value
    return table


def own_params(p: AlgorithmConfig, role: str, above_regions: bool) -> AlgorithmConfig:
    """What a deployment derived from an arm writes in one node's config (written out here
    rather than taken from ``node_params``, which this checks)."""
    if role == "region":
        return replace(p, buffer_size=p.regional_buffer_size, concurrency=p.regional_concurrency)
    if role == "root" and above_regions:
        return replace(p, buffer_size=p.root_buffer_size)
    return p


def daemon_config(
    plan: Plan, node_id: str, a: Arm, index: Mapping[str, int], down_after_s: float
) -> DaemonConfig:
    spec = plan.node(node_id)
    above_regions = any(plan.node(c).role == "region" for c in spec.children)
    p = own_params(a.params, spec.role, above_regions)
    raw: dict[str, Any] = {
        "role": spec.role,
        "node_id": node_id,
        "state_dir": "state",
        "seed": SEED,
        "identity": {"key": f"keys/{node_id}.key"},
        "roster": {"path": "roster.toml", "consortium_key": CONSORTIUM},
        "training": asdict(a.training),
        "connection": {"keepalive_s": 5.0, "down_after_s": down_after_s},
        "plan": {**WORKLOAD, "n_sites": len(index), "seed": SEED},
    }
    if spec.role in ("site", "peer"):
        raw["plan"]["site_index"] = index[node_id]
    if spec.role == "region":
        del raw["plan"]  # a region neither trains nor evaluates
    if spec.role != "site":
        # A region buffers FedBuff-style whatever its root runs.
        algorithm = "fedbuff" if spec.role == "region" else a.algorithm
        raw["aggregation"] = aggregation_table(p, algorithm)
    if spec.parent is not None:
        raw["parent"] = {"id": spec.parent, "url": f"ws://127.0.0.1:9/{spec.parent}"}
    if spec.children:
        raw["children"] = list(spec.children)
        raw["listen"] = {"port": 7443}
    if spec.role == "peer":
        raw["peers"] = [
            {"id": peer, "url": f"ws://127.0.0.1:9/{peer}", "weight": w} for peer, w in spec.mixing
        ]
    return parse_config(raw, base_dir=Path("/etc/fedloom"))


def roster_of(plan: Plan, examples: Mapping[str, int]) -> Roster:
    return Roster(
        1,
        [
            RosterEntry(
                s.id,
                s.role,
                Identity.generate(s.id, s.role).public_key,
                examples=examples.get(s.id) if s.role == "site" else None,
            )
            for s in plan.nodes
        ],
    )


def both_paths(
    plan: Plan, a: Arm, *, down_after_s: float = DEFAULT_LINK_DOWN_AFTER_S
) -> tuple[dict[str, Node], dict[str, Node]]:
    """The plan's nodes built by the simulator and by the daemons, from the same
    parameters (the simulator's durable, as the daemons always are)."""
    members = [s.id for s in plan.nodes if s.role in ("site", "peer")]
    index = {sid: i for i, sid in enumerate(members)}
    configs = {s.id: daemon_config(plan, s.id, a, index, down_after_s) for s in plan.nodes}
    plans: dict[str, TrainingPlan | None] = {n: build_plan(c) for n, c in configs.items()}
    examples = {}
    for sid in members:
        training_plan: Any = plans[sid]
        examples[sid] = int(training_plan.workload.n_examples(index[sid]))
    roster = roster_of(plan, examples)
    daemons = {n: daemon_build_node(c, roster, plans[n]) for n, c in configs.items()}
    first: Any = plans[plan.nodes[0].id] if plan.kind == "gossip" else plans[plan.roots[0]]
    init = first.init(SEED)
    simulated = build_nodes(plan, a, init, SEED, examples, durable=True)
    return simulated, daemons


def settings(node: Node) -> dict[str, Any]:
    """What a node was configured with (not its state)."""
    out: dict[str, Any] = {"type": type(node).__name__, "id": node.node_id}
    if isinstance(node, SiteNode):
        out |= {"parent": node.parent, "n_examples": node.n_examples}
    if isinstance(node, AggregatorBase):
        b = node.claim_bounds
        out |= {
            "children": dict(node.children),
            "concurrency": node._dispatcher.concurrency,
            "task_timeout_s": node._dispatcher.task_timeout_s,
            "epoch": node._epoch_size(),
            "log_deltas": node._log_deltas,
            "count_bounds": {c: b.count_bound(c, r) for c, r in node.children.items()},
            "examples_bounds": {c: b.examples_bound(c, r) for c, r in node.children.items()},
            "max_examples_per_site": b.max_examples_per_site,
            "clip": node.clip_norm if isinstance(node, FedAsyncAggregator) else None,
        }
    if isinstance(node, BufferedAggregator):
        out |= {
            "buffer_size": node.buffer_size,
            "max_staleness": node.max_staleness,
            "staleness": [node._staleness(t) for t in (0, 1, 5, 50)],
            "buffer_args": dict(node._buffer_args),
        }
    if isinstance(node, RegionalAggregator):
        out |= {"parent": node.parent, "parent_is_root": node.parent_is_root}
        out |= {"keep_parts": node.keep_parts}
    if isinstance(node, GossipPeer):
        out |= {
            "mode": node.mode,
            "interval": node._interval,
            "liveness": (node._hb, node._suspect, node._prune),
            "mixing": {p: n.weight for p, n in node._nbrs.items()},
            "self_weight": node._self_weight,
            "max_share_weight": node._max_share_w,
            "durable": node.durable,
            "train_config": node._train_config,
        }
    if isinstance(node, Restorable):
        snap = node.snapshot()
        out["snapshot_keys"] = sorted(snap)
    return out


def opening_moves(node: Node) -> list[tuple[str, str, str]]:
    """What a fresh node does when its neighbours come up: the same events give the same
    effects (task choice included: both nodes draw from the same seeded stream)."""
    events: list[Any] = []
    if isinstance(node, AggregatorBase):
        for child, role in sorted(node.children.items()):
            events += [PeerUp(child), Received(child, Hello(child, role))]
    elif isinstance(node, GossipPeer):
        events += [PeerUp(p) for p in sorted(node._nbrs)]
    events.append(Deadline())
    moves = []
    for event in events:
        for effect in node.handle(event, 1.0):
            peer = getattr(effect, "peer", "")
            msg = getattr(effect, "msg", None)
            moves.append((type(effect).__name__, peer, type(msg).__name__))
    return moves


def assert_same(simulated: Mapping[str, Node], daemons: Mapping[str, Node]) -> None:
    assert simulated.keys() == daemons.keys()
    for node_id in simulated:
        assert settings(simulated[node_id]) == settings(daemons[node_id]), node_id
        assert opening_moves(simulated[node_id]) == opening_moves(daemons[node_id]), node_id


# ------------------------------------------------------------------------ parity

PARAMS = AlgorithmConfig(
    buffer_size=4,
    concurrency=6,
    regional_buffer_size=3,
    regional_concurrency=2,
    root_buffer_size=2,
    task_timeout_s=90.0,
    max_staleness=20,
    weighting="examples",
    clip_norm=5.0,
    robust="median",
    staleness="hinge",
)


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedasync"])  # sync rounds need sites
def test_a_hierarchical_arm_and_its_daemon_configs_build_the_same_nodes(algorithm: str) -> None:
    plan = hierarchical(sites(9), WanModel(), by="region", root_id="root", seed=SEED)
    simulated, daemons = both_paths(plan, arm(algorithm, "hierarchical", PARAMS))
    assert {type(n) for n in simulated.values()} >= {SiteNode, RegionalAggregator}
    assert_same(simulated, daemons)


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedasync", "fedprox"])
def test_a_star_arm_and_its_daemon_configs_build_the_same_nodes(algorithm: str) -> None:
    from fedloom.topology.star import star

    plan = star(sites(5), "root", "eu", wan=WanModel())
    assert_same(*both_paths(plan, arm(algorithm, "star", PARAMS)))


@pytest.mark.parametrize("mode", ["dpsgd", "pushsum"])
def test_a_gossip_arm_and_its_daemon_configs_build_the_same_peers(mode: str) -> None:
    plan = gossip(sites(6), WanModel(), graph="exponential", seed=SEED)
    params = replace(PARAMS, gossip_mode=mode, gossip_interval_s=30.0, gossip_clip=2.0)
    simulated, daemons = both_paths(plan, arm("gossip", "gossip", params))
    assert all(isinstance(n, GossipPeer) for n in simulated.values())
    assert_same(simulated, daemons)


# -------------------------------------------------------------- the drifts, fixed


def test_a_region_runs_the_arms_regional_buffer_and_its_parent_bounds_it_by_that() -> None:
    """Drift: the simulator gave a region ``regional_buffer_size``, the daemon its own
    config's ``buffer_size``; a root bounds a region's ``count`` by its
    ``regional_buffer_size``. Both now agree: one buffer, one bound."""
    plan = hierarchical(sites(9), WanModel(), by="region", root_id="root", seed=SEED)
    for nodes in both_paths(plan, arm("fedbuff", "hierarchical", PARAMS)):
        root = nodes["root"]
        assert isinstance(root, BufferedAggregator) and root.buffer_size == PARAMS.root_buffer_size
        for region_id in plan.node_ids("region"):
            region = nodes[region_id]
            assert isinstance(region, RegionalAggregator)
            assert region.buffer_size == PARAMS.regional_buffer_size
            assert region._dispatcher.concurrency == PARAMS.regional_concurrency
            assert root.claim_bounds.count_bound(region_id, "region") == region.buffer_size


def test_a_root_over_regions_shares_its_epochs_among_them() -> None:
    """Drift: the daemon clamped a root's concurrency to its site children (1 for a root
    of regions), so a FedAsync root's epoch was one step and any region could take every
    step; all children count now, as in the simulator."""
    plan = hierarchical(sites(9), WanModel(), by="region", root_id="root", seed=SEED)
    for nodes in both_paths(plan, arm("fedasync", "hierarchical", PARAMS)):
        root = nodes["root"]
        assert isinstance(root, FedAsyncAggregator)
        assert root._epoch_size() == len(REGIONS)  # min(concurrency 6, 3 regions)


def silent_neighbour_times(peer: GossipPeer, neighbour: str, until: float) -> dict[str, float]:
    """When ``peer`` first suspects and prunes ``neighbour``, which never says anything
    after coming up (the peer's first training job is still running)."""
    seen: dict[str, float] = {}
    now = 0.0
    pending: list[Any] = [PeerUp(p) for p in sorted(peer._nbrs)]
    for _ in range(10_000):
        while pending:
            for effect in peer.handle(pending.pop(0), now):
                labels = getattr(effect, "labels", None) or {}
                if isinstance(effect, Metric) and labels.get("peer") == neighbour:
                    seen.setdefault(effect.name, now)
        deadline = peer.next_deadline()
        if "peer_pruned" in seen or deadline is None or deadline > until:
            break
        now = max(now, deadline)
        pending = [Deadline()]
    return seen


@pytest.mark.parametrize("down_after_s", [10.0, DEFAULT_LINK_DOWN_AFTER_S])
def test_a_silent_gossip_neighbour_is_pruned_after_the_link_timeout_not_twenty_minutes(
    down_after_s: float,
) -> None:
    """Drift: the simulator suspected a silent neighbour after 4 intervals + 600 s and
    pruned it after 8 intervals + 1200 s; the daemon used the link's ``down_after_s``.
    One rule now, for both: 4 x interval + down_after_s, 8 x interval + 2 x down_after_s."""
    interval = 30.0
    params = replace(PARAMS, gossip_mode="pushsum", gossip_interval_s=interval)
    peer = build_node(
        "peer",
        "a",
        "gossip",
        params,
        TRAINING,
        Neighbours(mixing={"b": 0.25, "c": 0.25}, self_weight=0.5, n_peers=3),
        seed=SEED,
        weights={"w": np.zeros(3, dtype=np.float32)},
        options=NodeOptions(link_down_after_s=down_after_s),
    )
    assert isinstance(peer, GossipPeer)
    seen = silent_neighbour_times(peer, "b", until=4000.0)
    heartbeat, suspect, prune = gossip_liveness(interval, down_after_s)
    assert (heartbeat, suspect, prune) == (
        interval,
        4 * interval + down_after_s,
        8 * interval + 2 * down_after_s,
    )
    # Seen at the first wake-up at or after the deadline (heartbeats batch wake-ups).
    assert suspect <= seen["peer_suspected"] < suspect + interval
    assert prune <= seen["peer_pruned"] < prune + interval
    assert seen["peer_pruned"] < 8 * interval + 1200.0  # the simulator's old rule


def test_node_params_maps_an_arm_onto_each_tier() -> None:
    regions = {"r1": "region"}
    assert node_params(PARAMS, "region", {"s": "site"}).buffer_size == PARAMS.regional_buffer_size
    assert node_params(PARAMS, "region", {}).concurrency == PARAMS.regional_concurrency
    assert node_params(PARAMS, "root", regions).buffer_size == PARAMS.root_buffer_size
    assert node_params(PARAMS, "root", {"s": "site"}) == PARAMS
    assert node_params(PARAMS, "site", {}) == PARAMS


def test_every_role_is_built_and_nonsense_is_refused() -> None:
    w = {"w": np.zeros(2, dtype=np.float32)}

    def make(role: str, n: Neighbours, **kw: Any) -> Node:
        return build_node(role, "x", "fedbuff", PARAMS, TRAINING, n, seed=1, **kw)

    assert isinstance(make("relay", Neighbours()), RelayNode)
    assert isinstance(make("site", Neighbours(parent="p")), SiteNode)
    with pytest.raises(ValueError, match="no parent"):
        make("site", Neighbours())
    with pytest.raises(ValueError, match="initial weights"):
        make("root", Neighbours(children={"s": "site"}))
    with pytest.raises(ValueError, match="initial weights"):
        make("peer", Neighbours(mixing={"y": 0.5}, self_weight=0.5))
    with pytest.raises(ValueError, match="no node for role"):
        make("king", Neighbours(), weights=w)
    with pytest.raises(ValueError, match="no root aggregator"):
        build_node(
            "root", "x", "gossip", PARAMS, TRAINING, Neighbours(children={"s": "site"}),
            seed=1, weights=w,
        )  # fmt: skip
    # A non-durable aggregator logs no deltas; a durable one (the daemons') does.
    kids = Neighbours(children={"s": "site"})
    assert not make("root", kids, weights=w, options=NodeOptions(durable=False))._log_deltas  # type: ignore[attr-defined]
    assert make("root", kids, weights=w)._log_deltas  # type: ignore[attr-defined]


@pytest.mark.parametrize(("role", "algorithm"), [("root", "fedbuff"), ("region", "fedbuff")])
def test_a_secure_cohort_needing_more_sites_than_the_aggregator_has_is_refused(
    role: str, algorithm: str
) -> None:
    from fedloom.federation.config_reader import ConfigError
    from fedloom.federation.secagg_keys import derived_secagg_keys
    from fedloom.federation.secagg_params import SecureAggregationConfig
    from tests.algorithms.alg_helpers import model

    # A cohort is of distinct sites: over 3 sites a FedBuff cohort of K = 5 (t = 5) never
    # sealed, and the federation stalled without a word.
    sites = [f"site-{i}" for i in range(3)]
    keys = derived_secagg_keys([role, *sites], seed=1)

    def build(buffer_size: int, min_cohort: int) -> Any:
        return build_node(
            role,
            role,
            algorithm,
            AlgorithmConfig(buffer_size=buffer_size, clip_norm=None),
            TRAINING,
            Neighbours(
                children=dict.fromkeys(sites, "site"), parent="root" if role == "region" else None
            ),
            seed=0,
            weights=model(0.0) if role == "root" else None,
            secagg=SecureAggregationConfig(enabled=True, min_cohort=min_cohort, max_dropout=0.0),
            secagg_keys=keys[role],
        )

    with pytest.raises(ConfigError, match=r"secure_aggregation\.min_cohort.*5 sites.*only 3"):
        build(5, 5)
    with pytest.raises(ConfigError, match=r"4 sites.*only 3"):
        build(5, 3)  # t = max(3, (5 + 1) // 2 + 1) = 4
    assert build(3, 3).secure_aggregation.threshold == 3
