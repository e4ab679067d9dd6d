"""``Federation`` on the asyncio runtime driver (``runtime.driver.AsyncDriver``).

Every node gets its own ``AsyncDriver`` with a ``MemoryPeers`` on one ``MemoryNetwork``
(real wire encoding, in-process links) and its own durable store
(``federation.store.StateStore``), all in one event loop that runs only inside
``run_until`` / ``run_for``. Time is real but sped up: federation time advances ``speed``
seconds per wall second, so the suite's minutes of protocol time take seconds. Training
jobs sleep for an exponential duration around ``train_time_s`` (federation seconds) in a
thread pool, then call the trainer.

Links are cut synchronously (partitions, kills), and messages of a cut connection that
were not yet handled are dropped; in-flight timing is not exact (``exact_timing`` False).

``AsyncFederation`` keeps the peer sets behind a few methods (``_prepare``, ``_peers``,
``_cut``, ``_heal``, ``_down``, ``_up``, ``inject``) that ``net_federation`` replaces with
loopback WebSockets, secure channels and end-to-end signing.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fedloom.algorithms.protocol import Effect, Event, Node, Persist, TrainResult, Weights
from fedloom.federation.store import StateStore
from fedloom.federation.training import Trainer
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.memory_network import MemoryNetwork
from fedloom.runtime.peer_table import PeerSet
from fedloom.transport.codec_policy import CodecPolicy
from tests.conformance.harness import Journal, RecordingNode, Unsupported, reopen, scratch_dir


class MemoryStore:
    """A ``Store`` that keeps checkpoints and logs in memory (tests of the driver)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def apply_many(self, items: Sequence[Persist]) -> None:
        for p in items:
            if p.append:
                self.data.setdefault(p.key, []).append(p.data)
            else:
                self.data[p.key] = p.data


class _Observed:
    """Wraps a (recording) node and wakes the federation's waiters after each event."""

    def __init__(self, node: RecordingNode, wake: Callable[[], None]) -> None:
        self.inner = node
        self._wake = wake

    @property
    def node_id(self) -> str:
        return self.inner.node_id

    def handle(self, event: Event, now: float) -> list[Effect]:
        effects = self.inner.handle(event, now)
        self._wake()
        return effects

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()


class _PacedTrainer:
    """Sleeps a seeded, exponential job time (scaled to wall time), then trains.

    Jobs of a node listed in ``to_fail`` raise after their duration instead (the driver
    turns that into ``TrainFailed``), like a site that crashed mid-job.
    """

    def __init__(self, inner: Trainer | None, train_time_s: float, speed: float) -> None:
        self.inner = inner
        self.mean_s = train_time_s
        self.speed = speed
        self.to_fail: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        with self._lock:
            fail = self.to_fail.get(node_id, 0) > 0
            if fail:
                self.to_fail[node_id] -= 1
        rng = np.random.default_rng(int(config.get("seed", 0)))
        duration = max(self.mean_s / 4, float(rng.exponential(self.mean_s)))
        time.sleep(duration / self.speed)
        if fail:
            raise RuntimeError("injected failure (fail_next_jobs)")
        if self.inner is None:
            raise RuntimeError("no trainer given to the federation")
        return self.inner(node_id, weights, config)


class _Refusals(logging.Handler):
    """Counts the connections a node closed on bad input from a peer, by reason (the
    daemons' only record of them is this WARNING: ``runtime.connection``)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("closing the connection to"):
            self.counts[str(getattr(record, "reason", "?"))] += 1


class AsyncFederation:
    """``Federation`` on ``AsyncDriver`` + ``MemoryPeers`` (see the module docstring)."""

    name = "async"
    exact_timing = False
    signs = False

    def __init__(self, *, speed: float = 20.0, train_time_s: float = 1.0) -> None:
        self.speed = speed
        self.train_time_s = train_time_s
        self._loop = asyncio.new_event_loop()
        self._journal = Journal()
        self._network: MemoryNetwork | None = None
        self._nodes: dict[str, Node] = {}
        self._drivers: dict[str, AsyncDriver] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="fed-train")
        self._trainer = _PacedTrainer(None, train_time_s, speed)
        self._t0 = self._loop.time()
        self._wake = asyncio.Event()
        self._heals: list[asyncio.TimerHandle] = []
        self._tmp = scratch_dir("fedloom-conformance-")
        self._seed = 0
        self.stores: dict[str, StateStore] = {}
        self._refusals = _Refusals()
        logging.getLogger("fedloom.runtime.connection").addHandler(self._refusals)

    # -- Federation protocol

    @property
    def journal(self) -> Journal:
        return self._journal

    @property
    def now(self) -> float:
        return (self._loop.time() - self._t0) * self.speed

    def node(self, node_id: str) -> Any:
        return self._nodes[node_id]

    def driver(self, node_id: str) -> AsyncDriver:
        return self._drivers[node_id]

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
        if self._drivers:
            raise RuntimeError("start() was already called")
        self._nodes = dict(nodes)
        self._seed = seed
        self._trainer.inner = trainer
        self._prepare(nodes, roles, list(neighbours), codecs, dict(relays or {}))
        for node_id in nodes:
            store = StateStore(self._tmp / node_id)
            store.load()  # a fresh directory: nothing to recover, but the log starts here
            self.stores[node_id] = store
            self._drivers[node_id] = self._driver_for(node_id, nodes[node_id])
        self._t0 = self._loop.time()
        for node_id in nodes:
            self._launch(node_id)
        self._loop.run_until_complete(asyncio.sleep(0))

    def run_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        return self._loop.run_until_complete(self._wait(predicate, timeout_s))

    def run_for(self, duration_s: float) -> None:
        self._loop.run_until_complete(self._wait(lambda: False, duration_s))

    def kill(self, node_id: str) -> None:
        if node_id not in self._drivers:
            raise ValueError(f"kill: unknown node {node_id!r}")
        self._down(node_id, forever=True)
        self._drivers[node_id].stop()

    def partition(self, nodes: Iterable[str], duration_s: float) -> None:
        pairs = self._cut(nodes)
        handle = self._loop.call_later(duration_s / self.speed, self._heal, pairs)
        self._heals.append(handle)

    def restart(self, node_id: str, make: Callable[[], Node], down_s: float) -> Any:
        back = self._down(node_id, forever=False)
        self._drivers[node_id].stop()
        task = self._tasks.pop(node_id)
        self._loop.run_until_complete(asyncio.wait([task], timeout=10.0))
        if not task.done():
            raise RuntimeError(f"the driver of {node_id} did not stop")
        if not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"the driver of {node_id} failed") from task.exception()
        self.run_for(down_s)
        self.stores[node_id], node = reopen(self.stores[node_id], make)
        self._nodes[node_id] = node
        self._drivers[node_id] = self._driver_for(node_id, node)
        self._launch(node_id)
        self._up(node_id, back)
        return node

    def inject(self, src: str, dst: str, data: bytes) -> None:
        conn = self._network_or_fail().peers(src).table.get(dst)
        if conn is None:
            raise RuntimeError(f"inject: {src} is not connected to {dst}")
        self._loop.run_until_complete(conn.pipe.progress.send(data))

    def input_rejections(self) -> dict[str, int]:
        return dict(self._refusals.counts)

    def fail_next_jobs(self, node_id: str, count: int = 1) -> None:
        self._trainer.to_fail[node_id] = self._trainer.to_fail.get(node_id, 0) + count

    def close(self) -> None:
        logging.getLogger("fedloom.runtime.connection").removeHandler(self._refusals)
        for handle in self._heals:
            handle.cancel()
        for driver in self._drivers.values():
            driver.stop()
        if self._tasks:
            done = asyncio.wait(list(self._tasks.values()), timeout=10.0)
            self._loop.run_until_complete(done)
        for task in self._tasks.values():
            if not task.done():
                task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.run_until_complete(self._loop.shutdown_default_executor())
        self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for store in self.stores.values():
            store.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._raise_failures()

    # -- the peer sets (replaced by net_federation)

    def _prepare(
        self,
        nodes: Mapping[str, Node],
        roles: Mapping[str, str],
        neighbours: list[tuple[str, str]],
        codecs: CodecPolicy | None,
        relays: dict[tuple[str, str], str],
    ) -> None:
        if relays:
            raise Unsupported(
                "in-memory peer sets have no relays: their links carry plain wire "
                "messages, and a relayed message must be sealed end to end (NetworkPeers)"
            )
        self._network = MemoryNetwork(codecs=codecs)
        for a, b in neighbours:
            self._network.link(a, b)

    def _network_or_fail(self) -> MemoryNetwork:
        assert self._network is not None, "start() first"
        return self._network

    def _peers(self, node_id: str) -> PeerSet:
        return self._network_or_fail().peers(node_id)

    def _cut(self, nodes: Iterable[str]) -> Any:
        return self._network_or_fail().partition(nodes)

    def _heal(self, pairs: Any) -> None:
        self._network_or_fail().heal(pairs)

    def _down(self, node_id: str, *, forever: bool) -> Any:
        """Cut ``node_id`` from everyone (for good when ``forever``); what ``_up`` takes."""
        network = self._network_or_fail()
        if forever:
            network.isolate(node_id)
            return None
        return network.partition([node_id])

    def _up(self, node_id: str, back: Any) -> None:
        self._network_or_fail().heal(back)

    # -- internals

    def _driver_for(self, node_id: str, node: Node) -> AsyncDriver:
        wrapped = _Observed(RecordingNode(node, self._journal), self._wake.set)
        return AsyncDriver(
            wrapped,
            peers=self._peers(node_id),
            trainer=self._trainer,
            executor=self._pool,
            store=self.stores[node_id],
            clock=lambda: self.now,
            time_scale=self.speed,
            seed=self._seed,
        )

    def _launch(self, node_id: str) -> None:
        task = self._loop.create_task(self._drivers[node_id].run(), name=f"driver {node_id}")
        task.add_done_callback(lambda _: self._wake.set())  # surface a crash at once
        self._tasks[node_id] = task

    def _raise_failures(self) -> None:
        for node_id, task in self._tasks.items():
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"the driver of {node_id} failed") from task.exception()

    async def _wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        end = self._loop.time() + timeout_s / self.speed
        while not predicate():
            self._raise_failures()
            if self._loop.time() >= end:
                return False
            self._wake.clear()
            try:
                async with asyncio.timeout_at(end):
                    await self._wake.wait()
            except TimeoutError:
                pass
        self._raise_failures()
        return True
