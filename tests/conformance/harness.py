"""A driver-agnostic harness for the conformance suite.

The suite runs the same protocol scenarios against every driver. A driver plugs in by
implementing ``Federation`` and registering a factory in ``DRIVERS`` (``conftest.py``
parametrises the ``federation`` fixture over it). Three are registered:

* ``sim``: the discrete-event simulator (``SimDriver``) on its virtual clock, with the
  daemons' recovery log and end-to-end signing on (``sim.durability``);
* ``async``: the asyncio driver (``AsyncDriver``) over in-memory links (``MemoryNetwork``),
  every node with its durable store (``async_federation.py``; no signatures);
* ``net``: the asyncio driver over loopback WebSockets on 127.0.0.1 with the secure channel
  (signed handshake, encrypted records) and end-to-end signing, as the daemons run
  (``net_federation.py``).

Times are in the federation's own clock: virtual seconds for the simulator, sped-up real
seconds for the others (node time runs ``speed`` times faster than the wall clock).

The harness wraps every node in a ``RecordingNode`` before handing it to the driver, so
effects, metrics and the messages each node received are observed (and the exactly-once /
monotone-version invariants are checked) the same way whichever driver runs them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedloom.algorithms.protocol import (
    NO_RECORDS,
    Effect,
    Event,
    Metric,
    Node,
    Persist,
    Received,
    RecordSource,
    Restorable,
    Weights,
)
from fedloom.federation.invariants import InvariantChecker
from fedloom.federation.store import CHECKPOINT_KEY, Recovery, StateStore
from fedloom.federation.training import Trainer
from fedloom.sim.availability import Availability
from fedloom.sim.compute import ComputeModel
from fedloom.sim.driver import SimDriver
from fedloom.sim.durability import SimSigning
from fedloom.sim.network import UniformLinks, WireCodec
from fedloom.transport.codec_policy import CodecPolicy


class Unsupported(Exception):  # noqa: N818 - a test outcome, not an error
    """This driver cannot run what the case asks for (the test skips, saying why)."""


@dataclass(frozen=True, slots=True)
class MetricRecord:
    time: float
    node: str
    metric: Metric

    @property
    def labels(self) -> Mapping[str, str]:
        return self.metric.labels or {}


class Journal:
    """Everything the nodes of one federation emitted and received, plus invariant checks."""

    def __init__(self) -> None:
        self.effects: list[tuple[float, str, Effect]] = []
        self.metrics: list[MetricRecord] = []
        self.received: list[tuple[float, str, Received]] = []
        self.counts: dict[str, int] = {}
        self.checker = InvariantChecker()

    def record(self, node_id: str, now: float, effects: list[Effect]) -> None:
        for e in effects:
            self.effects.append((now, node_id, e))
            self.checker.observe(node_id, e, now)
            if isinstance(e, Metric):
                self.metrics.append(MetricRecord(now, node_id, e))
                self.counts[e.name] = self.counts.get(e.name, 0) + 1


class RecordingNode:
    """Wraps a node: same behaviour, every effect and received message journaled."""

    def __init__(self, node: Node, journal: Journal) -> None:
        self.inner = node
        self._journal = journal
        self._id = node.node_id

    @property
    def node_id(self) -> str:
        return self._id

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, Received):
            self._journal.received.append((now, self._id, event))
        effects = self.inner.handle(event, now)
        self._journal.record(self._id, now, effects)
        return effects

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def current_model(self) -> tuple[int, Weights] | None:
        fn = getattr(self.inner, "current_model", None)
        return None if fn is None else fn()

    # The restore protocol (``algorithms.protocol.Restorable``), for a driver that
    # restores what it runs (the simulator's restart).
    def snapshot(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = self.inner.snapshot()  # type: ignore[attr-defined]
        return snapshot

    def restore(
        self, checkpoint: Mapping[str, Any] | None, records: RecordSource = NO_RECORDS
    ) -> None:
        self.inner.restore(checkpoint, records)  # type: ignore[attr-defined]


class Federation(Protocol):
    """What a conformance test needs from a driver."""

    name: str
    exact_timing: bool  # messages in flight when a link is cut are reliably lost
    signs: bool  # end-to-end signatures are made and checked (daemons: always)

    def start(
        self,
        nodes: Mapping[str, Node],
        roles: Mapping[str, str],
        neighbours: Iterable[tuple[str, str]],
        *,
        trainer: Trainer | None = None,
        seed: int = 0,
        codecs: CodecPolicy | None = None,
        relays: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        """Start the nodes; every neighbour link comes up (PeerUp to both ends).

        ``codecs``: the tensor codec of each message type (default fp32 everywhere).
        ``relays``: ``{(a, b): relay}`` for neighbour pairs that accept no inbound
        connections and reach each other through the relay node (``Unsupported`` where
        the driver has no relays). Every node keeps its ``Persist`` effects in a
        ``federation.store.StateStore``, as the daemons do."""
        ...

    @property
    def now(self) -> float: ...

    def node(self, node_id: str) -> Any:
        """The node object (unwrapped) now running as ``node_id``."""
        ...

    def run_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Run until ``predicate()`` holds or ``timeout_s`` pass; return ``predicate()``."""
        ...

    def run_for(self, duration_s: float) -> None: ...

    def kill(self, node_id: str) -> None:
        """Stop ``node_id`` for good; its neighbours notice (PeerDown) after a short delay."""
        ...

    def partition(self, nodes: Iterable[str], duration_s: float) -> None:
        """Cut ``nodes`` from the rest, starting now, for ``duration_s``."""
        ...

    def restart(self, node_id: str, make: Callable[[], Node], down_s: float) -> Any:
        """Crash ``node_id`` now (its training jobs and unsent messages are lost, its
        neighbours see it go), keep it down ``down_s``, then start ``make()`` restored
        from ``node_id``'s store as a daemon restarts (load, ``restore``, a fresh
        checkpoint); return the new node."""
        ...

    def inject(self, src: str, dst: str, data: bytes) -> None:
        """Deliver ``data`` to ``dst`` as one message from its neighbour ``src`` (raw
        bytes where a wire message's encoding would be: a modified peer's output)."""
        ...

    def input_rejections(self) -> dict[str, int]:
        """Peer input refused before any node saw it, by reason (decoding, signatures)."""
        ...

    def fail_next_jobs(self, node_id: str, count: int = 1) -> None:
        """The next ``count`` training jobs of ``node_id`` fail (the node gets TrainFailed)."""
        ...

    @property
    def journal(self) -> Journal: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------- helpers


def metric_count(fed: Federation, name: str) -> int:
    return fed.journal.counts.get(name, 0)


def metrics(fed: Federation, name: str) -> list[MetricRecord]:
    return [m for m in fed.journal.metrics if m.metric.name == name]


def version_of(fed: Federation, node_id: str) -> int:
    cur = fed.node(node_id).current_model()
    return -1 if cur is None else int(cur[0])


def received(fed: Federation, node_id: str, kind: type) -> list[tuple[float, str, Any]]:
    """``(time, sender, message)`` of every ``kind`` message ``node_id`` received."""
    return [
        (t, e.peer, e.msg)
        for t, n, e in fed.journal.received
        if n == node_id and isinstance(e.msg, kind)
    ]


def scratch_dir(prefix: str) -> Path:
    """A fresh directory for the nodes' stores: in memory (/dev/shm) where there is one,
    so that fsync costs nothing and a busy disk does not slow the suite (the stores do
    exactly what they do on disk)."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=where))


def restore(node: Node, recovery: Recovery) -> None:
    """Restore ``node`` from what its store recovered: the one ``Restorable`` protocol
    every durable role follows (its checkpoint, then the log records written after it)."""
    if not isinstance(node, Restorable):
        raise TypeError(f"{node.node_id} ({type(node).__name__}) keeps no state to restore")
    node.restore(recovery.checkpoint, recovery)


def reopen(store: StateStore, make: Callable[[], Node]) -> tuple[StateStore, Node]:
    """Close ``store``, open its directory again and restore ``make()`` from it, then
    write a fresh checkpoint (compaction), as a restarted daemon does."""
    directory = store.directory
    store.close()
    store = StateStore(directory)
    recovery = store.load()
    node = make()
    restore(node, recovery)
    snapshot = getattr(node, "snapshot", None)
    if snapshot is not None:
        store.apply(Persist(CHECKPOINT_KEY, snapshot()))
    return store, node


# ---------------------------------------------------------------- the simulator


class _ScriptedAvailability(Availability):
    """No random dropouts; jobs fail only when a test asks for it."""

    def __init__(self, detection_delay_s: float) -> None:
        super().__init__(detection_delay_s=detection_delay_s)
        self.to_fail: dict[str, int] = {}

    def job_dropped(self, site: str) -> bool:
        left = self.to_fail.get(site, 0)
        if left > 0:
            self.to_fail[site] = left - 1
            return True
        return False


@dataclass(frozen=True, slots=True)
class RawFrame:
    """Bytes put on a simulated link as they are (an injected, modified peer's output)."""

    data: bytes


class _InjectingCodec(WireCodec):
    """The wire codec, except that a ``RawFrame`` is its own encoding."""

    def encode(self, msg: Any, spec: Any) -> bytes:
        if isinstance(msg, RawFrame):
            return msg.data
        return super().encode(msg, spec)


class SimFederation:
    """``Federation`` on the discrete-event simulator, with the daemons' durability and
    signing on (``SimDriver(state_dir=..., signing=True)``, ``sim.durability``): every
    node's ``Persist`` batches go to a real ``StateStore``, restarts recover from it, and
    every update and model is signed and checked end to end."""

    name = "sim"
    exact_timing = True
    signs = True

    def __init__(
        self,
        *,
        latency_s: float = 0.01,
        bandwidth_bps: float = 100e6,
        train_time_s: float = 1.0,
        detection_delay_s: float = 1.0,
    ) -> None:
        self.latency_s = latency_s
        self.bandwidth_bps = bandwidth_bps
        self.train_time_s = train_time_s
        self.detection_delay_s = detection_delay_s
        self._journal = Journal()
        self._driver: SimDriver | None = None
        self._availability = _ScriptedAvailability(detection_delay_s)
        self._tmp = scratch_dir("fedloom-conformance-sim-")

    @property
    def journal(self) -> Journal:
        return self._journal

    @property
    def driver(self) -> SimDriver:
        assert self._driver is not None, "start() first"
        return self._driver

    def start(
        self,
        nodes: Mapping[str, Node],
        roles: Mapping[str, str],
        neighbours: Iterable[tuple[str, str]],
        *,
        trainer: Trainer | None = None,
        seed: int = 0,
        codecs: CodecPolicy | None = None,
        relays: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        if relays:
            raise Unsupported(
                "the simulator has no relays: every neighbour pair is a direct link "
                "(relaying is done by NetworkPeers, sealed end to end)"
            )
        # Durations vary (exponential around train_time_s) so arrivals interleave.
        compute = ComputeModel.from_config(
            {
                "distribution": "exponential",
                "mean_s": self.train_time_s,
                "min_s": self.train_time_s / 4,
            },
            seed=seed,
        )
        self._driver = SimDriver(
            {k: RecordingNode(n, self._journal) for k, n in nodes.items()},
            roles,
            UniformLinks(self.latency_s, self.bandwidth_bps),
            neighbours=neighbours,
            compute=compute,
            availability=self._availability,
            trainer=trainer,
            seed=seed,
            codecs=codecs,
            codec=_InjectingCodec(),
            state_dir=self._tmp,
            signing=True,
        )
        # Refused signatures are the receiver's metrics: journal them as the node's.
        self._driver.signing = SimSigning(dict(roles), report=self._refused)

    def _refused(self, node_id: str, metric: Metric) -> None:
        self._journal.record(node_id, self.now, [metric])
        self.driver.metric(node_id, metric, self.now)

    @property
    def now(self) -> float:
        return self.driver.now

    def node(self, node_id: str) -> Any:
        node = self.driver.nodes[node_id]
        return node.inner if isinstance(node, RecordingNode) else node

    def run_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        if predicate():
            return True
        self.driver.run(until=self.now + timeout_s, stop=predicate)
        return predicate()

    def run_for(self, duration_s: float) -> None:
        self.driver.run(until=self.now + duration_s)

    def kill(self, node_id: str) -> None:
        self.driver.kill(node_id, self.detection_delay_s)

    def partition(self, nodes: Iterable[str], duration_s: float) -> None:
        self.driver.partition(nodes, self.now, self.now + duration_s)

    def restart(self, node_id: str, make: Callable[[], Node], down_s: float) -> Any:
        # The driver restores the recorder (it delegates Restorable) and reads the
        # version guard from the restored state: nothing to set here.
        self.driver.restart(node_id, lambda: RecordingNode(make(), self._journal), down_s)
        self.run_for(down_s)
        return self.node(node_id)

    def inject(self, src: str, dst: str, data: bytes) -> None:
        # Decode everything on arrival (fp32 included), as a receiver must. Sent on the
        # link as it is: the sender's signing never sees it.
        self.driver.network.decode_lossless = True
        self.driver.network.send(src, dst, RawFrame(data))

    def input_rejections(self) -> dict[str, int]:
        out = dict(self.driver.network.rejections)
        unverified = self.driver.stats.unverified
        if unverified:
            out["signature"] = unverified
        return out

    def fail_next_jobs(self, node_id: str, count: int = 1) -> None:
        self._availability.to_fail[node_id] = self._availability.to_fail.get(node_id, 0) + count

    def close(self) -> None:
        if self._driver is not None:
            self._driver.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


def _async_federation() -> Federation:
    # Imported late: async_federation imports this module.
    from tests.conformance.async_federation import AsyncFederation

    return AsyncFederation()


def _net_federation() -> Federation:
    from tests.conformance.net_federation import NetFederation

    return NetFederation()


# name -> factory
DRIVERS: dict[str, Callable[[], Federation]] = {
    "sim": SimFederation,
    "async": _async_federation,
    "net": _net_federation,
}
