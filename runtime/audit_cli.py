"""``fedloom audit verify|export``: check a node's audit log, and write it out as JSON lines.

``verify`` checks every line of ``STATE_DIR/audit/audit.jsonl`` (each an entry in canonical
form, its hash, ``seq`` one more than the last, ``prev`` the last one's hash) and, given
the node's public key (``--public-key``, or ``--config``: the key of the node's identity
file, else the one its roster lists), the head the daemon signs after every batch, so a
deletion of the last entries is found too. It names the first bad line and what is wrong
with it: edited, deleted, reordered, inserted, a torn tail (a crash during a write), or
truncated against the signed head. Entries after the signed head are not covered by it
(anyone who can write the file could have appended them): with a key, ``verify`` names
them and exits 65 unless ``--allow-unsigned-tail``. Exit 0 only when the log is intact
(65 otherwise, as ``fedloom state check``; 2 for a mistake on the command line).

``export`` writes the verified entries, optionally only from ``--since SEQ`` or of some
``--kind``s, one JSON object per line; it refuses a log that does not verify unless
``--force`` (then it writes the entries before the first bad line and says so). Reading
never changes the log; both are safe while the daemon runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.audit import LOG_FILE, Verdict, audit_dir, verify_log
from fedloom.runtime.exit_status import EXIT_CORRUPT_STATE, EXIT_OK
from fedloom.transport.identity import (
    PUBLIC_KEY_BYTES,
    Identity,
    IdentityError,
    key_text,
    parse_key,
    parse_public_line,
)

__all__ = ["add_audit_command", "cmd_audit", "public_key_of"]

_EXAMPLES = """\
examples:
  fedloom audit verify /var/lib/fedloom --config /etc/fedloom/site.toml
  fedloom audit verify ./site-1-state --public-key lqe59rJpglmF...=   (or a .pub file)
  fedloom audit verify --config /etc/fedloom/root.toml        (its state_dir)
  fedloom audit export /var/lib/fedloom --out audit.jsonl
  fedloom audit export /var/lib/fedloom --out refusals.jsonl --kind train_refused \\
      --kind refusal_received --since 1200
"""


def add_audit_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser(
        "audit",
        help="verify a node's audit log (hash chain, signed head) or export it as JSON lines",
        description="Every daemon keeps an append-only, hash-chained audit log in "
        "STATE_DIR/audit/audit.jsonl: roster changes, plan approvals and dataset changes "
        "(from `fedloom plans` and `fedloom dataset`), the datasets each job used, each update "
        "sent or applied with its digest, each model version with its digest and the root's "
        "signature, each refusal, and the daemon's starts and stops. After every batch the "
        "daemon signs the log's head with its identity key (STATE_DIR/audit/head.json), so "
        "with the node's public key `verify` also finds the last entries deleted.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION")

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "state_dir",
            type=Path,
            nargs="?",
            metavar="STATE_DIR",
            help="the node's state directory (default: --config's state_dir)",
        )
        p.add_argument(
            "--config",
            type=Path,
            metavar="NODE.toml",
            help="the node's config: its state_dir, and its public key (from the identity "
            "file named in [identity], else the roster's entry for the node)",
        )
        p.add_argument(
            "--public-key",
            metavar="KEY",
            help="the node's Ed25519 public key: base64, a public line '<id> <role> <key>', "
            "or a .pub file holding one",
        )
        p.add_argument(
            "--allow-unsigned-tail",
            action="store_true",
            help="with a key: accept entries after the signed head (listed; they are not "
            "covered by the signature: a command that could not read the key wrote them, "
            "or anyone who can write the file)",
        )

    verify = actions.add_parser(
        "verify",
        help="check the chain and the signed head; exit 0 only when intact",
        description="Check every entry (canonical JSON, its SHA-256, seq +1, prev = the "
        "previous hash) and, with the node's public key, that the log still reaches the head "
        "the daemon signed. The first bad line is named with what is wrong: edited, deleted, "
        "reordered, inserted, torn tail, truncated. Without a key the chain is checked and "
        "the output says the head was not. Entries after the signed head are not covered "
        "by it: with a key they are named and the exit status is 65, unless "
        "--allow-unsigned-tail (then they are listed). Exit status: 0 intact, 65 not "
        "intact (or an unsigned tail), 2 a mistake on the command line.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where(verify)
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")

    export = actions.add_parser(
        "export",
        help="write the verified entries as JSON lines",
        description="Write the log's verified entries, one JSON object per line (as in the "
        "log: seq, ts, node, kind, fields, prev, hash), to --out. A log that does not verify "
        "is refused unless --force, which writes the entries before the first bad line "
        "(and still exits 65: the log is not intact); with a key, so are entries after the "
        "signed head, unless --allow-unsigned-tail. --out may not be in the node's audit/ "
        "directory.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where(export)
    export.add_argument("--out", type=Path, required=True, metavar="FILE.jsonl")
    export.add_argument(
        "--since", type=int, default=1, metavar="SEQ", help="only entries from seq SEQ on"
    )
    export.add_argument(
        "--kind",
        action="append",
        default=None,
        metavar="KIND",
        help="only entries of this kind (repeatable), e.g. update_applied, model_version",
    )
    export.add_argument(
        "--force",
        action="store_true",
        help="export the intact part of a log that does not verify (and say so)",
    )


def public_key_of(text: str) -> bytes:
    """A public key from base64, a public line, or a file holding either."""
    value = text.strip()
    path = Path(value)
    # Name what was given: a mistyped .pub path (or a directory) is read as base64.
    what = f"{value!r} (not a file)"
    if len(value) < 512 and path.is_file():
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--public-key: cannot read {path} ({exc})") from None
        what = str(path)
    try:
        if len(value.split()) == 3:
            return parse_public_line(value).public_key
        return parse_key(value, what)
    except IdentityError as exc:
        raise ConfigError(f"--public-key: {exc}") from None


def _from_config(path: Path) -> tuple[Path, bytes | None, str]:
    """``(state_dir, public key or None, where the key came from)`` for a node's config."""
    from fedloom.runtime.config import load_config

    cfg = load_config(path, check_files=False)
    try:
        ident = Identity.load(cfg.identity_key)
    except IdentityError as first:
        # An auditor may read the config but not the private key: the roster lists the key.
        from fedloom.transport.roster import Roster, RosterError, read_small_text

        try:
            roster = Roster.loads(read_small_text(cfg.roster_path), cfg.read_consortium_key())
        except (RosterError, ValueError, OSError, ConfigError) as exc:
            raise ConfigError(
                f"--config: no public key for {cfg.node_id!r}: {first}; and the roster: {exc}"
            ) from None
        entry = roster.lookup(cfg.node_id)
        if entry is None:
            raise ConfigError(
                f"--config: no public key for {cfg.node_id!r}: {first}; and roster version "
                f"{roster.version} does not list it"
            ) from None
        return cfg.state_dir, entry.public_key, f"roster version {roster.version}"
    return cfg.state_dir, ident.public_key, str(cfg.identity_key)


def _resolve(args: argparse.Namespace) -> tuple[Path, bytes | None, str | None]:
    if args.config is not None and args.public_key is not None:
        raise ConfigError("give --config or --public-key, not both")
    state_dir: Path | None = args.state_dir
    key: bytes | None = None
    origin: str | None = None
    if args.config is not None:
        cfg_state, key, origin = _from_config(args.config)
        if state_dir is None:
            state_dir = cfg_state
    elif args.public_key is not None:
        key, origin = public_key_of(args.public_key), "--public-key"
    if state_dir is None:
        raise ConfigError("name the state directory (STATE_DIR) or give --config")
    if not state_dir.exists():
        raise ConfigError(f"{state_dir}: no such state directory")
    if not state_dir.is_dir():
        raise ConfigError(f"{state_dir}: not a directory")
    if not (audit_dir(state_dir) / LOG_FILE).exists():
        raise ConfigError(
            f"{state_dir}: no audit log ({audit_dir(state_dir) / LOG_FILE} does not exist)"
        )
    assert key is None or len(key) == PUBLIC_KEY_BYTES
    return state_dir, key, origin


def _verify(state_dir: Path, key: bytes | None) -> Verdict:
    try:
        return verify_log(state_dir, key)
    except OSError as exc:
        raise ConfigError(
            f"{audit_dir(state_dir) / LOG_FILE}: cannot read ({exc.strerror})"
        ) from None


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts))


def report(verdict: Verdict, key: bytes | None, origin: str | None, out: TextIO) -> None:
    """The human-readable verdict."""
    entries = verdict.entries
    span = ""
    if entries:
        span = (
            f", seq {entries[0]['seq']}..{entries[-1]['seq']}, "
            f"{_when(entries[0]['ts'])} .. {_when(entries[-1]['ts'])}"
        )
    print(
        f"{verdict.path}: {verdict.lines} line(s), {len(entries)} intact entr"
        f"{'y' if len(entries) == 1 else 'ies'}{span}",
        file=out,
    )
    if key is None:
        print("signed head: not checked (no public key: give --config or --public-key)", file=out)
    elif verdict.head_checked:
        if verdict.head_seq is None:
            print(f"signed head: none yet, and the log is empty (key {key_text(key)})", file=out)
        else:
            print(
                f"signed head: seq {verdict.head_seq}, signature valid (key {key_text(key)} "
                f"from {origin})",
                file=out,
            )
    for note in verdict.notes:
        print(f"note: {note}", file=out)
    if verdict.unsigned:
        print(_unsigned_line(verdict), file=out)
        for e in verdict.unsigned[:_LISTED]:
            print(
                f"  seq {e['seq']}  {_when(e['ts'])}  {_clean(e['node'])}  {_clean(e['kind'])}",
                file=out,
            )
        if len(verdict.unsigned) > _LISTED:
            print(f"  ... and {len(verdict.unsigned) - _LISTED} more", file=out)
    if verdict.problem is None and verdict.unsigned:
        print("intact chain; its last entries are not covered by the signed head", file=out)
    elif verdict.problem is None:
        print("intact", file=out)
    else:
        where = f"line {verdict.problem.line}: " if verdict.problem.line else ""
        print(f"NOT INTACT: {where}{verdict.problem.kind}: {verdict.problem.message}", file=out)


_LISTED = 50


def _clean(value: object) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))[:120]


def _unsigned_line(verdict: Verdict) -> str:
    first, last = verdict.unsigned[0]["seq"], verdict.unsigned[-1]["seq"]
    span = f"seq {first}" if first == last else f"seq {first} to {last}"
    return (
        f"NOT COVERED: {span} ({len(verdict.unsigned)} entr"
        f"{'y' if len(verdict.unsigned) == 1 else 'ies'}) after the signed head (seq "
        f"{verdict.head_seq}): no signature covers them (a command that could not read the "
        "node's key wrote them, or anyone who can write the file); the daemon checks them "
        "before it signs over them"
    )


def cmd_audit(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``fedloom audit ACTION`` (ConfigError for a mistake: one line, exit 2)."""
    stream = sys.stdout if out is None else out
    action = getattr(args, "audit_command", None)
    if action not in ("verify", "export"):
        raise ConfigError("fedloom audit: name an action: verify or export (see --help)")
    if action == "export":
        _check_kinds(args.kind or [])
    state_dir, key, origin = _resolve(args)
    verdict = _verify(state_dir, key)
    if action == "verify":
        if args.json:
            problem = verdict.problem
            print(
                json.dumps(
                    {
                        "path": str(verdict.path),
                        "intact": verdict.intact,
                        "lines": verdict.lines,
                        "entries": len(verdict.entries),
                        "head_checked": verdict.head_checked,
                        "head_seq": verdict.head_seq,
                        "problem": None
                        if problem is None
                        else {
                            "line": problem.line,
                            "kind": problem.kind,
                            "message": problem.message,
                        },
                        "notes": verdict.notes,
                        "unsigned_tail": [e["seq"] for e in verdict.unsigned],
                        "covered": verdict.covered,
                    }
                ),
                file=stream,
            )
        else:
            report(verdict, key, origin, stream)
        if verdict.unsigned and not args.allow_unsigned_tail:
            if not args.json:
                print("(--allow-unsigned-tail accepts entries after the signed head)", file=stream)
            return EXIT_CORRUPT_STATE
        return EXIT_OK if verdict.intact else EXIT_CORRUPT_STATE
    return _export(args, state_dir, verdict, stream)


def _check_kinds(kinds: list[str]) -> None:
    """A mistyped --kind would export nothing and exit 0, read as "it never happened"."""
    from fedloom.runtime.audit import KNOWN_KINDS, is_command_kind

    for kind in kinds:
        if kind not in KNOWN_KINDS and not is_command_kind(kind):
            raise ConfigError(
                f"--kind {kind!r}: no entry has this kind; the daemons write "
                f"{', '.join(sorted(KNOWN_KINDS))}, the commands plan_* and dataset_*"
            )


def _inside(target: Path, folder: Path) -> bool:
    """Whether ``target`` (followed through symlinks) is ``folder`` or in it, or is a
    link to one of its files."""
    try:
        real, base = target.resolve(), folder.resolve()
    except (OSError, RuntimeError):
        return True  # a symlink loop: not written
    if real == base or base in real.parents:
        return True
    try:
        return any(
            target.exists() and f.exists() and os.path.samefile(target, f) for f in folder.iterdir()
        )
    except OSError:
        return False


def _export(args: argparse.Namespace, state_dir: Path, verdict: Verdict, out: TextIO) -> int:
    target: Path = args.out
    if str(target) == "-":  # by habit stdout; the export is a file, written whole or not at all
        raise ConfigError("--out -: name a file to write the export to (FILE.jsonl)")
    if _inside(target, audit_dir(state_dir)):
        raise ConfigError(
            f"--out {target}: in the node's audit directory {audit_dir(state_dir)}: the "
            "export would replace the log (or its head or lock); write it elsewhere"
        )
    problem = verdict.problem
    if problem is None and verdict.unsigned and not args.allow_unsigned_tail:
        from fedloom.runtime.audit import Problem

        problem = Problem(0, "unsigned_tail", _unsigned_line(verdict))
        verdict.problem = problem
        verdict.entries = verdict.entries[: len(verdict.entries) - len(verdict.unsigned)]
    if problem is not None and not args.force:
        where = f"line {problem.line}: " if problem.line else ""
        print(
            f"not exported: the log does not verify ({where}{problem.kind}: {problem.message}); "
            "--force exports the entries before it",
            file=sys.stderr,
        )
        return EXIT_CORRUPT_STATE
    kinds = set(args.kind) if args.kind else None
    chosen: list[dict[str, Any]] = [
        e
        for e in verdict.entries
        if e["seq"] >= args.since and (kinds is None or e["kind"] in kinds)
    ]
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="ascii") as f:
            for entry in chosen:
                f.write(json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"--out: cannot write {target} ({exc.strerror or exc})") from None
    print(
        f"wrote {len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'} to {target}"
        + ("" if verdict.head_checked else " (signed head not checked: no public key)"),
        file=out,
    )
    if problem is not None:
        where = f"line {problem.line}: " if problem.line else ""
        hint = "; --allow-unsigned-tail exports them" if problem.kind == "unsigned_tail" else ""
        print(
            f"WARNING: the log does not verify ({where}{problem.kind}: {problem.message}); "
            f"exported only the entries before it (--force{hint})",
            file=out,
        )
        return EXIT_CORRUPT_STATE
    return EXIT_OK
