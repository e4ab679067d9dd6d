"""Scenario files: one TOML file describes sites, network, failures, data and the arms to compare.

A scenario has shared sections (``[data]``, ``[sites]``, ``[network]``, ``[compute]``,
``[availability]``, ``[training]``, ``[codec]``) and one ``[[arms]]`` entry per
algorithm/topology configuration to compare. An arm may override any shared section with
a table of the same name (``[arms.training]`` ...). Reading is strict: unknown fields and
wrong types are reported with the field's path, never a traceback.

Sites and regions. ``[sites]`` gives ``count`` sites ``site-000``, ``site-001``, ... (or the
ids in ``names``, site i holding the data partition i; ``count`` may then be left out) and
spreads them round-robin over ``regions``. A ``[sites.placement]`` table places them
explicitly instead, one list of site ids per region; every site is placed exactly once and
every region gets at least one site (``regions``, if given, lists the same regions; else the
table's order is the regions' order). The hierarchical planner then makes exactly one
cluster per region, ``region-<name>``, holding exactly the sites placed there (with
``clustering = "rtt"`` it would ignore the placement, so the two are refused together)::

    [sites]
    names = ["hospital-1", "hospital-2", "hospital-3", "hospital-4"]
    [sites.placement]
    north = ["hospital-1", "hospital-2"]
    south = ["hospital-3", "hospital-4"]

A region may be given a count instead (in every region of the table): ``north = 40``,
``south = 60`` places the first 40 sites in north and the next 60 in south.

Faults. ``[network] loss`` is the probability that one message on a WAN link is lost
(``sim.network``: seeded per link; ``loss_effect = "drop"`` loses it alone, ``"reset"``
breaks the connection for ``reconnect_s``); ``packet_loss`` is TCP's packet loss, which
only lowers throughput. A ``[network.<link>]`` table (``site-root``, ``site-region``,
``region-root``, ``peer-peer``) gives one link its own ``loss``; a ``[codec.<link>]``
table gives it its own ``up``/``down``/``topk_fraction``; ``[arms.network]`` gives an arm
its own network over the shared one. ``[[availability.churn]]`` takes sites' machines
(each site with the aggregators it hosts) offline in a window (``start_h``, ``end_h`` or
``duration_h``, ``every_h`` to repeat it; ``sites``, ``region`` or ``fraction``, else every
site)::

    [network]
    loss = 0.01
    [network.region-root]
    loss = 0.05
    [codec.site-region]
    up = "int8"
    [[availability.churn]]
    region = "north"
    start_h = 20
    duration_h = 2
    every_h = 24

Seeds. ``seed`` (default 0) seeds everything random in a run. ``seeds = [3, 4, 5]`` runs
every arm once per listed seed (distinct, >= 0) and reports means and 95% confidence
intervals (``sim.report``); ``fedloom sim --seeds N`` overrides it with N seeds from
``seed`` on.

Durability. A ``[durability]`` table (shared, or ``[arms.durability]`` for one arm) runs
what the daemons depend on (``sim.durability``): ``log = true`` gives every node a real
recovery log (``federation.store.StateStore``, one directory per node under
``state_dir``, default a temporary directory removed after the run) that each batch of
``Persist`` effects is written to before the effects after it; ``signing = true`` signs
every update and model end to end and checks each on arrival (refused ones are dropped
and counted); ``restarts`` crashes nodes and brings them back from their log (needs
``log``)::

    [durability]
    log = true
    signing = true
    restarts = [{ node = "region-r0", at_s = 600, down_s = 30 }]

Record-level DP-SGD. A top-level ``[dp_sgd]`` table (``noise_multiplier``,
``max_grad_norm``, ``delta``, ``epsilon_budget``; ``workloads.dp_sgd``) makes every site
train its torch model with Opacus and keep a privacy ledger (in memory, one per site); a
site stops training once its next job would spend more than ``epsilon_budget``. Sampling
and noise are seeded from the job's seed here, so a run is reproducible.

Executors. ``executor`` is where training jobs run: ``"inline"`` (default), ``"process"``
(a pool of ``workers`` processes) or ``"ray"`` (``sim.ray_executor``: a local Ray cluster of
``workers`` CPUs, or the cluster at ``ray_address``; ``parallel_runs = true`` runs the arms
and seeds side by side, one Ray task each, a few seeds ahead). The report is the same with
every executor.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedloom.algorithms.dp.ledger import DELTA_MAX
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.params import (
    ALGORITHM_FIELDS,
    ALGORITHMS,
    DEFAULT_CLIENTS_PER_ROUND,
    MAX_LR,
    TOPOLOGIES,
    AlgorithmConfig,
    CodecConfig,
    TrainingConfig,
    read_algorithm,
    read_codec,
    read_training,
)
from fedloom.federation.privacy import ACCOUNTANTS, NO_PRIVACY, PrivacyConfig, read_privacy
from fedloom.federation.secagg_params import (
    SecureAggregationConfig,
    check_codec,
    read_secure_aggregation,
)
from fedloom.sim.compute import MAX_LOGNORMAL_SIGMA, distribution_from_config
from fedloom.sim.report import _plain
from fedloom.workloads.dp_sgd import DpSgdConfig, check_model, read_dp_sgd


@dataclass(frozen=True, slots=True)
class SitesConfig:
    count: int
    regions: tuple[str, ...]
    uplink_mbps: float
    downlink_mbps: float
    access_latency_ms: float
    speed_spread: float  # lognormal sigma of per-site compute speed (0 = identical sites)
    inbound_fraction: float
    # The sites' ids, site i holding the workload's partition i (default ``site_ids``).
    names: tuple[str, ...] = ()
    # ``[sites.placement]``: each site's region, as written (empty: round-robin over
    # ``regions``, site i in ``regions[i % len(regions)]``).
    placement: Mapping[str, str] = field(default_factory=dict)

    def site_names(self) -> tuple[str, ...]:
        return self.names or tuple(site_ids(self.count))

    def region_of(self, index: int) -> str:
        """The region of site ``index``: the explicit placement, else round-robin."""
        if self.placement:
            return self.placement[self.site_names()[index]]
        return self.regions[index % len(self.regions)]


def site_ids(count: int) -> list[str]:
    """The default site ids: ``site-000``, ``site-001``, ... (at least three digits)."""
    width = max(3, len(str(count - 1)))
    return [f"site-{i:0{width}d}" for i in range(count)]


# The links of a plan, by the roles at their ends, and the directed tiers each carries
# (``sim.network`` counts bytes and picks codecs by tier, e.g. ``"site->region"``).
LINKS: dict[str, tuple[str, ...]] = {
    "site-root": ("site->root", "root->site"),
    "site-region": ("site->region", "region->site"),
    "region-root": ("region->root", "root->region"),
    "peer-peer": ("peer->peer",),
}
TOPOLOGY_LINKS: dict[str, tuple[str, ...]] = {
    "star": ("site-root",),
    "hierarchical": ("site-region", "region-root"),
    "gossip": ("peer-peer",),
}


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    intra_region_rtt_ms: float
    inter_region_rtt_ms: float
    # Probability that one message is lost on a WAN link (``sim.network`` message loss).
    loss: float
    region_rtt_ms: tuple[tuple[str, str, float], ...]
    root_region: str | None
    # TCP packet loss rate: lowers throughput (Mathis), never drops a message.
    packet_loss: float = 0.0
    # ``[network.<link>] loss``: the message loss of one link (over ``loss``).
    link_loss: tuple[tuple[str, float], ...] = ()
    # What a lost message does: "drop" (it alone) or "reset" (the connection breaks and
    # is back after ``reconnect_s``).
    loss_effect: str = "drop"
    reconnect_s: float = 1.0

    def loss_by_tier(self) -> dict[str, float]:
        """The message loss of each directed tier that ``[network.<link>]`` names."""
        return {tier: p for link, p in self.link_loss for tier in LINKS[link]}


@dataclass(frozen=True, slots=True)
class Partition:
    region: str
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class ChurnSpec:
    """Sites offline during ``[start_s, end_s)``, again every ``every_s`` if given (a
    daily window: ``every_s = 86400``). Which sites: the ids in ``sites``, the sites of
    ``region``, a ``fraction`` of all sites drawn with the run seed, or (none of these)
    every site."""

    start_s: float
    end_s: float
    every_s: float | None = None
    sites: tuple[str, ...] = ()
    region: str | None = None
    fraction: float | None = None


@dataclass(frozen=True, slots=True)
class AvailabilityConfig:
    dropout: float
    death_fraction: float
    death_at_s: float
    partitions: tuple[Partition, ...]
    # Churn: each site goes offline at random (a Poisson process of ``offline_per_h``
    # spells per hour), for ``offline_s`` on average (exponential): cut from the network,
    # its links go down, what was in flight is lost (a member leaving a secure cohort).
    offline_per_h: float = 0.0
    offline_s: float = 300.0
    # ``[[availability.churn]]``: scheduled offline windows (one-off or periodic).
    churn: tuple[ChurnSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class Restart:
    node: str
    at_s: float
    down_s: float


@dataclass(frozen=True, slots=True)
class DurabilityConfig:
    log: bool = False  # every node writes its Persists to a recovery log (StateStore)
    signing: bool = False  # updates and models signed end to end, checked on arrival
    state_dir: str | None = None  # where the logs go (None: a temporary directory)
    restarts: tuple[Restart, ...] = ()  # nodes brought back from their log mid-run


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    algorithm: str
    topology: str
    params: AlgorithmConfig
    training: TrainingConfig
    codec: CodecConfig
    availability: AvailabilityConfig
    compute: Mapping[str, Any]
    lr_sweep: tuple[float, ...] = ()
    server_lr_sweep: tuple[float, ...] = ()
    durability: DurabilityConfig = DurabilityConfig()
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    privacy: PrivacyConfig = NO_PRIVACY
    # ``[privacy] target_epsilon``: the ε the noise multiplier was calibrated for, over
    # ``releases`` planned releases at sampling rate ``dp_sampling_rate`` (None: not asked).
    target_epsilon: float | None = None
    planned_releases: int = 0
    dp_sampling_rate: float | None = None
    # ``[codec.<link>]``: the codec of one link (e.g. ``region-root``) over ``codec``.
    link_codecs: tuple[tuple[str, CodecConfig], ...] = ()
    # ``[arms.network]``: the arm's own network over the shared one (None: the shared one).
    network: NetworkConfig | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    seed: int
    duration_s: float
    eval_interval_s: float
    target_accuracy: float | None
    target_window_s: float
    data: Mapping[str, Any]
    sites: SitesConfig
    network: NetworkConfig
    arms: tuple[Arm, ...]
    baseline: str | None = None
    executor: str = "inline"
    workers: int = 2
    # ``executor = "ray"``: an existing cluster ("auto", "HOST:6379", "ray://HOST:10001");
    # None starts a local one with ``workers`` CPUs (sim.ray_executor).
    ray_address: str | None = None
    # ``parallel_runs = true`` (with ``executor = "ray"``): the arms and seeds side by side,
    # one Ray task each (its jobs inline in it; a few seeds ahead, enough to fill the
    # cluster's CPUs); else one run after another, jobs as tasks.
    parallel_runs: bool = False
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    # ``[dp_sgd]``: every site trains with record-level DP-SGD (workloads.dp_sgd).
    dp_sgd: DpSgdConfig | None = None
    # ``seeds = [...]``: run every arm once per seed (empty: once, with ``seed``).
    seeds: tuple[int, ...] = ()
    # What the file sets that no arm uses (``unused_settings``): ``fedloom sim`` prints them.
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ reading


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; raise ``ConfigError`` naming the bad field."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: scenario file not found")
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, not a scenario file")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a BOM (Windows editors)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the scenario: {exc.strerror}") from None
    try:
        return parse_scenario(raw, default_name=p.stem, source=str(p))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def parse_scenario(
    raw: Mapping[str, Any], default_name: str = "scenario", source: str = ""
) -> Scenario:
    top = Table(raw, "")
    name = top.text("name", default_name)
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        # It names the default output directory, runs/NAME: "/abs" wrote to /abs-plan.
        raise ConfigError(
            f"{top.where('name')}: expected a scenario name without '/' (fedloom sim writes "
            f"to runs/NAME by default), got {name!r}"
        )
    description = top.text("description", "")
    seed = top.integer("seed", 0, min=0)
    seeds = _seeds(top)
    duration_s = _duration(top, "duration")
    eval_interval_s = top.number(
        "eval_interval_s", max(duration_s / 100.0, 1.0), min=0.0, exclusive_min=True
    )
    if top.has("eval_interval_s") and eval_interval_s > duration_s:  # a unit mistake, surely
        raise ConfigError(
            f"{top.where('eval_interval_s')}: {eval_interval_s:g} s is longer than the run "
            f"({duration_s:g} s), so no evaluation would fall inside it (only the one at the "
            f"start and the one at the end); give at most {duration_s:g}"
        )
    if _more_than(duration_s / eval_interval_s, MAX_EVALUATIONS):  # 1e-9 s: never ended
        raise ConfigError(
            f"{top.where('eval_interval_s')}: {eval_interval_s:g} s evaluates the model "
            f"{duration_s / eval_interval_s:,.0f} times in the run ({duration_s:g} s); at most "
            f"{MAX_EVALUATIONS:,} evaluations: give at least {duration_s / MAX_EVALUATIONS:g}"
        )
    target = top.number("target_accuracy", None, min=0.0, max=1.0, exclusive_min=True)
    target_window_s = top.number("target_window_s", 0.0, min=0.0)
    if target_window_s > duration_s:  # never held: every arm's target "never reached"
        raise ConfigError(
            f"{top.where('target_window_s')}: a window of {target_window_s:g} s is longer than "
            f"the run ({duration_s:g} s), so no arm could hold the target for it; give at "
            f"most {duration_s:g}"
        )
    baseline = top.text("baseline", None)
    executor = top.text("executor", "inline", choices=("inline", "process", "ray"))
    ray_address = _ray_address(top, executor)
    parallel_runs = top.flag("parallel_runs", False)
    if parallel_runs and executor != "ray":
        raise ConfigError(f'parallel_runs: only with executor = "ray" (got {executor!r})')
    workers = top.integer("workers", 2, min=1, max=MAX_WORKERS)

    data = _data(top.table("data"))
    sites = _sites(top.table("sites"))
    network = _network(top.table("network"), sites)
    shared = {
        "training": dict(top.raw("training", {}) or {}),
        "codec": dict(top.raw("codec", {}) or {}),
        "availability": dict(top.raw("availability", {}) or {}),
        "compute": dict(top.raw("compute", {}) or {}),
        "algorithm": dict(top.raw("algorithm", {}) or {}),
        "durability": dict(top.raw("durability", {}) or {}),
        "secure_aggregation": dict(top.raw("secure_aggregation", {}) or {}),
        "privacy": dict(top.raw("privacy", {}) or {}),
        "network": dict(top.raw("network", {}) or {}),
    }
    for key, value in shared.items():
        if not isinstance(raw.get(key, {}), Mapping):
            raise top.fail(key, "a table", value)

    arms_raw = top.array("arms")
    if not arms_raw:
        raise ConfigError("arms: a scenario needs at least one [[arms]] entry")
    arms = tuple(_arm(a, i, shared, sites, duration_s) for i, a in enumerate(arms_raw))
    names = [a.name for a in arms]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"arms: arm names must be unique, repeated: {', '.join(sorted(dupes))}")
    if baseline is not None and baseline not in names:
        raise ConfigError(f"baseline: {baseline!r} is not an arm name ({', '.join(names)})")
    notes = unused_settings(shared, arms_raw, arms, duration_s)
    meta = _meta(top)
    dp_sgd = None
    if top.has("dp_sgd"):  # reproducible here: sampling and noise from the job's seed
        dp_sgd = replace(read_dp_sgd(top.table("dp_sgd")), deterministic=True)
        check_model(str(data.get("model", "softmax")), "dp_sgd")
    top.finish()
    return Scenario(
        name=name,
        description=description,
        seed=seed,
        duration_s=duration_s,
        eval_interval_s=eval_interval_s,
        target_accuracy=target,
        target_window_s=target_window_s,
        data=data,
        sites=sites,
        network=network,
        arms=arms,
        baseline=baseline,
        executor=executor,
        workers=workers,
        ray_address=ray_address,
        parallel_runs=parallel_runs,
        source=source,
        meta=meta,
        dp_sgd=dp_sgd,
        seeds=seeds,
        notes=notes,
    )


# ``--seeds N`` or a ``seeds`` list at most this: every arm runs N times, one after the other.
MAX_SEEDS = 10_000

# A run evaluates its model at most this often (duration_s / eval_interval_s): each
# evaluation is a pass over the test set and a point of every seed's curve in report.json.
MAX_EVALUATIONS = 10_000

# A training job's examples (local_steps x batch_size) at most this: the simulated models
# draw a job's minibatches at once, about 1 GB at this many (10^11 steps was a MemoryError
# traceback once the run had started).
MAX_EXAMPLES_PER_JOB = 1_000_000

# ``workers`` at most this: a pool of processes (or a local Ray cluster's CPUs) on one
# machine; 100,000 hung the run starting processes.
MAX_WORKERS = 1024


def _more_than(count: float, most: int) -> bool:
    """``count > most`` but for float error (3600 / 0.036 is 100000.00000000001)."""
    return count > most * (1.0 + 1e-9)


def _meta(t: Table) -> dict[str, Any]:
    """``[meta]``: the study's own labels, carried into report.json's ``meta`` as
    ``scenario_meta``; checked here, not when the report is written after the run."""
    if not t.has("meta"):
        return {}
    raw = dict(t.table("meta")._data)
    try:
        plain = dict(_plain(raw, t.where("meta")))
    except TypeError as exc:  # a TOML date or time
        raise ConfigError(str(exc)) from None
    _check_finite(raw, t.where("meta"))
    return plain


def _check_finite(value: Any, where: str) -> None:
    """No nan or inf in ``value``: report.json is strict JSON (it would hold null)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value} cannot be stored in report.json (strict JSON)")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]")


def _ray_address(t: Table, executor: str) -> str | None:
    """``ray_address``: the Ray cluster to run on; only with ``executor = "ray"``."""
    address = t.text("ray_address", None)
    if address is None:
        return None
    if executor != "ray":
        raise ConfigError(
            f'{t.where("ray_address")}: only with executor = "ray" (got {executor!r})'
        )
    from fedloom.sim.ray_executor import check_ray_address  # imports no ray

    return check_ray_address(address, t.where("ray_address"))


def _seeds(t: Table) -> tuple[int, ...]:
    """``seeds``: a non-empty list of distinct non-negative integers ((): not given)."""
    if not t.has("seeds"):
        return ()
    values = t.array("seeds")
    if not values:
        raise ConfigError(f"{t.where('seeds')}: must list at least one seed (or leave it out)")
    if len(values) > MAX_SEEDS:  # as --seeds
        raise ConfigError(f"{t.where('seeds')}: at most {MAX_SEEDS:,} seeds, got {len(values):,}")
    seen: set[int] = set()
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{t.where('seeds')}[{i}]: expected a seed >= 0, got {v!r}")
        if v in seen:
            raise ConfigError(f"{t.where('seeds')}[{i}]: seed {v} is listed twice")
        seen.add(v)
    return tuple(values)


def unused_settings(
    shared: Mapping[str, Any], arms_raw: list[Any], arms: tuple[Arm, ...], duration_s: float
) -> tuple[str, ...]:
    """Notes (not errors) on settings no arm uses: a shared ``[network.<link>]`` or
    ``[codec.<link>]`` table whose link no arm's topology has, a shared ``[algorithm]``
    parameter that only the algorithms of no arm read (``_USED_ONLY_BY``), and a churn window, a
    partition, deaths or a restart that start after the run ends."""
    notes: dict[str, None] = {}
    have = {link for a in arms for link in TOPOLOGY_LINKS[a.topology]}
    for section in ("network", "codec"):
        for link, value in shared.get(section, {}).items():
            if isinstance(value, Mapping) and link in LINKS and link not in have:
                topologies = ", ".join(sorted({a.topology for a in arms}))
                notes[
                    f"{section}.{link}: no arm has a {link} link (the arms are {topologies}); "
                    "it applies to none"
                ] = None
    for i, (raw, arm) in enumerate(zip(arms_raw, arms, strict=True)):
        where = _own_or_shared(raw, i, "availability", "churn")
        for j, spec in enumerate(arm.availability.churn):
            if spec.start_s >= duration_s:
                notes[
                    f"{where}[{j}]: starts at {spec.start_s / 3600:g} h, when the run "
                    f"({duration_s / 3600:g} h) is over; it takes nothing offline"
                ] = None
        # Partitions, deaths and restarts after the run's end likewise do nothing.
        avail = arm.availability
        for j, part in enumerate(avail.partitions):
            if part.start_s >= duration_s:
                at = _own_or_shared(raw, i, "availability", "partitions")
                notes[
                    f"{at}[{j}]: starts at {part.start_s / 3600:g} h, when the run "
                    f"({duration_s / 3600:g} h) is over; it cuts nothing off"
                ] = None
        if avail.death_fraction > 0 and avail.death_at_s >= duration_s:
            at = _own_or_shared(raw, i, "availability", "death_at_h")
            notes[
                f"{at}: {avail.death_at_s / 3600:g} h, when the run ({duration_s / 3600:g} h) "
                "is over; no site dies"
            ] = None
        for j, restart in enumerate(arm.durability.restarts):
            if restart.at_s >= duration_s:
                at = _own_or_shared(raw, i, "durability", "restarts")
                notes[
                    f"{at}[{j}]: at {restart.at_s:g} s, when the run ({duration_s:g} s) is "
                    f"over; {restart.node} is not restarted"
                ] = None
        # A parameter of something the arm does not do (its switch is off) does nothing.
        written = {**shared.get("availability", {}), **(raw.get("availability") or {})}
        if "death_at_h" in written and avail.death_fraction == 0:
            at = _own_or_shared(raw, i, "availability", "death_at_h")
            notes[f"{at}: no site dies (death_fraction is 0); it applies to none"] = None
        if "offline_s" in written and avail.offline_per_h == 0:
            at = _own_or_shared(raw, i, "availability", "offline_s")
            notes[f"{at}: no site goes offline (offline_per_h is 0); it applies to none"] = None
        own_codec = raw.get("codec") or {}
        if "topk_fraction" in own_codec and not _sends_topk(arm):
            notes[
                f"arms[{i}].codec.topk_fraction: the arm sends no top-k updates (up = "
                f"{arm.codec.up!r}); it applies to none"
            ] = None
    # A shared [algorithm] parameter that only other algorithms read (an arm's own is an
    # error): FedBuff arms and a shared min_cohort, say.
    algorithms = sorted({a.algorithm for a in arms})
    for key in shared.get("algorithm", {}):
        users = _USED_ONLY_BY.get(key)
        if users is not None and not any(a in users for a in algorithms):
            notes[
                f"algorithm.{key}: only {'/'.join(users)} arms read it (the arms are "
                f"{', '.join(algorithms)}); it applies to none"
            ] = None
    arm_topologies = sorted({a.topology for a in arms})
    for key in shared.get("algorithm", {}):
        if key in _REGIONS_ONLY and "hierarchical" not in arm_topologies:
            notes[
                f"algorithm.{key}: only hierarchical arms use it (the arms are "
                f"{', '.join(arm_topologies)}); it applies to none"
            ] = None
    if "topk_fraction" in shared.get("codec", {}) and not any(_sends_topk(a) for a in arms):
        notes[
            'codec.topk_fraction: no arm sends top-k updates (up = "topk"); it applies to none'
        ] = None
    return tuple(notes)


def _sends_topk(arm: Arm) -> bool:
    return arm.codec.up == "topk" or any(c.up == "topk" for _, c in arm.link_codecs)


def _own_or_shared(raw: Mapping[str, Any], index: int, section: str, key: str) -> str:
    """The path of ``section.key`` as arm ``index`` has it: its own table's, else shared."""
    own = isinstance(raw.get(section), Mapping) and key in raw[section]
    return f"arms[{index}].{section}.{key}" if own else f"{section}.{key}"


def _duration(t: Table, stem: str) -> float:
    given = [k for k in (f"{stem}_s", f"{stem}_min", f"{stem}_h") if t.has(k)]
    if len(given) > 1:
        raise ConfigError(f"{t.where(given[1])}: give the {stem} once (found {', '.join(given)})")
    if not given:
        names = (f"{stem}_s", f"{stem}_min", f"{stem}_h")
        near = [k for k in t._data if k.startswith(stem) or difflib.get_close_matches(k, names)]
        found = f"; found {near[0]!r}, not one of these" if near else ""  # a misspelling
        raise ConfigError(
            f"{t.where(stem + '_h')}: required field is missing (or {stem}_s / {stem}_min){found}"
        )
    scale = {"_s": 1.0, "_min": 60.0, "_h": 3600.0}[given[0][len(stem) :]]
    most = MAX_WINDOW_H * 3600.0 / scale  # finite: a run that ends
    return float(t.number(given[0], min=0.0, max=most, exclusive_min=True)) * scale


def _data(t: Table) -> dict[str, Any]:
    # The workload validates its own fields; here we only check the table's shape.
    out = {k: t.raw(k) for k in list(t._data)}
    if "dataset" not in out:
        raise t.missing("dataset")
    return out


def _sites(t: Table) -> SitesConfig:
    names = _site_names(t)
    if names:
        count = t.integer("count", len(names), min=1, max=MAX_SITES)
    else:
        count = t.integer("count", min=1, max=MAX_SITES)
    if names and count != len(names):
        raise ConfigError(f"{t.where('count')}: {count} sites, but names lists {len(names)}")
    placement_given = t.has("placement")
    placement_table = t.table("placement")
    regions = t.array("regions", list(placement_table._data) if placement_given else ["region-1"])
    if not regions or not all(isinstance(r, str) and r for r in regions):
        raise t.fail("regions", "a non-empty list of region names", regions)
    if len(set(regions)) != len(regions):
        raise ConfigError(f"{t.where('regions')}: region names must be unique")
    all_names = names or site_ids(count)
    placement = _placement(placement_table, regions, all_names) if placement_given else {}
    if not placement_given and len(regions) > count:  # round-robin leaves the last ones empty
        raise ConfigError(
            f"{t.where('regions')}: {len(regions)} regions for {count} sites leaves "
            f"{', '.join(regions[count:])} without a site (sites go round-robin over the "
            f"regions); list at most {count} regions"
        )
    cfg = SitesConfig(
        count=count,
        regions=tuple(regions),
        uplink_mbps=t.number("uplink_mbps", 50.0, min=0.0, exclusive_min=True),
        downlink_mbps=t.number("downlink_mbps", 200.0, min=0.0, exclusive_min=True),
        access_latency_ms=t.number("access_latency_ms", 5.0, min=0.0),
        speed_spread=t.number("speed_spread", 0.0, min=0.0, max=MAX_LOGNORMAL_SIGMA),
        inbound_fraction=t.number("inbound_fraction", 0.0, min=0.0, max=1.0),
        names=tuple(names),
        placement=placement,
    )
    t.finish()
    return cfg


# ``[sites] count`` at most this (ten times the largest shipped scenario): a billion sites
# hung the reading, building their ids.
MAX_SITES = 1_000_000


def _site_names(t: Table) -> list[str]:
    """``sites.names``: unique, non-empty ids without surrounding spaces ([] if absent)."""
    names = t.array("names", [])
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name or name != name.strip():
            raise ConfigError(
                f"{t.where('names')}[{i}]: expected a site id (a non-empty string without "
                f"surrounding spaces), got {name!r}"
            )
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"{t.where('names')}[{i}]: {name!r} is listed twice")
        seen.add(name)
    return list(names)


def _placement(t: Table, regions: list[str], names: list[str]) -> dict[str, str]:
    """``[sites.placement]``: region -> its sites; every site placed exactly once. A
    region's value is its list of site ids, or (in every region) a count: that many sites,
    the next ones in site order, region after region in the table's order."""
    counts = {r: v for r, v in t._data.items() if isinstance(v, int) and not isinstance(v, bool)}
    if counts:
        return _placement_counts(t, regions, names, counts)
    known = set(names)
    region_of: dict[str, str] = {}
    for region in list(t._data):
        if region not in regions:
            raise ConfigError(
                f"{t.where(region)}: {region!r} is not in sites.regions ({', '.join(regions)})"
            )
        members = t.array(region)
        if not members:
            raise ConfigError(f"{t.where(region)}: a region needs at least one site")
        for i, site in enumerate(members):
            where = f"{t.where(region)}[{i}]"
            if not isinstance(site, str) or site not in known:
                shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                raise ConfigError(f"{where}: {site!r} is not a site of this scenario ({shown})")
            if site in region_of:
                raise ConfigError(
                    f"{where}: {site!r} is already placed in region {region_of[site]!r}"
                )
            region_of[site] = region
    unplaced = [n for n in names if n not in region_of]
    if unplaced:
        shown = ", ".join(unplaced[:6]) + (", ..." if len(unplaced) > 6 else "")
        raise ConfigError(
            f"{t.where('').rstrip('.')}: every site needs a region; not placed: {shown}"
        )
    empty = [r for r in regions if r not in set(region_of.values())]
    if empty:
        raise ConfigError(
            f"{t.where('').rstrip('.')}: region(s) {', '.join(empty)} of sites.regions have no site"
        )
    return region_of


def _placement_counts(
    t: Table, regions: list[str], names: list[str], counts: Mapping[str, int]
) -> dict[str, str]:
    """``[sites.placement]`` by counts (``north = 40``): consecutive blocks of sites."""
    for region in list(t._data):
        if region not in counts:
            raise ConfigError(
                f"{t.where(region)}: give every region a count or every region a list of "
                f"sites (region {next(iter(counts))!r} has a count)"
            )
        if region not in regions:
            raise ConfigError(
                f"{t.where(region)}: {region!r} is not in sites.regions ({', '.join(regions)})"
            )
        t.integer(region, min=1)
    total = sum(counts.values())
    if total != len(names):
        raise ConfigError(
            f"{t.where('').rstrip('.')}: the counts place {total} sites, but there are "
            f"{len(names)}: every site needs exactly one region"
        )
    empty = [r for r in regions if r not in counts]
    if empty:
        raise ConfigError(
            f"{t.where('').rstrip('.')}: region(s) {', '.join(empty)} of sites.regions have no site"
        )
    blocks = [region for region in t._data for _ in range(counts[region])]  # table order
    return dict(zip(names, blocks, strict=True))


def _network(t: Table, sites: SitesConfig) -> NetworkConfig:
    pairs: list[tuple[str, str, float]] = []
    rtt_table = t.table("region_rtt_ms")
    for key in list(rtt_table._data):
        parts = key.split("--")
        if len(parts) != 2 or not all(p in sites.regions for p in parts):
            raise ConfigError(
                f"{rtt_table.where(key)}: keys are 'regionA--regionB' with regions from "
                f"sites.regions ({', '.join(sites.regions)})"
            )
        rtt = rtt_table.number(key, min=0.0)
        for a, b, other in pairs:  # one RTT a pair: "a--b" and "b--a" are the same link
            if {a, b} == set(parts) and other != rtt:
                raise ConfigError(
                    f"{rtt_table.where(key)}: {rtt:g} ms, but {a}--{b} gives this pair "
                    f"{other:g} ms (an RTT is the same both ways: give the pair once)"
                )
        pairs.append((parts[0], parts[1], rtt))
    root_region = t.text("root_region", None)
    if root_region is not None and root_region not in sites.regions:
        raise ConfigError(f"{t.where('root_region')}: {root_region!r} is not in sites.regions")
    link_loss: list[tuple[str, float]] = []
    for link in _link_tables(t, "network", tables=("region_rtt_ms",)):
        lt = t.table(link)
        p = lt.number("loss", None, min=0.0, max=MAX_MESSAGE_LOSS)
        lt.finish()
        if p is None:
            raise ConfigError(f"{lt.where('loss')}: required field is missing")
        link_loss.append((link, p))
    cfg = NetworkConfig(
        intra_region_rtt_ms=t.number("intra_region_rtt_ms", 10.0, min=0.0),
        inter_region_rtt_ms=t.number("inter_region_rtt_ms", 60.0, min=0.0),
        loss=t.number("loss", 0.0, min=0.0, max=MAX_MESSAGE_LOSS),
        region_rtt_ms=tuple(pairs),
        root_region=root_region,
        packet_loss=t.number("packet_loss", 0.0, min=0.0, max=0.5),
        link_loss=tuple(link_loss),
        loss_effect=t.text("loss_effect", "drop", choices=("drop", "reset")),
        reconnect_s=t.number("reconnect_s", 1.0, min=0.0, max=3600.0, exclusive_min=True),
    )
    t.finish()
    return cfg


MAX_MESSAGE_LOSS = 0.9  # a message lost more often than not still leaves a run to study


def _link_tables(t: Table, section: str, tables: tuple[str, ...] = ()) -> list[str]:
    """The keys of ``t`` that are tables, but for its own ``tables``: each must name a
    link (``LINKS``)."""
    links = []
    for key, value in t._data.items():
        if key in LINKS and not isinstance(value, Mapping):  # was "unknown field"
            raise t.fail(key, f"a table ([{section}.{key}])", value)
        if not isinstance(value, Mapping) or key in tables:
            continue
        if key not in LINKS:
            hint = difflib.get_close_matches(key, list(LINKS), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"{t.where(key)}: not a link{extra}; [{section}.<link>] tables name one of "
                f"{', '.join(LINKS)}"
            )
        links.append(key)
    return links


class _Merged(Table):
    """A shared table with an arm's own fields over it (``{**shared, **own}``). A field's
    path is where it was written: ``arms[i].training.lr`` for the arm's own field,
    ``training.lr`` for the shared table's (a mistake in a shared table is not the first
    arm's)."""

    def __init__(
        self, shared: Mapping[str, Any], own: Mapping[str, Any], own_path: str, shared_path: str
    ) -> None:
        super().__init__({**shared, **own}, own_path)
        self._own = own
        self._shared_path = shared_path

    def where(self, key: str) -> str:
        if key in self._own or (not key and self._own):
            return super().where(key)
        return f"{self._shared_path}.{key}"

    def over(self, data: Mapping[str, Any]) -> Table:
        """The same paths over other fields (a subset of these, e.g. ``[codec]`` without
        its link tables)."""
        own = {k: v for k, v in self._own.items() if k in data}
        return _Merged(
            {k: v for k, v in data.items() if k not in own}, own, self._path, self._shared_path
        )


def _section(shared: Mapping[str, Any], arm: Table, raw: Mapping[str, Any], key: str) -> _Merged:
    """The arm's ``key`` section: its own table over the shared one (``_Merged``)."""
    return _Merged(shared.get(key, {}), raw.get(key) or {}, arm.where(key), key)


# Fields of the sections an arm may override, by section: written in the arm itself, each is
# an error saying where it goes (``lr = 0.1`` in an arm means ``training = { lr = 0.1 }``).
_SECTION_OF: dict[str, str] = {
    **dict.fromkeys(("lr", "local_steps", "batch_size", "mu"), "training"),
    **dict.fromkeys(("up", "down", "topk_fraction"), "codec"),
    **dict.fromkeys(("distribution", "mean_s", "sd_s", "min_s", "median_s", "sigma"), "compute"),
    **dict.fromkeys(
        (
            "dropout",
            "death_fraction",
            "death_at_h",
            "partitions",
            "offline_per_h",
            "offline_s",
            "churn",
        ),
        "availability",
    ),
    **dict.fromkeys(
        (
            "loss",
            "loss_effect",
            "packet_loss",
            "reconnect_s",
            "intra_region_rtt_ms",
            "inter_region_rtt_ms",
            "region_rtt_ms",
            "root_region",
        ),
        "network",
    ),
    **dict.fromkeys(("log", "signing", "state_dir", "restarts"), "durability"),
}


# Aggregation parameters only some algorithms read (``federation.factory``): written in
# the arm of another, each is an error (a shared [algorithm] table serves every arm).
_USED_ONLY_BY: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("clients_per_round", "over_selection", "min_cohort"), ("fedavg", "fedprox")),
    "alpha": ("fedasync",),
    **dict.fromkeys(
        (
            "gossip_mode",
            "graph",
            "degree",
            "gossip_interval_s",
            "gossip_clip",
            "gossip_max_share_weight",
        ),
        ("gossip",),
    ),
}

# A period an arm's algorithm keeps (its time-outs, a gossip peer's interval) comes round
# at most this often in a run, as the evaluations do (MAX_EVALUATIONS).
MAX_PERIODS = 100_000
_PERIODS: dict[str, tuple[str, ...]] = {
    "task_timeout_s": ("fedavg", "fedprox", "fedasync", "fedbuff"),
    "round_timeout_s": ("fedavg", "fedprox"),
    "gossip_interval_s": ("gossip",),
}

# Parameters of the regions and of a root above them: a star or gossip arm has neither.
_REGIONS_ONLY = frozenset({"regional_buffer_size", "regional_concurrency", "root_buffer_size"})


def _arm(
    raw: Any, index: int, shared: Mapping[str, Any], sites: SitesConfig, duration_s: float
) -> Arm:
    t = Table(raw, f"arms[{index}]")
    name = t.text("name", f"arm-{index}")
    if not name.strip():  # an empty column in the report, and no --arm could select it
        raise ConfigError(f"{t.where('name')}: expected an arm name, got {name!r}")
    algorithm = t.text("algorithm", choices=ALGORITHMS)
    default_topology = "gossip" if algorithm == "gossip" else "star"
    topology = t.text("topology", default_topology, choices=TOPOLOGIES)
    if algorithm == "gossip" and topology != "gossip":
        raise ConfigError(
            f"{t.where('topology')}: algorithm 'gossip' goes with topology 'gossip' only"
        )
    if topology == "gossip" and algorithm != "gossip":  # the other way round: say so
        raise ConfigError(
            f"{t.where('topology')}: a gossip topology runs algorithm 'gossip' only, not "
            f"{algorithm!r}"
        )
    if topology == "hierarchical" and algorithm in ("fedavg", "fedprox"):
        raise ConfigError(
            f"{t.where('topology')}: hierarchical arms use asynchronous regional buffers; "
            "use algorithm 'fedbuff' or 'fedasync' for the root"
        )
    tables = ("training", "codec", "availability", "compute", "durability", "network")
    for key in (*tables, "secure_aggregation", "privacy"):
        if key in raw and not isinstance(raw[key], Mapping):
            raise t.fail(key, "a table", raw[key])
        t.raw(key)
    # Aggregation parameters sit directly in the arm, over the shared [algorithm] table.
    for key in ALGORITHM_FIELDS:  # known fields of an arm: a typo's did-you-mean names them
        t.raw(key)
    own_params = {k: raw[k] for k in raw if k in ALGORITHM_FIELDS}
    for key in own_params:  # written in this arm, but for another algorithm: it did nothing
        users = _USED_ONLY_BY.get(key)
        if users is not None and algorithm not in users:
            raise ConfigError(
                f"{t.where(key)}: a {algorithm} arm does not use {key} (only "
                f"{'/'.join(users)} arms do); remove it (the shared [algorithm] table may hold "
                "it for the arms that do)"
            )
        if key in _REGIONS_ONLY and topology != "hierarchical":
            raise ConfigError(
                f"{t.where(key)}: a {topology} arm has no regions (only hierarchical arms use "
                f"{key}); remove it (the shared [algorithm] table may hold it for the arms "
                "that do)"
            )
    training_table = _section(shared, t, raw, "training")
    training = read_training(training_table)
    examples = training.local_steps * training.batch_size
    if examples > MAX_EXAMPLES_PER_JOB:  # a job's minibatches are drawn at once
        key = "local_steps" if training.local_steps >= training.batch_size else "batch_size"
        raise ConfigError(
            f"{training_table.where(key)}: {training.local_steps} steps of batch_size "
            f"{training.batch_size} are {examples:,} examples a job; at most "
            f"{MAX_EXAMPLES_PER_JOB:,}"
        )
    codec, link_codecs = _codecs(
        _section(shared, t, raw, "codec"), raw.get("codec") or {}, topology
    )
    availability = _availability(
        _section(shared, t, raw, "availability"),
        sites,
        duration_s,
    )
    own_compute = raw.get("compute") or {}
    compute = _compute(
        shared["compute"], own_compute, t.where("compute") if own_compute else "compute"
    )
    network = None  # an arm may compare its own loss, RTTs, ... over the shared [network]
    if raw.get("network"):
        for link, value in raw["network"].items():  # an arm's own link table: one it has
            if (
                isinstance(value, Mapping)
                and link in LINKS
                and link not in TOPOLOGY_LINKS[topology]
            ):
                raise ConfigError(
                    f"{t.where('network')}.{link}: a {topology} arm has no {link} link (its "
                    f"links: {', '.join(TOPOLOGY_LINKS[topology])})"
                )
        network = _network(_section(shared, t, raw, "network"), sites)
    durability = _durability(_section(shared, t, raw, "durability"))
    secagg = read_secure_aggregation(_section(shared, t, raw, "secure_aggregation"))
    if secagg.enabled:
        check_codec(codec, t.where("codec"))
        for link, link_codec in link_codecs:
            check_codec(link_codec, t.where(f"codec.{link}"))
        if algorithm not in ("fedbuff", "fedavg", "fedprox"):
            raise ConfigError(
                f"{t.where('secure_aggregation')}: secure aggregation runs on fedbuff arms "
                f"(root and regions) and fedavg/fedprox roots, not {algorithm!r}"
            )
    if link_codecs and durability.signing:
        raise ConfigError(
            f"{t.where('codec')}: per-link codecs ([codec.{link_codecs[0][0]}]) and "
            "durability.signing cannot run together yet (a model signed for one link's codec "
            "is checked against another's): remove one of them"
        )
    privacy, calibration = _privacy(
        _section(shared, t, raw, "privacy"),
        algorithm,
        {**shared["algorithm"], **own_params},
        sites,
    )
    if algorithm == "fedprox" and training.mu == 0.0:
        raise ConfigError(f"{t.where('training')}.mu: fedprox needs a proximal term mu > 0")
    merged = _Merged(shared["algorithm"], own_params, t.where("").rstrip("."), "algorithm")
    params = read_algorithm(merged, algorithm)
    for key, users in _PERIODS.items():  # 1e-9 s: an event every nanosecond, a run unending
        period = getattr(params, key)
        written = key in own_params or key in shared["algorithm"]
        if written and algorithm in users and _more_than(duration_s / period, MAX_PERIODS):
            raise ConfigError(
                f"{merged.where(key)}: {period:g} s comes round {duration_s / period:,.0f} "
                f"times in the run ({duration_s:g} s); at most {MAX_PERIODS:,}: give at "
                f"least {duration_s / MAX_PERIODS:g}"
            )
    if sites.placement and topology == "hierarchical" and params.clustering == "rtt":
        at = t.where("clustering") if "clustering" in own_params else "algorithm.clustering"
        raise ConfigError(
            f"{at}: [sites.placement] places every site in its region; "
            "clustering by RTT would ignore it (remove one of them)"
        )
    if algorithm in ("fedavg", "fedprox"):
        _check_round_size(t, params, own_params, sites.count, shared["algorithm"])
    if topology == "gossip":
        _check_degree(t, params, own_params, sites.count, written="degree" in shared["algorithm"])
    lr_sweep = tuple(float(x) for x in _sweep(t, "lr_sweep"))
    server_lr_sweep = tuple(float(x) for x in _sweep(t, "server_lr_sweep"))
    # The arm's own rate beside its sweep would not run (a shared one is what it replaces).
    own_lr = isinstance(raw.get("training"), Mapping) and "lr" in raw["training"]
    for sweep, written, key, value in (
        ("lr_sweep", own_lr, "training.lr", training.lr),
        ("server_lr_sweep", "server_lr" in own_params, "server_lr", params.server_lr),
    ):
        if written and t.has(sweep):
            raise ConfigError(
                f"{t.where(key)}: the arm's {sweep} sets its learning rates ({value:g} would "
                "not run); give one of them"
            )
    for key in raw:  # a section's field written in the arm itself ("unknown field" misled)
        if key in _SECTION_OF and key not in ALGORITHM_FIELDS:
            section = _SECTION_OF[key]
            raise ConfigError(
                f"{t.where(key)}: {key} is a [{section}] field, not an arm's: give the arm "
                f"its own {section} = {{ {key} = ... }} (or an [arms.{section}] table)"
            )
    t.finish()
    return Arm(
        name=name,
        algorithm=algorithm,
        topology=topology,
        params=params,
        training=training,
        codec=codec,
        availability=availability,
        compute=compute,
        lr_sweep=lr_sweep,
        server_lr_sweep=server_lr_sweep,
        durability=durability,
        secure_aggregation=secagg,
        privacy=privacy,
        link_codecs=link_codecs,
        network=network,
        **calibration,
    )


def _codecs(
    t: _Merged, own: Mapping[str, Any], topology: str
) -> tuple[CodecConfig, tuple[tuple[str, CodecConfig], ...]]:
    """``[codec]`` (every link) and its ``[codec.<link>]`` tables: one link's ``up``,
    ``down`` and ``topk_fraction`` over the section's own. An arm's own link table must
    name a link of its topology (a shared one applies to the arms that have the link)."""
    links = _link_tables(t, "codec")
    base = {k: v for k, v in t._data.items() if k not in links}
    codec = read_codec(t.over(base))
    out: list[tuple[str, CodecConfig]] = []
    for link in links:
        if link in own and link not in TOPOLOGY_LINKS[topology]:
            raise ConfigError(
                f"{t.where(link)}: a {topology} arm has no {link} link (its links: "
                f"{', '.join(TOPOLOGY_LINKS[topology])})"
            )
        t.table(link)  # read: the link's own fields are checked just below
        merged = {**base, **t._data[link]}
        if link in TOPOLOGY_LINKS[topology]:
            out.append((link, read_codec(Table(merged, t.where(link)))))
        else:
            read_codec(Table(merged, t.where(link)))  # a mistake is one in any arm
    return codec, tuple(out)


def _compute(shared: Mapping[str, Any], own: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The arm's ``[compute]``: its own fields over the shared table's, unless it names
    another ``distribution``: then its table replaces the shared one (a gaussian's
    ``sd_s`` means nothing to a constant arm). Checked here, so a mistake names its
    field (``arms[i].compute.sd_s``)."""

    def kind(table: Mapping[str, Any]) -> Any:
        k = table.get("distribution", "constant")
        return k.lower().replace("_", "").replace("-", "") if isinstance(k, str) else k

    switched = "distribution" in own and kind(own) != kind(shared)
    merged = dict(own) if switched else {**shared, **own}
    try:
        distribution_from_config(merged)
    except ValueError as exc:
        text = str(exc)
        for prefix in ("compute: ", "compute."):
            if text.startswith(prefix):
                text = text[len(prefix) :]
        raise ConfigError(f"{where}: {text}") from None
    return merged


def _check_round_size(
    t: Table,
    params: AlgorithmConfig,
    own: Mapping[str, Any],
    sites: int,
    shared: Mapping[str, Any],
) -> None:
    """A star FedAvg root's children are every site: a written clients_per_round above
    them, a min_cohort above the round's size, or a written over_selection that draws more
    than there are (ceil(over_selection * K) > sites: the root drew every site instead) is
    an error naming the field (in the arm, or the shared [algorithm] table) and the limit,
    never a silent clamp. The default over_selection (not written) draws at most every site."""
    try:
        k = params.round_size(sites)
    except ConfigError as exc:
        key, rest = str(exc).split(":", 1)
        at = t.where(key) if key in own else f"algorithm.{key}"
        raise ConfigError(f"{at}:{rest}") from None
    over = params.over_selection
    drawn = math.ceil(over * k - 1e-9)  # as algorithms.sync draws a round
    if drawn <= sites or ("over_selection" not in own and "over_selection" not in shared):
        return
    at = t.where("over_selection") if "over_selection" in own else "algorithm.over_selection"
    written = "clients_per_round" in own or "clients_per_round" in shared
    fix = (
        "write 1 (a round of every site draws them all)"
        if k == sites
        else f"write at most {math.floor(sites / k * 1000) / 1000:g}"  # rounded down: allowed
    )
    raise ConfigError(
        f"{at}: a round draws ceil({over:g} * {k}) = {drawn} sites ({k}: clients_per_round"
        f"{'' if written else ', its default'}), more than the {sites} sites of this "
        f"scenario; {fix} or lower clients_per_round"
    )


def _check_degree(
    t: Table, params: AlgorithmConfig, own: Mapping[str, Any], sites: int, *, written: bool
) -> None:
    """A random gossip graph's degree fits the sites (``topology.gossip``): a kregular
    graph needs 1 <= degree < sites and sites * degree even, a smallworld one 2 <= degree <
    sites. Checked here, so the error names the field (ring and exponential take none)."""
    k, graph = params.degree, params.graph
    if graph == "kregular" and not (k < sites and (sites * k) % 2 == 0):
        need = f"less than the {sites} sites, and sites * degree even"
    elif graph == "smallworld" and not 2 <= k < sites:
        need = f"at least 2 and less than the {sites} sites"
    else:
        return
    at = "algorithm.degree" if written and "degree" not in own else t.where("degree")
    default = "" if written or "degree" in own else " (the default: write one)"
    raise ConfigError(f"{at}: a {graph} graph's degree must be {need}, got {k}{default}")


def _privacy(
    t: Table, algorithm: str, params: Mapping[str, Any], sites: SitesConfig
) -> tuple[PrivacyConfig, dict[str, Any]]:
    """``[privacy]`` (``federation.privacy.read_privacy``) plus two fields of the
    simulator's: ``target_epsilon`` and ``releases`` instead of ``noise_multiplier`` ask
    for the z whose ``releases`` releases spend ``target_epsilon`` at ``delta``
    (``sim.dp_calibration``), at the sampling rate the root claims (a FedAvg/FedProx
    round: ceil(over_selection * clients_per_round) of the sites; FedBuff: none). The
    budget defaults to the target, so a run that releases more stops at it."""
    raw = dict(t._data)
    if "target_epsilon" not in raw and "releases" not in raw:
        return read_privacy(t), {}
    target = t.number("target_epsilon", min=0.0, exclusive_min=True)
    releases = t.integer("releases", min=1, max=10**7)
    if "noise_multiplier" in raw:
        raise ConfigError(
            f"{t.where('noise_multiplier')}: give either noise_multiplier or target_epsilon "
            "(with releases), not both"
        )
    q: float | None = None
    if algorithm in ("fedavg", "fedprox"):
        # The K and over-selection the root itself will use (AlgorithmConfig's defaults
        # where the scenario writes none), so the root's accountant sees the same q.
        written = params.get("clients_per_round")
        k = min(DEFAULT_CLIENTS_PER_ROUND, sites.count) if written is None else int(written)
        over = float(params.get("over_selection", AlgorithmConfig().over_selection))
        drawn = math.ceil(over * k - 1e-9)
        q = drawn / sites.count if drawn < sites.count else None
    # Read here with their own paths (read_privacy reads them again below): the calibration
    # needs them first, and float("x") was a traceback, a bad accountant "target_epsilon: ...".
    delta = t.number("delta", 1e-5, min=0.0, max=DELTA_MAX, exclusive_min=True)
    accountant = t.text("accountant", "rdp", choices=ACCOUNTANTS)
    from fedloom.sim.dp_calibration import calibrate_noise

    try:
        z = calibrate_noise(target, delta, releases, q, accountant=accountant)
    except ValueError as exc:
        raise ConfigError(f"{t.where('target_epsilon')}: {exc}") from None
    rest = {k: v for k, v in raw.items() if k not in ("target_epsilon", "releases")}
    rest["noise_multiplier"] = z
    rest.setdefault("epsilon_budget", target)
    cfg = read_privacy(Table(rest, t.where("").rstrip(".")))
    return cfg, {"target_epsilon": target, "planned_releases": releases, "dp_sampling_rate": q}


def _durability(t: Table) -> DurabilityConfig:
    log = t.flag("log", False)
    restarts: list[Restart] = []
    for i, r in enumerate(t.array("restarts", [])):
        rt = Table(r, f"{t.where('restarts')}[{i}]")
        restarts.append(
            Restart(
                node=rt.text("node"),
                at_s=float(rt.number("at_s", min=0.0)),
                down_s=float(rt.number("down_s", 10.0, min=0.0, exclusive_min=True)),
            )
        )
        rt.finish()
    if restarts and not log:
        raise ConfigError(f"{t.where('restarts')}: a restart recovers from the log: set log = true")
    state_dir = t.text("state_dir", None)
    if state_dir is not None and not log:
        raise ConfigError(f"{t.where('state_dir')}: is where the log goes: set log = true")
    if state_dir is not None and Path(state_dir).exists() and not Path(state_dir).is_dir():
        raise ConfigError(f"{t.where('state_dir')}: {state_dir} is a file, not a directory")
    cfg = DurabilityConfig(
        log=log, signing=t.flag("signing", False), state_dir=state_dir, restarts=tuple(restarts)
    )
    t.finish()
    return cfg


def _sweep(t: Table, key: str) -> list[float]:
    """``lr_sweep``/``server_lr_sweep``: distinct numbers > 0 and <= ``MAX_LR`` ([]: not
    given)."""
    values = t.array(key, [])
    if t.has(key) and not values:
        raise ConfigError(f"{t.where(key)}: must list at least one value (or leave it out)")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < math.inf:
            raise ConfigError(f"{t.where(key)}[{i}]: expected a finite number > 0, got {v!r}")
        if v > MAX_LR:  # each point runs the arm with it, as training.lr / server_lr
            raise ConfigError(
                f"{t.where(key)}[{i}]: expected a learning rate > 0 and <= {MAX_LR:g}, got {v:g}"
            )
        if v in values[:i]:
            raise ConfigError(f"{t.where(key)}[{i}]: {v!r} is listed twice")
    return list(values)


# Times of windows (start_h, end_h, duration_h, every_h) are at most this many hours
# (about 114 years): finite, and far beyond any run; inf or 1e306 is an error naming them.
MAX_WINDOW_H = 1e6
# One [[availability.churn]] entry makes one offline window per site per period: at most
# this many in a run (each is a partition held in memory for the run).
MAX_CHURN_WINDOWS = 1_000_000


def _hours(t: Table, key: str, *, positive: bool = False) -> float:
    """``key`` in hours, as seconds: >= 0 (> 0 if ``positive``) and finite."""
    return float(t.number(key, min=0.0, max=MAX_WINDOW_H, exclusive_min=positive)) * 3600.0


def _availability(t: Table, sites: SitesConfig, duration_s: float) -> AvailabilityConfig:
    partitions: list[Partition] = []
    for i, p in enumerate(t.array("partitions", [])):
        pt = Table(p, f"{t.where('partitions')}[{i}]")
        region = pt.text("region", choices=sites.regions)
        start_s = _hours(pt, "start_h")
        end_s = _hours(pt, "end_h")
        if end_s <= start_s:
            raise ConfigError(f"{pt.where('end_h')}: must be after start_h")
        pt.finish()
        partitions.append(Partition(region, start_s, end_s))
    churn = tuple(
        _churn(Table(c, f"{t.where('churn')}[{i}]"), sites, duration_s)
        for i, c in enumerate(t.array("churn", []))
    )
    cfg = AvailabilityConfig(
        churn=churn,
        dropout=t.number("dropout", 0.0, min=0.0, max=0.99),
        death_fraction=t.number("death_fraction", 0.0, min=0.0, max=0.99),
        death_at_s=t.number("death_at_h", 0.0, min=0.0, max=MAX_WINDOW_H) * 3600.0,
        partitions=tuple(partitions),
        offline_per_h=t.number("offline_per_h", 0.0, min=0.0, max=60.0),
        offline_s=t.number("offline_s", 300.0, min=0.0, exclusive_min=True),
    )
    t.finish()
    return cfg


def _churn(t: Table, sites: SitesConfig, duration_s: float) -> ChurnSpec:
    """One ``[[availability.churn]]`` window: ``start_h``, then ``end_h`` or
    ``duration_h``; ``every_h`` repeats it (longer than the window); at most one of
    ``sites``, ``region`` or ``fraction`` (none: every site). Times are finite (at most
    ``MAX_WINDOW_H``), a fraction picks at least one site, and the run holds at most
    ``MAX_CHURN_WINDOWS`` of the entry's site windows."""
    start_s = _hours(t, "start_h")
    if t.has("end_h") == t.has("duration_h"):
        raise ConfigError(f"{t.where('end_h')}: give end_h or duration_h (one of them)")
    if t.has("end_h"):
        end_s = _hours(t, "end_h")
        if end_s <= start_s:
            raise ConfigError(f"{t.where('end_h')}: must be after start_h")
    else:
        end_s = start_s + _hours(t, "duration_h", positive=True)
        if end_s <= start_s:  # a duration too short to move start_h (rounding)
            raise ConfigError(f"{t.where('duration_h')}: too short to end after start_h")
    every_s = _hours(t, "every_h", positive=True) if t.has("every_h") else None
    if every_s is not None and every_s <= end_s - start_s:
        raise ConfigError(
            f"{t.where('every_h')}: a window repeated every {every_s / 3600:g} h must be "
            f"shorter than that (it lasts {(end_s - start_s) / 3600:g} h)"
        )
    chosen = [k for k in ("sites", "region", "fraction") if t.has(k)]
    if len(chosen) > 1:
        raise ConfigError(
            f"{t.where(chosen[1])}: give one of sites, region or fraction (or none: every site)"
        )
    ids = t.array("sites", [])
    known = set(sites.site_names())
    seen: set[str] = set()
    for i, site in enumerate(ids):
        if not isinstance(site, str) or site not in known:
            raise ConfigError(f"{t.where('sites')}[{i}]: {site!r} is not a site of this scenario")
        if site in seen:
            raise ConfigError(f"{t.where('sites')}[{i}]: {site!r} is listed twice")
        seen.add(site)
    if t.has("sites") and not ids:
        raise ConfigError(f"{t.where('sites')}: must list at least one site (or leave it out)")
    region = t.text("region", None, choices=sites.regions)
    fraction = t.number("fraction", None, min=0.0, max=1.0, exclusive_min=True)
    if fraction is not None and round(fraction * sites.count) == 0:
        raise ConfigError(
            f"{t.where('fraction')}: {fraction:g} of {sites.count} sites is no site "
            f"(round({fraction * sites.count:g}) = 0); give at least {1 / sites.count:.3g}"
        )
    if ids:
        n_sites = len(ids)
    elif region is not None:
        placed = sites.placement
        n_sites = sum(
            1
            for i, name in enumerate(sites.site_names())
            if (placed[name] if placed else sites.regions[i % len(sites.regions)]) == region
        )
    elif fraction is not None:
        n_sites = round(fraction * sites.count)
    else:
        n_sites = sites.count
    periods = 1
    if every_s is not None and start_s < duration_s:
        periods = math.ceil((duration_s - start_s) / every_s)
    if periods > 1 and periods * n_sites > MAX_CHURN_WINDOWS:
        raise ConfigError(
            f"{t.where('every_h')}: {periods:,} windows of {n_sites:,} sites in the run is "
            f"{periods * n_sites:,} site windows, over the {MAX_CHURN_WINDOWS:,} allowed; "
            "repeat it less often (a larger every_h)"
        )
    spec = ChurnSpec(
        start_s=start_s,
        end_s=end_s,
        every_s=every_s,
        sites=tuple(ids),
        region=region,
        fraction=fraction,
    )
    t.finish()
    return spec


__all__ = [
    "LINKS",
    "TOPOLOGY_LINKS",
    "Arm",
    "ChurnSpec",
    "ConfigError",
    "DurabilityConfig",
    "NetworkConfig",
    "Restart",
    "Scenario",
    "SitesConfig",
    "load_scenario",
    "parse_scenario",
    "site_ids",
]
