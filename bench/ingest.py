"""An aggregator's sustained ingest rate under 100 concurrent sites (issue 4, item 3).

Two processes on loopback (127.0.0.1):

* the aggregator: ``FedBuffAggregator`` (``--buffer`` 10, concurrency 100, a 1M-parameter
  fp32 model) run by the runtime's ``AsyncDriver`` behind ``NetworkPeers`` (listening,
  roster members only), with its durable ``StateStore`` on as a daemon runs it (each update
  record, delta included, is in the fsynced write-ahead log before its ack; a checkpoint
  every 10 versions). The driver commits in groups: the records of the updates handled
  while one write is on its way to disk go into the next write (one frame, one fsync),
  and their acks wait for it; the store keeps a delta that came as fp16 as fp16 (decoded
  back bit for bit). ``--no-store`` turns it off to show what the disk costs;
* the load generator: 100 sites in one process, each its own ``NetworkPeers`` connection
  (WebSocket + handshake against the roster + encrypted records) and ``AsyncDriver``. The
  site node is a light stand-in for ``SiteNode``: it says ``Hello`` and answers every
  ``TrainRequest`` at once with an ``Update`` of a fixed delta, coded fp16 on the wire
  (``CodecSpec(kind="fp16")``), no training, no site store. Models go down as fp32 (the
  daemon's default ``codec.down``), one ``TrainRequest`` per task, as FedBuff does.
  The stand-in does no more than the harness needs (``StandInSigning``): the fixed delta
  is held as fp16 (its bytes go on the wire unconverted) and its digest (over that fp16,
  ``transport.e2e.update_digest_sent``, as a real site signs it) is computed once, so each
  update signs only its envelope ``{src, seq, base_version, recipient, n_examples,
  digest}``; a received model is decrypted and decoded but its root signature and digest
  are not checked (a real site's checks of the models it gets are not what this
  measures). The aggregator verifies every update in full: BLAKE3 over the fp16 its
  decoder kept (``transport.e2e.update_digest``), then the signature. Both processes
  ``gc.freeze()`` what start-up built and set the model's layout at start, as the daemons
  do (the aggregator checks each delta's layout before hashing it). None of this changes
  what the aggregator receives, checks or does per update.

The figure is the aggregator's applied counter (``update_applied`` metrics, counted in the
aggregator process) over the steady window: from ``--warmup`` seconds after the first
applied update to the end of ``--seconds``. Peak RSS is the aggregator's
``getrusage(RUSAGE_SELF).ru_maxrss``. Both processes share this machine's cores, so the
load generator's work (decoding 4 MB models, encoding deltas) competes with the aggregator's.

    .venv/bin/python bench/ingest.py [--sites 100] [--seconds 20] [--buffer 10] [--no-store]

Prints ``ingest: N updates/s (aggregator M ms CPU per applied update: C updates/s of one
CPU; load generator L ms)`` last: C = 1000 / M is the aggregator's single-core capacity,
what the figure measures when the machine is not otherwise busy. L is the load generator's
CPU per applied update over the same window (it publishes its CPU time to the aggregator
through shared memory every 50 ms); both processes share the CPUs, so two CPUs sustain at
most 2000 / (M + L) updates/s, a bound that, unlike the rate, holds on a busy machine too.
On a busy machine the rate can fall well below that while the aggregator uses under half a
CPU: each write's fsync then takes long (compare "durable writes" with the rate), and sites
wait for acks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import gc
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from queue import Empty
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from _multiproc import daemon_malloc, install_loop, model_weights, pki, stop_processes  # noqa: E402

from fedloom.algorithms.fedbuff import FedBuffAggregator  # noqa: E402
from fedloom.algorithms.protocol import Effect, Event, Metric, PeerUp, Received, Send, Weights  # noqa: E402
from fedloom.federation.store import StateStore  # noqa: E402
from fedloom.runtime.driver import AsyncDriver  # noqa: E402
from fedloom.runtime.network_peers import DialTarget, NetworkPeers  # noqa: E402
from fedloom.runtime.signing import EndToEnd  # noqa: E402
from fedloom.transport import half  # noqa: E402
from fedloom.transport.codec_policy import CodecPolicy  # noqa: E402
from fedloom.transport.e2e import sign_update, update_digest_sent  # noqa: E402
from fedloom.transport.identity import Identity  # noqa: E402
from fedloom.transport.limits import ModelLayout  # noqa: E402
from fedloom.transport.roster import Roster  # noqa: E402
from fedloom.transport.tensors import CodecSpec  # noqa: E402
from fedloom.transport.wire import Hello, Message, TrainRequest, Update  # noqa: E402


def site_ids(n: int) -> list[str]:
    return [f"site-{i:03d}" for i in range(n)]


def make_model(params: int) -> Weights:
    small = {"fc1.bias": 1000, "fc2.weight": 10_000, "fc2.bias": 10}
    return model_weights(params, 1000, small, 0.05)


def roles_of(seeds: Mapping[str, bytes]) -> dict[str, str]:
    return {n: "root" if n == "agg" else "site" for n in seeds}


class EchoSite:
    """Answers each TrainRequest at once with a fixed delta (a load generator's site)."""

    def __init__(self, site_id: str, delta: Weights) -> None:
        self._id = site_id
        self.delta = delta
        self.seq = 0

    @property
    def node_id(self) -> str:
        return self._id

    def next_deadline(self) -> float | None:
        return None

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            return [Send("agg", Hello(self._id, "site", 1000))]
        if isinstance(event, Received) and isinstance(event.msg, TrainRequest):
            req = event.msg
            self.seq += 1
            update = Update(self._id, self.seq, req.version, self.delta, 1000, task=req.task)
            return [Send("agg", update)]
        return []  # Acks, PeerDown: nothing to do


class StandInSigning(EndToEnd):
    """A stand-in site's signing: the fixed delta's digest is computed once (it is the
    same for every update), so sealing an update signs its envelope only; received models
    are not checked (the real site's checks are not part of what this bench measures)."""

    def __init__(
        self, identity: Identity, roster: Roster, delta: Weights, spec: CodecSpec, digest: bytes
    ) -> None:
        super().__init__(identity, roster)
        self._delta, self._spec, self._delta_digest = delta, spec, digest

    async def seal(self, msg: Message, peer: str, spec: CodecSpec) -> Message:
        if type(msg) is Update and msg.delta is self._delta and spec == self._spec:
            sig = sign_update(
                self.identity,
                msg.src,
                msg.seq,
                msg.base_version,
                peer,
                msg.n_examples,
                self._delta_digest,
            )
            return dataclasses.replace(msg, sig=sig)
        return await super().seal(msg, peer, spec)

    async def check(self, msg: Message, peer: str) -> None:
        if type(msg) is TrainRequest:
            return  # a light stand-in: the model is not used, so it is not verified
        await super().check(msg, peer)


# ------------------------------------------------------------------ aggregator process


# The main process gives up on the aggregator's result this long after --seconds (the
# first update may take up to 120 s); a child still running STACKS_AFTER_S after its
# --seconds prints every thread's stack first, so a run that never returns says where.
RESULT_GRACE_S = 240.0
START_TIMEOUT_S = 120.0
STACKS_AFTER_S = 200.0


def wait_for(queue: Any, timeout: float, procs: list[Any], what: str) -> Any:
    """The next item of ``queue``; a clear ``SystemExit`` (not ``queue.Empty`` after the
    whole time-out) when one of ``procs`` has ended first or nothing came in time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return queue.get(timeout=min(0.25, max(0.0, deadline - time.monotonic())))
        except Empty:
            pass
        for p in procs:
            if not p.is_alive():
                with contextlib.suppress(Empty):  # what it sent just before it ended
                    return queue.get(timeout=0.5)
                raise SystemExit(
                    f"ingest bench: the {p.name} process ended (exit code {p.exitcode}) "
                    f"before sending {what}; its error is above"
                )
        if time.monotonic() >= deadline:
            raise SystemExit(f"ingest bench: {what} did not come within {timeout:g} s")


def aggregator_main(args: dict[str, Any], urls: Any, out: Any, load_cpu: Any) -> None:
    faulthandler.dump_traceback_later(args["seconds"] + STACKS_AFTER_S)
    install_loop()
    out.put(asyncio.run(aggregator(args, urls, load_cpu)))


async def aggregator(args: dict[str, Any], urls: Any, load_cpu: Any) -> dict[str, Any]:
    ids, roster = pki(roles_of(args["seeds"]), args["seeds"])
    sites = site_ids(args["sites"])
    applied: list[float] = []
    versions = 0
    rejected = 0

    def sink(m: Metric) -> None:
        nonlocal versions, rejected
        if m.name == "update_applied":
            applied.append(time.perf_counter())
        elif m.name == "model_version":
            versions += 1
        elif m.name == "update_rejected":
            rejected += 1

    model = make_model(args["params"])
    node = FedBuffAggregator(
        "agg",
        {s: "site" for s in sites},
        model,
        buffer_size=args["buffer"],
        concurrency=len(sites),
        rng=0,
    )
    store = None
    if args["store"]:
        store = StateStore(Path(args["state"]) / "agg")
        store.load()
    peers = NetworkPeers(ids["agg"], roster, listen=("127.0.0.1", 0), accept_from=set(sites))
    peers.e2e.set_layout(ModelLayout.of(model))  # as the daemon does at start
    half.one_thread()  # as an aggregator daemon does at start (runtime.serve)
    driver = AsyncDriver(node, peers=peers, store=store, metrics=sink)
    gc.collect()  # as the daemon does once it has started
    gc.freeze()
    run = asyncio.ensure_future(driver.run())
    while peers.listen_url is None:
        await asyncio.sleep(0.01)
    urls.put(peers.listen_url)
    started = time.perf_counter()
    while not applied:
        if time.perf_counter() - started > 120:
            raise SystemExit("no update applied within 120 s")
        await asyncio.sleep(0.05)
    first = applied[0]
    peak_conns = 0
    per_second: list[int] = []
    window_start = first + args["warmup"]
    # (wall, own CPU, the load generator's CPU) where the window starts
    cpu_start: tuple[float, float, float] | None = None
    while time.perf_counter() < first + args["seconds"]:
        before = len(applied)
        await asyncio.sleep(1.0)
        per_second.append(len(applied) - before)
        peak_conns = max(peak_conns, len(peers.connected()))
        if cpu_start is None and time.perf_counter() >= window_start:
            cpu_start = (time.perf_counter(), time.process_time(), load_cpu.value)
    end = time.perf_counter()
    assert cpu_start is not None
    cpu_wall, cpu_used = end - cpu_start[0], time.process_time() - cpu_start[1]
    load_used = load_cpu.value - cpu_start[2]
    applied_cpu_window = sum(1 for t in applied if cpu_start[0] <= t <= end)
    driver.stop()
    await run
    if store is not None:
        store.close()
    in_window = sum(1 for t in applied if window_start <= t <= end)
    return {
        "rate": in_window / (end - window_start),
        "window": end - window_start,
        "in_window": in_window,
        "applied": len(applied),
        "versions": versions,
        "rejected": rejected,
        "per_second": per_second,
        "peak_conns": peak_conns,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_share": cpu_used / cpu_wall,
        "writes": driver.stats.commits,
        "persists": driver.stats.persists,
        "cpu_per_update": cpu_used / max(1, applied_cpu_window),
        "load_cpu_share": load_used / cpu_wall,
        "load_cpu_per_update": load_used / max(1, applied_cpu_window),
    }


# ------------------------------------------------------------------ load generator


def load_main(args: dict[str, Any], url: str, load_cpu: Any) -> None:
    faulthandler.dump_traceback_later(args["seconds"] + STACKS_AFTER_S)
    install_loop()
    asyncio.run(load(args, url, load_cpu))


async def publish_cpu(load_cpu: Any) -> None:
    """Keep this process's CPU time (s) in ``load_cpu`` (shared memory), fresh to 50 ms:
    the aggregator reads it where its window starts and ends."""
    while True:
        load_cpu.value = time.process_time()
        await asyncio.sleep(0.05)


async def load(args: dict[str, Any], url: str, load_cpu: Any) -> None:
    ids, roster = pki(roles_of(args["seeds"]), args["seeds"])
    rng = np.random.default_rng(1)
    model = make_model(args["params"])
    layout = ModelLayout.of(model)  # a site daemon knows it at start, from its plan
    delta = {
        k: (rng.standard_normal(v.shape, dtype=np.float32) * 1e-3).astype(np.float16)
        for k, v in model.items()
    }
    up = CodecSpec(kind="fp16")
    codecs = CodecPolicy(up=up)
    digest = update_digest_sent(delta, up)  # once: every update carries this delta
    drivers = []
    for s in site_ids(args["sites"]):
        e2e = StandInSigning(ids[s], roster, delta, up, digest)
        peers = NetworkPeers(ids[s], roster, dial=[DialTarget("agg", url)], codecs=codecs, e2e=e2e)
        e2e.set_layout(layout)
        drivers.append(AsyncDriver(EchoSite(s, delta), peers=peers))
    gc.collect()  # start-up's objects live as long as the process: out of the collector's scans
    gc.freeze()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(publish_cpu(load_cpu))
        for d in drivers:
            tg.create_task(d.run())  # until the main process terminates this one


# ------------------------------------------------------------------ main


def main() -> None:
    malloc = daemon_malloc()  # first: it may re-execute this process
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--buffer", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--no-store", dest="store", action="store_false")
    a = parser.parse_args()
    if not 0 <= a.warmup < a.seconds:
        parser.error("--warmup must be in [0, --seconds)")
    loop_name = install_loop()
    load_avg = os.getloadavg()
    ctx = mp.get_context("spawn")
    urls: Any = ctx.Queue()
    results: Any = ctx.Queue()
    load_cpu: Any = ctx.Value("d", 0.0)  # the load generator's CPU seconds (publish_cpu)
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="fedloom-ingest-") as state:
        args = {
            "seeds": {n: os.urandom(32) for n in ("agg", *site_ids(a.sites))},
            "sites": a.sites,
            "params": a.params,
            "buffer": a.buffer,
            "seconds": a.seconds,
            "warmup": a.warmup,
            "store": a.store,
            "state": state,
        }
        try:
            agg = ctx.Process(
                target=aggregator_main,
                args=(args, urls, results, load_cpu),
                name="aggregator",
                daemon=True,
            )
            agg.start()
            procs.append(agg)
            url = wait_for(urls, START_TIMEOUT_S, procs, "the aggregator's address")
            gen = ctx.Process(
                target=load_main, args=(args, url, load_cpu), name="load generator", daemon=True
            )
            gen.start()
            procs.append(gen)
            result = wait_for(results, a.seconds + RESULT_GRACE_S, procs, "the results")
        finally:
            stop_processes(procs)

    print(
        f"ingest bench: FedBuff aggregator (buffer {a.buffer}, concurrency {a.sites}), "
        f"{a.params:,}-parameter fp32 model, {a.sites} site connections from one load-generator "
        f"process, loopback, encrypted WebSockets, deltas fp16 up, models fp32 down, {loop_name}, "
        f"{os.cpu_count()} CPUs, load average before {load_avg[0]:.2f} / {load_avg[1]:.2f} / "
        f"{load_avg[2]:.2f}"
    )
    print(
        "durable store: "
        + (
            "ON (WAL record with the delta + fsync before each ack, records grouped while a "
            "write is in flight; checkpoint every 10 versions)"
            if a.store
            else "OFF (--no-store)"
        )
    )
    print(f"malloc: GLIBC_TUNABLES={malloc} (as the systemd units set it)")
    print(f"updates applied per second (1 s samples): {result['per_second']}")
    print(
        f"applied {result['applied']} updates in all, {result['versions']} model versions, "
        f"{result['rejected']} rejected, {result['peak_conns']} connections at peak"
    )
    print(
        f"steady window: {result['window']:.1f} s ({a.warmup:.0f} s after the first update to "
        f"the end), {result['in_window']} updates applied"
    )
    print(f"aggregator peak RSS: {result['rss_mb']:.0f} MB")
    if a.store:
        print(
            f"durable writes (one frame and fsync each): {result['writes']} for "
            f"{result['persists']} records"
        )
    per_update = result["cpu_per_update"]
    print(
        f"aggregator CPU: {result['cpu_share']:.2f} of a CPU over the window, "
        f"{1000 * per_update:.1f} ms per applied update (it shares {os.cpu_count()} CPUs with "
        f"the load generator; alone on one CPU that is <= {1 / per_update:.0f} updates/s)"
    )
    load_per_update = result["load_cpu_per_update"]
    print(
        f"load generator CPU: {result['load_cpu_share']:.2f} of a CPU over the window, "
        f"{1000 * load_per_update:.1f} ms per applied update; both processes "
        f"{1000 * (per_update + load_per_update):.1f} ms: {os.cpu_count()} CPUs sustain at most "
        f"{(os.cpu_count() or 1) / (per_update + load_per_update):.0f} updates/s"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    # The aggregator's own CPU per update beside the figure: that is the capacity this
    # measures (on a loaded machine the rate can be held down by fsync latency instead).
    print(
        f"ingest: {result['rate']:.0f} updates/s (aggregator {1000 * per_update:.1f} ms CPU "
        f"per applied update: {1 / per_update:.0f} updates/s of one CPU; load generator "
        f"{1000 * load_per_update:.1f} ms)"
    )


if __name__ == "__main__":
    main()
