"""Attacks on federated evaluation and statistics, through the real services: lying sites
and regions at the root, a parent fishing for fresh noise at a site, damaged state files
at both ends, floods and bucket squatting."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import fedloom.runtime.reports as reports
from fedloom.algorithms.protocol import Effect, Metric, Received, Send
from fedloom.federation.analytics import QuerySpec, gaussian_epsilon
from fedloom.runtime.governance import ReportsGate
from fedloom.runtime.middleware import ServiceEvent
from fedloom.runtime.reports import (
    EvaluationConfig,
    JsonFiles,
    ReportsConfig,
    RootReports,
    SiteReports,
)
from fedloom.transport.wire import Ack, StatsReport, StatsRequest, Update
from tests.runtime.test_reports import (
    CHILDREN,
    DECLARED,
    SPEC,
    Jobs,
    ev,
    feed,
    rejected,
    root,
    sends,
    stats,
)


def metric_names(effects: list[Effect]) -> list[str]:
    return [e.name for e in effects if isinstance(e, Metric)]


def run_now(job: Callable[[], ServiceEvent | None]) -> None:
    job()


def sync_root(tmp_path: Path, **kw: Any) -> RootReports:
    """A root whose files are written at once (the runner runs each job in place)."""
    r = root(tmp_path, **kw)
    r._files = JsonFiles(run_now)
    return r


# ------------------------------------------------------------------- lying sites


def test_huge_finite_losses_are_refused_and_the_root_keeps_publishing(tmp_path: Path) -> None:
    r = sync_root(tmp_path, min_sites=2)
    for src in ("site-1", "site-2"):
        out = feed(r, Received(src, ev(src, loss=1.7e308)))  # finite, near float max
        assert rejected(out) == ["metrics"]
    # At the cap, the mean stays finite and is published.
    for src in ("site-1", "site-2"):
        feed(r, Received(src, ev(src, loss=reports.MAX_LOSS, accuracy=0.5)))
    (agg,) = r.view()["evaluation"]["published"]
    assert agg["loss"] == pytest.approx(reports.MAX_LOSS)
    json.dumps(r.view(), allow_nan=False)
    written = json.loads((tmp_path / "evaluation.json").read_text())
    assert written["published"] == [agg]


def test_a_value_that_cannot_be_written_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = JsonFiles(run_now)
    with caplog.at_level(logging.WARNING, logger="fedloom.daemon"):
        files.save(tmp_path / "a.json", {"x": math.inf})  # does not raise
        files.save(tmp_path / "a.json", {"x": math.nan})
        files.save(tmp_path / "b.json", {"x": 1.0})
    assert not (tmp_path / "a.json").exists()
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1.0}
    assert sum("a.json" in r.getMessage() for r in caplog.records) == 1


def test_statistics_no_honest_site_could_send_are_refused_at_the_root(tmp_path: Path) -> None:
    unbounded = QuerySpec("raw", "cohort", ("age",), min_sites=2)
    r = sync_root(tmp_path, specs=(unbounded, SPEC), min_sites=2)
    huge = {"count.0": 100.0, "sum.0": 1.7e308, "sumsq.0": 1.0}
    for src in ("site-1", "site-2"):
        assert rejected(feed(r, Received(src, StatsReport(src, "raw", 100, huge)))) == ["values"]
    # A site with rows in [0, 100] claims 5 values summing to 10,000 and every cell full.
    liar: dict[str, float] = {"count.0": 5.0, "sum.0": 100.0 * 100, "sumsq.0": 0.0}
    liar |= {"count.1": 20.0, "sum.1": 500.0, "sumsq.1": 12500.0}
    liar |= {"hist.0.0": 100.0, "hist.0.1": 100.0}
    assert rejected(feed(r, Received("site-1", StatsReport("site-1", "vitals", 100, liar))))
    cells_only = {**liar, "sum.0": 250.0, "sumsq.0": 12500.0}  # moments fine, cells not
    assert rejected(feed(r, Received("site-1", StatsReport("site-1", "vitals", 100, cells_only))))
    assert not r.answers["vitals"] and not r.answers["raw"]
    json.dumps(r.view(), allow_nan=False)


# ------------------------------------------------------------------- root state files


def _state(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / "reports").mkdir(exist_ok=True)
    (tmp_path / "reports" / name).write_text(text)


@pytest.mark.parametrize(
    "bucket",
    [
        {"site-1": [10, "0.9x", 0.1]},  # a string where a number goes
        {"site-1": [10**9, 7.0, 0.1]},  # beyond the roster, accuracy 7
        {"site-1": [10, 0.5, 1e300]},  # a loss no site may report
        {"stranger": [10, 0.5, 0.1]},  # a site the roster does not have (declares 0)
    ],
)
def test_a_damaged_evaluation_state_is_checked_like_live_reports(
    tmp_path: Path, bucket: dict[str, Any]
) -> None:
    good = {"site-4": [30, 0.1, 1.0]}  # a sound entry next to it is kept as it was
    state = {"format": reports.STATE_FORMAT, "every": 2, "buckets": {"2": {**bucket, **good}}}
    _state(tmp_path, "evaluation.json", json.dumps({**state, "published": []}))
    r = sync_root(tmp_path, min_sites=3)
    assert r.buckets == {2: {"site-4": (30, 0.1, 1.0)}}
    feed(r, Received("site-2", ev("site-2", n=10, accuracy=0.5, loss=1.0)))
    feed(r, Received("site-1", ev("site-1", n=10, accuracy=0.7, loss=1.0)))
    (agg,) = r.view()["evaluation"]["published"]
    assert agg["accuracy"] == pytest.approx((5 + 7 + 3) / 50) and agg["n_examples"] == 50


def test_a_non_finite_published_entry_is_dropped_on_load(tmp_path: Path) -> None:
    text = (
        '{"format": "fedloom/reports/1", "every": 2, "buckets": {}, "published": '
        '[{"version": 0, "sites": 3, "n_examples": 30, "accuracy": 0.5, "loss": NaN}]}'
    )
    _state(tmp_path, "evaluation.json", text)
    r = sync_root(tmp_path, min_sites=1)
    assert r.published == {}
    feed(r, Received("site-1", ev("site-1")))  # the next save does not fail
    json.dumps(r.view(), allow_nan=False)
    assert json.loads((tmp_path / "evaluation.json").read_text())["published"][0]["version"] == 2


def test_damaged_analytics_state_is_checked_like_live_reports(tmp_path: Path) -> None:
    honest = stats("site-2", [30.0] * 20)
    entry = {
        "format": reports.STATE_FORMAT,
        "spec": reports._spec_digest(SPEC.to_wire()),
        "answers": {
            "site-1": [20, {"count.0": 20.0}],  # half a column
            "site-3": [20, {"count.0": 20.0, "sum.0": 1e308, "sumsq.0": 1.0}],
            "site-2": [honest.n, dict(honest.values)],
        },
        "refused": {"site-4": "Bad Code!"},
    }
    _state(tmp_path, "analytics-vitals.json", json.dumps(entry))
    r = sync_root(tmp_path, min_sites=2)
    assert set(r.answers["vitals"]) == {"site-2"} and r.refused["vitals"] == {}
    feed(r, Received("site-1", stats("site-1", [50.0] * 20)))  # the next live reports work
    feed(r, Received("region-a", stats("site-4", [70.0] * 20)))
    result = r.results["vitals"]
    assert result is not None and result["columns"]["age"]["mean"] == pytest.approx(50.0)


# ------------------------------------------------------------------- the site's answers


class Frame:
    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame

    def open(self, tag: str) -> tuple[str, pd.DataFrame]:
        return "sha-fixed", self.frame


def noisy(name: str, z: float = 1.0, min_cell: int = 5) -> QuerySpec:
    """The same statistic (the mean age, noise z) under any name."""
    bounds = {"age": (0.0, 100.0)}
    return QuerySpec(name, "cohort", ("age",), bounds=bounds, noise_multiplier=z, min_cell=min_cell)


def stats_site(tmp_path: Path, gate: Any = None) -> tuple[SiteReports, Jobs]:
    jobs = Jobs()
    frame = Frame(pd.DataFrame({"age": np.full(40, 37.0)}))
    s = SiteReports(
        "site-1",
        lambda: "root",
        None,
        jobs,
        datasets=frame,
        answers_path=tmp_path / "analytics-answers.json",
        gate=gate,
    )
    return s, jobs


def answer(s: SiteReports, jobs: Jobs, spec: QuerySpec) -> StatsReport:
    feed(s, Received("root", StatsRequest(spec.name, spec.to_wire())))
    (done,) = jobs.run_all()
    (send,) = sends(feed(s, done))  # type: ignore[arg-type]
    assert isinstance(send.msg, StatsReport)
    return send.msg


def test_a_renamed_query_gets_the_answer_already_released(tmp_path: Path) -> None:
    s, jobs = stats_site(tmp_path)
    first = answer(s, jobs, noisy("q"))
    sums = {answer(s, jobs, noisy(f"q{i}")).values["sum.0"] for i in range(30)}
    assert sums == {first.values["sum.0"]}  # one draw, whatever the name: nothing to average
    again, jobs2 = stats_site(tmp_path)  # a restart repeats it too
    assert answer(again, jobs2, noisy("renamed")).values == first.values


def test_noisy_answers_are_never_evicted_new_statistics_are_refused_when_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reports, "MAX_ANSWERS", 3)
    s, jobs = stats_site(tmp_path)
    first = answer(s, jobs, noisy("orig"))
    for i in range(2):
        answer(s, jobs, noisy("f", min_cell=6 + i))
    full = answer(s, jobs, noisy("f", min_cell=9))
    assert full.code == "statistics_limit" and not full.values
    assert answer(s, jobs, noisy("orig")).values == first.values


def test_a_noise_floor_refuses_weak_or_no_noise(tmp_path: Path) -> None:
    gate = ReportsGate(None, frozenset({"cohort"}), False, min_noise=1.0)
    s, jobs = stats_site(tmp_path, gate)
    weak = answer(s, jobs, noisy("weak", z=0.1))
    exact = answer(s, jobs, QuerySpec("exact", "cohort", ("age",)))
    assert weak.code == exact.code == "noise_too_low"
    assert not weak.values and not exact.values
    assert answer(s, jobs, noisy("ok")).code == ""


def test_an_epsilon_budget_is_spent_once_per_release_and_persists(tmp_path: Path) -> None:
    eps = gaussian_epsilon(1.0, reports.STATISTICS_DELTA)
    gate = ReportsGate(None, frozenset({"cohort"}), False, epsilon_budget=2.5 * eps)
    s, jobs = stats_site(tmp_path, gate)
    a = answer(s, jobs, noisy("a"))
    b = answer(s, jobs, noisy("b", min_cell=6))
    assert a.code == b.code == ""
    # A third statistic would spend 3 ε of 2.5: refused; a repeat spends nothing.
    assert answer(s, jobs, noisy("c", min_cell=7)).code == "privacy_budget"
    assert answer(s, jobs, noisy("a2")).values == a.values
    # With a budget, an exact answer (no noise at all) is a release it cannot account.
    assert answer(s, jobs, QuerySpec("x", "cohort", ("age",))).code == "privacy_budget"
    kept = json.loads((tmp_path / "analytics-answers.json").read_text())
    assert kept["spent_epsilon"] == pytest.approx(2 * eps)
    again, jobs2 = stats_site(tmp_path, gate)  # after a restart, still spent
    assert answer(again, jobs2, noisy("c", min_cell=7)).code == "privacy_budget"


def test_a_damaged_answers_file_refuses_every_query_until_moved_aside(tmp_path: Path) -> None:
    s, jobs = stats_site(tmp_path)
    first = answer(s, jobs, noisy("q"))
    path = tmp_path / "analytics-answers.json"
    path.write_bytes(path.read_bytes()[:-5])  # a torn tail
    damaged, jobs2 = stats_site(tmp_path)
    refused = answer(damaged, jobs2, noisy("q"))
    assert refused.code == "failed" and not refused.values
    assert str(path) in refused.reason and "move" in refused.reason
    assert answer(damaged, jobs2, QuerySpec("x", "cohort", ("age",))).code == "failed"
    assert path.exists()  # the site never overwrites it
    path.rename(tmp_path / "analytics-answers.json.bad")
    fresh, jobs3 = stats_site(tmp_path)
    assert answer(fresh, jobs3, noisy("q")).values != first.values  # a new draw


# ------------------------------------------------------------------- regions and floods


SITES_AB = {"site-a1": 100, "site-b1": 100, "site-b2": 100}


def open_root(**kw: Any) -> RootReports:
    kids = {"region-a": "region", "region-b": "region"}
    return RootReports(
        "root",
        ReportsConfig(EvaluationConfig(2, 1), (SPEC,)),
        lambda: kids,
        model_version=lambda: 10,
        declared_examples=lambda s: SITES_AB.get(s, 0),
        roster_sites=lambda: frozenset(SITES_AB),
        **kw,
    )


def forward(r: RootReports, region: str, seq: int, *sites: str, acked: bool = True) -> list[Any]:
    """What the root's node does with a region's forward: ``Ack`` it (it took it) or not
    (it refused it); the service observes the node's effects."""
    msg = Update(region, seq, 9, {}, 10, len(sites), pairs=tuple((s, seq) for s in sites))
    effects: list[Effect] = [Send(region, Ack(region, seq))] if acked else []
    return r.observe(Received(region, msg), effects, 0.0)


def test_without_subtrees_a_region_speaks_only_for_sites_it_forwarded_updates_of() -> None:
    r = open_root()
    forged = feed(r, Received("region-a", ev("site-b1", n=100, accuracy=0.0)))
    assert "report_held" in metric_names(forged) and not r.buckets
    honest = feed(r, Received("region-b", ev("site-b1", n=50, accuracy=0.9)))
    assert "report_held" in metric_names(honest) and not r.buckets
    assert forward(r, "region-a", 1, "site-b1", acked=False) == []  # refused: proves nothing
    out = forward(r, "region-b", 1, "site-b1")  # region-b's held report goes on now
    assert "federated_eval_received" in metric_names(out)
    assert r.buckets[2] == {"site-b1": (50, 0.9, None)}


def test_two_regions_contradicting_each_other_on_a_site_are_both_dropped() -> None:
    r = open_root()
    forward(r, "region-a", 1, "site-b1")  # e.g. a standby region, or a lying one
    forward(r, "region-b", 1, "site-b1")
    feed(r, Received("region-b", ev("site-b1", n=50, accuracy=0.9)))
    assert r.published  # min_sites 1
    out = feed(r, Received("region-a", ev("site-b1", n=100, accuracy=0.0)))
    assert rejected(out) == ["conflict"]
    assert r.view()["rejected"] == {"eval:conflict": 2}
    assert "site-b1" not in r.buckets[2] and not r.published  # withdrawn: nothing to believe
    assert rejected(feed(r, Received("region-b", ev("site-b1", n=50, accuracy=0.9)))) == [
        "conflict"
    ]
    # The same for statistics.
    s1 = stats("site-b1", [30.0] * 20)
    feed(r, Received("region-b", s1))
    assert "site-b1" in r.answers["vitals"]
    out = feed(r, Received("region-a", stats("site-b1", [90.0] * 20)))
    assert rejected(out) == ["conflict"] and "site-b1" not in r.answers["vitals"]
    # The same answer through a second region (a site that moved) is only a repeat.
    r2 = open_root()
    forward(r2, "region-a", 1, "site-b1")
    forward(r2, "region-b", 1, "site-b1")
    feed(r2, Received("region-b", s1))
    assert metric_names(feed(r2, Received("region-a", s1))) == ["report_duplicate"]


def test_a_repeated_answer_is_a_duplicate_and_a_flood_is_rate_limited(tmp_path: Path) -> None:
    saves: list[Any] = []
    r = root(tmp_path, min_sites=1)
    r._files = JsonFiles(saves.append)
    report = stats("site-1", [30.0] * 20)
    feed(r, Received("site-1", report), now=0.0)
    before = len(saves)
    for _ in range(50):  # the same answer again and again: nothing to redo
        assert metric_names(feed(r, Received("site-1", report), now=0.0)) == ["report_duplicate"]
    assert len(saves) == before
    # Valid answers that differ each time: at most the burst, then the rate.
    results = [
        rejected(feed(r, Received("site-1", stats("site-1", [30.0 + i % 50] * 20)), now=1.0))
        for i in range(100)
    ]
    assert ["rate"] in results and results.count([]) <= reports.RELAY_BURST + 2


def test_one_site_cannot_evict_the_honest_pending_buckets() -> None:
    r = root(every=1, min_sites=3, version=1000)
    feed(r, Received("site-1", ev("site-1", version=900)))
    feed(r, Received("site-2", ev("site-2", version=900)))
    for i, v in enumerate(range(937, 1001)):  # 64 bucket starts it never held
        feed(r, Received("site-1", ev("site-1", version=v, accuracy=0.0)), now=float(i))
    opened = [v for v, b in r.buckets.items() if v != 900 and next(iter(b)) == "site-1"]
    assert len(opened) <= reports.MAX_BUCKETS_PER_SITE
    assert r.buckets[900] and "site-1" in r.buckets[900]
    feed(r, Received("region-a", ev("site-3", version=900)), now=100.0)
    assert 900 in r.published and r.published[900]["sites"] == 3


def test_the_roster_stand_in_is_not_used_when_subtrees_are_declared() -> None:
    # [subtrees] declared: the listed sites at once, no others, whatever their forwards say.
    r = root()
    assert set(CHILDREN) == {"site-1", "site-2", "region-a"} and "site-3" in DECLARED
    assert "federated_eval_received" in metric_names(feed(r, Received("region-a", ev("site-3"))))
    assert rejected(feed(r, Received("region-a", ev("site-9")))) == ["not_in_subtree"]


def test_the_site_reads_its_noise_floor_and_budget_from_governance() -> None:
    from fedloom.federation.config_reader import ConfigError, Table
    from fedloom.runtime.governance import read_governance

    gov = read_governance(
        Table({"statistics_min_noise": 1.5, "statistics_epsilon_budget": 8}, "governance")
    )
    assert gov.statistics_min_noise == 1.5 and gov.statistics_epsilon_budget == 8.0
    default = read_governance(Table({}, "governance"))
    assert default.statistics_min_noise == 0.0 and default.statistics_epsilon_budget is None
    for bad in ({"statistics_min_noise": -1}, {"statistics_epsilon_budget": 0}):
        with pytest.raises(ConfigError, match="statistics_"):
            read_governance(Table(bad, "governance"))


def test_a_site_config_with_a_noise_floor_refuses_an_exact_query(tmp_path: Path) -> None:
    from tests.runtime.test_governance_scope import ask as ask_tag
    from tests.runtime.test_governance_scope import service, tabular_site

    floor = '\n[governance]\nstatistics_tags = ["other"]\nstatistics_min_noise = 0.5\n'
    cfg = tabular_site(tmp_path, floor)
    jobs = Jobs()
    refused = ask_tag(service(cfg, jobs), jobs, "other")  # an exact query: no z at all
    assert refused.code == "noise_too_low" and not refused.values
