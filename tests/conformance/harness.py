"""A driver-agnostic harness for the conformance suite.

The suite runs the same protocol scenarios against every driver. A driver plugs in by
implementing ``Federation`` (see ``SimFederation`` for the simulator) and registering a
factory in ``DRIVERS`` (``conftest.py`` parametrises the ``federation`` fixture over it).

Times are in the federation's own clock: virtual seconds for the simulator, real seconds
for a real-time driver (which may choose small latencies and training times).

The harness wraps every node in a ``RecordingNode`` before handing it to the driver, so
effects and metrics are observed (and the exactly-once / monotone-version invariants are
checked) the same way whichever driver runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fedloom.algorithms.protocol import Effect, Event, Metric, Node, Weights
from fedloom.federation.invariants import InvariantChecker
from fedloom.federation.training import Trainer
from fedloom.sim.availability import Availability
from fedloom.sim.compute import ComputeModel
from fedloom.sim.driver import SimDriver
from fedloom.sim.network import UniformLinks


@dataclass(frozen=True, slots=True)
class MetricRecord:
    time: float
    node: str
    metric: Metric

    @property
    def labels(self) -> Mapping[str, str]:
        return self.metric.labels or {}


class Journal:
    """Everything the nodes of one federation emitted, in order, plus invariant checks."""

    def __init__(self) -> None:
        self.effects: list[tuple[float, str, Effect]] = []
        self.metrics: list[MetricRecord] = []
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
    """Wraps a node: same behaviour, every effect journaled."""

    def __init__(self, node: Node, journal: Journal) -> None:
        self.inner = node
        self._journal = journal
        self._id = node.node_id

    @property
    def node_id(self) -> str:
        return self._id

    def handle(self, event: Event, now: float) -> list[Effect]:
        effects = self.inner.handle(event, now)
        self._journal.record(self._id, now, effects)
        return effects

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def current_model(self) -> tuple[int, Weights] | None:
        fn = getattr(self.inner, "current_model", None)
        return None if fn is None else fn()


class Federation(Protocol):
    """What a conformance test needs from a driver."""

    name: str
    exact_timing: bool  # messages in flight when a link is cut are reliably lost

    def start(
        self,
        nodes: Mapping[str, Node],
        roles: Mapping[str, str],
        neighbours: Iterable[tuple[str, str]],
        *,
        trainer: Trainer | None = None,
        seed: int = 0,
    ) -> None:
        """Start the nodes; every neighbour link comes up (PeerUp to both ends)."""
        ...

    @property
    def now(self) -> float: ...

    def node(self, node_id: str) -> Any:
        """The node object (unwrapped) as passed to ``start``."""
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


class SimFederation:
    """``Federation`` on the discrete-event simulator."""

    name = "sim"
    exact_timing = True

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
        self._nodes: dict[str, Node] = {}
        self._availability = _ScriptedAvailability(detection_delay_s)

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
    ) -> None:
        self._nodes = dict(nodes)
        wrapped = {k: RecordingNode(n, self._journal) for k, n in nodes.items()}
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
            wrapped,
            roles,
            UniformLinks(self.latency_s, self.bandwidth_bps),
            neighbours=neighbours,
            compute=compute,
            availability=self._availability,
            trainer=trainer,
            seed=seed,
        )

    @property
    def now(self) -> float:
        return self.driver.now

    def node(self, node_id: str) -> Any:
        return self._nodes[node_id]

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

    def fail_next_jobs(self, node_id: str, count: int = 1) -> None:
        self._availability.to_fail[node_id] = self._availability.to_fail.get(node_id, 0) + count

    def close(self) -> None:
        if self._driver is not None:
            self._driver.close()


def _async_federation() -> Federation:
    # Imported late: async_federation imports this module.
    from tests.conformance.async_federation import AsyncFederation

    return AsyncFederation()


# name -> factory; a real-time driver adds itself here.
DRIVERS: dict[str, Callable[[], Federation]] = {"sim": SimFederation, "async": _async_federation}
