"""The README's new-user walkthrough, run as written: CSV file -> registered dataset ->
approved tabular plan -> the hospital's site joins a local federation -> exported model ->
RO-Crate. Prints each step and, last, its wall time:

    walkthrough: CSV to RO-Crate in 23.4 s (10 steps)

The commands are read from the README's "Walkthrough: a hospital joins" section (its
first ``sh`` block: one command a line, ``\\`` continuing a line, ``#`` comments), so the
README and what this runs cannot drift apart; ``tests/bench/test_walkthrough.py`` runs it
too. They run in bash, one after the other (the first failure stops the walk), in a
fresh directory that holds ``deploy/`` of this checkout (the README's commands run from a
checkout's root) and with the ``fedloom`` of this Python first on ``PATH``.

    python bench/walkthrough.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Walkthrough: a hospital joins"
STEP_TIMEOUT_S = 180.0


@dataclass(frozen=True, slots=True)
class Step:
    command: str
    returncode: int
    seconds: float
    output: str


def steps(readme: Path = README) -> list[str]:
    """The commands of the walkthrough's first ``sh`` block, continuation lines joined."""
    text = readme.read_text(encoding="utf-8")
    heading = re.search(f"^{re.escape(SECTION)}$", text, flags=re.M)
    if heading is None:
        raise ValueError(f"{readme}: no section {SECTION!r}")
    block = re.search(r"^```sh\n(.*?)^```", text[heading.end() :], flags=re.S | re.M)
    if block is None:
        raise ValueError(f"{readme}: the walkthrough has no ```sh block")
    out: list[str] = []
    pending = ""
    for raw in block.group(1).splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        raise ValueError(f"{readme}: the walkthrough's last line ends with a backslash")
    return out


def prepare(workdir: Path) -> None:
    """A directory the README's commands can run in: ``deploy/`` of this checkout."""
    workdir.mkdir(parents=True, exist_ok=True)
    link = workdir / "deploy"
    if not link.exists():
        link.symlink_to(ROOT / "deploy", target_is_directory=True)


def environment() -> dict[str, str]:
    """This Python's ``fedloom`` first on PATH (a virtual environment's bin/)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run(
    workdir: Path,
    commands: list[str] | None = None,
    *,
    log: Callable[[str], None] = print,
    timeout_s: float = STEP_TIMEOUT_S,
) -> list[Step]:
    """Run the walkthrough in ``workdir``; the steps run (the last one failed if any did)."""
    prepare(workdir)
    env = environment()
    done: list[Step] = []
    for command in commands if commands is not None else steps():
        log(f"$ {command}")
        t0 = time.monotonic()
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", command],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        step = Step(command, proc.returncode, time.monotonic() - t0, proc.stdout + proc.stderr)
        done.append(step)
        for line in step.output.rstrip().splitlines():
            log(f"  {line}")
        if step.returncode != 0:
            log(f"  (exit status {step.returncode})")
            break
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="run here (an empty dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedloom-walkthrough-") as tmp:
        workdir = args.workdir or Path(tmp)
        if args.keep and args.workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="fedloom-walkthrough-"))
        t0 = time.monotonic()
        done = run(workdir)
        elapsed = time.monotonic() - t0
        failed = [s for s in done if s.returncode != 0]
        if failed:
            print(f"walkthrough: FAILED at step {len(done)}: {failed[0].command}")
            return 1
        crate = workdir / "walk" / "report" / "ro-crate-metadata.json"
        if not crate.is_file():
            print(f"walkthrough: FAILED: no RO-Crate at {crate}")
            return 1
        if args.keep or args.workdir is not None:
            print(f"walkthrough files in {workdir}")
        print(f"walkthrough: CSV to RO-Crate in {elapsed:.1f} s ({len(done)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
