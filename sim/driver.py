"""The simulation driver: runs sans-I/O nodes on the kernel's virtual clock.

It is the simulator's half of the two-driver design (see DESIGN.md). Each node runs the
shared step (``federation.step.NodeStep``: note wrapper, training seed, stuck-deadline
guard, effect dispatch), with this driver as the sink of every node's effects:

* events in: ``node.handle(event, now)`` with ``now = kernel.now``;
* ``Send``    -> ``Network.send`` (size from the real codec, FIFO links, partitions);
* ``Train``   -> duration from the ``ComputeModel``, dropout from ``Availability``; the job
  is submitted to the executor now (start snapshot) and joined when its end event fires
  (``TrainDone``), or ``TrainFailed(job, "dropout")`` is delivered at that time;
* ``Persist`` -> counted (and kept in ``store`` when ``record_persist``); with
  ``state_dir``, written to the node's recovery log first (``sim.durability``);
* ``Metric``  -> totals, staleness values, listeners, and the ``InvariantChecker``; the
  live gauges a daemon shows on its metrics page (``LIVE_GAUGES``: outbox, link and
  buffer state, a few per node per event) are skipped unless ``live_gauges=True``;
* ``Log``     -> counted by level, sent to the ``fedloom.sim`` logger at debug level;
* deadlines   -> after every ``handle`` the node's ``next_deadline()`` is (re)scheduled,
  replacing the stale entry (cancelled lazily, O(log n)).

With ``signing=True`` every node signs what it sends and checks what it receives as a
daemon does (``sim.durability.SimSigning``); ``restart``/``restart_at`` bring a node
back from its recovery log mid-run.

At the start every neighbour link (parent/child, gossip peers) is announced to both ends
with ``PeerUp`` after the link's latency. Effects are carried out in list order, so a
``Persist`` always precedes the ``Send`` of the acknowledgement that follows it.

Events at the same virtual time run in scheduling order, except that deadlines run after
the messages and job ends of their instant and observers after everything else.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedloom.algorithms.outbox import OUTBOX_GAUGES
from fedloom.algorithms.protocol import (
    Deadline,
    Event,
    Log,
    Metric,
    Node,
    PeerDown,
    PeerUp,
    Persist,
    Received,
    Send,
    TrainDone,
    TrainFailed,
    Weights,
)
from fedloom.federation.invariants import InvariantChecker
from fedloom.federation.step import NodeStep
from fedloom.federation.training import Trainer, TrainingRefusedError
from fedloom.sim.availability import Availability
from fedloom.sim.compute import ComputeModel
from fedloom.sim.durability import SimSigning, SimStores
from fedloom.sim.executors import Executor, InlineExecutor
from fedloom.sim.kernel import Handle, Kernel, SimulationError
from fedloom.sim.network import Codec, LinkModel, Network, Partition
from fedloom.transport.codec_policy import CodecPolicy

logger = logging.getLogger("fedloom.sim")

PRIORITY_EVENT = 0  # messages, link notices, job ends
PRIORITY_DEADLINE = 1  # after the messages of the same instant
PRIORITY_OBSERVER = 2  # sees the state after everything of its instant

# Gauges of a node's live state (for a daemon's /metrics page and status): their totals
# over a run mean nothing, and at 100,000 sites they were most of the metrics.
LIVE_GAUGES = OUTBOX_GAUGES | frozenset({"dispatch_paused", "held_updates", "buffer_fill"})


@dataclass(slots=True)
class SimStats:
    """What a run did. ``to_dict(wall=False)`` is identical for identical seeds."""

    virtual_time: float = 0.0
    events: int = 0  # kernel callbacks run
    deliveries: int = 0  # node.handle calls
    wall_time_s: float = 0.0
    messages_sent: int = 0
    messages_delivered: int = 0
    messages_blocked: int = 0
    messages_lost: int = 0
    messages_rejected: int = 0
    bytes_sent: int = 0
    bytes_by_tier: dict[str, int] = field(default_factory=dict)
    messages_by_tier: dict[str, int] = field(default_factory=dict)
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    encodings: int = 0
    jobs_started: int = 0
    jobs_finished: int = 0
    jobs_dropped: int = 0
    jobs_abandoned: int = 0  # their node died while they ran
    persists: int = 0
    commits: int = 0  # recovery-log writes (with state_dir): one per Persist batch
    signed: int = 0  # signatures made (with signing)
    verified: int = 0  # signatures checked and good
    unverified: int = 0  # messages refused on arrival by their signature check
    restarts: int = 0
    logs_by_level: dict[str, int] = field(default_factory=dict)
    metric_totals: dict[str, float] = field(default_factory=dict)
    metric_counts: dict[str, int] = field(default_factory=dict)
    staleness: list[float] = field(default_factory=list)
    updates_applied: int = 0
    updates_duplicated: int = 0
    deaths: int = 0

    @property
    def messages_dropped(self) -> int:
        """Sent but never handed to the receiver (cut link, lost in flight, refused)."""
        return self.messages_blocked + self.messages_lost + self.messages_rejected

    def to_dict(self, wall: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "virtual_time": self.virtual_time,
            "events": self.events,
            "deliveries": self.deliveries,
            "messages_sent": self.messages_sent,
            "messages_delivered": self.messages_delivered,
            "messages_blocked": self.messages_blocked,
            "messages_lost": self.messages_lost,
            "messages_rejected": self.messages_rejected,
            "messages_dropped": self.messages_dropped,
            "bytes_sent": self.bytes_sent,
            "bytes_by_tier": dict(sorted(self.bytes_by_tier.items())),
            "messages_by_tier": dict(sorted(self.messages_by_tier.items())),
            "bytes_by_type": dict(sorted(self.bytes_by_type.items())),
            "encodings": self.encodings,
            "jobs_started": self.jobs_started,
            "jobs_finished": self.jobs_finished,
            "jobs_dropped": self.jobs_dropped,
            "jobs_abandoned": self.jobs_abandoned,
            "persists": self.persists,
            "commits": self.commits,
            "signed": self.signed,
            "verified": self.verified,
            "unverified": self.unverified,
            "restarts": self.restarts,
            "logs_by_level": dict(sorted(self.logs_by_level.items())),
            "metric_totals": dict(sorted(self.metric_totals.items())),
            "metric_counts": dict(sorted(self.metric_counts.items())),
            "staleness": list(self.staleness),
            "updates_applied": self.updates_applied,
            "updates_duplicated": self.updates_duplicated,
            "deaths": self.deaths,
        }
        if wall:
            out["wall_time_s"] = self.wall_time_s
        return out


class _Observer:
    __slots__ = ("fn", "handle", "interval", "k", "t0")

    def __init__(self, interval: float, fn: Callable[[float], Any], t0: float) -> None:
        self.interval = interval
        self.fn = fn
        self.t0 = t0
        self.k = 0
        self.handle: Handle | None = None

    @property
    def next_t(self) -> float:
        return self.t0 + self.k * self.interval  # no drift from repeated additions


MetricListener = Callable[[str, float, Metric], Any]  # (node_id, now, metric)


class SimDriver:
    """Runs ``nodes`` on a virtual clock (see the module docstring).

    ``network`` is the link model (``link(a, b)``; a ``topology.plan.Plan`` works),
    ``neighbours`` the (a, b) pairs that are parent/child or gossip peers, ``roles`` each
    node's role (for bytes per tier).
    """

    def __init__(
        self,
        nodes: Mapping[str, Node],
        roles: Mapping[str, str],
        network: LinkModel,
        *,
        neighbours: Iterable[tuple[str, str]] = (),
        compute: ComputeModel | None = None,
        availability: Availability | None = None,
        trainer: Trainer | None = None,
        executor: Executor | None = None,
        seed: int = 0,
        codecs: CodecPolicy | None = None,
        codec: Codec | None = None,
        partitions: Iterable[Partition] = (),
        start_time: float = 0.0,
        record_persist: bool = False,
        keep_logs: bool = False,
        checker: InvariantChecker | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        signing: bool = False,
        live_gauges: bool = False,
    ) -> None:
        for key, node in nodes.items():
            if node.node_id != key:
                raise ValueError(f"nodes[{key!r}] has node_id {node.node_id!r}")
        missing = sorted(set(nodes) - set(roles))
        if missing:
            raise ValueError(f"roles: no role for node(s) {', '.join(missing[:10])}")
        self.nodes: dict[str, Node] = dict(nodes)
        self.roles = dict(roles)
        self.seed = seed
        self.kernel = Kernel(seed, start_time)
        self.codecs = codecs if codecs is not None else CodecPolicy()
        self.network = Network(
            self.kernel,
            network,
            deliver=self._on_message,
            notify=self._on_link,
            codec=codec,
            codecs=self.codecs,
            roles=self.roles,
        )
        for a, b in neighbours:
            for n in (a, b):
                if n not in self.nodes:
                    raise ValueError(f"neighbours: unknown node {n!r}")
            self.network.add_neighbours(a, b)
        self.compute = compute if compute is not None else ComputeModel.from_config({}, seed=seed)
        self.availability = availability if availability is not None else Availability(seed=seed)
        self.trainer = trainer
        if executor is None and trainer is not None:
            executor = InlineExecutor(trainer)
        self.executor = executor
        self.checker = checker if checker is not None else InvariantChecker()
        self.record_persist = record_persist
        self.store: dict[str, Any] = {}
        self.keep_logs = keep_logs
        self.logs: list[tuple[float, str, Log]] = []
        self.versions: dict[str, float] = {}  # last model_version gauge per node
        self._stats = SimStats()
        self._dead: set[str] = set()
        self._deadlines: dict[str, tuple[float, Handle]] = {}
        self._skip_metrics: frozenset[str] = frozenset() if live_gauges else LIVE_GAUGES
        # One shared step per node (federation.step): note wrapper, seed injection,
        # stuck-deadline guard, effect dispatch to this driver (the sink).
        self._steps: dict[str, NodeStep] = {
            node_id: self._step(node) for node_id, node in self.nodes.items()
        }
        # The sites whose results the executor may hand over as a TrainedDelta, made where
        # the job trained (sim.executors.PoolExecutor.submit): those of a node that takes
        # them, with an executor that makes them.
        self._delta_nodes: set[str] = set()
        self._submit_delta: Callable[..., Any] = _no_submit
        if getattr(self.executor, "makes_trained_deltas", False):
            assert self.executor is not None
            self._submit_delta = self.executor.submit
            self._delta_nodes = {k for k, n in self.nodes.items() if self._takes_deltas(n)}
        self._incarnation: dict[str, int] = {}  # restarts per node (jobs of older ones drop)
        self._restarting: set[str] = set()  # down, coming back from their log
        self.signing: SimSigning | None = None
        if signing:
            self.signing = SimSigning(self.roles, report=self._report_refused)
        # Last: it opens files, which close() releases.
        self.stores = SimStores(state_dir, self.nodes) if state_dir is not None else None
        self._observers: list[_Observer] = []
        self._metric_listeners: list[MetricListener] = []
        self._until: float = start_time
        self._started = False
        self._debug = False
        for p in partitions:
            self.network.add_partition(p)
        for p in self.availability.partitions():
            self.network.add_partition(p)

    @classmethod
    def from_plan(cls, plan: Any, nodes: Mapping[str, Node], **kwargs: Any) -> SimDriver:
        """A driver for ``nodes`` laid out by a ``topology.plan.Plan`` (roles, links,
        neighbours from the plan; plan nodes without a running node are left out)."""
        roles = {k: v for k, v in roles_from_plan(plan).items() if k in nodes}
        pairs = [(a, b) for a, b in neighbours_from_plan(plan) if a in nodes and b in nodes]
        return cls(nodes, roles, plan, neighbours=pairs, **kwargs)

    # ------------------------------------------------------------------ public API

    @property
    def now(self) -> float:
        return self.kernel.now

    @property
    def stats(self) -> SimStats:
        """The run's statistics, brought up to date (one object, updated in place: use
        ``to_dict()`` to keep a snapshot)."""
        s = self._stats
        net = self.network.stats
        s.virtual_time = self.kernel.now
        s.events = self.kernel.events_processed
        s.messages_sent = net.messages_sent
        s.messages_delivered = net.messages_delivered
        s.messages_blocked = net.messages_blocked
        s.messages_lost = net.messages_lost
        s.messages_rejected = net.messages_rejected
        s.bytes_sent = net.bytes_sent
        s.encodings = net.encodings
        s.bytes_by_tier = self.network.bytes_by_tier
        s.messages_by_tier = self.network.messages_by_tier
        s.bytes_by_type = self.network.bytes_by_type
        s.updates_applied = self.checker.updates_applied
        s.updates_duplicated = self.checker.updates_duplicated
        if self.stores is not None:
            s.commits = self.stores.commits
        if self.signing is not None:
            s.signed = self.signing.signed
            s.verified = self.signing.verified
            s.unverified = self.signing.unverified
        return s

    def is_alive(self, node_id: str) -> bool:
        return node_id not in self._dead

    def observe(self, interval_s: float, fn: Callable[[float], Any]) -> None:
        """Call ``fn(now)`` at start_time and every ``interval_s`` after (while running)."""
        if not interval_s > 0:
            raise ValueError(f"observe interval_s must be > 0, got {interval_s!r}")
        self._observers.append(_Observer(interval_s, fn, self.kernel.now))

    def on_metric(self, fn: MetricListener) -> None:
        """Call ``fn(node_id, now, metric)`` for every ``Metric`` effect."""
        self._metric_listeners.append(fn)

    def partition(self, nodes: Iterable[str], start_s: float, end_s: float) -> None:
        """Cut ``nodes`` from the rest during ``[start_s, end_s)`` (start >= now)."""
        group = frozenset(nodes)
        unknown = sorted(group - set(self.nodes))
        if unknown:
            raise ValueError(f"partition: unknown node(s) {', '.join(unknown)}")
        self.network.add_partition(Partition(start_s, end_s, group))

    def kill(self, node_id: str, detection_delay_s: float | None = None) -> None:
        """``node_id`` dies now: it gets no more events; neighbours hear after a delay."""
        if node_id not in self.nodes:
            raise ValueError(f"kill: unknown node {node_id!r}")
        if node_id in self._dead and node_id not in self._restarting:
            return
        self._restarting.discard(node_id)  # killed while down: it never comes back
        delay = (
            self.availability.detection_delay_s if detection_delay_s is None else detection_delay_s
        )
        self._dead.add(node_id)
        self._stats.deaths += 1
        entry = self._deadlines.pop(node_id, None)
        if entry is not None:
            Kernel.cancel(entry[1])
        self.network.kill(node_id, delay)

    def kill_at(self, t: float, node_id: str, detection_delay_s: float | None = None) -> None:
        self.kernel.schedule_at(t, self.kill, node_id, detection_delay_s)

    def run(self, until: float | None = None, stop: Callable[[], bool] | None = None) -> SimStats:
        """Run to virtual time ``until`` (or until nothing is left, or ``stop()`` is true)."""
        if until is None and self._observers:
            raise ValueError("run(until=None) would never end with observers: give until")
        if not self._started:
            self._start()
        self._until = float("inf") if until is None else until
        self._debug = logger.isEnabledFor(logging.DEBUG)
        for obs in self._observers:
            self._arm(obs)
        t0 = time.perf_counter()
        try:
            self.kernel.run(until, stop)
        finally:
            self._stats.wall_time_s += time.perf_counter() - t0
            self.network.end_burst()
        return self.stats

    def restart(self, node_id: str, make: Callable[[], Node], down_s: float) -> None:
        """``node_id`` crashes now and comes back ``down_s`` (> 0) later as ``make()``
        restored from its recovery log (needs ``state_dir``). While down it hears
        nothing, its links are cut (what is in flight is lost; neighbours get
        ``PeerDown``, then ``PeerUp`` once it is back) and the result of a job it had
        started never reaches the restarted node. With signing, its checks start afresh
        from the version guard of its restored state (``SimSigning.restarted`` reads it
        from ``snapshot()`` by the node's role, so a wrapper that restores the node gets
        the node's guard). A dead node stays dead."""
        if self.stores is None:
            raise ValueError("restart needs a recovery log: give the driver a state_dir")
        if node_id not in self.nodes:
            raise ValueError(f"restart: unknown node {node_id!r}")
        if not down_s > 0:
            raise ValueError(f"restart: down_s must be > 0, got {down_s!r}")
        if node_id in self._dead:
            return
        self._dead.add(node_id)
        self._restarting.add(node_id)
        self._incarnation[node_id] = self._incarnation.get(node_id, 0) + 1
        entry = self._deadlines.pop(node_id, None)
        if entry is not None:
            Kernel.cancel(entry[1])
        now = self.kernel.now
        self.network.add_partition(Partition(now, now + down_s, frozenset((node_id,))))
        self.kernel.schedule_at(now + down_s, self._come_back, node_id, make)

    def restart_at(self, t: float, node_id: str, make: Callable[[], Node], down_s: float) -> None:
        self.kernel.schedule_at(t, self.restart, node_id, make, down_s)

    def _come_back(self, node_id: str, make: Callable[[], Node]) -> None:
        assert self.stores is not None
        if node_id not in self._restarting:
            return  # killed while it was down
        self._restarting.discard(node_id)
        node = self.stores.recover(node_id, make)
        self.nodes[node_id] = node
        self._delta_nodes.discard(node_id)
        if self._takes_deltas(node):
            self._delta_nodes.add(node_id)
        if self.signing is not None:
            self.signing.restarted(node)
        self._steps[node_id] = self._step(node)
        self._dead.discard(node_id)
        self._stats.restarts += 1
        self._refresh_deadline(node_id, node, self.kernel.now)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
        if self.stores is not None:
            self.stores.close()

    # ------------------------------------------------------------------- internals

    def _takes_deltas(self, node: Node) -> bool:
        """The executor makes TrainedDeltas and ``node`` takes them."""
        return self._submit_delta is not _no_submit and (
            getattr(node, "accepts_trained_delta", False) is True
        )

    def _step(self, node: Node) -> NodeStep:
        # The invariant checker looks at metrics only: it is not called for the other
        # effects (unless a subclass of it observes them).
        metrics_only = type(self.checker).observe is InvariantChecker.observe
        return NodeStep(
            node,
            self,
            seed=self.seed,
            observe=self.checker.observe,
            error=SimulationError,
            skip_metrics=self._skip_metrics,
            observe_kinds=(Metric,) if metrics_only else None,
        )

    def _start(self) -> None:
        self._started = True
        now = self.kernel.now
        for death in self.availability.deaths:
            if death.node not in self.nodes:
                raise ValueError(f"availability: {death.node!r} is not a node of this run")
            self.kernel.schedule_at(max(death.at_s, now), self.kill, death.node)
        self.network.start()
        for node_id, node in self.nodes.items():
            self._refresh_deadline(node_id, node, now)

    def _arm(self, obs: _Observer) -> None:
        if obs.handle is None and obs.next_t <= self._until:
            t = max(obs.next_t, self.kernel.now)
            obs.handle = self.kernel.schedule_at(t, self._tick, obs, priority=PRIORITY_OBSERVER)

    def _tick(self, obs: _Observer) -> None:
        obs.handle = None
        obs.k += 1
        obs.fn(self.kernel.now)
        self._arm(obs)

    def _dispatch(self, node_id: str, event: Event) -> None:
        now = self.kernel._now
        self._stats.deliveries += 1
        wanted = self._steps[node_id].handle(event, now)
        self.network.end_burst()
        # _schedule_deadline's common cases first, inline (this runs for every event): no
        # deadline wanted nor scheduled, or the one wanted is scheduled already.
        current = self._deadlines.get(node_id)
        if current is None:
            if wanted is None:
                return
        elif wanted == current[0] and current[1][0] is not None:
            return
        self._schedule_deadline(node_id, wanted, now)

    # ------------------------------------------- the effect sink (federation.step)

    def send(self, node_id: str, effect: Send) -> None:
        """``Send``: onto the simulated link (size from the real codec)."""
        peer = effect.peer
        if peer not in self.nodes:
            raise SimulationError(
                f"{node_id} sent {type(effect.msg).__name__} to unknown node {peer!r}"
            )
        msg = effect.msg
        if self.signing is not None:
            msg = self.signing.seal(node_id, peer, msg, self.codecs.spec_for(msg))
        self.network.send(node_id, peer, msg)

    def metric(self, node_id: str, m: Metric, now: float) -> None:
        """``Metric``: totals, staleness, the model-version gauge, listeners."""
        s = self._stats
        name = m.name
        s.metric_totals[name] = s.metric_totals.get(name, 0.0) + m.value
        s.metric_counts[name] = s.metric_counts.get(name, 0) + 1
        if name == "update_applied":
            s.staleness.append(m.value)
        elif name == "model_version":
            self.versions[node_id] = m.value
        for fn in self._metric_listeners:
            fn(node_id, now, m)

    def persist(self, node_id: str, batch: list[Persist]) -> None:
        """``Persist`` (one batch): counted, and kept in ``store`` when ``record_persist``."""
        self._stats.persists += len(batch)
        if self.stores is not None:
            self.stores.write(node_id, batch)
        if self.record_persist:
            for p in batch:
                self._record(p)

    def _record(self, p: Persist) -> None:
        if p.append:
            log = self.store.get(p.key)
            if not isinstance(log, list):
                log = self.store[p.key] = []
            log.append(p.data)
        else:
            self.store[p.key] = p.data

    def log(self, node_id: str, entry: Log, now: float) -> None:
        """``Log``: counted by level, kept when ``keep_logs``, debug-logged."""
        levels = self._stats.logs_by_level
        levels[entry.level] = levels.get(entry.level, 0) + 1
        if self.keep_logs:
            self.logs.append((now, node_id, entry))
        if self._debug:
            logger.debug(
                "t=%.6f %s [%s] %s %s", now, node_id, entry.level, entry.text, entry.fields or ""
            )

    def train(self, node_id: str, job: int, weights: Weights, config: Mapping[str, Any]) -> None:
        """``Train``: submitted now, answered after the modelled duration (or dropped)."""
        if self.executor is None:
            raise SimulationError(f"{node_id} asked to train but the driver has no trainer")
        duration = self.compute.duration(node_id)
        self._stats.jobs_started += 1
        if self.availability.job_dropped(node_id):
            self._stats.jobs_dropped += 1
            incarnation = self._incarnation.get(node_id, 0)
            self.kernel.schedule_in(
                duration, self._job_failed, node_id, job, "dropout", incarnation
            )
            return
        kernel = self.kernel
        due = kernel._now + duration
        if node_id in self._delta_nodes:
            ticket = self._submit_delta(node_id, weights, config, due=due, delta=True)
        else:
            ticket = self.executor.submit(node_id, weights, config, due=due)
        incarnation = self._incarnation.get(node_id, 0)
        kernel.schedule_in(duration, self._job_done, node_id, job, ticket, incarnation)

    def _job_done(self, node_id: str, job: int, ticket: Any, incarnation: int = 0) -> None:
        assert self.executor is not None
        if node_id in self._dead or incarnation != self._incarnation.get(node_id, 0):
            self._stats.jobs_abandoned += 1
            self.executor.discard(ticket)
            return
        try:
            result = self.executor.join(ticket)
        except TrainingRefusedError as exc:  # e.g. a DP-SGD site's spent privacy budget
            self._dispatch(node_id, TrainFailed(job, str(exc), exc.code))
            return
        self._stats.jobs_finished += 1
        self._dispatch(node_id, TrainDone(job, result))

    def _job_failed(self, node_id: str, job: int, reason: str, incarnation: int = 0) -> None:
        if node_id in self._dead or incarnation != self._incarnation.get(node_id, 0):
            return
        # Code "dropout": the site is gone for this job and says nothing to its parent
        # (a refusal would free the task at once, which a dead site cannot make happen).
        self._dispatch(node_id, TrainFailed(job, reason, "dropout"))

    def _on_message(self, src: str, dst: str, msg: Any) -> None:
        if dst in self._dead:  # the network already drops these; kept as a guard
            return
        if self.signing is not None and not self.signing.check(src, dst, msg):
            return  # refused by its signature check (a daemon closes the connection)
        self._dispatch(dst, Received(src, msg))

    def _report_refused(self, node_id: str, m: Metric) -> None:
        self.metric(node_id, m, self.kernel.now)

    def _on_link(self, node_id: str, peer: str, up: bool) -> None:
        if node_id in self._dead:
            return
        self._dispatch(node_id, PeerUp(peer) if up else PeerDown(peer))

    def _refresh_deadline(self, node_id: str, node: Node, now: float) -> None:
        self._schedule_deadline(node_id, node.next_deadline(), now)

    def _schedule_deadline(self, node_id: str, wanted: float | None, now: float) -> None:
        current = self._deadlines.get(node_id)
        if current is not None:
            if wanted == current[0] and current[1][0] is not None:
                return  # already scheduled for that time
            Kernel.cancel(current[1])
            if wanted is None:
                del self._deadlines[node_id]
                return
        elif wanted is None:
            return
        t = wanted if wanted > now else now
        handle = self.kernel.schedule_at(
            t, self._fire_deadline, node_id, priority=PRIORITY_DEADLINE
        )
        self._deadlines[node_id] = (wanted, handle)

    def _fire_deadline(self, node_id: str) -> None:
        self._dispatch(node_id, Deadline())


def _no_submit(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("no executor makes trained deltas here")


# ------------------------------------------------------------------ plan adapters


def _plan_nodes(plan: Any) -> list[Any]:
    nodes = plan.nodes
    values = nodes.values() if isinstance(nodes, Mapping) else nodes
    return sorted(values, key=lambda n: n.id)


def roles_from_plan(plan: Any) -> dict[str, str]:
    """``{node id: role}`` of a ``topology.plan.Plan``."""
    return {n.id: n.role for n in _plan_nodes(plan)}


def neighbours_from_plan(plan: Any) -> list[tuple[str, str]]:
    """The parent/child and gossip-peer pairs of a plan, each once, sorted."""
    pairs: set[tuple[str, str]] = set()
    for n in _plan_nodes(plan):
        linked = [getattr(n, "parent", None), *(getattr(n, "children", ()) or ())]
        linked += list(getattr(n, "peers", ()) or ())
        for other in linked:
            if other is not None and other != n.id:
                a, b = sorted((n.id, other))
                pairs.add((a, b))
    return sorted(pairs)


def region_nodes(plan: Any, region: str) -> frozenset[str]:
    """The nodes of ``region`` (its sites and its regional aggregator): a partition group."""
    return frozenset(n.id for n in _plan_nodes(plan) if getattr(n, "region", None) == region)
