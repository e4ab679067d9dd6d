"""``fedloom local init DIR`` and ``fedloom local up DIR``: a federation on this machine.

``init`` writes what a federation needs (keys, a signed roster, one config per node, the
demo's plan and FedBuff at every tier) and a ``README.txt`` saying how to start each daemon;
``up`` starts every daemon of such a directory (logs in ``DIR/logs/``) and stops them all on
Ctrl-C or SIGTERM. The layout is ``runtime.chaos.layout``'s, the one ``fedloom chaos`` and the
demo use.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.chaos.layout import README_NAME, lay_out, read_config, write_readme
from fedloom.runtime.federation_files import Federation, NodeFiles, check_port_range
from fedloom.runtime.harness import Cluster

__all__ = ["cmd_local_init", "cmd_local_up", "read_federation"]

SHAPES = ("star", "hierarchy")
# Every site is a daemon process here: what a chaos scenario allows too.
MAX_SITES = 200


def _dataset_plan(dataset: str | None) -> dict[str, Any] | None:
    """Overrides of the demo's plan (breast-cancer data, which needs scikit-learn) that
    train on ``dataset`` instead; ``synthetic`` needs only numpy (a base install)."""
    from fedloom.workloads.workload import DATASET_NAMES

    if dataset is None:
        return None
    if dataset not in DATASET_NAMES:
        raise ConfigError(f"--dataset: {dataset!r} is not one of {', '.join(DATASET_NAMES)}")
    if dataset == "synthetic":
        # None drops the demo's scikit-learn fields; 200 examples a site keep it quick.
        return {
            "dataset": dataset,
            "dirichlet_alpha": None,
            "min_samples_per_site": None,
            "samples_per_site": 200,
        }
    return {"dataset": dataset}


def cmd_local_init(
    directory: Path,
    *,
    shape: str,
    regions: int | None,
    sites: int,
    seed: int,
    dataset: str | None = None,
    plan_file: Path | None = None,
) -> int:
    if dataset is not None and plan_file is not None:
        raise ConfigError("--plan and --dataset: give one (the plan file names its data)")
    tables = _read_plan_file(plan_file) if plan_file is not None else None
    if shape not in SHAPES:
        raise ConfigError(f"--shape: {shape!r} is not one of {', '.join(SHAPES)}")
    if not 1 <= sites <= MAX_SITES:
        raise ConfigError(
            f"--sites: expected 1 to {MAX_SITES} (each site is a daemon process on this "
            f"machine), got {sites}"
        )
    if seed < 0:
        raise ConfigError(f"--seed: expected a whole number >= 0, got {seed}")
    if shape == "star" and regions is not None:
        raise ConfigError("--regions: a star has no regions; drop it or use --shape hierarchy")
    if regions is None:  # not given: two, or one region per site when there are fewer
        regions = min(2, sites)
    if shape == "hierarchy" and not 1 <= regions <= sites:
        raise ConfigError(
            f"--regions: expected 1 to {sites} (one site per region at least), got {regions}"
        )
    directory = directory.absolute()  # the configs and the README name absolute paths
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: exists and is not a directory; choose a new directory")
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"{directory}: exists and is not empty; choose a new directory")
    _check_writable(directory)
    if shape == "star":
        layout = {"root": [f"site-{i}" for i in range(sites)]}
    else:
        layout = {f"region-{r}": [] for r in range(regions)}
        for i in range(sites):
            layout[f"region-{i % regions}"].append(f"site-{i}")
    try:
        check_port_range()  # the environment's mistake, before the keys are written
    except OSError as exc:
        raise ConfigError(str(exc)) from None
    try:
        # The data set is loaded (each site's examples, for the roster) before anything is
        # written: a missing package leaves no half-written directory behind.
        fed = lay_out(
            directory,
            layout,
            star=shape == "star",
            seed=seed,
            plan=_dataset_plan("synthetic" if tables is not None else dataset),
            declare_examples=tables is None,  # a site's own table: its rows, not a share
        )
    except ModuleNotFoundError as exc:  # fedloom.cli names the extra, then this note
        exc.add_note("or choose `--dataset synthetic` (numpy only)")
        raise
    except ConfigError:
        raise
    except ValueError as exc:  # the data set cannot give every site its share
        raise ConfigError(f"--sites {sites}: {exc}") from None
    except OSError as exc:  # the directory cannot be written after all
        raise ConfigError(f"{directory}: cannot write the federation: {exc}") from None
    if tables is not None:
        try:
            _apply_plan_file(fed, tables)
        except ConfigError:  # a mistake in the plan file: leave no half-made federation
            for child in directory.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            raise
    readme = write_readme(fed)
    print(
        f"wrote a {shape} federation of {len(fed.nodes)} nodes to {directory}; "
        f"how to start it: {readme}"
    )
    return 0


def _check_writable(directory: Path) -> None:
    """Refuse, before anything is loaded or written, a directory that cannot be made:
    a file on its way, or a parent this user may not write."""
    parent = directory
    while not parent.exists():
        parent = parent.parent
    if parent != directory and not parent.is_dir():
        raise ConfigError(f"{directory}: cannot make it: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{directory}: cannot make it: {parent} is not writable by this user")


# The tables a ``--plan`` file may hold, and the roles whose configs each goes into.
PLAN_FILE_TABLES: dict[str, tuple[str, ...]] = {
    "plan": ("root", "region", "site"),
    "training": ("root", "region", "site"),
    "aggregation": ("root", "region"),
    "evaluation": ("root",),
    "governance": ("site",),
}


def _read_plan_file(path: Path) -> dict[str, dict[str, Any]]:
    """The consortium's plan file: a ``[plan]`` table (any kind, a site's own table's
    ``kind = "tabular"`` too) and optionally ``[training]``, ``[aggregation]``,
    ``[evaluation]`` and ``[governance]``, as a node config writes them."""
    # A pipe would block the read for good, a device (/dev/zero) never end it.
    if path.exists() and not path.is_dir() and not path.is_file():
        raise ConfigError(f"--plan {path}: not a regular file (a pipe or a device)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--plan {path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--plan {path}: cannot read: {exc}") from None
    unknown = sorted(set(raw) - set(PLAN_FILE_TABLES))
    if unknown:
        raise ConfigError(
            f"--plan {path}: unknown table or field {unknown[0]!r} (known: "
            f"{', '.join(PLAN_FILE_TABLES)})"
        )
    if not isinstance(raw.get("plan"), dict):
        raise ConfigError(f"--plan {path}: no [plan] table")
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise ConfigError(f"--plan {path}: {name} must be a table")
    return raw


def _apply_plan_file(fed: Federation, tables: dict[str, dict[str, Any]]) -> None:
    """Every node's config gets the plan file's tables (see ``PLAN_FILE_TABLES``); each
    config is then read as ``fedloom run`` will, so a mistake shows now."""
    from fedloom.runtime.config import load_config

    tabular = tables["plan"].get("kind") == "tabular"
    for node in fed.nodes.values():
        cfg = read_config(node.config)
        if tabular or "governance" in tables:  # the demo's "no approval" is not for these
            cfg.pop("governance", None)
        for name, roles in PLAN_FILE_TABLES.items():
            if name in tables and node.role in roles:
                cfg[name] = (
                    dict(tables[name]) if name == "plan" else {**cfg.get(name, {}), **tables[name]}
                )
        node.config.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    for node in fed.nodes.values():
        load_config(node.config)


def read_federation(directory: Path) -> Federation:
    """The federation ``init`` wrote into ``directory`` (from its configs)."""
    from fedloom.runtime.config import parse_config

    if not (directory / README_NAME).exists() or not (directory / "roster.toml").exists():
        raise ConfigError(f"{directory}: not a directory written by `fedloom local init`")
    nodes: dict[str, NodeFiles] = {}
    plan: dict[str, Any] = {}
    for path in sorted(directory.glob("*.toml")):
        if path.name == "roster.toml":
            continue
        try:
            cfg = read_config(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        node_id, role = cfg.get("node_id"), cfg.get("role")
        if not isinstance(node_id, str) or not isinstance(role, str):
            continue
        try:  # as its daemon will read it: a hand-made mistake shows now, in one line
            parse_config(cfg, base_dir=path.parent, check_files=True)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        listen = int(cfg.get("listen", {}).get("port", 0))
        metrics = int(cfg.get("metrics", {}).get("port", 0))
        nodes[node_id] = NodeFiles(
            node_id,
            role,
            path,
            Path(cfg.get("state_dir", directory / "state" / node_id)),
            directory / "logs" / f"{node_id}.log",
            listen,
            metrics,
        )
        if role == "root":
            plan = dict(cfg.get("plan", {}))
    if not nodes:
        raise ConfigError(f"{directory}: no node configs found")
    return Federation(
        directory, directory / "roster.toml", directory / "consortium.pub", plan, nodes
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _root_version(fed: Federation) -> int | None:
    """The root's model version from its ``/metrics`` (None while it does not answer)."""
    from fedloom.runtime.harness import sample, scrape

    root = next((n for n in fed.nodes.values() if n.role == "root"), None)
    if root is None or root.metrics_url is None:
        return None
    value = sample(scrape(root.metrics_url, timeout=0.5), "fedloom_model_version")
    return int(value) if value is not None else None


def _last_words(log: Path) -> str:
    """What a daemon said last (a JSON log line's message): why it exited, in most cases."""
    from fedloom.runtime.chaos.faults import last_log_line

    line = last_log_line(log, limit=8192)  # whole: a cut JSON line does not parse
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    msg = record.get("msg") if isinstance(record, dict) else None
    return (str(msg) if msg else line or "(its log is empty)")[:300]


def cmd_local_up(
    directory: Path, *, until_version: int | None = None, timeout_s: float | None = None
) -> int:
    """Start every daemon of ``directory``; stop them all on Ctrl-C / SIGTERM (exit 0), or
    report the first that exits by itself (exit 1). ``until_version``: stop them all once
    the root's model reaches that version (exit 0), or after ``timeout_s`` (exit 1)."""
    if until_version is not None and until_version < 1:
        raise ConfigError(f"--until-version: expected at least 1, got {until_version}")
    if timeout_s is not None and until_version is None:
        raise ConfigError("--timeout goes with --until-version")
    if timeout_s is not None and not timeout_s > 0:
        raise ConfigError(f"--timeout: expected seconds > 0, got {timeout_s:g}")
    # Absolute: the daemons run in another directory (``runtime.harness``), and their
    # configs' paths come from here.
    fed = read_federation(directory.absolute())
    cluster = Cluster(fed)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        cluster.start()
        for node in fed.nodes.values():
            where = f" metrics {node.metrics_url}/metrics" if node.metrics_url else ""
            pid = cluster[node.node_id].pid
            print(f"  {node.node_id:<12} pid {pid}  log {node.log}{where}", flush=True)
        if until_version is None:
            print("running; Ctrl-C stops every daemon", flush=True)
        else:
            print(f"running until the root's model reaches version {until_version}", flush=True)
        started = time.monotonic()
        while True:
            if until_version is not None:
                version = _root_version(fed)
                if version is not None and version >= until_version:
                    print(f"the root's model reached version {version}", flush=True)
                    return 0
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                print(
                    f"fedloom local up: the root's model did not reach version {until_version} "
                    f"in {timeout_s:g} s; see {directory}/logs",
                    file=sys.stderr,
                )
                return 1
            dead = cluster.dead()
            if dead:
                first, others = dead[0], [f"{n} ({cluster[n].returncode})" for n in dead[1:]]
                also = f"; also exited: {', '.join(others)}" if others else ""
                print(
                    f"fedloom local up: {first} exited with status {cluster[first].returncode}: "
                    f"{_last_words(fed.nodes[first].log)}{also}; see {directory}/logs",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C or SIGTERM must not cut the stop short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            codes = cluster.stop()
            print(f"stopped {len(codes)} daemons", flush=True)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
