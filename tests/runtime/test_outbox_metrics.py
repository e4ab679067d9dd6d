"""The outbox and link gauges a site or region emits reach Prometheus as gauges."""

from __future__ import annotations

from prometheus_client import generate_latest

from fedloom.algorithms.protocol import Metric
from fedloom.runtime.metrics import MetricsSink
from tests.algorithms.test_backpressure import started_region

GAUGES = (
    "outbox_updates",
    "outbox_bytes",
    "outbox_in_flight",
    "outbox_window",
    "dispatch_paused",
    "parent_up",
    "parent_ack_age_seconds",
)


def test_a_paused_region_shows_its_backlog_and_a_down_parent() -> None:
    loop = started_region()
    loop.run_until(600.0)
    sink = MetricsSink()
    for name, value in loop.metrics.items():
        sink(Metric(name, value))
    text = generate_latest(sink.registry).decode()
    for name in GAUGES:
        assert f"# TYPE fedloom_{name} gauge" in text
    region = loop.region
    assert f"fedloom_outbox_updates {float(region.pending)}" in text
    assert f"fedloom_outbox_bytes {float(region._outbox.bytes)}" in text
    assert "fedloom_dispatch_paused 1.0" in text
    assert "fedloom_parent_up 0.0" in text
