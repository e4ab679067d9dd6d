"""The audit log: append-only, hash-chained, with a signed head.

Every daemon (and the operator's commands that change what may run on a site's data:
``fedloom dataset``, ``fedloom plans``) appends to ``STATE_DIR/audit/audit.jsonl``, one
JSON object per line::

    {"seq": n, "ts": unix time, "node": node id, "kind": "update_sent", "fields": {...},
     "prev": hash of entry n-1 ("0" * 64 for the first), "hash": sha256 hex}

``hash`` is the SHA-256 of the canonical JSON (sorted keys, no spaces, ASCII) of the entry
without ``hash``, so an edit of any entry breaks its hash, and a deletion, reordering or
insertion breaks the chain of ``seq`` and ``prev``. A chain alone cannot show that its
last entries were deleted: after each batch the daemon writes ``audit/head.json``
(``{"seq", "hash", "node", "sig"}``, replaced atomically), signed with the node's Ed25519
identity key, and ``fedloom audit verify`` given the node's public key checks that the log
still reaches that head.

Writers
* One lock (``audit/lock``, ``flock``): the daemon's writer thread and ``record()`` from a
  command may run at the same time; each append takes the lock, re-reads the last entry
  from the file (never from memory) and writes its lines with ONE ``write`` on an
  ``O_APPEND`` descriptor, then ``fsync``. The daemon batches: one write and one fsync
  for whatever queued up while the last batch was on disk.
* Torn tail. A crash during a write can leave the last line unfinished (no newline; or
  zeros after a power loss). It was never acknowledged, but it is not removed either: the
  next writer ends it with a newline and appends a ``torn_tail`` entry naming its byte
  offset, length and SHA-256, chained to the last intact entry; ``verify`` accepts such a
  sealed line and reports it, and reports an unsealed one as a torn tail (not intact).
  Why not truncate: truncating is exactly what an append-only log must never do (the
  evidence of the crash goes with it); why not refuse to start: a hospital's training
  would stop over a crash artefact that is recorded anyway. A damaged last line that a
  crash cannot leave (a complete line, newline-terminated, that is not a valid entry) is
  tampering or a bad disk: writers refuse to append (``AuditError``) and the daemon does
  not start (exit 65, like a corrupt state directory), until an operator has looked.

The daemon (``open_audit``, called by ``serve()``): ``AuditMiddleware`` observes the node
(observe only) and queues entries for an ``AuditWriter`` thread, so the event loop never
waits for the disk and every digest is computed off it. The queue is bounded: what it
cannot take is counted and recorded as an ``audit_gap`` entry, never dropped silently;
a batch whose ``fsync`` failed is named in an ``audit_sync_failed`` entry (not rewritten).

``record(state_dir, kind, **fields)`` is the commands' entry point; ``verify_log`` and
``read_entries`` read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedloom.algorithms.aggregator_base import APPLIED_KEY
from fedloom.algorithms.protocol import (
    Effect,
    Event,
    Log,
    Metric,
    Persist,
    Received,
    Send,
    Train,
)
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.signing import masked_digest
from fedloom.runtime.exit_status import EXIT_CORRUPT_STATE, EXIT_ENVIRONMENT
from fedloom.runtime.nodes import model_of
from fedloom.runtime.recovery import Daemon, DaemonError
from fedloom.transport.e2e import digest_as_received, tensors_digest
from fedloom.transport.identity import Identity, verify_signature, write_atomic
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import (
    Ack,
    MaskedUpdate,
    ModelBroadcast,
    TrainRefused,
    TrainRequest,
    Update,
)

_log = logging.getLogger("fedloom.audit")

__all__ = [
    "AUDIT_DIR",
    "GENESIS",
    "HEAD_FILE",
    "KNOWN_KINDS",
    "LOG_FILE",
    "AuditError",
    "AuditLog",
    "AuditMiddleware",
    "AuditSyncError",
    "AuditWriter",
    "DaemonAudit",
    "Problem",
    "Verdict",
    "canonical",
    "check_tail",
    "dataset_of",
    "describe_os_error",
    "entry_hash",
    "hand_to_state_owner",
    "is_command_kind",
    "open_audit",
    "read_entries",
    "readable_identity",
    "record",
    "verify_log",
]

AUDIT_DIR = "audit"
LOG_FILE = "audit.jsonl"
HEAD_FILE = "head.json"
LOCK_FILE = "lock"
GENESIS = "0" * 64
# One entry's line, at most (a local writer's fields past this are a bug, not data).
MAX_ENTRY_BYTES = 64 * 1024
MAX_KIND_CHARS = 64
_HEAD_CONTEXT = b"fedloom audit head v1\x00"
_TAIL_CHUNK = 64 * 1024
ENTRY_KEYS = frozenset({"seq", "ts", "node", "kind", "fields", "prev", "hash"})


class AuditError(ConfigError):
    """The audit log cannot be appended to or read as asked; the message says why."""


class AuditSyncError(AuditError):
    """A batch was written (its lines are in the file) but its ``fsync`` failed: they may
    not survive a power loss. Not retried (rewriting them would record them twice, and
    after a failed fsync the page cache cannot be trusted): the daemon's writer records an
    ``audit_sync_failed`` entry naming the seqs instead."""

    def __init__(self, message: str, first: int, last: int, reason: str) -> None:
        super().__init__(message)
        self.first = first
        self.last = last
        self.reason = reason


# ------------------------------------------------------------------ entries
def canonical(obj: Any) -> bytes:
    """The canonical JSON of ``obj``: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``entry`` without its ``hash``."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def jsonable(value: Any, where: str = "fields") -> Any:
    """``value`` as plain JSON data: bytes become hex, tuples lists; ``TypeError`` for
    anything else that is not a JSON scalar, list or str-keyed dict (a bug of the caller)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"audit {where}: {value!r} is not a finite number")
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"audit {where}: key {k!r} is not a string")
            out[k] = jsonable(v, f"{where}.{k}")
        return out
    raise TypeError(f"audit {where}: {type(value).__name__} is not JSON data")


def _is_hex64(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 64:
        return False
    try:
        int(value, 16)
    except ValueError:
        return False
    return value == value.lower()


def parse_entry(line: bytes) -> dict[str, Any] | None:
    """The entry on ``line`` if it has an entry's shape (its hash unchecked), else None."""
    try:
        entry = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
        return None
    seq, ts = entry["seq"], entry["ts"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return None
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return None
    if not isinstance(entry["node"], str) or not isinstance(entry["kind"], str):
        return None
    if not isinstance(entry["fields"], dict):
        return None
    if not _is_hex64(entry["prev"]) or not _is_hex64(entry["hash"]):
        return None
    try:
        canonical(entry)  # a number out of float's range reads as inf: no writer wrote it
    except ValueError:
        return None
    return entry


def _valid(entry: Mapping[str, Any]) -> bool:
    return bool(entry_hash(entry) == entry["hash"])


# ------------------------------------------------------------------ the file
# ``(kind, fields)`` or ``(kind, fields, unix time)``
Item = tuple[str, Mapping[str, Any]] | tuple[str, Mapping[str, Any], float]


def audit_dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / AUDIT_DIR


@dataclass(slots=True)
class _Tail:
    """What an appender needs from the end of the file."""

    seq: int = 0
    hash: str = GENESIS
    node: str | None = None
    # A torn last line to seal: (byte offset, its bytes) -- or a whole entry lacking only
    # its newline (``newline_only``).
    torn: tuple[int, bytes] | None = None
    newline_only: bool = False
    # ``_read_back(fd, end)`` reads the last intact entry (its line ends there).
    end: int = 0


def _read_back(fd: int, end: int) -> tuple[int, bytes]:
    """The last line ending at ``end`` (exclusive, without its newline) and its offset."""
    chunks: list[bytes] = []
    pos = end
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        chunk = os.pread(fd, pos - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            chunks.append(chunk[cut + 1 :])
            return start + cut + 1, b"".join(reversed(chunks))
        chunks.append(chunk)
        pos = start
    return 0, b"".join(reversed(chunks))


def _read_tail(fd: int, path: Path) -> _Tail:
    size = os.fstat(fd).st_size
    if size == 0:
        return _Tail()
    last = os.pread(fd, 1, size - 1)
    tail = _Tail()
    end = size
    if last != b"\n":
        offset, line = _read_back(fd, size)
        entry = parse_entry(line)
        if entry is not None and _valid(entry):
            # Complete but for its newline: finish the line; it is the last entry.
            return _Tail(entry["seq"], entry["hash"], entry["node"], newline_only=True, end=size)
        tail.torn = (offset, line)
        end = offset
        if end == 0:
            return tail
    tail.end = end - 1
    offset, line = _read_back(fd, end - 1)
    entry = parse_entry(line)
    if tail.torn is not None and (entry is None or not _valid(entry)):
        # A crash while sealing an earlier torn line: that line, the newline the seal
        # began with, and the seal cut short. One torn region, sealed as one.
        tail.torn = (offset, line + b"\n" + tail.torn[1])
        if offset == 0:
            return tail
        tail.end = offset - 1
        offset, line = _read_back(fd, offset - 1)
        entry = parse_entry(line)
    if entry is None or not _valid(entry):
        raise AuditError(
            f"{path}: the last complete entry (byte {offset}) is damaged, which a crash "
            "cannot do: not appending; run `fedloom audit verify`"
        )
    tail.seq, tail.hash, tail.node = entry["seq"], entry["hash"], entry["node"]
    return tail


UNKNOWN_NODE = "local"  # a command's entry in a fresh log, given no --config


def check_tail(state_dir: str | os.PathLike[str]) -> str | None:
    """The node id of the last intact entry of ``state_dir``'s audit log (None: no
    entry); ``AuditError`` if the log has the damaged tail a daemon refuses to start on
    (``AuditLog.check``). Read only, no lock: ``fedloom state check``, a daemon's start."""
    path = audit_dir(state_dir) / LOG_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None  # a node that never ran, or ran before it kept an audit log
    try:
        return _read_tail(fd, path).node
    finally:
        os.close(fd)


@contextmanager
def _locked(folder: Path) -> Iterator[int]:
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------ who wrote what
# Kinds the operator's commands write (``fedloom plans``, ``fedloom dataset``; a command
# that finds a torn line seals it): the only entries a signer accepts from others.
COMMAND_KIND_PREFIXES = ("plan_", "dataset_")
_MAX_RUNS = 64  # runs of unsigned command entries the lock file remembers
_MAX_WALK = 10_000  # unsigned entries a signer looks at before it signs
_MAX_NAMED = 32  # seq ranges (and kinds) an ``audit_foreign_entries`` entry names
Run = tuple[int, int, str, str]  # (first seq, last seq, prev of the first, hash of the last)


def is_command_kind(kind: str) -> bool:
    """Whether ``kind`` is one the operator's commands write."""
    return kind.startswith(COMMAND_KIND_PREFIXES) or kind == "torn_tail"


def _read_runs(fd: int) -> list[Run]:
    """The runs of entries that writers without the key appended holding the lock since
    the last signed head (kept in the lock file itself); [] when unreadable."""
    try:
        raw = os.pread(fd, 64 * 1024, 0)
        doc = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return []
    runs = doc.get("runs") if isinstance(doc, dict) else None
    out: list[Run] = []
    for run in runs if isinstance(runs, list) else ():
        if (
            isinstance(run, list)
            and len(run) == 4
            and all(type(x) is int for x in run[:2])
            and _is_hex64(run[2])
            and _is_hex64(run[3])
        ):
            out.append((run[0], run[1], run[2], run[3]))
    return out[-_MAX_RUNS:]


def _write_runs(fd: int, runs: Sequence[Run], *, durable: bool) -> None:
    data = canonical({"runs": [list(r) for r in runs[-_MAX_RUNS:]]}) if runs else b""
    os.ftruncate(fd, 0)
    if data:
        os.pwrite(fd, data, 0)
    if durable:
        os.fsync(fd)


def _add_run(runs: list[Run], first: int, last: int, first_prev: str, last_hash: str) -> None:
    if runs and runs[-1][1] + 1 == first and runs[-1][3] == first_prev:
        runs[-1] = (runs[-1][0], last, runs[-1][2], last_hash)  # nothing came in between
    else:
        runs.append((first, last, first_prev, last_hash))


def _ranges(seqs: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and out[-1][1] + 1 == s:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def _unsigned(fd: int, tail: _Tail, base: int) -> tuple[list[dict[str, Any]], str | None, int]:
    """The entries after seq ``base`` (oldest first), walking back from the file's last
    intact entry; a reason when the log under ``base`` is not what was signed (a
    damaged line on the way), and how many entries after ``base`` were left unread
    (past ``_MAX_WALK``)."""
    found: list[dict[str, Any]] = []
    pos = tail.end
    nxt_prev: str | None = None
    while pos > 0 and len(found) < min(tail.seq - base, _MAX_WALK):
        offset, line = _read_back(fd, pos)
        entry = parse_entry(line)
        if entry is None or not _valid(entry):
            return found[::-1], f"a damaged line at byte {offset}", 0
        if nxt_prev is not None and entry["hash"] != nxt_prev:
            return found[::-1], f"the chain breaks at seq {entry['seq']}", 0
        found.append(entry)
        nxt_prev = entry["prev"]
        pos = offset - 1
    unread = max(0, tail.seq - base - len(found))
    return found[::-1], None, unread


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def head_message(seq: int, hash_: str, node: str) -> bytes:
    return _HEAD_CONTEXT + canonical({"seq": seq, "hash": hash_, "node": node})


class AuditLog:
    """Appends batches of entries to ``state_dir``'s audit log (see the module docstring).

    ``node``: the id written in the entries (None: the last entry's, else ``"local"``).
    ``identity``: signs ``head.json`` after every batch (None: the head is left as is).
    ``fsync``: the function that makes a write durable (tests inject a slow one).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        node: str | None = None,
        identity: Identity | None = None,
        *,
        fsync: Any = os.fsync,
        clock: Any = time.time,
    ) -> None:
        self.folder = audit_dir(state_dir)
        self.path = self.folder / LOG_FILE
        self.node = node
        self.identity = identity
        self._fsync = fsync
        self._clock = clock
        self._base: tuple[int, str] | None = None  # the head this writer last signed
        self._own: list[Run] = []  # its entries no head covers yet (a failed signing)
        self.state_dir = Path(state_dir)

    def _ensure_folder(self) -> None:
        try:
            self.folder.mkdir(mode=0o700, exist_ok=False)
        except FileExistsError:
            return
        hand_to_state_owner(self.state_dir, self.folder)
        _fsync_dir(self.folder.parent)

    def _hand_over(self) -> None:
        hand_to_state_owner(
            self.state_dir,
            self.folder,
            self.folder / LOCK_FILE,
            self.path,
            self.folder / HEAD_FILE,
        )

    def check(self) -> None:
        """``AuditError`` if the log's tail is damaged (a daemon checks this at start)."""
        self._ensure_folder()
        with _locked(self.folder):
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o600)
            try:
                _read_tail(fd, self.path)
            finally:
                os.close(fd)
        self._hand_over()

    def append(self, items: Sequence[Item], ts: float | None = None) -> list[dict[str, Any]]:
        """Append ``(kind, fields)`` or ``(kind, fields, ts)`` items as one batch: one
        write, one fsync, then the signed head; returns the entries written (a
        ``torn_tail`` entry first when the last line was torn). ``ts``: the time of the
        items that carry none (default: now)."""
        now = self._clock() if ts is None else ts
        prepared: list[tuple[str, Any, float]] = []
        for item in items:
            when = item[2] if len(item) == 3 else now
            prepared.append((_check_kind(item[0]), jsonable(dict(item[1])), float(when)))
        if not prepared:
            return []
        self._ensure_folder()
        with _locked(self.folder) as lock_fd:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            runs = _read_runs(lock_fd)
            try:
                rfd = os.open(self.path, os.O_RDONLY)
                try:
                    tail = _read_tail(rfd, self.path)
                    if self.identity is not None:
                        foreign = self._foreign(rfd, tail, runs)
                        if foreign is not None:
                            prepared.insert(0, ("audit_foreign_entries", foreign, now))
                finally:
                    os.close(rfd)
                if created:
                    _fsync_dir(self.folder)
                node = self.node or tail.node or UNKNOWN_NODE
                seq, prev = tail.seq, tail.hash
                lines: list[bytes] = []
                head = b""
                entries: list[dict[str, Any]] = []
                if tail.newline_only or tail.torn is not None:
                    head = b"\n"
                if tail.torn is not None:
                    offset, torn = tail.torn
                    prepared.insert(
                        0,
                        (
                            "torn_tail",
                            {
                                "offset": offset,
                                "bytes": len(torn),
                                "sha256": hashlib.sha256(torn).hexdigest(),
                            },
                            now,
                        ),
                    )
                for kind, fields, when in prepared:
                    seq += 1
                    entry: dict[str, Any] = {
                        "seq": seq,
                        "ts": when,
                        "node": node,
                        "kind": kind,
                        "fields": fields,
                        "prev": prev,
                    }
                    entry["hash"] = prev = entry_hash(entry)
                    line = canonical(entry)
                    if len(line) > MAX_ENTRY_BYTES:
                        raise AuditError(
                            f"audit entry {kind!r} is {len(line)} bytes (at most "
                            f"{MAX_ENTRY_BYTES}): record digests, not data"
                        )
                    lines.append(line + b"\n")
                    entries.append(entry)
                data = memoryview(head + b"".join(lines))
                while data:
                    data = data[os.write(fd, data) :]
                try:
                    self._fsync(fd)
                except OSError as exc:
                    first, why = entries[0]["seq"], str(exc.strerror or exc)
                    raise AuditSyncError(
                        f"{self.path}: entries seq {first} to {seq} written but not made "
                        f"durable: fsync failed ({why})",
                        first,
                        seq,
                        why,
                    ) from None
            finally:
                os.close(fd)
            first = entries[0]
            if self.identity is None:
                _add_run(runs, first["seq"], seq, first["prev"], prev)
                _write_runs(lock_fd, runs, durable=True)
            else:
                try:
                    self._sign_head(seq, prev, node)
                except OSError as exc:  # the entries are in the file: not written again
                    _add_run(self._own, first["seq"], seq, first["prev"], prev)
                    _log.error("audit: cannot sign the head: %s", describe_os_error(exc, self.path))
                else:
                    self._base, self._own = (seq, prev), []
                    if runs:
                        _write_runs(lock_fd, [], durable=False)
        self._hand_over()
        return entries

    def _signed_base(self) -> tuple[int, str]:
        """The newest head signed with this writer's key: its own, or ``head.json`` if
        that verifies and is newer (a command that held the key signed it)."""
        assert self.identity is not None
        best = self._base or (0, GENESIS)
        head = _read_head(self.folder)
        if isinstance(head, dict) and head["seq"] > best[0]:
            try:
                sig = base64.b64decode(head["sig"].encode("ascii"), validate=True)
            except (UnicodeEncodeError, binascii.Error, ValueError):
                sig = b""
            message = head_message(head["seq"], head["hash"], head["node"])
            if verify_signature(self.identity.public_key, message, sig):
                best = (head["seq"], head["hash"])
        return best

    def _foreign(self, fd: int, tail: _Tail, runs: Sequence[Run]) -> dict[str, Any] | None:
        """Before signing: the entries since the last signed head that this writer did
        not write and that are not a command's (a ``plan_*``/``dataset_*`` kind appended
        through ``record()`` holding the lock, as the lock file records), as the fields
        of an ``audit_foreign_entries`` entry; None when there are none."""
        if self._base is not None and (tail.seq, tail.hash) == self._base:
            return None  # nothing since this writer's last batch
        base_seq, base_hash = self._signed_base()
        if (tail.seq, tail.hash) == (base_seq, base_hash):
            return None
        note: dict[str, Any] = {"after_signed_seq": base_seq}
        if tail.seq < base_seq:
            note.update(
                rewritten=f"the log ends at seq {tail.seq}, before the signed head (seq "
                f"{base_seq}): entries were deleted",
                seqs=[],
                count=0,
            )
            return note
        found, damage, unread = _unsigned(fd, tail, base_seq)
        if damage is None and not unread and found and found[0]["prev"] != base_hash:
            damage = f"seq {base_seq} is not the entry the signed head names"
        ok: set[int] = set()
        by_seq = {e["seq"]: e for e in found}
        for first, last, first_prev, last_hash in (*runs, *self._own):
            a, b = by_seq.get(first), by_seq.get(last)
            if a is None or b is None or a["prev"] != first_prev or b["hash"] != last_hash:
                continue
            own = (first, last, first_prev, last_hash) in self._own
            ok.update(
                s for s in range(first, last + 1) if own or is_command_kind(by_seq[s]["kind"])
            )
        bad = [e for e in found if e["seq"] not in ok]
        if not bad and damage is None and not unread:
            return None
        kinds = Counter(_clean(e["kind"], MAX_KIND_CHARS) for e in bad)
        seqs = [e["seq"] for e in bad]
        ranges = _ranges(seqs)
        if unread:
            ranges.insert(0, [base_seq + 1, base_seq + unread])
        note.update(
            seqs=ranges[:_MAX_NAMED],
            count=len(bad) + unread,
            kinds=dict(kinds.most_common(_MAX_NAMED)),
            why="not written by this daemon, nor a command's entry (plan_*, dataset_*) "
            "appended through the audit lock; covered by the head signed after this entry",
        )
        if damage is not None:
            note["rewritten"] = damage
        return note

    def _sign_head(self, seq: int, hash_: str, node: str) -> None:
        assert self.identity is not None
        sig = self.identity.sign(head_message(seq, hash_, node))
        head = {
            "seq": seq,
            "hash": hash_,
            "node": node,
            "sig": base64.b64encode(sig).decode("ascii"),
        }
        write_atomic(self.folder / HEAD_FILE, canonical(head) + b"\n", mode=0o600)


def _check_kind(kind: object) -> str:
    if not isinstance(kind, str) or not kind or len(kind) > MAX_KIND_CHARS:
        raise TypeError(f"audit kind must be a short non-empty string, got {kind!r}")
    return kind


def record(
    state_dir: str | os.PathLike[str],
    kind: str,
    /,
    *,
    node: str | None = None,
    identity: Identity | None = None,
    **fields: Any,
) -> None:
    """Append one entry (``kind``, ``fields``) to ``state_dir``'s audit log, durably.

    For the operator's commands (``fedloom dataset add``, ``fedloom plans approve``, ...):
    safe while the node's daemon runs and appends too (one lock; the last hash is re-read
    from the file). ``fields``: JSON scalars, lists and str-keyed dicts (bytes are written
    as hex). ``node``: the id in the entry (default: the last entry's). ``identity``: sign
    the head too (else the daemon's next batch covers this entry with its head).
    ``AuditError`` (a ``ConfigError``: one line) when the log's tail is damaged or the
    disk refuses the write; ``TypeError`` for fields that are not JSON data."""
    log = AuditLog(state_dir, node, identity)
    try:
        log.append([(kind, fields)])
    except OSError as exc:
        raise AuditError(
            f"cannot append to the audit log: {describe_os_error(exc, log.path)}"
        ) from None


def readable_identity(cfg: Any) -> Identity | None:
    """The node's identity (``cfg``: its ``DaemonConfig``) if this process can read its
    key, else None: a command signs the audit log's head with it when it can."""
    from fedloom.transport.identity import IdentityError

    path = getattr(cfg, "identity_key", None)
    if path is None:
        return None
    try:
        return Identity.load(path)
    except (IdentityError, OSError, ValueError):
        return None


def describe_os_error(exc: OSError, fallback: Path) -> str:
    """``exc`` as one line naming the file; for a permission error, its owner and the
    user this process runs as, with the command that fixes it."""
    name = Path(exc.filename) if isinstance(exc.filename, str) else fallback
    text = f"{name}: {exc.strerror or exc}"
    if not isinstance(exc, PermissionError):
        return text
    try:
        owner = os.stat(name).st_uid
    except OSError:
        try:
            owner = os.stat(name.parent).st_uid
            name = name.parent
        except OSError:
            return text
    me = os.geteuid()
    return (
        f"{text} ({name} belongs to {_user(owner)}, this process runs as {_user(me)}: a "
        f"command run as {_user(owner)} created it? run commands as the daemon's user, or "
        f"`chown -R {_user(me)} {name.parent if name.name != AUDIT_DIR else name}`)"
    )


def _user(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def hand_to_state_owner(state_dir: str | os.PathLike[str], *paths: Path) -> None:
    """A command run as root leaves what it created (the audit log, the registries)
    to the owner of the state directory, so the daemon's user can still write them:
    each of ``paths`` that exists and belongs to root is chowned (never through a
    symlink). Nothing to do unless this process is root and the directory is not
    root's."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(state_dir)
    except OSError:
        return
    if st.st_uid == 0:
        return
    for path in paths:
        try:
            if os.lstat(path).st_uid == 0:
                os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
        except OSError:
            continue


# ------------------------------------------------------------------ reading
@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with a log: ``line`` (1-based; 0 for the head file), what
    (``edited``, ``deleted``, ``reordered``, ``inserted``, ``torn_tail``, ``unparsable``,
    ``truncated``, ``head``) and a sentence."""

    line: int
    kind: str
    message: str


@dataclass(slots=True)
class Verdict:
    """What ``verify_log`` found: the intact entries (up to the first problem), the
    problem if any, and whether the signed head was checked."""

    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    lines: int = 0
    problem: Problem | None = None
    head_checked: bool = False
    head_seq: int | None = None
    notes: list[str] = field(default_factory=list)
    # With a key: the intact entries after the signed head, which it does not cover
    # (anyone who can write the file could have appended them; see ``covered``).
    unsigned: list[dict[str, Any]] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return self.problem is None

    @property
    def covered(self) -> bool:
        """Intact, the head checked, and every entry covered by the signed head."""
        return self.problem is None and self.head_checked and not self.unsigned


@dataclass(frozen=True, slots=True)
class _Line:
    number: int
    offset: int
    raw: bytes
    terminated: bool
    entry: dict[str, Any] | None


def _lines(data: bytes) -> list[_Line]:
    out: list[_Line] = []
    offset = 0
    number = 0
    while offset < len(data):
        cut = data.find(b"\n", offset)
        terminated = cut >= 0
        end = cut if terminated else len(data)
        raw = data[offset:end]
        number += 1
        out.append(_Line(number, offset, raw, terminated, parse_entry(raw)))
        offset = end + 1
    return out


def _seal_of(lines: list[_Line], i: int, data: bytes) -> int | None:
    """The index of the ``torn_tail`` entry that seals the torn region starting at line
    ``i`` (that line, or two: a torn line and a seal of it cut short), else None."""
    start = lines[i].offset
    for j in (i + 1, i + 2):
        if j >= len(lines) or (j == i + 2 and lines[i + 1].entry is not None):
            return None
        seal = lines[j].entry
        if seal is None or seal["kind"] != "torn_tail":
            continue
        f = seal["fields"]
        size = lines[j].offset - 1 - start
        if (
            f.get("offset") == start
            and f.get("bytes") == size
            and f.get("sha256") == hashlib.sha256(data[start : start + size]).hexdigest()
        ):
            return j
        return None
    return None


def _chain_problem(lines: list[_Line], i: int, expected: int, prev: str) -> Problem:
    """What is wrong at ``lines[i]`` (a well-formed entry whose hash is right) given the
    chain so far (next ``expected`` seq, ``prev`` hash)."""
    line = lines[i]
    entry = line.entry
    assert entry is not None
    seq = entry["seq"]
    n = line.number
    if seq == expected:
        if i == 0 or expected == 1:
            return Problem(n, "edited", f"line {n} (seq 1) does not start the chain: edited")
        return Problem(
            lines[i - 1].number,
            "edited",
            f"line {lines[i - 1].number} (seq {expected - 1}) was replaced: the next entry "
            f"(line {n}) is chained to a different one",
        )
    later = [x for x in lines[i + 1 :] if x.entry is not None]
    if seq > expected:
        for x in later:
            assert x.entry is not None
            if x.entry["seq"] == seq - 1 and x.entry["hash"] == entry["prev"]:
                return Problem(
                    n,
                    "reordered",
                    f"line {n} holds seq {seq} where seq {expected} was due; seq {seq - 1} "
                    f"comes later (line {x.number}): entries reordered",
                )
        nxt = lines[i + 1].entry if i + 1 < len(lines) else None
        if nxt is not None and nxt["seq"] == expected and nxt["prev"] == prev:
            return Problem(n, "inserted", f"line {n} (seq {seq}) is not in the chain: inserted")
        missing = seq - expected
        span = f"seq {expected}" if missing == 1 else f"seq {expected} to {seq - 1}"
        return Problem(
            n,
            "deleted",
            f"{span} missing before line {n} ({missing} entr{'y' if missing == 1 else 'ies'} "
            "deleted)",
        )
    first = next(x for x in lines[:i] if x.entry is not None and x.entry["seq"] == seq)
    assert first.entry is not None
    if first.entry["hash"] == entry["hash"]:
        return Problem(
            n, "inserted", f"line {n} repeats seq {seq} (a copy of line {first.number}): inserted"
        )
    return Problem(
        n,
        "inserted",
        f"line {n} holds seq {seq} again (first on line {first.number}): an entry was inserted",
    )


def _read_head(folder: Path) -> dict[str, Any] | str | None:
    """head.json as a dict, None when absent, or a sentence saying why it is unreadable."""
    try:
        raw = (folder / HEAD_FILE).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read {HEAD_FILE} ({exc.strerror})"
    try:
        head = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return f"{HEAD_FILE} is not JSON"
    if (
        not isinstance(head, dict)
        or set(head) != {"seq", "hash", "node", "sig"}
        or not isinstance(head["seq"], int)
        or isinstance(head["seq"], bool)
        or head["seq"] < 1
        or not _is_hex64(head["hash"])
        or not isinstance(head["node"], str)
        or not isinstance(head["sig"], str)
    ):
        return f"{HEAD_FILE} does not have a head's fields"
    return head


def _check_head(verdict: Verdict, folder: Path, public_key: bytes) -> None:
    head = _read_head(folder)
    last = verdict.entries[-1]["seq"] if verdict.entries else 0
    if head is None:
        if verdict.entries or verdict.problem is not None:
            verdict.problem = verdict.problem or Problem(
                0,
                "head",
                f"no signed head ({HEAD_FILE} is missing): a deletion of the last entries "
                "cannot be ruled out",
            )
        else:
            verdict.head_checked = True
        return
    if isinstance(head, str):
        verdict.problem = verdict.problem or Problem(0, "head", head)
        return
    try:
        sig = base64.b64decode(head["sig"].encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        sig = b""
    if not verify_signature(public_key, head_message(head["seq"], head["hash"], head["node"]), sig):
        verdict.problem = verdict.problem or Problem(
            0,
            "head",
            f"{HEAD_FILE}: the signature does not verify with the given public key "
            "(forged, or another node's key)",
        )
        return
    verdict.head_checked = True
    verdict.head_seq = head["seq"]
    if verdict.problem is not None:
        return
    if head["seq"] > last:
        gone = head["seq"] - last
        verdict.problem = Problem(
            verdict.lines + 1,
            "truncated",
            f"the signed head covers seq {head['seq']} but the log ends at seq {last}: "
            f"its last {gone} entr{'y was' if gone == 1 else 'ies were'} deleted",
        )
        return
    signed = verdict.entries[head["seq"] - 1]
    if signed["hash"] != head["hash"]:
        verdict.problem = Problem(
            0,
            "edited",
            f"entry seq {head['seq']} differs from the signed head: the log up to it was rewritten",
        )
        return
    if last > head["seq"]:
        verdict.unsigned = verdict.entries[head["seq"] :]


def _foreign_note(entry: Mapping[str, Any]) -> str:
    f = entry["fields"]
    seqs = f.get("seqs") if isinstance(f.get("seqs"), list) else []
    shown = ", ".join(
        f"{r[0]}" if r[0] == r[1] else f"{r[0]}..{r[1]}"
        for r in seqs[:8]
        if isinstance(r, list) and len(r) == 2
    )
    text = (
        f"seq {entry['seq']}: the signer found entries after its signed head (seq "
        f"{_clean(f.get('after_signed_seq'))}) that it did not write and that are not a "
        f"command's: seq {shown or '-'} ({_clean(f.get('count'))}; kinds "
        f"{_clean(f.get('kinds'))})"
    )
    if f.get("rewritten"):
        text += f"; {_clean(f.get('rewritten'))}"
    return text


def verify_log(state_dir: str | os.PathLike[str], public_key: bytes | None = None) -> Verdict:
    """Check ``state_dir``'s audit log: every line an entry, hashes, ``seq`` +1 and ``prev``
    links, and with ``public_key`` the signed head (see the module docstring). An absent
    log is an intact empty one. ``OSError`` if the file cannot be read."""
    folder = audit_dir(state_dir)
    path = folder / LOG_FILE
    verdict = Verdict(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    lines = _lines(data)
    verdict.lines = len(lines)
    expected, prev = 1, GENESIS
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else None
        if line.entry is None:
            seal = _seal_of(lines, i, data)
            if seal is not None:
                size = lines[seal].offset - 1 - line.offset
                verdict.notes.append(
                    f"line {line.number}: a line torn by a crash ({size} bytes), sealed by "
                    f"the torn_tail entry on line {lines[seal].number}"
                )
                i = seal
                continue
            if nxt is None and not line.terminated:
                verdict.problem = Problem(
                    line.number,
                    "torn_tail",
                    f"line {line.number} is unfinished ({len(line.raw)} bytes, no newline): "
                    "a torn tail left by a crash during a write (the next append seals it)",
                )
            else:
                verdict.problem = Problem(
                    line.number,
                    "unparsable",
                    f"line {line.number} is not an audit entry: edited or corrupted",
                )
            break
        entry = line.entry
        # Writers write the canonical form: a line that is not (a float spelled another
        # way, spacing) was rewritten, even where its values and hash still agree.
        if not _valid(entry) or line.raw != canonical(entry):
            verdict.problem = Problem(
                line.number,
                "edited",
                f"line {line.number} (seq {entry['seq']}): its content does not match its "
                "hash: edited",
            )
            break
        if entry["seq"] != expected or entry["prev"] != prev:
            verdict.problem = _chain_problem(lines, i, expected, prev)
            break
        verdict.entries.append(entry)
        expected, prev = expected + 1, entry["hash"]
        if entry["kind"] == "audit_foreign_entries":
            verdict.notes.append(_foreign_note(entry))
        i += 1
    if public_key is not None:
        _check_head(verdict, folder, public_key)
    return verdict


def read_entries(
    state_dir: str | os.PathLike[str],
    kinds: Iterable[str] | None = None,
    *,
    public_key: bytes | None = None,
) -> list[dict[str, Any]]:
    """The verified entries of ``state_dir``'s audit log (of ``kinds`` only, if given), in
    order; ``[]`` when there is none. A torn last line (a crash during a write, never
    acknowledged) is left out; any other problem raises ``AuditError`` naming the line."""
    try:
        verdict = verify_log(state_dir, public_key)
    except OSError as exc:
        raise AuditError(
            f"{audit_dir(state_dir) / LOG_FILE}: cannot read ({exc.strerror})"
        ) from None
    if verdict.problem is not None and verdict.problem.kind != "torn_tail":
        raise AuditError(f"{verdict.path}: {verdict.problem.message}")
    if kinds is None:
        return list(verdict.entries)
    wanted = frozenset(kinds)
    return [e for e in verdict.entries if e["kind"] in wanted]


# ------------------------------------------------------------------ the daemon's writer
MAX_QUEUE = 4096  # entries waiting for the disk; past it they are counted, then recorded
MAX_BATCH = 512  # entries per write + fsync
SLOW_WRITE_S = 1.0  # a batch slower than this counts in ``audit_slow_writes``
RETRY_S = (0.1, 0.5, 2.0, 5.0)  # after a failed write: back-off before the next try
STOP_WAIT_S = 5.0  # at stop, how long the queue may take to reach the disk
MAX_THUNKS = 32  # queued entries whose digest is still to be computed (they hold tensors)
SKIPPED = "audit writer behind"  # why an entry has no digest

FieldsOrThunk = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


class AuditWriter:
    """The daemon's audit writer: ``submit`` never blocks (a bounded queue; the event
    loop calls it), a thread writes what queued up as one batch (one write, one fsync,
    the signed head). Fields may be a callable, run in the thread (digests of tensors).

    Nothing is dropped silently: a full queue (a slow or stalled disk) counts what it
    could not take, by kind, and the next batch starts with an ``audit_gap`` entry saying
    how many and which; the disk's pace shows in metrics (``report``, called from the
    thread: the daemon hands a thread-safe one): ``audit_queue_size``, ``audit_dropped``,
    ``audit_slow_writes``, ``audit_write_errors``, ``audit_entries``. A failed write is
    retried (the batch stays queued, in order) with back-off.
    """

    def __init__(
        self,
        log: AuditLog,
        report: Callable[[Metric], None] | None = None,
        *,
        max_queue: int = MAX_QUEUE,
        max_batch: int = MAX_BATCH,
        slow_s: float = SLOW_WRITE_S,
        max_thunks: int = MAX_THUNKS,
    ) -> None:
        self.log = log
        self.report = report
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.slow_s = slow_s
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, FieldsOrThunk, float]] = deque()
        self._dropped: Counter[str] = Counter()
        self._unsynced: list[tuple[int, int, str]] = []  # batches whose fsync failed
        self._thunks = 0  # callables queued (each may hold a model's tensors)
        self.max_thunks = max_thunks
        self.digests_skipped = 0
        self._closing = False
        self._busy = False
        self.written = 0
        self.dropped_total = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="audit writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(
        self,
        kind: str,
        fields: FieldsOrThunk,
        ts: float | None = None,
        *,
        fallback: Mapping[str, Any] | None = None,
    ) -> bool:
        """Queue one entry; False (counted, recorded later as a gap) when the queue is full
        or the writer stopped. A callable ``fields`` holds tensors until the thread runs
        it: past ``max_thunks`` of those queued, ``fallback`` (the same fields without
        the digest, saying so) is queued instead, so a stalled disk cannot pin model-sized
        arrays in memory."""
        when = time.time() if ts is None else ts
        with self._cond:
            if self._closing or len(self._queue) >= self.max_queue:
                self._dropped[kind] += 1
                self.dropped_total += 1
                dropped = True
            else:
                if callable(fields):
                    if self._thunks >= self.max_thunks:
                        fields = fallback if fallback is not None else {"digest": None}
                        self.digests_skipped += 1
                    else:
                        self._thunks += 1
                self._queue.append((kind, fields, when))
                self._cond.notify()
                dropped = False
        if dropped:
            self._metric(Metric("audit_dropped", 1.0, {"kind": _label(kind)}))
        return not dropped

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + (1 if self._busy else 0)

    def flush(self, timeout: float) -> bool:
        """Wait (bounded) until everything queued is on disk; whether it is."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy or self._unsynced or self._dropped:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = STOP_WAIT_S) -> bool:
        """Write what is queued (bounded by ``timeout``) and stop the thread; whether
        everything reached the disk (else it says so in a log line)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            left = len(self._queue) + len(self._unsynced) + (1 if self._busy else 0)
            left += sum(self._dropped.values())  # (a gap entry still to write)
        if left or self._thread.is_alive():
            _log.error(
                "audit: %d entr%s not written at stop (the disk is too slow or failing)",
                left,
                "y" if left == 1 else "ies",
            )
            return False
        return True

    def _metric(self, metric: Metric) -> None:
        if self.report is None:
            return
        try:
            self.report(metric)
        except Exception:  # observability never takes the writer down
            _log.debug("audit: metric report failed", exc_info=True)

    def _take(self) -> _Batch | None:
        with self._cond:
            while (
                not self._queue and not self._dropped and not self._unsynced and not self._closing
            ):
                self._cond.wait()
            if not self._queue and not self._dropped and not self._unsynced:
                return None  # closing, nothing left
            n = min(len(self._queue), self.max_batch)
            batch = _Batch([self._queue.popleft() for _ in range(n)], self._dropped, self._unsynced)
            self._dropped, self._unsynced = Counter(), []
            self._thunks -= sum(1 for _, fields, _ in batch.items if callable(fields))
            self._busy = True
            depth = len(self._queue)
        self._metric(Metric("audit_queue_size", float(depth)))
        return batch

    def _run(self) -> None:
        failures = 0
        stop_tried = False
        while True:
            batch = self._take()
            if batch is None:
                return
            items: list[Item] = []
            if batch.dropped:
                gap = {
                    "dropped": sum(batch.dropped.values()),
                    "kinds": dict(sorted(batch.dropped.items())),
                }
                items.append(("audit_gap", gap, time.time()))
            for first, last, why in batch.unsynced:
                note = {"from_seq": first, "to_seq": last, "error": why}
                items.append(("audit_sync_failed", note, time.time()))
            items.extend((kind, _resolve(kind, fields), ts) for kind, fields, ts in batch.items)
            started = time.monotonic()
            try:
                self.log.append(items)
            except (OSError, AuditError) as exc:
                failures += 1
                self.errors += 1
                self._metric(Metric("audit_write_errors"))
                if failures == 1 or failures % 100 == 0:
                    why = (
                        describe_os_error(exc, self.log.path)
                        if isinstance(exc, OSError)
                        else str(exc)
                    )
                    _log.error("audit: cannot write the log: %s; retrying", why)
                with self._cond:
                    if isinstance(exc, AuditSyncError):  # in the file: noted, not rewritten
                        self._unsynced.append((exc.first, exc.last, _clean(exc.reason)))
                        self.written += len(items)
                    else:  # nothing (or a torn line, sealed next time) reached the file
                        self._queue.extendleft(reversed(batch.items))
                        self._dropped.update(batch.dropped)
                        self._unsynced[:0] = batch.unsynced
                    self._busy = False
                    self._cond.notify_all()
                    if self._closing:  # a stop tries once more, then close() reports
                        if stop_tried:
                            return
                        stop_tried = True
                        continue
                    delay = RETRY_S[min(failures, len(RETRY_S)) - 1]
                    self._cond.wait_for(lambda: self._closing, timeout=delay)
                continue
            failures = 0
            elapsed = time.monotonic() - started
            self.written += len(items)
            self._metric(Metric("audit_entries", float(len(items))))
            if elapsed > self.slow_s:
                self._metric(Metric("audit_slow_writes"))
            with self._cond:
                self._busy = False
                self._cond.notify_all()


@dataclass(slots=True)
class _Batch:
    items: list[tuple[str, FieldsOrThunk, float]]
    dropped: Counter[str]
    unsynced: list[tuple[int, int, str]]


def _label(kind: str) -> str:
    return kind if kind in KNOWN_KINDS else "other"


def _resolve(kind: str, fields: FieldsOrThunk) -> Mapping[str, Any]:
    """``fields`` (run it if callable), as JSON data of a bounded size; a failure or an
    oversized result is recorded as such, never lost."""
    try:
        value = fields() if callable(fields) else fields
        data: dict[str, Any] = jsonable(dict(value))
        size = len(canonical(data))
    except Exception as exc:  # a bug in a digest: the entry says so
        _log.exception("audit: cannot compute the fields of a %s entry", kind)
        return {"error": _clean(f"{type(exc).__name__}: {exc}")}
    if size > MAX_ENTRY_BYTES - 1024:
        return {"oversized": size, "sha256": hashlib.sha256(canonical(data)).hexdigest()}
    return data


_CLEAN_CAP = 200


def _clean(text: object, cap: int = _CLEAN_CAP) -> str:
    """A peer's string fit for the log: printable characters only, at most ``cap``."""
    raw = text if isinstance(text, str) else repr(text)
    cut = len(raw) > cap
    shown = "".join(ch if ch.isprintable() else "?" for ch in raw[: cap - 3 if cut else cap])
    return shown + "..." if cut else shown


# ------------------------------------------------------------------ the middleware
KNOWN_KINDS = frozenset(
    {
        "daemon_start",
        "daemon_stop",
        "roster_installed",
        "update_sent",
        "masked_update_sent",
        "update_applied",
        "update_recorded",
        "secure_cohort_applied",
        "model_version",
        "model_signed",
        "model_received",
        "train_refused",
        "refusal_received",
        "input_rejected",
        "rejections_summarised",
        "dataset_used",
        "audit_gap",
        "audit_sync_failed",
        "audit_foreign_entries",
        "torn_tail",
    }
)
# Entries a peer's input causes (input rejections, refusals received): recorded one by one
# up to REJECTIONS_PER_WINDOW per neighbour (and PEER_INPUT_PER_WINDOW in all) per window;
# past that, counted and recorded as one summary per window: a hostile neighbour cannot
# grow the log without bound.
REJECTIONS_PER_WINDOW = 60
PEER_INPUT_PER_WINDOW = 600
REJECTION_WINDOW_S = 60.0
MAX_PAIRS = 64  # a forward's site updates listed in its entry (the rest counted)
_REMEMBERED = 4096  # (src, seq) pairs remembered to record each update once
_PENDING_PROOFS = 8  # model versions whose signature is still to be recorded


class _Recent:
    """A bounded set: the newest ``cap`` keys added."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._keys: OrderedDict[Any, None] = OrderedDict()

    def add(self, key: Any) -> bool:
        """Add ``key``; False when it was there already."""
        if key in self._keys:
            return False
        self._keys[key] = None
        if len(self._keys) > self.cap:
            self._keys.popitem(last=False)
        return True


def dataset_of(plan: object) -> dict[str, Any]:
    """What a site's plan trains on, for a ``dataset_used`` entry: a registered dataset's
    name, tags and SHA-256 (the plan's ``dataset_record``; never data), else the plan's
    kind."""
    record = getattr(plan, "dataset_record", None)
    if record is not None:
        out: dict[str, Any] = {}
        for key in ("name", "tags", "sha256", "rows"):
            value = record.get(key) if isinstance(record, Mapping) else getattr(record, key, None)
            if isinstance(value, (str, int)) or (
                isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            ):
                out[key] = list(value) if isinstance(value, (list, tuple)) else value
        return {"dataset": out}
    workload = getattr(plan, "workload", None)
    name = getattr(workload, "name", None)
    kind = type(plan).__name__ if plan is not None else "none"
    return {"plan": kind, **({"workload": name} if isinstance(name, str) else {})}


class AuditMiddleware:
    """The daemon's audit log as a ``Middleware`` (observe only; module docstring): what
    the node sent, applied, released and refused, and what the daemon did, into an
    ``AuditWriter``. Every digest is computed in the writer's thread, never on the loop
    (tensors in messages and models are never changed in place once made: the nodes
    build new arrays for every delta and every version).

    ``up``/``down``: the codec specs of updates going up and models going down, so a
    site's ``update_sent`` digest is the one its parent records in ``update_applied``: the
    delta as the parent decodes it, every float tensor as float32
    (``transport.e2e.digest_as_received``, SHA-256). It is not the update's signed digest
    (``fedloom-update-v3``: BLAKE3, tensors sent as float16 hashed as that float16,
    ``transport.e2e.update_digest``), so the audit hashes each update once more, in the
    writer's thread. A root's model digest is the one it signs.
    ``proof_of(version)``: the root's signature of that version once made (the driver
    signs a model when it first sends it), recorded as ``model_signed``.
    """

    def __init__(
        self,
        writer: AuditWriter,
        node_id: str,
        role: str,
        *,
        up: CodecSpec | None = None,
        down: CodecSpec | None = None,
        plan: object = None,
        model: Callable[[], tuple[int, Mapping[str, Any]] | None] | None = None,
        proof_of: Callable[[int], Any] | None = None,
    ) -> None:
        self.writer = writer
        self.node_id = node_id
        self.role = role
        self.up = up if up is not None else CodecSpec()
        self.down = down if down is not None else CodecSpec()
        self.dataset = dataset_of(plan) if role in ("site", "peer") else None
        self._model = model
        self._proof_of = proof_of
        self._sent = _Recent(_REMEMBERED)
        self._recorded = _Recent(_REMEMBERED)
        self._models_in = _Recent(64)
        self._models_out = _Recent(64)
        self._pending: OrderedDict[int, None] = OrderedDict()
        self._window_start: float | None = None
        self._window_n = 0
        self._window_by_peer: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()
        self.observe_errors = 0

    # -------------------------------------------------------------- Middleware
    def intercept(self, event: Event, now: float) -> list[Effect] | None:
        return None

    def observe(self, event: Event, effects: Sequence[Effect], now: float) -> list[Effect]:
        try:
            self._observe(event, effects, now)
        except Exception:  # a bug here must not stop the node; the gap is recorded
            self.observe_errors += 1
            if self.observe_errors == 1 or self.observe_errors % 1000 == 0:
                _log.exception("audit: observing an event failed")
            self.writer.submit("audit_gap", {"observe_errors": self.observe_errors})
        return []

    # -------------------------------------------------------------- the daemon
    def started(self, **fields: Any) -> None:
        self.writer.submit("daemon_start", {"role": self.role, **fields})

    def stopped(self, **fields: Any) -> None:
        self.writer.submit("daemon_stop", fields)

    def roster_installed(self, roster: Any) -> None:
        """``RosterKeeper``'s ``installed`` hook: a newer signed roster is in use."""
        self.writer.submit(
            "roster_installed",
            {"version": int(roster.version), "digest": bytes(roster.digest).hex()},
        )

    # -------------------------------------------------------------- events
    def _observe(self, event: Event, effects: Sequence[Effect], now: float) -> None:
        submit = self.writer.submit
        peer = event.peer if isinstance(event, Received) else None
        if isinstance(event, Received):
            self._received(event, effects, now)
        for eff in effects:
            if isinstance(eff, Send):
                self._sending(eff)
            elif isinstance(eff, Metric):
                if eff.name == "model_version" and self.role in ("root", "peer"):
                    self._released(int(eff.value))
                elif eff.name in ("update_rejected", "message_rejected"):
                    self._rejected(eff, peer, now)
            elif isinstance(eff, Train) and self.dataset is not None:
                rnd = eff.config.get("server_round") if isinstance(eff.config, Mapping) else None
                fields: dict[str, Any] = {"job": eff.job, **self.dataset}
                if isinstance(rnd, int) and not isinstance(rnd, bool):
                    fields["version"] = rnd - 1
                submit("dataset_used", fields)
            elif isinstance(eff, Log) and eff.text == "secure cohort applied":
                self._cohort(eff, effects)
        if self._pending:
            self._proofs()
        start = self._window_start
        if self._suppressed and start is not None and now - start >= REJECTION_WINDOW_S:
            self._roll_window(now)

    def _received(self, event: Received, effects: Sequence[Effect], now: float) -> None:
        msg = event.msg
        if type(msg) is Update:
            self._update_in(event.peer, msg, effects)
        elif type(msg) is TrainRefused:
            if not self._admit(event.peer, f"refused {_clean(msg.code, 40)}", now):
                return
            self.writer.submit(
                "refusal_received",
                {
                    "from": event.peer,
                    "src": _clean(msg.src, 128),
                    "task": _int_or_none(msg.task),
                    "version": _int_or_none(msg.version),
                    "code": _clean(msg.code, 40),
                    "reason": _clean(msg.reason),
                },
            )
        elif (type(msg) is TrainRequest or type(msg) is ModelBroadcast) and self._models_in.add(
            int(msg.version)
        ):
            weights = msg.weights

            def received() -> dict[str, Any]:
                return {
                    "from": event.peer,
                    "version": int(msg.version),
                    "digest": tensors_digest(weights).hex(),
                    "signer": _clean(msg.signer, 128),
                    "parent": int(msg.parent),
                    "sig": bytes(msg.sig).hex(),
                    "settings": bytes(msg.settings).hex(),
                }

            skipped = {"from": event.peer, "version": int(msg.version), "digest": None}
            self.writer.submit(
                "model_received", received, fallback={**skipped, "digest_skipped": SKIPPED}
            )

    def _update_in(self, peer: str, msg: Update, effects: Sequence[Effect]) -> None:
        acked = False
        record: Mapping[str, Any] | None = None
        for eff in effects:
            if isinstance(eff, Metric) and eff.name == "update_duplicate":
                return  # recorded before: re-acked only
            if isinstance(eff, Send) and type(eff.msg) is Ack:
                acked = acked or (eff.msg.src == msg.src and eff.msg.seq == msg.seq)
            elif isinstance(eff, Persist) and eff.key == APPLIED_KEY:
                data = eff.data
                if (
                    isinstance(data, Mapping)
                    and data.get("src") == msg.src
                    and data.get("seq") == msg.seq
                ):
                    record = data
        if not acked or not self._recorded.add((msg.src, msg.seq)):
            return
        outcome = record.get("outcome") if record is not None else None
        fields: dict[str, Any] = {
            "src": msg.src,
            "seq": int(msg.seq),
            "base_version": int(msg.base_version),
            "n_examples": int(msg.n_examples),
            "count": int(msg.count),
        }
        if record is not None:
            for key in ("version", "tau"):
                value = record.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    fields[key] = value
        if msg.pairs:
            fields["pairs"] = _pairs(msg.pairs)
            fields["pairs_total"] = len(msg.pairs)
        kind = "update_applied" if outcome in (None, "applied") else "update_recorded"
        if kind == "update_recorded":
            fields["outcome"] = _clean(outcome, 40)
        delta = msg.delta
        self.writer.submit(
            kind,
            lambda: {**fields, "digest": tensors_digest(delta).hex()},
            fallback={**fields, "digest": None, "digest_skipped": SKIPPED},
        )

    def _sending(self, eff: Send) -> None:
        msg = eff.msg
        if type(msg) is Update and msg.src == self.node_id:
            if not self._sent.add(("u", msg.seq)):
                return  # a resend of the same update
            fields: dict[str, Any] = {
                "to": eff.peer,
                "seq": int(msg.seq),
                "base_version": int(msg.base_version),
                "n_examples": int(msg.n_examples),
                "count": int(msg.count),
                "task": int(msg.task),
            }
            if msg.pairs:
                fields["pairs"] = _pairs(msg.pairs)
                fields["pairs_total"] = len(msg.pairs)
            delta, spec = msg.delta, self.up
            self.writer.submit(
                "update_sent",
                lambda: {**fields, "digest": digest_as_received(delta, spec).hex()},
                fallback={**fields, "digest": None, "digest_skipped": SKIPPED},
            )
        elif type(msg) is MaskedUpdate and msg.src == self.node_id:
            if not self._sent.add(("m", msg.seq, bytes(msg.cohort))):
                return
            masked = msg
            plain = {
                "to": eff.peer,
                "seq": int(masked.seq),
                "cohort": bytes(masked.cohort).hex(),
                "base_version": int(masked.base_version),
                "n_examples": int(masked.n_examples),
            }
            self.writer.submit(
                "masked_update_sent",
                lambda: {**plain, "digest": masked_digest(masked).hex()},
                fallback={**plain, "digest": None, "digest_skipped": SKIPPED},
            )
        elif type(msg) is TrainRefused and msg.src == self.node_id:
            self.writer.submit(
                "train_refused",
                {
                    "to": eff.peer,
                    "task": int(msg.task),
                    "version": int(msg.version),
                    "code": _clean(msg.code, 40),
                    "reason": _clean(msg.reason),
                },
            )

    def _released(self, version: int) -> None:
        """A new global model version (a root's, or a gossip peer's own)."""
        model = self._model() if self._model is not None else None
        if model is None or int(model[0]) != version or not self._models_out.add(version):
            return
        weights, spec = model[1], self.down

        def released() -> dict[str, Any]:
            return {
                "version": version,
                "digest": tensors_digest(weights).hex(),
                # What the root signs: the weights as its children decode them.
                "signed_digest": digest_as_received(weights, spec).hex(),
            }

        self.writer.submit(
            "model_version",
            released,
            fallback={"version": version, "digest": None, "digest_skipped": SKIPPED},
        )
        if self._proof_of is not None:
            self._pending[version] = None
            while len(self._pending) > _PENDING_PROOFS:
                self._pending.popitem(last=False)

    def _proofs(self) -> None:
        assert self._proof_of is not None
        for version in list(self._pending):
            proof = self._proof_of(version)
            if proof is None:
                continue
            del self._pending[version]
            self.writer.submit(
                "model_signed",
                {
                    "version": int(proof.version),
                    "parent": int(proof.parent),
                    "signer": str(proof.signer),
                    "digest": bytes(proof.digest).hex(),
                    "settings": bytes(proof.settings).hex(),
                    "sig": bytes(proof.sig).hex(),
                },
            )

    def _cohort(self, eff: Log, effects: Sequence[Effect]) -> None:
        info = dict(eff.fields or {})
        acks = [
            [e.msg.src, int(e.msg.seq)]
            for e in effects
            if isinstance(e, Send) and type(e.msg) is Ack
        ]
        fields: dict[str, Any] = {
            k: info[k] for k in ("members", "survivors", "version") if isinstance(info.get(k), int)
        }
        fields["pairs"] = acks[:MAX_PAIRS]
        fields["pairs_total"] = len(acks)
        self.writer.submit("secure_cohort_applied", fields)

    def _rejected(self, eff: Metric, peer: str | None, now: float) -> None:
        reason = _clean((eff.labels or {}).get("reason", ""), 60)
        if not self._admit(peer, reason, now):
            return
        fields: dict[str, Any] = {"metric": eff.name, "reason": reason}
        if peer is not None:
            fields["peer"] = peer
        self.writer.submit("input_rejected", fields)

    def _admit(self, peer: str | None, reason: str, now: float) -> bool:
        """Whether an entry caused by ``peer``'s input is recorded on its own (else it is
        counted for the window's summary)."""
        if self._window_start is None or now - self._window_start >= REJECTION_WINDOW_S:
            self._roll_window(now)
        who = peer if peer is not None else ""
        self._window_n += 1
        self._window_by_peer[who] += 1
        if (
            self._window_by_peer[who] > REJECTIONS_PER_WINDOW
            or self._window_n > PEER_INPUT_PER_WINDOW
        ):
            key = f"{who}: {reason}" if who else reason
            if key in self._suppressed or len(self._suppressed) < 256:
                self._suppressed[key] += 1
            else:
                self._suppressed["other"] += 1
            return False
        return True

    def _roll_window(self, now: float) -> None:
        if self._suppressed:
            self.writer.submit(
                "rejections_summarised",
                {
                    "window_s": REJECTION_WINDOW_S,
                    "count": sum(self._suppressed.values()),
                    "reasons": dict(self._suppressed.most_common(32)),
                },
            )
            self._suppressed = Counter()
        self._window_start, self._window_n = now, 0
        self._window_by_peer = Counter()


def _pairs(pairs: Sequence[Any]) -> list[list[Any]]:
    """A forward's (site, seq) pairs for an entry: the first ``MAX_PAIRS``, ids cleaned."""
    out: list[list[Any]] = []
    for pair in pairs[:MAX_PAIRS]:
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            out.append([_clean(pair[0], 128), _int_or_none(pair[1])])
    return out


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ------------------------------------------------------------------ serve()'s wiring
class DaemonAudit(AuditMiddleware):
    """The middleware ``serve()`` layers around its node, with the daemon's hooks."""

    def on_roster(self, then: Callable[[Any], None]) -> Callable[[Any], None]:
        """A ``RosterKeeper`` ``installed`` callback: ``then(roster)``, and the entry."""

        def installed(roster: Any) -> None:
            then(roster)
            self.roster_installed(roster)

        return installed

    async def close(self, clean: bool = True) -> None:
        """Record the stop and write what is queued (bounded; off the event loop)."""
        if self._pending:
            self._proofs()
        self.stopped(clean=clean)
        await asyncio.to_thread(self.writer.close)


def _root_proofs(e2e: object) -> Callable[[int], Any]:
    """The root's proof (signature) of a version, once the driver has signed it
    (``EndToEnd.own_proof``; read on the event loop)."""
    own_proof = getattr(e2e, "own_proof", None)

    def proof_of(version: int) -> Any:
        return own_proof(version) if callable(own_proof) else None

    return proof_of


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedloom")
    except PackageNotFoundError:
        return "dev"


def open_audit(d: Daemon, peers: Any, report: Callable[[Metric], None]) -> DaemonAudit:
    """The daemon's audit middleware, its writer started and ``daemon_start`` queued.
    ``report``: the metrics sink (called from the writer thread through the loop).
    ``DaemonError`` (exit 65) when the log's last entry is damaged; exit 75 when the disk
    refuses the audit directory."""
    cfg = d.cfg
    log = AuditLog(cfg.state_dir, cfg.node_id, d.identity)
    try:
        log.check()
    except AuditError as exc:
        raise DaemonError(str(exc), exit_code=EXIT_CORRUPT_STATE) from None
    except OSError as exc:
        raise DaemonError(
            f"audit: cannot open the audit log: {describe_os_error(exc, log.path)}",
            exit_code=EXIT_ENVIRONMENT,
        ) from None
    loop = asyncio.get_running_loop()

    def threadsafe(metric: Metric) -> None:
        loop.call_soon_threadsafe(report, metric)

    writer = AuditWriter(log, threadsafe)
    writer.start()
    codecs = getattr(peers, "codecs", None)
    audit = DaemonAudit(
        writer,
        cfg.node_id,
        cfg.role,
        up=getattr(codecs, "up", None),
        down=getattr(codecs, "down", None),
        plan=d.plan,
        model=lambda: model_of(d.node),
        proof_of=_root_proofs(peers.e2e) if cfg.role == "root" else None,
    )
    config_digest = None
    if cfg.source is not None:
        try:
            config_digest = hashlib.sha256(Path(cfg.source).read_bytes()).hexdigest()
        except OSError:
            config_digest = None
    audit.started(
        fedloom=_package_version(),
        config=str(cfg.source) if cfg.source is not None else None,
        config_sha256=config_digest,
        roster_version=d.roster.version,
        roster_digest=d.roster.digest.hex(),
        public_key=base64.b64encode(d.identity.public_key).decode("ascii"),
        pid=os.getpid(),
    )
    held = model_of(d.node) if cfg.role in ("root", "peer") else None
    if held is not None:  # the model it starts from: the first link of the lineage
        audit._released(int(held[0]))
    return audit
