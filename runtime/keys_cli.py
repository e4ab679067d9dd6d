"""``fedloom keygen`` and ``fedloom roster sign|verify`` (argument parsing is in ``runtime.cli``).

User mistakes raise ``ConfigError`` (one line, exit status 2 from ``runtime.cli``); a
roster that fails verification prints one line and returns 1.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from fedloom.federation.config_reader import ConfigError
from fedloom.transport.identity import (
    ROLES,
    Identity,
    IdentityError,
    key_text,
    parse_key,
    parse_public_line,
    write_atomic,
)
from fedloom.transport.roster import Roster, RosterError, read_small_text, sign

EXIT_OK = 0
EXIT_INVALID = 1


def cmd_keygen(node_id: str, role: str, out: Path, *, force: bool = False) -> int:
    """Write ``OUT/<id>.key`` (0600) and ``OUT/<id>.pub``; print the public line on stdout."""
    try:
        identity = Identity.generate(node_id, role)
    except IdentityError as exc:
        raise ConfigError(str(exc)) from None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: not a directory")
    try:
        private, public = identity.save(out, overwrite=force)
    except FileExistsError as exc:
        raise ConfigError(f"{exc}; pass --force to replace it") from None
    except OSError as exc:
        raise ConfigError(f"cannot write the identity to {out}: {exc.strerror}") from None
    print(identity.public_line())
    print(f"wrote {private} (private, mode 0600) and {public}", file=sys.stderr)
    return EXIT_OK


def _read_text(path: Path, what: str) -> str:
    return read_small_text(path, what, ConfigError)


def cmd_roster_sign(unsigned: Path, *, key: Path, out: Path) -> int:
    """Sign ``unsigned`` with the consortium identity in ``key``; write ``out``."""
    text = _read_text(unsigned, "roster")
    try:
        consortium = Identity.load(key)
    except IdentityError as exc:
        raise ConfigError(f"--key: {exc}") from None
    try:
        signed = sign(text, consortium)
    except RosterError as exc:
        raise ConfigError(f"{unsigned}: {exc}") from None
    roster = Roster.loads(signed, consortium.public_key)  # round-trip check
    try:
        write_atomic(out, signed.encode("utf-8"), mode=0o644)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write ({exc.strerror})") from None
    print(
        f"signed roster version {roster.version} ({len(roster)} nodes) with consortium key "
        f"{key_text(consortium.public_key)} -> {out}"
    )
    return EXIT_OK


def consortium_key_from(arg: str) -> bytes:
    """The consortium public key from a base64 key, or a file holding a public line
    (``keygen``'s ``.pub``), a bare base64 key, or the consortium's private identity."""
    path = Path(arg)
    if not path.is_file():
        try:
            return parse_key(arg, "--consortium")
        except IdentityError:
            raise ConfigError(
                f"--consortium {arg!r}: neither a file nor a base64 public key"
            ) from None
    text = _read_text(path, "--consortium")
    if "private_key" in text:
        try:
            return Identity.load(path).public_key
        except IdentityError as exc:
            raise ConfigError(f"--consortium: {exc}") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1:
        raise ConfigError(f"--consortium {path}: expected one public line or base64 key")
    try:
        if len(lines[0].split()) == 3:
            return parse_public_line(lines[0]).public_key
        return parse_key(lines[0], f"--consortium {path}")
    except IdentityError as exc:
        raise ConfigError(f"--consortium {path}: {exc}") from None


def cmd_roster_verify(signed: Path, *, consortium: str) -> int:
    """Verify a signed roster; print a summary (exit 0) or why it is invalid (exit 1)."""
    key = consortium_key_from(consortium)
    text = _read_text(signed, "roster")
    try:
        roster = Roster.loads(text, key)
    except RosterError as exc:
        print(f"fedloom: roster {signed} is INVALID: {exc}", file=sys.stderr)
        return EXIT_INVALID
    roles = Counter(e.role for e in roster.entries)
    by_role = ", ".join(f"{roles[r]} {r}" for r in ROLES if roles[r])
    declared = sum(1 for e in roster.entries if e.examples is not None)
    examples = f"; {declared} of {roles['site']} sites declare examples" if roles["site"] else ""
    print(
        f"roster {signed}: valid, version {roster.version}, {len(roster)} nodes "
        f"({by_role or 'none'}), signed by consortium key {key_text(key)}{examples}"
    )
    return EXIT_OK
