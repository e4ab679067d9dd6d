"""bench/fedbuff_paper.py: the paired speed-ups and their censoring, and a quick-mode run of
the real scenario's arms (60 sites, 1 h, 2 seeds) whose figure line matches its report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from fedloom.sim.report import ArmResult, load_report
from tests.bench.loader import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("fedbuff_paper")


def arm(name: str, ttt: float | None, first: float | None = None) -> ArmResult:
    return ArmResult(
        name=name,
        algorithm="fedbuff",
        topology="star",
        final_accuracy=0.5,
        time_to_target_s=ttt,
        first_crossing_s=ttt if first is None else first,
    )


def test_speedups_are_paired_by_seed_and_a_missed_target_is_counted_not_averaged(
    bench: ModuleType,
) -> None:
    fb = [arm("fedbuff", 100.0), arm("fedbuff", 200.0), arm("fedbuff", 400.0)]
    # Paired: the ratio is 3.3 on every seed, although the times spread 4x.
    avg = [arm("fedavg-plain", 330.0), arm("fedavg-plain", 660.0), arm("fedavg-plain", 1320.0)]
    assert bench.paired(fb, avg) == pytest.approx([3.3, 3.3, 3.3])
    # One seed where the other arm never reached the target: no ratio, counted apart.
    os13 = [arm("fedavg-os13", 150.0), arm("fedavg-os13", None), arm("fedavg-os13", 400.0)]
    assert bench.paired(fb, os13) == [1.5, None, 1.0]
    assert bench.missed(fb, os13) == 1
    # First crossings are paired the same way.
    asy = [arm("fedasync", 250.0, 50.0), arm("fedasync", 500.0, 100.0)]
    assert bench.paired(fb[:2], asy, first=True) == [0.5, 0.5]
    # Censored at the horizon: the latest time the run could have seen the crossing (a
    # sustained one needs its window inside the run), so the speed-up is a lower bound.
    horizon = bench.Horizon(duration_s=1000.0, window_s=200.0)
    assert bench.paired(fb, os13, horizon=horizon) == [1.5, 4.0, 1.0]
    assert bench.paired(fb, os13, first=True, horizon=horizon) == [1.5, 5.0, 1.0]
    runs = {"fedbuff": fb, "fedavg-plain": avg, "fedavg-os13": os13, "fedasync": avg}
    line = bench.figure_line(runs, horizon)
    assert line.startswith("fedbuff_paper: FedBuff speed-up over FedAvg 3.30× [3.30–3.30], ")
    assert "over FedAvg+overselect ≥1.82× [" in line and "] (1 never), over FedAsync" in line
    assert line.endswith("(3 seeds; paper 3.3x / 2.5x)")
    # FedBuff never reaching the target gives no ratio at all, censored or not.
    never = [arm("fedbuff", None), *fb[1:]]
    assert bench.paired(never, avg, horizon=horizon) == [None, 3.3, 3.3]


@pytest.mark.timeout(90)
def test_quick_mode_runs_every_arm_and_its_figure_matches_its_report(
    bench: ModuleType, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = ["--quick", "--hours", "1", "--seeds", "2", "--no-sweep", "--no-plots"]
    line = bench.main([*argv, "--out", str(out)])
    assert line.startswith("fedbuff_paper: FedBuff speed-up over FedAvg ")
    assert line.endswith("(2 seeds; paper 3.3x / 2.5x)")
    report = load_report(out / "report.json")
    assert report.seeds == (1, 2) and set(report.runs) == set(bench.ARMS)
    doc = json.loads((out / "fedbuff_paper.json").read_text())
    assert bench.main(["--from", str(out)]) == line  # a finished run reprints alike
    fb = report.runs["fedbuff"]
    for name in bench.OTHERS:
        want = [
            None
            if b.time_to_target_s is None or o.time_to_target_s is None
            else o.time_to_target_s / b.time_to_target_s
            for b, o in zip(fb, report.runs[name], strict=True)
        ]
        assert doc["speedup"][name]["sustained"]["per_seed"] == pytest.approx(want)
    # Over-selection closed its rounds at the first K answers: the rest came late and
    # were discarded; the arm drew ceil(1.3 K) sites a round.
    os13 = report.runs["fedavg-os13"]
    assert all(int(r.extra["late_updates"]) > 0 for r in os13)
    assert all(r.updates_applied > 0 for r in report.runs["fedavg-plain"])


def test_retarget_judges_the_same_series_at_another_target(bench: ModuleType) -> None:
    series = [(0.0, 0.1), (100.0, 0.36), (200.0, 0.30), (300.0, 0.41), (400.0, 0.42), (500.0, 0.4)]
    r = replace(arm("fedbuff", 300.0), accuracy_series=series)
    low = bench.retarget({"fedbuff": [r]}, 0.35, 200.0)["fedbuff"][0]
    assert (low.first_crossing_s, low.time_to_target_s) == (100.0, 300.0)  # 0.33 over [100, 300)
    high = bench.retarget({"fedbuff": [r]}, 0.45, 200.0)["fedbuff"][0]
    assert high.first_crossing_s is None and high.time_to_target_s is None
