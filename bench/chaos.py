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


def _duration(path: Path) -> float:
    try:
        with path.open("rb") as fh:
            return float(tomllib.load(fh).get("duration_s", 120.0))
    except (OSError, tomllib.TOMLDecodeError, TypeError, ValueError):
        return 120.0  # fedloom chaos itself reports what is wrong with the file


def run_one(path: Path, out_root: Path) -> tuple[int, float, list[str]]:
    """Exit status, wall seconds and the checker's verdict lines (stdout) of one scenario."""
    cmd = [sys.executable, "-m", "fedloom", "chaos", str(path)]
    cmd += ["--out", str(out_root / path.stem)]
    started = time.monotonic()
    try:
        res = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=_duration(path) + GRACE_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, time.monotonic() - started, [*out.splitlines(), "timed out"]
    lines = res.stdout.splitlines()
    if res.returncode != 0:  # the runner's own last words say why (a bad file, a crash)
        lines += [f"stderr: {ln}" for ln in res.stderr.splitlines()[-3:]]
    return res.returncode, time.monotonic() - started, lines


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
