"""``fedloom``'s own command line (``fedloom/cli.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCENARIO = """
name = "pipe"
seed = 1
duration_h = 0.5
eval_interval_s = 300
[data]
dataset = "synthetic"
samples_per_site = 20
model = "softmax"
[sites]
count = 20
[compute]
distribution = "exponential"
mean_s = 60
[[arms]]
name = "a"
algorithm = "fedbuff"
topology = "star"
"""


def test_a_run_goes_on_when_the_reader_of_its_output_goes_away(tmp_path: Path) -> None:
    """``fedloom sim ... | head -1``: the reader leaves after one line. Python's next write
    to stdout raised BrokenPipeError, and the run ended with status 1, no message and no
    report (three seeds). It now finishes, its output going nowhere."""
    scenario = tmp_path / "pipe.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "fedloom",
        "sim",
        str(scenario),
        "--seeds",
        "3",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()  # head -1 has what it wanted
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in report["arms"]] == ["a"]
    assert (out / "accuracy.png").exists() and not err
