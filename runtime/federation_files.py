"""A local federation on disk: identities, a signed roster and one config per node.

``write_federation`` lays out a root, regional aggregators and sites (the demo's by
default: two regions of three hospitals, breast-cancer data split non-IID, FedBuff at both
tiers) in one directory: ``keys/``, ``roster.toml``, ``consortium.pub``, ``<node>.toml``,
``state/<node>/``, ``logs/<node>.log``. The demo, ``fedloom chaos``, ``fedloom local`` and
the end-to-end tests start their daemons from such a directory (``runtime.harness``), and
``scenarios/demo-parity.toml`` is the same federation for the simulator.
"""

from __future__ import annotations

import os
import random
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry, sign

__all__ = [
    "DEMO_PLAN",
    "DEMO_REGIONS",
    "DEMO_START_QUORUM",
    "DEMO_TRAINING",
    "ROOT_ID",
    "Federation",
    "NodeFiles",
    "check_port_range",
    "free_port",
    "new_workdir",
    "site_examples",
    "write_federation",
    "write_roster",
]

ROOT_ID = "root"
DEMO_REGIONS: dict[str, list[str]] = {
    "region-north": ["hospital-1", "hospital-2", "hospital-3"],
    "region-south": ["hospital-4", "hospital-5", "hospital-6"],
}
DEMO_PLAN: dict[str, Any] = {
    "dataset": "breast_cancer",
    "model": "softmax",
    "dirichlet_alpha": 0.3,
    "min_samples_per_site": 10,
}
DEMO_TRAINING: dict[str, Any] = {"lr": 0.05, "local_steps": 20, "batch_size": 16, "mu": 0.0}
# The demo starts every daemon at once, and a child that reached its parent first would get
# the model alone and fill the first buffers by itself: each aggregator waits for all its
# children (they come up 0.1-2 s apart), for 5 s at most (a dead child).
DEMO_START_QUORUM: dict[str, Any] = {"start_quorum": "all", "start_wait_s": 5.0}


# Ports handed out by ``free_port`` in this process: never handed out twice.
_HANDED_OUT: set[int] = set()
_PICKS = random.Random()


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections and ``bind(port 0)`` (Linux's default
    where it cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now, for a daemon to bind next, and distinct from every other
    port this process handed out.

    Picked at random below the kernel's ephemeral range, or in ``$FEDLOOM_PORT_RANGE``
    (``_pick_range``): a port the kernel chose for ``bind(0)`` is released here and can
    come back from the next ``bind(0)`` (two daemons, or a daemon's listener and its
    metrics port, then collide), and until the daemon binds it an outgoing connection may
    take it as its local port. Falls back to the kernel's choice when no port in that
    range is free.
    """
    first, last = _pick_range()
    for _ in range(200):
        port = _PICKS.randint(first, last)
        if port not in _HANDED_OUT and _bindable(host, port):
            _HANDED_OUT.add(port)
            return port
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError(f"no free TCP port on {host}")


PORT_RANGE_ENV = "FEDLOOM_PORT_RANGE"


def check_port_range() -> None:
    """Raise the OSError ``free_port`` would, naming ``$FEDLOOM_PORT_RANGE`` when it is not
    a range of ports: for a command to check before it writes anything."""
    _pick_range()


def _pick_range() -> tuple[int, int]:
    """The ports ``free_port`` picks from, both included: ``$FEDLOOM_PORT_RANGE``
    ("LOW-HIGH") where set, so that processes which share a machine without sharing their
    picks (parallel test workers, two local federations) can be given ranges that do not
    overlap; else the 12,000 ports below the kernel's ephemeral range. OSError naming the
    variable when it is not a range of ports above 1024."""
    text = os.environ.get(PORT_RANGE_ENV, "").strip()
    if not text:
        low, _ = _ephemeral_range()
        return max(1025, low - 12000), max(1025, low - 1)
    first_text, sep, last_text = text.partition("-")
    try:
        first, last = int(first_text), int(last_text)
    except ValueError:
        first, last = 0, -1
    if not sep or not 1024 < first <= last <= 65535:
        raise OSError(
            f"{PORT_RANGE_ENV}={text!r}: expected LOW-HIGH, two ports with "
            "1024 < LOW <= HIGH <= 65535 (for example 20000-21999)"
        )
    return first, last


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True, slots=True)
class NodeFiles:
    """Where one node of a written federation keeps its things."""

    node_id: str
    role: str
    config: Path
    state_dir: Path
    log: Path
    listen_port: int = 0  # 0: does not listen
    metrics_port: int = 0  # 0: no /metrics
    site_index: int | None = None

    @property
    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}" if self.metrics_port else None

    @property
    def url(self) -> str | None:
        return f"ws://127.0.0.1:{self.listen_port}/fedloom" if self.listen_port else None


@dataclass(frozen=True, slots=True)
class Federation:
    """A root, regions and sites written by ``write_federation`` (keys, roster, configs)."""

    workdir: Path
    roster: Path
    consortium_pub: Path
    plan: Mapping[str, Any]
    nodes: dict[str, NodeFiles] = field(default_factory=dict)

    def by_role(self, role: str) -> list[NodeFiles]:
        return [n for n in self.nodes.values() if n.role == role]

    def config(self, node_id: str) -> dict[str, Any]:
        """A node's config as a dict (to derive variants from)."""
        with self.nodes[node_id].config.open("rb") as fh:
            return tomllib.load(fh)


# A generated site trains on the demo's own synthetic data: no approval is needed, and
# saying so keeps its log free of the warning that nothing decides what runs.
DEMO_GOVERNANCE = {"require_approval": False}
_DEMO_GOVERNANCE_NOTE = (
    "# The demo's synthetic data: any plan may run (runtime.governance). For real data,\n"
    "# set require_approval = true and approve plans with `fedloom plans approve`.\n"
)


def _write_toml(path: Path, data: Mapping[str, Any]) -> None:
    text = tomli_w.dumps(dict(data))
    if data.get("governance") == DEMO_GOVERNANCE:
        text = text.replace("\n[governance]\n", "\n" + _DEMO_GOVERNANCE_NOTE + "[governance]\n", 1)
    path.write_text(text, encoding="utf-8")


def write_roster(
    path: Path,
    identities: Sequence[Identity],
    consortium: Identity,
    *,
    version: int = 1,
    examples: Mapping[str, int] | None = None,
) -> None:
    """Sign a roster of ``identities`` with ``consortium`` and write it to ``path``;
    ``examples`` declares sites' training examples (what their parents may weigh them by)."""
    declared = examples or {}
    entries = [
        RosterEntry(i.node_id, i.role, i.public_key, examples=declared.get(i.node_id))
        for i in identities
    ]
    unsigned = Roster(version, entries).to_toml()
    path.write_text(sign(unsigned, consortium), encoding="utf-8")


def new_workdir(workdir: Path) -> tuple[Path, Path, Identity, Path]:
    """Create ``workdir`` (made absolute) with ``keys/`` and ``logs/``, and a fresh
    consortium identity whose public line is ``consortium.pub``: (workdir, keys,
    consortium, pub). Configs name their files by absolute path: a config's relative
    paths are read relative to the config file, not to the directory it was written from."""
    workdir = workdir.absolute()
    keys = workdir / "keys"
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    consortium = Identity.generate("consortium", "consortium")
    consortium.save(keys, overwrite=True)
    pub = workdir / "consortium.pub"
    pub.write_text(consortium.public_line() + "\n", encoding="utf-8")
    return workdir, keys, consortium, pub


def write_federation(
    workdir: Path,
    regions: Mapping[str, Sequence[str]] = DEMO_REGIONS,
    *,
    seed: int = 1,
    plan: Mapping[str, Any] = DEMO_PLAN,
    training: Mapping[str, Any] = DEMO_TRAINING,
    root_aggregation: Mapping[str, Any] | None = None,
    region_aggregation: Mapping[str, Any] | None = None,
    connection: Mapping[str, Any] | None = None,
    site_metrics: bool = False,
    declare_examples: bool = True,
    start_quorum: Mapping[str, Any] | None = None,
) -> Federation:
    """Identities, a signed roster and one config per node for root -> regions -> sites.

    Aggregators get a free loopback port each (fixed in their configs, so a restarted
    daemon comes back where its children look for it) and a ``/metrics`` port; sites get
    one only with ``site_metrics``. Layout: ``keys/``, ``roster.toml``, ``consortium.pub``,
    ``<node>.toml``, ``state/<node>/``, ``logs/<node>.log``. With ``declare_examples`` the
    roster declares each site's real number of training examples (a built-in workload's),
    so no site can make its parent weigh it by more. ``start_quorum`` (the demo's:
    ``DEMO_START_QUORUM``) goes into every aggregator's ``[aggregation]``; without it the
    aggregators start as they always did (no quorum), as ``fedloom chaos`` and the tests
    built on this want.
    """
    sites = [s for members in regions.values() for s in members]
    n_sites = len(sites)
    plan_table = {**plan, "n_sites": n_sites, "seed": seed}
    # The data set is loaded before anything is written: one whose package is missing
    # (scikit-learn's) raises here and leaves no half-written directory behind.
    examples = site_examples(plan_table, sites) if declare_examples else None
    workdir, keys, consortium, pub = new_workdir(workdir)
    conn = {
        "keepalive_s": 2.0,
        "down_after_s": 10.0,
        "backoff_base_s": 0.1,
        "backoff_cap_s": 1.0,
        **(connection or {}),
    }
    agg_defaults = {
        "algorithm": "fedbuff",
        "max_staleness": 100,
        "task_timeout_s": 60.0,
        # Hospitals hold 10 to 225 patients: weigh their deltas by it (as the pooled
        # objective does) rather than uniformly.
        "weighting": "examples",
        **(start_quorum or {}),
    }
    region_agg = {**agg_defaults, "buffer_size": 3, "concurrency": 10, **(region_aggregation or {})}
    root_agg = {
        **agg_defaults,
        "buffer_size": 2,
        "concurrency": 10,
        # A region forwards at most one buffer's worth: what the root lets it claim.
        "regional_buffer_size": region_agg["buffer_size"],
        **(root_aggregation or {}),
    }

    identities: list[Identity] = []
    nodes: dict[str, NodeFiles] = {}

    def base(node_id: str, role: str) -> dict[str, Any]:
        ident = Identity.generate(node_id, role)
        ident.save(keys, overwrite=True)
        identities.append(ident)
        state = workdir / "state" / node_id
        return {
            "role": role,
            "node_id": node_id,
            "state_dir": str(state),
            "seed": seed,
            "identity": {"key": str(keys / f"{node_id}.key")},
            "roster": {"path": str(workdir / "roster.toml"), "consortium_key_file": str(pub)},
            "connection": conn,
            "codec": {"up": "fp32", "down": "fp32"},
        }

    def add(cfg: dict[str, Any], listen: int, metrics: int, index: int | None = None) -> None:
        node_id = cfg["node_id"]
        if metrics:
            cfg["metrics"] = {"host": "127.0.0.1", "port": metrics}
        path = workdir / f"{node_id}.toml"
        _write_toml(path, cfg)
        nodes[node_id] = NodeFiles(
            node_id,
            cfg["role"],
            path,
            Path(cfg["state_dir"]),
            workdir / "logs" / f"{node_id}.log",
            listen,
            metrics,
            index,
        )

    root_port = free_port()
    root = base(ROOT_ID, "root")
    root.update(
        children=list(regions),
        listen={"host": "127.0.0.1", "port": root_port},
        plan=plan_table,
        training=dict(training),
        aggregation=root_agg,
    )
    add(root, root_port, free_port())
    index = 0
    for region_id, members in regions.items():
        port = free_port()
        region = base(region_id, "region")
        region.update(
            children=list(members),
            listen={"host": "127.0.0.1", "port": port},
            parent={"id": ROOT_ID, "url": f"ws://127.0.0.1:{root_port}/fedloom"},
            training=dict(training),
            aggregation=region_agg,
        )
        add(region, port, free_port())
        for site_id in members:
            site = base(site_id, "site")
            site.update(
                parent={"id": region_id, "url": f"ws://127.0.0.1:{port}/fedloom"},
                plan={**plan_table, "site_index": index},
                training=dict(training),
            )
            if plan.get("kind") != "tabular":  # a site's own table is approved by default
                site["governance"] = dict(DEMO_GOVERNANCE)
            add(site, 0, free_port() if site_metrics else 0, index)
            index += 1
    write_roster(workdir / "roster.toml", identities, consortium, examples=examples)
    return Federation(workdir, workdir / "roster.toml", pub, plan_table, nodes)


def site_examples(plan: Mapping[str, Any], sites: Sequence[str]) -> dict[str, int] | None:
    """Each site's training examples under a built-in workload ``plan`` (sites in index
    order), or None for a plan this cannot size (a factory's)."""
    if "dataset" not in plan:
        return None
    from fedloom.workloads.workload import from_config

    workload = from_config(plan)
    return {site: int(workload.n_examples(i)) for i, site in enumerate(sites)}
