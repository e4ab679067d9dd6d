"""What ``fedloom sim`` and ``fedloom plan`` do (argument parsing lives in ``sim.cli``)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedloom.federation.config_reader import ConfigError
from fedloom.sim.runner import (
    ProgressFn,
    build_plan_for_arm,
    check_seed_flags,
    resolve_seeds,
    run_scenario,
)
from fedloom.sim.scenario import Scenario, load_scenario


def _select_arms(scenario: Scenario, names: Sequence[str] | None) -> list[str] | None:
    if not names:
        return None
    known = [a.name for a in scenario.arms]
    for name in names:
        if name not in known:
            raise ConfigError(
                f"--arm {name!r}: no such arm in {scenario.name} ({', '.join(known)})"
            )
    return list(names)


def _output_dir(out: Path | None, default: Path) -> Path:
    """The output directory, checked before anything runs (and made only by the writer, so
    a run that fails leaves none): a file there, or under a file or a directory this
    process cannot write in, is an error naming ``--out`` (not a traceback after the run)."""
    path = default if out is None else out
    what = _out_flag(out)
    # Path.exists raises on a name the file system cannot hold (ENAMETOOLONG): a traceback,
    # or with a long scenario name (runs/NAME) an error only once the run was over.
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ConfigError(
                f"{what}: cannot make the directory {path}: the name {part!r} is longer than "
                f"the file system allows ({NAME_MAX} bytes)"
            )
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{what}: {path} is a file, not a directory")
        existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    except OSError as exc:  # the whole path too long (PATH_MAX), say
        raise ConfigError(f"{what}: cannot make the directory {path}: {exc.strerror}") from None
    if not existing.is_dir():
        raise ConfigError(f"{what}: cannot make the directory {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: cannot make or write {path}: {existing} is not writable")
    return path


# The longest name of one path component on Linux's and macOS's usual file systems.
NAME_MAX = 255


def _out_flag(out: Path | None) -> str:
    return "--out" if out is not None else "the output directory (--out)"


@contextmanager
def _progress(console: Console, enabled: bool) -> Iterator[ProgressFn | None]:
    if not enabled:
        yield None
        return
    columns = (
        TextColumn("[bold]{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.fields[virtual]:>9} virtual"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def update(label: str, done_s: float, total_s: float) -> None:
            if label not in tasks:
                # the label holds an arm's name: markup in it is the researcher's text
                tasks[label] = bar.add_task(escape(label), total=total_s, virtual="0 h")
            bar.update(
                tasks[label], completed=min(done_s, total_s), virtual=f"{done_s / 3600:.1f} h"
            )

        yield update


EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a SIGTERM
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as fedloom.cli's Ctrl-C


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` in the main thread while the block runs, so that
    the run unwinds: the process pool and a Ray cluster the run started are shut down (by
    default a SIGTERM ends the process at once, and Ray's threads abort with a core dump).

    The handler raises KeyboardInterrupt, as Ctrl-C does: Ray's waits turn any exception
    from a signal handler into a plain KeyboardInterrupt, so a flag says which it was."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    terminated = False

    def stop(signum: int, frame: object) -> None:
        nonlocal terminated
        terminated = True
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt:
        if terminated:
            print("fedloom: terminated", file=sys.stderr)
            raise SystemExit(EXIT_TERMINATED) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, before)


def cmd_sim(
    scenario_path: Path,
    *,
    out: Path | None,
    seed: int | None,
    arms: Sequence[str] | None,
    quiet: bool,
    n_seeds: int | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
    parallel_runs: bool = False,
) -> int:
    from fedloom.sim.ray_executor import with_executor_flags
    from fedloom.sim.report import summary_table, write_report

    check_seed_flags(seed, n_seeds)  # before reading anything
    scenario = load_scenario(scenario_path)
    if executor is not None or ray_address is not None or parallel_runs:
        scenario = with_executor_flags(scenario, executor, ray_address, parallel_runs)
    selected = _select_arms(scenario, arms)
    seeds = resolve_seeds(scenario, seed, n_seeds)
    out_dir = _output_dir(out, Path("runs") / scenario.name)
    # A pipe or a log file gets a wide table rather than one squeezed to 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if not quiet:
        # Names and paths are the researcher's text, not markup ("[/]a" raised MarkupError).
        console.print(f"[bold]{escape(scenario.name)}[/]: {escape(scenario.description)}")
        if len(seeds) > 1:
            console.print(f"{len(seeds)} seeds: {', '.join(str(s) for s in seeds)}")
    notes = list(scenario.notes)  # settings no arm uses: not errors, but worth a look
    if len(seeds) > 1 and "seed" in scenario.data:
        notes.append(
            f"[data] seed = {scenario.data['seed']!r} gives every seed the same data split and "
            "initial model: the intervals cover the rest of the randomness only"
        )
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    with (
        exit_on_sigterm(),
        _progress(console, enabled=not quiet and sys.stdout.isatty()) as progress,
    ):
        report = run_scenario(
            scenario,
            seeds=seeds,
            arms=selected,
            progress=progress,
            log=None if quiet else lambda line: console.print(line, markup=False),
        )
    try:
        paths = write_report(report, out_dir)
    except OSError as exc:  # a path _output_dir could not foresee (/proc, a full disk)
        raise ConfigError(f"{_out_flag(out)}: cannot write to {out_dir}: {exc.strerror}") from None
    except KeyboardInterrupt:  # say so: the directory looks like a finished run's
        print(f"fedloom: interrupted while writing {out_dir}: it is incomplete", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    console.print(summary_table(report))
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", markup=False)
    return 0


def cmd_plan(scenario_path: Path, *, out: Path | None, arm: str | None) -> int:
    from fedloom.sim.plots_topology import draw_plan
    from fedloom.topology.summary import format_summary

    scenario = load_scenario(scenario_path)
    chosen = scenario.arms[0] if arm is None else None
    if arm is not None:
        matches = [a for a in scenario.arms if a.name == arm]
        if not matches:
            known = ", ".join(a.name for a in scenario.arms)
            raise ConfigError(f"--arm {arm!r}: no such arm in {scenario.name} ({known})")
        chosen = matches[0]
    assert chosen is not None
    plan = build_plan_for_arm(scenario, chosen, seed=scenario.seed)
    out_dir = _output_dir(out, Path("runs") / f"{scenario.name}-plan")
    print(f"{scenario.name} / arm {chosen.name}")
    print(format_summary(plan))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        plan.save(out_dir / "plan.json")
        draw_plan(plan, out_dir / "topology.png")
    except OSError as exc:  # a path _output_dir could not foresee (/proc, a full disk)
        raise ConfigError(f"{_out_flag(out)}: cannot write to {out_dir}: {exc.strerror}") from None
    print(f"wrote {out_dir / 'plan.json'}, {out_dir / 'topology.png'}")
    return 0
