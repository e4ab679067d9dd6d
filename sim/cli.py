"""The simulator side of the ``fedloom`` command line (``fedloom.cli`` dispatches here).

    fedloom sim SCENARIO [--out DIR] [--seed N] [--seeds N] [--arm NAME ...]
                [--executor inline|process|ray] [--ray-address ADDR] [--parallel-runs]
                                                                    run a scenario in the simulator
    fedloom plan SCENARIO [--out DIR] [--arm NAME]                  show and draw an arm's topology

Building the parser imports nothing heavy; the simulator itself is imported when a command
runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = ("sim", "plan")


def _out_dir(text: str) -> Path:
    """``--out``: a directory; an empty one (``--out "$OUT"``, OUT unset) would be ``.``."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a directory")
    return Path(text)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedloom sim`` and ``fedloom plan``, on ``fedloom``'s parser."""
    sim = sub.add_parser(
        "sim",
        help="run a scenario in the discrete-event simulator",
        description="Run every arm of a scenario on a virtual clock and write report.json, "
        "CSV series and plots (PNG, SVG, PDF) to the output directory. With --seeds N every "
        "arm runs on N seeds and report.json gives each figure's mean, standard deviation "
        "and 95% confidence interval, and each speed-up's (paired by seed); the accuracy "
        "plot draws the interval as a band. Example: fedloom sim "
        "scenarios/fedbuff-vs-fedavg.toml --seeds 5 --out runs/fedbuff-5",
    )
    sim.add_argument("scenario", type=Path, help="scenario TOML file (see scenarios/)")
    sim.add_argument(
        "--out", type=_out_dir, default=None, help="output directory (default runs/NAME)"
    )
    sim.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    sim.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="run every arm on N seeds: the scenario's seed (or --seed) and the N-1 after "
        "it; overrides the scenario's seeds = [...] list",
    )
    sim.add_argument(
        "--arm",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this arm (repeatable; default: all arms)",
    )
    sim.add_argument(
        "--executor",
        choices=("inline", "process", "ray"),
        default=None,
        help="where training runs (overrides the scenario's executor): in this process, in "
        "a pool of `workers` processes, or on a Ray cluster (the ray extra)",
    )
    sim.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="run on this existing Ray cluster (implies --executor ray): 'auto' on a node of "
        "the cluster, HOST:6379, or ray://HOST:10001 (Ray Client); without it --executor ray "
        "starts a local cluster with "
        "`workers` CPUs. Example: fedloom sim scenarios/hospitals.toml --ray-address auto "
        "--parallel-runs --seeds 5",
    )
    sim.add_argument(
        "--parallel-runs",
        action="store_true",
        help="with Ray: run the arms and seeds side by side, one Ray task each (a few seeds "
        "ahead, enough to fill the cluster's CPUs), instead of one run after another with "
        "each training job a Ray task (implies --executor ray); the report is the same",
    )
    sim.add_argument("--quiet", action="store_true", help="no progress bar")

    plan = sub.add_parser(
        "plan",
        help="print and draw the topology an arm of a scenario would use",
        description="Build the topology plan of a scenario arm, print its clusters, elected "
        "sub-aggregators, degrees and spectral gap, and write plan.json and topology.png.",
    )
    plan.add_argument("scenario", type=Path, help="scenario TOML file")
    plan.add_argument(
        "--out", type=_out_dir, default=None, help="output directory (default runs/NAME-plan)"
    )
    plan.add_argument(
        "--arm",
        action="append",
        default=None,
        metavar="NAME",
        help="the one arm to plan (default: the first)",
    )


def dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``fedloom sim`` or ``fedloom plan``; errors go to ``fedloom.cli``."""
    from fedloom.sim.commands import cmd_plan, cmd_sim
    from fedloom.sim.executors import ExecutorError

    if args.command == "sim":
        try:
            return cmd_sim(
                args.scenario,
                out=args.out,
                seed=args.seed,
                arms=args.arm,
                quiet=args.quiet,
                n_seeds=args.seeds,
                executor=args.executor,
                ray_address=args.ray_address,
                parallel_runs=args.parallel_runs,
            )
        except ExecutorError as exc:  # a dead pool worker or Ray node: exit status 1
            print(f"fedloom: error: {exc}", file=sys.stderr)
            return 1
    if args.command == "plan":
        arms = args.arm or [None]
        if len(arms) > 1:  # argparse would keep the last one without a word
            from fedloom.federation.config_reader import ConfigError

            raise ConfigError(f"--arm: plan draws one arm, got {len(arms)} ({', '.join(arms)})")
        return cmd_plan(args.scenario, out=args.out, arm=arms[0])
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover - parser.error exits


if __name__ == "__main__":  # not an entry point: say so rather than exit 0 having run nothing
    import sys

    print(
        "fedloom: error: fedloom.sim.cli is not a command; run `python -m fedloom ...` "
        "(or `fedloom ...`)",
        file=sys.stderr,
    )
    sys.exit(2)
