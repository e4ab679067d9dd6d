"""``fedloom demo``: a real federation on this machine, end to end, in well under two minutes.

A root, two regional aggregators and six hospital sites run as nine separate ``fedloom run``
processes on 127.0.0.1, each with its own identity, state directory and log, all admitted by
one signed roster, talking over the encrypted WebSocket transport. The hospitals hold the
breast-cancer data split non-IID (Dirichlet label skew); FedBuff aggregates at both tiers
(sites -> region -> root). The demo watches the root's and the regions' ``/metrics`` for
live progress, stops every process cleanly once the global model reaches the wanted
version, restores the root's final model from its state directory, and prints its test
accuracy beside a centrally trained baseline (the same model on the pooled training data)
and each hospital's local-only model.

Process hygiene: every daemon runs in its own session (a terminal's Ctrl-C reaches the demo
only, which then stops them in order), is asked to stop with SIGTERM, then SIGKILLed after a
grace period, and on Linux is also told to die with the demo (``PR_SET_PDEATHSIG``).

The building blocks (``write_federation``, ``DaemonProcess``, ``Cluster``, ``scrape``) are
also what the end-to-end tests use.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from fedloom.runtime.malloc_tuning import malloc_env
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry, sign

__all__ = [
    "Cluster",
    "DaemonProcess",
    "Federation",
    "NodeFiles",
    "cmd_demo",
    "free_port",
    "scrape",
    "write_federation",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 10.0
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


# ============================================================================== files


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (the kernel's choice), for a daemon to bind next."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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


def _write_toml(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(tomli_w.dumps(dict(data)), encoding="utf-8")


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
) -> Federation:
    """Identities, a signed roster and one config per node for root -> regions -> sites.

    Aggregators get a free loopback port each (fixed in their configs, so a restarted
    daemon comes back where its children look for it) and a ``/metrics`` port; sites get
    one only with ``site_metrics``. Layout: ``keys/``, ``roster.toml``, ``consortium.pub``,
    ``<node>.toml``, ``state/<node>/``, ``logs/<node>.log``. With ``declare_examples`` the
    roster declares each site's real number of training examples (a built-in workload's),
    so no site can make its parent weigh it by more.
    """
    workdir, keys, consortium, pub = new_workdir(workdir)

    sites = [s for members in regions.values() for s in members]
    n_sites = len(sites)
    plan_table = {**plan, "n_sites": n_sites, "seed": seed}
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
            add(site, 0, free_port() if site_metrics else 0, index)
            index += 1
    examples = site_examples(plan_table, sites) if declare_examples else None
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


# ========================================================================== processes


def _pdeathsig() -> Any:
    """A pre-exec hook asking Linux to SIGTERM the child when this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return hook


_PREEXEC = _pdeathsig()


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = malloc_env(os.environ)  # as the systemd units run the daemons
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    env.update(extra or {})
    return env


class DaemonProcess:
    """One ``fedloom run`` child process (its own session), logging to ``files.log``."""

    def __init__(
        self,
        files: NodeFiles,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.files = files
        self.args = list(args)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def node_id(self) -> str:
        return self.files.node_id

    def command(self) -> list[str]:
        """What ``start`` runs (``runtime.chaos.loadgen`` runs another program)."""
        cmd = [
            sys.executable,
            "-m",
            "fedloom",
            "run",
            "--config",
            str(self.files.config),
        ]
        return [*cmd, "--log-format", "json", *self.args]

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self.node_id} is already running")
        self.files.log.parent.mkdir(parents=True, exist_ok=True)
        with self.files.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=daemon_env(self.env),
                cwd=REPO_ROOT,
                start_new_session=True,  # a terminal's Ctrl-C goes to the demo, not here
                preexec_fn=_PREEXEC,
            )
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the session's group: also any worker processes

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        """Ask for a clean stop (SIGTERM) without waiting."""
        self.signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        """Wait for the exit; SIGKILL the group after ``timeout``. Returns the exit status."""
        if self.proc is None:
            return None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            rc = self.proc.wait()
        self._signal_group(signal.SIGKILL)  # leftovers of the group, if any
        return rc

    def stop(self, timeout: float = STOP_GRACE_S) -> int | None:
        self.terminate()
        return self.wait(timeout)

    def log_text(self) -> str:
        try:
            return self.files.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


class Cluster:
    """Daemon processes of a federation; ``with Cluster(...)`` stops them all on exit."""

    def __init__(self, fed: Federation, *, args: Mapping[str, Sequence[str]] | None = None):
        self.fed = fed
        self.procs: dict[str, DaemonProcess] = {
            node_id: DaemonProcess(files, args=(args or {}).get(node_id, ()))
            for node_id, files in fed.nodes.items()
        }

    def __getitem__(self, node_id: str) -> DaemonProcess:
        return self.procs[node_id]

    def add(self, proc: DaemonProcess) -> DaemonProcess:
        self.procs[proc.node_id] = proc
        return proc

    def start(self, ids: Sequence[str] | None = None) -> None:
        for node_id in ids if ids is not None else list(self.procs):
            self.procs[node_id].start()

    def dead(self) -> list[str]:
        """Nodes that were started and have exited."""
        return [p.node_id for p in self.procs.values() if p.proc is not None and not p.alive]

    def stop(
        self, ids: Sequence[str] | None = None, timeout: float = STOP_GRACE_S
    ) -> dict[str, int | None]:
        """SIGTERM the given (default: all) nodes at once, then wait for each in turn."""
        chosen = [self.procs[i] for i in (ids if ids is not None else list(self.procs))]
        for p in chosen:
            p.terminate()
        deadline = time.monotonic() + timeout
        return {p.node_id: p.wait(max(0.1, deadline - time.monotonic())) for p in chosen}

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ============================================================================ metrics


def scrape(url: str, timeout: float = 1.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as ``{(sample name, sorted labels): value}``; empty if unreachable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as resp:
            text = resp.read().decode("utf-8")
    except (urllib.error.URLError, OSError, TimeoutError):
        return {}
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def sample(
    metrics: Mapping[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    **labels: str,
) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def sample_sum(
    metrics: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str
) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


# ============================================================================ baselines


@dataclass(frozen=True, slots=True)
class Score:
    name: str
    detail: str
    accuracy: float
    loss: float


def _train_epochs(plan: Any, weights: Any, n: int, epochs: int, seed: int) -> Any:
    cfg = dict(DEMO_TRAINING)
    steps = max(1, epochs * math.ceil(n / int(cfg["batch_size"])))
    cfg.update(local_steps=steps, seed=seed)
    return plan.train(weights, cfg).weights


def baselines(plan_table: Mapping[str, Any], epochs: int = 30) -> tuple[Score, list[Score]]:
    """The centrally trained model (pooled training data) and each site's local-only model,
    scored on the global test set: what federation is measured against."""
    from fedloom.workloads.datasets import Split
    from fedloom.workloads.models import make_model
    from fedloom.workloads.workload import from_config

    workload = from_config(plan_table)
    data = workload.dataset
    parts = [data.site(i).train for i in range(workload.n_sites)]
    pooled = Split.concat(parts, workload.n_features)
    model = workload.model_spec
    central_plan = make_model(
        model.name, workload.n_features, workload.n_classes, train=pooled, **model.kwargs()
    )
    init = workload.init_weights(int(plan_table.get("seed", 0)))
    w = _train_epochs(central_plan, init, len(pooled), epochs, seed=1)
    m = workload.evaluate(w)
    central = Score(
        "central baseline", f"pooled data, {len(pooled)} examples", m["accuracy"], m["loss"]
    )
    local: list[Score] = []
    for i, part in enumerate(parts):
        w = _train_epochs(workload.site_plan(i), init, len(part), epochs, seed=1 + i)
        m = workload.evaluate(w)
        counts = np.bincount(part.y, minlength=workload.n_classes)
        mix = "/".join(str(int(c)) for c in counts)
        local.append(
            Score(
                f"hospital-{i + 1} alone",
                f"{len(part)} examples (labels {mix})",
                m["accuracy"],
                m["loss"],
            )
        )
    return central, local


# =============================================================================== demo


@dataclass(slots=True)
class Progress:
    version: int = 0
    accuracy: float = math.nan
    root_updates: int = 0
    site_updates: dict[str, int] = field(default_factory=dict)


def _poll(fed: Federation, previous: Progress) -> Progress:
    """Progress from the root's and the regions' ``/metrics`` (``previous`` while the
    root does not answer, e.g. still starting)."""
    root = fed.nodes[ROOT_ID]
    assert root.metrics_url is not None
    m = scrape(root.metrics_url, timeout=0.5)
    if not m:
        return previous
    out = Progress()
    version = sample(m, "fedloom_model_version")
    out.version = int(version) if version is not None else 0
    acc = sample(m, "fedloom_eval_accuracy")
    out.accuracy = acc if acc is not None else math.nan
    out.root_updates = int(sample_sum(m, "fedloom_updates_applied_total"))
    for region in fed.by_role("region"):
        assert region.metrics_url is not None
        rm = scrape(region.metrics_url, timeout=0.5)
        for (name, labels), value in rm.items():
            if name == "fedloom_updates_applied_total":
                src = dict(labels).get("src", "?")
                out.site_updates[src] = int(value)
    return out


class DemoError(RuntimeError):
    """The demo federation could not run (a daemon died)."""


def _run_federation(
    fed: Federation,
    cluster: Cluster,
    *,
    versions: int,
    timeout_s: float,
    console: Any,
    live: bool,
) -> tuple[Progress, float]:
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    started = time.monotonic()
    cluster.start()
    console.print(
        f"started {len(cluster.procs)} daemons (pids "
        f"{', '.join(str(p.pid) for p in cluster.procs.values())})"
    )
    columns = (
        TextColumn("[bold]{task.description:<14}"),
        BarColumn(bar_width=30),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    last = Progress()
    printed = -1
    with Bar(*columns, console=console, transient=False, disable=not live) as bar:
        glob = bar.add_task("global model", total=versions, info="starting daemons")
        regions = {
            r.node_id: bar.add_task(r.node_id, total=None, info="waiting")
            for r in fed.by_role("region")
        }
        while True:
            dead = cluster.dead()
            if dead:
                raise DemoError(f"daemon(s) {', '.join(dead)} exited early; see {fed.workdir}/logs")
            now = time.monotonic() - started
            last = _poll(fed, last)
            acc = "   -  " if math.isnan(last.accuracy) else f"{last.accuracy:.3f}"
            bar.update(
                glob,
                completed=min(last.version, versions),
                info=f"v{last.version:<3} accuracy {acc}  region updates {last.root_updates}",
            )
            for region_id, task in regions.items():
                members = fed.config(region_id)["children"]
                counts = [last.site_updates.get(s, 0) for s in members]
                bar.update(
                    task,
                    info=f"{sum(counts):>4} site updates ({' '.join(str(c) for c in counts)})",
                )
            if not live and last.version // 10 > printed:
                printed = last.version // 10
                console.print(
                    f"  t={now:5.1f}s  global v{last.version:<3} accuracy {acc}  "
                    f"site updates {sum(last.site_updates.values())}"
                )
            if last.version >= versions or now > timeout_s:
                break
            time.sleep(0.25)
    return last, time.monotonic() - started


def _final_model(fed: Federation) -> tuple[int, dict[str, float]]:
    from fedloom.runtime.config import load_config
    from fedloom.runtime.daemon import load_node
    from fedloom.workloads.workload import from_config

    node: Any = load_node(load_config(fed.nodes[ROOT_ID].config))
    version, weights = node.current_model()
    return int(version), from_config(fed.plan).evaluate(weights)


def _report(
    console: Any,
    version: int,
    final: Mapping[str, float],
    central: Score,
    local: Sequence[Score],
    site_updates: Mapping[str, int],
) -> None:
    from rich.table import Table

    table = Table(
        title=f"Accuracy on the held-out test set ({int(final.get('n_test', 0))} patients)"
    )
    table.add_column("model")
    table.add_column("trained on")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    total = sum(site_updates.values())
    table.add_row(
        "[bold]federated (FedBuff x2)[/]",
        f"6 hospitals, global v{version}, {total} site updates",
        f"[bold]{final['accuracy']:.3f}[/]",
        f"{final['loss']:.3f}",
    )
    table.add_row(central.name, central.detail, f"{central.accuracy:.3f}", f"{central.loss:.3f}")
    for s in local:
        table.add_row(s.name, s.detail, f"{s.accuracy:.3f}", f"{s.loss:.3f}")
    console.print(table)
    best = max(local, key=lambda s: s.accuracy)
    console.print(
        f"federated {final['accuracy']:.3f} vs central {central.accuracy:.3f} "
        f"({final['accuracy'] - central.accuracy:+.3f}); best hospital alone "
        f"{best.accuracy:.3f} ({best.name.removesuffix(' alone')})"
    )


def cmd_demo(
    *,
    versions: int = 60,
    timeout_s: float = 90.0,
    seed: int = 1,
    workdir: Path | None = None,
    quiet: bool = False,
) -> int:
    """Run the demo federation (see the module docstring); 0 on success, 130 on Ctrl-C."""
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=110)
    live = sys.stdout.isatty() and not quiet
    t0 = time.monotonic()
    # SIGTERM (e.g. from a test harness or `timeout`) ends the demo like Ctrl-C does.
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with contextlib.ExitStack() as stack:
            if workdir is None:
                tmp = tempfile.TemporaryDirectory(prefix="fedloom-demo-")
                workdir = Path(stack.enter_context(tmp))
            return _demo(console, workdir, versions, timeout_s, seed, live, t0)
    except KeyboardInterrupt:
        console.print("fedloom demo: interrupted; every daemon was stopped")
        return 130
    except DemoError as exc:
        console.print(f"[red]fedloom demo failed:[/] {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _demo(
    console: Any, workdir: Path, versions: int, timeout_s: float, seed: int, live: bool, t0: float
) -> int:
    fed = write_federation(workdir, seed=seed)
    console.print(
        f"[bold]fedloom demo[/]: {len(fed.nodes)} daemons on 127.0.0.1: a root, "
        f"{len(fed.by_role('region'))} regions, {len(fed.by_role('site'))} hospitals; "
        f"breast-cancer data with Dirichlet(alpha={DEMO_PLAN['dirichlet_alpha']}) label skew; "
        "FedBuff at both tiers; encrypted links"
    )
    console.print(f"identities, signed roster, configs, state and logs in {workdir}")
    cluster = Cluster(fed, args={ROOT_ID: ["--eval-interval", "0.5"]})
    try:
        progress, elapsed = _run_federation(
            fed, cluster, versions=versions, timeout_s=timeout_s, console=console, live=live
        )
    finally:
        codes = _stop_quietly(cluster)
    unclean = {k: v for k, v in codes.items() if v != 0}
    console.print(
        f"federation ran {elapsed:.1f} s; stopped all daemons "
        + ("cleanly (exit 0)" if not unclean else f"(exit codes {unclean})")
    )
    if progress.version < versions:
        console.print(
            f"[yellow]note:[/] stopped at v{progress.version} (timeout {timeout_s:.0f} s)"
        )
    version, final = _final_model(fed)
    central, local = baselines(fed.plan)
    _report(console, version, final, central, local, progress.site_updates)
    console.print(f"total wall time {time.monotonic() - t0:.1f} s")
    return 0 if not unclean and version >= 1 else 1


def _stop_quietly(cluster: Cluster) -> dict[str, int | None]:
    """Stop every daemon; a second Ctrl-C while stopping does not leave any behind."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return cluster.stop()
    finally:
        signal.signal(signal.SIGINT, previous)
