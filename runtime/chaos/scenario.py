"""Chaos scenarios: a federation's shape, a run length, expectations and a timeline of faults.

A scenario is one TOML file (see ``scenarios/chaos/``)::

    name = "region-partition"          # default: the file's stem
    duration_s = 60                    # how long the federation runs, faults included
    seed = 1

    [federation]
    shape = "hierarchy"                # star: root + sites; hierarchy: root -> regions -> sites
    regions = 2                        # hierarchy only
    sites = 4                          # in all, spread evenly over the regions
    standby = false                    # hierarchy: a standby region per region (region-0-
    failover_after_s = 10              #   standby...), its sites' fallback after this long
    # shape = "gossip": peers = 4, relayed = 0 (peers that do not listen: they meet through
    # a relay), gossip_mode = "dpsgd" | "pushsum", gossip_interval_s = 1.0, [peer_aggregation]
    load_sites = 0                     # more sites (load-0, ...) run by one load-generator
                                       # process (runtime.chaos.loadgen), spread likewise
    [federation.plan]                  # overrides of runtime.federation_files.DEMO_PLAN
    [federation.training]              # overrides of DEMO_TRAINING
    [federation.root_aggregation]      # overrides of the demo's root [aggregation]
    [federation.region_aggregation]
    [federation.connection]

    [run]
    eval_interval_s = 1.0              # the root evaluates its model this often
    sample_interval_s = 1.0            # /metrics and /healthz scraped this often
    restart_exited_after_s = 0         # > 0: restart a daemon that exited by itself, as
                                       # systemd would (not after status 2 or 65)
    tmpfs_mb = 32                      # size of the tmpfs a disk fault's node runs on
    stop_grace_s = 10                  # SIGTERM, then SIGKILL after this long

    [expect]                           # what the checker holds the run to
    resume_within_s = 30
    start_grace_s = 15                 # a started daemon answers /healthz within this
    refuses_start = "site-3"
    min_version = 20                   # the checker's progress: the root's model reaches
    min_accuracy = 0.8                 #   this version, its last evaluation this accuracy

    [[fault]]
    at_s = 20                          # seconds after the daemons started
    for_s = 15                         # optional: healed (resumed, restarted...) after this
    kind = "partition"
    targets = ["region-0/*"]           # links, groups or nodes (see below)
    direction = "up"                   # network faults: both | up (child->parent) | down

Targets: a link ``"site-0->region-0"`` (a child's connection to its parent), a node
``"region-0"`` (network faults: every link that touches it), a group ``"region-0/*"`` (the
node's children: for network faults their links to it) or ``"all"``. Load sites are not
processes: kill, pause, resume and restart name the load generator, ``"loadgen"`` (a group
or ``"all"`` that holds load sites means it); network faults on ``"loadgen"`` are on every
load site's link. Disk, corrupt, duplicate and bad-input faults do not take load sites.

Every mistake is one ``ConfigError`` naming the field (``fault[2].targets[0]: ...``); this
module only reads and checks, the runner (``runtime.chaos.runner``) plays the timeline.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedloom.federation.config_reader import ConfigError, Table

__all__ = [
    "DISK_KINDS",
    "FAULT_KINDS",
    "INPUT_KINDS",
    "NETWORK_KINDS",
    "PROCESS_KINDS",
    "Fault",
    "Scenario",
    "Shape",
    "load_scenario",
    "parse_scenario",
]

NETWORK_KINDS = ("latency", "bandwidth", "loss", "reorder", "reset", "blackhole", "partition")
PROCESS_KINDS = ("kill", "pause", "resume", "restart", "kill_all", "duplicate")
DISK_KINDS = ("disk_full", "read_only", "corrupt")
INPUT_KINDS = ("garbage", "idle", "upgrade")
FAULT_KINDS = (*NETWORK_KINDS, "heal", *PROCESS_KINDS, *DISK_KINDS, *INPUT_KINDS)
DIRECTIONS = ("both", "up", "down")
CORRUPT_WHERE = ("wal_middle", "wal_end", "wal_torn", "checkpoint")
SHAPES = ("star", "hierarchy", "gossip")
ROOT_ID = "root"
RELAY_ID = "relay"
LOADGEN_ID = "loadgen"  # the one process that runs every load site
LOADGEN_KINDS = ("kill", "pause", "resume", "restart", "kill_all")  # faults it takes

# Parameters each kind takes (name -> (default or None when required, lower bound, upper
# bound)); every fault also takes name, at_s, for_s, kind and targets.
_Param = tuple[float | None, float, float | None]
_PARAMS: dict[str, dict[str, _Param]] = {
    "latency": {"latency_ms": (None, 0.0, 600_000.0), "jitter_ms": (0.0, 0.0, 600_000.0)},
    "bandwidth": {"rate_kbps": (None, 0.001, None)},
    "loss": {"loss": (None, 0.0, 0.99)},
    "reorder": {"reorder": (None, 0.0, 0.99), "latency_ms": (20.0, 0.0, 600_000.0)},
    "reset": {"reset_after_bytes": (4096.0, 0.0, None)},
    "garbage": {"connections": (50.0, 1.0, 10_000.0), "bytes": (4096.0, 1.0, 1 << 24)},
    "idle": {"connections": (50.0, 1.0, 10_000.0)},
    "upgrade": {"connections": (50.0, 1.0, 10_000.0)},
}
_INTEGER_PARAMS = frozenset(("reset_after_bytes", "connections", "bytes"))
_EXPECT_BOOLS = ("exactly_once", "versions_monotonic", "no_unintended_exits", "healthz", "resumes")


@dataclass(frozen=True, slots=True)
class Shape:
    """The federation a scenario runs. Star and hierarchy: ``regions`` maps each region to
    its sites (a star has one pseudo-entry keyed by the root: its sites are the root's
    children). Gossip: ``peers`` on a ring, ``relayed`` the ones that do not listen, and
    ``edges`` every connection as (the node that dials, the node it dials)."""

    kind: str
    regions: dict[str, list[str]]
    plan: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    root_aggregation: Mapping[str, Any] = field(default_factory=dict)
    region_aggregation: Mapping[str, Any] = field(default_factory=dict)
    connection: Mapping[str, Any] = field(default_factory=dict)
    peers: tuple[str, ...] = ()
    relayed: tuple[str, ...] = ()
    edges: tuple[tuple[str, str], ...] = ()
    peer_aggregation: Mapping[str, Any] = field(default_factory=dict)
    standbys: Mapping[str, str] = field(default_factory=dict)  # standby region -> its region
    failover_after_s: float | None = None  # sites: parent down this long -> its standby
    load_sites: tuple[str, ...] = ()  # members of ``regions`` run by the load generator

    @property
    def gossip(self) -> bool:
        return self.kind == "gossip"

    @property
    def sites(self) -> list[str]:
        return [s for members in self.regions.values() for s in members]

    @property
    def region_ids(self) -> list[str]:
        """Every region daemon, standbys included."""
        return [*(r for r in self.regions if r != ROOT_ID), *self.standbys]

    @property
    def nodes(self) -> list[str]:
        if self.gossip:
            relay = [RELAY_ID] if any(b == RELAY_ID for _, b in self.edges) else []
            return [*self.peers, *relay]
        loadgen = [LOADGEN_ID] if self.load_sites else []
        return [ROOT_ID, *self.region_ids, *self.sites, *loadgen]

    @property
    def processes(self) -> list[str]:
        """The nodes that run as processes of their own (not the load sites)."""
        return [n for n in self.nodes if n not in self.load_sites]

    def parent(self, node: str) -> str | None:
        if node in self.region_ids:
            return ROOT_ID
        for parent, members in self.regions.items():
            if node in members:
                return parent
        return None

    def children(self, node: str) -> list[str]:
        """The nodes that dial ``node`` (its children, for an aggregator)."""
        if self.gossip:
            return [a for a, b in self.edges if b == node]
        if node == ROOT_ID:
            return list(self.regions.get(ROOT_ID, self.region_ids))
        # A standby's children are its region's sites: they fall back to it.
        return list(self.regions.get(self.standbys.get(node, node), []))

    def neighbours(self, peer: str) -> list[str]:
        """A gossip peer's ring neighbours (reached directly or through the relay)."""
        i, n = self.peers.index(peer), len(self.peers)
        around = [self.peers[(i - 1) % n], self.peers[(i + 1) % n]]
        return [p for k, p in enumerate(around) if p != peer and p not in around[:k]]

    @property
    def links(self) -> list[str]:
        """Every connection, named ``"dialer->listener"`` (a child's to its parent)."""
        if self.gossip:
            return [f"{a}->{b}" for a, b in self.edges]
        links = [f"{n}->{self.parent(n)}" for n in self.nodes if self.parent(n) is not None]
        for standby, region in self.standbys.items():  # sites dial their standby too
            links += [f"{site}->{standby}" for site in self.regions[region]]
        return links

    def listening(self, node: str) -> bool:
        if self.gossip:
            return node == RELAY_ID or (node in self.peers and node not in self.relayed)
        return node == ROOT_ID or node in self.region_ids


def gossip_ring(n_peers: int, n_relayed: int) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Peers on a ring, the last ``n_relayed`` of them not listening: who dials whom. Of two
    listening neighbours the lower-numbered dials; a relayed peer dials a listening
    neighbour; two relayed neighbours both dial the relay."""
    peers = [f"peer-{i}" for i in range(n_peers)]
    relayed = peers[n_peers - n_relayed :]
    pairs = sorted({tuple(sorted((i, (i + 1) % n_peers))) for i in range(n_peers)})
    edges: list[tuple[str, str]] = []
    via_relay: set[str] = set()
    for a, b in pairs:
        pa, pb = peers[a], peers[b]
        if pb not in relayed:
            edges.append((pa, pb))
        elif pa not in relayed:
            edges.append((pb, pa))
        else:
            via_relay |= {pa, pb}
    edges += [(p, RELAY_ID) for p in peers if p in via_relay]
    return peers, relayed, edges


@dataclass(frozen=True, slots=True)
class Fault:
    """One timeline entry. ``targets`` are resolved: link names for network faults (and
    heal), node ids for everything else."""

    name: str
    kind: str
    at_s: float
    for_s: float | None
    targets: tuple[str, ...]
    direction: str = "both"
    params: Mapping[str, float] = field(default_factory=dict)
    where: str = ""  # corrupt: wal_middle | wal_end | wal_torn | checkpoint
    same_state: bool = True  # duplicate: share the state directory (else a copy of it)
    graceful: bool = True  # restart: SIGTERM first (else SIGKILL)

    @property
    def end_s(self) -> float | None:
        return None if self.for_s is None else self.at_s + self.for_s

    @property
    def is_network(self) -> bool:
        return self.kind in NETWORK_KINDS or self.kind == "heal"


@dataclass(frozen=True, slots=True)
class RunSettings:
    eval_interval_s: float = 1.0
    sample_interval_s: float = 1.0
    restart_exited_after_s: float = 0.0
    tmpfs_mb: int = 32
    stop_grace_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    source: Path | None
    duration_s: float
    seed: int
    shape: Shape
    run: RunSettings
    expect: Mapping[str, Any]
    faults: tuple[Fault, ...]
    description: str = ""

    @property
    def resume_within_s(self) -> float:
        return float(self.expect.get("resume_within_s", 30.0))

    def disk_nodes(self) -> list[str]:
        """Nodes whose state directory must live on a tmpfs (disk_full, read_only)."""
        out: list[str] = []
        for f in self.faults:
            if f.kind in ("disk_full", "read_only"):
                out += [t for t in f.targets if t not in out]
        return out


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file; every problem is one ``ConfigError``."""
    p = Path(path)
    # A pipe would block the read for good, a device (/dev/zero) never end it.
    if p.exists() and not p.is_dir() and not p.is_file():
        raise ConfigError(f"{p}: not a regular file (a pipe or a device); a scenario is a file")
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such scenario file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory, expected a scenario .toml file") from None
    except OSError as exc:  # unreadable (permissions, an I/O error)
        raise ConfigError(f"{p}: cannot read the scenario file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (a scenario is UTF-8 TOML)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    try:
        return parse_scenario(raw, name=p.stem, source=p)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def parse_scenario(
    raw: Mapping[str, Any], *, name: str = "scenario", source: Path | None = None
) -> Scenario:
    t = Table(raw, "")
    if isinstance(raw.get("fault"), Mapping):
        raise ConfigError("fault: a single [fault] table; write each fault as [[fault]]")
    for key in ("federation", "run", "expect"):
        value = raw.get(key)
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            raise ConfigError(f"{key}: [[{key}]] is a list of tables; write [{key}] (one table)")
    scen_name = t.text("name", name)
    if (
        not scen_name
        or any(c in scen_name for c in "/\\")
        or scen_name.startswith(".")
        or not scen_name.isprintable()
    ):
        raise ConfigError(f"name: {scen_name!r} cannot name a run directory")
    description = t.text("description", "")
    duration = t.number("duration_s", min=1.0, max=24 * 3600.0)
    seed = t.integer("seed", 1, min=0)
    shape = _shape(t.table("federation"))
    run = _run(t.table("run"))
    faults_raw = t.array("fault", [])
    faults = _faults(faults_raw, shape, duration)
    expect = _expect(t.table("expect"), shape)
    refusing = expect.get("refuses_start", [])
    for node in [refusing] if isinstance(refusing, str) else refusing:
        # Only a corrupt fault gives a node a reason to refuse its start.
        if not any(f.kind == "corrupt" and node in f.targets for f in faults):
            raise ConfigError(
                f"expect.refuses_start: no corrupt fault damages {node!r}; add one, or remove it"
            )
    t.finish()
    return Scenario(
        scen_name, source, duration, seed, shape, run, expect, faults, description=description
    )


def _table_dict(t: Table, key: str) -> dict[str, Any]:
    value = t.raw(key, {})
    if not isinstance(value, Mapping):
        raise t.fail(key, "a table", value)
    return dict(value)


def _shape(t: Table) -> Shape:
    kind = t.text("shape", "hierarchy", choices=SHAPES)
    if kind == "gossip":
        return _gossip_shape(t)
    n_load = t.integer("load_sites", 0, min=0, max=1000)
    n_sites = t.integer("sites", 4, min=0 if n_load else 1, max=200)
    names = [f"site-{i}" for i in range(n_sites)] + [f"load-{i}" for i in range(n_load)]
    regions: dict[str, list[str]]
    if kind == "star":
        if t.has("regions"):
            raise ConfigError("federation.regions: a star has no regions; remove it")
        regions = {ROOT_ID: names}
    else:
        n_regions = t.integer("regions", 2, min=1, max=50)
        if n_regions > len(names):
            raise ConfigError(
                f"federation.regions: {n_regions} regions for {len(names)} sites leaves a "
                "region with no site; use at most as many regions as sites"
            )
        regions = {f"region-{r}": [] for r in range(n_regions)}
        for i in range(n_sites):
            regions[f"region-{i % n_regions}"].append(f"site-{i}")
        for i in range(n_load):
            regions[f"region-{(n_sites + i) % n_regions}"].append(f"load-{i}")
    standbys: dict[str, str] = {}
    failover_after_s = None
    if kind == "hierarchy" and t.flag("standby", False):
        # A second region daemon per region, which its sites fall back to (runtime.config:
        # [[parent.fallback]]); the root counts each site update once whichever delivers it.
        standbys = {f"{r}-standby": r for r in regions}
        failover_after_s = t.number("failover_after_s", 10.0, min=0.1, max=3600.0)
        if n_load:
            raise ConfigError(
                "federation.standby: not with load_sites (the load generator's sites are "
                "laid out after the standbys and have no fallback); drop one of them"
            )
    elif t.has("standby") or t.has("failover_after_s"):
        key = "standby" if t.has("standby") else "failover_after_s"
        raise ConfigError(f"federation.{key}: only a hierarchy has standby regions")
    shape = Shape(
        kind,
        regions,
        standbys=standbys,
        failover_after_s=failover_after_s,
        plan=_table_dict(t, "plan"),
        training=_table_dict(t, "training"),
        root_aggregation=_table_dict(t, "root_aggregation"),
        region_aggregation=_table_dict(t, "region_aggregation"),
        connection=_table_dict(t, "connection"),
        load_sites=tuple(f"load-{i}" for i in range(n_load)),
    )
    if kind == "star" and shape.region_aggregation:
        raise ConfigError("federation.region_aggregation: a star has no regions; remove it")
    t.finish()
    return shape


def _gossip_shape(t: Table) -> Shape:
    for key in ("sites", "regions", "root_aggregation", "region_aggregation"):
        if t.has(key):
            raise ConfigError(f"federation.{key}: a gossip federation has none; remove it")
    n_peers = t.integer("peers", 4, min=2, max=100)
    n_relayed = t.integer("relayed", 0, min=0)
    if n_relayed > n_peers:
        raise ConfigError(f"federation.relayed: {n_relayed} relayed of {n_peers} peers")
    mode = t.text("gossip_mode", "dpsgd", choices=("dpsgd", "pushsum"))
    interval = t.number("gossip_interval_s", 1.0, min=0.05, max=3600.0)
    peers, relayed, edges = gossip_ring(n_peers, n_relayed)
    aggregation = {"gossip_mode": mode, "gossip_interval_s": interval}
    shape = Shape(
        "gossip",
        {},
        plan=_table_dict(t, "plan"),
        training=_table_dict(t, "training"),
        connection=_table_dict(t, "connection"),
        peers=tuple(peers),
        relayed=tuple(relayed),
        edges=tuple(edges),
        peer_aggregation={**aggregation, **_table_dict(t, "peer_aggregation")},
    )
    t.finish()
    return shape


def _run(t: Table) -> RunSettings:
    out = RunSettings(
        eval_interval_s=t.number("eval_interval_s", 1.0, min=0.1, max=600.0),
        sample_interval_s=t.number("sample_interval_s", 1.0, min=0.2, max=60.0),
        restart_exited_after_s=t.number("restart_exited_after_s", 0.0, min=0.0, max=3600.0),
        tmpfs_mb=t.integer("tmpfs_mb", 32, min=1, max=4096),
        stop_grace_s=t.number("stop_grace_s", 10.0, min=0.5, max=120.0),
    )
    t.finish()
    return out


def _expect(t: Table, shape: Shape) -> dict[str, Any]:
    # Every field is read (None when absent) so that a misspelt one is reported with the
    # fields [expect] knows, not "known fields: none".
    out: dict[str, Any] = {
        "resume_within_s": t.number("resume_within_s", 30.0, min=1.0, max=24 * 3600.0)
    }
    # How long a started daemon may take to answer /healthz.
    start_grace_s = t.number("start_grace_s", None, min=1.0, max=600.0)
    if start_grace_s is not None:
        out["start_grace_s"] = start_grace_s
    for key in _EXPECT_BOOLS:
        flag = t.flag(key, None)
        if flag is not None:
            out[key] = flag
    for key in ("refuses_start", "allowed_exits"):
        value = t.raw(key)
        if value is None:
            continue
        ids = [value] if isinstance(value, str) else value
        if not isinstance(ids, list) or not all(isinstance(v, str) for v in ids):
            raise t.fail(key, "a node id or a list of node ids", value)
        for v in ids:
            if v not in shape.nodes:
                raise ConfigError(f"expect.{key}: {v!r} is not a node ({_show_nodes(shape)})")
        out[key] = value
    min_version = t.integer("min_version", None, min=0)
    if min_version is not None:
        out["min_version"] = min_version
    min_accuracy = t.number("min_accuracy", None, min=0.0, max=1.0)
    if min_accuracy is not None:
        out["min_accuracy"] = min_accuracy
    t.finish()
    return out


def _show_nodes(shape: Shape) -> str:
    nodes = shape.nodes
    shown = ", ".join(nodes[:8]) + (", ..." if len(nodes) > 8 else "")
    return f"nodes: {shown}"


def _faults(items: Sequence[Any], shape: Shape, duration: float) -> tuple[Fault, ...]:
    out: list[Fault] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        where = f"fault[{i}]"
        f = _fault(Table(item, where), where, shape, duration)
        if f.name in names:
            raise ConfigError(f"{where}.name: {f.name!r} names an earlier fault too")
        names.add(f.name)
        out.append(f)
    order = sorted(range(len(out)), key=lambda i: out[i].at_s)
    _check_timeline([(i, out[i]) for i in order])
    return tuple(out[i] for i in order)


def _check_timeline(timeline: Sequence[tuple[int, Fault]]) -> None:
    """Faults that would do nothing are mistakes (a misspelt target, an at_s misplaced, a
    for_s already over): a resume with none of its targets paused, a heal with no network
    fault standing on its links. So are a kill or pause of a process another fault holds
    down or paused: it does nothing, and its end restarts (resumes) the process before the
    other fault's end."""
    # node -> (when it is back: None = until started or resumed, the fault's index, kind)
    down: dict[str, tuple[float | None, int, str]] = {}
    paused: dict[str, tuple[float | None, int, str]] = {}
    standing: dict[str, list[float | None]] = {}  # link -> when each network fault ends
    disks: dict[str, tuple[float | None, int, str]] = {}  # node -> its disk fault
    for i, f in timeline:
        for held in (down, paused, disks):
            for n, (end, _, _) in list(held.items()):
                if end is not None and end <= f.at_s:
                    del held[n]
        for link, ends in list(standing.items()):
            standing[link] = [end for end in ends if end is None or end > f.at_s]
        if f.kind == "heal":
            if not any(standing.get(link) for link in f.targets):
                raise ConfigError(
                    f"fault[{i}]: a heal at {f.at_s:g} s, but no network fault stands on "
                    f"{_show_targets(f.targets)} then; a heal ends an earlier network fault "
                    "that has no for_s"
                )
            for link in f.targets:
                standing.pop(link, None)
        elif f.is_network:
            for link in f.targets:
                standing.setdefault(link, []).append(f.end_s)
        elif f.kind in ("kill", "pause", "duplicate", "corrupt"):
            # A duplicate of a process that is down runs alone; a corrupt restarts it early.
            held = paused if f.kind == "pause" else down
            idle = [n for n in f.targets if n in down or n in held]
            # A kill (pause) whose end would restart (resume) a node another fault holds.
            timed = f.kind in ("kill", "pause") and f.for_s is not None
            clash = [n for n in f.targets if n in held] if timed else []
            if len(idle) == len(f.targets) or clash:
                n = clash[0] if clash else idle[0]
                end, j, kind = down.get(n) or held[n]
                until = "resumed" if kind == "pause" else "restarted"
                shown = f"{end:g} s" if end is not None else until
                state = "down" if n in down else "paused"
                why = "it would do nothing"
                if clash:
                    why = f"its end would {'restart' if f.kind == 'kill' else 'resume'} {n} early"
                elif f.kind == "duplicate":
                    why = "the duplicate would run alone"
                elif f.kind == "corrupt":
                    why = f"it would restart {n} early"
                raise ConfigError(
                    f"fault[{i}]: a {f.kind} of {n} at {f.at_s:g} s, but {n} is still {state} "
                    f"then (fault[{j}], a {kind} until {shown}): {why}; one such fault at a "
                    "time per process"
                )
            if f.kind == "corrupt":  # it writes there, and would fail with its node killed
                _check_disk(i, f, disks)
            if f.kind in ("kill", "pause"):
                held.update((n, (f.end_s, i, f.kind)) for n in f.targets if n not in down)
            if f.kind in ("kill", "corrupt"):  # a killed process is not paused
                paused = {n: v for n, v in paused.items() if n not in f.targets}
        elif f.kind in ("disk_full", "read_only"):
            _check_disk(i, f, disks)
            disks.update((n, (f.end_s, i, f.kind)) for n in f.targets)
        elif f.kind in ("kill_all", "restart"):
            if f.kind == "kill_all" and all(n in down for n in f.targets):
                end, j, kind = down[f.targets[0]]
                raise ConfigError(
                    f"fault[{i}]: a kill_all at {f.at_s:g} s, but every daemon is still down "
                    f"then (fault[{j}], a {kind}): it would do nothing"
                )
            paused = {n: v for n, v in paused.items() if n not in f.targets}
            if f.kind == "restart" and f.for_s is None:  # starts its targets, down or not
                down = {n: v for n, v in down.items() if n not in f.targets}
            else:  # its end restarts only what it stopped: the others keep their own end
                down.update((n, (f.end_s, i, f.kind)) for n in f.targets if n not in down)
        elif f.kind == "resume":
            if not any(n in paused for n in f.targets):
                raise ConfigError(
                    f"fault[{i}]: a resume at {f.at_s:g} s, but none of its targets "
                    f"({', '.join(f.targets[:4])}) is paused then; a resume ends an earlier "
                    "pause that has no for_s"
                )
            paused = {n: v for n, v in paused.items() if n not in f.targets}


def _check_disk(i: int, f: Fault, disks: Mapping[str, tuple[float | None, int, str]]) -> None:
    """One disk fault at a time per node: neither fills nor empties a tmpfs the other made
    read-only, nor can a corrupt write on one."""
    for n in f.targets:
        if n in disks:
            end, j, kind = disks[n]
            shown = f"{end:g} s" if end is not None else "the end of the run"
            raise ConfigError(
                f"fault[{i}]: a {f.kind} of {n} at {f.at_s:g} s, but {n}'s disk is still "
                f"{kind} then (fault[{j}], until {shown}); one disk fault at a time per node"
            )


def _show_targets(targets: Sequence[str]) -> str:
    return ", ".join(targets[:3]) + (f" and {len(targets) - 3} more" if len(targets) > 3 else "")


def _fault(t: Table, where: str, shape: Shape, duration: float) -> Fault:
    kind = t.text("kind", choices=FAULT_KINDS)
    at_s = t.number("at_s", min=0.0)
    if at_s >= duration:
        raise ConfigError(f"{where}.at_s: {at_s:g} s is not before duration_s = {duration:g}")
    for_s = t.number("for_s", None, min=0.0, exclusive_min=True)
    if for_s is not None and at_s + for_s > duration:
        raise ConfigError(
            f"{where}.for_s: the fault would end at {at_s + for_s:g} s, after duration_s = "
            f"{duration:g}; shorten it or leave it out (until healed)"
        )
    if kind in ("resume", "heal", "corrupt") and for_s is not None:
        raise ConfigError(f"{where}.for_s: a {kind} is instantaneous; remove for_s")
    if kind in INPUT_KINDS and for_s is None:
        raise ConfigError(f"{where}.for_s: required for {kind} (how long the connections last)")
    name = t.text("name", f"{kind}@{at_s:g}")
    if not name.strip() or not name.isprintable():
        raise ConfigError(f"{where}.name: {name!r} cannot name a fault on the timeline")
    direction = "both"
    if kind in NETWORK_KINDS:
        direction = t.text("direction", "both", choices=DIRECTIONS)
    params: dict[str, float] = {}
    for key, (default, lo, hi) in _PARAMS.get(kind, {}).items():
        # No default: the parameter is required (Table says "required field is missing").
        given: tuple[Any, ...] = () if default is None else (default,)
        if key in _INTEGER_PARAMS:
            value = t.integer(key, *(int(g) for g in given), min=int(lo))
            if hi is not None and value > hi:
                raise ConfigError(f"{where}.{key}: expected at most {hi:g}, got {value}")
        else:
            value = t.number(key, *given, min=lo, max=hi, exclusive_min=key == "rate_kbps")
        params[key] = float(value)
    if kind == "loss" and params["loss"] <= 0.0:
        raise ConfigError(f"{where}.loss: expected a fraction in (0, 0.99], got 0")
    if kind == "reorder" and params["reorder"] <= 0.0:
        raise ConfigError(f"{where}.reorder: expected a fraction in (0, 0.99], got 0")
    corrupt_where = (
        t.text("where", "wal_middle", choices=CORRUPT_WHERE) if kind == "corrupt" else ""
    )
    same_state = t.flag("same_state", True) if kind == "duplicate" else True
    graceful = t.flag("graceful", True) if kind == "restart" else True
    targets = _targets(t, where, kind, shape)
    t.finish()
    return Fault(
        name,
        kind,
        at_s,
        for_s,
        targets,
        direction=direction,
        params=params,
        where=corrupt_where,
        same_state=same_state,
        graceful=graceful,
    )


def _targets(t: Table, where: str, kind: str, shape: Shape) -> tuple[str, ...]:
    if kind == "kill_all":
        if t.has("targets"):
            raise ConfigError(f"{where}.targets: kill_all stops every daemon; remove targets")
        return tuple(shape.processes)
    default: Any = ["all"] if kind == "heal" else None
    raw = t.array("targets", default) if default is not None else t.array("targets")
    if not raw:
        raise ConfigError(f"{where}.targets: name at least one link, node or group")
    network = kind in NETWORK_KINDS or kind == "heal"
    resolved: list[str] = []
    for j, spec in enumerate(raw):
        here = f"{where}.targets[{j}]"
        if not isinstance(spec, str):
            raise ConfigError(f"{here}: expected a string, got {spec!r}")
        items = _resolve_links(spec, shape, here) if network else _resolve_nodes(spec, shape, here)
        if not network and shape.load_sites:
            items = _load_sites_as_loadgen(items, kind, shape, here)
        resolved += [x for x in items if x not in resolved]
    if kind in INPUT_KINDS:
        for n in resolved:
            if not shape.listening(n):
                raise ConfigError(
                    f"{where}.targets: {n!r} does not listen (only the root and regions take "
                    f"connections); {kind} needs a listening node"
                )
    if kind in ("corrupt", "duplicate") and len(resolved) != 1:
        raise ConfigError(f"{where}.targets: {kind} takes exactly one node, got {len(resolved)}")
    if network and not resolved:
        raise ConfigError(f"{where}.targets: names no link")
    return tuple(resolved)


def _load_sites_as_loadgen(items: list[str], kind: str, shape: Shape, here: str) -> list[str]:
    """Process faults on load sites are on the load generator that runs them all."""
    loaded = [x for x in items if x in shape.load_sites or x == LOADGEN_ID]
    if not loaded:
        return items
    if kind not in LOADGEN_KINDS:
        raise ConfigError(
            f"{here}: {loaded[0]!r} runs in the load generator, which takes only "
            f"{', '.join(LOADGEN_KINDS)}; target a daemon of its own"
        )
    if LOADGEN_ID not in items and len(items) == 1:  # one load site named on its own
        raise ConfigError(
            f"{here}: {items[0]!r} is a load site, not a process; target {LOADGEN_ID!r} "
            "(every load site) or one of its links"
        )
    out = [x for x in items if x not in loaded]
    return [*out, LOADGEN_ID]


def _resolve_links(spec: str, shape: Shape, here: str) -> list[str]:
    links = shape.links
    if spec == "all":
        return links
    if spec == LOADGEN_ID and shape.load_sites:
        return [f"{s}->{shape.parent(s)}" for s in shape.load_sites]
    if "->" in spec:
        if spec not in links:
            raise ConfigError(
                f"{here}: {spec!r} is not a link of this federation (links are child->parent, "
                f"e.g. {links[0]!r})"
            )
        return [spec]
    if spec.endswith("/*"):
        node = spec[:-2]
        _node(node, shape, here)
        kids = shape.children(node)
        if not kids:
            raise ConfigError(f"{here}: {node!r} has no children")
        return [f"{c}->{node}" for c in kids]
    _node(spec, shape, here)
    return [link for link in links if spec in link.split("->")]


def _resolve_nodes(spec: str, shape: Shape, here: str) -> list[str]:
    if spec == "all":
        return shape.processes
    if "->" in spec:
        raise ConfigError(f"{here}: {spec!r} is a link; this fault takes nodes")
    if spec.endswith("/*"):
        node = spec[:-2]
        _node(node, shape, here)
        kids = shape.children(node)
        if not kids:
            raise ConfigError(f"{here}: {node!r} has no children")
        return kids
    _node(spec, shape, here)
    return [spec]


def _node(node: str, shape: Shape, here: str) -> None:
    if node not in shape.nodes:
        raise ConfigError(
            f"{here}: {node!r} is not a node of this federation ({_show_nodes(shape)})"
        )
