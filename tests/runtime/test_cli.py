"""The command line: it runs scenarios and plans, and user mistakes get one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
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
        (["plan", "{scenario}", "--arm", "a", "--arm", "b"], "--arm: plan draws one arm, got 2"),
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


@pytest.mark.parametrize("argv", [["--help", "run"], ["-h", "sim"], ["run", "-h"]])
def test_help_before_the_command_word_lists_every_command(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0
    out = capsys.readouterr().out
    if argv[0] == "run":  # the command's own help
        assert "--config" in out
        return
    for command in ("sim", "plan", "keygen", "roster", "run", "state", "demo", "chaos", "local"):
        assert f"    {command} " in out, command


def _python_m(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_python_m_fedloom_cli_runs_the_command(tmp_path: Path) -> None:
    proc = _python_m("fedloom.cli", "run", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("missing.toml: config file not found")


@pytest.mark.parametrize("module", ["fedloom.runtime.cli", "fedloom.sim.cli"])
def test_the_sides_modules_are_not_commands_and_say_so(module: str, tmp_path: Path) -> None:
    # A supervisor running one of them must not read a clean stop from a command never run.
    proc = _python_m(module, "run", "--config", str(tmp_path / "site.toml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"fedloom: error: {module} is not a command; run `python -m fedloom ...` (or `fedloom ...`)"
    )


def test_the_chaos_checker_answers_help_and_refuses_options(tmp_path: Path) -> None:
    proc = _python_m("fedloom.runtime.chaos.checker", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m fedloom.runtime.chaos.checker RUN_DIR")
    proc = _python_m("fedloom.runtime.chaos.checker", "--verbose")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "usage: python -m fedloom.runtime.chaos.checker RUN_DIR"
