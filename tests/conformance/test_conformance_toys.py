"""Harness self-checks with toy nodes (no real algorithm needed)."""

from __future__ import annotations

from tests.conformance.harness import Federation, metric_count, metrics
from tests.conformance.toy_nodes import NoisyTrainer, Pinger, Ponger, star


def test_ping_pong_completes(federation: Federation) -> None:
    a, b = Pinger("a", "b", n=6), Ponger("b", "a", n=6)
    federation.start({"a": a, "b": b}, {"a": "peer", "b": "peer"}, [("a", "b")])
    assert federation.run_until(lambda: len(a.seen) == 3 and len(b.seen) == 4, timeout_s=30)
    assert [s for _, s in a.seen] == [1, 3, 5]
    times = [t for t, _ in sorted(a.seen + b.seen)]
    assert times == sorted(times)


def test_toy_star_applies_each_update_once(federation: Federation) -> None:
    nodes, roles, pairs = star(3)
    federation.start(nodes, roles, pairs, trainer=NoisyTrainer())
    agg = federation.node("agg")
    assert federation.run_until(lambda: agg.version >= 12, timeout_s=300)
    applied = metrics(federation, "update_applied")
    assert len(applied) == agg.version
    assert len({(m.labels["src"], m.labels["seq"]) for m in applied}) == len(applied)
    assert federation.journal.checker.updates_duplicated == 0
    assert metric_count(federation, "model_version") == agg.version
