"""THE node factory: every protocol node, for the simulator and the daemons alike.

``build_node`` makes a site, a region, a root of every algorithm, a gossip peer or a relay
from the parameter types both drivers read (``AlgorithmConfig``, ``TrainingConfig``), the
node's ``Neighbours`` (from a plan in the simulator: ``plan_neighbours``; from the config
and the signed roster in a daemon) and ``NodeOptions`` (what a deployment decides besides
the algorithm: durability, backpressure, failover, link liveness). The same parameters
give nodes with the same settings whichever driver asked.

A scenario's arm describes a whole federation, a daemon's config one node; ``node_params``
turns the first into the second (a region runs the arm's ``regional_buffer_size`` and
``regional_concurrency`` as its own ``buffer_size`` and ``concurrency``; a root above
regions its ``root_buffer_size``), so a daemon config and the arm it was derived from
build the same node. Settled rules, formerly drifting between the two callers:

* an aggregator's concurrency is ``max(1, min(concurrency, len(children)))``: every child,
  regions included, since a FedAsync root's epoch is ``concurrency`` steps and its regions
  share it (the dispatcher itself never has more tasks than idle sites);
* a gossip neighbour is suspected after ``4 x interval + down_after_s`` of silence and
  pruned after ``8 x interval + 2 x down_after_s``, where ``down_after_s`` is the link's
  liveness timeout (the daemon's ``[connection] down_after_s``; the simulator's links use
  its default): past that, a live neighbour's link would have been re-established;
* every aggregator (root of any algorithm, region) gets the start quorum
  (``start_quorum``, ``start_wait_s``; ``"all"`` or a number above its children's means all
  of its own children, so one arm's setting fits the root and each region) and the backoff
  after a site's refusal (``refusal_backoff_s``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fedloom.algorithms.fedasync import FedAsyncAggregator
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.gossip import GossipPeer, share_weight_bound
from fedloom.algorithms.incorporation import DEFAULT_FAILOVER_AFTER_S, DEFAULT_MAX_HELD
from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.protocol import Node, Weights
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.relay import RelayNode
from fedloom.algorithms.server_opt import ServerOptimizer, make_server_opt
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.staleness import StalenessFn, make_staleness
from fedloom.algorithms.sync import SyncAggregator
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.federation.privacy import (
    PrivacyConfig,
    attach_privacy,
    central_params,
    check_secagg_clip,
)
from fedloom.federation.secagg_params import SecureAggregationConfig, check_cohort
from fedloom.federation.seeds import derived_seed

if TYPE_CHECKING:  # not at run time: fedloom.topology's package imports networkx and scipy
    from fedloom.topology.plan import Plan

ROOT_ALGORITHMS = ("fedbuff", "fedasync", "fedavg", "fedprox")
ROLES = ("site", "region", "root", "peer", "relay")
# A link silent this long is down (the daemon's ``[connection] down_after_s`` default).
DEFAULT_LINK_DOWN_AFTER_S = 45.0


@dataclass(frozen=True, slots=True)
class Neighbours:
    """Who one node talks to: from a plan (``plan_neighbours``) or a config and roster.

    ``children`` maps each child to its role ("site" or "region"); ``mixing`` holds a gossip
    peer's ``W_ij`` and ``self_weight`` its ``W_ii``; ``n_peers`` counts the gossip peers of
    the network (its push-sum mass); ``subtrees``: region child -> the sites under it.
    """

    parent: str | None = None
    parent_role: str | None = None
    fallbacks: tuple[str, ...] = ()
    children: Mapping[str, str] = field(default_factory=dict)
    subtrees: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    mixing: Mapping[str, float] = field(default_factory=dict)
    self_weight: float = 1.0
    n_peers: int = 1


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """What a deployment decides besides the algorithm.

    ``durable``: aggregators log every applied delta and gossip peers checkpoint each step
    (what a restart recovers from; the daemons always run durable). ``max_outbox_bytes``:
    a site's or region's backpressure bound (None: derived from the model).
    ``failover_after_s``, ``max_held``: a site with ``Neighbours.fallbacks``. ``keep_parts``:
    a region with a standby keeps its forwards' parts. ``link_down_after_s``: see the
    module docstring. ``hello_retries``: a site or region says Hello again when nothing
    answers it (``hello_timeout``); the simulator turns it off where no link can lose a
    message without going down (a lost Hello there is impossible; the retries only cost).
    """

    durable: bool = True
    max_outbox_bytes: int | None = None
    failover_after_s: float = DEFAULT_FAILOVER_AFTER_S
    max_held: int = DEFAULT_MAX_HELD
    keep_parts: bool = False
    link_down_after_s: float = DEFAULT_LINK_DOWN_AFTER_S
    hello_retries: bool = True


def node_params(p: AlgorithmConfig, role: str, children: Mapping[str, str]) -> AlgorithmConfig:
    """The parameters one node of a federation described by ``p`` (a scenario arm) runs
    with, as its own daemon config gives them: a region's ``buffer_size`` and
    ``concurrency`` are the arm's ``regional_*``, a root above regions buffers
    ``root_buffer_size`` updates."""
    if role == "region":
        return replace(p, buffer_size=p.regional_buffer_size, concurrency=p.regional_concurrency)
    if role == "root" and any(r == "region" for r in children.values()):
        return replace(p, buffer_size=p.root_buffer_size)
    return p


def aggregator_concurrency(p: AlgorithmConfig, children: Mapping[str, str]) -> int:
    """Training tasks (and FedAsync steps per epoch) an aggregator keeps in flight."""
    return max(1, min(p.concurrency, len(children)))


def start_quorum(p: AlgorithmConfig, children: Mapping[str, str]) -> int:
    """How many of ``children`` an aggregator waits for before its first dispatch (0:
    none): ``start_quorum``, "all" or any number above the children's meaning all."""
    q = p.start_quorum
    if q == "all":
        return len(children)
    if isinstance(q, str):
        raise ValueError(f'start_quorum: "all" or a whole number >= 0, not {q!r}')
    return min(q, len(children))


def gossip_liveness(interval_s: float, link_down_after_s: float) -> tuple[float, float, float]:
    """``(heartbeat, suspect, prune)`` seconds for a gossip peer (see the module docstring)."""
    return (
        interval_s,
        4 * interval_s + link_down_after_s,
        8 * interval_s + 2 * link_down_after_s,
    )


def node_rng(seed: int, node_id: str) -> np.random.Generator:
    """A node's own random stream, the same for a node id in every driver."""
    return np.random.default_rng(derived_seed(seed, "node", node_id))


def plan_neighbours(plan: Plan, node_id: str) -> Neighbours:
    """A plan node's neighbours (the simulator's; a deployment writes the same into its
    configs and roster)."""
    spec = plan.node(node_id)
    parent_role = plan.node(spec.parent).role if spec.parent is not None else None
    return Neighbours(
        parent=spec.parent,
        parent_role=parent_role,
        children={c: plan.node(c).role for c in spec.children},
        mixing=dict(spec.mixing),
        self_weight=spec.self_weight,
        n_peers=plan.n_peers,  # counted once, when the plan was built
    )


def hello_timeout(p: AlgorithmConfig) -> float:
    """How long a site or region waits for an answer to its Hello (a task, a model) before
    it says Hello again: the shorter of the task and round time-outs, the time a parent
    that heard it would take at most to notice a task or round gone unanswered."""
    return min(p.task_timeout_s, p.round_timeout_s)


def build_node(
    role: str,
    node_id: str,
    algorithm: str,
    p: AlgorithmConfig,
    training: TrainingConfig,
    neighbours: Neighbours,
    *,
    seed: int,
    weights: Weights | None = None,
    n_examples: int = 0,
    bounds: ClaimBounds | None = None,
    options: NodeOptions | None = None,
    secagg: SecureAggregationConfig | None = None,
    secagg_keys: Any = None,
    privacy: PrivacyConfig | None = None,
    noise_key: int | None = None,
) -> Node:
    """A fresh (not restored) node for ``role`` with ``p`` as its own parameters.

    ``algorithm`` is the root's (a region always buffers FedBuff-style); ``weights`` the
    initial model of a root or gossip peer; ``n_examples`` a site's; ``bounds`` what an
    aggregator's children may claim (default: ``claim_bounds(p)``); ``secagg`` the node's
    ``[secure_aggregation]`` with ``secagg_keys`` (a ``SecAggKeys``) when it is enabled;
    ``privacy`` a root's ``[privacy]`` (central DP, ``federation.privacy``) and
    ``noise_key`` the secret its noise is drawn from (None: derived from ``seed``, as the
    simulator wants; a daemon passes one from the OS), also a secure site's (its members'
    discrete Gaussian noise). ValueError for a combination no node can run.
    """
    opts = options if options is not None else NodeOptions()
    train_config = training.as_dict()
    n = neighbours
    if role == "site":
        if n.parent is None:
            raise ValueError(f"site {node_id!r} has no parent")
        # Only a secure site draws from a stream (building one per site costs ~10 µs
        # each, 1 s at 100,000 sites).
        site_rng = None
        if secagg is not None and secagg.enabled:
            site_rng = (
                node_rng(seed, node_id) if noise_key is None else np.random.default_rng(noise_key)
            )
        return SiteNode(
            node_id,
            n.parent,
            n_examples=n_examples,
            max_outbox_bytes=opts.max_outbox_bytes,
            fallbacks=list(n.fallbacks),
            failover_after_s=opts.failover_after_s,
            max_held=opts.max_held,
            hello_timeout_s=hello_timeout(p) if opts.hello_retries else None,
            # A member's DP noise (and rounding) must be unpredictable to its aggregator:
            # a daemon passes a secret noise_key; the simulator's stays the node's stream.
            secure=secure_site(node_id, p, secagg, secagg_keys, site_rng, privacy),
        )
    if role == "relay":
        return RelayNode(node_id)
    rng = node_rng(seed, node_id)
    if role == "peer":
        if weights is None:
            raise ValueError(f"gossip peer {node_id!r} needs its initial weights")
        heartbeat, suspect, prune = gossip_liveness(p.gossip_interval_s, opts.link_down_after_s)
        return GossipPeer(
            node_id,
            dict(n.mixing),
            n.self_weight,
            weights,
            mode=p.gossip_mode,
            train_config=train_config,
            gossip_interval_s=p.gossip_interval_s,
            heartbeat_interval_s=heartbeat,
            suspect_after_s=suspect,
            prune_after_s=prune,
            clip=p.gossip_clip,
            max_share_weight=share_weight_bound(p.gossip_max_share_weight, n.n_peers),
            rng=rng,
            durable=opts.durable,  # model, step and push-sum mass survive a restart
        )
    concurrency = aggregator_concurrency(p, n.children)
    if role == "region":
        if n.parent is None:
            raise ValueError(f"region {node_id!r} has no parent")
        region = build_region(
            node_id,
            n.parent,
            n.children,
            p,
            buffer_size=p.buffer_size,
            concurrency=concurrency,
            train_config=train_config,
            rng=rng,
            log_deltas=opts.durable,
            bounds=bounds,
            max_outbox_bytes=opts.max_outbox_bytes,
        )
        # A root's ack settles a forward; a parent region settles it later.
        region.parent_is_root = n.parent_role == "root"
        region.keep_parts = opts.keep_parts
        if not opts.hello_retries:
            region.hello_timeout_s = None
        region.set_subtrees(n.subtrees)
        region.set_start_quorum(start_quorum(p, n.children), p.start_wait_s)
        region.set_refusal_backoff(p.refusal_backoff_s)
        member_privacy(role, privacy, secagg)
        secure_aggregator(region, p, secagg, secagg_keys, bounds, rng, privacy)
        return region
    if role != "root":
        raise ValueError(f"no node for role {role!r} ({', '.join(ROLES)})")
    if weights is None:
        raise ValueError(f"root {node_id!r} needs its initial weights")
    # [privacy]: its clip, its checks (regions below: secure ones only, see check_plan)
    p = central_params(privacy, algorithm, p, n.children, secagg)
    root = build_root(
        algorithm,
        node_id,
        n.children,
        weights,
        p,
        buffer_size=p.buffer_size,
        concurrency=concurrency,
        train_config=train_config,
        rng=rng,
        log_deltas=opts.durable,  # with log_deltas a sync root's open round survives a restart
        bounds=bounds,
    )
    root.set_subtrees(n.subtrees)
    root.set_start_quorum(start_quorum(p, n.children), p.start_wait_s)
    root.set_refusal_backoff(p.refusal_backoff_s)
    secure_aggregator(root, p, secagg, secagg_keys, bounds, rng, privacy)
    if noise_key is None:  # the simulator's: reproducible from the run's seed on purpose
        noise_key = derived_seed(seed, "dp-noise", node_id)
    attach_privacy(root, privacy, noise_key, secagg)
    return root


def member_privacy(
    role: str, privacy: PrivacyConfig | None, secagg: SecureAggregationConfig | None
) -> None:
    """A region's or a site's ``[privacy]`` (central DP is released at the root): it only
    means something under secure aggregation (a region seals its cohorts with the members'
    noise; a site refuses a seal with less noise than its own z asks), so ConfigError
    without it."""
    if privacy is None or not privacy.enabled:
        return
    if secagg is None or not secagg.enabled:
        raise ConfigError(
            f"privacy.mechanism: central DP is released at the root; a {role}'s [privacy] "
            "sets the noise its secure-aggregation cohorts carry, so it needs "
            "[secure_aggregation] enabled = true (or remove [privacy] here)"
        )
    check_secagg_clip(privacy, secagg)


def secure_site(
    node_id: str,
    p: AlgorithmConfig,
    secagg: SecureAggregationConfig | None,
    keys: Any,
    rng: np.random.Generator | None,
    privacy: PrivacyConfig | None = None,
) -> Any:
    """A site's secure uplink (``algorithms.secure_site``), or None without one. With the
    site's own ``[privacy]`` its members refuse seals whose noise falls short of its z.
    ``rng`` (the members' noise and rounding) is needed only where it is enabled."""
    member_privacy("site", privacy, secagg)
    if secagg is None or not secagg.enabled:
        return None
    if keys is None:
        raise ValueError(f"site {node_id!r}: secure aggregation needs the node's keys")
    if rng is None:
        raise ValueError(f"site {node_id!r}: secure aggregation needs the node's stream")
    from fedloom.algorithms.dp.discrete_gaussian import sample as discrete_gaussian
    from fedloom.algorithms.secure_site import SiteSecAgg

    return SiteSecAgg(
        node_id,
        keys,
        rng=rng,
        min_cohort=secagg.min_cohort,
        max_colluders=secagg.max_colluders,
        max_cohort=secagg.max_cohort,
        # The aggregator decides: its seal's weight_cap is 1 under uniform weighting
        # (every member weighs 1), else the most examples a site may claim.
        weighting="examples",
        upload_timeout_s=secagg.upload_timeout_s,
        unmask_timeout_s=secagg.unmask_timeout_s,
        noise=discrete_gaussian,  # used only when a seal asks for noise (central DP)
        min_noise_multiplier=privacy.noise_multiplier if privacy and privacy.enabled else 0.0,
    )


def secure_aggregator(
    node: Any,
    p: AlgorithmConfig,
    secagg: SecureAggregationConfig | None,
    keys: Any,
    bounds: ClaimBounds | None,
    rng: np.random.Generator,
    privacy: PrivacyConfig | None = None,
) -> None:
    """Give an aggregator with site children its cohort coordinator (regions' forwards
    stay plain: they are sums). With central DP (``privacy``) the members add the noise:
    each a discrete Gaussian of σ_member = z·(C·2^f + √d)/√t_min, t_min the threshold of
    the smallest cohort the coordinator may seal. ValueError for a cohort the numbers
    cannot carry."""
    if secagg is None or not secagg.enabled:
        return
    if not any(r == "site" for r in node.children.values()):
        return  # only regions below: their forwards are sums already
    sync = isinstance(node, SyncAggregator)
    if not (sync or isinstance(node, FedBuffAggregator | RegionalAggregator)):
        raise ValueError(
            "secure_aggregation: runs on fedbuff roots and regions and on fedavg/fedprox "
            f"roots (this root runs {type(node).__name__})"
        )
    if keys is None:
        raise ValueError(f"{node.node_id!r}: secure aggregation needs the node's keys")
    if sync:
        members, secagg = sync_cohort(node, secagg)
    else:
        members = secagg.cohort(node.buffer_size)
    check_cohort(secagg, members)
    # A cohort's members are distinct sites: with fewer site children than its threshold
    # no cohort ever seals, and the federation would stall without a word.
    t, n_sites = secagg.threshold(members), sum(r == "site" for r in node.children.values())
    if t > n_sites:
        raise ConfigError(
            f"secure_aggregation.min_cohort / cohort_size: a cohort of {members} needs "
            f"{t} sites to unmask (max(min_cohort, (N + max_colluders) // 2 + 1)), but "
            f"{node.node_id!r} has only {n_sites} site children: lower min_cohort, or "
            "cohort_size (or the buffer size K when cohort_size = 0)"
        )
    from fedloom.algorithms.secagg.coordinator import SecAggCoordinator

    if p.robust != "mean":
        raise ValueError(
            f'secure_aggregation: robust = "{p.robust}" needs individual updates; only the '
            'mean composes with masking (robust = "mean")'
        )
    b = bounds if bounds is not None else claim_bounds(p)
    declared = [n for n in b.site_examples.values() if n > 0]
    # Members weigh themselves by min(n, cap) / cap: the cap is the largest site's
    # declared examples (else the per-site bound); 1 makes every weight 1 (uniform).
    # A sync root weighs answers by examples (FedAvg), whatever [algorithm] weighting says;
    # under central DP every member weighs 1 (the step divides by a fixed denominator, and
    # one site's contribution must stay within the clip).
    dp = privacy is not None and privacy.enabled
    uniform = dp or (p.weighting == "uniform" and not sync)
    cap = 1 if uniform else max(declared, default=b.max_examples_per_site)
    sigma = 0.0
    noise: tuple[float, int] | None = None
    if privacy is not None and dp:
        check_secagg_clip(privacy, secagg)
        from fedloom.algorithms.dp.release import member_noise_sigma
        from fedloom.algorithms.secagg.field import template_size

        model = node.current_model()
        # The smallest cohort: t(N) members, whose own threshold is the lowest possible.
        t_min = secagg.threshold(secagg.threshold(members))
        if model is None:  # a region: σ follows when the model's size is known
            noise = (privacy.noise_multiplier, t_min)
        else:
            dim = template_size(model[1])
            sigma = member_noise_sigma(
                privacy.noise_multiplier, secagg.clip, secagg.precision_bits, dim, t_min
            )
            node.secagg_noise = (sigma, secagg.clip, secagg.precision_bits, dim)
    node.set_secure_aggregation(
        SecAggCoordinator(
            node.node_id,
            keys,
            cohort_size=members,
            min_cohort=secagg.min_cohort,
            clip=secagg.clip,
            precision_bits=secagg.precision_bits,
            weight_cap=max(1, int(cap)),
            noise_sigma=sigma,
            noise_multiplier=noise,
            # A sync round seals its one cohort itself (K joins, its deadline, or no task
            # outstanding): no formation deadline of the coordinator's own.
            form_wait_s=None if sync else secagg.form_wait_s,
            upload_timeout_s=secagg.upload_timeout_s,
            unmask_timeout_s=secagg.unmask_timeout_s,
            rng=rng,
            max_colluders=secagg.max_colluders,
            # Keep ``concurrency`` tasks out as without masking: their joins may fill
            # more than one cohort at once (a sync round is one cohort).
            max_inflight=1 if sync else node.in_flight_target // members + 1,
        ),
        keys,
    )


def sync_cohort(
    node: SyncAggregator, secagg: SecureAggregationConfig
) -> tuple[int, SecureAggregationConfig]:
    """A sync round is ONE cohort of its K = clients_per_round sites (at most the root's
    site children); its threshold is also at least the round's own min_cohort. ConfigError
    naming the field otherwise."""
    k = node.clients_per_round
    if secagg.cohort_size not in (0, k):
        raise ConfigError(
            f"secure_aggregation.cohort_size: a fedavg/fedprox round is one cohort of its "
            f"clients_per_round sites ({k} here; at most the root's site children), not "
            f"{secagg.cohort_size}: leave cohort_size = 0"
        )
    if secagg.min_cohort > k:
        raise ConfigError(
            f"secure_aggregation.min_cohort: {secagg.min_cohort} is more than the "
            f"{k} sites a round selects (clients_per_round, at most the root's site "
            "children): no round could ever be unmasked; lower min_cohort or raise "
            "clients_per_round"
        )
    return k, replace(secagg, min_cohort=max(secagg.min_cohort, node.min_cohort))


def staleness_fn(p: AlgorithmConfig) -> StalenessFn:
    if p.staleness == "constant":
        return make_staleness("constant")
    if p.staleness == "hinge":
        return make_staleness("hinge", {"a": p.staleness_a, "b": p.staleness_b})
    return make_staleness("polynomial", {"a": p.staleness_a})


def server_optimizer(p: AlgorithmConfig) -> ServerOptimizer:
    if p.server_optimizer == "adam":
        return make_server_opt("adam", {"lr": p.server_lr})
    return make_server_opt("sgd", {"lr": p.server_lr, "momentum": p.server_momentum})


def claim_bounds(
    p: AlgorithmConfig,
    *,
    region_counts: Mapping[str, int] | None = None,
    site_examples: Mapping[str, int] | None = None,
    max_examples_per_site: int | None = None,
) -> ClaimBounds:
    """What an aggregator believes of its children's ``count`` and ``n_examples`` claims.

    A region child's count is bounded by ``region_counts`` (derived from the topology) or
    else ``max_region_count`` (0: the children's ``regional_buffer_size``, right for regions
    of sites); a site's examples by ``site_examples`` or else ``max_examples_per_site``.
    """
    default_count = p.max_region_count or p.regional_buffer_size
    examples = p.max_examples_per_site
    if max_examples_per_site is not None:
        examples = min(examples, max_examples_per_site)
    return ClaimBounds(
        max_region_count=max(1, default_count),
        max_examples_per_site=examples,
        region_counts=dict(region_counts or {}),
        site_examples=dict(site_examples or {}),
    )


def build_root(
    algorithm: str,
    node_id: str,
    children: Mapping[str, str],
    weights: Weights,
    p: AlgorithmConfig,
    *,
    buffer_size: int,
    concurrency: int,
    train_config: Mapping[str, Any],
    rng: np.random.Generator,
    log_deltas: bool = True,
    bounds: ClaimBounds | None = None,
) -> FedBuffAggregator | FedAsyncAggregator | SyncAggregator:
    """The top aggregator for ``algorithm`` (fedbuff, fedasync, fedavg or fedprox)."""
    common: dict[str, Any] = {
        "train_config": train_config,
        "rng": rng,
        "clip_norm": p.clip_norm,
        "log_deltas": log_deltas,
        "claim_bounds": bounds if bounds is not None else claim_bounds(p),
    }
    if algorithm == "fedbuff":
        return FedBuffAggregator(
            node_id,
            children,
            weights,
            buffer_size=buffer_size,
            concurrency=concurrency,
            staleness=staleness_fn(p),
            max_staleness=p.max_staleness,
            server_opt=server_optimizer(p),
            task_timeout_s=p.task_timeout_s,
            weighting=p.weighting,
            robust=p.robust,
            **common,
        )
    if algorithm == "fedasync":
        return FedAsyncAggregator(
            node_id,
            children,
            weights,
            alpha=p.alpha,
            concurrency=concurrency,
            staleness=staleness_fn(p),
            max_staleness=p.max_staleness,
            history=min(p.max_staleness + 1, 256),
            task_timeout_s=p.task_timeout_s,
            **common,
        )
    if algorithm in ("fedavg", "fedprox"):
        k = p.round_size(len(children))  # ConfigError for a written K above the sites
        return SyncAggregator(
            node_id,
            children,
            weights,
            clients_per_round=k,
            over_selection=p.over_selection,
            round_timeout_s=p.round_timeout_s,
            min_cohort=p.min_cohort,
            # Over-select from the first round on: wait until enough sites are idle.
            min_available=min(len(children), math.ceil(p.over_selection * k)),
            server_opt=server_optimizer(p),
            robust=p.robust,
            **common,  # with log_deltas the open round survives a restart
        )
    known = ", ".join(ROOT_ALGORITHMS)
    raise ValueError(f"no root aggregator for algorithm {algorithm!r} ({known})")


def build_region(
    node_id: str,
    parent: str,
    children: Mapping[str, str],
    p: AlgorithmConfig,
    *,
    buffer_size: int,
    concurrency: int,
    train_config: Mapping[str, Any],
    rng: np.random.Generator,
    log_deltas: bool = True,
    bounds: ClaimBounds | None = None,
    max_outbox_bytes: int | None = None,
) -> RegionalAggregator:
    """A regional FedBuff buffer between its sites and ``parent``."""
    return RegionalAggregator(
        node_id,
        parent,
        children,
        buffer_size=buffer_size,
        concurrency=concurrency,
        staleness=staleness_fn(p),
        max_staleness=p.max_staleness,
        task_timeout_s=p.task_timeout_s,
        weighting=p.weighting,
        robust=p.robust,
        train_config=train_config,
        rng=rng,
        clip_norm=p.clip_norm,
        log_deltas=log_deltas,
        claim_bounds=bounds if bounds is not None else claim_bounds(p),
        max_outbox_bytes=max_outbox_bytes,
        hello_timeout_s=hello_timeout(p),
    )
