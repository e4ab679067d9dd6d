"""The signed roster: who may connect (node id, role, public key, endpoints).

File format (TOML)::

    version = 3

    [[nodes]]
    id = "root"
    role = "root"
    public_key = "<base64>"
    endpoints = ["wss://agg.example.org:8443/fedloom"]

    [[nodes]]
    id = "site-a"
    role = "site"
    public_key = "<base64>"
    examples = 225                   # optional: the training examples the site declares

    [signature]                      # added by ``fedloom roster sign``
    consortium_key = "<base64>"
    signature = "<base64 Ed25519 signature>"

The signature covers a canonical msgpack encoding of the version and the entries sorted
by id, not the TOML text, so comments and layout do not matter. A node verifies it
against the consortium key it was configured with (never against the key the file
names) and, through ``RosterStore``, refuses a roster older than the newest it has seen.

``examples`` (sites only, optional) is what the consortium vouches a site trains on: an
aggregator weighting by examples clamps the site's ``n_examples`` claims to it. It enters
the signed bytes only where present, so a roster signed without it verifies unchanged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import msgpack

from fedloom.transport.errors import PeerRefused, ProtocolError
from fedloom.transport.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    IdentityError,
    check_node_id,
    key_text,
    parse_key,
    verify_signature,
)

NODE_ROLES: tuple[str, ...] = ("root", "region", "site", "peer", "relay")
MAX_ENTRIES = 200_000
MAX_ENDPOINTS = 16
MAX_ENDPOINT_LEN = 512
MAX_ROSTER_BYTES = 64 << 20
_SIGNED_LABEL = "fedloom-roster-v1"
_NODE_KEYS = frozenset(("id", "role", "public_key", "endpoints", "examples"))
# Declared examples stay exact in float64 (they become weights) and fit msgpack's ints.
MAX_EXAMPLES = 2**53
# A roster nests two levels ([[nodes]] tables, endpoint arrays). tomllib recurses per
# nested array or inline table, so deeper text is refused before it is parsed: near
# Python's recursion limit, finalizers that run meanwhile fail too.
MAX_NESTING = 16
_TOML_STRINGS_AND_COMMENTS = re.compile(
    r'"""(?:\\.|[^\\])*?"""|\'\'\'.*?\'\'\'|"(?:\\.|[^"\\\n])*"|\'[^\'\n]*\'|#[^\n]*',
    re.DOTALL,
)
_BRACKETS = re.compile(r"[\[\]{}]")
_SIGNATURE_KEYS = frozenset(("consortium_key", "signature"))


class RosterError(ProtocolError):
    """A roster is malformed, badly signed, or older than one already seen."""

    reason: ClassVar[str] = "roster"


class StaleRosterError(RosterError):
    """A roster's version is older than the newest one this node has accepted."""

    reason: ClassVar[str] = "stale_roster"


def _check_endpoint(value: object) -> str:
    # Printable ASCII without quotes or backslashes: endpoints are URLs, and this keeps
    # the TOML writer trivial and the values safe to log.
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_ENDPOINT_LEN
        or any(not 0x21 <= ord(c) <= 0x7E or c in '"\\' for c in value)
    ):
        raise ValueError(f"invalid endpoint {value!r}: expected a URL of printable ASCII")
    return value


@dataclass(frozen=True, slots=True)
class RosterEntry:
    """One node the consortium admits."""

    node_id: str
    role: str
    public_key: bytes
    endpoints: tuple[str, ...] = ()
    examples: int | None = None  # declared training examples (sites only); None: undeclared

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        if self.role not in NODE_ROLES:
            raise ValueError(
                f"{self.node_id}: invalid role {self.role!r} (expected one of "
                f"{', '.join(NODE_ROLES)})"
            )
        if not isinstance(self.public_key, bytes) or len(self.public_key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"{self.node_id}: public_key must be {PUBLIC_KEY_BYTES} bytes")
        if not isinstance(self.endpoints, tuple) or len(self.endpoints) > MAX_ENDPOINTS:
            raise ValueError(f"{self.node_id}: endpoints must be a tuple of <= {MAX_ENDPOINTS}")
        for endpoint in self.endpoints:
            _check_endpoint(endpoint)
        if self.examples is not None:
            if self.role != "site":
                raise ValueError(
                    f"{self.node_id}: examples: only a site declares its training examples, "
                    f"not a {self.role}"
                )
            if (
                isinstance(self.examples, bool)
                or not isinstance(self.examples, int)
                or not 0 <= self.examples <= MAX_EXAMPLES
            ):
                raise ValueError(
                    f"{self.node_id}: examples: expected an int from 0 to 2**53, got "
                    f"{self.examples!r}"
                )


class Roster:
    """An immutable, indexed roster (look-ups by id and by key are O(1))."""

    __slots__ = ("_by_id", "_by_key", "consortium_key", "entries", "version")

    def __init__(
        self, version: int, entries: Iterable[RosterEntry], consortium_key: bytes = b""
    ) -> None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"roster version must be an int >= 1, got {version!r}")
        self.version = version
        self.entries: tuple[RosterEntry, ...] = tuple(sorted(entries, key=lambda e: e.node_id))
        self.consortium_key = consortium_key
        if len(self.entries) > MAX_ENTRIES:
            raise ValueError(f"roster has {len(self.entries)} entries, limit {MAX_ENTRIES}")
        self._by_id: dict[str, RosterEntry] = {}
        self._by_key: dict[bytes, RosterEntry] = {}
        for entry in self.entries:
            if entry.node_id in self._by_id:
                raise ValueError(f"node id {entry.node_id!r} is listed twice")
            other = self._by_key.get(entry.public_key)
            if other is not None:
                raise ValueError(
                    f"{entry.node_id!r} and {other.node_id!r} have the same public key"
                )
            self._by_id[entry.node_id] = entry
            self._by_key[entry.public_key] = entry

    def __repr__(self) -> str:
        return f"Roster(version={self.version}, {len(self.entries)} entries)"

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, node_id: str) -> RosterEntry | None:
        return self._by_id.get(node_id)

    def by_key(self, public_key: bytes) -> RosterEntry | None:
        return self._by_key.get(public_key)

    def check(self, node_id: str, role: str, public_key: bytes) -> RosterEntry:
        """The entry for a peer claiming ``(node_id, role, public_key)``, or ``PeerRefused``."""
        entry = self._by_key.get(public_key)
        if entry is None:
            listed = self._by_id.get(node_id)
            if listed is not None:
                raise PeerRefused(
                    f"unknown key: {node_id!r} presented key {key_text(public_key)}, but "
                    f"roster version {self.version} lists another key for {node_id!r}"
                )
            raise PeerRefused(
                f"unknown key: {node_id!r} (key {key_text(public_key)}) is not in "
                f"roster version {self.version}"
            )
        if entry.node_id != node_id:
            raise PeerRefused(
                f"key listed under another id: {node_id!r} presented the key of {entry.node_id!r}"
            )
        if entry.role != role:
            raise PeerRefused(
                f"wrong role: {node_id!r} claims role {role!r}, the roster lists {entry.role!r}"
            )
        return entry

    # ------------------------------------------------------------- signing
    def signed_bytes(self) -> bytes:
        """The canonical bytes the consortium signs (independent of TOML layout)."""
        body = [_signed_entry(e) for e in self.entries]
        packed: bytes = msgpack.packb([_SIGNED_LABEL, self.version, body], use_bin_type=True)
        return packed

    @property
    def digest(self) -> bytes:
        """BLAKE2b-256 of ``signed_bytes()``: equal digests mean equal rosters."""
        return hashlib.blake2b(self.signed_bytes(), digest_size=32).digest()

    def to_toml(self, signature: bytes | None = None) -> str:
        lines = [f"version = {self.version}", ""]
        for e in self.entries:
            endpoints = ", ".join(f'"{x}"' for x in e.endpoints)
            lines += [
                "[[nodes]]",
                f'id = "{e.node_id}"',
                f'role = "{e.role}"',
                f'public_key = "{key_text(e.public_key)}"',
                f"endpoints = [{endpoints}]",
                *([] if e.examples is None else [f"examples = {e.examples}"]),
                "",
            ]
        if signature is not None:
            lines += [
                "[signature]",
                f'consortium_key = "{key_text(self.consortium_key)}"',
                f'signature = "{base64.b64encode(signature).decode("ascii")}"',
                "",
            ]
        return "\n".join(lines)

    @staticmethod
    def sign(unsigned_toml: str, consortium_identity: Identity) -> str:
        return sign(unsigned_toml, consortium_identity)

    # ------------------------------------------------------------- loading
    @classmethod
    def loads(cls, text: str, consortium_key: bytes) -> Roster:
        """Parse a signed roster and verify it against the trusted ``consortium_key``."""
        if len(consortium_key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"consortium_key must be {PUBLIC_KEY_BYTES} bytes")
        data = _parse_toml(text)
        sig_table = data.get("signature")
        if sig_table is None:
            raise RosterError("roster is not signed (no [signature] table)")
        named_key, signature = _parse_signature(sig_table)
        if named_key != consortium_key:
            raise RosterError(
                f"roster is signed by key {key_text(named_key)}, not by the consortium key "
                f"{key_text(consortium_key)}"
            )
        roster = _roster_from(data, consortium_key)
        if not verify_signature(consortium_key, roster.signed_bytes(), signature):
            raise RosterError("roster signature does not verify (modified after signing?)")
        return roster

    @classmethod
    def load(cls, path: str | os.PathLike[str], consortium_key: bytes) -> Roster:
        """``loads`` a file; errors name the file."""
        text = read_small_text(Path(path))
        try:
            return cls.loads(text, consortium_key)
        except RosterError as exc:
            raise type(exc)(f"{path}: {exc}") from None

    @classmethod
    def loads_unsigned(cls, text: str) -> Roster:
        """Parse a roster without checking any signature (for signing it)."""
        data = _parse_toml(text)
        return _roster_from(data, b"")


def _signed_entry(e: RosterEntry) -> list[Any]:
    # ``examples`` only where declared: every roster signed before the field existed
    # still has the same bytes, and so still verifies.
    body: list[Any] = [e.node_id, e.role, e.public_key, list(e.endpoints)]
    if e.examples is not None:
        body.append(e.examples)
    return body


def sign(unsigned_toml: str, consortium_identity: Identity) -> str:
    """Sign a roster's TOML text with the consortium key; returns the signed TOML text.

    Any existing ``[signature]`` table is replaced. Raises ``RosterError`` if the text is
    not a valid roster.
    """
    roster = Roster.loads_unsigned(unsigned_toml)
    roster = Roster(roster.version, roster.entries, consortium_identity.public_key)
    return roster.to_toml(consortium_identity.sign(roster.signed_bytes()))


class RosterStore:
    """Accepts rosters in version order; the caller persists ``newest_seen`` (an int).

    A roster older than the newest seen is refused (rollback to a roster that still
    admits a revoked key). The same version is accepted again only if it is the same
    roster (or none is held yet, as after a restart).
    """

    __slots__ = ("current", "newest_seen")

    def __init__(self, newest_seen: int = 0) -> None:
        if isinstance(newest_seen, bool) or not isinstance(newest_seen, int) or newest_seen < 0:
            raise ValueError(f"newest_seen must be an int >= 0, got {newest_seen!r}")
        self.newest_seen = newest_seen
        self.current: Roster | None = None

    def accept(self, new_roster: Roster) -> Roster:
        if new_roster.version < self.newest_seen:
            raise StaleRosterError(
                f"roster version {new_roster.version} is older than version "
                f"{self.newest_seen} already seen"
            )
        if (
            new_roster.version == self.newest_seen
            and self.current is not None
            and self.current.version == new_roster.version
            and self.current.digest != new_roster.digest
        ):
            raise StaleRosterError(
                f"a different roster with the same version {new_roster.version} was "
                "already accepted (the consortium must bump the version)"
            )
        self.newest_seen = new_roster.version
        self.current = new_roster
        return new_roster


# ---------------------------------------------------------------- parsing helpers


def read_small_text(path: Path, what: str = "roster", error: type[Exception] = RosterError) -> str:
    """A UTF-8 file of at most ``MAX_ROSTER_BYTES`` (a roster, a public key line); every
    problem is one ``error`` naming ``what`` and the path."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_ROSTER_BYTES + 1)
    except FileNotFoundError:
        raise error(f"{what} {path}: file not found") from None
    except OSError as exc:
        raise error(f"{what} {path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_ROSTER_BYTES:
        raise error(f"{what} {path}: larger than {MAX_ROSTER_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {path}: not UTF-8 text") from None


def _parse_toml(text: str) -> dict[str, Any]:
    if len(text) > MAX_ROSTER_BYTES:
        raise RosterError(f"roster larger than {MAX_ROSTER_BYTES} bytes")
    if _nesting(text) > MAX_NESTING:
        raise RosterError(f"roster is not valid TOML: nested too deeply (limit {MAX_NESTING})")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RosterError(f"roster is not valid TOML: {exc}") from None
    except RecursionError:  # nesting the scan above missed
        raise RosterError("roster is not valid TOML: nested too deeply") from None
    extra = set(data) - {"version", "nodes", "signature"}
    if extra:
        raise RosterError(f"unknown roster field {sorted(extra)[0]!r}")
    return data


def _nesting(text: str) -> int:
    """How deeply arrays, tables and inline tables nest in TOML ``text``, brackets inside
    strings and comments aside: a pre-filter for the parser (what it misses in text that
    is not valid TOML, the parser's ``RecursionError`` still catches)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_TOML_STRINGS_AND_COMMENTS.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _parse_signature(table: object) -> tuple[bytes, bytes]:
    if not isinstance(table, Mapping) or set(table) != _SIGNATURE_KEYS:
        raise RosterError("[signature] must have exactly consortium_key and signature")
    key_value, sig_value = table["consortium_key"], table["signature"]
    if not isinstance(key_value, str) or not isinstance(sig_value, str):
        raise RosterError("[signature] fields must be base64 strings")
    try:
        named_key = parse_key(key_value, "signature.consortium_key")
        signature = base64.b64decode(sig_value.encode("ascii"), validate=True)
    except (IdentityError, UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise RosterError(f"[signature]: {exc}") from None
    if len(signature) != SIGNATURE_BYTES:
        raise RosterError(f"signature.signature: expected {SIGNATURE_BYTES} bytes")
    return named_key, signature


def _roster_from(data: Mapping[str, Any], consortium_key: bytes) -> Roster:
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RosterError(f"version: expected an int >= 1, got {version!r}")
    nodes = data.get("nodes", [])
    if not isinstance(nodes, list):
        raise RosterError("nodes: expected an array of tables ([[nodes]])")
    if len(nodes) > MAX_ENTRIES:
        raise RosterError(f"nodes: {len(nodes)} entries, limit {MAX_ENTRIES}")
    entries = [_entry_from(i, node) for i, node in enumerate(nodes)]
    try:
        return Roster(version, entries, consortium_key)
    except ValueError as exc:
        raise RosterError(f"nodes: {exc}") from None


def _entry_from(index: int, node: object) -> RosterEntry:
    where = f"nodes[{index}]"
    if not isinstance(node, Mapping):
        raise RosterError(f"{where}: expected a table")
    extra = set(node) - _NODE_KEYS
    if extra:
        raise RosterError(f"{where}: unknown field {sorted(extra)[0]!r}")
    missing = sorted({"id", "role", "public_key"} - set(node))
    if missing:
        raise RosterError(f"{where}: missing field {missing[0]!r}")
    node_id, role, key, endpoints, examples = (
        node["id"],
        node["role"],
        node["public_key"],
        node.get("endpoints", []),
        node.get("examples"),
    )
    if isinstance(node_id, str):
        where = f"{where} ({node_id})"
    if not isinstance(key, str):
        raise RosterError(f"{where}.public_key: expected a base64 string")
    if not isinstance(endpoints, list):
        raise RosterError(f"{where}.endpoints: expected an array of strings")
    try:
        return RosterEntry(node_id, role, parse_key(key, "public_key"), tuple(endpoints), examples)
    except ValueError as exc:  # IdentityError included
        raise RosterError(f"{where}: {exc}") from None
