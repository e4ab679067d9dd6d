"""The figures a refactor must not regress, measured before and after in one run.

Checks the base revision out into a temporary git worktree and runs, for the base and for
this working tree, one after the other on the same machine:

- ``bench/sim_throughput.py``, ``bench/transport_throughput.py`` and ``bench/round.py``
  (each prints its figure on its last line; that line is reported verbatim),
- ``fedloom demo`` (what ``make demo`` runs once the environment exists): its wall time,
- ``make test``'s steps (ruff, ruff format, mypy, the import contracts and the wheel check
  where the tree has them, pytest): their wall time (``--with-tests``; about 2 x 7 minutes).

Both trees run with this checkout's virtual environment, so the dependencies are the same;
the base tree is put first on ``PYTHONPATH`` (a base from before the ``fedloom.*``
namespace imports its top-level packages from there). Timings here are noisy: compare the
two columns of one run, never figures from different runs.

    .venv/bin/python bench/before_after.py --base 1fa6e61 [--with-tests] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("sim_throughput", "transport_throughput", "round")


@dataclass(frozen=True, slots=True)
class Tree:
    label: str
    path: Path

    @property
    def namespaced(self) -> bool:
        """Whether this tree has the ``fedloom.*`` namespace (a ``fedloom/`` package)."""
        return (self.path / "fedloom" / "__init__.py").is_file()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.path)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env


@dataclass(frozen=True, slots=True)
class Outcome:
    seconds: float
    status: int
    last_line: str


def _run(tree: Tree, cmd: Sequence[str], timeout_s: float) -> Outcome:
    start = time.monotonic()
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=tree.path,
            env=tree.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Outcome(time.monotonic() - start, 124, f"timed out after {timeout_s:.0f} s")
    elapsed = time.monotonic() - start
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode != 0:
        tail = " | ".join(lines[-3:])
        return Outcome(elapsed, proc.returncode, f"FAILED (status {proc.returncode}): {tail}")
    out_lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return Outcome(elapsed, 0, out_lines[-1] if out_lines else "")


def _bench(tree: Tree, name: str) -> Outcome:
    return _run(tree, [sys.executable, f"bench/{name}.py"], timeout_s=1800)


def _demo(tree: Tree, workdir: Path) -> Outcome:
    module = "fedloom" if tree.namespaced else "runtime.cli"
    cmd = [sys.executable, "-m", module, "demo", "--workdir", str(workdir), "--quiet"]
    return _run(tree, cmd, timeout_s=900)


def _tests(tree: Tree) -> Outcome:
    """``make test``'s steps with this environment's tools (the base tree's own config)."""
    bin_dir = Path(sys.executable).parent
    steps = [
        f"{bin_dir}/ruff check .",
        f"{bin_dir}/ruff format --check .",
        f"{bin_dir}/mypy",
    ]
    if tree.namespaced and shutil.which("lint-imports", path=str(bin_dir)):
        steps.append(f"{bin_dir}/lint-imports")
    makefile = (tree.path / "Makefile").read_text(encoding="utf-8")
    if "wheel-check" in makefile:
        steps.append(f"make --no-print-directory wheel-check BIN={bin_dir}")
    steps.append(f"{bin_dir}/pytest -q -p no:randomly")
    return _run(tree, ["bash", "-c", " && ".join(steps)], timeout_s=1800)


def _worktree(base: str, where: Path) -> Tree:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(where), base],
        check=True,
        capture_output=True,
    )
    return Tree(f"base {base}", where)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--with-tests", action="store_true", help="also time make test's steps")
    parser.add_argument(
        "--only",
        action="append",
        choices=(*BENCHES, "demo", "tests"),
        help="run only these measurements (repeatable)",
    )
    args = parser.parse_args(argv)
    wanted = set(args.only or (*BENCHES, "demo", *(("tests",) if args.with_tests else ())))
    head = Tree("this tree", ROOT)
    rows: list[tuple[str, Outcome, Outcome]] = []
    with tempfile.TemporaryDirectory(prefix="fedloom-before-after-") as tmp:
        base = _worktree(args.base, Path(tmp) / "base")
        try:
            for name in BENCHES:
                if name in wanted:
                    print(f"{name}: base ...", flush=True)
                    before = _bench(base, name)
                    print(f"{name}: this tree ...", flush=True)
                    rows.append((name, before, _bench(head, name)))
            if "demo" in wanted:
                print("demo: base, then this tree ...", flush=True)
                before = _demo(base, Path(tmp) / "demo-base")
                rows.append(("demo wall time", before, _demo(head, Path(tmp) / "demo-head")))
            if "tests" in wanted:
                print("make test steps: base, then this tree ...", flush=True)
                before = _tests(base)
                rows.append(("make test wall time", before, _tests(head)))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base.path)],
                check=False,
                capture_output=True,
            )
    print()
    for name, before, after in rows:
        print(f"{name}:")
        print(f"  {base.label:>16}: {before.seconds:7.1f} s  {before.last_line}")
        print(f"  {head.label:>16}: {after.seconds:7.1f} s  {after.last_line}")
    summary = "; ".join(
        f"{name} {before.seconds:.0f}->{after.seconds:.0f} s" for name, before, after in rows
    )
    failed = [name for name, before, after in rows if after.status != 0]
    print(f"before/after vs {args.base}: {summary}" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
