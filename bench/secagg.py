"""Secure flush against plain flush on real daemons: 1M parameters, 10 and 50 sites (issue 12).

For every cell (N sites, dropout fraction p, d = round(p * N) dropouts per flush) the bench
runs two federations on loopback, one after the other IN THE SAME RUN: PLAIN (FedBuff,
buffer K = N - d, the updates a secure flush of N members with d dropouts sums) and SECURE
(the same root with ``[secure_aggregation]``: cohorts of N, t = max(5, N // 2 + 1)).

Processes (all started here, all stopped here by PID):

* the root: ``runtime.daemon.open_daemon`` + ``serve``, the code ``fedloom run`` runs (its
  config, identity and signed roster, its durable ``StateStore``: WAL + fsync before every
  ack, checkpoints; ``NetworkPeers``: WebSocket, handshake, encrypted records, end-to-end
  signatures), FedBuff with ``concurrency = N``, ``weighting = "uniform"``, evaluation off.
  The bench wraps the node's ``handle`` to read the times of its own effects (the
  ``model_version`` metric of each release, the cohort seals) without changing them, and
  reads the root's per-link byte counters (the ones ``fedloom_bytes_total`` sums) every
  20 ms;
* the sites: N site daemons in up to ``--site-procs`` (10) processes (``open_daemon`` +
  ``serve`` each, as ``runtime.chaos.loadgen`` runs them: each site its own state
  directory, outbox, ``SiteNode``, ``SecAggMember`` and encrypted connection); this
  machine has 2 cores and 50 site processes do not fit it. The trainer is loadgen's
  ``FixedDeltaTrainer`` (the model plus a fixed seeded delta, no training) behind a gate:
  a site starts a job only while fewer than ``--depth`` (2) updates it sent (``Update``
  or ``SecAggJoin``) await their ``Ack``. The root gives a site its next task as soon as
  the site answers the last one (a plain ``Update``, or a secure ``SecAggJoin``: the
  join answers the task), so with depth 2 a site trains its next update while its last
  one is being aggregated (secure: while its cohort masks, signs views and unmasks:
  the cohorts are pipelined, at most two open per site), as a real site does; depth 1
  (``--depth 1``, the bench before pipelining) holds the next job until the ack, so each
  secure flush also waited for the next updates' training and pre-masking. Plain and
  secure run with the same gate. Without the gate, zero-time training lets a secure site
  join again and again (each join answers its task and brings a 4 MB model for the
  next) and the bench would measure that flood, not the flush. Site-side work (masking,
  shares, decoding models) of all N sites shares this machine's cores, where real sites
  mask in parallel on their own machines: the secure cells are pessimistic.

Dropouts are real: a site that drops dies (its daemon stops, its connection closes, the
root sees it go down). SECURE: d members of each cohort (picked from a hash of the cohort
id, so every site process agrees and each site drops in turn) die on receiving the
cohort's ``SecAggSeal`` (sealed, before uploading: the costliest case, the coordinator
strips |U| x d pairwise masks); they restart (open_daemon again, as a supervisor restarts
a daemon) once the cohort's upload phase has closed (its ``SecAggView`` reached a
survivor) and join again with the update they never uploaded. PLAIN: a site dies on
receiving a ``TrainRequest`` with probability d / N (assigned, before training: about d
per flush) and restarts at once (its update never existed, so no flush waits for it).

Time per flush: the interval between consecutive releases (the root's ``model_version``
metric), median over ``--flushes`` flushes after ``--warmup``: what a version costs when
the sites always have an update ready, dropouts included. Also shown: the secure
cohort's latency from its seal to its release, and the CPU seconds per flush of the
root process and of the site processes together (from ``/proc``: what a flush costs
whatever else the machine runs). Bytes per site per flush: the root's bytes
received from / sent to its sites over the measured flushes, / N / flushes (what a site
sends / receives; models go down as fp32, masked vectors up as 4-byte field words).

A death is a crash: from the moment a site dies its node handles nothing more (its
daemon's shutdown takes a while under load; meanwhile a job finishing there would join
from a dead site), and each job carries the life of the daemon that issued it, so a job
an executor thread starts after its site died never takes the restarted daemon's gate
slot. (Both races once stalled the 50-site dropout cells: a restarted site held its slot
for an update that never came and each later cohort waited ``form_wait_s``.)

    .venv/bin/python bench/secagg.py [--quick] [--sites 10,50] [--dropouts 0,0.1,0.3]

Prints a table with the secure / plain ratio of every cell, and last
``secagg: 10 sites 10% dropout: secure flush X.XXs vs plain Y.YYs = R.RRx [goal <= 2.0]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import contextlib
import functools
import itertools
import logging
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402
import tomli_w  # noqa: E402
from _multiproc import model_weights, stop_processes  # noqa: E402

from fedloom.algorithms.protocol import (  # noqa: E402
    Effect,
    Event,
    Log,
    Metric,
    Received,
    TrainResult,
    Weights,
)

PARAMS = 1_000_000
PLAN_FACTORY = "bench.secagg:bench_plan"
GOAL = 2.0
GOAL_SITES, GOAL_DROPOUT = 10, 0.1
SAMPLE_S = 0.02
LIFE_KEY = "bench_life"  # a job's config: the life of the site daemon that issued it
UNACKED_FORGET_S = 120.0  # an update unacked this long was lost: the gate forgets it
log = logging.getLogger("fedloom.bench.secagg")


# ------------------------------------------------------------------ the plan


class BenchPlan:
    """A 1M-parameter fp32 model (one big matrix and small tensors). Sites never call
    ``train`` here (the site host's trainer answers); evaluation is off at the root."""

    def __init__(self, params: int = PARAMS) -> None:
        self.params = int(params)

    def init(self, seed: int) -> Weights:
        small = {"fc1.bias": 1000, "fc2.weight": 10_000, "fc2.bias": 10}
        return model_weights(self.params, 1000, small, 0.05)

    def train(self, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        return TrainResult({k: np.array(v, copy=True) for k, v in weights.items()}, 1, {})

    def evaluate(self, weights: Weights) -> dict[str, float]:
        return {"accuracy": math.nan, "loss": math.nan}


def bench_plan(params: int = PARAMS) -> BenchPlan:
    """``plan.factory`` of every node of the bench's federations."""
    return BenchPlan(params)


# ------------------------------------------------------------------ layout


def site_ids(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


def edit(path: Path, **changes: object) -> None:
    cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    cfg.update(changes)
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")


def lay_out(workdir: Path, n: int, d: int, secure: bool, params: int) -> dict[str, Any]:
    """A star federation (root + n sites) with the bench plan; returns the paths."""
    from fedloom.runtime.federation_files import ROOT_ID, write_federation

    sites = site_ids(n)
    fed = write_federation(
        workdir,
        {"region-a": sites},
        plan={"dataset": "synthetic", "model": "softmax"},
        declare_examples=False,
        root_aggregation={
            "algorithm": "fedbuff",
            "buffer_size": n if secure else n - d,
            "concurrency": n,
            "weighting": "uniform",
            "max_staleness": 1000,
            "task_timeout_s": 600.0,
            "regional_buffer_size": n,
        },
        connection={"down_after_s": 30.0},
    )
    plan = {"factory": PLAN_FACTORY, "args": {"params": params}}
    secagg = {
        "enabled": True,
        "min_cohort": 5,
        "cohort_size": n,
        "clip": 2.0,
        "max_dropout": d / n,  # the cell's dropout fraction: t <= N - d is checked
        "form_wait_s": 60.0,
        "upload_timeout_s": 120.0,
        "unmask_timeout_s": 120.0,
    }
    extra: dict[str, Any] = {"secure_aggregation": secagg} if secure else {}
    root = fed.nodes[ROOT_ID]
    edit(root.config, children=sites, plan=plan, **extra)
    url = f"ws://127.0.0.1:{root.listen_port}/fedloom"
    for s in sites:
        edit(fed.nodes[s].config, parent={"id": ROOT_ID, "url": url}, plan=plan, **extra)
    return {
        "root": str(root.config),
        "metrics_port": root.metrics_port,
        "sites": {s: str(fed.nodes[s].config) for s in sites},
        "logs": str(workdir / "logs"),
    }


def quiet_logs(path: Path) -> None:
    """Daemon log lines go to ``path``, not to the bench's output."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    top = logging.getLogger()
    top.handlers[:] = [handler]
    top.setLevel(logging.INFO)


def _new_loop() -> Any:
    from fedloom.runtime.daemon import _new_loop_factory

    return _new_loop_factory()


# ------------------------------------------------------------------ root process


def profiled(name: str, args: dict[str, Any], fn: Any) -> Any:
    """``fn()``, under cProfile when ``--profile DIR`` asked (stats in DIR/<name>.prof)."""
    if not args.get("profile"):
        return fn()
    import cProfile

    prof = cProfile.Profile()
    try:
        return prof.runcall(fn)
    finally:
        prof.dump_stats(str(Path(args["profile"]) / f"{name}.prof"))


def root_main(args: dict[str, Any], out: Any) -> None:
    quiet_logs(Path(args["layout"]["logs"]) / "root-bench.log")
    try:
        with asyncio.Runner(loop_factory=_new_loop()) as runner:
            out.put(profiled(args["tag"] + "-root", args, lambda: runner.run(root_host(args))))
    except BaseException as exc:  # the bench says why, then stops the others
        out.put({"error": f"root: {type(exc).__name__}: {exc}"})
        raise


async def root_host(args: dict[str, Any]) -> dict[str, Any]:
    import fedloom.runtime.serve as serve_mod
    from fedloom.runtime.config import load_config
    from fedloom.runtime.daemon import open_daemon, serve

    want = args["warmup"] + args["flushes"] + 1  # releases: intervals need one more
    captured: list[Any] = []
    build = serve_mod.build_peers

    def build_peers(d: Any) -> Any:
        peers = build(d)
        captured.append(peers)
        return peers

    serve_mod.build_peers = build_peers
    totals = [0, 0]  # bytes received, sent by the root (every link, summed)
    seen: dict[int, tuple[int, int]] = {}
    # (time, version, bytes in, bytes out, CPU s of the root, CPU s of the site processes)
    releases: list[tuple[float, int, int, int, float, float]] = []
    site_pids: list[int] = []
    sealed: dict[str, float] = {}
    latency: list[float] = []
    unmasked: list[str] = []
    done = asyncio.Event()

    def sample() -> None:
        if not captured:
            return
        peers = captured[0]
        current: dict[int, tuple[int, int]] = {}
        for peer in peers.connected():
            conn = peers.table.get(peer)
            if conn is None:
                continue
            p = conn.pipe.progress
            last_in, last_out = seen.get(id(p), (0, 0))
            totals[0] += max(0, p.bytes_in - last_in)
            totals[1] += max(0, p.bytes_out - last_out)
            current[id(p)] = (p.bytes_in, p.bytes_out)
        seen.clear()
        seen.update(current)

    cfg = load_config(Path(args["layout"]["root"]))
    d = open_daemon(cfg)
    node = d.node
    handle = node.handle

    from fedloom.transport.wire import MaskedUpdate, SecAggJoin, SecAggShares, SecAggViewSig

    marks: dict[str, list[float]] = {}  # what the root received last, by kind (one flush)
    phases: list[dict[str, float]] = []

    def timed(event: Event, now: float) -> list[Effect]:
        if type(event) is Received:
            kind = type(event.msg)
            if kind in (SecAggJoin, MaskedUpdate, SecAggViewSig, SecAggShares):
                marks.setdefault(kind.__name__, []).append(time.perf_counter())
        effects: list[Effect] = handle(event, now)
        for e in effects:
            if type(e) is Metric and e.name == "model_version":
                sample()
                t = time.perf_counter()
                if not site_pids:
                    site_pids.extend(read_pids(Path(args["pids"])))
                cpu = (time.process_time(), sum(map(proc_cpu, site_pids)))
                releases.append((t, int(e.value), totals[0], totals[1], *cpu))
                if unmasked:
                    cid = unmasked.pop(0)
                    if cid in sealed:
                        seal = sealed.pop(cid)
                        latency.append(t - seal)
                        phases.append(phase_times(seal, t, marks))
                marks.clear()
                if len(releases) >= want:
                    done.set()
            elif type(e) is Log and e.fields:
                if e.text == "secure aggregation: cohort sealed":
                    sealed[str(e.fields["cohort"])] = time.perf_counter()
                elif e.text == "secure aggregation: cohort unmasked":
                    unmasked.append(str(e.fields["cohort"]))
        return effects

    node.handle = timed  # type: ignore[method-assign]
    shutdown = asyncio.Event()
    served = asyncio.create_task(
        serve(d, eval_interval_s=0.0, install_signals=False, shutdown=shutdown)
    )

    async def sampler() -> None:
        while True:
            sample()
            await asyncio.sleep(SAMPLE_S)

    sampling = asyncio.create_task(sampler())
    timed_out = False
    try:
        waiter = asyncio.create_task(done.wait())
        finished, _ = await asyncio.wait(
            [waiter, served], timeout=args["timeout"], return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        if served in finished:
            served.result()  # raises what stopped the daemon
            raise RuntimeError("the root daemon stopped by itself")
        timed_out = not finished
    finally:
        sampling.cancel()
        shutdown.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(served, 30)
        d.close()
    return {
        "releases": releases,
        "latency": latency,
        "phases": phases,
        "timed_out": timed_out,
        "stats": {
            k: getattr(node, k, None) for k in ("applied", "stale", "duplicates", "rejected")
        },
    }


def read_pids(path: Path) -> list[int]:
    """The site processes' PIDs, which ``measure`` writes once it started them."""
    try:
        return [int(x) for x in path.read_text(encoding="utf-8").split()]
    except (OSError, ValueError):
        return []


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) process ``pid`` has used so far, from
    ``/proc/PID/stat``; NaN where that cannot be read (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase_times(seal: float, release: float, marks: Mapping[str, list[float]]) -> dict[str, float]:
    """A secure flush's milestones as the root saw them, in seconds after the seal: the
    first and the last masked upload (members mask and upload), the last view signature
    (view round), the last share answer (unmask round) and the release (seeds rebuilt,
    masks stripped, sum decoded and applied)."""
    ups = [t for t in marks.get("MaskedUpdate", []) if t >= seal]
    sigs = [t for t in marks.get("SecAggViewSig", []) if t >= seal]
    shares = [t for t in marks.get("SecAggShares", []) if t >= seal]
    return {
        "first upload": min(ups, default=seal) - seal,
        "last upload": max(ups, default=seal) - seal,
        "last view sig": max(sigs, default=seal) - seal,
        "last shares": max(shares, default=seal) - seal,
        "release": release - seal,
    }


# ------------------------------------------------------------------ site host process


def doomed_members(cohort: bytes, members: Sequence[str], d: int) -> set[str]:
    """The d members of a cohort that die on its seal: the same in every site process
    (ordered by a hash of the cohort id and the member), so each site drops in turn."""
    import hashlib

    def rank(m: str) -> bytes:
        return hashlib.blake2b(cohort + m.encode(), digest_size=8).digest()

    return set(sorted(members, key=rank)[:d])


class Host:
    """Some of the sites' daemons in this process, with the bench's dropouts and gate."""

    def __init__(self, args: dict[str, Any], sites: Sequence[str]) -> None:
        import random

        self.args = args
        self.secure: bool = args["secure"]
        self.d: int = args["dropouts"]
        self.p: float = args["p"]
        self.flags = Path(args["flags"])
        every = args["layout"]["sites"]
        self.paths: dict[str, Path] = {s: Path(every[s]) for s in sites}
        self.daemons: dict[str, Any] = {}
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.shutdowns: dict[str, asyncio.Event] = {}
        self.cond = threading.Condition()
        self.stopping = False
        self.rng = {s: random.Random(f"{s}/{args['tag']}") for s in sites}
        self.dead: dict[str, bytes | None] = {}  # site -> cohort it died in (None: plain)
        self.restarts: set[asyncio.Task[Any]] = set()
        # Updates each site sent (plain Update or SecAggJoin) and has not had acked: the
        # gate. (SiteNode.pending does not count a secure update once uploaded.)
        self.unacked: dict[str, dict[int, float]] = {}
        self.reserved: dict[str, int] = {}  # jobs let through whose update is not sent yet
        self.lives: dict[str, int] = {}  # deaths per site: a job of an earlier life is let go
        self.executor = cf.ThreadPoolExecutor(2 * len(self.paths) + 2, thread_name_prefix="train")
        from fedloom.runtime.chaos.loadgen import FixedDeltaTrainer

        self.inner = FixedDeltaTrainer({}, scale=1e-3, seed=1)

    # -- the trainer gate (runs in the executor's threads)
    def train(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        # The life of the daemon that issued the job (stamped on its Train effect by
        # ``wrap``), not the site's life when an executor thread picks the job up: a job a
        # daemon issued just before it died can start after the death, and read then it
        # would pass for a job of the restarted daemon, take the slot its update holds in
        # the gate (``reserved``), and its update never comes (the dead daemon ignores it).
        life = int(config.get(LIFE_KEY, self.lives.get(node_id, 0)))
        with self.cond:
            # A job of a site that died meanwhile is let go (its driver is gone): else
            # it would hold one of the pool's threads until the site's next ack.
            while not (self.stopping or self._idle(node_id) or self.lives.get(node_id, 0) != life):
                self.cond.wait(0.05)  # woken by the site's acks; re-checked anyway
            if self.lives.get(node_id, 0) == life:
                # This job's update counts from now (two tasks can arrive together).
                self.reserved[node_id] = self.reserved.get(node_id, 0) + 1
        return self.inner(node_id, weights, {k: v for k, v in config.items() if k != LIFE_KEY})

    def _idle(self, site: str) -> bool:
        now = time.monotonic()
        sent = self.unacked.setdefault(site, {})
        for seq in [q for q, at in sent.items() if now - at > UNACKED_FORGET_S]:
            del sent[seq]  # lost (its cohort aborted): no ack will come
        return len(sent) + self.reserved.get(site, 0) < int(self.args["depth"])

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    # -- dropouts
    def wrap(self, site: str, node: Any) -> None:
        handle = node.handle
        born = self.lives.get(site, 0)  # this daemon's life: it ends when the site dies
        from fedloom.algorithms.protocol import Send, Train
        from fedloom.transport.wire import (
            Ack,
            SecAggJoin,
            SecAggSeal,
            SecAggView,
            TrainRequest,
            Update,
        )

        def wrapped(event: Event, now: float) -> list[Effect]:
            if self.lives.get(site, 0) != born:
                # Dead: a crash stops the node at once. Its daemon's shutdown takes a while
                # under load, and meanwhile the node must neither send (a job's update
                # finishing there would join from the dead site) nor take acks.
                return []
            if type(event) is Received:
                msg = event.msg
                if self.secure and type(msg) is SecAggSeal:
                    if site in doomed_members(msg.cohort, msg.members, self.d):
                        self.die(site, msg.cohort)
                        return []  # crashed holding the seal: nothing masked, nothing sent
                elif self.secure and type(msg) is SecAggView:
                    # The upload phase closed: the cohort's dead may come back.
                    (self.flags / msg.cohort.hex()).touch()
                elif (
                    not self.secure
                    and type(msg) is TrainRequest
                    and self.d
                    and self.rng[site].random() < self.p
                ):
                    self.die(site, None)
                    return []  # crashed on being assigned: no update exists
            effects: list[Effect] = [
                Train(e.job, e.weights, {**e.config, LIFE_KEY: born}) if type(e) is Train else e
                for e in handle(event, now)
            ]
            if type(event) is Received and type(event.msg) is Ack:
                with self.cond:
                    self.unacked.setdefault(site, {}).pop(event.msg.seq, None)
                    self.cond.notify_all()
            for e in effects:
                if type(e) is Send and isinstance(e.msg, Update | SecAggJoin):
                    seq = e.msg.seq
                    with self.cond:  # an update on its way: unacked until its Ack
                        sent = self.unacked.setdefault(site, {})
                        if seq not in sent:  # not a re-join: a job's update
                            sent[seq] = time.monotonic()
                            self.reserved[site] = max(0, self.reserved.get(site, 0) - 1)
            return effects

        node.handle = wrapped

    def die(self, site: str, cohort: bytes | None) -> None:
        if site in self.dead:
            return
        self.dead[site] = cohort
        self.lives[site] = self.lives.get(site, 0) + 1
        self.reserved[site] = 0  # its jobs in training died with it
        self.wake()
        self.shutdowns[site].set()
        self._spawn_restart(site)

    async def _revival(self, cohort: bytes | None) -> None:
        """Plain: at once. Secure: once a survivor saw the cohort's view (a flag file
        written by whichever site process saw it)."""
        if cohort is None:
            return
        flag = self.flags / cohort.hex()
        deadline = time.monotonic() + 60.0
        while not flag.exists() and time.monotonic() < deadline and not self.stopping:
            await asyncio.sleep(0.01)

    def _spawn_restart(self, site: str) -> None:
        task = asyncio.get_running_loop().create_task(self.restart(site))
        self.restarts.add(task)
        task.add_done_callback(self.restarts.discard)

    async def restart(self, site: str) -> None:
        task = self.tasks[site]
        with contextlib.suppress(Exception):
            await task
        await self._revival(self.dead.get(site))
        with contextlib.suppress(Exception):
            self.daemons[site].close()
        if self.stopping:
            return
        await asyncio.to_thread(self.open, site)
        self.dead.pop(site, None)
        self.start(site)

    # -- daemons
    def open(self, site: str) -> None:
        from fedloom.runtime.config import load_config
        from fedloom.runtime.daemon import open_daemon

        d = open_daemon(load_config(self.paths[site]))
        self.wrap(site, d.node)
        self.daemons[site] = d

    def start(self, site: str) -> None:
        from fedloom.runtime.daemon import serve

        shutdown = asyncio.Event()
        self.shutdowns[site] = shutdown
        coro = serve(
            self.daemons[site],
            install_signals=False,
            shutdown=shutdown,
            trainer=self.train,
            executor=self.executor,
        )
        task = asyncio.create_task(coro, name=f"site {site}")
        task.add_done_callback(functools.partial(self._ended, site))
        self.tasks[site] = task

    def _ended(self, site: str, task: asyncio.Task[Any]) -> None:
        """A site daemon that stops with an error says so in the site process's log."""
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: daemon ended", site, exc_info=task.exception())

    async def run(self, stop: asyncio.Event) -> None:
        for site in self.paths:
            self.open(site)
        for site in self.paths:
            self.start(site)
        await stop.wait()

    async def close(self) -> None:
        self.stopping = True
        self.wake()
        for ev in self.shutdowns.values():
            ev.set()
        for t in list(self.restarts):
            t.cancel()
        await asyncio.gather(*self.tasks.values(), *self.restarts, return_exceptions=True)
        for d in self.daemons.values():
            with contextlib.suppress(Exception):
                d.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def sites_main(args: dict[str, Any], k: int, sites: Sequence[str]) -> None:
    import signal

    quiet_logs(Path(args["layout"]["logs"]) / f"sites-{k}-bench.log")

    async def main() -> None:
        host = Host(args, sites)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await host.run(stop)
        finally:
            await host.close()

    with asyncio.Runner(loop_factory=_new_loop()) as runner:
        profiled(f"{args['tag']}-sites-{k}", args, lambda: runner.run(main()))


# ------------------------------------------------------------------ one measurement


def wait_result(out: Any, procs: Sequence[Any], limit: float) -> dict[str, Any]:
    """The root process's result; a process that died first, or ``limit``, ends the wait."""
    import queue

    deadline = time.monotonic() + limit
    while True:
        try:
            result: dict[str, Any] = out.get(timeout=1.0)
            return result
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                return {"error": f"a bench process exited with status {dead[0].exitcode}"}
            if time.monotonic() > deadline:
                return {"error": f"no result in {limit:.0f} s"}


def measure(n: int, p: float, secure: bool, a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    d = round(p * n)
    layout = lay_out(workdir, n, d, secure, a.params)
    flags = workdir / "flags"
    flags.mkdir()
    args = {
        "layout": layout,
        "secure": secure,
        "dropouts": d,
        "warmup": a.warmup,
        "flushes": a.flushes,
        "timeout": a.timeout,
        "depth": a.depth,
        "p": p,
        "flags": str(flags),
        "pids": str(workdir / "site-pids"),
        "profile": a.profile,
        "tag": f"{n}-{d}-{'secure' if secure else 'plain'}",
    }
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    procs = [ctx.Process(target=root_main, args=(args, out), daemon=True)]
    sites = site_ids(n)
    groups = max(1, min(a.site_procs, n))
    for k in range(groups):
        part = sites[k::groups]
        procs.append(ctx.Process(target=sites_main, args=(args, k, part), daemon=True))
    try:
        for proc in procs:
            proc.start()
        (workdir / "site-pids").write_text(" ".join(str(p.pid) for p in procs[1:]))
        result = wait_result(out, procs, a.timeout + 120)
    finally:
        stop_processes(procs)
    if "error" in result:
        raise SystemExit(f"secagg bench: {result['error']} (logs in {layout['logs']})")
    rel = result["releases"]
    if result["timed_out"] or len(rel) < a.warmup + 2:
        got = len(rel)
        raise SystemExit(
            f"secagg bench: {n} sites, {d} dropouts, {'secure' if secure else 'plain'}: only "
            f"{got} releases in {a.timeout:.0f} s (logs in {layout['logs']})"
        )
    window = rel[a.warmup :]
    intervals = [b[0] - a_[0] for a_, b in itertools.pairwise(window)]
    flushes = len(intervals)
    bytes_in = window[-1][2] - window[0][2]
    bytes_out = window[-1][3] - window[0][3]
    lat = result["latency"][a.warmup :] or result["latency"]
    return {
        "n": n,
        "d": d,
        "secure": secure,
        "interval": statistics.median(intervals),
        "intervals": intervals,
        "latency": statistics.median(lat) if lat else math.nan,
        "phases": {
            k: statistics.median(ph[k] for ph in result["phases"][a.warmup :])
            for k in (result["phases"][0] if result["phases"][a.warmup :] else {})
        },
        "up": bytes_in / n / flushes,
        "down": bytes_out / n / flushes,
        # CPU seconds per flush: the root process, and all site processes together.
        "cpu_root": (window[-1][4] - window[0][4]) / flushes,
        "cpu_sites": (window[-1][5] - window[0][5]) / flushes,
    }


# ------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 sites, 0 and 10%%, 3 flushes")
    parser.add_argument("--sites", default="10,50")
    parser.add_argument("--dropouts", default="0,0.1,0.3")
    parser.add_argument("--params", type=int, default=PARAMS)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--flushes", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="per run, seconds")
    parser.add_argument(
        "--site-procs", type=int, default=10, help="processes the sites run in (at most N)"
    )
    parser.add_argument(
        "--depth", type=int, default=2, help="unacked updates per site (the gate; both modes)"
    )
    parser.add_argument("--only", choices=("plain", "secure"), default=None, help="one mode")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs' files here")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile stats into DIR")
    a = parser.parse_args(argv)
    if argv is None:  # a script: SIGTERM (and SIGINT, even where a shell ignores it) stop
        import signal  # the run through its finally blocks, which stop every process

        def interrupt(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
    if a.quick:
        a.sites, a.dropouts, a.warmup, a.flushes = "10", "0,0.1", 1, 3
    cells = [
        (int(n), float(p)) for n in a.sites.split(",") for p in a.dropouts.split(",") if n and p
    ]
    load = os.getloadavg()
    print(
        f"secagg bench: FedBuff root daemon + site daemons on loopback, {a.params:,} "
        f"parameters ({4 * a.params / 1e6:.1f} MB fp32), {os.cpu_count()} CPUs, load average "
        f"{load[0]:.2f}; {a.warmup} warm-up + {a.flushes} measured flushes per run",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    keep = contextlib.nullcontext(str(a.workdir)) if a.workdir else None
    with keep or tempfile.TemporaryDirectory(prefix="fedloom-secagg-") as tmp:
        for n, p in cells:
            modes = (False, True) if a.only is None else (a.only == "secure",)
            for secure in modes:
                mode = "secure" if secure else "plain"
                started = time.perf_counter()
                try:
                    row = measure(n, p, secure, a, Path(tmp) / f"{n}-{p}-{mode}")
                except SystemExit as exc:  # one failed run: said, and the others still run
                    print(f"  {n} sites, {mode}: FAILED: {exc}", flush=True)
                    continue
                row["p"] = p
                rows.append(row)
                print(
                    f"  {n} sites, {row['d']} dropouts, {mode}: flush {row['interval']:.3f} s "
                    f"(runs: {', '.join(f'{x:.2f}' for x in row['intervals'])}; "
                    f"{time.perf_counter() - started:.0f} s); CPU per flush: root "
                    f"{1e3 * row['cpu_root']:.0f} ms, sites {1e3 * row['cpu_sites']:.0f} ms; "
                    f"load average {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
                if row["phases"]:
                    parts = ", ".join(f"{k} {v:.3f}" for k, v in row["phases"].items())
                    print(f"    secure flush, median s after the seal: {parts}")
    print_table(rows)
    return rows


def cpu_cell(row: Mapping[str, Any]) -> str:
    """CPU seconds per flush, root + all sites (what a flush costs whatever the load)."""
    return f"{row['cpu_root']:.2f} + {row['cpu_sites']:.2f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="time per flush (median release-to-release) and bytes per site per flush")
    for col in (
        "sites",
        "dropout",
        "K plain",
        "plain flush",
        "secure flush",
        "ratio",
        "seal->release",
        "plain up/down MB",
        "secure up/down MB",
        "CPU s/flush plain",
        "CPU s/flush secure",
    ):
        table.add_column(col, justify="right")
    by = {(r["n"], r["p"], r["secure"]): r for r in rows}
    for n, p in dict.fromkeys((r["n"], r["p"]) for r in rows):
        if (n, p, False) not in by or (n, p, True) not in by:
            continue  # --only: no ratio
        plain, sec = by[(n, p, False)], by[(n, p, True)]
        table.add_row(
            str(n),
            f"{p:.0%} ({sec['d']})",
            str(n - plain["d"]),
            f"{plain['interval']:.3f} s",
            f"{sec['interval']:.3f} s",
            f"{sec['interval'] / plain['interval']:.2f}x",
            f"{sec['latency']:.3f} s",
            f"{plain['up'] / 1e6:.2f} / {plain['down'] / 1e6:.2f}",
            f"{sec['up'] / 1e6:.2f} / {sec['down'] / 1e6:.2f}",
            cpu_cell(plain),
            cpu_cell(sec),
        )
    Console(width=210).print(table)
    # The figure: the goal's cell (10 sites, 10%), or the first cell measured in its place.
    pairs = [(n, p) for n, p, sec in by if sec and (n, p, False) in by]
    if not pairs:
        return
    n, p = (GOAL_SITES, GOAL_DROPOUT) if (GOAL_SITES, GOAL_DROPOUT) in pairs else pairs[0]
    s, q = by[(n, p, True)]["interval"], by[(n, p, False)]["interval"]
    print(
        f"secagg: {n} sites {p:.0%} dropout: secure flush {s:.2f}s vs plain {q:.2f}s = "
        f"{s / q:.2f}x [goal <= {GOAL}]"
    )


if __name__ == "__main__":
    main()
