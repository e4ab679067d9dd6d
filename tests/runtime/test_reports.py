"""Federated evaluation and statistics services, fed events by hand: a site evaluates the
selected versions off the loop and answers queries over its registered dataset, a region
relays only its subtree, the root refuses forged, oversized and non-finite reports and
holds back what fewer than ``min_sites`` sites reported."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.protocol import Effect, Event, Log, Metric, PeerDown, PeerUp, Received, Send
from fedloom.federation.analytics import EVALUATE, QuerySpec, compute_site
from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.config import parse_config
from fedloom.runtime.datasets import DatasetRegistry
from fedloom.runtime.middleware import ServiceEvent
from fedloom.runtime.reports import (
    DatasetSource,
    EvaluationConfig,
    RegionReports,
    ReportsConfig,
    RootReports,
    SiteReports,
)
from fedloom.runtime.trainer import SitePlan
from fedloom.transport.wire import (
    EvalReport,
    ModelBroadcast,
    StatsReport,
    StatsRequest,
    TrainRequest,
)
from fedloom.workloads.workload import from_config
from tests.runtime.test_config import root_raw, site_raw


class Jobs:
    """A runner that keeps jobs until the test runs them (what a thread would do later)."""

    def __init__(self) -> None:
        self.waiting: list[Callable[[], ServiceEvent | None]] = []

    def __call__(self, job: Callable[[], ServiceEvent | None]) -> None:
        self.waiting.append(job)

    def run_all(self) -> list[ServiceEvent]:
        out = []
        while self.waiting:
            event = self.waiting.pop(0)()
            if event is not None:
                out.append(event)
        return out


def sends(effects: list[Effect]) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


def rejected(effects: list[Effect]) -> list[str]:
    return [
        str((e.labels or {}).get("reason"))
        for e in effects
        if isinstance(e, Metric) and e.name == "report_rejected"
    ]


def feed(m: Any, event: Event, now: float = 0.0) -> list[Effect]:
    """What a LayeredNode does with one middleware and a node that does nothing."""
    effects = m.intercept(event, now)
    effects = [] if effects is None else effects
    return effects + m.observe(event, effects, now)


# ---------------------------------------------------------------------------- site


@pytest.fixture(scope="module")
def plan() -> SitePlan:
    return SitePlan(from_config({"dataset": "synthetic", "n_sites": 3, "seed": 1}), 0)


def site(plan: Any, jobs: Jobs, **kw: Any) -> SiteReports:
    return SiteReports("site-1", lambda: "region-a", plan, jobs, **kw)


def request(version: int, weights: Any) -> Received:
    return Received("region-a", TrainRequest(task=version + 1, version=version, weights=weights))


def test_a_site_evaluates_the_first_version_of_each_bucket_off_the_loop(plan: SitePlan) -> None:
    jobs = Jobs()
    s = site(plan, jobs)
    w = plan.init(1)
    assert feed(s, request(0, w)) == [] and not jobs.waiting  # no schedule yet: nothing
    assert feed(s, Received("region-a", StatsRequest(EVALUATE, {"every": 3}))) == []
    assert feed(s, request(1, w)) == [] and len(jobs.waiting) == 1  # bucket 0, from v1
    feed(s, Received("region-a", ModelBroadcast(2, w)))  # bucket 0 again: skipped
    feed(s, request(4, w))  # bucket 1 while busy: waits
    feed(s, request(5, w))  # same bucket: the first one stays
    assert len(jobs.waiting) == 1
    (done,) = jobs.run_all()
    out = feed(s, done)
    (send,) = sends(out)
    report = send.msg
    assert send.peer == "region-a" and isinstance(report, EvalReport)
    assert (report.src, report.version) == ("site-1", 0)
    expected = plan.evaluate(w)
    assert report.metrics["accuracy"] == pytest.approx(expected["accuracy"])
    assert report.metrics["loss"] == pytest.approx(expected["loss"])
    assert report.n_examples == 16  # the site's held-out split, not its training set
    (done,) = jobs.run_all()  # the waiting bucket started when the first finished
    (send,) = sends(feed(s, done))
    assert send.msg.version == 3  # type: ignore[union-attr]
    feed(s, request(3, w))  # an older bucket than the last evaluated: never again
    assert not jobs.waiting
    # A report sent while the link was down is lost there: the parent gets it again.
    assert sends(feed(s, PeerUp("region-a"))) == [send]


def test_a_site_takes_its_schedule_only_from_its_parent(plan: SitePlan) -> None:
    jobs = Jobs()
    s = site(plan, jobs)
    out = feed(s, Received("site-2", StatsRequest(EVALUATE, {"every": 1})))
    assert rejected(out) == ["not_parent"] and s.every == 0
    for spec in ({"every": -1}, {"every": True}, {"every": 1, "x": 2}, {"every": "1"}):
        assert rejected(feed(s, Received("region-a", StatsRequest(EVALUATE, spec))))
    assert s.every == 0
    # Reports never flow down: a site drops them.
    assert rejected(feed(s, Received("region-a", EvalReport("site-2", 0, 5, {}))))


class Broken:
    def evaluate(self, weights: Any) -> dict[str, float]:
        raise RuntimeError("no test split")


class NoData:  # a tabular plan at a site without its table gives {}
    def evaluate(self, weights: Any) -> dict[str, float]:
        return {}


@pytest.mark.parametrize("plan", [Broken(), NoData()])
def test_a_failing_evaluation_is_reported_locally_and_sends_nothing(plan: Any) -> None:
    jobs = Jobs()
    s = site(plan, jobs)
    feed(s, Received("region-a", StatsRequest(EVALUATE, {"every": 1})))
    feed(s, request(0, {}))
    (done,) = jobs.run_all()
    out = feed(s, done)
    assert not sends(out)
    assert any(isinstance(e, Metric) and e.name == "federated_eval_failed" for e in out)


SPEC = QuerySpec(
    "vitals",
    "cohort",
    ("age", "bmi"),
    bins={"age": (0.0, 40.0, 80.0)},
    bounds={"age": (0.0, 100.0), "bmi": (10.0, 50.0)},
)


def register(state: Path, rows: int = 40, tag: str = "cohort", name: str = "patients") -> Path:
    rng = np.random.default_rng(rows)
    table = pd.DataFrame(
        {
            "age": rng.uniform(20, 70, rows).round(1),
            "bmi": rng.uniform(18, 35, rows).round(1),
            "outcome": rng.integers(0, 2, rows),
        }
    )
    csv = state.parent / f"{name}.csv"
    table.to_csv(csv, index=False)
    DatasetRegistry(state).add(csv, name=name, tags=[tag], label="outcome")
    return csv


def ask(s: SiteReports, jobs: Jobs, spec: QuerySpec = SPEC) -> StatsReport:
    out = feed(s, Received("region-a", StatsRequest(spec.name, spec.to_wire())))
    assert not sends(out)  # computed off the loop, not here
    (done,) = jobs.run_all()
    (send,) = sends(feed(s, done))
    assert send.peer == "region-a" and isinstance(send.msg, StatsReport)
    return send.msg


def test_a_site_answers_a_query_over_its_registered_dataset(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    csv = register(state)
    jobs = Jobs()
    s = site(None, jobs, datasets=DatasetSource(state))
    report = ask(s, jobs)
    assert report.code == "" and report.n == 40
    expected = compute_site(pd.read_csv(csv), SPEC)
    assert report.values == pytest.approx(dict(expected.values))


def test_a_site_without_the_tag_or_with_it_revoked_refuses_with_a_code(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    jobs = Jobs()
    s = site(None, jobs, datasets=DatasetSource(state))
    report = ask(s, jobs)
    assert (report.code, report.n, dict(report.values)) == ("dataset_missing", 0, {})
    register(state)
    DatasetRegistry(state).revoke("patients")
    assert ask(s, jobs).code == "dataset_revoked"
    hostile = {**SPEC.to_wire(), "min_cell": 1}
    out = feed(s, Received("region-a", StatsRequest("vitals", hostile)))
    (send,) = sends(out)
    assert send.msg.code == "bad_spec" and not jobs.waiting  # type: ignore[union-attr]


def test_a_noisy_answer_is_released_once_even_across_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    register(state, rows=200)
    noisy = QuerySpec(
        "vitals", "cohort", ("age",), bounds={"age": (0.0, 100.0)}, noise_multiplier=1.0
    )
    kept = state / "analytics-answers.json"
    jobs = Jobs()
    first = ask(site(None, jobs, datasets=DatasetSource(state), answers_path=kept), jobs, noisy)
    again = ask(site(None, jobs, datasets=DatasetSource(state), answers_path=kept), jobs, noisy)
    assert first.values["count.0"] != 200.0  # noise was added ...
    assert again == first  # ... once: the same answer, not a second draw
    # A different spec (or dataset) is a new release.
    other = QuerySpec(
        "vitals", "cohort", ("age",), bounds={"age": (0.0, 90.0)}, noise_multiplier=1.0
    )
    assert (
        ask(site(None, jobs, datasets=DatasetSource(state), answers_path=kept), jobs, other)
        != first
    )


# ---------------------------------------------------------------------------- region


def region(**kw: Any) -> RegionReports:
    children = {"site-1": "site", "site-2": "site", "region-b": "region"}
    r = RegionReports(
        "region-a",
        lambda: "root",
        lambda: children,
        subtrees={"region-b": ("site-7",)},
        **kw,
    )
    feed(r, PeerUp("root"))
    return r


def test_a_region_relays_its_subtree_only_and_each_report_once() -> None:
    r = region()
    ok = EvalReport("site-1", 0, 10, {"accuracy": 0.5})
    (send,) = sends(feed(r, Received("site-1", ok)))
    assert send == Send("root", ok)
    assert not sends(feed(r, Received("site-1", ok)))  # a duplicate
    nested = StatsReport("site-7", "vitals", 40, {})
    assert sends(feed(r, Received("region-b", nested))) == [Send("root", nested)]
    forged = [
        ("site-1", EvalReport("site-2", 0, 10, {})),  # a site speaking for another
        ("region-b", EvalReport("site-1", 3, 10, {})),  # outside region-b's subtree
        ("stranger", EvalReport("stranger", 0, 10, {})),  # not a child
    ]
    for peer, msg in forged:
        out = feed(r, Received(peer, msg))
        assert not sends(out) and rejected(out)


def test_a_region_relays_at_a_bounded_rate_per_child() -> None:
    r = region()
    relayed = 0
    for v in range(200):
        relayed += len(sends(feed(r, Received("site-1", EvalReport("site-1", v, 1, {})), now=0.0)))
    assert relayed == 64  # the burst; then one per 1/RELAY_PER_S seconds
    assert sends(feed(r, Received("site-1", EvalReport("site-1", 500, 1, {})), now=1.0))


def test_a_region_passes_requests_down_now_and_to_children_that_connect_later() -> None:
    r = region()
    feed(r, PeerUp("site-1"))
    schedule = StatsRequest(EVALUATE, {"every": 2})
    query = StatsRequest("vitals", SPEC.to_wire())
    assert sends(feed(r, Received("root", schedule))) == [Send("site-1", schedule)]
    assert sends(feed(r, Received("root", query))) == [Send("site-1", query)]
    assert not sends(feed(r, Received("root", query)))  # the same again (a root reconnect)
    assert sends(feed(r, PeerUp("site-2"))) == [Send("site-2", schedule), Send("site-2", query)]
    feed(r, PeerDown("site-1"))
    newer = StatsRequest(EVALUATE, {"every": 5})
    assert sends(feed(r, Received("root", newer))) == [Send("site-2", newer)]
    out = feed(r, Received("site-1", StatsRequest(EVALUATE, {"every": 1})))
    assert rejected(out) == ["not_parent"] and r.requests[EVALUATE] == newer
    assert rejected(feed(r, Received("root", StatsRequest("vitals", {"tag": "x"}))))


# ---------------------------------------------------------------------------- root

CHILDREN = {"site-1": "site", "site-2": "site", "region-a": "region"}
DECLARED = {"site-1": 100, "site-2": 100, "site-3": 100, "site-4": 100}


def root(
    tmp_path: Path | None = None,
    *,
    every: int = 2,
    min_sites: int = 3,
    version: int = 10,
    specs: tuple[QuerySpec, ...] = (SPEC,),
) -> RootReports:
    return RootReports(
        "root",
        ReportsConfig(EvaluationConfig(every, min_sites), specs),
        lambda: CHILDREN,
        model_version=lambda: version,
        declared_examples=lambda s: DECLARED.get(s, 0),
        subtrees={"region-a": ("site-3", "site-4")},
        roster_sites=lambda: frozenset(DECLARED),
        state_dir=tmp_path,
        run=(lambda job: job()) if tmp_path is not None else None,
    )


def ev(src: str, version: int = 2, n: int = 10, **metrics: float) -> EvalReport:
    return EvalReport(src, version, n, metrics or {"accuracy": 0.5, "loss": 1.0})


def via(src: str) -> str:
    return src if src in CHILDREN else "region-a"


def test_the_root_schedules_each_child_when_it_connects() -> None:
    r = root()
    out = sends(feed(r, PeerUp("region-a")))
    assert [s.msg for s in out] == [
        StatsRequest(EVALUATE, {"every": 2}),
        StatsRequest("vitals", SPEC.to_wire()),
    ]
    assert all(s.peer == "region-a" for s in out)
    assert not feed(r, PeerUp("stranger"))
    # A root with neither evaluation nor queries configured sends nothing.
    assert not feed(root(every=0, specs=()), PeerUp("region-a"))
    # Queries alone still tell the children that evaluation is off.
    (schedule, _) = sends(feed(root(every=0), PeerUp("region-a")))
    assert schedule.msg == StatsRequest(EVALUATE, {"every": 0})


@pytest.mark.parametrize(
    ("peer", "report", "reason"),
    [
        ("site-1", ev("site-2"), "not_in_subtree"),  # a site speaking for another
        ("region-a", ev("site-1"), "not_in_subtree"),  # a region for a site not under it
        ("stranger", ev("stranger"), "not_in_subtree"),
        ("site-1", ev("site-1", version=3), "bad_version"),  # not a bucket start
        ("site-1", ev("site-1", version=12), "bad_version"),  # above the root's model
        ("site-1", ev("site-1", n=101), "n_examples"),  # beyond the roster's declaration
        ("site-1", ev("site-1", n=0), "n_examples"),
        ("site-1", ev("site-1", accuracy=1.5), "metrics"),
        ("site-1", ev("site-1", accuracy=math.nan), "metrics"),
        ("site-1", ev("site-1", loss=math.inf), "metrics"),
        ("site-1", ev("site-1", other=1.0), "metrics"),  # neither accuracy nor loss
        ("site-1", EvalReport("site-1", 2, 10, {f"m{i}": 0.1 for i in range(17)}), "metrics"),
    ],
)
def test_the_root_refuses_forged_oversized_and_non_finite_reports(
    peer: str, report: EvalReport, reason: str
) -> None:
    r = root(min_sites=1)
    out = feed(r, Received(peer, report))
    assert rejected(out) == [reason]
    assert not r.published and r.view()["rejected"] == {f"eval:{reason}": 1}
    logs = [e for e in out if isinstance(e, Log)]
    assert logs and all(len(str(v)) <= 200 for e in logs for v in (e.fields or {}).values())


def test_min_sites_holds_a_bucket_back_then_publishes_example_weighted_means(
    tmp_path: Path,
) -> None:
    r = root(tmp_path)
    feed(r, Received("site-1", ev("site-1", n=10, accuracy=0.9, loss=0.2)))
    feed(r, Received("region-a", ev("site-3", n=30, accuracy=0.5, loss=1.0)))
    out = feed(r, Received("region-a", ev("site-3", n=30, accuracy=0.1, loss=9.0)))
    assert any(isinstance(e, Metric) and e.name == "report_duplicate" for e in out)
    assert not r.published and r.view()["evaluation"]["pending"] == {"2": 2}
    assert not (tmp_path / "evaluation.json").exists()  # nothing below min_sites, ever
    out = feed(r, Received("site-2", ev("site-2", n=60, accuracy=0.7, loss=0.5)))
    (agg,) = r.view()["evaluation"]["published"]
    assert agg["sites"] == 3 and agg["n_examples"] == 100
    assert agg["accuracy"] == pytest.approx((10 * 0.9 + 30 * 0.5 + 60 * 0.7) / 100)
    assert agg["loss"] == pytest.approx((10 * 0.2 + 30 * 1.0 + 60 * 0.5) / 100)
    gauges = {e.name: e.value for e in out if isinstance(e, Metric)}
    assert gauges["federated_eval_accuracy_ratio"] == pytest.approx(agg["accuracy"])
    assert gauges["federated_eval_sites_gauge"] == 3 and gauges["federated_eval_version"] == 2
    published = json.loads((tmp_path / "evaluation.json").read_text())
    assert published["published"] == [agg]
    # No site's own figures anywhere public: only the aggregate.
    assert "site-1" not in json.dumps(r.view()) and "site-1" not in json.dumps(published)
    # A restart keeps the published figure and the per-site ones it goes on from.
    again = root(tmp_path)
    assert again.view()["evaluation"] == r.view()["evaluation"]
    feed(again, Received("region-a", ev("site-4", n=100, accuracy=0.0, loss=0.0)))
    assert again.view()["evaluation"]["published"][0]["sites"] == 4


def stats(src: str, ages: list[float], spec: QuerySpec = SPEC) -> StatsReport:
    a = compute_site(pd.DataFrame({"age": ages, "bmi": [25.0] * len(ages)}), spec)
    return StatsReport(src, spec.name, a.n, dict(a.values))


def test_the_root_publishes_statistics_from_min_sites_sites(tmp_path: Path) -> None:
    r = root(tmp_path)
    feed(r, Received("site-1", stats("site-1", [30.0] * 20)))
    feed(r, Received("site-2", StatsReport("site-2", "vitals", 0, {}, "dataset_missing", "x")))
    feed(r, Received("region-a", stats("site-3", [50.0] * 20)))
    assert r.view()["analytics"]["vitals"]["result"] is None
    assert not (tmp_path / "analytics" / "vitals.json").exists()
    feed(r, Received("region-a", stats("site-4", [70.0] * 20)))
    result = r.view()["analytics"]["vitals"]["result"]
    assert result["sites"] == 3 and result["n"] == 60
    assert result["columns"]["age"]["mean"] == pytest.approx(50.0)
    assert result["columns"]["age"]["histogram"]["counts"] == [20, 40]
    assert result["refused"] == {"dataset_missing": 1}
    assert json.loads((tmp_path / "analytics" / "vitals.json").read_text()) == result
    assert root(tmp_path).view()["analytics"] == r.view()["analytics"]  # after a restart
    # A site that stops answering (revoked its data) drops out of the next aggregate.
    feed(r, Received("site-1", StatsReport("site-1", "vitals", 0, {}, "dataset_revoked", "")))
    assert r.view()["analytics"]["vitals"]["result"] is None


@pytest.mark.parametrize(
    ("peer", "report"),
    [
        ("site-1", StatsReport("site-1", "vitals", 101, {})),  # beyond the roster's bound
        ("site-1", StatsReport("site-1", "other", 20, {})),  # a query the root never asked
        ("site-1", stats("site-2", [30.0] * 20)),  # forged src
        ("site-1", StatsReport("site-1", "vitals", 20, {"count.0": 50.0})),
        ("site-1", StatsReport("site-1", "vitals", 0, {"count.0": 1.0}, "dataset_missing")),
    ],
)
def test_the_root_refuses_forged_statistics(peer: str, report: StatsReport) -> None:
    r = root()
    assert rejected(feed(r, Received(peer, report)))
    assert not r.answers["vitals"] and not r.refused["vitals"]


# ---------------------------------------------------------------------------- config


def with_reports(raw: dict[str, Any], **tables: Any) -> dict[str, Any]:
    return {**raw, **tables}


def test_the_root_reads_evaluation_and_analytics() -> None:
    cfg = parse_config(
        with_reports(
            root_raw(),
            evaluation={"every": 5, "min_sites": 4},
            analytics=[
                {
                    "name": "vitals",
                    "dataset_tag": "cohort",
                    "columns": ["age", "bmi"],
                    "bins": {"age": [0, 40, 80]},
                    "bounds": {"age": [0, 100], "bmi": [10, 50]},
                    "min_cell": 10,
                }
            ],
        )
    )
    assert cfg.reports.evaluation == EvaluationConfig(5, 4)
    (spec,) = cfg.reports.analytics
    assert (spec.tag, spec.columns, spec.min_cell) == ("cohort", ("age", "bmi"), 10)
    assert spec.noise_multiplier is None
    assert parse_config(root_raw()).reports.enabled is False


def test_a_root_with_central_dp_noises_its_queries_and_needs_bounds() -> None:
    privacy = {"mechanism": "central", "noise_multiplier": 1.3, "clip": 1.0, "delta": 1e-6}
    query = {"name": "vitals", "dataset_tag": "cohort", "columns": ["age"]}
    with pytest.raises(ConfigError, match=r"analytics\[0\].*bounds.*\[privacy\]"):
        parse_config(with_reports(root_raw(), privacy=privacy, analytics=[query]))
    cfg = parse_config(
        with_reports(
            root_raw(), privacy=privacy, analytics=[{**query, "bounds": {"age": [0, 100]}}]
        )
    )
    assert cfg.reports.analytics[0].noise_multiplier == 1.3
    assert cfg.reports.analytics[0].delta == 1e-6


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"evaluation": {"every": -1}}, "evaluation.every"),
        ({"evaluation": {"evry": 2}}, "did you mean 'every'"),
        ({"analytics": [{"name": "q", "dataset_tag": "t"}]}, r"analytics\[0\].columns"),
        (
            {"analytics": [{"name": "q", "dataset_tag": "t", "columns": ["a"], "min_cell": 1}]},
            "min_cell",
        ),
        (
            {
                "analytics": [
                    {"name": "q", "dataset_tag": "t", "columns": ["a"], "bins": {"a": [1]}}
                ]
            },
            "bins",
        ),
        (
            {"analytics": [{"name": "q", "dataset_tag": "t", "columns": ["a"]}] * 2},
            "names two queries",
        ),
    ],
)
def test_config_mistakes_name_the_field(tables: Mapping[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(with_reports(root_raw(), **tables))


def test_only_the_root_schedules() -> None:
    with pytest.raises(ConfigError, match="the root schedules"):
        parse_config(with_reports(site_raw(), evaluation={"every": 2}))


def test_the_published_figures_are_prometheus_gauges(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from fedloom.runtime.metrics import MetricsSink

    r = root()
    sink = MetricsSink()
    for src in ("site-1", "site-2"):
        for e in feed(r, Received(src, ev(src, version=4, accuracy=0.75, loss=0.5))):
            if isinstance(e, Metric):
                sink(e)
    for e in feed(r, Received("region-a", ev("site-3", version=4, accuracy=0.75, loss=0.5))):
        if isinstance(e, Metric):
            sink(e)
    text = generate_latest(sink.registry).decode()
    assert "# TYPE fedloom_node_federated_eval_accuracy_ratio gauge" in text
    assert "fedloom_node_federated_eval_accuracy_ratio 0.75" in text
    assert "fedloom_node_federated_eval_sites_gauge 3.0" in text
    assert "fedloom_node_federated_eval_version 4.0" in text


def test_a_region_holds_reports_while_its_parent_is_away_and_asks_again() -> None:
    r = region()
    feed(r, PeerUp("site-1"))
    feed(r, PeerUp("site-2"))
    query = StatsRequest("vitals", SPEC.to_wire())
    feed(r, Received("root", query))
    answer = StatsReport("site-1", "vitals", 40, {})
    assert sends(feed(r, Received("site-1", answer))) == [Send("root", answer)]
    feed(r, PeerDown("root"))  # ... and that answer may have died with the link
    late = EvalReport("site-2", 4, 10, {"accuracy": 0.5})
    assert not sends(feed(r, Received("site-2", late)))  # held, not sent into nothing
    assert not sends(feed(r, Received("site-1", answer)))  # a duplicate
    back = sends(feed(r, PeerUp("root")))
    assert back == [Send("root", late), Send("site-1", query), Send("site-2", query)]
    assert sends(feed(r, Received("site-1", answer))) == [Send("root", answer)]


@pytest.mark.parametrize(
    "text", ["", "{", "[1, 2]", '{"format": "fedloom/reports/1", "every": 2, "buckets": {"x": 1}}']
)
def test_a_damaged_state_file_starts_afresh_without_failing(tmp_path: Path, text: str) -> None:
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "evaluation.json").write_text(text)
    (tmp_path / "reports" / "analytics-vitals.json").write_text(text)
    r = root(tmp_path)
    assert not r.published and r.results == {"vitals": None}
    feed(r, Received("site-1", ev("site-1")))
    assert r.view()["evaluation"]["pending"] == {"2": 1}


_peers = st.sampled_from(["site-1", "site-2", "region-a", "stranger"])
_srcs = st.sampled_from(["site-1", "site-2", "site-3", "site-4", "root", ""])
_numbers = st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.booleans())
_eval = st.builds(
    EvalReport,
    _srcs,
    st.integers(-5, 20),
    st.integers(-5, 500),
    st.dictionaries(st.sampled_from(["accuracy", "loss", "f1", "x" * 40]), _numbers, max_size=4),
)
_stats = st.builds(
    StatsReport,
    _srcs,
    st.sampled_from(["vitals", "other"]),
    st.integers(-5, 500),
    st.dictionaries(
        st.sampled_from(["count.0", "sum.0", "sumsq.0", "hist.0.0", "hist.0.1", "supp.1", "z"]),
        _numbers,
        max_size=7,
    ),
    st.sampled_from(["", "dataset_missing", "Weird Code!"]),
    st.text(max_size=300),
)


@settings(max_examples=100, deadline=None)
@given(events=st.lists(st.tuples(_peers, st.one_of(_eval, _stats)), max_size=40))
def test_no_sequence_of_hostile_reports_crashes_the_root_or_publishes_below_min_sites(
    events: list[tuple[str, EvalReport | StatsReport]],
) -> None:
    r = root()
    for peer, msg in events:
        out = feed(r, Received(peer, msg))
        assert all(isinstance(e, Metric | Log | Send) for e in out)
    view = r.view()
    json.dumps(view, allow_nan=False)  # the status page's document stays valid JSON
    for agg in view["evaluation"]["published"]:
        assert agg["sites"] >= 3
        assert agg["accuracy"] is None or 0.0 <= agg["accuracy"] <= 1.0
    result = view["analytics"]["vitals"]["result"]
    assert result is None or result["sites"] >= 3
