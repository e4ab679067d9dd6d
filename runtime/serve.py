"""``serve``: run an opened daemon until it is told to stop.

The node runs under ``AsyncDriver`` with a ``NetworkPeers`` (sites and regions dial their
parent with jittered exponential back-off; aggregators listen and admit their children
only; gossip peers do both), the store for ``Persist`` effects and a ``MetricsSink`` for
``Metric`` effects (served on ``/metrics`` and ``/healthz`` when ``[metrics] port`` is
set). systemd (``Type=notify``): ``READY=1`` once recovery is done, the listener is bound
and the dialled links are up (or after ``ready_wait_s`` without them: a hospital must not
be restart-looped because its aggregator is down); ``WATCHDOG=1`` from the event loop at
half ``$WATCHDOG_USEC``; on SIGTERM or SIGINT ``STOPPING=1``, the driver stops after the
event it is handling, connections close in order, a last checkpoint is written. On SIGHUP
the daemon re-reads ``roster.path`` and installs it if it is a newer signed roster
(``runtime.roster_updates``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import logging
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from fedloom.algorithms.protocol import Metric, ModelHolder, Persist, Restorable
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.seeds import derived_seed
from fedloom.federation.store import (
    CHECKPOINT_KEY,
)
from fedloom.federation.training import Trainer
from fedloom.runtime import secagg_pool, systemd
from fedloom.runtime.audit import open_audit
from fedloom.runtime.config import RELAY_MESSAGE_MIB
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.evaluation import DEFAULT_EVAL_INTERVAL_S, evaluate_models, sleep_or_stop
from fedloom.runtime.governance import approval_required, reports_gate, site_gate
from fedloom.runtime.malloc_tuning import GLIBC_TUNABLES
from fedloom.runtime.middleware import LayeredNode, poster
from fedloom.runtime.network_peers import (
    Backoff,
    DialTarget,
    ListenError,
    NetworkPeers,
    gossip_dial_targets,
)
from fedloom.runtime.nodes import (
    bound_claims,
    model_floor,
    model_floor_digest,
    model_of,
    n_examples_of,
)
from fedloom.runtime.recovery import Daemon, DaemonError, recovery_summary
from fedloom.runtime.relay_seq import RELAY_SEQ_KEY, RelaySeqState
from fedloom.runtime.reports import add_reports
from fedloom.runtime.roster_updates import ROSTER_SEEN_KEY, RosterKeeper
from fedloom.runtime.status import StatusBoard, board_for_daemon
from fedloom.runtime.trainer import DeferredPlan, PlanTrainer, make_executor
from fedloom.transport import half
from fedloom.transport.channel import ChannelOptions, GateLimits
from fedloom.transport.codec_policy import CodecPolicy
from fedloom.transport.e2e import ModelVersionGuard
from fedloom.transport.limits import Limits, MiB, ModelLayout
from fedloom.transport.roster import Roster
from fedloom.transport.tensors import CodecSpec
from fedloom.workloads.dp_sgd import LEDGER_KEY, LedgerTrainer, PrivacyLedger

log = logging.getLogger("fedloom.daemon")


READY_WAIT_S = 10.0  # longest wait for the dialled links before READY=1 anyway


OBSERVE_INTERVAL_S = 1.0  # connected peers, bytes, buffer fill -> metrics


# After SIGTERM, connections get this long to close in order (TAG_FINAL, close frames)
# before whatever is still running is cancelled again (systemd's stop timeout is longer).
STOP_GRACE_S = 6.0


def build_peers(d: Daemon) -> NetworkPeers:
    cfg = d.cfg
    dial: list[DialTarget] = []
    accept_from: list[str] | None = None
    allowed_roles: tuple[str, ...] | None = None
    routes: dict[str, str] = {}
    if cfg.parent is not None:
        assert cfg.parent.url is not None
        dial.append(DialTarget(cfg.parent.id, cfg.parent.url))
        # Standbys are dialled too (no Hello until the site fails over to one), so a
        # failover needs no connection set up after the parent is found dead.
        dial.extend(DialTarget(f.id, f.url) for f in cfg.fallbacks if f.url is not None)
    if cfg.role == "peer":
        listening = cfg.listen is not None
        dial = gossip_dial_targets(
            cfg.node_id, [(p.id, p.url) for p in cfg.peers], listening=listening
        )
        accept_from = [p.id for p in cfg.peers]
        if cfg.relay is not None and not listening:
            assert cfg.relay.url is not None
            dial.append(DialTarget(cfg.relay.id, cfg.relay.url))
            routes = {p.id: cfg.relay.id for p in cfg.peers if p.url is None}
    elif cfg.role == "relay":
        allowed_roles = ("peer",)  # any gossip peer of the roster may use the relay
    elif cfg.children:
        accept_from = list(cfg.children)
    codec = cfg.codec
    codecs = CodecPolicy(
        up=CodecSpec(kind=codec.up, topk_fraction=codec.topk_fraction),  # type: ignore[arg-type]
        down=CodecSpec(kind=codec.down),  # type: ignore[arg-type]
    )
    conn = cfg.connection
    peers = NetworkPeers(
        d.identity,
        d.roster,
        dial=dial,
        listen=cfg.listen,
        accept_from=accept_from,
        allowed_roles=allowed_roles,
        routes=routes,
        codecs=codecs,
        keepalive_s=conn.keepalive_s,
        down_after_s=conn.down_after_s,
        backoff=Backoff(base_s=conn.backoff_base_s, cap_s=conn.backoff_cap_s),
        rng=random.Random(derived_seed(cfg.seed, "backoff", cfg.node_id)),
        options=ChannelOptions(ciphers=conn.ciphers, offload=conn.offload),
        max_session_s=conn.max_session_s,
        roster_text=d.roster_text,
    )
    peers.gate.limits = GateLimits(
        max_pending=conn.max_pending,
        max_pending_per_address=conn.max_pending_per_address,
        handshake_timeout=conn.handshake_timeout_s,
    )
    layout = model_layout(d)
    if layout is not None:
        peers.e2e.set_layout(layout)
    elif cfg.role == "region":
        # A fresh region learns the layout from its first verified model; until then
        # its children have nothing model-sized to send it.
        peers.inbound_before_model = Limits.before_model()
    elif cfg.role == "relay":  # no model ever: the operator's cap on one envelope
        mib = conn.max_message_mib if conn.max_message_mib is not None else RELAY_MESSAGE_MIB
        cap = int(mib * MiB)
        peers.limits = Limits(max_message_bytes=cap, max_decoded_bytes=cap)
    return peers


def model_layout(d: Daemon) -> ModelLayout | None:
    """The layout of the node's model where it is known at start: the model it holds (a
    root, a gossip peer, a restored region) or the one its plan builds (a site). Its links
    then decode under caps of the model's size, and updates and models of another shape
    are refused before they are hashed (``runtime.signing``).

    Building the template also proves, before READY, that the model can be built here: a
    model whose package is not installed (the ``torch`` extra's) raises
    ``ModuleNotFoundError``, which stops the daemon with one line naming the extra
    (``fedloom.cli``, exit status 2) rather than leaving it healthy but failing every job."""
    model = model_of(d.node)
    if model is not None:
        return ModelLayout.of(model[1])
    if d.plan is None or (isinstance(d.plan, DeferredPlan) and not d.plan.built):
        return None  # a gated site's plan: its code runs at the first approved job
    try:
        return ModelLayout.of(d.plan.init(d.cfg.seed))
    except ModuleNotFoundError:
        raise
    except Exception as exc:  # the plan's own code: without a layout the defaults apply
        log.warning(
            "%s: cannot build the model template from the plan (%s); links decode under "
            "the default limits until the first model arrives",
            d.cfg.node_id,
            exc,
            extra={"node": d.cfg.node_id},
        )
        return None


async def _announce_ready(
    d: Daemon, peers: NetworkPeers, sink: Any, stop: asyncio.Event, wait_s: float
) -> None:
    """READY=1 once listening and the dialled links are up (or after ``wait_s`` anyway)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + wait_s
    wanted = frozenset(t.peer for t in peers.dial)
    while not stop.is_set():
        listening = d.cfg.listen is None or peers.listen_url is not None
        missing = wanted - peers.connected()
        if listening and (not missing or loop.time() >= give_up):
            break
        await asyncio.sleep(0.05)
    if stop.is_set():
        return
    parts = [f"{d.cfg.node_id} ({d.cfg.role})"]
    if peers.listen_url is not None:
        parts.append(f"listening on {peers.listen_url}")
    if wanted:
        missing = wanted - peers.connected()
        parts.append(f"waiting for {', '.join(sorted(missing))}" if missing else "links up")
    text = "; ".join(parts)
    systemd.ready(text)
    sink.set_ready(True)
    log.info(
        "ready: %s",
        text,
        extra={"node": d.cfg.node_id, "listen_url": peers.listen_url, "ready": True},
    )


def report_refusals(
    peers: NetworkPeers, sink: Callable[[Metric], None], seen: Counter[str]
) -> Counter[str]:
    """Connections refused before authentication since ``seen`` (by the gate's reasons,
    ``connection_cap`` for TCP connections over the listener's caps) into the metrics;
    returns the totals, the next call's ``seen``."""
    totals = Counter(peers.gate.refused)
    capped = getattr(peers.listener, "refused_connections", 0)
    if isinstance(capped, int) and capped:
        totals["connection_cap"] = capped
    for reason, n in (totals - seen).items():
        sink(Metric("connection_refused", float(n), labels={"reason": reason}))
    return totals


def report_duplicates(
    peers: NetworkPeers, sink: Callable[[Metric], None], seen: Counter[str]
) -> Counter[str]:
    """Second sessions refused per peer since ``seen`` (two daemons with one identity)
    into the metrics; returns the totals, the next call's ``seen``."""
    totals = Counter(peers.duplicate_identity)
    for peer, n in (totals - seen).items():
        sink(Metric("duplicate_identity", float(n), labels={"peer": peer}))
    return totals


async def _observe(d: Daemon, peers: NetworkPeers, sink: Any, stop: asyncio.Event) -> None:
    """Connected peers, bytes on the wire, refused connections and buffer fill, into the
    metrics, every second."""
    seen: dict[int, tuple[int, int]] = {}
    refused: Counter[str] = Counter()
    duplicates: Counter[str] = Counter()
    node: Any = d.node
    while True:
        sink.set_connected_peers(len(peers.connected()))
        refused = report_refusals(peers, sink, refused)
        duplicates = report_duplicates(peers, sink, duplicates)
        current: dict[int, tuple[int, int]] = {}
        for peer in peers.connected():
            conn = peers.table.get(peer)
            if conn is None:
                continue
            progress = conn.pipe.progress
            key = id(progress)
            last_in, last_out = seen.get(key, (0, 0))
            sink.add_bytes("received", max(0, progress.bytes_in - last_in))
            sink.add_bytes("sent", max(0, progress.bytes_out - last_out))
            current[key] = (progress.bytes_in, progress.bytes_out)
        seen = current
        fill = getattr(node, "buffer_fill", None)
        if isinstance(fill, int):
            sink(Metric("buffer_fill", float(fill)))
        if await sleep_or_stop(stop, OBSERVE_INTERVAL_S):
            return


async def _either(event: asyncio.Event, stop: asyncio.Event) -> None:
    """Until ``event`` or ``stop`` is set."""
    waiter = asyncio.ensure_future(event.wait())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        stopper.cancel()


async def _on_event(
    event: asyncio.Event, stop: asyncio.Event, action: Callable[[str], None]
) -> None:
    """Call ``action`` when ``event`` is set (unless ``stop`` comes first)."""
    await _either(event, stop)
    if event.is_set():
        action("shutdown requested")


async def _reload_on_hangup(
    keeper: RosterKeeper, hangup: asyncio.Event, stop: asyncio.Event
) -> None:
    """Re-read ``roster.path`` whenever ``hangup`` is set (SIGHUP), until ``stop``."""
    while True:
        await _either(hangup, stop)
        if stop.is_set():
            return
        hangup.clear()
        log.info("%s: SIGHUP: re-reading %s", keeper.identity.node_id, keeper.path)
        try:
            await keeper.reload_file()
        except Exception:  # a bug in one reload must not end the daemon
            log.exception("%s: reloading the roster failed", keeper.identity.node_id)


def _persist_roster(d: Daemon) -> Callable[[Roster, str], None]:
    """Keep an installed roster (and its text) in the state directory, durably."""

    def persist(roster: Roster, text: str) -> None:
        value = {"version": roster.version, "digest": roster.digest, "text": text}
        d.store.apply(Persist(ROSTER_SEEN_KEY, value))
        d.roster, d.roster_text = roster, text

    return persist


def _dp_sgd_trainer(
    d: Daemon,
    inner: Trainer,
    sink: Callable[[Metric], None],
    loop: asyncio.AbstractEventLoop,
    pool: cf.Executor | None,
) -> Trainer:
    """A DP-SGD site's trainer: its privacy ledger restored from the state dir, each job
    admitted against ``epsilon_budget`` and recorded there before its result is released
    (``workloads.dp_sgd``); ε on ``/metrics`` (``fedloom_site_privacy_epsilon``)."""
    cfg = d.cfg
    assert cfg.dp_sgd is not None
    value = d.recovery.values.get(LEDGER_KEY)
    try:
        history = [] if value is None else PrivacyLedger.parse(value)
    except ValueError as exc:
        raise ConfigError(f"state_dir: {cfg.state_dir} holds a corrupt value: {exc}") from None

    def show(m: Metric) -> None:  # from a training thread: the sink runs on the loop
        loop.call_soon_threadsafe(sink, m)

    ledger = PrivacyLedger(
        cfg.dp_sgd,
        history,
        persist=lambda v: d.store.apply(Persist(LEDGER_KEY, v)),
        on_epsilon=lambda eps: show(Metric("site_privacy_epsilon", eps)),
        on_refused=lambda: show(Metric("privacy_budget_refused")),
        name=cfg.node_id,
    )
    return LedgerTrainer(inner, ledger, n_examples_of(d.plan), pool)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedloom")
    except PackageNotFoundError:
        return "dev"


async def serve(
    d: Daemon,
    *,
    eval_interval_s: float | None = None,
    ready_wait_s: float = READY_WAIT_S,
    install_signals: bool = True,
    shutdown: asyncio.Event | None = None,
    hangup: asyncio.Event | None = None,
    trainer: Trainer | None = None,
    executor: cf.Executor | None = None,
) -> None:
    """Run the daemon until SIGTERM/SIGINT or until ``shutdown`` is set (see the module
    docstring); re-read the roster on SIGHUP or whenever ``hangup`` is set.
    ``eval_interval_s`` None: the default for the role. ``trainer`` (and the ``executor``
    it runs in, left open here): instead of the plan's (``runtime.chaos.loadgen``)."""
    from fedloom.runtime.health import start_observability
    from fedloom.runtime.metrics import MetricsSink

    cfg = d.cfg
    loop = asyncio.get_running_loop()
    sink = MetricsSink(per_source=True)
    sink.set_info(cfg.node_id, cfg.role, _package_version())
    model = model_of(d.node)
    if model is not None:
        sink(Metric("model_version", float(model[0])))
    peers = build_peers(d)
    peers.e2e.report = sink  # refused signatures count as rejected updates/messages
    # Relayed envelopes' numbers outlive a restart: no replay to this node after one.
    try:
        relay_seq = RelaySeqState(d.store, d.recovery.values.get(RELAY_SEQ_KEY))
    except ValueError as exc:
        raise ConfigError(f"state_dir: {cfg.state_dir} holds a corrupt value: {exc}") from None
    peers.e2e.keep_relay_seq(relay_seq)
    floor = model_floor(d.node)
    if floor is not None:  # no rollback to a model older than one held before the restart
        # ... nor another model under the version held: its digest is checked too.
        peers.e2e.guard = ModelVersionGuard(floor, model_floor_digest(d.node, floor))
    peers.on_link_rtt = sink.observe_link_rtt  # sampled at every connection's handshake
    peers.on_input_rejected = sink.input_rejected  # bad bytes from a connected peer
    audit = open_audit(d, peers, sink)  # the audit log (runtime.audit): its writer runs
    keeper = RosterKeeper(
        d.identity,
        d.roster.consortium_key,
        d.roster,
        d.roster_text,
        persist=_persist_roster(d),
        path=cfg.roster_path,
        installed=audit.on_roster(lambda roster: bound_claims(cfg, d.node, roster)),
    )
    keeper.attach(peers)
    if hangup is None:
        hangup = asyncio.Event()
    own_executor: cf.Executor | None = None
    own_pool: cf.Executor | None = None
    if trainer is None and cfg.role in ("site", "peer") and d.plan is not None:
        trainer = PlanTrainer(d.plan)
        executor = own_executor = make_executor(cfg.executor.kind, cfg.executor.workers)
        if cfg.dp_sgd is not None:  # the ledger stays in this process; jobs may not
            if cfg.executor.kind == "process":
                own_pool, executor = executor, make_executor("thread", cfg.executor.workers)
                own_executor = executor
            trainer = _dp_sgd_trainer(d, trainer, sink, loop, own_pool)
        # [governance]: the approval gate runs in this process (jobs may not), first.
        gate_pool: cf.Executor | None = None
        if approval_required(cfg)[0] and cfg.executor.kind == "process" and own_pool is None:
            own_pool = gate_pool = executor
            executor = own_executor = make_executor("thread", cfg.executor.workers)
        trainer = site_gate(cfg, trainer, gate_pool)
    # Daemon services layered around the node (runtime.middleware): each adds itself to
    # ``layered`` below, once the driver it posts its own events through exists.
    layered = LayeredNode(d.node)
    driver = AsyncDriver(
        layered,
        peers=peers,
        trainer=trainer,
        executor=executor,
        store=d.store,
        metrics=sink,
        seed=cfg.seed,
    )
    post = poster(driver.post_nowait)  # for the services' own events
    layered.add(audit)  # observes what the node sends, applies, releases and refuses
    # federated evaluation and statistics (runtime.reports), under [governance]
    add_reports(layered, d, post, reports_gate(cfg, trainer))
    # The status board (/status, fedloom status; runtime.status): observes only, and only
    # an aggregator with a metrics port to show it on keeps one.
    served = cfg.is_aggregator and cfg.metrics_port
    board = board_for_daemon(d, layered, loop.time()) if served else None
    if board is not None:
        layered.add(board)
    stop = asyncio.Event()
    main = asyncio.current_task()
    outside = asyncio.all_tasks(loop)  # tasks not ours to cancel (in-process callers)
    finished = False
    forced = False
    forced_once: list[bool] = []  # force_stop has warned (a list: set from a callback)

    def force_stop() -> None:
        # A task that swallowed its cancellation (e.g. one whose link ended at the same
        # moment) would keep the daemon alive after SIGTERM: cancel what is left, again.
        if finished:
            return
        pending = [
            t
            for t in asyncio.all_tasks(loop)
            if t is not main and t not in outside and not t.done()
        ]
        log.log(
            logging.DEBUG if forced_once else logging.WARNING,  # once is enough to know
            "%s: still stopping after %.1f s; cancelling %d task(s): %s",
            cfg.node_id,
            STOP_GRACE_S,
            len(pending),
            ", ".join(sorted(t.get_name() for t in pending))[:500],
            extra={"node": cfg.node_id},
        )
        forced_once.append(True)
        for task in pending:
            task.cancel()
        loop.call_later(1.0, force_stop)

    def request_stop(why: str) -> None:
        if stop.is_set():
            return
        log.info("%s: %s: shutting down", cfg.node_id, why, extra={"node": cfg.node_id})
        systemd.stopping()
        sink.set_ready(False)
        stop.set()
        driver.stop()
        loop.call_later(STOP_GRACE_S, force_stop)

    signals = (signal.SIGTERM, signal.SIGINT) if install_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, request_stop, sig.name)
    if install_signals:
        loop.add_signal_handler(signal.SIGHUP, hangup.set)
    interval = eval_interval_s
    if interval is None:
        interval = DEFAULT_EVAL_INTERVAL_S if cfg.role in ("root", "peer") else 0.0
    evaluating = interval > 0 and d.plan is not None and isinstance(d.node, ModelHolder)
    obs = None
    try:
        if cfg.metrics_port:
            try:
                obs = await start_observability(
                    sink, cfg.metrics_host, cfg.metrics_port, status=_status_of(board, driver)
                )
            except OSError as exc:
                raise DaemonError(
                    f"metrics: cannot listen on {cfg.metrics_host}:{cfg.metrics_port}: {exc}"
                ) from None
        log.info(
            "%s (%s): %s",
            cfg.node_id,
            cfg.role,
            recovery_summary(d.recovery),
            extra={"node": cfg.node_id, "epoch": d.recovery.epoch},
        )
        if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
            log.info(
                "%s: started without GLIBC_TUNABLES; model-sized buffers will be mapped and "
                "zeroed afresh every round (the systemd units set GLIBC_TUNABLES=%s)",
                cfg.node_id,
                GLIBC_TUNABLES,
                extra={"node": cfg.node_id},
            )
        secagg_pool.install()  # masking's worker threads (algorithms/ starts none)
        if cfg.is_aggregator:
            half.one_thread()  # it trains nothing: fp16 conversions in one call each
        # What start-up built (modules, config, recovered state) lives as long as the
        # process: frozen, it stays out of every later full collection's scan. Garbage
        # is collected first, so none of it is frozen for good.
        gc.collect()
        gc.freeze()
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(driver.run(), name=f"driver {cfg.node_id}")
            tg.create_task(_announce_ready(d, peers, sink, stop, ready_wait_s))
            tg.create_task(systemd.watchdog_loop(stop))
            tg.create_task(_observe(d, peers, sink, stop))
            tg.create_task(_reload_on_hangup(keeper, hangup, stop))
            if evaluating:
                tg.create_task(evaluate_models(d, sink, stop, interval, _evaluated(board, loop)))
            if shutdown is not None:
                tg.create_task(_on_event(shutdown, stop, request_stop))
            try:
                await run
            except asyncio.CancelledError:
                if main is None or main.cancelling():
                    raise  # our caller's cancellation, not the stop's
                # force_stop cancelled the driver after the grace period; it ended only
                # once its writes were done (see AsyncDriver.run), so stopping is safe.
                forced = True
            finally:
                stop.set()  # the helpers end with the driver, whichever way it ended
    except* ListenError as group:
        raise DaemonError(f"listen: {_leaf(group)}") from None
    finally:
        finished = True
        for sig in signals:
            loop.remove_signal_handler(sig)
        if install_signals:
            loop.remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not a kill during the last checkpoint
        await audit.close(clean=not forced)  # daemon_stop, then the queue to disk
        if obs is not None:
            await obs.stop()
        if own_executor is not None:
            own_executor.shutdown(wait=False, cancel_futures=True)
        if own_pool is not None:
            own_pool.shutdown(wait=False, cancel_futures=True)
    unwritten = driver.unwritten_at_forced_stop
    if forced and unwritten is not None:
        # The disk stalled: no final checkpoint (more slow writes); the log already holds
        # everything acknowledged, and a restart recovers from it.
        log.warning(
            "%s: stopped while a state write was still in progress: waited for it, then "
            "stopped without writing the %d record(s) behind it (never acknowledged: their "
            "senders resend them) or a final checkpoint",
            cfg.node_id,
            unwritten,
            extra={"node": cfg.node_id, "unwritten_records": unwritten},
        )
        return
    if isinstance(d.node, Restorable):
        d.store.apply(Persist(CHECKPOINT_KEY, d.node.snapshot()))
    if forced:
        log.warning(
            "%s: stopped after %.1f s of grace: the driver had to be cancelled (its writes "
            "completed first)",
            cfg.node_id,
            STOP_GRACE_S,
            extra={"node": cfg.node_id},
        )
    else:
        log.info("%s: stopped cleanly", cfg.node_id, extra={"node": cfg.node_id})


def _status_of(
    board: StatusBoard | None, driver: AsyncDriver
) -> Callable[[], dict[str, Any]] | None:
    """The status document provider of the metrics port (on the node's clock)."""
    return None if board is None else (lambda: board.document(driver.now()))


def _evaluated(
    board: StatusBoard | None, loop: asyncio.AbstractEventLoop
) -> Callable[[int, Mapping[str, float]], None] | None:
    """The root's own evaluations into its status board's accuracy curve."""
    return None if board is None else (lambda v, m: board.evaluated(v, m, loop.time()))


def _leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception of a (nested) task-group error."""
    first = group.exceptions[0]
    return _leaf(first) if isinstance(first, BaseExceptionGroup) else first
