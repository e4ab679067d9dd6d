"""Several seeds per scenario: confidence intervals, paired speed-ups, first and sustained
crossings, bands in the plots, determinism, and the errors for bad seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fedloom.cli import main
from fedloom.federation.config_reader import ConfigError
from fedloom.sim.plots import accuracy_figure
from fedloom.sim.report import (
    ArmResult,
    Report,
    format_summary,
    load_report,
    report_to_dict,
    strip_wall,
    write_report,
)
from fedloom.sim.runner import first_crossing, resolve_seeds, run_scenario, sustained_crossing
from fedloom.sim.scenario import parse_scenario
from fedloom.sim.stats import _T975, ratio_summary, summarize, t_quantile


def tiny(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "tiny",
        "seed": 3,
        "duration_h": 1,
        "eval_interval_s": 300,
        "target_accuracy": 0.85,
        "target_window_s": 900,
        "baseline": "fedavg",
        "data": {"dataset": "breast_cancer", "model": "softmax"},
        "sites": {"count": 6, "regions": ["a", "b"]},
        "compute": {"distribution": "halfnormal", "min_s": 30, "sd_s": 60},
        "training": {"lr": 0.1, "local_steps": 5, "batch_size": 16},
        "algorithm": {"concurrency": 3},
        "arms": [
            {"name": "fedavg", "algorithm": "fedavg", "clients_per_round": 3},
            {"name": "fedbuff", "algorithm": "fedbuff", "buffer_size": 2},
        ],
    }
    base.update(over)
    return base


@pytest.fixture(scope="module")
def three_seeds() -> Report:
    return run_scenario(parse_scenario(tiny()), seeds=[3, 4, 5])


# ---------------------------------------------------------------------------------------------
# The statistics, against values computed by hand


def test_mean_std_and_t_interval_by_hand() -> None:
    s = summarize([1.0, 2.0, 3.0])
    # mean 2, sample sd sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1, t(0.975, 2) = 4.3027
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    half = 4.302653 / math.sqrt(3)  # = 2.484138
    assert s.ci_low == pytest.approx(2.0 - half, abs=1e-5)
    assert s.ci_high == pytest.approx(4.484138, abs=1e-5)
    # two seeds: t(0.975, 1) = 12.7062; sd of (0.90, 0.94) = 0.02 * sqrt(2) / 2 * 2 = 0.028284
    two = summarize([0.90, 0.94])
    assert two.std == pytest.approx(0.0282843, abs=1e-6)
    assert two.ci_high == pytest.approx(0.92 + 12.7062 * 0.0282843 / math.sqrt(2), abs=1e-4)
    # one value: no spread; missing values (a target never reached) are left out
    assert summarize([0.5]) == type(s)(1, 0.5, None, None, None)
    assert summarize([None, 600.0, None, 900.0]).n == 2
    assert summarize([]).mean is None


def test_t_table_matches_scipy() -> None:
    for df, value in enumerate(_T975, start=1):
        assert t_quantile(df) == pytest.approx(value, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile(0)


def test_speedup_interval_is_on_log_ratios_paired_by_seed() -> None:
    # ratios 1 and 4: logs 0 and ln 4; geometric mean 2; sd of logs ln4 / sqrt 2
    r = ratio_summary([1.0, 4.0])
    assert r.n == 2 and r.geomean == pytest.approx(2.0)
    half = 12.7062 * (math.log(4.0) / math.sqrt(2)) / math.sqrt(2)
    assert r.ci_low == pytest.approx(math.exp(math.log(2.0) - half), rel=1e-4)
    assert r.ci_high == pytest.approx(math.exp(math.log(2.0) + half), rel=1e-4)
    assert r.std == pytest.approx(math.sqrt(4.5))  # the ratios' own sd: (1, 4) -> 2.1213
    # swapping the arms inverts the interval exactly, and it never goes below zero
    inv = ratio_summary([1.0, 0.25])
    assert inv.ci_low == pytest.approx(1.0 / r.ci_high) and inv.ci_low > 0  # type: ignore[operator]
    same = ratio_summary([2.0, 2.0, 2.0, None])  # a seed where one arm never reached it
    assert (same.n, same.ci_low, same.ci_high) == (3, pytest.approx(2.0), pytest.approx(2.0))


# ---------------------------------------------------------------------------------------------
# First and sustained crossings


def test_the_window_puts_no_floor_on_the_time() -> None:
    # Every 5 minutes; at the target (0.8) from minute 5 on: a 30-minute window used to report
    # 30 minutes (the window's end); the sustained crossing is the window's start.
    series = [(0.0, 0.3)] + [(300.0 * i, 0.85) for i in range(1, 13)]
    assert first_crossing(series, 0.8) == 300.0
    assert sustained_crossing(series, 0.8, 1800.0) == 300.0


def test_a_spike_is_a_first_crossing_not_a_sustained_one() -> None:
    accs = [0.3, 0.82, 0.5, 0.81, 0.9, 0.85, 0.9, 0.86, 0.88, 0.9, 0.9, 0.9, 0.9]
    series = [(300.0 * i, a) for i, a in enumerate(accs)]
    assert first_crossing(series, 0.8) == 300.0  # the spike at minute 5
    # [5, 35) min averages 0.5 and 0.81 in: below; [15, 45) min holds: minute 15
    assert sustained_crossing(series, 0.8, 1800.0) == 900.0
    # no window reported once the run cannot show it holds
    assert sustained_crossing(series[:5], 0.8, 1800.0) is None
    # and window 0 is the first crossing
    assert sustained_crossing(series, 0.8, 0.0) == 300.0


def test_single_seed_report_keeps_its_shape_and_gains_the_crossings() -> None:
    report = run_scenario(parse_scenario(tiny()))
    assert not report.runs and report.seed == 3
    doc = report_to_dict(report)
    assert "seeds" not in doc
    for arm in doc["arms"]:
        assert "stats" not in arm and "seeds" not in arm
        assert arm["first_crossing_s"] is not None
        assert arm["time_to_target_s"] == arm["sustained_crossing_s"]
        assert arm["sustained_crossing_s"] >= arm["first_crossing_s"]
        assert arm["extra"]["first_crossing_s"] == arm["first_crossing_s"]  # the old key
        assert arm["best_accuracy"] >= arm["final_accuracy"]


# ---------------------------------------------------------------------------------------------
# Several seeds


def test_each_seed_is_the_single_run_of_that_seed(three_seeds: Report) -> None:
    assert three_seeds.seeds == (3, 4, 5)
    doc = strip_wall(report_to_dict(three_seeds))
    alone = strip_wall(report_to_dict(run_scenario(parse_scenario(tiny()), seed=4)))
    for arm, single in zip(doc["arms"], alone["arms"], strict=True):
        per_seed = arm["seeds"][1]
        assert per_seed.pop("seed") == 4
        assert per_seed == single


def test_stats_are_over_the_seeds(three_seeds: Report) -> None:
    doc = report_to_dict(three_seeds)
    assert doc["seeds"] == [3, 4, 5] and doc["seed"] == 3
    for arm in doc["arms"]:
        finals = [s["final_accuracy"] for s in arm["seeds"]]
        stats = arm["stats"]["final_accuracy"]
        mean = sum(finals) / 3
        assert stats["n"] == 3 and stats["mean"] == pytest.approx(mean, abs=1e-6)
        sd = math.sqrt(sum((f - mean) ** 2 for f in finals) / 2)
        assert stats["std"] == pytest.approx(sd, abs=1e-6)
        half = 4.302653 * sd / math.sqrt(3)
        assert stats["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-5)
        assert arm["final_accuracy"] == pytest.approx(mean, abs=1e-6)
        for key in ("best_accuracy", "bytes_up", "updates_applied", "first_crossing_s"):
            assert arm["stats"][key]["n"] == 3
        assert "jobs_per_wall_s" not in arm["stats"]  # wall-clock is no figure of a seed
        speed = arm["stats"]["speedup_vs_baseline"]
        ratios = [
            b["time_to_target_s"] / s["time_to_target_s"]
            for b, s in zip(doc["arms"][0]["seeds"], arm["seeds"], strict=True)
        ]
        assert speed["per_seed"] == pytest.approx(ratios, abs=1e-4)
        assert speed["geomean"] == pytest.approx(math.prod(ratios) ** (1 / 3), abs=1e-4)
        assert arm["speedup_vs_baseline"] == speed["geomean"]
        assert "speedup_first_vs_baseline" in arm["stats"]
    assert "mean ± 95% CI" in format_summary(three_seeds)


def test_same_scenario_and_seeds_give_byte_identical_report_json(
    three_seeds: Report, tmp_path: Path
) -> None:
    again = run_scenario(parse_scenario(tiny(seeds=[3, 4, 5])))  # the list in the file
    write_report(three_seeds, tmp_path / "a", plots=False)
    write_report(again, tmp_path / "b", plots=False)
    text = (tmp_path / "a" / "report.json").read_bytes()
    assert (tmp_path / "b" / "report.json").read_bytes() == text
    # and it reads back whole, wall-clock (timing.json) included: written again, the same
    back = load_report(tmp_path / "a")
    assert back.runs["fedbuff"][2].wall_seconds == round(
        three_seeds.runs["fedbuff"][2].wall_seconds, 3
    )
    write_report(back, tmp_path / "c", plots=False)
    assert (tmp_path / "c" / "report.json").read_bytes() == text


def test_plots_draw_bands_and_are_written_as_png_svg_pdf(
    three_seeds: Report, tmp_path: Path
) -> None:
    ax = accuracy_figure(three_seeds).axes[0]
    bands = {c.get_gid() for c in ax.collections}
    assert {"band-fedavg", "band-fedbuff"} <= bands
    paths = write_report(three_seeds, tmp_path)
    for stem in ("accuracy", "staleness", "bytes"):
        assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        svg = (tmp_path / f"{stem}.svg").read_text()
        assert svg.startswith("<?xml") and "<svg" in svg
        assert (tmp_path / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
    assert paths["accuracy_plot_svg"] == tmp_path / "accuracy.svg"
    svg = (tmp_path / "accuracy.svg").read_text()
    assert 'id="band-fedavg"' in svg and 'id="band-fedbuff"' in svg
    # a single run draws no band
    single = Report("one", 1, "", [three_seeds.runs["fedavg"][0]])
    assert not [c for c in accuracy_figure(single).axes[0].collections if c.get_gid()]


def test_aggregate_needs_every_seed_to_reach_the_target() -> None:
    def run(ttt: float | None) -> ArmResult:
        return ArmResult("a", "fedbuff", "star", 0.9, time_to_target_s=ttt, first_crossing_s=ttt)

    report = Report("s", 0, "", [run(None)], seeds=(0, 1), runs={"a": [run(600.0), run(None)]})
    doc = report_to_dict(report)
    assert doc["arms"][0]["stats"]["time_to_target_s"]["n"] == 1
    assert "(1/2)" in format_summary(report)


# ---------------------------------------------------------------------------------------------
# Errors


def _write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "s"\nduration_h = 1\n' + extra + '\ndata = { dataset = "breast_cancer" }\n'
        "[[arms]]\nalgorithm = 'fedbuff'\n"
    )
    return path


@pytest.mark.parametrize("n", ["0", "-2"])
def test_seeds_below_one_is_one_clear_line(
    tmp_path: Path, n: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "")
    assert main(["sim", str(path), "--seeds", n, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seeds" in err and f"got {n}" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ("seeds = []", "seeds: must list at least one seed"),
        ("seeds = [1, 2, 1]", "seeds[2]: seed 1 is listed twice"),
        ("seeds = [1, -1]", "seeds[1]: expected a seed >= 0"),
        ("seeds = [true]", "seeds[0]"),
        ('seeds = "3"', "seeds"),
        # 10,001 was accepted (--seeds stops at 10,000): every arm run 10,001 times.
        (f"seeds = {list(range(10_001))}", "seeds: at most 10,000 seeds, got 10,001"),
    ],
)
def test_bad_seeds_in_a_scenario_name_the_field(
    tmp_path: Path, line: str, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, line)
    assert main(["sim", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and where in err


def test_which_seeds_run() -> None:
    scenario = parse_scenario(tiny(seeds=[9, 2]))
    assert resolve_seeds(scenario) == [9, 2]
    assert resolve_seeds(scenario, n_seeds=3) == [3, 4, 5]  # --seeds wins over the list
    assert resolve_seeds(scenario, seed=10, n_seeds=2) == [10, 11]
    assert resolve_seeds(scenario, seed=10) == [10]
    assert resolve_seeds(parse_scenario(tiny())) == [3]
    with pytest.raises(ConfigError, match="--seeds"):
        resolve_seeds(scenario, n_seeds=0)
    with pytest.raises(ConfigError, match="distinct"):
        run_scenario(scenario, seeds=[1, 1])


def test_csv_gives_the_band_and_every_seed(three_seeds: Report, tmp_path: Path) -> None:
    import csv

    paths = write_report(three_seeds, tmp_path, plots=False)
    with paths["accuracy_csv"].open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["arm"] == "fedbuff"]
    with paths["accuracy_by_seed_csv"].open(newline="") as fh:
        seeds = [r for r in csv.DictReader(fh) if r["arm"] == "fedbuff"]
    assert {r["seed"] for r in seeds} == {"3", "4", "5"}
    at = rows[3]  # 15 minutes
    accs = [float(r["accuracy"]) for r in seeds if r["time_s"] == at["time_s"]]
    assert float(at["accuracy"]) == pytest.approx(sum(accs) / 3, abs=1e-6)
    s = summarize(accs)
    assert (float(at["ci95_low"]), float(at["ci95_high"])) == pytest.approx(
        (s.ci_low, s.ci_high), abs=1e-6
    )
    assert at["n"] == "3"


def test_multi_seed_report_json_reads_back(three_seeds: Report, tmp_path: Path) -> None:
    write_report(three_seeds, tmp_path, plots=False)
    doc = json.loads((tmp_path / "report.json").read_text())
    back = load_report(tmp_path)
    assert back.runs.keys() == three_seeds.runs.keys()
    assert report_to_dict(back)["arms"][1]["stats"] == doc["arms"][1]["stats"]
