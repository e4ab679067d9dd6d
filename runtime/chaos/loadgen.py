"""A load generator: many real site daemons in one process, to load aggregators in chaos runs.

Issue 13, item 6 asks for a chaos scenario with 100 sites and faults during ingest; 100 site
daemons do not fit a small machine, so ``python -m fedloom.runtime.chaos.loadgen CONFIG`` runs N
sites in one process and one event loop. Each is what ``fedloom run`` runs for its own site
config: ``runtime.daemon.open_daemon`` (its identity key, the signed roster, its ``SiteNode``
restored from its own state directory, flock-ed) and ``runtime.daemon.serve`` (its own
``NetworkPeers`` link to its parent: WebSocket, handshake, encrypted records; its own
``AsyncDriver``; a checkpoint on a clean stop). Only the trainer differs:
``FixedDeltaTrainer`` answers at once with the model it was sent plus a small, fixed, seeded
delta of its shape, so what is loaded is the aggregators' ingest path, not this machine's
training. The state directories are the sites' own (``state/<site>``): the chaos checker
reads their outboxes as it reads any site's.

CONFIG (written by ``attach_loadgen`` for ``fedloom chaos``)::

    [loadgen]
    sites = ["/run/federation/load-0.toml", ...]  # ordinary site daemon configs
    seed = 1                                       # draws the delta
    delta_scale = 0.001                            # its standard deviation
    workers = 2                                    # threads the "training" runs in

    [metrics]                                      # one /metrics and /healthz for all
    host = "127.0.0.1"
    port = 9100

``/metrics`` shows the process's ``fedloom_loadgen_*`` gauges (sites, running, updates
produced and pending in the sites' outboxes, sites paused by backpressure, newest model
version held). Both are answered from a thread of their own (``Observer``): ``/healthz`` is
ok while the sites serve and the main loop has beaten within ``STALE_AFTER_S``.

SIGTERM or SIGINT stops every site as a daemon stops (exit 0). A site that cannot start,
or whose daemon code stops by itself, stops the others and ends the process with that
daemon's one line and exit status (``runtime.exit_status``): a chaos run then sees an
exit it did not ask for.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import contextlib
import functools
import logging
import math
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from fedloom.algorithms.protocol import TrainResult, Weights
from fedloom.algorithms.site import SiteNode
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.runtime.exit_status import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from fedloom.runtime.federation_files import Federation, NodeFiles, free_port
from fedloom.runtime.harness import DaemonProcess
from fedloom.runtime.trainer import SitePlan
from fedloom.transport.error_text import describe
from fedloom.workloads.dp_sgd import DpSgdConfig

__all__ = [
    "CONFIG_NAME",
    "LOADGEN_ID",
    "FixedDeltaTrainer",
    "LoadgenConfig",
    "LoadgenProcess",
    "attach_loadgen",
    "main",
    "read_loadgen_config",
    "use_loadgen",
]

log = logging.getLogger("fedloom.loadgen")

LOADGEN_ID = "loadgen"  # runtime.chaos.scenario.LOADGEN_ID
CONFIG_NAME = "loadgen.toml"
DEFAULT_DELTA_SCALE = 1e-3
DEFAULT_WORKERS = 2
# /healthz: the main loop beat more recently than this. It runs every site, so a burst of
# 100 model deliveries keeps it busy for seconds on a loaded machine; a hang lasts longer.
STALE_AFTER_S = 30.0


# ============================================================================ config


@dataclass(frozen=True, slots=True)
class LoadgenConfig:
    sites: tuple[Path, ...]
    seed: int = 1
    delta_scale: float = DEFAULT_DELTA_SCALE
    workers: int = DEFAULT_WORKERS
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no /metrics


def read_loadgen_config(path: Path) -> LoadgenConfig:
    """Read and check CONFIG (see the module docstring); every mistake is a ConfigError."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        top = Table(raw, "")
        t = top.table("loadgen")
        sites = t.array("sites")
        if not sites or not all(isinstance(s, str) and s for s in sites):
            raise ConfigError("loadgen.sites: expected a non-empty list of site config paths")
        base = path.parent
        cfg = LoadgenConfig(
            sites=tuple(p if p.is_absolute() else base / p for p in map(Path, sites)),
            seed=t.integer("seed", 1, min=0),
            delta_scale=t.number("delta_scale", DEFAULT_DELTA_SCALE, min=0.0, max=1.0),
            workers=t.integer("workers", DEFAULT_WORKERS, min=1, max=64),
        )
        t.finish()
        if top.has("metrics"):
            m = top.table("metrics")
            cfg = LoadgenConfig(
                cfg.sites,
                cfg.seed,
                cfg.delta_scale,
                cfg.workers,
                metrics_host=m.text("host", "127.0.0.1"),
                metrics_port=m.integer("port", min=0),
            )
            if cfg.metrics_port > 65535:
                raise ConfigError(f"metrics.port: expected at most 65535, got {cfg.metrics_port}")
            m.finish()
        top.finish()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if len(set(cfg.sites)) != len(cfg.sites):
        raise ConfigError(f"{path}: loadgen.sites: a site config is listed twice")
    return cfg


# =========================================================================== trainer


class FixedDeltaTrainer:
    """A driver ``Trainer`` that does no training: the model it is given plus one fixed,
    seeded delta of that model's shape (drawn once per layout, shared by every site), and
    each site's own example count from its plan."""

    def __init__(self, examples: Mapping[str, int], *, scale: float, seed: int) -> None:
        self.examples = dict(examples)
        self.scale = scale
        self.seed = seed
        self._deltas: dict[tuple[tuple[str, tuple[int, ...], str], ...], Weights] = {}
        self._lock = threading.Lock()

    def delta(self, weights: Weights) -> Weights:
        layout = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(weights.items()))
        with self._lock:
            found = self._deltas.get(layout)
            if found is None:
                rng = np.random.default_rng(self.seed)
                found = {
                    k: (rng.standard_normal(shape) * self.scale).astype(dtype)
                    for k, shape, dtype in layout
                }
                self._deltas[layout] = found
        return found

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        delta = self.delta(weights)
        trained = {k: np.add(v, delta[k], dtype=v.dtype) for k, v in weights.items()}
        return TrainResult(trained, self.examples.get(node_id, 1), {})


# ====================================================================== the process


class Observer:
    """``/metrics`` and ``/healthz`` on a thread and event loop of their own.

    A hundred sites keep the main loop busy (handshakes, 100 model decodes per round); a
    scrape answered from it would time out whenever the machine is busy, which says little
    about the load generator. Instead the main loop beats (``beat``) and takes the gauges'
    values (``refresh``) every ``BEAT_S``; ``/healthz`` is ok while the sites are serving
    and the last beat is under ``stale_after_s`` old (a stalled loop reads as degraded)."""

    BEAT_S = 0.5

    def __init__(self, host: str, port: int, *, stale_after_s: float = STALE_AFTER_S) -> None:
        from prometheus_client import Gauge

        from fedloom.runtime.metrics import MetricsSink

        self.host, self.port = host, port
        self.stale_after_s = stale_after_s
        self.sink = MetricsSink(per_source=False)
        self.sink.set_info(LOADGEN_ID, "loadgen", "dev")
        self.values: dict[str, float] = {}
        self.serving = False
        self._beat = time.monotonic()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="loadgen-metrics", daemon=True
        )
        self._server: Any = None
        for name, text in GAUGES.items():
            gauge = Gauge(f"fedloom_loadgen_{name}", text, registry=self.sink.registry)
            gauge.set_function(functools.partial(self._value, name))

    def _value(self, name: str) -> float:
        return self.values.get(name, math.nan)

    @property
    def url(self) -> str | None:
        return None if self._server is None else str(self._server.url)

    def start(self) -> None:
        """Listen (``OSError`` if it cannot) and start judging the beats."""
        from fedloom.runtime.health import start_observability

        self._thread.start()
        made = start_observability(self.sink, self.host, self.port)
        self._server = asyncio.run_coroutine_threadsafe(made, self._loop).result(timeout=30)
        asyncio.run_coroutine_threadsafe(self._judge(), self._loop)

    def beat(self) -> None:
        self._beat = time.monotonic()

    def refresh(self, nodes: Sequence[SiteNode], tasks: Sequence[asyncio.Task[Any]]) -> None:
        """Take the gauges' values (on the main loop, where the nodes change)."""
        self.values = {
            "sites": float(len(nodes)),
            "sites_running": float(sum(1 for t in tasks if not t.done())),
            "updates_produced": float(sum(n.seq for n in nodes)),
            "updates_pending": float(sum(n.pending for n in nodes)),
            "sites_paused": float(sum(1 for n in nodes if n.paused)),
            "model_version": float(max((n.newest_version for n in nodes), default=-1)),
        }

    async def _judge(self) -> None:
        while True:
            fresh = time.monotonic() - self._beat < self.stale_after_s
            self.sink.set_ready(self.serving and fresh)
            await asyncio.sleep(self.BEAT_S / 2)

    async def _stop(self) -> None:
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        if self._server is not None:
            await self._server.stop()

    def close(self) -> None:
        if self._thread.is_alive():
            done = asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
            with contextlib.suppress(Exception):
                done.result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()


GAUGES = {
    "sites": "Sites this load generator runs.",
    "sites_running": "Sites whose daemon is serving.",
    "updates_produced": "Updates the sites have produced (their outbox counters).",
    "updates_pending": "Updates in the sites' outboxes, not yet acknowledged.",
    "sites_paused": "Sites that start no training: their outbox is full (backpressure).",
    "model_version": "The newest global model version any site has been sent.",
}


async def _beat(observer: Observer, nodes: Sequence[SiteNode], tasks: Sequence[Any]) -> None:
    while True:
        observer.beat()
        observer.refresh(nodes, tasks)
        await asyncio.sleep(Observer.BEAT_S)


def share_workloads() -> None:
    """Build each distinct ``[plan]`` workload once in this process.

    A site's config is read and its plan built as ``fedloom run`` does, which builds the
    workload (data set, split) twice per site: 45 s for 100 digits sites on a busy machine,
    and the same result each time, since the sites of one federation share the table (only
    ``site_index`` differs, which is not part of it). Workloads are read-only to sites."""
    import fedloom.workloads.workload as workloads

    original = workloads.from_config
    if getattr(original, "shared_by_loadgen", False):
        return
    built: dict[tuple[str, int | None, int | None, Any], Any] = {}

    def from_config(
        d: Mapping[str, Any],
        *,
        n_sites: int | None = None,
        seed: int | None = None,
        dp_sgd: DpSgdConfig | None = None,
    ) -> Any:
        key = (repr(sorted(dict(d).items())), n_sites, seed, dp_sgd)
        if key not in built:
            built[key] = original(d, n_sites=n_sites, seed=seed, dp_sgd=dp_sgd)
        return built[key]

    from_config.shared_by_loadgen = True  # type: ignore[attr-defined]
    workloads.from_config = from_config


def _open_sites(paths: Sequence[Path]) -> list[Any]:
    """Every site opened as ``fedloom run`` opens it (config, identity, roster, state);
    on a failure the ones opened are closed and the error raised."""
    from fedloom.runtime.config import load_config
    from fedloom.runtime.daemon import open_daemon

    share_workloads()
    opened: list[Any] = []
    try:
        for path in paths:
            cfg = load_config(path)
            if cfg.role != "site":
                raise ConfigError(f"{path}: role = {cfg.role!r}; the load generator runs sites")
            opened.append(open_daemon(cfg))
    except BaseException:
        for d in opened:
            d.close()
        raise
    return opened


def _examples(daemons: Sequence[Any]) -> dict[str, int]:
    out = {}
    for d in daemons:
        plan = d.plan
        if isinstance(plan, SitePlan):
            out[d.cfg.node_id] = int(plan.workload.n_examples(plan.index))
    return out


async def run_sites(cfg: LoadgenConfig, daemons: Sequence[Any], stop: asyncio.Event) -> int:
    """Serve every site until ``stop``; the exit status (see the module docstring)."""
    from fedloom.runtime.daemon import serve, stop_reason

    tasks: list[asyncio.Task[Any]] = []
    nodes = [d.node for d in daemons]
    observer = None
    if cfg.metrics_port:
        observer = Observer(cfg.metrics_host, cfg.metrics_port)
        try:
            observer.start()
        except OSError as err:
            observer.close()
            where = f"{cfg.metrics_host}:{cfg.metrics_port}"
            log.error("loadgen: metrics: cannot listen on %s: %s", where, err)
            return EXIT_FAILED
    trainer = FixedDeltaTrainer(_examples(daemons), scale=cfg.delta_scale, seed=cfg.seed)
    executor = cf.ThreadPoolExecutor(cfg.workers, thread_name_prefix="loadgen-train")
    shutdowns = [asyncio.Event() for _ in daemons]
    for d, shutdown in zip(daemons, shutdowns, strict=True):
        coro = serve(
            d, install_signals=False, shutdown=shutdown, trainer=trainer, executor=executor
        )
        tasks.append(asyncio.create_task(coro, name=f"site {d.cfg.node_id}"))
    beating = None
    if observer is not None:
        beating = asyncio.create_task(_beat(observer, nodes, tasks), name="loadgen beat")
        observer.serving = True
    log.info(
        "loadgen: serving %d sites%s",
        len(daemons),
        f"; /metrics on {observer.url}" if observer is not None else "",
        extra={"node": LOADGEN_ID, "sites": len(daemons)},
    )
    status = EXIT_OK
    waiter = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        ended = [t for t in tasks if t in done]
        if ended and not stop.is_set():
            # A site daemon stopped by itself: as a daemon process would, the whole load
            # generator stops with its reason, so the run sees it.
            if observer is not None:
                observer.serving = False
            i = tasks.index(ended[0])
            node = daemons[i].cfg.node_id
            failure = ended[0].exception() if not ended[0].cancelled() else None
            reason = stop_reason(failure) if failure is not None else None
            if reason is not None:
                status = reason.exit_code
                log.error("%s: %s", node, reason, extra={"node": node, "exit_status": status})
            else:
                status = EXIT_FAILED
                why = "stopped by itself"
                if failure is not None:
                    why = f"{type(failure).__name__}: {failure}"
                log.error(
                    "loadgen: site %s ended: %s; stopping every site",
                    node,
                    why,
                    exc_info=failure,
                    extra={"node": node},
                )
    finally:
        waiter.cancel()
        for shutdown in shutdowns:
            shutdown.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for d, result in zip(daemons, results, strict=True):
            if isinstance(result, Exception):  # while stopping: said, not a traceback
                node = d.cfg.node_id
                log.warning("%s: stopped with %s", node, describe(result), extra={"node": node})
        executor.shutdown(wait=False, cancel_futures=True)
        if beating is not None:
            beating.cancel()
        if observer is not None:
            observer.close()
    return status


async def _main_async(cfg: LoadgenConfig, daemons: Sequence[Any]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await run_sites(cfg, daemons, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedloom.runtime.chaos.loadgen CONFIG``: run the sites until SIGTERM."""
    from fedloom.runtime.daemon import _new_loop_factory, configure_logging

    parser = argparse.ArgumentParser(
        prog="python -m fedloom.runtime.chaos.loadgen",
        description="Run many fedloom sites in one process (a load generator).",
    )
    parser.add_argument("config", type=Path)
    parser.add_argument("--log-format", choices=("json", "text", "auto"), default="auto")
    parser.add_argument("--log-level", action="append", default=None)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # no roster reloads here
    try:
        configure_logging(args.log_level, args.log_format)
        cfg = read_loadgen_config(args.config)
        daemons = _open_sites(cfg.sites)
    except Exception as exc:
        return _refused(exc)
    try:
        with asyncio.Runner(loop_factory=_new_loop_factory()) as runner:
            return runner.run(_main_async(cfg, daemons))
    finally:
        for d in daemons:
            with contextlib.suppress(Exception):
                d.close()


def _refused(exc: Exception) -> int:
    """One line and the exit status for a start that failed as a daemon's would."""
    from fedloom.runtime.daemon import stop_reason

    if isinstance(exc, ConfigError):
        print(f"fedloom loadgen: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    reason = stop_reason(exc)
    if reason is None:
        raise exc
    print(f"fedloom loadgen: {reason}", file=sys.stderr)
    return reason.exit_code


# ======================================================================= for the runner


class LoadgenProcess(DaemonProcess):
    """The load generator as one of a chaos run's processes (started, killed, paused like
    a daemon)."""

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "fedloom.runtime.chaos.loadgen", str(self.files.config)]
        return [*cmd, "--log-format", "json", *self.args]


def use_loadgen(cluster: Any) -> None:
    """Run ``cluster``'s load generator node (if any) as a ``LoadgenProcess``."""
    proc = cluster.procs.get(LOADGEN_ID)
    if proc is not None and not isinstance(proc, LoadgenProcess):
        cluster.add(LoadgenProcess(proc.files))


def attach_loadgen(
    fed: Federation, load_sites: Sequence[str], *, seed: int = 1
) -> tuple[Federation, dict[str, NodeFiles]]:
    """Put one load generator in place of ``load_sites`` (written by ``lay_out`` as
    ordinary sites, their links already pointed at the fault proxy).

    Returns the federation's processes (the load sites out, ``loadgen`` in, with a
    ``/metrics`` port and ``logs/loadgen.log``) and the load sites' files (their own
    configs and state directories; their log and metrics are the load generator's)."""
    from fedloom.runtime.chaos.layout import read_config

    workdir = fed.workdir
    port = free_port()
    log_path = workdir / "logs" / f"{LOADGEN_ID}.log"
    sites: dict[str, NodeFiles] = {}
    for site in load_sites:
        files = fed.nodes[site]
        cfg = read_config(files.config)
        cfg.pop("metrics", None)  # one endpoint for the process, not one per site
        files.config.write_text(tomli_w.dumps(cfg), encoding="utf-8")
        sites[site] = NodeFiles(
            site, "site", files.config, files.state_dir, log_path, 0, port, files.site_index
        )
    config = workdir / CONFIG_NAME
    doc = {
        "loadgen": {"sites": [str(f.config) for f in sites.values()], "seed": seed},
        "metrics": {"host": "127.0.0.1", "port": port},
    }
    config.write_text(tomli_w.dumps(doc), encoding="utf-8")
    nodes = {k: v for k, v in fed.nodes.items() if k not in sites}
    nodes[LOADGEN_ID] = NodeFiles(
        LOADGEN_ID, LOADGEN_ID, config, workdir / "state" / LOADGEN_ID, log_path, 0, port
    )
    return Federation(workdir, fed.roster, fed.consortium_pub, fed.plan, nodes), sites


if __name__ == "__main__":
    raise SystemExit(main())
