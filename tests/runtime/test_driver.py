"""The asyncio driver: effect order, training jobs, deadlines, stale events, shutdown."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    Event,
    Log,
    Metric,
    PeerDown,
    PeerUp,
    Persist,
    Received,
    Send,
    Train,
    TrainDone,
    TrainFailed,
    TrainResult,
    Weights,
)
from fedloom.runtime import driver as driver_module
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.memory_network import MemoryNetwork
from fedloom.runtime.peer_table import EventSink
from fedloom.transport.wire import Ack, Heartbeat, Message

LIMIT = 10.0  # seconds any one test may take: a bound, never a timing assertion


class ScriptNode:
    """Answers each event with the effects ``script`` returns; records what it saw."""

    def __init__(
        self,
        node_id: str,
        script: Callable[[Event, float], list[Effect]] | None = None,
        deadline: float | None = None,
    ) -> None:
        self._id = node_id
        self.script = script
        self.seen: list[tuple[float, Event]] = []
        self.deadline = deadline

    @property
    def node_id(self) -> str:
        return self._id

    def handle(self, event: Event, now: float) -> list[Effect]:
        self.seen.append((now, event))
        if isinstance(event, Deadline):
            self.deadline = None
        return self.script(event, now) if self.script is not None else []

    def next_deadline(self) -> float | None:
        return self.deadline

    def events(self, kind: type) -> list[Any]:
        return [e for _, e in self.seen if isinstance(e, kind)]


class FakePeers:
    """A peer set that records sends into a shared journal and delivers nothing itself.

    A send gated on a pending write (``after``) is journalled as queued at once and as
    ``"send"`` (delivered) once the gate is done, as a connection would deliver it.
    """

    def __init__(self, journal: list[Any], connected: Sequence[str] = ("p",)) -> None:
        self.journal = journal
        self._connected = frozenset(connected)
        self.sink: EventSink | None = None
        self.cancelled = False

    async def run(self, sink: EventSink) -> None:
        self.sink = sink
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    def send(self, peer: str, msg: Message, after: asyncio.Future[None] | None = None) -> bool:
        if peer not in self._connected:
            return False
        if after is None:
            self.journal.append(("send", peer, msg))
            return True
        self.journal.append(("queued", peer, msg))

        def deliver(gate: asyncio.Future[None]) -> None:
            if not gate.cancelled() and gate.exception() is None:
                self.journal.append(("send", peer, msg))

        after.add_done_callback(deliver)
        return True

    def connected(self) -> frozenset[str]:
        return self._connected


class JournalStore:
    """Records each committed batch into the shared journal (from the store thread)."""

    def __init__(self, journal: list[Any]) -> None:
        self.journal = journal
        self.threads: set[str] = set()

    def apply_many(self, items: Sequence[Persist]) -> None:
        self.threads.add(threading.current_thread().name)
        self.journal.append(("commit", [p.key for p in items]))


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


async def run_driver(driver: AsyncDriver, body: Callable[[], Any]) -> None:
    """Run ``driver`` while ``await body()`` runs; then stop it and wait for the end."""
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        task = tg.create_task(driver.run())
        await asyncio.sleep(0)
        try:
            await body()
        finally:
            driver.stop()
        await task


def add_one(node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
    return TrainResult({k: v + 1 for k, v in weights.items()}, 7, {"loss": 0.5})


async def test_persists_are_durable_before_the_messages_that_follow_are_delivered() -> None:
    journal: list[Any] = []
    ack = Ack("s", 1)

    def script(event: Event, now: float) -> list[Effect]:
        if not isinstance(event, Received):
            return []
        return [
            Metric("seen"),
            Persist("log", 1, append=True),
            Persist("model", 2),
            Send("p", ack),
            Persist("log", 3, append=True),
            Send("p", ack),
            Persist("tail", 4),
        ]

    node = ScriptNode("n", script)
    store = JournalStore(journal)
    driver = AsyncDriver(
        node, peers=FakePeers(journal), store=store, metrics=lambda m: journal.append(m.name)
    )

    async def body() -> None:
        driver.post_nowait(Received("p", Heartbeat("p", 0)))
        await until(lambda: sum(e[0] in ("send", "commit") for e in journal if e != "seen") == 4)

    await run_driver(driver, body)
    assert journal[0] == "seen"
    order = [e[0] if e[0] != "commit" else e for e in journal[1:] if e[0] != "queued"]
    # The first batch is in flight while the rest of the effects are carried out, so the
    # later Persists form one group behind it: one more write, and the second ack waits
    # for it (its own record and the one after it).
    assert order == [
        ("commit", ["log", "model"]),
        "send",  # the first ack, delivered only once its record is on disk
        ("commit", ["log", "tail"]),
        "send",
    ]
    assert driver.stats.persists == 4 and driver.stats.commits == 2
    assert all(name.startswith("store-") for name in store.threads)  # never on the loop


class GatedStore:
    """A store whose writes wait for ``release`` (a slow disk), or fail with ``error``."""

    def __init__(self, journal: list[Any], error: Exception | None = None) -> None:
        self.journal = journal
        self.error = error
        self.started = threading.Event()
        self.release = threading.Event()

    def apply_many(self, items: Sequence[Persist]) -> None:
        self.started.set()
        self.release.wait(LIMIT)
        if self.error is not None:
            raise self.error
        self.journal.append(("commit", [p.key for p in items]))


def persist_then_send(event: Event, now: float) -> list[Effect]:
    if not isinstance(event, Received):
        return []
    return [Persist("outbox", 1, append=True), Send("p", Ack("s", 1))]


async def test_a_message_is_streamed_while_its_write_is_on_the_way_to_disk() -> None:
    journal: list[Any] = []
    store = GatedStore(journal)
    node = ScriptNode("n", persist_then_send)
    driver = AsyncDriver(node, peers=FakePeers(journal), store=store)

    async def body() -> None:
        driver.post_nowait(Received("p", Heartbeat("p", 0)))
        await until(lambda: any(e[0] == "queued" for e in journal))
        assert store.started.is_set() and journal == [("queued", "p", Ack("s", 1))]
        driver.post_nowait(Received("p", Heartbeat("p", 1)))  # the node is not blocked
        await until(lambda: len(node.seen) == 2)
        store.release.set()
        await until(lambda: sum(e[0] == "send" for e in journal) == 2)

    await run_driver(driver, body)
    kinds = [e[0] for e in journal]
    assert kinds.index("commit") < kinds.index("send")
    assert driver.stats.commits == 2


async def test_events_handled_during_a_write_share_the_next_one_and_wait_for_it() -> None:
    journal: list[Any] = []
    store = GatedStore(journal)
    node = ScriptNode("n", persist_then_send)
    driver = AsyncDriver(node, peers=FakePeers(journal), store=store)

    async def body() -> None:
        driver.post_nowait(Received("p", Heartbeat("p", 0)))
        await until(store.started.is_set)
        for step in (1, 2, 3):  # handled while the first write is on its way to disk
            driver.post_nowait(Received("p", Heartbeat("p", step)))
        await until(lambda: len(node.seen) == 4)
        assert [e[0] for e in journal] == ["queued"] * 4  # nothing delivered, nothing written
        store.release.set()
        await until(lambda: sum(e[0] == "send" for e in journal) == 4)

    await run_driver(driver, body)
    kinds = [e[0] if e[0] != "commit" else e for e in journal if e[0] != "queued"]
    # One write for the first event, ONE for the three handled meanwhile (one fsync), and
    # no ack of theirs delivered before that second write.
    assert kinds == [
        ("commit", ["outbox"]),
        "send",
        ("commit", ["outbox", "outbox", "outbox"]),
        "send",
        "send",
        "send",
    ]
    assert driver.stats.commits == 2 and driver.stats.grouped == 3


async def test_stop_writes_the_group_waiting_behind_the_write_in_flight() -> None:
    journal: list[Any] = []
    store = GatedStore(journal)
    node = ScriptNode("n", persist_then_send)
    driver = AsyncDriver(node, peers=FakePeers(journal), store=store)

    async def body() -> None:
        driver.post_nowait(Received("p", Heartbeat("p", 0)))
        await until(store.started.is_set)
        driver.post_nowait(Received("p", Heartbeat("p", 1)))
        await until(lambda: len(node.seen) == 2)
        asyncio.get_running_loop().call_later(0.05, store.release.set)

    await run_driver(driver, body)  # stop() comes while the group waits
    assert [e[1] for e in journal if e[0] == "commit"] == [["outbox"], ["outbox"]]
    assert driver.stats.commits == 2


async def test_a_full_group_makes_the_node_wait_for_the_write_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(driver_module, "MAX_GROUP", 2)
    journal: list[Any] = []
    store = GatedStore(journal)
    node = ScriptNode("n", persist_then_send)
    driver = AsyncDriver(node, peers=FakePeers(journal), store=store)

    async def body() -> None:
        driver.post_nowait(Received("p", Heartbeat("p", 0)))
        await until(store.started.is_set)
        for step in (1, 2, 3):
            driver.post_nowait(Received("p", Heartbeat("p", step)))
        await until(lambda: len(node.seen) == 3)  # the third filled the group: it waits
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(node.seen) == 3
        store.release.set()
        await until(lambda: sum(e[0] == "send" for e in journal) == 4)

    await run_driver(driver, body)
    commits = [e[1] for e in journal if e[0] == "commit"]
    assert commits == [["outbox"], ["outbox", "outbox"], ["outbox"]]


async def test_a_full_group_whose_write_has_just_finished_is_written_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The write in flight is done, but its done-callback (which starts the group behind
    # it) is still only scheduled when an event fills that group: the driver must yield
    # to let it run. It used to await the done future again and again, which never
    # yields: the event loop spun for good (an aggregator under ingest load hung so).
    monkeypatch.setattr(driver_module, "MAX_GROUP", 2)
    journal: list[Any] = []
    store = GatedStore(journal)
    store.release.set()
    node = ScriptNode("n", persist_then_send)
    driver = AsyncDriver(node, peers=FakePeers(journal), store=store)
    loop = asyncio.get_running_loop()
    written = loop.create_future()  # the write in flight, as _start_write leaves it
    written.add_done_callback(functools.partial(driver._commit_done, None))
    driver._commit_pending = written
    driver._group, driver._group_done = [Persist("outbox", 0, append=True)], loop.create_future()
    written.set_result(None)  # on disk; _commit_done is scheduled, not run yet

    def spinning(signum: int, frame: Any) -> None:
        raise TimeoutError("the driver never yielded to the event loop")

    previous = signal.signal(signal.SIGALRM, spinning)  # a spin never reaches a timeout
    signal.setitimer(signal.ITIMER_REAL, LIMIT)
    try:
        await driver._dispatch(Received("p", Heartbeat("p", 1)), loop)  # the group's 2nd
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert driver._group == [] and driver._group_done is None  # the group went to disk
    await until(lambda: ("commit", ["outbox", "outbox"]) in journal)


async def test_a_failed_write_delivers_none_of_the_group_behind_it_and_never_writes_it() -> None:
    journal: list[Any] = []
    store = GatedStore(journal, error=OSError(5, "Input/output error"))
    node = ScriptNode("n", persist_then_send)
    driver = AsyncDriver(node, peers=FakePeers(journal), store=store)
    calls: list[int] = []
    apply_many = store.apply_many

    def counted(items: Sequence[Persist]) -> None:
        calls.append(len(items))
        apply_many(items)

    store.apply_many = counted  # type: ignore[method-assign]

    async def feed() -> None:
        driver.post_nowait(Received("p", Heartbeat("p", 0)))
        await until(store.started.is_set)
        driver.post_nowait(Received("p", Heartbeat("p", 1)))
        await until(lambda: len(node.seen) == 2)
        store.release.set()

    with pytest.raises(BaseExceptionGroup) as info:
        async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
            tg.create_task(feed())
            await driver.run()
    assert info.group_contains(OSError, match="Input/output error")
    assert calls == [1]  # the group behind the failed write was never handed to the store
    assert [e[0] for e in journal] == ["queued", "queued"]  # and no ack was delivered
    assert not driver.running


async def test_a_failed_write_stops_the_driver_and_its_message_is_never_delivered() -> None:
    journal: list[Any] = []
    store = GatedStore(journal, error=OSError(28, "No space left on device"))
    node = ScriptNode("n", persist_then_send)
    driver = AsyncDriver(node, peers=FakePeers(journal), store=store)
    store.release.set()
    driver.post_nowait(Received("p", Heartbeat("p", 0)))
    with pytest.raises(BaseExceptionGroup) as info:
        async with asyncio.timeout(LIMIT):
            await driver.run()
    assert info.group_contains(OSError, match="No space left")
    assert not any(e[0] == "send" for e in journal)
    assert not driver.running


async def test_sends_to_unconnected_peers_are_dropped_and_counted() -> None:
    journal: list[Any] = []
    node = ScriptNode(
        "n", lambda e, now: [Send("p", Ack("n", 1)), Send("gone", Ack("n", 2))] if e else []
    )
    driver = AsyncDriver(node, peers=FakePeers(journal))

    async def body() -> None:
        driver.post_nowait(PeerUp("p"))
        await until(lambda: driver.stats.events == 1)

    await run_driver(driver, body)
    assert journal == [("send", "p", Ack("n", 1))]
    assert driver.stats.sends == 1 and driver.stats.sends_dropped == 1


async def test_training_results_and_failures_come_back_as_events() -> None:
    weights = {"w": np.zeros(3, dtype=np.float32)}

    def script(event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            return [Train(1, weights, {"lr": 0.1}), Train(2, weights, {"fail": True})]
        return []

    def trainer(node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        if config.get("fail"):
            raise ValueError("the data set is empty")
        assert "seed" in config  # the driver adds a derived seed when none is given
        return add_one(node_id, weights, config)

    node = ScriptNode("n", script)
    driver = AsyncDriver(node, peers=FakePeers([]), trainer=trainer)

    async def body() -> None:
        driver.post_nowait(PeerUp("p"))
        await until(lambda: len(node.events(TrainDone)) + len(node.events(TrainFailed)) == 2)

    await run_driver(driver, body)
    (done,) = node.events(TrainDone)
    assert done.job == 1 and done.result.n_examples == 7
    np.testing.assert_array_equal(done.result.weights["w"], np.ones(3))
    (failed,) = node.events(TrainFailed)
    assert failed.job == 2 and "ValueError: the data set is empty" in failed.reason
    assert driver.stats.jobs_done == 1 and driver.stats.jobs_failed == 1


async def test_a_parent_repeating_a_request_the_trainer_fails_on_costs_one_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The attack: a parent re-sends, ignoring the refusal's backoff, a request the site's
    trainer raises on. Each job still fails and is refused; the traceback (many lines) is
    logged once per exception type a minute, not once per request."""
    weights = {"w": np.zeros(3, dtype=np.float32)}
    jobs = 50

    def script(event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            return [Train(j, weights, {"fail": j % 2}) for j in range(1, jobs + 1)]
        return []

    def trainer(node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        raise (ValueError if config["fail"] else KeyError)("bad request")

    node = ScriptNode("n", script)
    driver = AsyncDriver(node, peers=FakePeers([]), trainer=trainer)

    async def body() -> None:
        driver.post_nowait(PeerUp("p"))
        await until(lambda: len(node.events(TrainFailed)) == jobs)

    with caplog.at_level("WARNING", logger="fedloom"):
        await run_driver(driver, body)
    assert driver.stats.jobs_failed == jobs
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert sorted(r.exc_info[0].__name__ for r in tracebacks if r.exc_info) == [
        "KeyError",
        "ValueError",
    ]


async def test_a_trainer_returning_garbage_fails_the_job() -> None:
    def script(event: Event, now: float) -> list[Effect]:
        return [Train(5, {}, {})] if isinstance(event, PeerUp) else []

    def garbage(node_id: str, weights: Weights, config: Mapping[str, Any]) -> Any:
        return "not a result"

    node = ScriptNode("n", script)
    driver = AsyncDriver(node, peers=FakePeers([]), trainer=garbage)

    async def body() -> None:
        driver.post_nowait(PeerUp("p"))
        await until(lambda: bool(node.events(TrainFailed)))

    await run_driver(driver, body)
    assert "not TrainResult" in node.events(TrainFailed)[0].reason


async def test_deadlines_fire_and_are_rearmed_after_every_event() -> None:
    loop = asyncio.get_running_loop()
    node = ScriptNode("n", deadline=loop.time() + 60.0)  # far away at first

    def script(event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            node.deadline = now + 0.02  # an event brings the deadline forward
        return []

    node.script = script
    driver = AsyncDriver(node, peers=FakePeers([]))

    async def body() -> None:
        driver.post_nowait(PeerUp("p"))
        await until(lambda: bool(node.events(Deadline)))

    await run_driver(driver, body)
    (t_up, _), (t_deadline, _) = node.seen[:2]
    assert isinstance(node.seen[1][1], Deadline)
    assert t_deadline >= t_up + 0.02  # never early
    assert driver.stats.deadlines == 1


async def test_a_due_deadline_is_not_starved_by_a_busy_inbox() -> None:
    node = ScriptNode("n", deadline=0.0)  # already due
    driver = AsyncDriver(node, peers=FakePeers([]))
    for i in range(50):
        driver.post_nowait(Received("p", Heartbeat("p", i)))

    async def body() -> None:
        await until(lambda: driver.stats.events == 51)

    await run_driver(driver, body)
    assert isinstance(node.seen[0][1], Deadline)


async def test_a_scaled_clock_converts_deadlines() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    node = ScriptNode("n", deadline=5.0)  # 5 node-seconds = 0.05 s at 100x

    driver = AsyncDriver(
        node, peers=FakePeers([]), clock=lambda: (loop.time() - t0) * 100.0, time_scale=100.0
    )

    async def body() -> None:
        await until(lambda: bool(node.events(Deadline)))

    await run_driver(driver, body)
    assert node.seen[0][0] >= 5.0


async def test_events_of_a_gone_connection_are_dropped() -> None:
    node = ScriptNode("n")
    driver = AsyncDriver(node, peers=FakePeers([]))
    alive = [True]

    async def body() -> None:
        driver.post_nowait(Received("p", Heartbeat("p", 1)), lambda: alive[0])
        alive[0] = False
        driver.post_nowait(Received("p", Heartbeat("p", 2)), lambda: alive[0])
        driver.post_nowait(PeerDown("p"))
        await until(lambda: driver.stats.events == 1)

    alive[0] = False  # both messages come up after their connection went away
    await run_driver(driver, body)
    assert [type(e) for _, e in node.seen] == [PeerDown]
    assert driver.stats.stale_events == 2


async def test_logs_are_structured(caplog: pytest.LogCaptureFixture) -> None:
    node = ScriptNode(
        "n",
        lambda e, now: [Log("warning", "update rejected", {"reason": "nan", "src": "s1"})],
    )
    driver = AsyncDriver(node, peers=FakePeers([]))

    async def body() -> None:
        driver.post_nowait(PeerUp("p"))
        await until(lambda: driver.stats.events == 1)

    with caplog.at_level(logging.INFO, logger="fedloom.node"):
        await run_driver(driver, body)
    (record,) = [r for r in caplog.records if r.name == "fedloom.node"]
    assert record.levelno == logging.WARNING
    assert "update rejected" in record.getMessage() and "reason=nan" in record.getMessage()
    assert record.node == "n"  # type: ignore[attr-defined]
    assert record.fields == {"reason": "nan", "src": "s1"}  # type: ignore[attr-defined]


async def test_a_failing_metrics_sink_does_not_stop_the_node() -> None:
    node = ScriptNode("n", lambda e, now: [Metric("x"), Metric("y")])

    def sink(m: Metric) -> None:
        raise RuntimeError("exporter down")

    driver = AsyncDriver(node, peers=FakePeers([]), metrics=sink)

    async def body() -> None:
        driver.post_nowait(PeerUp("p"))
        driver.post_nowait(PeerUp("q"))
        await until(lambda: driver.stats.events == 2)

    await run_driver(driver, body)


async def test_stop_cancels_training_and_the_peer_set() -> None:
    release = threading.Event()
    started = threading.Event()

    def slow(node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        started.set()
        release.wait(LIMIT)
        return add_one(node_id, weights, config)

    node = ScriptNode("n", lambda e, now: [Train(1, {}, {})] if isinstance(e, PeerUp) else [])
    peers = FakePeers([])
    driver = AsyncDriver(node, peers=peers, trainer=slow)

    async def body() -> None:
        driver.post_nowait(PeerUp("p"))
        await until(started.is_set)

    try:
        await run_driver(driver, body)  # returns although the job is still running
    finally:
        release.set()
    assert peers.cancelled
    assert not driver.running
    assert not node.events(TrainDone) and not node.events(TrainFailed)


async def test_a_bug_in_the_node_ends_run_with_the_error() -> None:
    def script(event: Event, now: float) -> list[Effect]:
        raise KeyError("bug")

    driver = AsyncDriver(ScriptNode("n", script), peers=FakePeers([]))
    driver.post_nowait(PeerUp("p"))
    with pytest.raises(BaseExceptionGroup) as info:
        async with asyncio.timeout(LIMIT):
            await driver.run()
    assert info.group_contains(KeyError)
    (error,) = info.value.exceptions
    assert "while n handled PeerUp" in " ".join(getattr(error, "__notes__", []))


async def test_a_node_stuck_on_a_past_deadline_ends_run_with_the_error() -> None:
    node = ScriptNode("n", deadline=0.0)  # far in the past of loop.time()

    def script(event: Event, now: float) -> list[Effect]:
        node.deadline = 0.0  # handles the deadline, asks for the same past time again
        return []

    node.script = script
    driver = AsyncDriver(node, peers=FakePeers([]))
    with pytest.raises(BaseExceptionGroup) as info:
        async with asyncio.timeout(LIMIT):
            await driver.run()
    assert info.group_contains(RuntimeError, match="keeps asking for a deadline at t=0.0")
    assert driver.stats.deadlines > 1000


async def test_a_node_asking_for_now_forever_is_stopped_and_never_freezes_the_loop() -> None:
    """The attack: after each Deadline the node asks for the very time it was handed. On
    the real clock that is a new time at every firing; the guard still counts it, and
    the loop's other work (a timer, another task) runs while the node spins."""
    node = ScriptNode("n", deadline=0.0)
    timer_fired: list[int] = []

    def script(event: Event, now: float) -> list[Effect]:
        node.deadline = now  # "fire me again now", for ever
        if len(node.seen) == 1:  # a callback queued while the node spins (a timer due)
            asyncio.get_running_loop().call_soon(lambda: timer_fired.append(driver.stats.deadlines))
        return []

    node.script = script
    driver = AsyncDriver(node, peers=FakePeers([]))
    seen_by_others: list[int] = []  # the node's Deadline count each time other work ran

    async def other_work() -> None:
        while True:
            seen_by_others.append(driver.stats.deadlines)
            await asyncio.sleep(0)

    ticker = asyncio.ensure_future(other_work())
    try:
        with pytest.raises(BaseExceptionGroup) as info:
            async with asyncio.timeout(LIMIT):
                await driver.run()
    finally:
        ticker.cancel()
    assert info.group_contains(RuntimeError, match="keeps asking for a deadline")
    assert info.group_contains(RuntimeError, match="1001 immediate re-fires in a row")
    assert driver.stats.deadlines == 1001  # each firing asked for another at once
    # Other work ran in between the node's firings, not only before or after them.
    assert timer_fired == [1]  # ran right after the first firing, not after the error
    during = [n for n in seen_by_others if 0 < n < driver.stats.deadlines]
    assert len(during) > 900


async def test_stop_ends_run_while_a_deadline_is_overdue() -> None:
    """A stop (SIGTERM in the daemon) is honoured between two overdue firings."""
    node = ScriptNode("n", deadline=0.0)
    driver = AsyncDriver(node, peers=FakePeers([]))

    def script(event: Event, now: float) -> list[Effect]:
        node.deadline = now
        if driver.stats.deadlines == 10:
            asyncio.get_running_loop().call_soon(driver.stop)
        return []

    node.script = script
    async with asyncio.timeout(LIMIT):
        await driver.run()  # returns: no stuck error, the stop came first
    assert 10 <= driver.stats.deadlines < 20


async def test_an_unknown_effect_ends_run_with_the_error() -> None:
    def script(event: Event, now: float) -> list[Effect]:
        return ["not an effect"]  # type: ignore[list-item]

    driver = AsyncDriver(ScriptNode("n", script), peers=FakePeers([]))
    driver.post_nowait(PeerUp("p"))
    with pytest.raises(BaseExceptionGroup) as info:
        async with asyncio.timeout(LIMIT):
            await driver.run()
    assert info.group_contains(RuntimeError, match="unknown effect")


async def test_inbox_back_pressure_waits_for_room() -> None:
    node = ScriptNode("n")
    driver = AsyncDriver(node, peers=FakePeers([]), max_inbox=2)
    driver.post_nowait(PeerUp("a"))
    driver.post_nowait(PeerUp("b"))
    blocked = asyncio.ensure_future(driver.post(PeerUp("c")))
    await asyncio.sleep(0.01)
    assert not blocked.done()  # full: the producer waits (links stop reading)

    async def body() -> None:
        await blocked
        await until(lambda: driver.stats.events == 3)

    await run_driver(driver, body)
    assert [e.peer for e in node.events(PeerUp)] == ["a", "b", "c"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="time_scale"):
        AsyncDriver(ScriptNode("n"), peers=FakePeers([]), time_scale=0)
    with pytest.raises(ValueError, match="max_inbox"):
        AsyncDriver(ScriptNode("n"), peers=FakePeers([]), max_inbox=0)


# ---------------------------------------------------------------- two real drivers


class Echo:
    """Counts heartbeats back and forth with its one peer."""

    def __init__(self, node_id: str, peer: str, start: bool) -> None:
        self._id = node_id
        self.peer = peer
        self.start = start
        self.got: list[int] = []
        self.links: list[str] = []

    @property
    def node_id(self) -> str:
        return self._id

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            self.links.append("up")
            return [Send(self.peer, Heartbeat(self._id, 0))] if self.start else []
        if isinstance(event, PeerDown):
            self.links.append("down")
        if isinstance(event, Received) and isinstance(event.msg, Heartbeat):
            self.got.append(event.msg.step)
            if event.msg.step < 20:
                return [Send(self.peer, Heartbeat(self._id, event.msg.step + 1))]
        return []

    def next_deadline(self) -> float | None:
        return None


async def test_two_drivers_talk_over_memory_links_and_survive_a_partition() -> None:
    net = MemoryNetwork()
    net.link("a", "b")
    a, b = Echo("a", "b", start=True), Echo("b", "a", start=False)
    da = AsyncDriver(a, peers=net.peers("a"))
    db = AsyncDriver(b, peers=net.peers("b"))
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        tg.create_task(da.run())
        tg.create_task(db.run())
        await until(lambda: len(a.got) + len(b.got) == 21)
        assert b.got == list(range(0, 21, 2)) and a.got == list(range(1, 21, 2))
        pairs = net.partition(["a"])
        assert pairs == [("a", "b")]
        await until(lambda: a.links == ["up", "down"] and b.links == ["up", "down"])
        net.heal(pairs)
        await until(lambda: a.links[-1] == "up" and b.links[-1] == "up")
        await until(lambda: a.got.count(1) == 2)  # a started again after the heal
        da.stop()
        db.stop()
