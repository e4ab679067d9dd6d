"""report.json, CSV series and the summary table of a scenario run."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from fedloom.sim.report import (
    PLOT_FORMATS,
    SUMMARY_COLUMNS,
    ArmResult,
    Report,
    dumps_report,
    format_summary,
    human_bytes,
    human_duration,
    load_report,
    report_from_dict,
    speedup,
    strip_wall,
    summary_rows,
    summary_table,
    time_axis_unit,
    write_report,
)


def sample_report(*, wall: float = 12.5, meta_extra: dict[str, object] | None = None) -> Report:
    """Three arms as a runner would produce them: sync star, async hierarchy, gossip."""
    hours = 3600.0
    sync = ArmResult(
        name="fedavg-star",
        algorithm="fedavg",
        topology="star",
        final_accuracy=0.912,
        time_to_target_s=2 * hours,
        target_accuracy=0.9,
        bytes_up=1_234_567_890,
        bytes_down=2_500_000_000,
        bytes_by_tier={"site->root": 1_234_567_890, "root->site": 2_500_000_000},
        updates_applied=1_200,
        updates_duplicated=0,
        max_staleness=0,
        staleness_histogram={0: 1_200},
        accuracy_series=[
            (i * 600.0, round(0.5 + 0.4 * (1 - math.exp(-i / 6)), 6)) for i in range(25)
        ],
        wall_seconds=wall,
        virtual_seconds=4 * hours,
        jobs_started=1_300,
        jobs_finished=1_250,
        jobs_dropped=50,
        versions=100,
        extra={"lr": 0.05, "sweep": "grid"},
    )
    hier = ArmResult(
        name="fedbuff-hier",
        algorithm="fedbuff",
        topology="hierarchical",
        final_accuracy=0.934,
        time_to_target_s=2520.0,
        target_accuracy=0.9,
        bytes_up=456_000_000,
        bytes_down=900_000_000,
        bytes_by_tier={
            "site->region": 400_000_000,
            "region->root": 56_000_000,
            "root->region": 100_000_000,
            "region->site": 800_000_000,
        },
        updates_applied=12_345,
        updates_duplicated=17,
        max_staleness=14,
        staleness_histogram={0: 3_000, 1: 4_000, 2: 2_500, 3: 1_500, 5: 800, 10: 500, 14: 45},
        accuracy_series=[
            (i * 300.0, round(0.5 + 0.44 * (1 - math.exp(-i / 5)), 6)) for i in range(49)
        ],
        wall_seconds=wall * 1.5,
        virtual_seconds=4 * hours,
        jobs_started=12_500,
        jobs_finished=12_400,
        jobs_dropped=100,
        versions=6_000,
    )
    gossip = ArmResult(
        name="dpsgd-ring",
        algorithm="gossip",
        topology="ring",
        final_accuracy=0.81,
        time_to_target_s=None,
        target_accuracy=0.9,
        bytes_up=3_000,
        bytes_down=3_000,
        accuracy_series=[(0.0, 0.5), (7200.0, 0.7), (14400.0, 0.81)],
        wall_seconds=wall / 2,
        virtual_seconds=4 * hours,
    )
    meta: dict[str, object] = {"codec": "int8", "sites": 12, "wall_total_s": wall * 3}
    meta.update(meta_extra or {})
    return Report(
        scenario="hospitals",
        seed=7,
        description="12 hospitals in 3 regions",
        arms=[sync, hier, gossip],
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# JSON


def test_round_trip_through_files(tmp_path: Path) -> None:
    report = sample_report()
    paths = write_report(report, tmp_path, plots=False)
    assert paths["report"] == tmp_path / "report.json"
    assert load_report(tmp_path) == report
    assert load_report(tmp_path / "report.json") == report
    # Writing what was loaded gives the same file again.
    again = tmp_path / "again"
    write_report(load_report(tmp_path), again, plots=False)
    assert (again / "report.json").read_bytes() == (tmp_path / "report.json").read_bytes()


def test_report_json_is_byte_identical_and_wall_clock_goes_to_timing_json(
    tmp_path: Path,
) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_report(sample_report(wall=12.5), a, plots=False)
    write_report(sample_report(wall=12.5), b, plots=False)
    write_report(sample_report(wall=99.25), c, plots=False)
    text_a = (a / "report.json").read_bytes()
    assert (b / "report.json").read_bytes() == text_a
    assert (c / "report.json").read_bytes() == text_a  # other wall-clock, same file
    assert b"wall" not in text_a
    timing_a = json.loads((a / "timing.json").read_text())
    timing_c = json.loads((c / "timing.json").read_text())
    assert timing_a != timing_c
    assert timing_a["meta"]["wall_total_s"] == 37.5
    assert [arm["wall_seconds"] for arm in timing_a["arms"]] == [12.5, 18.75, 6.25]
    # load_report puts them back
    assert load_report(c).arms[1].wall_seconds == 12.5 * 1.5 * 99.25 / 12.5


def test_json_layout_and_key_order(tmp_path: Path) -> None:
    write_report(sample_report(meta_extra={"b": 1, "a": {"z": 1, "y": 2}}), tmp_path, plots=False)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert list(doc)[:4] == ["format", "scenario", "seed", "description"]
    assert doc["format"] == "fedloom.report/1"
    assert doc["baseline"] == "fedavg-star"
    assert list(doc["meta"]) == sorted(doc["meta"])
    assert list(doc["meta"]["a"]) == ["y", "z"]
    arm = doc["arms"][1]
    for key in (
        "final_accuracy",
        "time_to_target_s",
        "bytes_up",
        "bytes_down",
        "updates_applied",
        "updates_duplicated",
        "max_staleness",
        "virtual_seconds",
        "bytes_by_tier",
        "staleness_histogram",
        "accuracy_series",
        "jobs_started",
        "jobs_finished",
        "jobs_dropped",
        "versions",
        "extra",
    ):
        assert key in arm
    assert list(arm)[:3] == ["name", "algorithm", "topology"]
    assert "wall_seconds" not in arm  # in timing.json: report.json is byte-identical per run
    # Staleness keys sort numerically, not as strings ("10" after "5").
    assert list(arm["staleness_histogram"]) == ["0", "1", "2", "3", "5", "10", "14"]
    assert doc["arms"][2]["time_to_target_s"] is None
    assert doc["arms"][1]["speedup_vs_baseline"] == pytest.approx(7200 / 2520, abs=1e-4)
    # Series points stay one per line, so the file diffs well.
    assert "      [600.0, 0.5" in (tmp_path / "report.json").read_text()


def test_floats_rounded_and_non_finite_become_null() -> None:
    arm = ArmResult(
        name="a",
        algorithm="fedbuff",
        topology="star",
        final_accuracy=math.nan,
        time_to_target_s=1.23456789,
        target_accuracy=0.9,
        accuracy_series=[(0.1 + 0.2, 0.123456789), (10.0, math.inf)],
        wall_seconds=3.14159265,
        extra={"lr": 0.1 + 0.2, "neg": -0.0},
    )
    doc = json.loads(dumps_report(Report("s", 1, "", [arm])))
    out = doc["arms"][0]
    assert out["final_accuracy"] is None
    assert out["time_to_target_s"] == 1.235
    assert out["accuracy_series"] == [[0.3, 0.123457], [10.0, None]]
    assert out["wall_seconds"] == 3.142
    assert out["extra"] == {"lr": 0.3, "neg": 0.0}
    back = report_from_dict(doc).arms[0]
    assert math.isnan(back.final_accuracy)
    assert math.isnan(back.accuracy_series[1][1])


def test_numpy_values_are_stored_as_plain_numbers() -> None:
    # Runners hand over numpy scalars and arrays; the annotations say plain numbers.
    numpy_extra: dict[str, Any] = {"lr": np.float32(0.25), "k": np.int64(3)}
    arm = dataclasses.replace(sample_report().arms[0], extra=numpy_extra)
    meta: dict[Any, Any] = {
        "w": np.arange(3),
        "flag": np.bool_(True),
        "path": Path("runs/x"),
        3: "int key",
    }
    doc = json.loads(dumps_report(Report("s", 1, "", [arm], meta)))
    assert doc["arms"][0]["extra"] == {"k": 3, "lr": 0.25}
    assert doc["meta"] == {"3": "int key", "flag": True, "path": "runs/x", "w": [0, 1, 2]}


def test_unstorable_meta_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"meta\.obj"):
        dumps_report(Report("s", 1, "", [], {"obj": object()}))


def test_strip_wall_removes_wall_keys_at_any_depth() -> None:
    doc = {
        "wall_seconds": 1.0,
        "arms": [{"name": "a", "wall_seconds": 2.0, "extra": {"sweep_wall_s": 3, "lr": 0.1}}],
        "meta": {"wallclock": "x", "walls_built": 4},
    }
    assert strip_wall(doc) == {
        "arms": [{"name": "a", "extra": {"lr": 0.1}}],
        "meta": {"walls_built": 4},
    }
    assert "wall_seconds" in doc  # the input is left alone


def test_load_rejects_other_json(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a fedloom report"):
        load_report(tmp_path)
    with pytest.raises(ValueError, match="malformed"):
        report_from_dict({"format": "fedloom.report/1", "seed": 1})


_times = st.integers(0, 10**9).map(lambda i: i / 1000)
_accs = st.integers(0, 10**6).map(lambda i: i / 10**6)
_counts = st.integers(0, 2**53)
_arms = st.builds(
    ArmResult,
    name=st.text(min_size=1, max_size=12),
    algorithm=st.sampled_from(["fedavg", "fedbuff", "fedasync", "gossip"]),
    topology=st.sampled_from(["star", "hierarchical", "ring"]),
    final_accuracy=_accs,
    time_to_target_s=st.none() | _times,
    target_accuracy=st.none() | _accs,
    bytes_up=_counts,
    bytes_down=_counts,
    bytes_by_tier=st.dictionaries(st.text(max_size=12), _counts, max_size=4),
    updates_applied=_counts,
    updates_duplicated=_counts,
    max_staleness=st.integers(0, 1000),
    staleness_histogram=st.dictionaries(st.integers(0, 1000), _counts, max_size=8),
    accuracy_series=st.lists(st.tuples(_times, _accs), max_size=8),
    wall_seconds=_times,
    virtual_seconds=_times,
    versions=_counts,
    extra=st.dictionaries(
        st.text(max_size=8), st.integers(-(10**6), 10**6) | st.text(max_size=8), max_size=3
    ),
)


@settings(max_examples=60, deadline=None)
@given(
    arms=st.lists(_arms, max_size=4, unique_by=lambda a: a.name),
    seed=st.integers(0, 2**63 - 1),
    description=st.text(max_size=40),
)
def test_json_round_trip_property(arms: list[ArmResult], seed: int, description: str) -> None:
    report = Report("scenario", seed, description, arms, {"n": len(arms)})
    text = dumps_report(report)
    back = report_from_dict(json.loads(text))
    assert back == report
    assert dumps_report(back) == text


# ---------------------------------------------------------------------------------------------
# Files


def test_csv_series_parse(tmp_path: Path) -> None:
    report = sample_report()
    paths = write_report(report, tmp_path, plots=False)

    with paths["accuracy_csv"].open(newline="") as fh:
        acc = list(csv.DictReader(fh))
    assert list(acc[0]) == ["arm", "time_s", "accuracy"]
    assert len(acc) == sum(len(a.accuracy_series) for a in report.arms)
    hier = [r for r in acc if r["arm"] == "fedbuff-hier"]
    assert [float(r["time_s"]) for r in hier[:3]] == [0.0, 300.0, 600.0]
    assert float(hier[-1]["accuracy"]) == report.arms[1].accuracy_series[-1][1]

    with paths["staleness_csv"].open(newline="") as fh:
        stale = list(csv.DictReader(fh))
    assert list(stale[0]) == ["arm", "staleness", "count"]
    hier_hist = {int(r["staleness"]): int(r["count"]) for r in stale if r["arm"] == "fedbuff-hier"}
    assert hier_hist == report.arms[1].staleness_histogram

    with paths["bytes_csv"].open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["arm", "tier", "bytes"]
    by_arm: dict[str, dict[str, int]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], {})[r["tier"]] = int(r["bytes"])
    assert by_arm["fedbuff-hier"] == report.arms[1].bytes_by_tier
    # An arm without tiers falls back to its up/down totals.
    assert by_arm["dpsgd-ring"] == {"up": 3_000, "down": 3_000}


def test_writes_are_atomic_and_replace_old_files(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("old")
    paths = write_report(sample_report(), tmp_path, plots=False)
    assert set(paths) == {
        "report",
        "timing",
        "accuracy_csv",
        "staleness_csv",
        "bytes_csv",
        "summary",
    }
    assert load_report(tmp_path).scenario == "hospitals"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert (tmp_path / "summary.txt").read_text().startswith("hospitals")


def test_a_rerun_into_the_same_directory_leaves_no_file_of_the_earlier_run(
    tmp_path: Path,
) -> None:
    # A one-seed run written where a multi-seed private run had been kept that run's
    # accuracy_by_seed.csv and accuracy-vs-epsilon plots beside the new report.json.
    earlier = [
        "accuracy_by_seed.csv",
        *(f"{stem}.{fmt}" for stem in ("accuracy", "accuracy_vs_epsilon") for fmt in PLOT_FORMATS),
    ]
    for name in earlier:
        (tmp_path / name).write_text("earlier run")
    (tmp_path / "notes.md").write_text("the user's own")
    paths = write_report(sample_report(), tmp_path, plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*(p.name for p in paths.values()), "notes.md"]
    )


def test_report_validation() -> None:
    arm = sample_report().arms[0]
    with pytest.raises(ValueError, match="unique"):
        Report("s", 1, "", [arm, arm])
    with pytest.raises(ValueError, match="baseline"):
        Report("s", 1, "", [arm], {"baseline": "nope"})
    with pytest.raises(ValueError, match="bytes_up"):
        dataclasses.replace(arm, bytes_up=-1)
    with pytest.raises(ValueError, match="name"):
        dataclasses.replace(arm, name="")


# ---------------------------------------------------------------------------------------------
# Summary


def test_human_formats() -> None:
    assert human_duration(None) == "—"
    assert human_duration(math.inf) == "—"
    assert human_duration(2520) == "42 min"
    assert human_duration(35 * 60) == "35 min"
    assert human_duration(4320) == "1.2 h"
    assert human_duration(7200) == "2.0 h"
    assert human_duration(1_000 * 3600) == "1,000 h"
    assert human_duration(42) == "42 s"
    assert human_duration(2.5) == "2.5 s"
    assert human_bytes(0) == "0 B"
    assert human_bytes(999) == "999 B"
    assert human_bytes(12_300) == "12.3 kB"
    assert human_bytes(456_000_000) == "456 MB"
    assert human_bytes(1_234_567_890) == "1.23 GB"
    assert human_bytes(5 * 10**13) == "50.0 TB"
    assert time_axis_unit(3 * 3600) == ("hours", 3600.0)
    assert time_axis_unit(2 * 3600) == ("minutes", 60.0)
    assert time_axis_unit(90) == ("seconds", 1.0)


def test_speedup_against_first_arm_by_default() -> None:
    report = sample_report()
    sync, hier, gossip = report.arms
    assert speedup(report, sync) == 1.0
    assert speedup(report, hier) == pytest.approx(7200 / 2520)
    assert speedup(report, gossip) is None
    rows = {r[0]: r for r in summary_rows(report)}
    col = SUMMARY_COLUMNS.index("speed-up")
    assert rows["fedavg-star"][col] == "1.00×"
    assert rows["fedbuff-hier"][col] == "2.86×"
    assert rows["dpsgd-ring"][col] == "—"


def test_speedup_against_named_baseline() -> None:
    report = sample_report(meta_extra={"baseline": "fedbuff-hier"})
    assert report.baseline is report.arms[1]
    rows = {r[0]: r for r in summary_rows(report)}
    col = SUMMARY_COLUMNS.index("speed-up")
    assert rows["fedbuff-hier"][col] == "1.00×"
    assert rows["fedavg-star"][col] == "0.35×"
    # A baseline that never reached the target gives no speed-ups at all.
    none_base = sample_report(meta_extra={"baseline": "dpsgd-ring"})
    assert all(speedup(none_base, a) is None for a in none_base.arms)


def test_format_summary_plain_text() -> None:
    text = format_summary(sample_report())
    lines = text.splitlines()
    assert lines[0].startswith("hospitals — seed 7")
    # One seed gives no interval: say so (nothing said it; --seeds 1 looked like a study).
    assert "seed 7 (one seed: no confidence intervals, see --seeds)" in lines[0]
    assert "target accuracy 0.9" in lines[0]
    assert "speed-up vs fedavg-star" in lines[0]
    header = next(line for line in lines if line.startswith("arm"))
    for col in SUMMARY_COLUMNS:
        assert col in header
    star = next(line for line in lines if line.startswith("fedavg-star"))
    assert "0.912" in star and "2.0 h" in star and "1.23 GB" in star and "2.50 GB" in star
    assert "1,200" in star and "12.5" in star
    hier = next(line for line in lines if line.startswith("fedbuff-hier"))
    assert "42 min" in hier and "12,345" in hier and "2.86×" in hier
    ring = next(line for line in lines if line.startswith("dpsgd-ring"))
    assert ring.split()[2] == "—"  # time to target
    assert "\x1b" not in text  # no terminal colour codes in logs
    # Columns line up: every data row is as wide as the header row.
    table_lines = lines[lines.index(header) :]
    assert len({len(line) for line in table_lines[:2]}) == 1


def test_summary_nan_accuracy_and_empty_report() -> None:
    arm = dataclasses.replace(sample_report().arms[0], final_accuracy=math.nan)
    row = summary_rows(Report("s", 1, "", [arm]))[0]
    assert row[SUMMARY_COLUMNS.index("final acc")] == "—"
    empty = Report("empty", 0, "", [])
    assert "arm" in format_summary(empty)
    assert empty.baseline is None


def test_summary_table_renders_with_rich() -> None:
    table = summary_table(sample_report())
    assert [c.header for c in table.columns] == list(SUMMARY_COLUMNS)
    assert table.row_count == 3
    buf = io.StringIO()
    Console(file=buf, width=160, color_system=None).print(table)
    out = buf.getvalue()
    assert "fedbuff-hier" in out and "42 min" in out and "2.86×" in out
