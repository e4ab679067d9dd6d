"""Every shipped chaos scenario against real daemons, one after the other.

Runs ``fedloom chaos`` on each ``scenarios/chaos/*.toml`` (or the files given), each into
``runs/chaos/<name>``, prints each scenario's verdict lines and exit status, and as its LAST
line "N of M scenarios passed". Exit status 0 when all passed. One scenario takes its
``duration_s`` plus start-up, teardown and checking (about 1-2 minutes each here).

    .venv/bin/python bench/chaos.py                      # all of scenarios/chaos/
    .venv/bin/python bench/chaos.py scenarios/chaos/bad-input.toml --out runs/chaos-bench
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 180.0  # start-up, the stop grace, unmounting and the checker, beyond duration_s
STOP_GRACE_S = 150.0  # a run past its time: its teardown after SIGTERM, then SIGKILL


def _duration(path: Path) -> float:
    try:
        with path.open("rb") as fh:
            return float(tomllib.load(fh).get("duration_s", 120.0))
    except (OSError, tomllib.TOMLDecodeError, TypeError, ValueError):
        return 120.0  # fedloom chaos itself reports what is wrong with the file


def run_bounded(
    cmd: list[str], timeout: float, grace: float = STOP_GRACE_S
) -> tuple[int, str, str]:
    """``cmd``'s exit status, stdout and stderr; 124 (and what it printed) when it ran past
    ``timeout``. It is sent SIGTERM first, so that `fedloom chaos` stops its daemons (a
    SIGKILLed runner leaves a paused one stopped for good: its PDEATHSIG SIGTERM waits
    for a SIGCONT); SIGKILL only after ``grace``."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return 124, out or "", err or ""
    return proc.returncode, out or "", err or ""


def run_one(path: Path, out_root: Path) -> tuple[int, float, list[str]]:
    """Exit status, wall seconds and the checker's verdict lines (stdout) of one scenario."""
    cmd = [sys.executable, "-m", "fedloom", "chaos", str(path)]
    cmd += ["--out", str(out_root / path.stem)]
    started = time.monotonic()
    status, out, err = run_bounded(cmd, _duration(path) + GRACE_S)
    lines = out.splitlines()
    if status == 124:
        lines.append("timed out")
    elif status != 0:  # the runner's own last words say why (a bad file, a crash)
        lines += [f"stderr: {ln}" for ln in err.splitlines()[-3:]]
    return status, time.monotonic() - started, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", type=Path, help="default: scenarios/chaos/*.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "chaos", help="run root")
    args = parser.parse_args(argv)
    files = args.scenarios or sorted((ROOT / "scenarios" / "chaos").glob("*.toml"))
    passed = 0
    for path in files:
        status, wall, lines = run_one(path, args.out)
        verdict = "PASS" if status == 0 else f"FAIL (exit {status})"
        print(f"== {path.stem}: {verdict} in {wall:.0f} s", flush=True)
        for line in lines:
            print(f"   {line}", flush=True)
        passed += status == 0
    print(f"{passed} of {len(files)} scenarios passed", flush=True)
    return 0 if passed == len(files) else 1


if __name__ == "__main__":
    sys.exit(main())
