"""Shared helpers for the benchmark scripts (run a scenario, print its table, write its report)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from fedloom.sim.report import Report, summary_table, write_report  # noqa: E402
from fedloom.sim.runner import run_scenario  # noqa: E402
from fedloom.sim.scenario import load_scenario  # noqa: E402


def run(scenario_file: str, out: Path | None = None, **overrides: object) -> Report:
    """Run ``scenarios/<scenario_file>`` (all arms), print the summary, write the report."""
    scenario = load_scenario(ROOT / "scenarios" / scenario_file)
    console = Console(width=160)
    console.print(f"[bold]{scenario.name}[/]: {scenario.description}")
    report = run_scenario(scenario, log=console.print, **overrides)  # type: ignore[arg-type]
    out_dir = out if out is not None else ROOT / "runs" / "bench" / scenario.name
    write_report(report, out_dir)
    console.print(summary_table(report))
    console.print(f"report and plots in {out_dir}")
    return report
