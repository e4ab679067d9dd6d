"""Turns a scenario into simulated runs: sites -> plan -> nodes -> driver -> ``ArmResult``.

One arm is one algorithm/topology configuration. Everything random in a run is derived
from the scenario seed (sites, plan, data, node RNGs, compute and availability draws), so
the same scenario and seed give the same report apart from wall-clock fields.
"""

from __future__ import annotations

import gc
import itertools
import math
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.protocol import Metric, ModelHolder, Node, Weights
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.factory import (
    NodeOptions,
    build_node,
    claim_bounds,
    node_params,
    plan_neighbours,
)
from fedloom.federation.params import CodecConfig
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.federation.seeds import entity_rng
from fedloom.federation.training import WorkloadTrainer
from fedloom.sim.availability import Availability, ChurnWindow, Death, periodic_windows
from fedloom.sim.compute import ComputeModel
from fedloom.sim.driver import SimDriver, region_nodes
from fedloom.sim.executors import Executor, InlineExecutor, PoolExecutor
from fedloom.sim.network import Network, Partition
from fedloom.sim.report import ArmResult, Report, multi_seed_report
from fedloom.sim.scenario import LINKS, MAX_SEEDS, Arm, ChurnSpec, NetworkConfig, Scenario
from fedloom.topology.gossip import gossip
from fedloom.topology.hierarchical import hierarchical
from fedloom.topology.plan import Plan
from fedloom.topology.specs import Site
from fedloom.topology.star import star
from fedloom.topology.wan import WanModel
from fedloom.transport.codec_policy import CodecPolicy
from fedloom.transport.tensors import CodecSpec
from fedloom.workloads.dp_sgd import LedgerExecutor
from fedloom.workloads.workload import Workload

ProgressFn = Callable[[str, float, float], None]  # (label, virtual seconds done, total)
LogFn = Callable[[str], None]

ROOT_ID = "root"
GOSSIP_EVAL_PEERS = 16  # peers whose models are evaluated at each gossip observation


# ------------------------------------------------------------------------ building


def build_workload(scenario: Scenario, seed: int) -> Workload:
    try:
        return Workload.from_config(
            scenario.data, n_sites=scenario.sites.count, seed=seed, dp_sgd=scenario.dp_sgd
        )
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None


def build_wan(scenario: Scenario, arm: Arm | None = None) -> WanModel:
    """The WAN of ``arm``'s ``[arms.network]``, else of the scenario's ``[network]``."""
    net = network_of(scenario, arm)
    rtts = {(a, b): ms / 1000.0 for a, b, ms in net.region_rtt_ms}
    return WanModel(
        region_rtt=rtts,
        default_intra_rtt_s=net.intra_region_rtt_ms / 1000.0,
        default_inter_rtt_s=net.inter_region_rtt_ms / 1000.0,
        loss=net.packet_loss,  # bytes-level: lowers TCP throughput; ``loss`` drops messages
    )


def network_of(scenario: Scenario, arm: Arm | None) -> NetworkConfig:
    """The network an arm runs on: its own ``[arms.network]``, else the shared one."""
    if arm is not None and arm.network is not None:
        return arm.network
    return scenario.network


def drops_messages(net: NetworkConfig) -> bool:
    """Whether a link may lose a message and stay up (``loss_effect = "drop"``): only then
    can a Hello go unanswered without the link going down (which greets again)."""
    lossy = net.loss > 0.0 or any(p > 0.0 for _, p in net.link_loss)
    return lossy and net.loss_effect == "drop"


def build_sites(scenario: Scenario, workload: Workload, seed: int) -> list[Site]:
    """Site i holds the workload's partition i; it sits in its ``[sites.placement]`` region,
    else round-robin over the regions. Speeds and inbound flags are seeded."""
    cfg = scenario.sites
    rng = entity_rng(seed, "sites")
    speeds = (
        rng.lognormal(0.0, cfg.speed_spread, cfg.count)
        if cfg.speed_spread > 0
        else np.ones(cfg.count)
    )
    inbound = rng.random(cfg.count) < cfg.inbound_fraction
    return [
        Site(
            id=sid,
            region=cfg.region_of(i),
            n_examples=workload.n_examples(i),
            compute_speed=float(speeds[i]),
            uplink_bps=cfg.uplink_mbps * 1e6,
            downlink_bps=cfg.downlink_mbps * 1e6,
            access_latency_s=cfg.access_latency_ms / 1000.0,
            inbound=bool(inbound[i]),
        )
        for i, sid in enumerate(cfg.site_names())
    ]


def build_plan(scenario: Scenario, arm: Arm, sites: Sequence[Site], seed: int) -> Plan:
    wan = build_wan(scenario, arm)
    root_region = network_of(scenario, arm).root_region
    try:
        if arm.topology == "star":
            return star(sites, ROOT_ID, root_region, wan=wan)
        if arm.topology == "hierarchical":
            by: Literal["region", "rtt"] = "rtt" if arm.params.clustering == "rtt" else "region"
            return hierarchical(
                sites, wan, by=by, root_id=ROOT_ID, seed=seed, root_region=root_region
            )
        return gossip(sites, wan, graph=arm.params.graph, k=arm.params.degree, seed=seed)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(
            f"arm {arm.name!r}: cannot build the {arm.topology} topology: {exc}"
        ) from None


def build_plan_for_arm(scenario: Scenario, arm: Arm, seed: int) -> Plan:
    workload = build_workload(scenario, seed)
    return build_plan(scenario, arm, build_sites(scenario, workload, seed), seed)


def build_nodes(
    plan: Plan,
    arm: Arm,
    weights: Weights,
    seed: int,
    n_examples: Mapping[str, int],
    *,
    durable: bool = False,
    hello_retries: bool = True,
) -> dict[str, Node]:
    """One state machine per plan node, built by the factory the daemons use: each node
    runs the arm's parameters as its own daemon config would give them (``node_params``).
    ``durable``: aggregators log their deltas and gossip peers checkpoint (what a restart
    recovers from; the simulator restarts no node unless asked). ``hello_retries``: sites
    and regions say Hello again when unanswered (``drops_messages``: needed only where a
    link loses messages and stays up)."""
    counts = region_count_bounds(plan, arm.params.regional_buffer_size)
    most_examples = max(n_examples.values(), default=0)
    options = NodeOptions(durable=durable, hello_retries=hello_retries)
    secagg = arm.secure_aggregation
    # Secure aggregation runs the real cryptography on keys derived from the seed.
    keys = (
        derived_secagg_keys([s.id for s in plan.nodes], seed, {s.id: s.role for s in plan.nodes})
        if secagg.enabled
        else {}
    )
    # One set shared by every node (built per node it would cost O(nodes²) at 100k sites).
    roster_sites = frozenset(s.id for s in plan.nodes if s.role == "site")
    nodes: dict[str, Node] = {}
    leaf_bounds: ClaimBounds | None = None  # one for every childless node on the arm's params
    for spec in plan.nodes:
        neighbours = plan_neighbours(plan, spec.id)
        p = node_params(arm.params, spec.role, neighbours.children)
        children = neighbours.children
        shared = not children and p is arm.params
        if shared and leaf_bounds is not None:
            bounds = leaf_bounds
        else:
            # What each child could honestly claim: from the plan and the sites' data.
            bounds = claim_bounds(
                p,
                region_counts={c: counts[c] for c, r in children.items() if r == "region"},
                site_examples={c: n_examples.get(c, 0) for c, r in children.items() if r == "site"},
                max_examples_per_site=most_examples,
            )
            # Whom a region's relayed refusals may name: the plan's sites (as a roster's).
            bounds = replace(bounds, roster_sites=roster_sites)
            if shared:
                leaf_bounds = bounds
        nodes[spec.id] = build_node(
            spec.role,
            spec.id,
            arm.algorithm,
            p,
            arm.training,
            neighbours,
            seed=seed,
            weights=weights,
            n_examples=n_examples.get(spec.id, 0),
            bounds=bounds,
            options=options,
            secagg=secagg,
            secagg_keys=keys.get(spec.id),
            # A secure region seals its cohorts with the members' DP noise and a secure
            # site refuses less noise than [privacy] asks: both need the arm's [privacy].
            privacy=arm.privacy if spec.role == "root" or secagg.enabled else None,
        )
    return nodes


def region_count_bounds(plan: Plan, regional_buffer_size: int) -> dict[str, int]:
    """The largest ``count`` each region can forward honestly: K times its largest child's
    (a site counts 1), as its buffer flushes after K updates."""
    bounds: dict[str, int] = {}

    def bound(node_id: str) -> int:
        spec = plan.node(node_id)
        if spec.role != "region":
            return 1
        if node_id not in bounds:
            most = max((bound(c) for c in spec.children), default=1)
            bounds[node_id] = regional_buffer_size * most
        return bounds[node_id]

    for spec in plan.nodes:
        bound(spec.id)
    return bounds


def build_availability(
    scenario: Scenario, arm: Arm, plan: Plan, sites: Sequence[Site], seed: int
) -> tuple[Availability, list[Partition]]:
    a = arm.availability
    deaths: list[Death] = []
    if a.death_fraction > 0:
        rng = entity_rng(seed, "deaths")
        ids = [s.id for s in sites]
        n_dead = round(a.death_fraction * len(ids))
        for idx in sorted(rng.choice(len(ids), size=n_dead, replace=False)):
            deaths.append(Death(a.death_at_s, ids[int(idx)]))
    partitions = [Partition(p.start_s, p.end_s, region_nodes(plan, p.region)) for p in a.partitions]
    churn = churn_windows(
        [s.id for s in sites], a.offline_per_h, a.offline_s, scenario.duration_s, seed
    )
    hosted: dict[str, set[str]] = {}  # site -> the plan's nodes on its machine
    for node in plan.nodes:
        if node.host is not None:
            hosted.setdefault(node.host, set()).add(node.id)
    for i, spec in enumerate(a.churn):
        rng = entity_rng(seed, "churn", i)
        for w in scheduled_churn(spec, sites, scenario.duration_s, rng):
            machine = frozenset(hosted.get(w.node, set()) | {w.node})
            partitions.append(Partition(w.start_s, w.end_s, machine))
    return Availability(dropout=a.dropout, deaths=deaths, churn=churn, seed=seed), partitions


def scheduled_churn(
    spec: ChurnSpec, sites: Sequence[Site], duration_s: float, rng: np.random.Generator
) -> list[ChurnWindow]:
    """One ``[[availability.churn]]`` entry's windows: its sites (the ids, the region's
    sites, ``round(fraction * sites)`` drawn from ``rng``, or all), offline during
    ``[start, end)`` and, with ``every_s``, each period after that until the run ends.
    ``build_availability`` takes each site's machine offline: the site and every node it
    hosts (a regional aggregator elected there), cut together from the rest."""
    if spec.sites:
        chosen = list(spec.sites)
    elif spec.region is not None:
        chosen = [s.id for s in sites if s.region == spec.region]
    elif spec.fraction is not None:
        n = round(spec.fraction * len(sites))
        picked = sorted(rng.choice(len(sites), size=n, replace=False)) if n else []
        chosen = [sites[int(i)].id for i in picked]
    else:
        chosen = [s.id for s in sites]
    return [
        ChurnWindow(site, start, end)
        for start, end in periodic_windows(spec.start_s, spec.end_s, spec.every_s, duration_s)
        for site in chosen
    ]


def churn_windows(
    sites: Sequence[str], per_h: float, mean_s: float, duration_s: float, seed: int
) -> list[ChurnWindow]:
    """Each site's offline spells: starts a Poisson process of ``per_h`` per hour (while
    online), lengths exponential with mean ``mean_s``; from the site's own seeded stream."""
    if per_h <= 0.0:
        return []
    out: list[ChurnWindow] = []
    gap_mean_s = 3600.0 / per_h
    for site in sites:
        rng = entity_rng(seed, "offline", site)
        t = float(rng.exponential(gap_mean_s))
        while t < duration_s:
            length = max(float(rng.exponential(mean_s)), 1e-3)
            out.append(ChurnWindow(site, t, t + length))
            t += length + float(rng.exponential(gap_mean_s))
    return out


# ------------------------------------------------------------------------- running


class _Tally:
    """Counters the report needs that a metric's total does not keep (labels, by role):
    site updates applied by their aggregator, and the secure-aggregation cohorts."""

    def __init__(self, roles: Mapping[str, str]) -> None:
        self.sites = {n for n, r in roles.items() if r == "site"}
        self.regions = {n for n, r in roles.items() if r == "region"}
        self.contributed: set[str] = set()  # sites and regions with an update applied
        self.site_updates = 0  # updates whose src is a site, applied (plain or in a cohort)
        self.sealed = 0
        self.sealed_members = 0
        self.completed = 0
        self.survivors = 0
        self.dropped = 0  # members of a cohort's view that did not upload
        self.aborted: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.epsilon = 0.0  # the root's last privacy_epsilon gauge (ε at δ so far)
        self.releases = 0  # private releases (one gauge each)
        self.exhausted = False
        self.dp_clipped = 0  # site contributions the central release clipped

    def __call__(self, node_id: str, now: float, m: Metric) -> None:
        name = m.name
        labels = m.labels or {}
        if name == "update_applied":
            src = labels.get("src")
            if src in self.sites:
                self.site_updates += 1
                self.contributed.add(src)
            elif src in self.regions:
                self.contributed.add(src)
        elif name == "privacy_epsilon":  # the root's gauge: at start, after each release
            if m.value > self.epsilon:  # every release spends some ε; a repeat is no release
                self.releases += 1
            self.epsilon = max(self.epsilon, m.value)
        elif name == "privacy_budget_exhausted":
            self.exhausted = True
        elif name == "privacy_clipped":
            self.dp_clipped += int(m.value)
        elif not name.startswith("secagg_"):
            return
        elif name == "secagg_cohort_sealed":
            self.sealed += 1
            self.sealed_members += int(labels.get("members", "0"))
        elif name == "secagg_cohort_completed":
            self.completed += 1
        elif name == "secagg_cohort_survivors":
            self.survivors += int(m.value)
        elif name == "secagg_dropped":
            self.dropped += int(m.value)
        elif name == "secagg_cohort_aborted":
            self.aborted[str(labels.get("reason", "?"))] += 1
        elif name == "secagg_update_lost":
            self.lost[str(labels.get("reason", "?"))] += int(m.value)
        elif name == "secagg_refused":
            self.refused[str(labels.get("reason", "?"))] += int(m.value)

    def dp_extra(self, arm: Arm) -> dict[str, float | int | str]:
        """``dp_*`` fields of an arm with central DP: ε at δ from the root's ledger (its
        gauge after the last release), the releases, z and clip, the budget."""
        dp = arm.privacy
        out: dict[str, float | int | str] = {
            "dp_epsilon": self.epsilon,
            "dp_delta": dp.delta,
            "dp_noise_multiplier": dp.noise_multiplier,
            "dp_clip": dp.clip,
            "dp_releases": self.releases,
            "dp_budget_exhausted": int(self.exhausted),
            "dp_clipped": self.dp_clipped,
        }
        if dp.epsilon_budget is not None:
            out["dp_epsilon_budget"] = dp.epsilon_budget
        if arm.target_epsilon is not None:
            out["dp_target_epsilon"] = arm.target_epsilon
            out["dp_planned_releases"] = arm.planned_releases
            out["dp_sampling_rate"] = arm.dp_sampling_rate or 1.0
        return out

    def secagg_extra(self) -> dict[str, float | int | str]:
        """``secagg_*`` fields of an arm's ``extra`` (a secure arm's cohorts)."""
        out: dict[str, float | int | str] = {
            "secagg_cohorts_sealed": self.sealed,
            "secagg_cohorts_completed": self.completed,
            "secagg_cohorts_aborted": sum(self.aborted.values()),
            "secagg_mean_cohort_size": self.sealed_members / self.sealed if self.sealed else 0.0,
            "secagg_mean_survivors": self.survivors / self.completed if self.completed else 0.0,
            "secagg_members_dropped": self.dropped,
            "secagg_updates_lost": sum(self.lost.values()),
        }
        out |= {f"secagg_aborted_{r}": n for r, n in sorted(self.aborted.items())}
        out |= {f"secagg_refused_{r}": n for r, n in sorted(self.refused.items())}
        return out

    def silent_extra(self) -> dict[str, int | str]:
        """The sites (and regions) not one of whose updates was applied all run, counted
        and named (the first ``SILENT_IDS_LISTED``), so an exclusion is never silent: a
        site offline throughout, one whose parent never heard it, a region with no model."""
        out: dict[str, int | str] = {}
        for role, ids in (("sites", self.sites), ("regions", self.regions)):
            if not ids:
                continue
            silent = sorted(ids - self.contributed)
            named = " ".join(silent[:SILENT_IDS_LISTED])
            if len(silent) > SILENT_IDS_LISTED:
                named += f" (+{len(silent) - SILENT_IDS_LISTED} more)"
            out[f"{role}_without_updates"] = len(silent)
            out[f"{role}_without_updates_ids"] = named
        return out


SILENT_IDS_LISTED = 20  # a report names at most this many sites that never contributed


def _site_bytes(tiers: Mapping[str, int], site_updates: int) -> dict[str, float | int]:
    """What the sites' links carried (both directions: a secure cohort's seals, views and
    unmask requests come down, joins, masked uploads, signatures and shares go up) per
    site update applied."""
    up = sum(v for k, v in tiers.items() if k.startswith("site->"))
    down = sum(v for k, v in tiers.items() if k.endswith("->site"))
    per = max(site_updates, 1)
    return {
        "site_updates_applied": site_updates,
        "site_bytes_up_per_update": up / per,
        "site_bytes_down_per_update": down / per,
        "site_bytes_per_update": (up + down) / per,
    }


@dataclass(slots=True)
class _Run:
    """The outcome of one simulated run of one arm (one point of a sweep)."""

    result: ArmResult
    lr: float
    server_lr: float


def _evaluator(
    plan: Plan, nodes: Mapping[str, Node], workload: Workload, driver_alive: Callable[[str], bool]
) -> Callable[[], tuple[float, float]]:
    """Returns a function giving (accuracy, model version) of the run's model now."""
    if plan.kind == "gossip":
        peers = [n for n in plan.node_ids("peer")]
        step = max(1, len(peers) // GOSSIP_EVAL_PEERS)
        sample = peers[::step][:GOSSIP_EVAL_PEERS]

        def gossip_eval() -> tuple[float, float]:
            accs, steps = [], []
            for pid in sample:
                if not driver_alive(pid):
                    continue
                holder = nodes[pid]
                assert isinstance(holder, ModelHolder)
                cur = holder.current_model()
                if cur is None:
                    continue
                accs.append(workload.evaluate(cur[1])["accuracy"])
                steps.append(cur[0])
            if not accs:
                return 0.0, 0.0
            return float(np.mean(accs)), float(np.mean(steps))

        return gossip_eval

    cache: dict[int, float] = {}

    def root_eval() -> tuple[float, float]:
        root = nodes[plan.roots[0]]  # looked up each time: a restart replaces the node
        assert isinstance(root, ModelHolder)
        cur = root.current_model()
        if cur is None:
            return 0.0, 0.0
        version, weights = cur
        if version not in cache:
            cache.clear()
            cache[version] = workload.evaluate(weights)["accuracy"]
        return cache[version], float(version)

    return root_eval


def configure_links(network: Network, scenario: Scenario, arm: Arm, seed: int) -> None:
    """The scenario's message loss (``[network] loss`` and ``[network.<link>]``) and the
    arm's per-link codecs (``[codec.<link>]``) on the run's network."""
    net = network_of(scenario, arm)
    network.set_message_loss(
        net.loss,
        by_tier=net.loss_by_tier(),
        seed=seed,
        effect=net.loss_effect,
        reconnect_s=net.reconnect_s,
    )
    if arm.link_codecs:
        network.set_tier_codecs(
            {tier: codec_policy(codec) for link, codec in arm.link_codecs for tier in LINKS[link]}
        )


def codec_policy(codec: CodecConfig) -> CodecPolicy:
    """The wire codec policy of a ``[codec]`` table: deltas go ``up``, models ``down``."""
    return CodecPolicy(
        up=CodecSpec(kind=codec.up, topk_fraction=codec.topk_fraction),  # type: ignore[arg-type]
        down=CodecSpec(kind=codec.down),  # type: ignore[arg-type]
    )


def _state_dir(arm: Arm) -> str:
    """A fresh directory for one run's recovery logs: inside ``durability.state_dir``
    (kept), or a temporary one (removed after the run)."""
    parent = arm.durability.state_dir
    try:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"fedloom-sim-{arm.name}-", dir=parent)
    except OSError as exc:  # a mistake in the scenario's path, not a crash
        raise ConfigError(
            f"arm {arm.name!r}: durability.state_dir: cannot make a log directory in "
            f"{parent}: {exc.strerror}"
        ) from None


def _make_executor(scenario: Scenario, workload: Workload, ids: Sequence[str]) -> Executor:
    trainer = WorkloadTrainer(workload, ids)
    inner: Executor
    if scenario.executor == "process":
        inner = PoolExecutor(trainer, workers=scenario.workers)
    elif scenario.executor == "ray":  # sim.ray_executor: the ray extra, imported there
        from fedloom.sim.ray_executor import RayExecutor

        inner = RayExecutor(trainer, address=scenario.ray_address, workers=scenario.workers)
    else:
        inner = InlineExecutor(trainer)
    if scenario.dp_sgd is None:
        return inner
    index = {site: i for i, site in enumerate(ids)}  # each site's privacy ledger
    return LedgerExecutor(inner, scenario.dp_sgd, lambda site: workload.n_examples(index[site]))


def run_once(
    scenario: Scenario,
    arm: Arm,
    workload: Workload,
    seed: int,
    *,
    label: str,
    progress: ProgressFn | None = None,
) -> ArmResult:
    """Simulate one arm with its own parameters (no sweep)."""
    with collector_paused_while_building() as running:
        return _run_once(scenario, arm, workload, seed, label, progress, running)


@contextmanager
def collector_paused_while_building() -> Iterator[Callable[[], None]]:
    """Python's cyclic garbage collector around one run: paused while the run is built
    (at 100,000 sites that is millions of long-lived objects and no garbage, so each
    collection would only walk them), then what was built is frozen (``gc.freeze``: later
    collections skip it) and collection resumes, when the body calls the callable it is
    given, just before the run. Unfrozen at the end, so collections may free it again.
    During the run the youngest generation is collected every ``RUN_GC_THRESHOLD``
    allocations (Python's default is 700), and so the oldest one about 14 times less
    often: a run keeps most of what it allocates (messages in flight, the sites' data), and
    each full collection walks everything it kept. The simulation's objects form no
    reference cycles (the collections of a 100,000-site run and of the scenarios in
    scenarios/ found none), so a collection frees nothing; it only walks the objects
    allocated since the last one, most of them messages still in flight, and promotes them.
    At a million allocations between collections most of those are gone before one runs
    (at 10,000 a 100,000-site run spent 2 to 5 % of its time on them, counting the caches
    they flush). Where the caller has frozen objects
    itself, nothing is frozen here (``gc.unfreeze`` would release the caller's too); the
    caller's disabled collector stays disabled; the thresholds are restored after."""
    enabled = gc.isenabled()
    freeze = gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    gc.disable()

    def running() -> None:
        if freeze:
            gc.freeze()
        gc.set_threshold(max(thresholds[0], RUN_GC_THRESHOLD), *thresholds[1:])
        if enabled:
            gc.enable()

    try:
        yield running
    finally:
        if freeze:
            gc.unfreeze()
        gc.set_threshold(*thresholds)
        if enabled:
            gc.enable()


RUN_GC_THRESHOLD = 1_000_000  # allocations between young collections during a run


def _run_once(
    scenario: Scenario,
    arm: Arm,
    workload: Workload,
    seed: int,
    label: str,
    progress: ProgressFn | None,
    running: Callable[[], None],
) -> ArmResult:
    wall0 = time.perf_counter()
    sites = build_sites(scenario, workload, seed)
    plan = build_plan(scenario, arm, sites, seed)
    init = workload.init_weights(seed)
    examples = {s.id: s.n_examples for s in sites}
    durable = arm.durability
    retries = drops_messages(network_of(scenario, arm))
    nodes = build_nodes(plan, arm, init, seed, examples, durable=durable.log, hello_retries=retries)
    for r in durable.restarts:
        if r.node not in nodes:
            raise ConfigError(f"arm {arm.name!r}: durability.restarts: no node {r.node!r}")
    availability, partitions = build_availability(scenario, arm, plan, sites, seed)
    speeds = {s.id: s.compute_speed for s in sites}
    try:
        compute = ComputeModel.from_config(arm.compute, seed=seed, speeds=speeds)
    except ValueError as exc:
        raise ConfigError(f"arm {arm.name!r}: {exc}") from None
    codecs = codec_policy(arm.codec)
    executor = _make_executor(scenario, workload, [s.id for s in sites])
    state_dir = _state_dir(arm) if durable.log else None
    driver = SimDriver.from_plan(
        plan,
        nodes,
        compute=compute,
        availability=availability,
        executor=executor,
        seed=seed,
        codecs=codecs,
        partitions=partitions,
        state_dir=state_dir,
        signing=durable.signing,
    )
    configure_links(driver.network, scenario, arm, seed)
    for r in durable.restarts:

        def rebuilt(node_id: str = r.node) -> Node:
            fresh = build_nodes(
                plan, arm, init, seed, examples, durable=True, hello_retries=retries
            )
            return fresh[node_id]

        driver.restart_at(r.at_s, r.node, rebuilt, r.down_s)
    tally = _Tally(driver.roles)
    driver.on_metric(tally)
    evaluate = _evaluator(plan, driver.nodes, workload, driver.is_alive)
    series: list[tuple[float, float]] = []
    versions = [0.0]

    def observe(now: float) -> None:
        acc, version = evaluate()
        series.append((now, acc))
        versions[0] = version
        if progress is not None:
            progress(label, now, scenario.duration_s)

    driver.observe(scenario.eval_interval_s, observe)
    running()
    try:
        stats = driver.run(until=scenario.duration_s)
    finally:
        driver.close()
        if state_dir is not None and durable.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)
    if not series or series[-1][0] < scenario.duration_s:
        observe(scenario.duration_s)

    target = scenario.target_accuracy
    first = sustained = None
    if target is not None:
        first = first_crossing(series, target)
        sustained = sustained_crossing(series, target, scenario.target_window_s)
    staleness = Counter(round(s) for s in stats.staleness)
    lost_to_loss = driver.network.stats.messages_dropped_loss
    tiers = dict(stats.bytes_by_tier)
    bytes_up = sum(v for k, v in tiers.items() if _is_uplink(k))
    bytes_down = sum(v for k, v in tiers.items() if not _is_uplink(k))
    totals = stats.metric_totals
    extra: dict[str, float | int | str] = {
        "lr": arm.training.lr,
        "server_lr": arm.params.server_lr,
        "events": stats.events,
        "messages_sent": stats.messages_sent,
        # Lost to the links' message loss ([network] loss) count as dropped too.
        "messages_dropped": stats.messages_dropped + lost_to_loss,
        "messages_dropped_loss": lost_to_loss,
        "connection_resets": driver.network.stats.connection_resets,
        "deaths": stats.deaths,
        "updates_rejected": int(stats.metric_counts.get("update_rejected", 0)),
        "gossip_clipped": int(stats.metric_counts.get("gossip_clipped", 0)),
        "duplicates_received": int(stats.metric_counts.get("update_duplicate", 0)),
        "late_updates": int(stats.metric_counts.get("update_late", 0)),
        "stale_updates": int(stats.metric_counts.get("update_stale", 0)),
        "job_timeouts": int(totals.get("job_timeout", 0)),
        "jobs_per_wall_s": stats.jobs_finished / max(time.perf_counter() - wall0, 1e-9),
    }
    extra |= _site_bytes(tiers, tally.site_updates)
    extra |= tally.silent_extra()
    if arm.secure_aggregation.enabled:
        extra |= tally.secagg_extra()
        # Where masking's bytes go: masked uploads (with their bundles), seals, views, ...
        extra |= {
            f"secagg_bytes_{kind}": n
            for kind, n in sorted(stats.bytes_by_type.items())
            if kind.startswith("SecAgg") or kind == "MaskedUpdate"
        }
    if arm.privacy.enabled:
        extra |= tally.dp_extra(arm)
    if durable.log or durable.signing:
        extra |= {
            "log_commits": stats.commits,
            "signed": stats.signed,
            "verified": stats.verified,
            "unverified": stats.unverified,
            "restarts": stats.restarts,
        }
    if scenario.target_window_s > 0:
        extra["first_crossing_s"] = -1.0 if first is None else first  # kept for old readers
    if isinstance(executor, LedgerExecutor):  # record-level DP-SGD: the sites' ledgers
        eps = executor.epsilons()
        extra["dp_sgd_epsilon_max"] = max(eps.values(), default=0.0)
        extra["dp_sgd_delta"] = executor.dp.delta
        extra["dp_sgd_refused_jobs"] = sum(v.refusals for v in executor.ledgers.values())
    return ArmResult(
        name=arm.name,
        algorithm=arm.algorithm,
        topology=arm.topology,
        final_accuracy=final_accuracy(series, scenario.duration_s),
        time_to_target_s=sustained,  # the sustained crossing (the first if no window)
        first_crossing_s=first,
        sustained_crossing_s=sustained,
        target_accuracy=target,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        bytes_by_tier=tiers,
        updates_applied=stats.updates_applied,
        updates_duplicated=stats.updates_duplicated,
        max_staleness=max(staleness) if staleness else 0,
        staleness_histogram=dict(sorted(staleness.items())),
        accuracy_series=series,
        wall_seconds=time.perf_counter() - wall0,
        virtual_seconds=stats.virtual_time,
        jobs_started=stats.jobs_started,
        jobs_finished=stats.jobs_finished,
        jobs_dropped=stats.jobs_dropped,
        versions=int(versions[0]),
        extra=extra,
    )


def time_to_accuracy(
    series: Sequence[tuple[float, float]], target: float, window_s: float
) -> float | None:
    """The time to target a report gives: the sustained crossing (``window_s = 0``: the
    first crossing)."""
    if window_s <= 0.0:
        return first_crossing(series, target)
    return sustained_crossing(series, target, window_s)


def first_crossing(series: Sequence[tuple[float, float]], target: float) -> float | None:
    """The time of the first evaluation at or above ``target`` (None: never)."""
    for t, acc in series:
        if acc >= target:
            return t
    return None


def sustained_crossing(
    series: Sequence[tuple[float, float]], target: float, window_s: float
) -> float | None:
    """The START t of the first window ``[t, t + window_s)`` that stays at the target: the
    evaluation at t is at or above ``target``, so is the mean of the evaluations in the
    window, and the run went on for at least ``window_s`` after t (a window the run cut
    short proves nothing). None: never.

    A window measures *sustained* accuracy: on heterogeneous data one evaluation can spike
    past the target long before the model stays there. The window's start is reported, not
    its end, so the window puts no floor under the time: a model at the target from minute
    5 that stays there is at the target at minute 5, whatever the window's length. It is
    never before the first crossing.
    """
    if window_s <= 0.0:
        return first_crossing(series, target)
    times = [t for t, _ in series]
    accs = [a for _, a in series]
    if not times:
        return None
    last = times[-1]
    hi = 0
    for lo, t in enumerate(times):
        if last - t < window_s:
            return None  # this window (and every later one) is cut short by the run's end
        hi = max(hi, lo)
        while hi < len(times) and times[hi] < t + window_s:
            hi += 1
        if accs[lo] >= target and float(np.mean(accs[lo:hi])) >= target:
            return t
    return None


FINAL_WINDOW = 0.1  # final accuracy: mean over the evaluations in the last 10% of the run


def final_accuracy(series: Sequence[tuple[float, float]], duration_s: float) -> float:
    """Mean accuracy over the evaluations in the last ``FINAL_WINDOW`` of the run.

    One evaluation is a noisy point when the data is heterogeneous (the model moves with
    each buffer of updates); averaging the tail makes arms comparable.
    """
    start = duration_s * (1.0 - FINAL_WINDOW)
    tail = [acc for t, acc in series if t >= start] or [series[-1][1]]
    return float(np.mean(tail))


def _is_uplink(tier: str) -> bool:
    """'site->region', 'region->root', 'site->root' go up; peer traffic counts as up."""
    src, _, dst = tier.partition("->")
    order = {"site": 0, "peer": 0, "region": 1, "root": 2}
    return order.get(src, 0) <= order.get(dst, 0) and not (src == dst and src != "peer")


def _better(a: ArmResult, b: ArmResult) -> bool:
    """Is run ``a`` better than ``b``: sooner to the target, then more accurate."""
    ta = a.time_to_target_s if a.time_to_target_s is not None else math.inf
    tb = b.time_to_target_s if b.time_to_target_s is not None else math.inf
    if ta != tb:
        return ta < tb
    return a.final_accuracy > b.final_accuracy


def run_arm(
    scenario: Scenario,
    arm: Arm,
    workload: Workload,
    seed: int,
    progress: ProgressFn | None = None,
    log: LogFn | None = None,
) -> ArmResult:
    """Run an arm; with a sweep, run every point and keep the best (recorded in ``extra``)."""
    lrs = arm.lr_sweep or (arm.training.lr,)
    server_lrs = arm.server_lr_sweep or (arm.params.server_lr,)
    points = list(itertools.product(lrs, server_lrs))
    if len(points) == 1:
        return run_once(scenario, arm, workload, seed, label=arm.name, progress=progress)
    best: ArmResult | None = None
    sweep_wall = 0.0
    tried: list[str] = []
    for lr, slr in points:
        variant = replace(
            arm,
            training=replace(arm.training, lr=lr),
            params=replace(arm.params, server_lr=slr),
        )
        label = f"{arm.name} lr={lr:g}" + (f" slr={slr:g}" if len(server_lrs) > 1 else "")
        result = run_once(scenario, variant, workload, seed, label=label, progress=progress)
        sweep_wall += result.wall_seconds
        ttt = result.time_to_target_s
        tried.append(
            f"{lr:g}/{slr:g}:{'-' if ttt is None else f'{ttt:.0f}s'}:{result.final_accuracy:.3f}"
        )
        if log is not None:
            log(
                f"  {label}: final accuracy {result.final_accuracy:.3f}, time to target "
                f"{'never' if ttt is None else f'{ttt / 3600:.2f} h'}"
            )
        if best is None or _better(result, best):
            best = result
    assert best is not None
    extra = dict(best.extra)
    extra["sweep"] = " ".join(tried)
    extra["sweep_points"] = len(points)
    return replace(best, wall_seconds=sweep_wall, extra=extra)


def preflight(scenario: Scenario, arms: Sequence[Arm], workload: Workload, seed: int) -> None:
    """Build every arm's plan and nodes once before any arm runs, so that a combination the
    factory refuses (a ConfigError, or a ValueError naming it) stops the scenario at once,
    not after the arms before it ran (about a second for 1,000 sites)."""
    sites = build_sites(scenario, workload, seed)
    init = workload.init_weights(seed)
    examples = {s.id: s.n_examples for s in sites}
    for arm in arms:
        plan = build_plan(scenario, arm, sites, seed)
        try:
            build_nodes(plan, arm, init, seed, examples)
        except ConfigError as exc:
            raise ConfigError(f"arm {arm.name!r}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"arm {arm.name!r}: {exc}") from None


def against_plain(arms: Sequence[Arm], results: Sequence[ArmResult]) -> list[ArmResult]:
    """Each secure arm's bytes per site update against a plain arm of the same run: the
    first arm without secure aggregation with the same parameters and training, else of
    the same algorithm and topology, else the first plain arm (``secagg_plain_arm``,
    ``secagg_bytes_ratio``)."""
    plain = [(a, r) for a, r in zip(arms, results, strict=True) if not a.secure_aggregation.enabled]
    out: list[ArmResult] = []
    for arm, result in zip(arms, results, strict=True):
        if not arm.secure_aggregation.enabled or not plain:
            out.append(result)
            continue
        twin = [r for a, r in plain if (a.params, a.training) == (arm.params, arm.training)]
        same = [r for a, r in plain if (a.algorithm, a.topology) == (arm.algorithm, arm.topology)]
        ref = (twin or same or [plain[0][1]])[0]
        mine = float(result.extra.get("site_bytes_per_update", 0.0))
        theirs = float(ref.extra.get("site_bytes_per_update", 0.0))
        extra = dict(result.extra)
        extra["secagg_plain_arm"] = ref.name
        extra["secagg_bytes_ratio"] = mine / theirs if theirs > 0 else 0.0
        out.append(replace(result, extra=extra))
    return out


def check_seed_flags(seed: int | None, n_seeds: int | None) -> None:
    """``--seed`` is a seed (>= 0, as the scenario's), ``--seeds`` 1 to ``MAX_SEEDS``."""
    if seed is not None and (isinstance(seed, bool) or seed < 0):
        raise ConfigError(f"--seed: expected a seed >= 0, got {seed}")
    if n_seeds is not None and (isinstance(n_seeds, bool) or not 1 <= n_seeds <= MAX_SEEDS):
        raise ConfigError(f"--seeds: the number of seeds must be 1 to {MAX_SEEDS:,}, got {n_seeds}")


def resolve_seeds(
    scenario: Scenario, seed: int | None = None, n_seeds: int | None = None
) -> list[int]:
    """The seeds a run uses. ``n_seeds`` (``--seeds N``): N consecutive seeds from ``seed``
    (``--seed``) or else the scenario's: s_i = seed + i, so s_0 is the single-seed run's seed
    and any seed's run is reproduced alone by ``--seed s_i``. Else ``seed`` alone, else the
    scenario's ``seeds`` list, else its ``seed``."""
    check_seed_flags(seed, n_seeds)
    if n_seeds is not None:
        base = scenario.seed if seed is None else seed
        return [base + i for i in range(n_seeds)]
    if seed is not None:
        return [seed]
    return list(scenario.seeds) or [scenario.seed]


def _run_seed(
    scenario: Scenario,
    selected: Sequence[Arm],
    run_seed: int,
    progress: ProgressFn | None,
    log: LogFn | None,
) -> tuple[list[ArmResult], Workload]:
    """Every selected arm on one seed."""
    workload = build_workload(scenario, run_seed)
    if len(selected) > 1:
        preflight(scenario, selected, workload, run_seed)
    results = [run_arm(scenario, arm, workload, run_seed, progress, log) for arm in selected]
    return against_plain(selected, results), workload


def _seed_progress(progress: ProgressFn | None, seed: int) -> ProgressFn | None:
    """Progress labelled with the seed (one bar per arm and seed)."""
    if progress is None:
        return None
    outer = progress

    def update(label: str, done: float, total: float) -> None:
        outer(f"{label} · seed {seed}", done, total)

    return update


def _seed_outcomes(
    scenario: Scenario,
    selected: Sequence[Arm],
    run_seeds: Sequence[int],
    progress: ProgressFn | None,
    log: LogFn | None,
) -> Iterator[tuple[list[ArmResult], Workload]]:
    """Each seed's ``(results, workload)`` in order: one run after the other, or with
    ``executor = "ray"`` and ``parallel_runs`` all runs at once as Ray tasks
    (``sim.ray_executor.run_seeds_on_ray``). With Ray, one connection serves every run."""
    if scenario.executor == "ray":
        from fedloom.sim.ray_executor import RaySession, run_seeds_on_ray

        with RaySession(scenario.ray_address, scenario.workers):
            if scenario.parallel_runs:
                yield from run_seeds_on_ray(scenario, selected, run_seeds, progress, log)
            else:
                yield from _seeds_in_turn(scenario, selected, run_seeds, progress, log)
        return
    yield from _seeds_in_turn(scenario, selected, run_seeds, progress, log)


def _seeds_in_turn(
    scenario: Scenario,
    selected: Sequence[Arm],
    run_seeds: Sequence[int],
    progress: ProgressFn | None,
    log: LogFn | None,
) -> Iterator[tuple[list[ArmResult], Workload]]:
    multi = len(run_seeds) > 1
    for run_seed in run_seeds:
        seed_progress = _seed_progress(progress, run_seed) if multi else progress
        yield _run_seed(scenario, selected, run_seed, seed_progress, log)


def run_scenario(
    scenario: Scenario,
    *,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    arms: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
    log: LogFn | None = None,
) -> Report:
    """Run the scenario's arms (all, or the named ones) and gather the report.

    ``seeds`` (else ``resolve_seeds(scenario, seed)``): with two or more, every arm runs
    once per seed, one seed after the other (each seed's training jobs in the scenario's
    executor: inline, the process pool or Ray tasks; with ``parallel_runs`` every arm on every
    seed at once, one Ray task each), and the report holds each run and their means
    and confidence intervals (``Report.runs``, ``sim.report.multi_seed_report``).
    """
    run_seeds = list(seeds) if seeds is not None else resolve_seeds(scenario, seed)
    if not run_seeds or len(set(run_seeds)) != len(run_seeds):
        raise ConfigError(f"seeds: need one or more distinct seeds, got {run_seeds}")
    selected = [a for a in scenario.arms if arms is None or a.name in arms]
    wall0 = time.perf_counter()
    multi = len(run_seeds) > 1
    per_seed: list[list[ArmResult]] = []
    workload: Workload | None = None
    outcomes = _seed_outcomes(scenario, selected, run_seeds, progress, log)
    for i, (run_seed, (results, built)) in enumerate(zip(run_seeds, outcomes, strict=True)):
        workload = workload or built
        per_seed.append(results)
        if multi and log is not None:
            for r in results:
                ttt = r.time_to_target_s
                log(
                    f"seed {run_seed} ({i + 1}/{len(run_seeds)}) {r.name}: final accuracy "
                    f"{r.final_accuracy:.3f}, time to target "
                    f"{'never' if ttt is None else f'{ttt / 3600:.2f} h'}"
                )
    assert workload is not None
    meta: dict[str, Any] = {
        "duration_s": scenario.duration_s,
        "eval_interval_s": scenario.eval_interval_s,
        "sites": scenario.sites.count,
        "data": dict(scenario.data),
        "workload": workload.describe(),
        "wall_total_s": time.perf_counter() - wall0,
    }
    if scenario.target_window_s > 0:
        meta["target_window_s"] = scenario.target_window_s
    if scenario.meta:  # the scenario's own [meta] table, as written
        meta["scenario_meta"] = dict(scenario.meta)
    names = {a.name for a in selected}
    baseline = scenario.baseline if scenario.baseline in names else None
    if baseline is not None:
        meta["baseline"] = baseline
    if multi:
        runs = {arm.name: [results[j] for results in per_seed] for j, arm in enumerate(selected)}
        base_seed = scenario.seed if seed is None else seed
        return multi_seed_report(
            scenario.name, base_seed, scenario.description, run_seeds, runs, meta
        )
    return Report(
        scenario=scenario.name,
        seed=run_seeds[0],
        description=scenario.description,
        arms=per_seed[0],
        meta=meta,
    )
