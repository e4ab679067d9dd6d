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

Its parts: ``runtime.federation_files`` writes the federation, ``runtime.harness`` runs the
daemons (own sessions, SIGTERM then SIGKILL, ``PR_SET_PDEATHSIG``), ``runtime.baselines``
trains what the federation is compared with and ``runtime.demo_report`` prints the table.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedloom.runtime.baselines import baselines
from fedloom.runtime.demo_report import print_report
from fedloom.runtime.federation_files import (
    DEMO_PLAN,
    DEMO_START_QUORUM,
    ROOT_ID,
    Federation,
    write_federation,
)
from fedloom.runtime.harness import Cluster, sample, sample_sum, scrape

__all__ = ["DemoError", "cmd_demo"]


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
    fed = write_federation(workdir, seed=seed, start_quorum=DEMO_START_QUORUM)
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
    print_report(console, version, final, central, local, progress.site_updates)
    console.print(f"total wall time {time.monotonic() - t0:.1f} s")
    return 0 if not unclean and version >= 1 else 1


def _stop_quietly(cluster: Cluster) -> dict[str, int | None]:
    """Stop every daemon; a second Ctrl-C while stopping does not leave any behind."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return cluster.stop()
    finally:
        signal.signal(signal.SIGINT, previous)
