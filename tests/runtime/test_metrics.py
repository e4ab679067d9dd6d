"""Observability: the metrics sink, the /metrics and /healthz endpoint, JSON logs."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator

import aiohttp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from fedloom.algorithms.protocol import Metric
from fedloom.runtime.health import ObservabilityServer, start_observability
from fedloom.runtime.metrics import MetricsSink, sanitise_label_name, sanitise_metric_name
from fedloom.runtime.observability import configure_logging

pytestmark = pytest.mark.timeout(30)

_TIMEOUT = aiohttp.ClientTimeout(total=10)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition text, keyed by (name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


EFFECTS = [
    Metric("update_applied", 0.0, {"src": "a", "seq": "1"}),
    Metric("update_applied", 3.0, {"src": "a", "seq": "2"}),
    Metric("update_applied", 1.0, {"src": "b", "seq": "7"}),
    Metric("update_duplicate", 1.0, {"src": "a", "seq": "2"}),
    Metric("update_rejected", 1.0, {"reason": "bad_shape"}),
    Metric("update_rejected", 1.0, {"reason": "bad_shape"}),
    Metric("update_rejected", labels={"reason": "unknown_site"}),
    Metric("update_stale", 9.0, {"src": "c"}),
    Metric("update_late", 1.0, {"src": "b"}),
    Metric("job_timeout", 1.0, {"site": "c"}),
    Metric("peer_pruned", labels={"peer": "p9"}),
    Metric("region_forward", 4.0, {"region": "eu"}),
    Metric("region_forward", 2.0, {"region": "eu"}),
    Metric("round_closed", 5.0, {"reason": "quorum"}),
    Metric("model_version", 1.0),
    Metric("model_version", 4.0),
    Metric("buffer_fill", 3.0),
    Metric("buffer_fill", 0.0),
]


@pytest.fixture
async def served() -> AsyncIterator[tuple[MetricsSink, ObservabilityServer]]:
    sink = MetricsSink()
    server = await start_observability(sink, "127.0.0.1", 0)
    try:
        yield sink, server
    finally:
        await server.stop()


async def get(server: ObservabilityServer, path: str, **headers: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession(timeout=_TIMEOUT) as session,
        session.get(server.url + path, headers=headers) as resp,
    ):
        return resp.status, resp.headers["Content-Type"], await resp.text()


# ---------------------------------------------------------------------------- the sink


def test_effects_map_to_named_series() -> None:
    sink = MetricsSink()
    for m in EFFECTS:
        sink(m)
    v = sink.value
    assert v("fedloom_updates_applied_total", {"src": "a"}) == 2
    assert v("fedloom_updates_applied_total", {"src": "b"}) == 1
    assert v("fedloom_update_staleness_count") == 3
    assert v("fedloom_update_staleness_sum") == 4.0
    assert v("fedloom_update_staleness_bucket", {"le": "0.0"}) == 1
    assert v("fedloom_update_staleness_bucket", {"le": "1.0"}) == 2
    assert v("fedloom_update_staleness_bucket", {"le": "3.0"}) == 3
    assert v("fedloom_updates_duplicate_total", {"src": "a"}) == 1
    assert v("fedloom_updates_rejected_total", {"reason": "bad_shape"}) == 2
    assert v("fedloom_updates_rejected_total", {"reason": "unknown_site"}) == 1
    assert v("fedloom_updates_stale_total", {"src": "c"}) == 1  # value (tau) is not the count
    assert v("fedloom_updates_late_total", {"src": "b"}) == 1
    assert v("fedloom_job_timeouts_total", {"site": "c"}) == 1
    assert v("fedloom_peers_pruned_total", {"peer": "p9"}) == 1
    assert v("fedloom_region_forwards_total") == 2
    assert v("fedloom_region_forwarded_updates_total") == 6
    assert v("fedloom_rounds_closed_total", {"reason": "quorum"}) == 1
    assert v("fedloom_round_updates") == 5
    assert v("fedloom_model_version") == 4
    assert v("fedloom_buffer_fill") == 0
    assert sink.health().model_version == 4


async def test_metrics_endpoint_serves_the_effects(
    served: tuple[MetricsSink, ObservabilityServer],
) -> None:
    sink, server = served
    for m in EFFECTS:
        sink(m)
    sink.set_connected_peers(3)
    sink.add_bytes("sent", 1000)
    sink.add_bytes("sent", 24)
    sink.add_bytes("received", 7)
    sink.observe_link_rtt("root", 0.02)
    sink.observe_link_rtt("root", 0.04)
    sink.set_info("region-eu", "region", "0.1.0")
    status, ctype, text = await get(server, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain") and "version=" in ctype
    s = samples(text)
    assert s[key("fedloom_updates_applied_total", src="a")] == 2
    assert s[key("fedloom_updates_rejected_total", reason="bad_shape")] == 2
    assert s[key("fedloom_update_staleness_count")] == 3
    assert s[key("fedloom_model_version")] == 4
    assert s[key("fedloom_buffer_fill")] == 0
    assert s[key("fedloom_connected_peers")] == 3
    assert s[key("fedloom_bytes_total", direction="sent")] == 1024
    assert s[key("fedloom_bytes_total", direction="received")] == 7
    assert s[key("fedloom_link_rtt_last_seconds", peer="root")] == 0.04
    assert s[key("fedloom_link_rtt_seconds_count")] == 2
    assert s[key("fedloom_build_info", node="region-eu", role="region", version="0.1.0")] == 1
    assert s[key("fedloom_ready")] == 0
    assert 'seq="' not in text  # one series per update would grow without bound


async def test_metrics_endpoint_speaks_openmetrics_when_asked(
    served: tuple[MetricsSink, ObservabilityServer],
) -> None:
    sink, server = served
    sink(Metric("model_version", 2.0))
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, ctype, text = await get(server, "/metrics", Accept=accept)
    assert status == 200
    assert ctype.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert "fedloom_model_version 2.0" in text


async def test_healthz_is_503_until_ready_then_200_then_degraded(
    served: tuple[MetricsSink, ObservabilityServer],
) -> None:
    sink, server = served
    sink.set_info("site-3", "site", "0.1.0")
    status, ctype, text = await get(server, "/healthz")
    body = json.loads(text)
    assert status == 503 and ctype.startswith("application/json")
    assert body["status"] == "starting" and body["ready"] is False
    assert (body["node"], body["role"], body["version"]) == ("site-3", "site", "0.1.0")

    sink.set_connected_peers(1)
    sink.set_ready(True)
    status, _, text = await get(server, "/healthz")
    body = json.loads(text)
    assert status == 200
    assert body["status"] == "ok" and body["ready"] is True and body["connected_peers"] == 1

    sink.set_ready(False)
    status, _, text = await get(server, "/healthz")
    assert status == 503 and json.loads(text)["status"] == "degraded"

    status, _, _ = await get(server, "/nope")
    assert status == 404


async def test_two_sinks_do_not_share_state() -> None:
    a, b = MetricsSink(), MetricsSink()
    a(Metric("update_applied", 2.0, {"src": "x"}))
    a(Metric("brand_new_thing", 5.0))  # same generic name registered in both: no clash
    b(Metric("brand_new_thing", 1.0))
    a.set_ready(True)
    assert b.value("fedloom_updates_applied_total", {"src": "x"}) is None
    assert a.value("fedloom_node_brand_new_thing_total") == 5
    assert b.value("fedloom_node_brand_new_thing_total") == 1
    assert not b.ready and b.health().status == "starting"
    async with (
        await start_observability(a) as sa,
        await start_observability(b) as sb,
    ):
        assert sa.port != sb.port
        ta, tb = (await get(sa, "/metrics"))[2], (await get(sb, "/metrics"))[2]
        assert samples(ta)[key("fedloom_update_staleness_count")] == 1
        assert samples(tb)[key("fedloom_update_staleness_count")] == 0
        assert (await get(sa, "/healthz"))[0] == 200
        assert (await get(sb, "/healthz"))[0] == 503


def test_unknown_names_become_generic_series() -> None:
    sink = MetricsSink()
    sink(Metric("gossip.rounds-done", 2.0, {"peer": "p1", "seq": "4"}))
    sink(Metric("gossip.rounds-done", 3.0, {"peer": "p1", "seq": "5"}))
    sink(Metric("queue_size", 7.0))
    sink(Metric("queue_size", 2.0))
    sink(Metric("9lives", 1.0, {"bad label!": "v", "__reserved": "w"}))
    v = sink.value
    assert v("fedloom_node_gossip_rounds_done_total", {"peer": "p1"}) == 5
    assert v("fedloom_node_queue_size") == 2  # a gauge: the last value
    assert v("fedloom_node__9lives_total", {"bad_label_": "v", "l__reserved": "w"}) == 1


def test_odd_input_is_counted_not_raised() -> None:
    sink = MetricsSink()
    sink(Metric("things", 1.0, {"a": "1"}))
    sink(Metric("things", 1.0, {"a": "1", "b": "2"}))  # a label the series does not have
    sink(Metric("things", 1.0))  # a missing label reads ""
    sink(Metric("things", -1.0))  # counters only go up
    sink(Metric("things", float("nan")))
    sink(Metric("things", "oops"))  # type: ignore[arg-type]
    sink(Metric("things_created", 1.0))  # clashes with the counter's _created series
    sink(Metric("model_version", float("inf")))
    v = sink.value
    assert v("fedloom_node_things_total", {"a": "1"}) == 2
    assert v("fedloom_node_things_total", {"a": ""}) == 1
    errors = {
        r: v("fedloom_metric_errors_total", {"reason": r})
        for r in ("label_mismatch", "negative_increment", "non_finite", "bad_value")
    }
    assert errors == {
        "label_mismatch": 1,
        "negative_increment": 1,
        "non_finite": 2,
        "bad_value": 1,
    }
    assert v("fedloom_metric_errors_total", {"reason": "name_conflict"}) == 1
    assert v("fedloom_model_version") is None


def test_per_source_false_drops_per_peer_labels() -> None:
    sink = MetricsSink(per_source=False)
    sink(Metric("update_applied", 1.0, {"src": "a", "seq": "1"}))
    sink(Metric("update_applied", 1.0, {"src": "b", "seq": "1"}))
    sink(Metric("update_rejected", 1.0, {"reason": "bad_shape"}))
    sink.observe_link_rtt("p", 0.5)
    assert sink.value("fedloom_updates_applied_total") == 2
    assert sink.value("fedloom_updates_rejected_total", {"reason": "bad_shape"}) == 1
    assert sink.value("fedloom_link_rtt_last_seconds", {"peer": "p"}) is None
    assert sink.value("fedloom_link_rtt_seconds_count") == 1


def test_daemon_calls_validate_and_forget() -> None:
    sink = MetricsSink()
    with pytest.raises(ValueError, match="connected peers"):
        sink.set_connected_peers(-1)
    with pytest.raises(ValueError, match="byte count"):
        sink.add_bytes("sent", -5)
    with pytest.raises(ValueError, match="round-trip"):
        sink.observe_link_rtt("p", float("nan"))
    sink.observe_link_rtt("p", 0.1)
    sink.forget_peer("p")
    sink.forget_peer("never-seen")
    assert sink.value("fedloom_link_rtt_last_seconds", {"peer": "p"}) is None


async def test_start_rejects_a_bad_port() -> None:
    with pytest.raises(ValueError, match="port"):
        await start_observability(MetricsSink(), port=70000)


_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@settings(max_examples=100, deadline=None)
@given(
    st.text(max_size=20),
    st.floats(allow_nan=True),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)
def test_any_metric_effect_is_accepted(name: str, value: float, labels: dict[str, str]) -> None:
    assert _METRIC_NAME.match(sanitise_metric_name(name))
    for k in labels:
        ln = sanitise_label_name(k)
        assert _LABEL_NAME.match(ln) and not ln.startswith("__")
    sink = MetricsSink()
    sink(Metric(name, value, labels))
    sink(Metric(name, value, labels))


# ---------------------------------------------------------------------------- logs


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_json_log_lines_parse(root_logging: None) -> None:
    buf = io.StringIO()
    configure_logging(json=True, level="debug", stream=buf)
    log = logging.getLogger("fedloom.test")
    log.info("hello %s", "world", extra={"node": "n1", "fields": {"round": 3, "ts": "x"}})
    log.debug("odd", extra={"fields": {"loss": float("nan"), "acc": np.float32(0.5)}})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed", extra={"fields": {"job": 4}})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["msg"] == "hello world" and first["level"] == "info"
    assert first["logger"] == "fedloom.test" and first["ts"].endswith("Z")
    assert first["node"] == "n1" and first["round"] == 3 and first["field_ts"] == "x"
    assert second["loss"] == "nan" and second["acc"] == 0.5
    assert third["level"] == "error" and third["job"] == 4
    assert "RuntimeError: boom" in third["exc"]


def test_configure_logging_replaces_its_handler_and_prefixes_for_journald(
    root_logging: None,
) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(json=True, level=logging.INFO, stream=first)
    configure_logging(json=True, level="warning", stream=second, journald=True)
    log = logging.getLogger("fedloom.test2")
    log.info("dropped by level")
    log.warning("kept")
    assert first.getvalue() == ""
    line = second.getvalue().strip()
    assert line.startswith("<4>") and json.loads(line[3:])["msg"] == "kept"
    with pytest.raises(ValueError, match="log level"):
        configure_logging(level="chatty", stream=io.StringIO())
    log.warning("still here")  # a bad level left the working handler in place
    assert json.loads(second.getvalue().splitlines()[-1][3:])["msg"] == "still here"


def test_text_logs(root_logging: None) -> None:
    buf = io.StringIO()
    configure_logging(json=False, level="info", stream=buf, journald=False)
    logging.getLogger("fedloom.t").info("plain")
    assert buf.getvalue().rstrip().endswith("INFO fedloom.t: plain")
