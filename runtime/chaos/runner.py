"""``fedloom chaos SCENARIO.toml``: play a scenario's faults on a federation of real daemons.

The run (its directory is the contract ``runtime.chaos.checker`` reads, see ``write_run_json``):

1. lay the federation out in ``OUT/federation`` (``runtime.chaos.layout``); put one fault-proxy
   link (``runtime.chaos.proxy``) in front of every child -> parent connection and point the
   child's ``[parent] url`` at it; mount a tmpfs on the state directory of every node a disk
   fault targets (root only; otherwise those faults are skipped, with the reason);
2. start every daemon (``runtime.harness.Cluster``: own process group, PDEATHSIG), scrape each
   one's ``/metrics`` and ``/healthz`` every ``sample_interval_s`` into ``samples.jsonl``;
3. play the timeline into ``timeline.jsonl`` (deliberate kills and pauses logged before they
   happen), noting every daemon that exits by itself;
4. at ``duration_s``: SIGTERM everything (SIGKILL after the grace period), lift the disk faults
   and unmount, close the proxies, rewrite ``run.json``, then run the checker and exit with its
   status.

Every step of the teardown runs whatever happened before (``finally``), and a run ends by
itself within ``duration_s`` plus the stop grace, the checker's time aside.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import heapq
import importlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.chaos.faults import (
    Disks,
    InputFlood,
    NothingToCorruptError,
    Processes,
    corrupt_state,
    last_log_line,
    tmpfs_support,
    wal_frames,
)
from fedloom.runtime.chaos.layout import add_standbys, lay_out, lay_out_gossip, point_link
from fedloom.runtime.chaos.loadgen import attach_loadgen, use_loadgen
from fedloom.runtime.chaos.proxy import FaultNetwork, Toxics
from fedloom.runtime.chaos.record import JsonLines, Timeline, probe_healthz, scrape_metrics
from fedloom.runtime.chaos.scenario import ROOT_ID, Fault, Scenario, load_scenario
from fedloom.runtime.federation_files import Federation, NodeFiles, check_port_range
from fedloom.runtime.harness import Cluster

__all__ = [
    "BACKENDS",
    "ChaosError",
    "ChaosRun",
    "cmd_chaos",
    "combine_toxics",
    "execute",
    "run_checker",
]

BACKENDS = ("auto", "proxy", "netem")
PROGRESS_EVERY_S = 10.0
READY_TIMEOUT_S = 120.0  # every daemon answers /healthz ok before the timeline starts
# corrupt: whole frames the live log must hold first, how long to wait for them, how often
# to crash and restart the node when a checkpoint empties its log first.
CORRUPT_NEEDS_FRAMES = {"wal_middle": 2, "wal_end": 1, "wal_torn": 1}
CORRUPT_WAIT_S = 15.0
CORRUPT_ATTEMPTS = 3
TICK_S = 0.1
LOCK_FILE = "chaos.lock"
T = TypeVar("T")


class ChaosError(RuntimeError):
    """The run could not be set up (a mount, a port): one line for the user."""


def _say(text: str) -> None:
    print(f"chaos: {text}", file=sys.stderr, flush=True)


def _show(targets: Iterable[str], most: int = 6) -> str:
    """Targets for a progress line: a hundred load sites' links as a count."""
    items = list(targets)
    if len(items) <= most:
        return ", ".join(items)
    return f"{', '.join(items[:3])} and {len(items) - 3} more"


# ============================================================================== network


class ProxyThread:
    """The fault proxy's event loop on a thread of its own; calls block until done."""

    def __init__(self, seed: int) -> None:
        self.net = FaultNetwork(seed=seed)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="chaos-proxy", daemon=True
        )
        self.thread.start()
        self._closed = False

    def _await(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return fn()

        return self._await(wrapped())

    def add_link(self, name: str, upstream: tuple[str, int]) -> int:
        return self._await(self.net.add_link(name, upstream))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._await(self.net.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            if not self.thread.is_alive():
                self.loop.close()


def combine_toxics(faults: Iterable[Fault], direction: str) -> Toxics:
    """One direction's toxics from every network fault standing on a link (the worst of
    each: longest latency, narrowest rate, highest loss...)."""
    chosen = [f for f in faults if f.direction in ("both", direction)]
    latency = max(
        (f.params.get("latency_ms", 0.0) for f in chosen if f.kind == "latency"), default=0.0
    )
    jitter = max((f.params.get("jitter_ms", 0.0) for f in chosen), default=0.0)
    rates = [f.params["rate_kbps"] for f in chosen if f.kind == "bandwidth"]
    loss = max((f.params["loss"] for f in chosen if f.kind == "loss"), default=0.0)
    reorders = [f for f in chosen if f.kind == "reorder"]
    resets = [int(f.params["reset_after_bytes"]) for f in chosen if f.kind == "reset"]
    return Toxics(
        latency_ms=latency,
        jitter_ms=jitter,
        rate_kbps=min(rates) if rates else 0.0,
        loss=loss,
        reorder=max((f.params["reorder"] for f in reorders), default=0.0),
        reorder_ms=max((f.params["latency_ms"] for f in reorders), default=10.0),
        reset_after_bytes=min(resets) if resets else None,
        blackhole=any(f.kind in ("blackhole", "partition") for f in chosen),
    )


# ================================================================================= run


@dataclass(order=True)
class _Due:
    t: float
    seq: int
    action: Callable[[], None] = field(compare=False)


class Sampler(threading.Thread):
    """Scrapes every daemon's ``/metrics`` and ``/healthz`` into ``samples.jsonl``."""

    def __init__(self, fed: Federation, out: JsonLines, timeline: Timeline, interval: float):
        super().__init__(name="chaos-sampler", daemon=True)
        self.fed = fed
        self.out = out
        self.timeline = timeline
        self.interval = interval
        self.latest: dict[str, dict[str, float]] = {}
        self._halt = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _one(self, node: str) -> None:
        url = self.fed.nodes[node].metrics_url
        if url is None:
            return
        timeout = max(0.2, min(1.0, self.interval * 0.8))
        health = probe_healthz(url, timeout)
        # Stamped when the answer (or its absence) is known: a kill logged while the probe
        # was on its way then comes before the "down" it caused, as it happened.
        t = self.timeline.now()
        metrics = scrape_metrics(url, timeout) if health != "down" else None
        if metrics:
            self.latest[node] = metrics
        self.out.write(
            {"t": round(t, 3), "node": node, "healthz": health, "metrics": metrics or {}}
        )

    def run(self) -> None:
        nxt = time.monotonic()
        while not self._halt.is_set():
            futures = [self._pool.submit(self._one, n) for n in self.fed.nodes]
            concurrent.futures.wait(futures)
            nxt += self.interval
            self._halt.wait(max(0.0, nxt - time.monotonic()))
            nxt = max(nxt, time.monotonic() - self.interval)

    def version(self, node: str) -> int | None:
        v = self.latest.get(node, {}).get("fedloom_model_version")
        return None if v is None else int(v)


class ChaosRun:
    """One scenario played once into ``out`` (see the module docstring)."""

    def __init__(
        self, scenario: Scenario, out: Path, *, backend: str = "auto", out_given: bool = True
    ) -> None:
        self.scen = scenario
        self.out = out
        # How a mistake names the run directory: the user's --out, or the default they
        # did not choose (and may not know about).
        self.out_label = (
            f"--out {out}"
            if out_given
            else f"run directory {out} (the default; --out names another)"
        )
        self.backend_asked = backend
        self.backend = "proxy"
        self.netem = "not probed"
        self.skipped: list[str] = []
        self.rng = random.Random(scenario.seed)
        self.fed: Federation | None = None
        self.proxy: ProxyThread | None = None
        self.disks = Disks()
        self.procs: Processes | None = None
        self.sampler: Sampler | None = None
        self.timeline: Timeline | None = None
        self.floods: dict[str, list[InputFlood]] = {}
        self.active_net: dict[str, list[Fault]] = {}
        self.link_ports: dict[str, int] = {}
        self.load_nodes: dict[str, NodeFiles] = {}  # sites the load generator runs
        self.started_unix = 0.0
        self.t0 = 0.0
        self.startup_s = 0.0  # daemons started -> all ready (before the timeline's t = 0)
        self.elapsed = 0.0
        self.interrupted = False  # Ctrl-C or SIGTERM before duration_s: a partial run
        self._taken_down: dict[str, list[str]] = {}  # fault -> nodes its end restarts
        self._lock: IO[str] | None = None  # OUT/chaos.lock, held while this run uses OUT
        self._queue: list[_Due] = []
        self._seq = itertools.count()

    # ------------------------------------------------------------------ set-up
    def choose_backend(self) -> None:
        from fedloom.runtime.chaos.netem import detect_netem

        support = detect_netem()
        self.netem = "available" if support.available else support.reason
        if self.backend_asked == "netem":
            why = "available, but" if support.available else f"{support.reason};"
            raise ConfigError(
                f"--backend netem: tc netem is {why} this version ships no netem backend; "
                "use --backend proxy"
            )
        if self.backend_asked == "auto":
            _say(f"network faults through the fault proxy (netem: {self.netem})")

    def _prepare_out(self) -> None:
        out = self.out
        try:
            if out.exists():
                if not out.is_dir():
                    raise ConfigError(f"{self.out_label}: exists and is not a directory")
                self._refuse_if_in_use()
                source = self.scen.source
                if source is not None and source.absolute().is_relative_to(out.absolute()):
                    # Replacing the directory would delete the scenario with it.
                    raise ConfigError(
                        f"{self.out_label}: holds the scenario file {source}; choose another"
                    )
                earlier = (out / "run.json").exists() or (out / LOCK_FILE).exists()
                if any(out.iterdir()) and not earlier:
                    raise ConfigError(
                        f"{self.out_label}: not empty and not an earlier chaos run; choose another"
                    )
                _unmount_under(out)
                shutil.rmtree(out)
            out.mkdir(parents=True)
            # Held until this process exits (not inherited by the daemons): another run
            # into the same directory must not wipe this one's federation under it.
            self._lock = (out / LOCK_FILE).open("a+", encoding="utf-8")
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._lock.write(f"{os.getpid()}\n")
            self._lock.flush()
        except OSError as exc:  # a file on the way, no permission, a read-only file system
            raise ConfigError(
                f"{self.out_label}: cannot make the run directory: {exc.strerror or exc}"
            ) from None

    def release(self) -> None:
        """Let another run have ``out`` (once this one's checker is done with it too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _refuse_if_in_use(self) -> None:
        """A ``ConfigError`` when another run holds ``out``'s lock (it is still running)."""
        try:
            fh = (self.out / LOCK_FILE).open("r", encoding="utf-8")
        except FileNotFoundError:
            return
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = fh.read().strip() or "?"
                raise ConfigError(
                    f"{self.out_label}: in use by another fedloom chaos run (pid {pid}); "
                    "wait for it to end or choose another"
                ) from None

    def _disk_faults_possible(self) -> bool:
        """Whether tmpfs disk faults can run; if not, they are skipped with the reason."""
        if not self.scen.disk_nodes():
            return True
        ok, why = tmpfs_support()
        if not ok:
            self.skipped += [
                f"{f.name}: {why}" for f in self.scen.faults if f.kind in ("disk_full", "read_only")
            ]
            _say(f"skipping disk_full and read_only faults: {why}")
        return ok

    def set_up(self) -> None:
        scen = self.scen
        try:
            check_port_range()  # the environment's mistake, before the run directory
        except OSError as exc:
            raise ConfigError(str(exc)) from None
        self._prepare_out()
        disks_ok = self._disk_faults_possible()
        shape = scen.shape
        try:
            fed = self._lay_out()
            self._check_configs(fed)
        except ConfigError:  # nothing ran yet: leave no half-made run directory behind
            shutil.rmtree(self.out, ignore_errors=True)
            raise
        except OSError as exc:  # a full disk, a quota
            shutil.rmtree(self.out, ignore_errors=True)
            raise ChaosError(f"cannot lay out the federation in {self.out}: {exc}") from None
        self.fed = fed
        self.proxy = ProxyThread(scen.seed)
        for link in shape.links:
            dialer, target = link.split("->")
            try:
                port = self.proxy.add_link(link, ("127.0.0.1", fed.nodes[target].listen_port))
            except OSError as exc:
                raise ChaosError(f"cannot open the fault proxy's link {link}: {exc}") from None
            self.link_ports[link] = port
            point_link(fed.nodes[dialer].config, target, f"ws://127.0.0.1:{port}/fedloom")
        if disks_ok:
            for node in scen.disk_nodes():
                try:
                    self.disks.prepare(node, fed.nodes[node].state_dir, scen.run.tmpfs_mb)
                except OSError as exc:
                    raise ChaosError(
                        f"cannot put {node}'s state directory on a tmpfs: {exc}"
                    ) from None
        if shape.load_sites:  # one process for them all, their links already proxied
            self.fed, self.load_nodes = attach_loadgen(fed, shape.load_sites, seed=scen.seed)

    def _lay_out(self) -> Federation:
        """The scenario's federation in ``OUT/federation`` (a mistake in its [federation]
        overrides is a ``ConfigError``)."""
        scen, shape = self.scen, self.scen.shape
        try:
            if shape.gossip:
                fed = lay_out_gossip(
                    self.out / "federation",
                    shape,
                    seed=scen.seed,
                    plan=shape.plan,
                    training=shape.training,
                    aggregation=shape.peer_aggregation,
                    connection=shape.connection,
                )
            else:
                fed = lay_out(
                    self.out / "federation",
                    shape.regions,
                    star=shape.kind == "star",
                    seed=scen.seed,
                    plan=shape.plan,
                    training=shape.training,
                    root_aggregation=shape.root_aggregation,
                    region_aggregation=shape.region_aggregation,
                    connection=shape.connection,
                )
                if shape.standbys:
                    assert shape.failover_after_s is not None
                    add_standbys(fed, shape.standbys, shape.failover_after_s)
        except ValueError as exc:  # the [federation] tables' overrides (plan, training...)
            # The workload names a plan field it refuses bare ("bogus: unknown ..."): name
            # it where the scenario wrote it.
            text, key = str(exc), str(exc).split(":", 1)[0]
            table = "federation.plan." if key in shape.plan else "federation: "
            raise ConfigError(f"{self._scenario_file()}: {table}{text}") from None
        return fed

    def _scenario_file(self) -> str:
        return str(self.scen.source) if self.scen.source is not None else self.scen.name

    def _check_configs(self, fed: Federation) -> None:
        """Read every node's config as its daemon will, before any starts: a mistake in the
        scenario's [federation] overrides is one error naming its field, not daemons that
        exit at start and a run that fails every check."""
        from fedloom.runtime.chaos.layout import read_config
        from fedloom.runtime.config import parse_config

        # Regions before the root: the root's config holds values derived from theirs
        # (regional_buffer_size), and the region's own field is the one the user wrote.
        first = {"site": 0, "peer": 0, "region": 1}
        for node in sorted(fed.nodes.values(), key=lambda n: first.get(n.role, 2)):
            try:
                parse_config(
                    read_config(node.config), base_dir=node.config.parent, check_files=True
                )
            except ConfigError as exc:
                field = _override_field(str(exc), node.role)
                raise ConfigError(
                    f"{self._scenario_file()}: {field} (in {node.node_id}'s config)"
                ) from None

    # ------------------------------------------------------------------ run.json
    def write_run_json(self, *, final: bool) -> None:
        assert self.fed is not None
        shape = self.scen.shape
        nodes: dict[str, Any] = {}
        for node_id, files in {**self.fed.nodes, **self.load_nodes}.items():
            rel = self.fed.workdir.relative_to(self.out)
            base = files.metrics_url
            nodes[node_id] = {
                "role": files.role,
                "parent": shape.parent(node_id),
                "standby_for": shape.standbys.get(node_id),
                "config": str(rel / files.config.name),
                "state_dir": None if files.role == "loadgen" else str(rel / "state" / node_id),
                "log": str(rel / "logs" / files.log.name),
                "metrics_url": f"{base}/metrics" if base else None,
                "healthz_url": f"{base}/healthz" if base else None,
            }
            if node_id in self.load_nodes:  # a site that runs inside the load generator
                nodes[node_id]["process"] = "loadgen"
        doc = {
            "scenario": self.scen.name,
            "scenario_file": str(self.scen.source) if self.scen.source else None,
            "started_unix": self.started_unix,
            "duration_s": round(self.elapsed if final else self.scen.duration_s, 3),
            "startup_s": self.startup_s,
            "resume_within_s": self.scen.resume_within_s,
            "nodes": nodes,
            "expect": dict(self.scen.expect),
            "backend": self.backend,
            "netem": self.netem,
            "links": dict(self.link_ports),
            "skipped": list(self.skipped),
            # The checker fails a run that did not finish: its faults may never have
            # healed, nor its pauses ended.
            "finished": final and not self.interrupted,
            "interrupted": self.interrupted,
        }
        tmp = self.out / "run.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.out / "run.json")

    # ------------------------------------------------------------------ timeline
    def _at(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, _Due(t, next(self._seq), action))

    def _schedule(self) -> None:
        for f in self.scen.faults:
            if any(s.startswith(f"{f.name}:") for s in self.skipped):
                continue
            self._at(f.at_s, functools.partial(self._guarded, self._start_fault, f))
            if f.end_s is not None:
                self._at(f.end_s, functools.partial(self._guarded, self._end_fault, f))

    def _guarded(self, step: Callable[[Fault], None], f: Fault) -> None:
        """A fault that cannot be injected (or lifted) is said and noted, not a crash of
        the run: the rest of the timeline still plays and everything is still cleaned up."""
        try:
            step(f)
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            what = "inject" if step == self._start_fault else "lift"
            self.skipped.append(f"{f.name}: could not {what} it: {exc}")
            _say(f"{f.name}: could not {what} it: {exc}")

    def _start_fault(self, f: Fault) -> None:
        assert self.procs is not None and self.timeline is not None and self.fed is not None
        tl, procs = self.timeline, self.procs
        where = f" for {f.for_s:g} s" if f.for_s is not None else ""
        _say(f"t={tl.now():.0f}s {f.kind} {_show(f.targets)}{where} ({f.name})")
        if f.kind == "heal":
            self._heal(f)
        elif f.is_network:
            for link in f.targets:
                self.active_net.setdefault(link, []).append(f)
            self._reapply(f.targets)
            detail = {"kind": f.kind, "direction": f.direction, **f.params}
            tl.event("fault_start", f.name, f.targets, detail)
        elif f.kind == "kill":
            self._note_taken_down(f, f.targets)
            procs.kill(f.targets, f.name)
        elif f.kind == "kill_all":
            self._note_taken_down(f, procs.nodes)
            procs.kill(procs.nodes, f.name)
        elif f.kind == "pause":
            procs.pause(f.targets, f.name)
        elif f.kind == "resume":
            procs.resume(f.targets, f.name)
        elif f.kind == "restart":
            if f.for_s is None:
                procs.restart(f.targets, f.name, graceful=f.graceful)
                return
            self._note_taken_down(f, f.targets)
            if f.graceful:
                procs.terminate(f.targets, f.name)
            else:
                procs.kill(f.targets, f.name)
        elif f.kind == "duplicate":
            detail = procs.duplicate(f.targets[0], f.name, same_state=f.same_state)
            tl.event("fault_start", f.name, f.targets, {"kind": f.kind, **detail})
        elif f.kind == "disk_full":
            for node in f.targets:
                detail = self.disks.fill(node)
                tl.event("fault_start", f.name, [node], {"kind": f.kind, **detail})
        elif f.kind == "read_only":
            for node in f.targets:
                detail = self.disks.set_read_only(node, True)
                tl.event("fault_start", f.name, [node], {"kind": f.kind, **detail})
        elif f.kind == "corrupt":
            self._corrupt(f)
        elif f.kind in ("garbage", "idle", "upgrade"):
            self._flood(f)
        else:  # pragma: no cover - the scenario reader refuses other kinds
            raise AssertionError(f.kind)

    def _note_taken_down(self, f: Fault, nodes: Iterable[str]) -> None:
        """The nodes ``f`` stops (those running): its end restarts these only, not one that
        another fault holds down or that exited by itself."""
        assert self.procs is not None
        self._taken_down[f.name] = [n for n in nodes if self.procs.cluster[n].alive]

    def _end_fault(self, f: Fault) -> None:
        assert self.procs is not None and self.timeline is not None
        tl, procs = self.timeline, self.procs
        _say(f"t={tl.now():.0f}s end of {f.kind} on {_show(f.targets)} ({f.name})")
        if f.is_network:
            ended = [link for link in f.targets if f in self.active_net.get(link, [])]
            for link in ended:
                self.active_net[link].remove(f)
            if ended:
                self._reapply(ended)
                tl.event("fault_end", f.name, ended, {"kind": f.kind})
        elif f.kind in ("kill", "restart", "kill_all"):
            for node in self._taken_down.pop(f.name, []):
                if not procs.cluster[node].alive:
                    procs.start(node, f.name)
        elif f.kind == "pause":
            procs.resume(f.targets, f.name)
        elif f.kind == "duplicate":
            for dup, rc in procs.stop_duplicates(f.name):
                tl.event(
                    "fault_end",
                    f.name,
                    [dup.node],
                    {"kind": f.kind, "returncode": rc, "exited_by_itself": False},
                )
        elif f.kind == "disk_full":
            for node in f.targets:
                self.disks.unfill(node)
            tl.event("fault_end", f.name, f.targets, {"kind": f.kind})
        elif f.kind == "read_only":
            for node in f.targets:
                self.disks.set_read_only(node, False)
            tl.event("fault_end", f.name, f.targets, {"kind": f.kind})
        elif f.kind in ("garbage", "idle", "upgrade"):
            self._end_flood(f)

    def _reapply(self, links: Iterable[str]) -> None:
        assert self.proxy is not None
        net = self.proxy.net
        for link in links:
            standing = self.active_net.get(link, [])
            up, down = combine_toxics(standing, "up"), combine_toxics(standing, "down")
            refuse = any(f.kind == "partition" and f.direction == "both" for f in standing)

            def apply(
                link: str = link, up: Toxics = up, down: Toxics = down, r: bool = refuse
            ) -> None:
                net.apply([link], "up", up)
                net.apply([link], "down", down)
                net.refuse([link], r)

            self.proxy.call(apply)

    def _heal(self, f: Fault) -> None:
        assert self.timeline is not None and self.proxy is not None
        ended: dict[str, list[str]] = {}
        for link in f.targets:
            for g in self.active_net.pop(link, []):
                ended.setdefault(g.name, []).append(link)
        for name, links in ended.items():
            self.timeline.event("fault_end", name, links, {"healed_by": f.name})
        net = self.proxy.net
        self.proxy.call(lambda: net.heal(list(f.targets)))
        self.timeline.event(
            "fault_end", f.name, f.targets, {"kind": "heal", "ended": sorted(ended)}
        )

    def _corrupt(self, f: Fault) -> None:
        assert self.procs is not None and self.timeline is not None and self.fed is not None
        node = f.targets[0]
        state_dir = self.fed.nodes[node].state_dir
        need = CORRUPT_NEEDS_FRAMES.get(f.where, 0)
        detail: dict[str, Any] = {"where": f.where}
        for attempt in range(1, CORRUPT_ATTEMPTS + 1):
            # A node checkpoints often and each checkpoint empties its log: wait until the
            # log holds the frames to damage, then crash it at once (a clean stop would
            # checkpoint and leave no log at all).
            deadline = time.monotonic() + CORRUPT_WAIT_S
            while wal_frames(state_dir) < need and time.monotonic() < deadline:
                time.sleep(0.02)
            self.procs.kill([node], f.name)
            try:
                detail = corrupt_state(state_dir, f.where, self.rng)
                break
            except NothingToCorruptError as exc:
                detail = {"where": f.where, "skipped": str(exc), "attempts": attempt}
                if attempt < CORRUPT_ATTEMPTS:  # a checkpoint came first: run it and retry
                    self.procs.start(node, f.name)
            except Exception:  # not damaged after all: the node must not stay down
                self.procs.start(node, f.name)
                raise
        if "skipped" in detail:
            _say(f"{f.name}: nothing corrupted: {detail['skipped']}")
        self.timeline.event("fault_start", f.name, [node], {"kind": f.kind, **detail})
        self.procs.start(node, f.name)

    def _flood(self, f: Fault) -> None:
        assert self.timeline is not None and self.fed is not None and f.for_s is not None
        floods = []
        for node in f.targets:
            flood = InputFlood(
                f.kind,
                self.fed.nodes[node].listen_port,
                connections=int(f.params["connections"]),
                size=int(f.params.get("bytes", 0)),
                duration_s=f.for_s,
                seed=self.rng.randrange(1 << 30),
            )
            flood.start()
            floods.append(flood)
        self.floods[f.name] = floods
        self.timeline.event("fault_start", f.name, f.targets, {"kind": f.kind, **f.params})

    def _end_flood(self, f: Fault) -> None:
        assert self.timeline is not None
        floods = self.floods.pop(f.name, [])
        for flood in floods:
            flood.stop()
        stats: dict[str, int] = {}
        for flood in floods:
            flood.join(timeout=5)
            for k, v in flood.stats.items():
                stats[k] = stats.get(k, 0) + v
        self.timeline.event("fault_end", f.name, f.targets, {"kind": f.kind, **stats})

    # ------------------------------------------------------------------ main loop
    def play(self) -> None:
        assert self.fed is not None
        scen = self.scen
        started = time.monotonic()
        self.timeline = Timeline(self.out / "timeline.jsonl", started)
        evaluate = ["--eval-interval", f"{scen.run.eval_interval_s:g}"]
        evaluators = [n for n, f in self.fed.nodes.items() if f.role in ("root", "peer")]
        cluster = Cluster(self.fed, args=dict.fromkeys(evaluators, evaluate))
        use_loadgen(cluster)
        self.procs = Processes(
            cluster,
            self.timeline,
            stop_grace_s=scen.run.stop_grace_s,
            restart_exited_after_s=scen.run.restart_exited_after_s,
            say=_say,
        )
        self.write_run_json(final=False)
        self.procs.start_all()
        ready = self._wait_ready(READY_TIMEOUT_S)
        # The timeline starts once the federation is up: start-up time depends on the
        # machine's load, and a fault at 10 s means 10 s into a running federation.
        self.started_unix = time.time()
        self.t0 = self.timeline.t0 = time.monotonic()
        self.startup_s = round(self.t0 - started, 3)
        self.procs.log_started(ready)
        _say(
            f"{len(self.fed.nodes)} daemons up after {self.startup_s:.1f} s ({scen.shape.kind}), "
            f"{len(scen.faults)} faults over {scen.duration_s:g} s; run directory {self.out}"
        )
        self.sampler = Sampler(
            self.fed,
            JsonLines(self.out / "samples.jsonl"),
            self.timeline,
            scen.run.sample_interval_s,
        )
        self.sampler.start()
        self._schedule()
        next_progress = PROGRESS_EVERY_S
        while True:
            now = self.timeline.now()
            if now >= scen.duration_s:
                break
            while self._queue and self._queue[0].t <= now:
                heapq.heappop(self._queue).action()
            self.procs.watch(now)
            for dup, rc in self.procs.finished_duplicates():
                self.timeline.event(
                    "fault_end",
                    dup.fault,
                    [dup.node],
                    {
                        "kind": "duplicate",
                        "returncode": rc,
                        "exited_by_itself": True,
                        "last_log_line": last_log_line(dup.proc.files.log),
                    },
                )
                _say(f"the duplicate of {dup.node} exited by itself (status {rc})")
            if now >= next_progress:
                next_progress += PROGRESS_EVERY_S
                self._progress(now)
            wait = TICK_S if not self._queue else min(TICK_S, self._queue[0].t - now)
            time.sleep(max(0.0, min(wait, scen.duration_s - now)))

    def _wait_ready(self, timeout: float) -> dict[str, float | None]:
        """Seconds until each daemon's ``/healthz`` said ok (None: it did not, or exited)."""
        assert self.fed is not None and self.procs is not None
        t0 = time.monotonic()
        ready: dict[str, float | None] = dict.fromkeys(self.fed.nodes)
        waiting = {n for n, f in self.fed.nodes.items() if f.metrics_url}
        while waiting and time.monotonic() - t0 < timeout:
            for node in sorted(waiting):
                files = self.fed.nodes[node]
                if not self.procs.cluster[node].alive:
                    waiting.discard(node)  # the timeline's watch logs the exit
                elif files.metrics_url and probe_healthz(files.metrics_url, 0.5) == "ok":
                    ready[node] = round(time.monotonic() - t0, 3)
                    waiting.discard(node)
            if waiting:
                time.sleep(0.25)
        if waiting:
            _say(f"not ready after {timeout:g} s: {', '.join(sorted(waiting))}; playing anyway")
        return ready

    def _progress(self, now: float) -> None:
        assert self.sampler is not None and self.procs is not None and self.fed is not None
        parts = []
        if self.scen.shape.gossip:  # a peer's version is the step of the model it evaluated
            for node in self.scen.shape.peers:
                m = self.sampler.latest.get(node, {})
                step, acc = m.get("fedloom_eval_model_version"), m.get("fedloom_eval_accuracy")
                shown = "?" if step is None else f"{int(step)}"
                parts.append(f"{node} step {shown}" + (f" acc {acc:.2f}" if acc else ""))
        else:
            v = self.sampler.version(ROOT_ID)
            parts.append(f"root v{'?' if v is None else v}")
        for node in self.scen.shape.region_ids:
            fwd = self.sampler.latest.get(node, {}).get("fedloom_region_forwards_total")
            parts.append(f"{node} {'?' if fwd is None else int(fwd)} forwards")
        down = sorted(self.procs.down | self.procs.paused)
        extra = f"; down: {', '.join(down)}" if down else ""
        _say(f"t={now:.0f}s {', '.join(parts)}{extra}")

    def tear_down(self) -> list[str]:
        """Stop everything this run started; returns problems met (each also said)."""
        problems: list[str] = []
        for name in list(self.floods):
            for flood in self.floods.pop(name):
                flood.stop()
                flood.join(timeout=5)
        if self.sampler is not None:  # before the stop: no samples of daemons stopped on purpose
            self.sampler.stop()
            self.sampler.out.close()
        if self.procs is not None:
            with contextlib.suppress(Exception):
                self.procs.watch(self.timeline.now() if self.timeline else 0.0)
            codes = self.procs.shutdown()
            unclean = {k: v for k, v in codes.items() if v not in (0, None)}
            if unclean:
                _say(f"exit codes at the end: {unclean}")
        problems += self.disks.restore()
        if self.proxy is not None:
            try:
                self.proxy.close()
            except Exception as exc:  # the run's results matter more than a proxy's close
                problems.append(f"closing the fault proxy: {exc!r}")
        if self.timeline is not None:
            self.elapsed = self.timeline.now()
            self.timeline.close()
        for p in problems:
            _say(p)
        return problems


# A node config's table -> the scenario's [federation] table that fills it (by role).
_OVERRIDES = {"plan": "plan", "training": "training", "connection": "connection"}
_AGGREGATION = {
    "root": "root_aggregation",
    "region": "region_aggregation",
    "peer": "peer_aggregation",
}


def _override_field(message: str, role: str) -> str:
    """``training.lr: ...`` (a daemon config's field) as ``federation.training.lr: ...``."""
    table = message.split(":", 1)[0].split(".", 1)[0].split("[", 1)[0]
    scenario_table = _OVERRIDES.get(table)
    if table == "aggregation":
        scenario_table = _AGGREGATION.get(role)
    return f"federation.{scenario_table}{message[len(table) :]}" if scenario_table else message


def _unmount_under(path: Path) -> None:
    """Unmount what an earlier, interrupted run left mounted under ``path``."""
    target = str(path.resolve())
    try:
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            points = [ln.split()[1] for ln in fh if len(ln.split()) > 1]
    except OSError:
        return
    for point in sorted(points, reverse=True):
        if point.startswith(target + "/"):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_checker(out: Path) -> int:
    """The checker's verdict on ``out`` as an exit status (0 when it is not installed)."""
    try:
        checker = importlib.import_module("fedloom.runtime.chaos.checker")
    except ImportError as exc:
        _say(f"no checker ({exc}); the run directory is {out}")
        return 0
    result: Any = checker.check_run(out)
    if isinstance(result, int):
        return result
    status = getattr(result, "exit_status", None)
    if isinstance(status, int):
        return status
    ok = getattr(result, "ok", None)
    return 0 if ok is True or ok is None else 1


def execute(run: ChaosRun) -> bool:
    """Set up, play and tear down ``run`` (the teardown whatever happens); True when it was
    interrupted (Ctrl-C or SIGTERM), False when it ran its full duration."""
    main = threading.current_thread() is threading.main_thread()
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    interrupted = False
    try:
        try:
            run.set_up()
            run.play()
        except KeyboardInterrupt:
            interrupted = run.interrupted = True
            _say("interrupted; stopping every daemon")
        finally:
            # A second Ctrl-C or SIGTERM while stopping must not leave daemons or mounts
            # behind (a paused daemon never resumed stays stopped for good: its PDEATHSIG
            # waits for a SIGCONT).
            previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
            if main:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                run.tear_down()
                if run.fed is not None:
                    run.write_run_json(final=True)
            finally:
                if previous_int is not None:
                    signal.signal(signal.SIGINT, previous_int)
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return interrupted


def cmd_chaos(scenario: Path, *, out: Path | None = None, backend: str = "auto") -> int:
    """Run a scenario (see the module docstring); the checker's exit status, 130 on Ctrl-C."""
    scen = load_scenario(scenario)
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    where = (out if out is not None else Path("runs") / "chaos" / scen.name).absolute()
    run = ChaosRun(scen, where, backend=backend, out_given=out is not None)
    run.choose_backend()
    try:
        if execute(run):
            return 130
        _say(f"run finished after {run.elapsed:.1f} s; checking {run.out}")
        return run_checker(run.out)
    except ChaosError as exc:
        print(f"fedloom chaos: {exc}", file=sys.stderr)
        return 1
    finally:
        run.release()
