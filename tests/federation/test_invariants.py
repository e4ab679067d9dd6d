from __future__ import annotations

import pytest

from fedloom.algorithms.protocol import Effect, Event, Log, Metric, Received
from fedloom.federation.invariants import InvariantChecker, InvariantViolation
from fedloom.sim.driver import SimDriver
from fedloom.sim.network import UniformLinks
from fedloom.transport.wire import Ack, Update
from tests.conformance.toy_nodes import NoisyTrainer, ToyAggregator, star


def applied(src: str, seq: int, staleness: float = 0.0) -> Metric:
    return Metric("update_applied", staleness, {"src": src, "seq": str(seq)})


def test_counts_applied_updates_and_ignores_other_effects() -> None:
    c = InvariantChecker()
    c.observe("agg", applied("s1", 1), 0.0)
    c.observe("agg", applied("s1", 2), 1.0)
    c.observe("agg", applied("s2", 1), 1.0)
    c.observe("region", applied("s1", 1), 1.0)  # another aggregator: its own ledger
    c.observe("agg", Log("info", "hi"), 1.0)
    c.observe("agg", Metric("update_duplicate", labels={"src": "s1", "seq": "1"}), 2.0)
    assert c.summary() == {"updates_applied": 4, "updates_duplicated": 0, "version_regressions": 0}


def test_applying_an_update_twice_raises() -> None:
    c = InvariantChecker()
    c.observe("agg", applied("s1", 7), 0.0)
    with pytest.raises(InvariantViolation, match=r"agg: update \(src=s1, seq=7\) applied twice"):
        c.observe("agg", applied("s1", 7), 3.5)
    assert c.updates_duplicated == 1


def test_version_going_backwards_raises() -> None:
    c = InvariantChecker()
    for v in (1, 2, 2, 3):
        c.observe("agg", Metric("model_version", float(v)), 0.0)
    c.observe("other", Metric("model_version", 1.0), 0.0)  # per node
    with pytest.raises(InvariantViolation, match="went backwards from 3 to 2"):
        c.observe("agg", Metric("model_version", 2.0), 1.0)


def test_missing_labels_are_a_violation() -> None:
    with pytest.raises(InvariantViolation, match="without src/seq"):
        InvariantChecker().observe("agg", Metric("update_applied", 0.0), 0.0)


def test_non_strict_mode_only_counts() -> None:
    c = InvariantChecker(strict=False)
    c.observe("agg", applied("s1", 1), 0.0)
    c.observe("agg", applied("s1", 1), 0.0)
    c.observe("agg", Metric("model_version", 5.0), 0.0)
    c.observe("agg", Metric("model_version", 4.0), 0.0)
    assert c.updates_duplicated == 1 and c.version_regressions == 1
    assert len(c.violations) == 2


class ForgetfulAggregator(ToyAggregator):
    """Forgets what it applied: a resend gets applied a second time (the bug we catch)."""

    def handle(self, event: Event, now: float) -> list[Effect]:
        self.applied.clear()
        return super().handle(event, now)


def test_driver_run_fails_loudly_on_a_double_apply() -> None:
    nodes, roles, pairs = star(1)
    nodes["agg"] = ForgetfulAggregator("agg", ["site-00"], {"w": nodes["agg"].weights["w"]})
    d = SimDriver(nodes, roles, UniformLinks(), neighbours=pairs, trainer=NoisyTrainer())
    u = Update("site-00", 1, 0, {"w": nodes["agg"].weights["w"]}, 1)
    for t in (1.0, 2.0):
        d.kernel.schedule_at(t, d._dispatch, "agg", Received("site-00", u))
    with pytest.raises(InvariantViolation, match="applied twice"):
        d.run(until=10.0)
    assert d.stats.updates_duplicated == 1


def test_duplicates_that_are_rejected_are_fine() -> None:
    nodes, roles, pairs = star(1)
    d = SimDriver(nodes, roles, UniformLinks(), neighbours=pairs, trainer=NoisyTrainer())
    u = Update("site-00", 1, 0, {"w": nodes["agg"].weights["w"]}, 1)
    for t in (1.0, 2.0, 3.0):
        d.kernel.schedule_at(t, d._dispatch, "agg", Received("site-00", u))
    d.kernel.schedule_at(4.0, d._dispatch, "site-00", Received("agg", Ack("site-00", 1)))
    stats = d.run(until=10.0)
    assert stats.updates_applied == 1 and stats.updates_duplicated == 0
    assert stats.metric_counts["update_duplicate"] == 2
