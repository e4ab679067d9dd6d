"""The daemon's node: its neighbours, claim bounds and options from the config and the
signed roster, built by the one node factory (``federation.factory``) the simulator uses.

Also what the rest of the daemon asks of a node: its model (``model_of``) and the newest
model version a restored site or region held (``model_floor``, its digest).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from collections.abc import Mapping
from typing import Any

from fedloom.algorithms.aggregator_base import AggregatorBase
from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.protocol import ModelHolder, Node
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.training import TrainingPlan
from fedloom.federation import factory
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.factory import ROOT_ALGORITHMS, Neighbours, NodeOptions, claim_bounds
from fedloom.federation.signing import (  # re-exported: the daemon's names
    model_floor as model_floor,
)
from fedloom.federation.signing import (
    model_floor_digest as model_floor_digest,
)
from fedloom.runtime.config import DaemonConfig
from fedloom.runtime.governance import approval_required, prepare_plan_code
from fedloom.runtime.trainer import DeferredPlan, SitePlan, plan_from_config
from fedloom.transport.limits import MiB
from fedloom.transport.roster import Roster
from fedloom.transport.secagg_keys import RosterSecAggKeys

log = logging.getLogger("fedloom.daemon")


def _neighbour_role(roster: Roster, node_id: str, where: str, allowed: tuple[str, ...]) -> str:
    entry = roster.lookup(node_id)
    if entry is None:
        raise ConfigError(f"{where}: {node_id!r} is not in roster version {roster.version}")
    if entry.role not in allowed:
        raise ConfigError(
            f"{where}: {node_id!r} is a {entry.role} in the roster; expected {' or '.join(allowed)}"
        )
    return entry.role


def child_roles(cfg: DaemonConfig, roster: Roster) -> dict[str, str]:
    """``{child: "site" | "region"}`` from the roster (the config lists ids only)."""
    return {
        c: _neighbour_role(roster, c, f"children[{i}]", ("site", "region"))
        for i, c in enumerate(cfg.children)
    }


def check_neighbours(cfg: DaemonConfig, roster: Roster) -> None:
    if cfg.parent is not None:
        role = _neighbour_role(roster, cfg.parent.id, "parent.id", ("region", "root"))
        if cfg.fallbacks and role != "region":
            raise ConfigError(
                f"parent.fallback: {cfg.parent.id!r} is the root; only a region has a "
                "standby to fail over to (a root is restarted from its state instead)"
            )
    for i, f in enumerate(cfg.fallbacks):
        _neighbour_role(roster, f.id, f"parent.fallback[{i}].id", ("region",))
    for region, sites in cfg.subtrees.items():
        for site in sites:
            _neighbour_role(roster, site, f"subtrees.{region}", ("site",))
    for i, p in enumerate(cfg.peers):
        _neighbour_role(roster, p.id, f"peers[{i}].id", ("peer",))
    if cfg.relay is not None:
        _neighbour_role(roster, cfg.relay.id, "relay.id", ("relay",))


def build_plan(cfg: DaemonConfig) -> TrainingPlan | None:
    """The node's training plan (``None`` for a region: it neither trains nor evaluates).
    A site that requires approval gets a ``DeferredPlan`` for a ``factory`` plan: its code
    is imported and called at the first job the gate lets through, never at start."""
    if cfg.plan is None:
        return None
    prepare_plan_code(cfg)  # [governance]: the digest of the code imported next
    args: dict[str, Any] = {"seed": cfg.seed, "dp_sgd": cfg.dp_sgd, "node_id": cfg.node_id}
    if cfg.role == "site" and cfg.plan.factory is not None and approval_required(cfg)[0]:
        return DeferredPlan(cfg.plan, **args)
    return plan_from_config(cfg.plan, **args)


def n_examples_of(plan: TrainingPlan | None) -> int:
    if isinstance(plan, SitePlan):
        return int(plan.workload.n_examples(plan.index))
    rows = getattr(plan, "n_training_rows", None)  # a tabular plan: its registry's record
    if callable(rows):
        return int(rows())
    return 0


def _declared_examples(roster: Roster) -> tuple[dict[str, int], bool]:
    """``({site: examples} the roster declares, whether it declares every site's)``."""
    sites = [e for e in roster.entries if e.role == "site"]
    declared = {e.node_id: e.examples for e in sites if e.examples is not None}
    return declared, bool(sites) and len(declared) == len(sites)


def children_claim_bounds(
    cfg: DaemonConfig, roster: Roster, children: Mapping[str, str]
) -> ClaimBounds:
    """What this aggregator's ``children`` may claim, from the signed roster and the config.

    A site child's ``n_examples`` is clamped to the ``examples`` the roster declares for it,
    else to ``max_examples_per_site``. When the roster declares every site's examples, that
    cap becomes the largest declaration, so a region's ``n_examples`` is bounded by its
    count times an honest site's most (as in the simulator). A region's ``count`` is
    clamped to ``max_region_count`` (by default the ``regional_buffer_size``): the config
    names the children, not their subtrees. The roster's site ids bound whom a region's
    relayed refusals may name (``ClaimBounds.roster_sites``).
    """
    declared, every_site = _declared_examples(roster)
    bounds = claim_bounds(
        cfg.aggregation,
        site_examples={
            c: declared[c] for c, r in children.items() if r == "site" and c in declared
        },
        max_examples_per_site=max(declared.values()) if every_site else None,
    )
    # The sites a region child's relayed refusals may name (without [subtrees]).
    sites = frozenset(e.node_id for e in roster.entries if e.role == "site")
    return dataclasses.replace(bounds, roster_sites=sites)


def secagg_keys_of(node: Node) -> Any:
    """The node's secure-aggregation keys (None without secure aggregation)."""
    if isinstance(node, SiteNode):
        return None if node.secure is None else node.secure.keys
    if isinstance(node, AggregatorBase):
        return node.secagg_keys
    return None


def bound_claims(cfg: DaemonConfig, node: Node, roster: Roster) -> None:
    """Give an aggregator its children's claim bounds from ``roster`` (at the start and for
    each newer roster); under ``weighting = "examples"``, warn of what is undeclared. The
    node's secure-aggregation keys take the newer roster's keys too."""
    keys = secagg_keys_of(node)
    if isinstance(keys, RosterSecAggKeys):
        keys.update_roster(roster)
    if not isinstance(node, AggregatorBase):
        return
    bounds = children_claim_bounds(cfg, roster, node.children)
    node.set_claim_bounds(bounds)
    if cfg.aggregation.weighting != "examples":
        return
    sites = sorted(c for c, r in node.children.items() if r == "site")
    undeclared = [c for c in sites if c not in bounds.site_examples]
    every_site = _declared_examples(roster)[1]
    where = {"node": cfg.node_id, "roster_version": roster.version, "undeclared": undeclared}
    cap = bounds.max_examples_per_site
    if undeclared:
        log.warning(
            '%s: weighting = "examples", but roster version %d declares no examples for '
            "%s: each one's n_examples is clamped only to max_examples_per_site = %d; write "
            "`examples = N` in their [[nodes]] entries and sign the roster again",
            cfg.node_id,
            roster.version,
            ", ".join(undeclared),
            cap,
            extra=where,
        )
    if not every_site and len(sites) < len(node.children):
        log.warning(
            '%s: weighting = "examples", but roster version %d does not declare every '
            "site's examples: a region's n_examples is clamped only to its count times "
            "max_examples_per_site = %d",
            cfg.node_id,
            roster.version,
            cap,
            extra=where,
        )


def outbox_bytes(cfg: DaemonConfig) -> int | None:
    """``[outbox] max_mib`` in bytes (None: the outbox derives it from the model)."""
    mib = cfg.outbox_max_mib
    return None if mib is None else max(1, int(mib * MiB))


def gossip_mixing(cfg: DaemonConfig) -> tuple[dict[str, float], float]:
    """A gossip peer's ``({neighbour: W_ij}, W_ii)`` from ``[[peers]]``: the weights given,
    or, with none given, uniform mixing (without the neighbours' degrees
    Metropolis-Hastings is out of reach)."""
    given = [e.weight for e in cfg.peers]
    if all(w is None for w in given):
        share = 1.0 / (len(cfg.peers) + 1)
        return {e.id: share for e in cfg.peers}, share
    if any(w is None for w in given):
        raise ConfigError("peers: give a weight to every peer or to none")
    neighbours = {e.id: float(e.weight) for e in cfg.peers if e.weight is not None}
    self_weight = 1.0 - sum(neighbours.values())
    if self_weight < -1e-9:
        raise ConfigError(
            f"peers: the weights sum to {sum(neighbours.values()):.6g} > 1; the rest "
            "(1 - sum) is this node's own weight"
        )
    return neighbours, max(self_weight, 0.0)


def daemon_neighbours(cfg: DaemonConfig, roster: Roster) -> Neighbours:
    """The node's neighbours as the factory takes them, from its config and the roster
    (``check_neighbours`` first: every one is listed, in a role that fits)."""
    parent_role = None
    if cfg.parent is not None:
        entry = roster.lookup(cfg.parent.id)
        parent_role = None if entry is None else entry.role
    mixing: dict[str, float] = {}
    self_weight = 1.0
    n_peers = 1
    if cfg.role == "peer":
        mixing, self_weight = gossip_mixing(cfg)
        # Push-sum mass: every gossip peer the roster lists starts with weight 1.
        n_peers = max(sum(1 for e in roster.entries if e.role == "peer"), len(cfg.peers) + 1)
    return Neighbours(
        parent=None if cfg.parent is None else cfg.parent.id,
        parent_role=parent_role,
        fallbacks=tuple(f.id for f in cfg.fallbacks),
        children=child_roles(cfg, roster) if cfg.role in ("region", "root") else {},
        subtrees=dict(cfg.subtrees),
        mixing=mixing,
        self_weight=self_weight,
        n_peers=n_peers,
    )


def node_options(cfg: DaemonConfig) -> NodeOptions:
    """What the daemon's config decides besides the algorithm (a daemon is always durable)."""
    return NodeOptions(
        durable=True,
        max_outbox_bytes=outbox_bytes(cfg),
        failover_after_s=cfg.failover_after_s,
        max_held=cfg.max_held,
        keep_parts=cfg.has_standby,
        link_down_after_s=cfg.connection.down_after_s,
    )


def secagg_keys(cfg: DaemonConfig, roster: Roster) -> RosterSecAggKeys | None:
    """``[secure_aggregation]``'s keys: the node's identity and the roster's keys (a peer
    the roster lacks is refused by the member or coordinator when a seal names it)."""
    if not cfg.secure_aggregation.enabled:
        return None
    from fedloom.runtime.identity import load_identity

    return RosterSecAggKeys(cfg.node_id, load_identity(cfg), roster)


def build_node(cfg: DaemonConfig, roster: Roster, plan: TrainingPlan | None) -> Node:
    """A fresh state machine for ``cfg.role`` (not restored), built by
    ``federation.factory.build_node`` from the config's parameters and the roster."""
    check_neighbours(cfg, roster)
    if cfg.role == "region" and cfg.algorithm != "fedbuff":
        raise ConfigError(
            f"aggregation.algorithm: a region buffers its sites FedBuff-style; write "
            f'algorithm = "fedbuff" (the root may run {cfg.algorithm})'
        )
    if cfg.role == "root" and cfg.algorithm not in ROOT_ALGORITHMS:
        raise ConfigError(
            f'aggregation.algorithm: a root runs fedbuff, fedasync, fedavg or fedprox, not "'
            f'{cfg.algorithm}" (gossip needs role = "peer")'
        )
    neighbours = daemon_neighbours(cfg, roster)
    weights = None
    if cfg.role in ("root", "peer"):
        assert plan is not None
        weights = plan.init(cfg.seed)
    bounds = None
    if neighbours.children:
        bounds = children_claim_bounds(cfg, roster, neighbours.children)
    try:
        return factory.build_node(
            cfg.role,
            cfg.node_id,
            cfg.algorithm,
            cfg.aggregation,
            cfg.training,
            neighbours,
            seed=cfg.seed,
            weights=weights,
            n_examples=n_examples_of(plan),
            bounds=bounds,
            options=node_options(cfg),
            secagg=cfg.secure_aggregation,
            secagg_keys=secagg_keys(cfg, roster),
            privacy=cfg.privacy,
            # DP noise comes from a secret only this node knows: a root's central noise
            # (checkpointed before its first release, so a restart replays the same
            # noise), a secure site's distributed noise (fresh after every restart). The
            # config's seed is no secret: noise drawn from it could be subtracted.
            noise_key=secrets.randbits(256)
            if cfg.privacy.enabled or (cfg.role == "site" and cfg.secure_aggregation.enabled)
            else None,
        )
    except ValueError as exc:
        # The factory refuses parameters that do not fit the roster (synchronous rounds
        # over region children, ...): a configuration mistake (exit 2, which systemd does
        # not restart), not a crash; one line naming the file.
        where = f"{cfg.source}: " if cfg.source is not None else ""
        text = " ".join(str(exc).split())
        raise ConfigError(f"{where}{text}") from None


def model_of(node: Node) -> tuple[int, Any] | None:
    if isinstance(node, ModelHolder):
        return node.current_model()
    return None
