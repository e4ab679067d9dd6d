"""One synchronous FedAvg round, for real: 100 MB fp32 model, 2 site processes (issue 4, item 2).

Three processes on loopback (127.0.0.1): an aggregator (``SyncAggregator``,
``clients_per_round=2``) listening with ``NetworkPeers``, and two sites (``SiteNode``)
dialling it, each run by the runtime's ``AsyncDriver``. Every link is the real one: an
aiohttp WebSocket, the signed-ephemeral handshake against the roster, encrypted 1 MiB
records, the wire codec (fp32 both ways, lz4 on: the defaults of a daemon).

"Training" is trivial on purpose (we measure the system, not the model): a site returns the
weights plus a fixed small noise tensor, computed once at start-up.

Durable stores are on, as a daemon runs them (a ``StateStore`` per process in a temporary
directory, with the daemon's defaults): the aggregator writes each update's record (its
ids and outcome; a synchronous round does not log deltas) to its write-ahead log and fsyncs
it before its ack can be delivered, and checkpoints the new model (100 MB, fsynced) after
every round, before the next round's requests can be delivered; each site writes its
update to its outbox log (fsync) before the update can be delivered. "Before it can be
delivered": the driver streams a message while the write it depends on is being fsynced
and holds back only its last record until the write is durable (``runtime/driver.py``).
``--no-store`` runs without stores, to show what the disk costs.

Round time is measured inside the aggregator process: from the ``round_started`` metric
(emitted right after the round's ``TrainRequest``s are queued) to the ``model_version``
metric of the round's aggregate (the new model applied). One warm-up round, then the median
of ``--rounds`` (5). The round *cycle* (one ``round_started`` to the next, so the
checkpoint between rounds included) is printed beside it. Baseline, in the same run and
between the same processes: the same bytes as raw aiohttp WebSocket frames (1 MiB binary,
no encryption, no codec): 100 MB down to each site at once and 100 MB back up from each.

    .venv/bin/python bench/round.py [--params 25000000] [--rounds 5] [--no-store]

Reference (issue 4): Flower 1.41 over gRPC without TLS, median 5.4 s; target <= 1.8 s.
Prints ``round_time: X.XX s`` last.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from _multiproc import daemon_malloc, install_loop, model_weights, pki, stop_processes  # noqa: E402
from aiohttp import web  # noqa: E402

from fedloom.algorithms.protocol import Metric, TrainResult, Weights  # noqa: E402
from fedloom.algorithms.site import SiteNode  # noqa: E402
from fedloom.algorithms.sync import SyncAggregator  # noqa: E402
from fedloom.federation.store import StateStore  # noqa: E402
from fedloom.runtime.driver import AsyncDriver  # noqa: E402
from fedloom.runtime.network_peers import DialTarget, NetworkPeers  # noqa: E402

MB = 1e6
FRAME = 1 << 20
SITES = ("site-1", "site-2")
RAW_TRIALS = 3


def make_model(params: int) -> Weights:
    """A model-shaped fp32 weight set: one large matrix and a few small tensors."""
    small = {"fc1.bias": 4096, "fc2.weight": 419_000, "fc2.bias": 904}
    return model_weights(params, 4096, small, 0.05)


ROLES = {"agg": "root", **{s: "site" for s in SITES}}


class NoiseTrainer:
    """Returns the weights plus a fixed small noise (made once): a trivial 'training'."""

    def __init__(self, model: Weights, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.noise = {
            k: (rng.standard_normal(v.shape, dtype=np.float32) * 1e-3) for k, v in model.items()
        }

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        return TrainResult({k: w + self.noise[k] for k, w in weights.items()}, 1000, {})


# ------------------------------------------------------------------ aggregator process


def aggregator_main(args: dict[str, Any], urls: Any, out: Any) -> None:
    install_loop()
    out.put(asyncio.run(aggregator(args, urls)))


async def raw_baseline(nbytes: int, urls: Any) -> list[float]:
    """Raw WebSocket frames: ``nbytes`` down to each site at once, then back up from each."""
    joined: asyncio.Queue[web.WebSocketResponse] = asyncio.Queue()
    done = asyncio.Event()

    async def on_raw(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(max_msg_size=FRAME + 1, compress=False)
        await sock.prepare(request)
        await joined.put(sock)
        await done.wait()
        return sock

    app = web.Application()
    app.router.add_get("/raw", on_raw)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    urls.put(f"ws://127.0.0.1:{runner.addresses[0][1]}/raw")
    socks = [await joined.get() for _ in SITES]
    payload = np.random.default_rng(1).bytes(nbytes)
    frames = [payload[i : i + FRAME] for i in range(0, nbytes, FRAME)]

    async def exchange(sock: web.WebSocketResponse) -> None:
        for frame in frames:
            await sock.send_bytes(frame)
        got = 0
        while got < nbytes:
            got += len(await sock.receive_bytes())

    times = []
    for _ in range(1 + RAW_TRIALS):  # the first is a warm-up
        start = time.perf_counter()
        await asyncio.gather(*(exchange(s) for s in socks))
        times.append(time.perf_counter() - start)
    for sock in socks:
        await sock.close()
    done.set()
    await runner.cleanup()
    return times[1:]


async def aggregator(args: dict[str, Any], urls: Any) -> dict[str, Any]:
    ids, roster = pki(ROLES, args["seeds"])
    model = make_model(args["params"])
    nbytes = sum(int(a.nbytes) for a in model.values())
    raw = await raw_baseline(nbytes, urls)

    total = 1 + args["rounds"]
    started: list[float] = []
    applied: list[float] = []
    driver: AsyncDriver | None = None

    def sink(m: Metric) -> None:
        if m.name == "round_started":
            started.append(time.perf_counter())
        elif m.name == "model_version":
            applied.append(time.perf_counter())
            if len(applied) >= total and driver is not None:
                driver.stop()

    node = SyncAggregator("agg", {s: "site" for s in SITES}, model, clients_per_round=2, rng=0)
    store = None
    if args["store"]:
        store = StateStore(Path(args["state"]) / "agg")
        store.load()
    peers = NetworkPeers(ids["agg"], roster, listen=("127.0.0.1", 0), accept_from=set(SITES))
    driver = AsyncDriver(node, peers=peers, store=store, metrics=sink)
    run = asyncio.ensure_future(driver.run())
    while peers.listen_url is None:
        await asyncio.sleep(0.01)
    urls.put(peers.listen_url)
    async with asyncio.timeout(args["timeout"]):
        await run
    if store is not None:
        store.close()
    rounds = [a - s for s, a in zip(started, applied, strict=False)]
    cycles = [b - a for a, b in itertools.pairwise(started[1:])]  # warm-up excluded
    return {
        "nbytes": nbytes,
        "raw": raw,
        "rounds": rounds,
        "cycles": cycles,
        "stats": driver.stats,
    }


# ------------------------------------------------------------------ site process


def site_main(args: dict[str, Any], site_id: str, raw_url: str, url_q: Any) -> None:
    install_loop()
    asyncio.run(site(args, site_id, raw_url, url_q))


async def raw_echo(url: str, nbytes: int) -> None:
    """The site's half of the raw baseline: receive ``nbytes``, send the same back."""
    payload = np.random.default_rng(2).bytes(nbytes)
    frames = [payload[i : i + FRAME] for i in range(0, nbytes, FRAME)]
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, max_msg_size=FRAME + 1, compress=0) as sock,
    ):
        got = 0
        async for msg in sock:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                break
            got += len(msg.data)
            if got >= nbytes:
                got = 0
                for frame in frames:
                    await sock.send_bytes(frame)


async def site(args: dict[str, Any], site_id: str, raw_url: str, url_q: Any) -> None:
    ids, roster = pki(ROLES, args["seeds"])
    model = make_model(args["params"])
    trainer = NoiseTrainer(model, seed=SITES.index(site_id) + 1)
    nbytes = sum(int(a.nbytes) for a in model.values())
    del model
    await raw_echo(raw_url, nbytes)
    agg_url = url_q.get()
    store = None
    if args["store"]:
        store = StateStore(Path(args["state"]) / site_id)
        store.load()
    peers = NetworkPeers(ids[site_id], roster, dial=[DialTarget("agg", agg_url)])
    driver = AsyncDriver(SiteNode(site_id, "agg"), peers=peers, trainer=trainer, store=store)
    await driver.run()  # until the main process terminates this one


# ------------------------------------------------------------------ main


def main() -> None:
    malloc = daemon_malloc()  # first: it may re-execute this process
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-store", dest="store", action="store_false")
    parser.add_argument("--timeout", type=float, default=300.0)
    a = parser.parse_args()
    loop_name = install_loop()
    load = os.getloadavg()
    ctx = mp.get_context("spawn")
    urls: Any = ctx.Queue()
    agg_urls: Any = ctx.Queue()
    results: Any = ctx.Queue()
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="fedloom-round-") as state:
        args = {
            "seeds": {n: os.urandom(32) for n in ("agg", *SITES)},
            "params": a.params,
            "rounds": a.rounds,
            "store": a.store,
            "state": state,
            "timeout": a.timeout,
        }
        try:
            agg = ctx.Process(target=aggregator_main, args=(args, urls, results), daemon=True)
            agg.start()
            procs.append(agg)
            raw_url = urls.get(timeout=120)
            for s in SITES:
                p = ctx.Process(target=site_main, args=(args, s, raw_url, agg_urls), daemon=True)
                p.start()
                procs.append(p)
            agg_url = urls.get(timeout=300)
            for _ in SITES:
                agg_urls.put(agg_url)
            result = results.get(timeout=a.timeout + 60)
        finally:
            stop_processes(procs)

    size = result["nbytes"]
    rounds = result["rounds"]
    raw = statistics.median(result["raw"])
    print(
        f"round bench: FedAvg, {size / MB:.1f} MB fp32 model ({a.params:,} parameters), 2 site "
        f"processes + 1 aggregator process, loopback, encrypted WebSockets, {loop_name}, "
        f"{os.cpu_count()} CPUs, load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )
    print(
        "durable stores: "
        + (
            "ON (aggregator: WAL record + fsync before each ack is delivered, "
            f"{size / MB:.0f} MB checkpoint + fsync per round before the next requests are "
            "delivered; sites: outbox record with the delta + fsync before the update is "
            "delivered)"
            if a.store
            else "OFF (--no-store)"
        )
    )
    print(f"malloc: GLIBC_TUNABLES={malloc} (as the systemd units set it)")
    print(f"warm-up round: {rounds[0]:.3f} s")
    for i, t in enumerate(rounds[1:], 1):
        print(f"round {i}: {t:.3f} s")
    median = statistics.median(rounds[1:])
    runs = ", ".join(f"{t:.3f}" for t in result["raw"])
    print(
        f"raw aiohttp WebSocket, same bytes (2 x {size / MB:.0f} MB down + 2 x {size / MB:.0f} MB "
        f"up, 1 MiB frames, no crypto/codec): median {raw:.3f} s (runs: {runs})"
    )
    print(f"round / raw: {median / raw:.2f} x; reference Flower 1.41 gRPC no TLS: 5.4 s")
    if result["cycles"]:
        cycle = statistics.median(result["cycles"])
        print(
            f"round cycle (round start to next round start, checkpoint included): median "
            f"{cycle:.3f} s over {len(result['cycles'])}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"round_time: {median:.2f} s")


if __name__ == "__main__":
    main()
