"""``fedloom plans digest|approve|list|revoke``: what may run on a site's data.

The site's operator approves a plan by its digest (``runtime.governance.plan_digest``:
its code and its ``[plan]`` table) with a bound on every setting an aggregator may send;
a site with ``[governance] require_approval = true`` refuses every other job. Approvals
live in ``STATE_DIR/approvals.json``; every change is recorded in the node's audit log
(``runtime.audit``). A running daemon sees a change at its next job: no restart.

Mistakes (a malformed ``--bound``, an unknown digest, no state directory) raise
``ConfigError``: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, TextIO

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.exit_status import EXIT_OK
from fedloom.runtime.governance import (
    STANDARD_KEYS,
    Approval,
    Approvals,
    ApprovalsError,
    Bound,
    iso,
    parse_bound,
    plan_digest,
    plan_name,
    resolve_digest,
    show_bound,
)

__all__ = ["add_plans_command", "cmd_plans"]

_EXAMPLES = """\
examples:
  fedloom plans digest --config /etc/fedloom/site.toml
  fedloom plans approve --config /etc/fedloom/site.toml \\
      --bound lr=0.001:0.1 --bound local_steps=1:20 --bound batch_size=8:128 --bound mu=0:1 \\
      --note "study 42, ethics ref. 2026-17"
  fedloom plans approve --state-dir /var/lib/fedloom --digest sha256:<the consortium's> \\
      --bound lr=0.01:0.05 --bound local_steps=5 --bound batch_size=16,32,64 --bound mu=0
  fedloom plans list --config /etc/fedloom/site.toml
  fedloom plans revoke sha256:3f1a9c0e --config /etc/fedloom/site.toml
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


def add_plans_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plans = sub.add_parser(
        "plans",
        help="approve, list and revoke the training plans (code + settings) a site may run",
        description=_wrap(
            "A site with [governance] require_approval = true (the default for "
            '[plan] kind = "tabular") trains only an approved plan: the digest of its code and '
            "of its [plan] table, with a bound on every setting an aggregator may send (lr, "
            "local_steps, batch_size, mu, ...). Other jobs are refused, and the refusal reaches "
            "the aggregator. Approvals are kept in STATE_DIR/approvals.json and every change is "
            "recorded in the audit log; a running site sees a change at its next job. (Not to "
            "be confused with `fedloom plan`, the topology planner.)"
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = plans.add_subparsers(dest="plans_command", metavar="ACTION")

    def where(p: argparse.ArgumentParser, config_help: str) -> None:
        p.add_argument("--config", type=Path, metavar="SITE.toml", help=config_help)
        p.add_argument(
            "--state-dir",
            type=Path,
            metavar="DIR",
            help="the site's state directory (instead of --config)",
        )

    digest = actions.add_parser(
        "digest",
        help="print the digest of a config's plan",
        description=_wrap(
            "Print the digest of the plan SITE.toml runs: sha256 over its code (the "
            "[plan] factory's package, or fedloom's built-in workloads and version) and its "
            "[plan] table. Changing either changes it; comments and spacing do not."
        ),
        epilog="example:\n  fedloom plans digest --config /etc/fedloom/site.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    digest.add_argument("--config", type=Path, required=True, metavar="SITE.toml")
    digest.add_argument("--json", action="store_true", help="one JSON object")

    approve = actions.add_parser(
        "approve",
        help="approve a plan with bounds on its settings",
        description=_wrap(
            "Approve the plan of --config (or the digest --digest gives, e.g. one "
            "the consortium published) with bounds: --bound NAME=MIN:MAX (numbers, inclusive), "
            "--bound NAME=V or NAME=V1,V2,... (allowed values: numbers, strings, true/false). "
            "Every setting an aggregator sends needs a bound: a job with a setting that has "
            "none is refused. Approving a digest again replaces its bounds."
        ),
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where(approve, "the site's config: its plan's digest and its state directory")
    approve.add_argument(
        "--digest", metavar="sha256:HEX", help="approve this digest (not the config's plan)"
    )
    approve.add_argument(
        "--bound",
        action="append",
        default=[],
        metavar="NAME=MIN:MAX",
        help="a setting's bound (repeat for each setting)",
    )
    approve.add_argument("--name", default=None, help="a short name (default: the plan's)")
    approve.add_argument("--note", default="", help="why, under which agreement, ...")

    lst = actions.add_parser(
        "list",
        help="the approvals, active and revoked",
        description=_wrap("List the approvals in the site's state directory."),
        epilog="example:\n  fedloom plans list --config /etc/fedloom/site.toml --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where(lst, "the site's config (for its state directory)")
    lst.add_argument("--json", action="store_true", help="the entries as one JSON list")

    revoke = actions.add_parser(
        "revoke",
        help="revoke an approval (the site refuses the plan from its next job on)",
        description=_wrap(
            "Revoke the approval of DIGEST (or a unique prefix of at least 8 hex "
            "digits). A running site refuses the plan from its next job on."
        ),
        epilog="example:\n  fedloom plans revoke sha256:3f1a9c0e --config /etc/fedloom/site.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    revoke.add_argument("digest", metavar="DIGEST")
    where(revoke, "the site's config (for its state directory)")


def _state_dir(args: argparse.Namespace) -> tuple[Path, Any]:
    """The state directory (and the config, when one was given)."""
    if args.config is not None and args.state_dir is not None:
        raise ConfigError("--state-dir: give --config or --state-dir, not both")
    if args.config is not None:
        cfg = _load(args.config)
        return cfg.state_dir, cfg
    if args.state_dir is not None:
        if not args.state_dir.is_dir():
            raise ConfigError(f"--state-dir: {args.state_dir} is not a directory")
        return args.state_dir, None
    raise ConfigError("--config: give the site's config (or --state-dir DIR)")


def _load(path: Path) -> Any:
    from fedloom.runtime.config import load_config

    return load_config(path, check_files=False)


def _audit(state_dir: Path, kind: str, cfg: Any, **fields: Any) -> None:
    """Record a change in the node's audit log (``runtime.audit``)."""
    from fedloom.runtime.audit import hand_to_state_owner, readable_identity, record
    from fedloom.runtime.governance import APPROVALS_FILE
    from fedloom.runtime.governance import LOCK_FILE as APPROVALS_LOCK

    # A command run as root leaves the files it made to the state directory's owner.
    hand_to_state_owner(state_dir, state_dir / APPROVALS_FILE, state_dir / APPROVALS_LOCK)
    identity = None if cfg is None else readable_identity(cfg)  # signs the head if it can
    try:
        record(
            state_dir,
            kind,
            node=None if cfg is None else cfg.node_id,
            identity=identity,
            **fields,
        )
    except ConfigError as exc:  # the change is made: say that it is not in the log
        raise ConfigError(
            f"{kind} is in effect, but the audit log did not record it: {exc}"
        ) from None


def cmd_plans(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    action = args.plans_command
    if action is None:
        raise ConfigError("plans: choose an action: digest, approve, list or revoke (see --help)")
    try:
        if action == "digest":
            return _digest(args, out)
        if action == "approve":
            return _approve(args, out)
        if action == "list":
            return _list(args, out)
        return _revoke(args, out)
    except ApprovalsError as exc:
        raise ConfigError(str(exc)) from None


def _digest(args: argparse.Namespace, out: TextIO) -> int:
    cfg = _load(args.config)
    digest = plan_digest(cfg)
    if args.json:
        doc = {"digest": digest, "name": plan_name(cfg), "state_dir": str(cfg.state_dir)}
        out.write(json.dumps(doc) + "\n")
    else:
        out.write(digest + "\n")
    return EXIT_OK


def _bounds(texts: list[str]) -> dict[str, Bound]:
    bounds: dict[str, Bound] = {}
    for text in texts:
        try:
            name, bound = parse_bound(text)
        except ValueError as exc:
            raise ConfigError(f"--bound: {exc}") from None
        if name in bounds:
            raise ConfigError(f"--bound: {name} is bounded twice")
        bounds[name] = bound
    return bounds


def _approve(args: argparse.Namespace, out: TextIO) -> int:
    state_dir, cfg = _state_dir(args)
    bounds = _bounds(args.bound)
    if args.digest is not None:
        digest = args.digest.strip().lower()
        if not digest.startswith("sha256:") or len(digest) != 71:
            raise ConfigError(
                f"--digest: expected sha256: and 64 hex digits (`fedloom plans digest`), "
                f"got {args.digest[:80]!r}"
            )
        try:
            int(digest[7:], 16)
        except ValueError:
            raise ConfigError(f"--digest: {args.digest[:80]!r} is not hexadecimal") from None
        name = args.name if args.name is not None else ""
        if cfg is not None and cfg.plan is not None and plan_digest(cfg) != digest:
            out.write(
                f"note: {args.config}'s own plan has another digest ({plan_digest(cfg)}): "
                "that site will refuse its jobs until that one is approved\n"
            )
    else:
        if cfg is None:
            raise ConfigError(
                "--config: give the site's config (its plan is approved), or --digest"
            )
        digest = plan_digest(cfg)
        name = args.name if args.name is not None else plan_name(cfg)
    entry, old = Approvals(state_dir).approve(digest, bounds, name=name, note=args.note)
    _audit(
        state_dir,
        "plan_approved",
        cfg,
        digest=entry.digest,
        plan_name=entry.name,
        note=entry.note,
        bounds=dict(entry.bounds),
        approved_by=entry.approved_by,
        replaced=old is not None,
    )
    shown = " ".join(f"{k}={show_bound(b)}" for k, b in sorted(entry.bounds.items())) or "none"
    out.write(f"approved {entry.digest} ({entry.name or 'unnamed'}) with bounds: {shown}\n")
    if old is not None:
        out.write("(it replaces the earlier approval of that digest)\n")
    missing = [k for k in STANDARD_KEYS if k not in entry.bounds]
    if missing:
        out.write(
            f"note: no bound for {', '.join(missing)}: a job whose settings include "
            f"{'it' if len(missing) == 1 else 'them'} will be refused\n"
        )
    return EXIT_OK


def _status(e: Approval, entries: list[Approval]) -> str:
    if e.active:
        return "approved"
    replaced = any(
        o.digest == e.digest and o.approved_at >= (e.revoked_at or 0) and o is not e
        for o in entries
    )
    return "replaced" if replaced else "revoked"


def _list(args: argparse.Namespace, out: TextIO) -> int:
    state_dir, _ = _state_dir(args)
    entries = Approvals(state_dir).entries()
    if args.json:
        rows = [{**e.to_json(), "status": _status(e, entries)} for e in entries]
        out.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    if not entries:
        out.write(f"no approvals in {state_dir}\n")
        return EXIT_OK
    out.write(f"{'DIGEST':<23} {'STATUS':<9} {'APPROVED':<20} {'BY':<12} {'NAME':<28} BOUNDS\n")
    for e in entries:
        bounds = " ".join(f"{k}={show_bound(b)}" for k, b in sorted(e.bounds.items()))
        out.write(
            f"{e.digest[:23]:<23} {_status(e, entries):<9} {iso(e.approved_at):<20} "
            f"{e.approved_by[:12]:<12} {e.name[:28]:<28} {bounds}\n"
        )
    return EXIT_OK


def _revoke(args: argparse.Namespace, out: TextIO) -> int:
    state_dir, cfg = _state_dir(args)
    approvals = Approvals(state_dir)
    resolve_digest(approvals.entries(), args.digest)  # an unknown digest: say so first
    entry = approvals.revoke(args.digest)
    _audit(
        state_dir,
        "plan_revoked",
        cfg,
        digest=entry.digest,
        plan_name=entry.name,
        revoked_by=entry.revoked_by,
    )
    out.write(
        f"revoked {entry.digest} ({entry.name or 'unnamed'}): a running site refuses it from "
        "its next job on\n"
    )
    return EXIT_OK
