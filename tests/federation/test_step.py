"""The shared step (federation.step): what both drivers do identically with a node."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    Event,
    Log,
    Metric,
    PeerUp,
    Persist,
    Received,
    Send,
    Train,
    Weights,
)
from fedloom.federation.seeds import derived_seed
from fedloom.federation.step import MAX_STUCK_DEADLINES, NodeStep, training_config
from fedloom.transport.wire import Heartbeat


class Scripted:
    """Returns the queued effect lists in turn; its deadline is whatever the test sets."""

    def __init__(self, *scripts: list[Effect], deadline: float | None = None) -> None:
        self.scripts = list(scripts)
        self.deadline = deadline
        self.seen: list[tuple[Event, float]] = []

    @property
    def node_id(self) -> str:
        return "n1"

    def handle(self, event: Event, now: float) -> list[Effect]:
        self.seen.append((event, now))
        return self.scripts.pop(0) if self.scripts else []

    def next_deadline(self) -> float | None:
        return self.deadline


class Journal:
    """An EffectSink that records each call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def send(self, node_id: str, effect: Send) -> None:
        self.calls.append(("send", node_id, effect))

    def train(self, node_id: str, job: int, weights: Weights, config: Mapping[str, Any]) -> None:
        self.calls.append(("train", node_id, (job, dict(config))))

    def persist(self, node_id: str, batch: list[Persist]) -> None:
        self.calls.append(("persist", node_id, list(batch)))

    def metric(self, node_id: str, effect: Metric, now: float) -> None:
        self.calls.append(("metric", node_id, effect))

    def log(self, node_id: str, effect: Log, now: float) -> None:
        self.calls.append(("log", node_id, effect))


def _effect(kind: str, i: int) -> Effect:
    if kind == "persist":
        return Persist(f"k{i}", i, append=bool(i % 2))
    if kind == "send":
        return Send("p", Heartbeat("n1", i))
    if kind == "metric":
        return Metric("m", float(i))
    if kind == "log":
        return Log("info", f"line {i}")
    return Train(i, {"w": np.zeros(1, np.float32)}, {"seed": i})


@given(st.lists(st.sampled_from(["persist", "send", "metric", "log", "train"]), max_size=30))
def test_effects_reach_the_sink_in_order_with_consecutive_persists_batched(
    kinds: list[str],
) -> None:
    effects = [_effect(k, i) for i, k in enumerate(kinds)]
    sink = Journal()
    NodeStep(Scripted(effects), sink)(PeerUp("p"), 1.0)
    # Flattening the sink's calls gives back the effects in their order ...
    flat: list[Any] = []
    for call, node_id, what in sink.calls:
        assert node_id == "n1"
        if call == "persist":
            flat.extend(what)
        elif call == "train":
            flat.append(("train", what[0]))
        else:
            flat.append(what)
    expected = [("train", e.job) if isinstance(e, Train) else e for e in effects]
    assert flat == expected
    # ... and no two persist calls are adjacent (a run of Persists is one batch).
    names = [call for call, _, _ in sink.calls]
    assert all(not (a == b == "persist") for a, b in itertools.pairwise(names))


def test_a_persist_batch_is_handed_over_before_the_send_after_it() -> None:
    p1, p2 = Persist("log", 1, append=True), Persist("ckpt", 2)
    ack = Send("p", Heartbeat("n1", 0))
    sink = Journal()
    NodeStep(Scripted([p1, p2, ack, Persist("log", 3, append=True)]), sink)(PeerUp("p"), 0.0)
    assert [c[0] for c in sink.calls] == ["persist", "send", "persist"]
    assert sink.calls[0][2] == [p1, p2]


def test_training_seed_is_derived_unless_the_node_chose_one() -> None:
    w: Weights = {"w": np.zeros(2, np.float32)}
    sink = Journal()
    step = NodeStep(Scripted([Train(4, w, {"lr": 0.1}), Train(5, w, {"seed": 9})]), sink, seed=77)
    step(PeerUp("p"), 0.0)
    step(PeerUp("p"), 0.0)
    (_, _, (job_a, cfg_a)), (_, _, (job_b, cfg_b)) = sink.calls
    assert (job_a, cfg_a) == (4, {"lr": 0.1, "seed": derived_seed(77, "train", "n1", 4)})
    assert (job_b, cfg_b) == (5, {"seed": 9})
    config = {"lr": 1.0}
    assert training_config(config, 1, "a", 1) is not config  # the node's mapping untouched
    assert config == {"lr": 1.0}


def test_a_node_error_carries_the_node_event_and_time() -> None:
    class Broken(Scripted):
        def handle(self, event: Event, now: float) -> list[Effect]:
            raise KeyError("boom")

    with pytest.raises(KeyError) as info:
        NodeStep(Broken(), Journal())(Received("p", Heartbeat("p", 1)), 2.5)
    assert "while n1 handled Received at t=2.5" in info.value.__notes__


def test_an_unknown_effect_raises_the_drivers_error_type() -> None:
    class DriverError(RuntimeError):
        pass

    step = NodeStep(Scripted(["not an effect"]), Journal(), error=DriverError)  # type: ignore[list-item]
    with pytest.raises(DriverError, match="unknown effect"):
        step(PeerUp("p"), 0.0)


def test_observe_sees_every_effect_before_the_sink() -> None:
    order: list[str] = []

    class Sink(Journal):
        def metric(self, node_id: str, effect: Metric, now: float) -> None:
            order.append("sink")

    def observe(node_id: str, effect: Effect, now: float) -> None:
        order.append(f"observe {type(effect).__name__} {node_id} {now}")

    NodeStep(Scripted([Metric("m")]), Sink(), observe=observe)(PeerUp("p"), 3.0)
    assert order == ["observe Metric n1 3.0", "sink"]


def test_skipped_metrics_reach_neither_the_observer_nor_the_sink() -> None:
    seen: list[str] = []

    def observe(node_id: str, effect: Effect, now: float) -> None:
        seen.append(effect.name if isinstance(effect, Metric) else type(effect).__name__)

    effects: list[Effect] = [Metric("gauge", 1.0), Metric("kept", 2.0), Log("info", "x")]
    sink = Journal()
    NodeStep(Scripted(effects), sink, observe=observe, skip_metrics={"gauge"})(PeerUp("p"), 0.0)
    assert seen == ["kept", "Log"]
    assert [what for _, _, what in sink.calls] == effects[1:]
    # Without the set every metric goes through, skipped names included.
    sink = Journal()
    NodeStep(Scripted(effects), sink)(PeerUp("p"), 0.0)
    assert [what for _, _, what in sink.calls] == effects


def test_the_step_returns_the_nodes_next_deadline() -> None:
    node = Scripted(deadline=12.0)
    step = NodeStep(node, Journal())
    assert step(PeerUp("p"), 1.0) == 12.0
    node.deadline = None
    assert step(Deadline(), 12.0) is None


def test_a_deadline_stuck_at_one_instant_is_reported() -> None:
    """Virtual clock: the node asks for a past time at every firing, at the same instant."""
    node = Scripted(deadline=-5.0)
    step = NodeStep(node, Journal(), max_stuck=10)
    for _ in range(10):  # ten immediate re-fires are tolerated ...
        step(Deadline(), 1.0)
    with pytest.raises(RuntimeError, match=r"keeps asking for a deadline at t=-5\.0"):
        step(Deadline(), 1.0)  # ... the eleventh in a row is reported


def test_a_deadline_stuck_at_one_time_is_reported_while_the_clock_moves() -> None:
    """Real clock: the node asks again for the same past time; ``now`` moves on."""
    node = Scripted(deadline=0.5)
    step = NodeStep(node, Journal(), max_stuck=10)
    now = 1.0
    with pytest.raises(RuntimeError, match=r"t=0\.5"):
        for _ in range(12):
            now += 0.001
            step(Deadline(), now)
    assert len(node.seen) == 11  # ten tolerated, the eleventh reported


class AsksForNow(Scripted):
    """The real-clock attack: after each event it wants a Deadline at the time it was
    handed, a new time at every firing (neither the time nor the instant repeats)."""

    def handle(self, event: Event, now: float) -> list[Effect]:
        self.deadline = now
        return super().handle(event, now)


@given(st.floats(0.0, 1e6), st.lists(st.floats(1e-9, 0.5), min_size=40, max_size=40))
def test_a_node_asking_for_now_is_reported_on_a_moving_clock(
    start: float, steps: list[float]
) -> None:
    node = AsksForNow()
    step = NodeStep(node, Journal(), max_stuck=len(steps) - 1)
    now = start
    with pytest.raises(RuntimeError, match="keeps asking for a deadline"):
        for dt in steps:
            now += dt
            step(Deadline(), now)
    assert len(node.seen) == len(steps)


def test_other_events_at_the_stuck_instant_do_not_reset_the_guard() -> None:
    """Virtual clock: Deadline@5 and PeerUp@5 in turn, for ever, is still stuck."""
    node = Scripted(deadline=5.0)
    step = NodeStep(node, Journal(), max_stuck=MAX_STUCK_DEADLINES)
    with pytest.raises(RuntimeError, match="1001 immediate re-fires"):
        for _ in range(100_000):
            step(Deadline(), 5.0)
            step(PeerUp("p"), 5.0)
    assert len(node.seen) == 2 * MAX_STUCK_DEADLINES + 1


def test_a_deadline_that_moves_on_or_an_event_at_a_later_time_resets_the_guard() -> None:
    node = Scripted(deadline=0.0)
    step = NodeStep(node, Journal(), max_stuck=3)
    now = 1.0
    for i in range(20):
        for _ in range(3):
            step(Deadline(), now)  # stuck, up to the limit ...
        if i % 2:
            now += 0.5
            step(PeerUp("p"), now)  # ... then another event comes, later
        else:
            node.deadline = now + 1.0  # ... or the deadline moves on once
            step(Deadline(), now)
            node.deadline = 0.0
    assert len(node.seen) == 20 * 4  # never raised


def test_observe_kinds_limits_what_the_observer_sees() -> None:
    seen: list[str] = []

    def observe(node_id: str, effect: Effect, now: float) -> None:
        seen.append(effect.name if isinstance(effect, Metric) else type(effect).__name__)

    effects: list[Effect] = [Send("p", Heartbeat("n1")), Metric("m"), Persist("k", 1), Metric("x")]
    step = NodeStep(Scripted(effects), Journal(), observe=observe, observe_kinds=(Metric,))
    step.handle(PeerUp("p"), 1.0)  # the same as step(PeerUp("p"), 1.0)
    assert seen == ["m", "x"]
