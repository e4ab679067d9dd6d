"""The asyncio driver: runs one sans-I/O node on the real clock.

It is the runtime's half of the two-driver design (DESIGN.md); ``sim/driver.py`` is the
other. One task reads one inbox of events and runs the shared step
(``federation.step.NodeStep``: ``node.handle(event, now)`` with ``now = clock()``,
``loop.time()`` by default, the note on a node's exception, the training seed, the
stuck-deadline guard), which hands the effects in order to this driver, its sink:

* ``Persist`` -> the store's ``apply_many`` in a thread. All consecutive ``Persist``
  effects are committed as one batch. A batch is durable before any message sent after
  it can be *delivered*: the driver does not wait for the disk, it hands the commit to
  the connections as a gate (``peers.send(..., after=commit)``), and each message is
  encoded, encrypted and streamed at once while its last record waits for the gate. So
  an ``Ack`` never reaches a peer before the record it acknowledges is on disk, yet a
  100 MB update travels while its outbox copy is being fsynced. Group commit: one write
  is in flight at a time; the batches of the events handled meanwhile (the node goes on
  handling them) form one group, written as one ``apply_many`` (one WAL frame, one
  fsync) as soon as that write completes, and the sends that follow them are gated on
  the group's write. So the disk's latency no longer paces ``handle()``, and the fsyncs
  per update fall as the load rises. A group holds at most ``MAX_GROUP`` Persists (once
  an event's effects have filled it, the next ``handle()`` waits for the write in
  flight: that bounds the memory held by pending writes), and a failed commit stops the
  driver with its exception (the group behind it is never written and none of its sends
  is delivered);
* ``Send``    -> ``peers.send(peer, msg, after)`` (queued on the peer's connection,
  which encodes it, in a thread when large; dropped when the peer is not connected);
* ``Train``   -> the trainer runs in ``executor``; the job posts ``TrainDone`` or, when
  it raises, ``TrainFailed(job, reason)`` (logged with the traceback, per exception type
  at most once a minute);
* ``Metric``  -> the ``metrics`` sink, gated like a message: a metric handed out while a
  write is on its way to disk reaches the sink once that write is durable, in order, so
  ``/metrics`` never shows a model version (or an applied update) that a crash can take
  back (issue 13: a root killed while writing the record of v237 showed v237, then came
  back at v236, which looked like a version published then unpublished);
  ``Log`` -> the ``logging`` module, structured;
* deadlines   -> after every ``handle`` the node's ``next_deadline()`` becomes the one
  time-out (``asyncio.timeout_at``) on the wait for the next event; a due deadline is
  handled before further inbox events, so a busy inbox cannot starve it. An overdue one
  is handled after one pass of the loop (``asyncio.sleep(0)``), so a node that keeps
  asking for "now" cannot freeze the loop (heartbeats, ``/metrics``, SIGTERM go on) until
  the step's stuck-deadline guard ends ``run()`` with its error.

Structured concurrency: the peer set and every training job are tasks of one
``TaskGroup``; ``stop()`` ends ``run()``, which cancels them (a job already running in
a worker thread finishes there, its result is discarded). A bug in the node (an
exception out of ``handle``) ends ``run()`` with that exception.

``clock`` and ``time_scale`` let a federation run on a sped-up clock: node time advances
``time_scale`` seconds per second of ``loop.time()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedloom.algorithms.protocol import (
    Deadline,
    Event,
    Log,
    Metric,
    Node,
    Persist,
    Send,
    TrainDone,
    TrainFailed,
    TrainResult,
    Weights,
)
from fedloom.algorithms.warn_limit import WarnLimiter
from fedloom.federation.step import NodeStep
from fedloom.federation.training import Trainer, TrainingRefusedError
from fedloom.runtime.peer_table import PeerSet, Valid
from fedloom.transport.error_text import describe

node_log = logging.getLogger("fedloom.node")
log = logging.getLogger("fedloom.runtime.driver")

MetricSink = Callable[[Metric], None]
DEFAULT_MAX_INBOX = 1024
# Persists waiting behind the write in flight before the node must wait for it (each may
# hold a whole delta: this bounds what pending writes keep in memory).
MAX_GROUP = 64
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class Store(Protocol):
    """Durable state: ``federation.store.StateStore`` (tests may use an in-memory one)."""

    def apply_many(self, items: Sequence[Persist]) -> None:
        """Make every item durable, in order, before returning."""
        ...


@dataclass(slots=True)
class DriverStats:
    """What the driver did (counters, updated in place)."""

    events: int = 0  # node.handle calls
    stale_events: int = 0  # messages dropped because their connection had gone
    deadlines: int = 0
    sends: int = 0
    sends_dropped: int = 0  # the peer was not connected
    persists: int = 0
    commits: int = 0  # store writes (apply_many calls)
    grouped: int = 0  # batches that waited behind a write in flight and shared one write
    jobs_started: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0


class _Stop:
    """Inbox sentinel that ends ``run``."""


_STOP = _Stop()


JOB_TRACEBACK_EVERY_S = 60.0  # a failed job's traceback, per exception type, at most this often


class AsyncDriver:
    """Runs ``node`` on an asyncio loop (see the module docstring)."""

    def __init__(
        self,
        node: Node,
        *,
        peers: PeerSet,
        trainer: Trainer | None = None,
        executor: cf.Executor | None = None,
        store: Store | None = None,
        clock: Callable[[], float] | None = None,
        time_scale: float = 1.0,
        metrics: MetricSink | None = None,
        seed: int = 0,
        max_inbox: int = DEFAULT_MAX_INBOX,
    ) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        if max_inbox < 1:
            raise ValueError(f"max_inbox must be >= 1, got {max_inbox}")
        self.node = node
        self.node_id = node.node_id
        self.peers = peers
        self.trainer = trainer
        self.store = store
        self.metrics = metrics
        self.seed = seed
        self.time_scale = float(time_scale)
        self.max_inbox = max_inbox
        self.stats = DriverStats()
        self._clock = clock
        self._executor = executor
        self._own_executor: cf.ThreadPoolExecutor | None = None
        self._store_pool: cf.ThreadPoolExecutor | None = None
        self._inbox: asyncio.Queue[tuple[Event | _Stop, Valid | None]] = asyncio.Queue()
        self._room = asyncio.Event()
        self._room.set()
        self._tg: asyncio.TaskGroup | None = None
        self._jobs: dict[int, asyncio.Task[None]] = {}
        # A failed job's traceback, per exception type, at most every JOB_TRACEBACK_EVERY_S:
        # a parent that re-sends a request the trainer fails on would log one per request.
        self._job_tracebacks = WarnLimiter(JOB_TRACEBACK_EVERY_S)
        self._deadline_at: float | None = None  # loop time of the node's next deadline
        # The shared step (federation.step): note wrapper, seed injection, stuck-deadline
        # guard, effect dispatch to this driver (the sink).
        self._step = NodeStep(node, self, seed=seed)
        self._last_now = float("-inf")
        self._running = False
        self._stopping = False
        self._commit_pending: asyncio.Future[None] | None = None  # the write in flight
        self._group: list[Persist] = []  # batches waiting for the write in flight
        self._group_done: asyncio.Future[None] | None = None  # their write's outcome
        self._failure: BaseException | None = None  # a failed commit: run() raises it
        # A stop forced while a write was in flight: how many Persists were left unwritten
        # behind it (None: no such stop). Their sends never left, so nothing acked is lost.
        self.unwritten_at_forced_stop: int | None = None
        # Metrics waiting for the write they followed (None: no write): shown in order.
        self._held_metrics: deque[tuple[asyncio.Future[None] | None, Metric]] = deque()
        self._metrics_hook: asyncio.Future[None] | None = None  # the gate we listen to

    # ------------------------------------------------------------------ public API

    def now(self) -> float:
        """The node's clock now (``loop.time()`` unless a clock was given)."""
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()

    @property
    def running(self) -> bool:
        return self._running

    def post_nowait(self, event: Event, valid: Valid | None = None) -> None:
        """Queue ``event``; if ``valid`` is given it is checked when the event comes up,
        and the event is dropped when it returns False (its connection has gone)."""
        self._inbox.put_nowait((event, valid))

    async def post(self, event: Event, valid: Valid | None = None) -> None:
        """Queue ``event``, waiting while ``max_inbox`` events are already waiting."""
        while self._inbox.qsize() >= self.max_inbox and not self._stopping:
            self._room.clear()
            await self._room.wait()
        self._inbox.put_nowait((event, valid))

    def stop(self) -> None:
        """Make ``run()`` return soon (training jobs and connections are cancelled)."""
        if not self._stopping:
            self._stopping = True
            self._room.set()
            self._inbox.put_nowait((_STOP, None))

    async def run(self) -> None:
        """Drive the node until ``stop()``; re-raises a bug in the node or peer set."""
        if self._running:
            raise RuntimeError(f"{self.node_id}: driver is already running")
        self._running = True
        self._store_pool = cf.ThreadPoolExecutor(1, thread_name_prefix=f"store-{self.node_id}")
        if self._executor is None and self.trainer is not None:
            self._own_executor = cf.ThreadPoolExecutor(
                1, thread_name_prefix=f"train-{self.node_id}"
            )
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                peers = tg.create_task(self.peers.run(self), name=f"peers {self.node_id}")
                try:
                    await self._serve()
                    if self._failure is not None:
                        raise self._failure
                finally:
                    peers.cancel()
                    for job in list(self._jobs.values()):
                        job.cancel()
        finally:
            self._tg = None
            # Whatever ends run(), the writes already decided complete: the one in flight,
            # then the group behind it (which its completion starts, unless it failed; a
            # write that is done may not have started its group yet: wait for the group).
            # A forced stop (the daemon cancels what is left after its grace period, e.g.
            # on a stalled disk) still waits for the write in flight (the store's thread
            # finishes it anyway; the process could not exit before), but does not start
            # the group behind it: its sends are gated on it, so none of it was acked.
            forced = False
            while True:
                pending = self._commit_pending
                if pending is None or pending.done():
                    pending = self._group_done
                    if pending is None:
                        break
                try:
                    await asyncio.shield(pending)
                except asyncio.CancelledError:
                    forced = True
                    self._drop_group()
                except Exception:  # the write's own failure was reported where it failed
                    pass
            self._running = False
            self._store_pool.shutdown(wait=False)
            if self._own_executor is not None:
                self._own_executor.shutdown(wait=False, cancel_futures=True)
                self._own_executor = None
            if forced:
                raise asyncio.CancelledError  # the caller asked for it; now it is safe

    # ------------------------------------------------------------------- internals

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._refresh_deadline(loop)
        inbox = self._inbox
        while not self._stopping:
            event: Event | _Stop
            due = self._deadline_at
            if due is not None and loop.time() >= due:
                # Already due: yield to the loop first, so a node that keeps asking for
                # "now" cannot starve the loop's other work (heartbeats, /metrics, the
                # SIGTERM handler) while the step's guard counts its re-fires.
                await asyncio.sleep(0)
                if self._stopping:
                    break
                event = Deadline()
            else:
                try:
                    async with asyncio.timeout_at(due):
                        event, valid = await inbox.get()
                except TimeoutError:
                    event = Deadline()
                else:
                    if not self._room.is_set() and inbox.qsize() < self.max_inbox:
                        self._room.set()
                    if valid is not None and not valid():
                        self.stats.stale_events += 1
                        continue
            if isinstance(event, _Stop):
                break
            await self._dispatch(event, loop)

    async def _dispatch(self, event: Event, loop: asyncio.AbstractEventLoop) -> None:
        now = self.now()
        if now < self._last_now:
            now = self._last_now  # handle() sees a clock that never goes back
        self._last_now = now
        self.stats.events += 1
        if type(event) is Deadline:
            self.stats.deadlines += 1
        wanted = self._step(event, now)
        # A full group behind the write in flight: wait for that write before the next
        # event (bounds the memory pending writes hold; the sends are gated either way).
        while len(self._group) >= MAX_GROUP and self._group_done is not None:
            # Shielded: once started, a commit completes even if run() is being cancelled.
            # Its completion starts the group (then empty again), or raises its failure.
            in_flight = self._commit_pending
            assert in_flight is not None
            if in_flight.done():
                # Written, but its done-callback (``_commit_done``, which starts the group)
                # is only scheduled: awaiting a done future does not yield, so yield once
                # and let it run (awaiting it again here spun the loop for good).
                in_flight.result()  # a failed write raises here, as awaiting it would
                await asyncio.sleep(0)
            else:
                await asyncio.shield(in_flight)
        self._set_deadline(loop, wanted)

    # ------------------------------------------- the effect sink (federation.step)

    def train(self, node_id: str, job: int, weights: Weights, config: Mapping[str, Any]) -> None:
        """``Train``: a task of the driver's group runs the trainer in the executor."""
        assert self._tg is not None
        self.stats.jobs_started += 1
        task = self._tg.create_task(
            self._train_job(job, weights, config), name=f"train {self.node_id}#{job}"
        )
        self._jobs[job] = task
        task.add_done_callback(lambda _: self._jobs.pop(job, None))

    def persist(self, node_id: str, batch: list[Persist]) -> None:
        """``Persist`` (one batch): start writing it, or add it to the group behind the
        write in flight; the sends that follow are gated on the write that holds it."""
        self.stats.persists += len(batch)
        if self.store is None:
            self.stats.commits += 1
            return
        pending = self._commit_pending
        if pending is not None and pending.done() and not pending.cancelled():
            pending.result()  # a failed write: nothing more is written (raises it)
        if self._group_done is None and (pending is None or pending.done()):
            self._start_write(batch, None)
            return
        if self._group_done is None:
            self._group_done = asyncio.get_running_loop().create_future()
        self._group.extend(batch)
        self.stats.grouped += 1

    def _start_write(self, items: list[Persist], done: asyncio.Future[None] | None) -> None:
        """Hand ``items`` to the store thread; ``done`` (a group's gate) gets the outcome."""
        assert self.store is not None
        self.stats.commits += 1
        loop = asyncio.get_running_loop()
        commit = loop.run_in_executor(self._store_pool, self.store.apply_many, items)
        commit.add_done_callback(functools.partial(self._commit_done, done))
        self._commit_pending = commit

    def _commit_done(self, done: asyncio.Future[None] | None, commit: asyncio.Future[None]) -> None:
        error = None if commit.cancelled() else commit.exception()
        if done is not None and not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
                done.exception()  # retrieved: gated sends see it; no "never retrieved" log
        if error is not None:
            if self._failure is None:
                self._failure = error
                log.error("%s: durable write failed: %s", self.node_id, self._failure)
            group = self._group_done
            if group is not None:  # never written: none of its sends may be delivered
                self._group, self._group_done = [], None
                group.set_exception(error)
                group.exception()
            self.stop()
            return
        if self._group_done is not None:  # the group waiting for this write goes next
            items, group = self._group, self._group_done
            self._group, self._group_done = [], None
            self._start_write(items, group)

    def _drop_group(self) -> None:
        """Forget the group behind the write in flight (a forced stop): never written, so
        the sends it gates are never delivered."""
        group = self._group_done
        dropped = len(self._group) if group is not None else 0
        self.unwritten_at_forced_stop = (self.unwritten_at_forced_stop or 0) + dropped
        if group is not None:  # as for a failed write: the gated sends see an error
            self._group, self._group_done = [], None
            group.set_exception(RuntimeError(f"{self.node_id}: stopped before this write"))
            group.exception()

    def _gate(self) -> asyncio.Future[None] | None:
        """The write a message sent now must not overtake (None when all are on disk)."""
        if self._group_done is not None:
            return self._group_done  # written after the one in flight: covers both
        pending = self._commit_pending
        if (
            pending is not None
            and pending.done()
            and not pending.cancelled()
            and pending.exception() is None
        ):
            self._commit_pending = pending = None  # on disk: nothing to wait for
        return pending

    def send(self, node_id: str, effect: Send) -> None:
        """``Send``: queued on the peer's connection, gated on the write before it."""
        if self.peers.send(effect.peer, effect.msg, self._gate()):
            self.stats.sends += 1
        else:
            self.stats.sends_dropped += 1
            log.debug(
                "%s: %s to %s dropped: not connected",
                self.node_id,
                type(effect.msg).__name__,
                effect.peer,
                extra={"node": self.node_id, "peer": effect.peer},
            )

    def metric(self, node_id: str, m: Metric, now: float) -> None:
        """``Metric``: to the metrics sink once the write before it is durable."""
        if self.metrics is None:
            return
        gate = self._gate()
        if gate is None and not self._held_metrics:
            self._show(m)
            return
        self._held_metrics.append((gate, m))
        if gate is not None and gate is not self._metrics_hook:
            self._metrics_hook = gate
            gate.add_done_callback(self._release_metrics)
        self._release_metrics()

    def _release_metrics(self, _: object = None) -> None:
        """Show held metrics, oldest first, whose write is durable; drop those whose
        write failed (what they report never happened durably)."""
        held = self._held_metrics
        while held:
            gate, m = held[0]
            if gate is not None and not gate.done():
                return
            held.popleft()
            if gate is None or (not gate.cancelled() and gate.exception() is None):
                self._show(m)

    def _show(self, m: Metric) -> None:
        assert self.metrics is not None
        try:
            self.metrics(m)
        except Exception:  # observability must not take the node down
            log.exception("%s: metrics sink failed on %s", self.node_id, m.name)

    def log(self, node_id: str, entry: Log, now: float) -> None:
        """``Log``: the ``logging`` module, structured."""
        level = _LEVELS.get(entry.level.lower(), logging.INFO)
        if not node_log.isEnabledFor(level):
            return
        fields = dict(entry.fields or {})
        detail = " ".join(f"{k}={v}" for k, v in fields.items())
        node_log.log(
            level,
            "%s: %s%s",
            self.node_id,
            entry.text,
            f" ({detail})" if detail else "",
            extra={"node": self.node_id, "fields": fields},
        )

    async def _train_job(self, job: int, weights: Weights, config: Mapping[str, Any]) -> None:
        if self.trainer is None:
            self._job_failed(job, "this node has no trainer configured")
            return
        executor = self._executor if self._executor is not None else self._own_executor
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(
                executor, self.trainer, self.node_id, weights, config
            )
        except asyncio.CancelledError:
            raise
        except TrainingRefusedError as exc:  # declared (a spent privacy budget): no traceback
            self._job_failed(job, str(exc), exc.code)
            return
        except (Exception, SystemExit) as exc:  # a plan's sys.exit() ends its job, not the daemon
            # The node logs each failure's reason (a line per code a minute); the traceback,
            # many lines, at most once per exception type per JOB_TRACEBACK_EVERY_S.
            kind = type(exc).__name__
            if self._job_tracebacks.due("job", kind, loop.time()) is not None:
                log.warning(
                    "%s: training job %d failed: %s: %s",
                    self.node_id,
                    job,
                    kind,
                    describe(exc),
                    exc_info=True,
                    extra={"node": self.node_id, "job": job},
                )
            self._job_failed(job, f"{kind}: {describe(exc)}")
            return
        if not isinstance(result, TrainResult):
            self._job_failed(job, f"the trainer returned {type(result).__name__}, not TrainResult")
            return
        self.stats.jobs_done += 1
        self.post_nowait(TrainDone(job, result))

    def _job_failed(self, job: int, reason: str, code: str = "failed") -> None:
        self.stats.jobs_failed += 1
        self.post_nowait(TrainFailed(job, reason, code))

    def _refresh_deadline(self, loop: asyncio.AbstractEventLoop) -> None:
        self._set_deadline(loop, self.node.next_deadline())

    def _set_deadline(self, loop: asyncio.AbstractEventLoop, wanted: float | None) -> None:
        if wanted is None:
            self._deadline_at = None
            return
        self._deadline_at = loop.time() + (wanted - self.now()) / self.time_scale
