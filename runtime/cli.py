"""The daemon side of the ``fedloom`` command line (``fedloom.cli`` dispatches here).

    fedloom keygen --id NAME [--role ROLE] --out DIR [--force]      create a node identity
    fedloom roster sign UNSIGNED.toml --key KEY --out SIGNED.toml   sign a roster (consortium)
    fedloom roster verify SIGNED.toml --consortium PUBKEY_OR_FILE   check a signed roster
    fedloom run --config FILE.toml                                  run one daemon (systemd-ready)
    fedloom state check STATE_DIR                                   inspect a node's durable state
    fedloom state repair STATE_DIR --truncate-at N | --drop-damaged  repair a damaged log
    fedloom state reseed --config ROOT.toml --from DIR [--above N]  a root that lost its state
                         (or --backup DIR: a backup of the root's own state directory)
    fedloom privacy STATE_DIR [--json] [--delta D]                 a root's or DP-SGD site's ε
    fedloom status --config ROOT.toml | --url URL [--json]          the federation, from its root
    fedloom demo                                                    a real local federation
    fedloom chaos SCENARIO.toml [--out DIR] [--backend B]           faults on real daemons
    fedloom local init DIR [--shape S] [--regions N] [--sites N]    lay out a local federation
                       [--dataset NAME]
    fedloom local up DIR                                            start every daemon of DIR

User mistakes (a missing file, a bad field) end with one clear line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_USAGE = 2


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The daemon, key, state, demo and chaos commands, on ``fedloom``'s parser."""
    _add_key_commands(sub)
    _add_daemon_commands(sub)
    _add_state_commands(sub)
    _add_privacy_command(sub)
    from fedloom.runtime.dataset_cli import add_dataset_command

    add_dataset_command(sub)  # dataset add|list|show|revoke
    from fedloom.runtime.export_cli import add_export_commands

    add_export_commands(sub)  # model export|verify, run-report
    from fedloom.runtime.plans_cli import add_plans_command

    add_plans_command(sub)  # plans digest|approve|list|revoke
    from fedloom.runtime.status_cli import add_status_command

    add_status_command(sub)  # status
    from fedloom.runtime.audit_cli import add_audit_command

    add_audit_command(sub)  # audit verify|export
    _add_chaos_commands(sub)


def _add_chaos_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    chaos = sub.add_parser(
        "chaos",
        help="play a scenario's faults on a local federation of real daemons",
        description="Lay out the scenario's federation in OUT/federation, start every daemon, "
        "play its timeline of faults (network faults through a fault proxy on every "
        "child->parent link; kills, pauses, restarts, duplicates; full, read-only or corrupted "
        "disks; garbage and idle connections), record timeline.jsonl and samples.jsonl "
        "(/metrics and /healthz every second), stop everything, and run the checker: "
        "report.json, timeline.png and one verdict line per check. Exit status: 0 when every "
        "check passes. Scenarios: scenarios/chaos/.",
    )
    chaos.add_argument("scenario", type=Path, help="chaos scenario TOML (see scenarios/chaos/)")
    chaos.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="run directory (runs/chaos/NAME)"
    )
    chaos.add_argument(
        "--backend",
        choices=("auto", "proxy", "netem"),
        default="auto",
        help="network faults through the fault proxy, or tc netem (auto: netem when it works "
        "here, else the proxy, saying why)",
    )
    local = sub.add_parser(
        "local",
        help="lay out (init) or start (up) a federation on this machine",
        description="init writes keys, a signed roster, one config per node and a README.txt "
        "saying how to start each daemon (state lives in DIR/state); up starts them all.",
    )
    local_sub = local.add_subparsers(dest="local_command", metavar="ACTION")
    init = local_sub.add_parser("init", help="write a local federation into DIR")
    init.add_argument("dir", type=Path, metavar="DIR", help="a new (or empty) directory")
    init.add_argument(
        "--shape",
        choices=("star", "hierarchy"),
        default="hierarchy",
        help="star: a root and its sites; hierarchy (default): root -> regions -> sites",
    )
    init.add_argument(
        "--regions", type=int, metavar="N", help="hierarchy only (2, or 1 for a single site)"
    )
    init.add_argument(
        "--sites",
        type=int,
        default=4,
        metavar="N",
        help="sites in all (4; at most 200: each is a daemon process)",
    )
    init.add_argument("--seed", type=int, default=1, help="data split and model seed")
    init.add_argument(
        "--dataset",
        metavar="NAME",
        help="training data: breast_cancer (default; the data extra's scikit-learn), another "
        "scikit-learn set, or synthetic (numpy only: works on a base install)",
    )
    init.add_argument(
        "--plan",
        type=Path,
        metavar="PLAN.toml",
        help="the consortium's plan file instead of a built-in data set: a [plan] table "
        '(e.g. kind = "tabular": each site trains on its own registered table) and optional '
        "[training], [aggregation], [evaluation] (root) and [governance] (sites) tables, "
        "written into every node's config",
    )
    up = local_sub.add_parser("up", help="start every daemon of DIR until Ctrl-C")
    up.add_argument("dir", type=Path, metavar="DIR", help="a directory from local init")
    up.add_argument(
        "--until-version",
        type=int,
        metavar="N",
        help="stop every daemon once the root's model reaches version N (exit 0)",
    )
    up.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="with --until-version: give up after S seconds (exit 1)",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _add_privacy_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    privacy = sub.add_parser(
        "privacy",
        help="a root's privacy ledger, or a DP-SGD site's: epsilon at delta, budget left "
        "(read only)",
        description='Read the privacy ledger a root with [privacy] mechanism = "central" '
        "keeps in its state directory (a running daemon's too) and print its releases, "
        "epsilon at delta (the root's delta and accountant) and the budget left. Needs the "
        "privacy extra (dp-accounting). A site's state directory with a DP-SGD ledger "
        "([dp_sgd]) gives its steps, epsilon at delta and budget (the dpsgd extra).",
    )
    privacy.add_argument("state_dir", type=Path, metavar="STATE_DIR")
    privacy.add_argument("--json", action="store_true", help="one JSON object")
    privacy.add_argument(
        "--delta", type=float, default=None, metavar="D", help="epsilon at this delta instead"
    )


def _add_state_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    state = sub.add_parser(
        "state",
        help="inspect (check) or repair a node's state directory",
        description="check prints the checkpoint's epoch, the values, the write-ahead log's "
        "records per key and any damage (file and byte offsets); it changes nothing. repair "
        "drops bytes from the live log while no daemon runs, keeps the original as a .bak "
        "file and says what the dropped records meant.",
    )
    state_sub = state.add_subparsers(dest="state_command", metavar="ACTION")
    check = state_sub.add_parser(
        "check",
        help="show what a state directory holds and any damage (read only)",
        description="Exit 0 when `fedloom run` would start from it, 65 when it would refuse "
        "(corrupt state), 75 when the directory cannot be read, 69 when a running daemon "
        "checkpointed during every read (in use: no verdict), 2 when STATE_DIR does not "
        "exist or is not a directory.",
    )
    check.add_argument("state_dir", type=Path, metavar="STATE_DIR")
    repair = state_sub.add_parser(
        "repair",
        help="drop damaged bytes from the write-ahead log (stop the daemon first)",
        description="Drop bytes from the live write-ahead log, keeping the original file as "
        "wal.<epoch>.log.<time>.bak. Refused while a daemon holds the directory's lock. "
        "Dropped records may be acknowledged updates: the command says, per record kind, "
        "what is lost and what the parent's ledger absorbs as a resend.",
    )
    repair.add_argument("state_dir", type=Path, metavar="STATE_DIR")
    how = repair.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--truncate-at",
        type=int,
        metavar="OFFSET",
        help="drop everything from this frame boundary on (one `state check` printed)",
    )
    how.add_argument(
        "--drop-damaged",
        action="store_true",
        help="drop only the damaged byte ranges, keep every intact frame",
    )
    reseed = state_sub.add_parser(
        "reseed",
        help="give a root that lost its state the newest model it signed (stop it first)",
        description="Write a checkpoint into the root's state directory holding the newest "
        "model found: in a region's state directory (--from: only a model carrying this "
        "root's signature over its weights is taken) or in a backup of the root's own "
        "(--backup: restored whole). The root then resumes at that version (or above "
        "--above) instead of refusing its regions' forwards for good. See runtime/reseed.py "
        "and the README.",
    )
    reseed.add_argument("--config", type=Path, required=True, help="the root's config file")
    reseed.add_argument(
        "--from",
        dest="sources",
        type=Path,
        action="append",
        default=[],
        metavar="STATE_DIR",
        help="a region's state directory (repeatable: newest wins)",
    )
    reseed.add_argument(
        "--backup",
        dest="backups",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="the operator's own backup copy of this root's state directory (repeatable)",
    )
    reseed.add_argument(
        "--above",
        type=int,
        default=-1,
        metavar="N",
        help="resume at a version above N: the newest version the root's ERROR line says "
        "its children hold (default: the version found)",
    )
    reseed.add_argument(
        "--force",
        action="store_true",
        help="allow an --above far beyond the newest model found although the root's own "
        "state is intact (that replaces its ledger and what it applied)",
    )


def _add_daemon_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fedloom.runtime.exit_status import EXIT_STATUS_HELP

    run = sub.add_parser(
        "run",
        help="run one node (site, region, root, gossip peer or relay) as a daemon",
        description=textwrap.fill(
            "Recover the node from its state directory, connect (sites dial out, "
            "aggregators and relays listen), and run until SIGTERM. Under systemd "
            "(Type=notify) it sends READY=1, WATCHDOG=1 and STOPPING=1. See deploy/examples/ "
            "for configs."
        ),
        epilog=EXIT_STATUS_HELP,  # a table: printed as written (RawDescriptionHelpFormatter)
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--config", type=Path, required=True, metavar="FILE.toml", help="daemon config file"
    )
    run.add_argument(
        "--log-level",
        action="append",
        default=None,
        metavar="LEVEL|LOGGER=LEVEL",
        help="log level (default info); repeat with LOGGER=LEVEL for one logger, e.g. "
        "fedloom.runtime.peers=debug",
    )
    run.add_argument(
        "--log-format",
        choices=("auto", "json", "text"),
        default="auto",
        help="json lines (structured) or text; auto: text on a terminal, json otherwise",
    )
    run.add_argument(
        "--eval-interval",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="evaluate the model this often (root and gossip peers; default 60, 0: never)",
    )

    demo = sub.add_parser(
        "demo",
        help="run a real local federation: a root, two regions, six hospitals",
        description="Generate identities and a signed roster in a temporary directory, start "
        "a root, two regional aggregators and six hospital sites as separate processes on "
        "127.0.0.1 with the encrypted transport, train on breast-cancer data split non-IID "
        "across the hospitals with FedBuff at both tiers, and compare the global model with "
        "a centrally trained one and each hospital's local-only model.",
    )
    demo.add_argument(
        "--versions",
        type=int,
        default=60,
        metavar="N",
        help="stop once the global model reaches version N (default 60)",
    )
    demo.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=90.0,
        metavar="SECONDS",
        help="stop the federation after this long in any case (default 90)",
    )
    demo.add_argument("--seed", type=int, default=1, help="data split and model seed")
    demo.add_argument(
        "--workdir",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep keys, configs, state and logs here (default: a temporary directory, removed)",
    )
    demo.add_argument("--quiet", action="store_true", help="no live progress")


def _add_key_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from fedloom.transport.identity import ROLES

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
        description="The roster lists who may connect (id, role, public key, endpoints; a "
        "site may declare its training examples, examples = N) and is signed by the "
        "consortium key.",
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


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(0)`` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the command ``args`` names (one of ``add_commands``'); errors go to ``fedloom.cli``."""
    if args.command == "keygen":
        from fedloom.runtime.keys_cli import cmd_keygen

        return cmd_keygen(args.node_id, args.role, args.out, force=args.force)
    if args.command == "roster":
        from fedloom.runtime.keys_cli import cmd_roster_sign, cmd_roster_verify

        if args.roster_command == "sign":
            return cmd_roster_sign(args.unsigned, key=args.key, out=args.out)
        if args.roster_command == "verify":
            return cmd_roster_verify(args.signed, consortium=args.consortium)
        parser.error("roster: choose an action: sign or verify")
    if args.command == "run":
        # Until the daemon's own handlers are installed, SIGTERM (systemd stopping a
        # service that is still starting) ends start-up cleanly instead of killing it.
        with _sigterm_exits():
            from fedloom.runtime.daemon import configure_logging, run_daemon

            configure_logging(args.log_level, args.log_format)
            return run_daemon(args.config, eval_interval_s=args.eval_interval)
    if args.command == "privacy":
        from fedloom.runtime.privacy_cli import cmd_privacy

        return cmd_privacy(args.state_dir, as_json=args.json, delta=args.delta)
    if args.command == "audit":
        from fedloom.runtime.audit_cli import cmd_audit

        return cmd_audit(args)
    if args.command == "dataset":
        from fedloom.runtime.dataset_cli import cmd_dataset

        return cmd_dataset(args)
    if args.command in ("model", "run-report"):
        from fedloom.runtime.export_cli import cmd_export

        return cmd_export(args)
    if args.command == "plans":
        from fedloom.runtime.plans_cli import cmd_plans

        return cmd_plans(args)
    if args.command == "status":
        from fedloom.runtime.status_cli import cmd_status

        return cmd_status(args)
    if args.command == "state" and args.state_command == "reseed":
        from fedloom.runtime.reseed import cmd_state_reseed

        return cmd_state_reseed(
            args.config, args.sources, args.above, backups=args.backups, force=args.force
        )
    if args.command == "state":
        from fedloom.runtime.state_cli import cmd_state_check, cmd_state_repair

        if args.state_command == "check":
            return cmd_state_check(args.state_dir)
        if args.state_command == "repair":
            return cmd_state_repair(
                args.state_dir, truncate_at=args.truncate_at, drop_damaged=args.drop_damaged
            )
        parser.error("state: choose an action: check, repair or reseed")
    if args.command == "demo":
        from fedloom.runtime.demo import cmd_demo

        if args.versions < 1:
            parser.error("demo: --versions must be >= 1")
        return cmd_demo(
            versions=args.versions,
            timeout_s=args.timeout,
            seed=args.seed,
            workdir=args.workdir,
            quiet=args.quiet,
        )
    if args.command == "chaos":
        from fedloom.runtime.chaos.runner import cmd_chaos

        return cmd_chaos(args.scenario, out=args.out, backend=args.backend)
    if args.command == "local":
        from fedloom.runtime.local import cmd_local_init, cmd_local_up

        if args.local_command == "init":
            return cmd_local_init(
                args.dir,
                shape=args.shape,
                regions=args.regions,
                sites=args.sites,
                seed=args.seed,
                dataset=args.dataset,
                plan_file=args.plan,
            )
        if args.local_command == "up":
            return cmd_local_up(args.dir, until_version=args.until_version, timeout_s=args.timeout)
        parser.error("local: choose an action: init or up")
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE  # pragma: no cover - parser.error exits


if __name__ == "__main__":  # not an entry point: say so rather than exit 0 having run nothing
    import sys

    print(
        "fedloom: error: fedloom.runtime.cli is not a command; run `python -m fedloom ...` "
        "(or `fedloom ...`)",
        file=sys.stderr,
    )
    sys.exit(EXIT_USAGE)
