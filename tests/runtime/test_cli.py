"""The command line: it runs scenarios and plans, and user mistakes get one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedloom.cli import main

SCENARIO = """
name = "cli"
duration_h = 1
eval_interval_s = 600
target_accuracy = 0.8
[data]
dataset = "breast_cancer"
[sites]
count = 6
regions = ["a", "b"]
[[arms]]
name = "fedbuff"
algorithm = "fedbuff"
topology = "hierarchical"
concurrency = 3
regional_concurrency = 2
regional_buffer_size = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_sim_writes_report_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["sim", str(write(tmp_path, SCENARIO)), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["arms"][0]["name"] == "fedbuff"
    for name in ("accuracy.png", "staleness.png", "bytes.png", "accuracy.csv"):
        assert (out / name).stat().st_size > 0
    assert "fedbuff" in capsys.readouterr().out


def test_plan_prints_clusters_and_draws(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan"
    assert main(["plan", str(write(tmp_path, SCENARIO)), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "clusters: 2" in text and "aggregator" in text
    assert (out / "topology.png").stat().st_size > 0
    assert (out / "plan.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sim", "missing.toml"], "scenario file not found"),
        (["sim", "{scenario}", "--arm", "nope"], "--arm 'nope': no such arm"),
        (["plan", "{bad}"], "sites.count: expected a whole number"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    scenario = write(tmp_path, SCENARIO)
    bad = tmp_path / "bad.toml"
    bad.write_text(SCENARIO.replace("count = 6", 'count = "six"'))
    argv = [a.format(scenario=scenario, bad=bad) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "fedloom" in capsys.readouterr().out
