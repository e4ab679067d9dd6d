"""The shipped chaos scenarios: every file reads, together they cover every fault kind, each
says in a comment header what it injects and expects, and the short ``smoke-*`` ones run
end to end against real daemons and pass the checker (deselect with ``-m "not chaos_run"``;
played side by side, each with its own daemons, ports, proxy and run directory: about
25 s plus start-up and checking, where one after the other took the sum)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedloom.runtime.chaos.faults import wait_gone
from fedloom.runtime.chaos.runner import ChaosRun, execute, run_checker
from fedloom.runtime.chaos.scenario import FAULT_KINDS, load_scenario

SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios" / "chaos"
FILES = sorted(SCENARIOS.glob("*.toml"))
SMOKE = [p for p in FILES if p.stem.startswith("smoke-")]


def test_every_shipped_scenario_reads_and_documents_itself() -> None:
    assert FILES
    for path in FILES:
        scen = load_scenario(path)
        assert scen.name == path.stem
        head = path.read_text().splitlines()
        comments = " ".join(line for line in head[:12] if line.startswith("#"))
        assert "Injects" in comments and "Expects" in comments, path.name
        assert scen.expect, path.name


def test_the_shipped_scenarios_cover_every_fault_kind() -> None:
    kinds = {f.kind for path in FILES for f in load_scenario(path).faults}
    assert kinds == set(FAULT_KINDS), set(FAULT_KINDS) - kinds
    wheres = {f.where for p in FILES for f in load_scenario(p).faults if f.kind == "corrupt"}
    assert wheres == {"wal_middle", "wal_end", "wal_torn", "checkpoint"}
    directions = {
        f.direction for p in FILES for f in load_scenario(p).faults if f.kind == "partition"
    }
    assert directions == {"up", "both"}  # one-way and both ways
    same = {f.same_state for p in FILES for f in load_scenario(p).faults if f.kind == "duplicate"}
    assert same == {True, False}


def test_the_smoke_subset_is_short() -> None:
    assert 2 <= len(SMOKE) <= 3
    assert sum(load_scenario(p).duration_s for p in SMOKE) <= 120


def play(path: Path, out: Path) -> bool:
    """Run the scenario at ``path`` into ``out``; whether it was interrupted."""
    return execute(ChaosRun(load_scenario(path), out, backend="proxy"))


@pytest.mark.chaos_run
@pytest.mark.timeout(240)
def test_every_smoke_scenario_passes_the_checker(tmp_path: Path) -> None:
    # Played side by side: a run mostly waits for its timeline, so together they take
    # about as long as the longest (each has its own daemons, ports, proxy and directory).
    # Checked one after the other, here: the checker draws with pyplot, not thread-safe.
    outs = [tmp_path / p.stem for p in SMOKE]
    with ThreadPoolExecutor(len(SMOKE)) as pool:
        interrupted = list(pool.map(play, SMOKE, outs))
    for path, out, stopped in zip(SMOKE, outs, interrupted, strict=True):
        assert stopped is False, path.stem
        status = run_checker(out)
        report = out / "report.json"
        verdicts = json.loads(report.read_text())["verdicts"] if report.exists() else []
        failed = [f"{v['name']}: {v['detail']}" for v in verdicts if not v["passed"]]
        assert status == 0, (path.stem, failed)
        lines = (out / "timeline.jsonl").read_text().splitlines()
        pids = [e["detail"]["pid"] for e in map(json.loads, lines) if e["event"] == "process_start"]
        assert pids, path.stem
        assert wait_gone(pids, timeout=5.0) == [], path.stem
