"""``deploy/grafana/fedloom-dashboard.json``: a Grafana dashboard over the Prometheus series
the daemons really export. Every metric name in every query is one a daemon's
``MetricsSink`` exposes for a ``Metric`` the code emits (or one the daemon sets itself,
such as the evaluation gauges): no dead panels."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fedloom.algorithms.protocol import Metric
from fedloom.runtime import metrics as metrics_mod
from fedloom.runtime.harness import REPO_ROOT
from fedloom.runtime.metrics import MetricsSink

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "fedloom-dashboard.json"
SOURCES = ("algorithms", "federation", "runtime", "workloads", "transport")
_EMITTED = re.compile(r"""Metric\(\s*["']([a-z0-9_]+)["']""")
_GAUGE = re.compile(r"""(?:Gauge|Counter|Histogram)\(\s*["'](fedloom_[a-z0-9_]+)["']""")
_NAME = re.compile(r"\b(fedloom_[a-zA-Z0-9_:]+)")


def exported_names() -> set[str]:
    """Every series name a daemon can expose: the sink fed each metric the code emits
    (well-known rules and generic ones alike), the sink's own collectors, and the
    collectors the runtime registers on the sink's registry itself."""
    emitted: set[str] = set()
    registered: set[str] = set()
    for package in SOURCES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            emitted.update(_EMITTED.findall(text))
            if package == "runtime":
                registered.update(_GAUGE.findall(text))
    assert {"update_applied", "model_version"} <= emitted  # the scan works
    sink = MetricsSink()
    labels = {"src": "a", "site": "a", "peer": "a", "reason": "r", "to": "b", "code": "c"}
    for name in sorted(emitted | set(metrics_mod._rules())):
        sink(Metric(name, 1.0, labels))
    sink.set_connected_peers(1)
    sink.add_bytes("sent", 1)
    sink.input_rejected("a", "r")
    sink.observe_link_rtt("a", 0.01)
    sink.set_ready(True)
    sink.set_info("n", "root", "dev")
    names = {s.name for family in sink.registry.collect() for s in family.samples}
    for name in registered:  # e.g. fedloom_eval_accuracy (runtime.evaluation)
        names |= {name, f"{name}_total", f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def queries(dash: dict[str, Any]) -> list[str]:
    out = [
        t["expr"]
        for p in dash["panels"]
        for t in p.get("targets", [])
        if isinstance(t.get("expr"), str)
    ]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if var["type"] == "query":
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def test_the_dashboard_is_a_grafana_dashboard_with_a_datasource_input() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["__inputs"][0]["name"] == "DS_PROMETHEUS"
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    # The panels the issue names are there.
    text = " ".join(queries(dash))
    for name in (
        "fedloom_model_version",
        "fedloom_updates_applied_total",
        "fedloom_updates_rejected_total",
        "fedloom_link_rtt_last_seconds",
        "fedloom_parent_up",
        "fedloom_outbox_updates",
        "fedloom_node_site_refusals_total",
        "fedloom_privacy_epsilon",
        "fedloom_eval_accuracy",
        "fedloom_node_federated_eval_accuracy_ratio",
    ):
        assert name in text, name


def test_every_query_names_a_series_the_daemons_export() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    known = exported_names()
    used = {n for q in queries(dash) for n in _NAME.findall(q)}
    assert used, "no metric names found in the dashboard's queries"
    dead = sorted(used - known)
    assert not dead, f"panels query series no daemon exports: {dead}"


def test_a_misspelt_series_would_be_caught() -> None:
    known = exported_names()
    assert "fedloom_model_version" in known
    assert "fedloom_model_versions" not in known
    assert "fedloom_updates_applied" not in known  # a counter is exposed as ..._total
    assert Path(DASHBOARD).is_file()
