"""The ``fedloom`` command line.

    fedloom sim SCENARIO [--out DIR] [--seed N] [--arm NAME ...]   run a scenario in the simulator
    fedloom plan SCENARIO [--out DIR] [--arm NAME]                  show and draw an arm's topology

User mistakes (a missing file, a bad field) end with one clear line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sim.config_reader import ConfigError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedloom",
        description=(
            "Asynchronous, hierarchical and peer-to-peer federated learning. "
            "The simulator runs the same protocol code as the daemons on a virtual clock."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  fedloom sim scenarios/hospitals.toml --out runs/hospitals\n"
        "  fedloom plan scenarios/hierarchical-10k.toml --out runs/plan10k\n",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sim = sub.add_parser(
        "sim",
        help="run a scenario in the discrete-event simulator",
        description="Run every arm of a scenario on a virtual clock and write report.json, "
        "CSV series and PNG plots to the output directory.",
    )
    sim.add_argument("scenario", type=Path, help="scenario TOML file (see scenarios/)")
    sim.add_argument("--out", type=Path, default=None, help="output directory (default runs/NAME)")
    sim.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    sim.add_argument(
        "--arm",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this arm (repeatable; default: all arms)",
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
        "--out", type=Path, default=None, help="output directory (default runs/NAME-plan)"
    )
    plan.add_argument(
        "--arm", default=None, metavar="NAME", help="arm to plan (default: the first)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "sim":
            from runtime.commands import cmd_sim

            return cmd_sim(
                args.scenario, out=args.out, seed=args.seed, arms=args.arm, quiet=args.quiet
            )
        if args.command == "plan":
            from runtime.commands import cmd_plan

            return cmd_plan(args.scenario, out=args.out, arm=args.arm)
    except ConfigError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedloom: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE  # pragma: no cover - parser.error exits


if __name__ == "__main__":
    sys.exit(main())
