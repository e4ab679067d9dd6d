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

``record(state_dir, kind, **fields)`` is the commands' entry point; ``verify_log`` and
``read_entries`` read; ``AuditMiddleware`` is the daemon's (``serve()`` layers it around the
node).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedloom.federation.config_reader import ConfigError
from fedloom.transport.identity import Identity, verify_signature, write_atomic

__all__ = [
    "AUDIT_DIR",
    "GENESIS",
    "HEAD_FILE",
    "LOG_FILE",
    "AuditError",
    "AuditLog",
    "Problem",
    "Verdict",
    "canonical",
    "entry_hash",
    "read_entries",
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
            return _Tail(entry["seq"], entry["hash"], entry["node"], newline_only=True)
        tail.torn = (offset, line)
        end = offset
        if end == 0:
            return tail
    offset, line = _read_back(fd, end - 1)
    entry = parse_entry(line)
    if entry is None or not _valid(entry):
        raise AuditError(
            f"{path}: the last complete entry (byte {offset}) is damaged, which a crash "
            "cannot do: not appending; run `fedloom audit verify`"
        )
    tail.seq, tail.hash, tail.node = entry["seq"], entry["hash"], entry["node"]
    return tail


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


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

    def _ensure_folder(self) -> None:
        try:
            self.folder.mkdir(mode=0o700, exist_ok=False)
        except FileExistsError:
            return
        _fsync_dir(self.folder.parent)

    def check(self) -> None:
        """``AuditError`` if the log's tail is damaged (a daemon checks this at start)."""
        self._ensure_folder()
        with _locked(self.folder):
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o600)
            try:
                _read_tail(fd, self.path)
            finally:
                os.close(fd)

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
        with _locked(self.folder):
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                rfd = os.open(self.path, os.O_RDONLY)
                try:
                    tail = _read_tail(rfd, self.path)
                finally:
                    os.close(rfd)
                if created:
                    _fsync_dir(self.folder)
                node = self.node or tail.node or "local"
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
                self._fsync(fd)
            finally:
                os.close(fd)
            if self.identity is not None:
                self._sign_head(seq, prev, node)
        return entries

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
            f"{log.path}: cannot append to the audit log ({exc.strerror or exc})"
        ) from None


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

    @property
    def intact(self) -> bool:
        return self.problem is None


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


def _seals(line: _Line, nxt: _Line | None) -> bool:
    """True when ``nxt`` is the ``torn_tail`` entry that seals the torn ``line``."""
    if nxt is None or nxt.entry is None or nxt.entry["kind"] != "torn_tail":
        return False
    f = nxt.entry["fields"]
    return bool(
        f.get("offset") == line.offset
        and f.get("bytes") == len(line.raw)
        and f.get("sha256") == hashlib.sha256(line.raw).hexdigest()
    )


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
        verdict.notes.append(
            f"entries after seq {head['seq']} ({last - head['seq']}) are chained but not yet "
            "covered by the signed head (written by a command since the daemon's last batch, "
            "or the daemon stopped before signing)"
        )


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
            if _seals(line, nxt):
                verdict.notes.append(
                    f"line {line.number}: a line torn by a crash ({len(line.raw)} bytes), "
                    f"sealed by the torn_tail entry on line {line.number + 1}"
                )
                i += 1
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
