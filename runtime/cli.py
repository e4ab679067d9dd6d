"""The ``fedloom`` command line.

    fedloom sim SCENARIO [--out DIR] [--seed N] [--arm NAME ...]   run a scenario in the simulator
    fedloom plan SCENARIO [--out DIR] [--arm NAME]                  show and draw an arm's topology
    fedloom keygen --id NAME [--role ROLE] --out DIR [--force]      create a node identity
    fedloom roster sign UNSIGNED.toml --key KEY --out SIGNED.toml   sign a roster (consortium)
    fedloom roster verify SIGNED.toml --consortium PUBKEY_OR_FILE   check a signed roster

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
        "  fedloom plan scenarios/hierarchical-10k.toml --out runs/plan10k\n"
        "  fedloom keygen --id site-a --role site --out /etc/fedloom\n",
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
    _add_key_commands(sub)
    return parser


def _add_key_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from transport.identity import ROLES

    keygen = sub.add_parser(
        "keygen",
        help="create a node identity (Ed25519 signing key)",
        description="Write OUT/NAME.key (the private key, mode 0600) and OUT/NAME.pub, and "
        "print the public line '<id> <role> <base64 key>' to paste into the roster.",
    )
    keygen.add_argument("--id", required=True, dest="node_id", metavar="NAME", help="node id")
    keygen.add_argument(
        "--role", default="site", choices=ROLES, help="the node's role (default: site)"
    )
    keygen.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")

    roster = sub.add_parser(
        "roster",
        help="sign or verify the consortium roster",
        description="The roster lists who may connect (id, role, public key, endpoints) and "
        "is signed by the consortium key.",
    )
    roster_sub = roster.add_subparsers(dest="roster_command", metavar="ACTION")
    sign = roster_sub.add_parser(
        "sign",
        help="sign an unsigned roster with the consortium key",
        description="Sign UNSIGNED.toml with the consortium's private identity file and write "
        "the signed roster (any old [signature] is replaced).",
    )
    sign.add_argument("unsigned", type=Path, help="roster TOML (version, [[nodes]])")
    sign.add_argument(
        "--key", type=Path, required=True, help="consortium private identity (from keygen)"
    )
    sign.add_argument("--out", type=Path, required=True, help="signed roster to write")
    verify = roster_sub.add_parser(
        "verify",
        help="verify a signed roster against the consortium public key",
        description="Exit 0 if SIGNED.toml is validly signed by the consortium key, 1 if not.",
    )
    verify.add_argument("signed", type=Path, help="signed roster TOML")
    verify.add_argument(
        "--consortium",
        required=True,
        metavar="PUBKEY_OR_FILE",
        help="consortium public key (base64), or a file holding its public line",
    )


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
        if args.command == "keygen":
            from runtime.keys_cli import cmd_keygen

            return cmd_keygen(args.node_id, args.role, args.out, force=args.force)
        if args.command == "roster":
            from runtime.keys_cli import cmd_roster_sign, cmd_roster_verify

            if args.roster_command == "sign":
                return cmd_roster_sign(args.unsigned, key=args.key, out=args.out)
            if args.roster_command == "verify":
                return cmd_roster_verify(args.signed, consortium=args.consortium)
            parser.error("roster: choose an action: sign or verify")
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
