"""``fedloom model export|verify`` and ``fedloom run-report``: getting results out.

``model export`` writes the root's current global model (``runtime.export``) as
safetensors or a torch file with its version, digest, signature (when the root's audit
log holds it) and lineage; ``model verify`` recomputes a file's digest and checks its
signature against a roster; ``run-report`` writes an RO-Crate of the federation
(``runtime.run_report``). User mistakes raise ``ConfigError`` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.exit_status import EXIT_IN_USE, EXIT_OK

if TYPE_CHECKING:
    from fedloom.transport.roster import Roster

__all__ = ["add_export_commands", "cmd_export"]

EXIT_INVALID = 1


def _fill(text: str) -> str:
    return textwrap.fill(text, width=88)


def add_export_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``fedloom model export|verify`` and ``fedloom run-report``."""
    model = sub.add_parser(
        "model",
        help="export the root's global model (safetensors or torch), or verify an export",
        description=_fill(
            "export: read the root's state directory (a running root's too: "
            "nothing is locked or changed) and write its current global model with its "
            "provenance. verify: recompute an export's digest and check the root's signature."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              fedloom model export --config /etc/fedloom/root.toml --out model.safetensors
              fedloom model export --state-dir /var/lib/fedloom --format torch --out model.pt
              fedloom model verify model.safetensors --config /etc/fedloom/root.toml
            """
        ),
    )
    actions = model.add_subparsers(dest="model_command", metavar="ACTION")
    export = actions.add_parser(
        "export",
        help="write the root's global model and its provenance to a file",
        description=_fill(
            "With --config, the model the root holds now (its checkpoint plus every "
            "update logged after it, restored as a restart would); with --state-dir alone, the "
            "model of the last checkpoint (the file says how many later records it leaves "
            "out). The metadata holds fedloom's version, the model version, its digest "
            "(sha256 of transport.e2e.tensors_digest, what the root signs), the root's "
            "signature when its audit log holds one, the lineage and the plan digest."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  fedloom model export --config root.toml --out model.safetensors\n",
    )
    where = export.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, metavar="ROOT.toml", help="the root's config")
    where.add_argument("--state-dir", type=Path, metavar="DIR", help="the root's state directory")
    export.add_argument(
        "--format",
        default="safetensors",
        metavar="FORMAT",
        help="safetensors (default; needs the 'export' extra) or torch (the 'torch' extra)",
    )
    export.add_argument("--out", type=Path, required=True, metavar="FILE", help="file to write")
    export.add_argument(
        "--version",
        type=int,
        default=None,
        metavar="V",
        help="an older version the state still holds (its last checkpoint's)",
    )
    verify = actions.add_parser(
        "verify",
        help="recompute an export's digest and check the root's signature",
        description="Exit 0 when the tensors hash to the digest in the file and the "
        "signature, if the file carries one, is a root's of the roster; 1 otherwise (a "
        "file that carries a signature needs --config or --roster to check it).",
        epilog="example:\n  fedloom model verify model.safetensors --config root.toml\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("file", type=Path, metavar="FILE")
    keys = verify.add_mutually_exclusive_group()
    keys.add_argument(
        "--config", type=Path, metavar="CFG", help="a node's config: its roster and consortium key"
    )
    keys.add_argument("--roster", type=Path, metavar="ROSTER", help="a signed roster file")
    verify.add_argument(
        "--consortium",
        metavar="PUBKEY_OR_FILE",
        help="the consortium's public key, with --roster",
    )
    report = sub.add_parser(
        "run-report",
        help="write an RO-Crate describing the federation (never data)",
        description=_fill(
            "Write DIR/ro-crate-metadata.json: the roster's version and members, "
            "the plan digest and each site's approvals of plans, the datasets each site "
            "registered (tags, hashes, rows: from "
            "their state directories or audit exports), the model versions and lineage, the "
            "root's metrics, the privacy budget spent and the audit logs' heads."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            example:
              fedloom run-report --config root.toml --out report/ \\
                  --site-state /var/lib/fedloom-site --model model.safetensors
            """
        ),
    )
    report.add_argument("--config", type=Path, required=True, metavar="ROOT.toml")
    report.add_argument("--out", type=Path, required=True, metavar="DIR")
    report.add_argument(
        "--site-state",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a site's state directory: its datasets, approvals and audit log (repeat for "
        "each site; SITE=DIR names the roster member when the directory's name is not it)",
    )
    report.add_argument(
        "--site-audit",
        type=Path,
        action="append",
        default=[],
        metavar="FILE.jsonl",
        help="a site's `fedloom audit export` (repeat for each site; SITE=FILE as above)",
    )
    report.add_argument(
        "--model", type=Path, default=None, metavar="FILE", help="an exported model to include"
    )


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``model export|verify`` or ``run-report`` (``args`` from ``add_export_commands``)."""
    if args.command == "run-report":
        from fedloom.runtime.run_report import write_report

        crate = write_report(
            args.config,
            args.out,
            site_states=args.site_state,
            site_audits=args.site_audit,
            model=args.model,
        )
        print(f"run report: {crate}")
        return EXIT_OK
    if args.model_command == "export":
        return _export(args)
    if args.model_command == "verify":
        return _verify(args)
    raise ConfigError("model: choose an action: export or verify")


def _export(args: argparse.Namespace) -> int:
    from fedloom.runtime.export import (
        FORMATS,
        ExportInUseError,
        read_root_model,
        write_export,
    )

    if args.format not in FORMATS:
        raise ConfigError(f"--format: {args.format!r} is not one of {', '.join(FORMATS)}")
    try:
        model = read_root_model(config=args.config, state_dir=args.state_dir, version=args.version)
    except ExportInUseError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return EXIT_IN_USE
    write_export(model, args.out, args.format)
    signed = (
        f"signed by {model.signer} (checked against the roster)"
        if model.signature
        else "unsigned (digest only)"
    )
    print(
        f"exported model version {model.version} of {model.node_id} ({model.algorithm}, "
        f"{len(model.weights)} tensors) to {args.out} as {args.format}: "
        f"sha256:{model.digest.hex()}, {signed}"
    )
    if model.skipped_records:
        print(
            f"note: the model of the last checkpoint; {model.skipped_records} log records "
            "after it are not in it (give --config ROOT.toml to restore them)",
            file=sys.stderr,
        )
    if model.signature_note:
        print(f"note: {model.signature_note}", file=sys.stderr)
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from fedloom.runtime.export import verify_export

    roster = _roster(args)
    found = verify_export(args.file, roster)
    digest = "matches" if found.digest_ok else "DOES NOT MATCH the tensors"
    signature = found.signature
    if signature == "unchecked":
        signature = "present but UNCHECKED (give --config ROOT.toml or --roster to check it)"
    print(f"{args.file}: model version {found.version}, digest {digest}, signature {signature}")
    return EXIT_OK if found.ok else EXIT_INVALID


def _roster(args: argparse.Namespace) -> Roster | None:
    from fedloom.transport.roster import RosterError, read_small_text

    if args.config is not None:
        from fedloom.runtime.config import load_config

        cfg = load_config(args.config)
        path, key = Path(cfg.roster_path), cfg.read_consortium_key()
    elif args.roster is not None:
        if args.consortium is None:
            raise ConfigError("--roster needs --consortium PUBKEY_OR_FILE")
        from fedloom.runtime.keys_cli import consortium_key_from

        path, key = args.roster, consortium_key_from(args.consortium)
    else:
        return None
    try:
        from fedloom.transport.roster import Roster

        return Roster.loads(read_small_text(path), key)
    except (RosterError, ValueError, OSError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
