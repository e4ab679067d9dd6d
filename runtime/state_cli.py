"""``fedloom state check|repair STATE_DIR``: inspect a node's state directory, and repair
a damaged write-ahead log by explicit operator action.

``check`` changes nothing: it prints the checkpoint's epoch, the values, the live log's
records per key, and every damaged range (file, byte offsets, torn or corrupt, and what
the damaged frame seems to hold when it still decodes). Exit 0 when ``fedloom run`` would
start, ``EXIT_CORRUPT_STATE`` when it would refuse. On a directory a running daemon holds
it reads again while a checkpoint replaced files during a read (an old checkpoint with
the new log looks corrupt), and gives ``EXIT_IN_USE`` ("no verdict") if every read saw one.

``repair`` drops bytes from the live log, and only when no daemon holds the directory's
lock: ``--truncate-at OFFSET`` (a frame boundary ``check`` printed) drops everything from
there; ``--drop-damaged`` drops only the damaged ranges and keeps every intact frame. The
original file is kept next to it as ``wal.<epoch>.log.<UTC time>.bak`` (a hard link: no
copy), the repaired one replaces it atomically. It prints what was dropped and what that
means for the node (see ``MEANING``): an aggregator's dropped "applied" records were
acknowledged updates, now lost; a site's dropped outbox records are resent or forgotten,
and the parent's ledger turns any resend into a re-ack. For each outbox it dropped records
of, it appends a "floor" record (``_seq_floors``) so the node never numbers a new update
with a seq its parent may have applied. The repaired file keeps the original's owner and
mode (a repair run as root must leave it readable by the service user).

A damaged ``.ckpt`` is not repaired here (it holds the node's whole state): restore it
from a backup, or move the directory aside to start the node afresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from fedloom.federation.config_reader import ConfigError
from fedloom.federation.store import (
    CHECKPOINT_KEY,
    CorruptStateError,
    Damage,
    Frame,
    LogScan,
    StateIOError,
    decode_state,
    encode_state,
    io_errors,
    read_value,
    scan_log,
    wal_logs,
)
from fedloom.runtime.exit_status import EXIT_CORRUPT_STATE, EXIT_ENVIRONMENT, EXIT_IN_USE, EXIT_OK

__all__ = ["MEANING", "cmd_state_check", "cmd_state_repair"]


_CHECKPOINT_FILE = f"{CHECKPOINT_KEY}.ckpt"  # the store's name for it (no "/" to quote)
_HEADER = struct.Struct("<4sQI")
_U32 = struct.Struct("<I")
_COPY_CHUNK = 1 << 20
# `check` on a running daemon: reads until one sees no checkpoint happen, and the pause.
_LIVE_TRIES = 20
_LIVE_PAUSE_S = 0.1
OUTBOX_KEYS = ("site/pending", "region/pending")
# Fewer bytes than any outbox record takes in a frame (an "add" carries a whole Update):
# a damaged range that does not decode held at most its size / this many records.
_MIN_OUTBOX_RECORD = 32

# What dropping a record of each log key means (op "add"/"ack" for outboxes).
MEANING: dict[tuple[str, str], str] = {
    ("privacy", ""): (
        "nothing is lost: a root rebuilds its privacy ledger by replaying 'applied' (these "
        "copies are for `fedloom privacy`, which shows the releases again from the next "
        "checkpoint on)"
    ),
    ("applied", ""): (
        "acknowledged updates this aggregator had applied are LOST: their senders were "
        "acked and will not send them again (unless the ack never reached them), and the "
        "model will not include them"
    ),
    ("site/pending", "add"): (
        "the site forgets these updates and never resends them; if its parent had not "
        "applied them, their training work is lost (nothing acknowledged is). The repair "
        "writes a seq floor so new updates do not reuse these seqs (a parent that applied "
        "the old ones would ack the new ones as duplicates without applying them)"
    ),
    ("site/pending", "ack"): (
        "the site resends these updates; its parent's ledger recognises them and acks them "
        "again without applying them twice"
    ),
    ("region/pending", "add"): (
        "the region forgets these forwards: if the root had not applied them, the site "
        "updates they carried, which this region acknowledged, are LOST"
    ),
    ("region/pending", "ack"): (
        "the region resends these forwards; the root's ledger recognises them and acks them "
        "again without applying them twice"
    ),
    ("site/pending", "floor"): (
        "the site may number new updates with seqs at or below this floor again (see 'add' above)"
    ),
    ("region/pending", "floor"): (
        "the region may number new forwards with seqs at or below this floor again, and "
        "the root acks them as duplicates without applying them: their site updates are LOST"
    ),
    ("site/held", "keep"): (
        "the site stops keeping these acknowledged updates until they are settled: if its "
        "region dies before forwarding them and the standby takes over, they never reach "
        "the root (LOST). Its outbox's add records for them must survive too, or the site "
        "refuses to start ('a kept update ... that the outbox never held')"
    ),
    ("site/held", "settle"): (
        "the site keeps these already-settled updates and resends them after a reconnect "
        "or failover; the region answers Incorporated again and the root's pair ledger "
        "refuses a second count"
    ),
    ("region/forwards", "settle"): (
        "the region treats these forwards as unsettled again: it keeps their parts and its "
        "sites keep their updates until the parent settles them anew (a resend is re-acked, "
        "not counted twice); nothing is lost"
    ),
    ("gossip_in", ""): (
        "the push-sum shares this peer took in are LOST: the network's mass (x, w) shrinks "
        "by them, as for a share lost on a link; the peers' average drifts slightly, "
        "nothing else"
    ),
}


@dataclass(slots=True)
class _State:
    """What ``check`` found."""

    directory: Path
    epoch: int
    checkpoint: Path | None
    values: list[str]
    bad_values: list[CorruptStateError]
    live: LogScan | None
    other_logs: dict[int, Path]


# ------------------------------------------------------------------------ reading


def _require_dir(directory: Path) -> None:
    """A missing STATE_DIR, or a file given as one, is a mistake on the command line."""
    if directory.is_dir():
        return
    if directory.exists():
        raise ConfigError(f"{directory}: not a directory (give the node's state_dir)")
    raise ConfigError(f"{directory}: no such state directory")


def _inspect(directory: Path) -> _State:
    _require_dir(directory)
    epoch, checkpoint = 0, None
    values: list[str] = []
    bad: list[CorruptStateError] = []
    for path in sorted(directory.glob("*.ckpt")):
        try:
            key, _, value_epoch = read_value(path)
        except CorruptStateError as exc:
            bad.append(exc)
            continue
        if key == CHECKPOINT_KEY:
            epoch, checkpoint = value_epoch, path
        else:
            values.append(key)
    logs = wal_logs(directory)
    if checkpoint is None and any(b.path == directory / _CHECKPOINT_FILE for b in bad):
        epoch = max(logs, default=0)  # a damaged checkpoint: show the newest log as the live one
    live_path = logs.pop(epoch, None)
    live = scan_log(live_path) if live_path is not None else None
    return _State(directory, epoch, checkpoint, values, bad, live, logs)


def _files(directory: Path) -> tuple[Any, ...]:
    """What a checkpoint of a running daemon changes: the checkpoint file's identity and
    the set of logs (appends to the live log do not matter: a scan reads a prefix)."""
    try:
        st = (directory / _CHECKPOINT_FILE).stat()
        ckpt: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        ckpt = None
    return ckpt, tuple(sorted(wal_logs(directory).items()))


def _inspect_live(directory: Path) -> _State | None:
    """``_inspect`` a directory a daemon is writing: read until no checkpoint happened
    during a read (one that did can pair an old checkpoint with a new log, or lose a log
    mid-read: false verdicts); None if none of ``_LIVE_TRIES`` reads was undisturbed."""
    for attempt in range(_LIVE_TRIES):
        if attempt:
            time.sleep(_LIVE_PAUSE_S)
        before = _files(directory)
        try:
            state = _inspect(directory)
        except StateIOError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
            continue  # a superseded log deleted under us
        if _files(directory) == before:
            return state
    return None


def _lock_held(directory: Path) -> bool:
    """Whether a process (a running daemon) holds the directory's lock; changes nothing."""
    try:
        with io_errors("read", directory / "lock"):
            fd = os.open(directory / "lock", os.O_RDONLY)
    except StateIOError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return False
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases a lock taken here
    return False


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold the directory's lock (as a daemon does) or refuse: never repair under a daemon."""
    with io_errors("lock", directory / "lock"):
        existed = (directory / "lock").exists()
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        if not existed:  # made by root here: the service user must still open it
            owner = os.stat(directory)
            with contextlib.suppress(OSError):
                os.fchown(fd, owner.st_uid, owner.st_gid)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{directory}: a running daemon holds this state directory's lock; stop it "
                "first (systemctl stop ...), then repair"
            ) from None
        yield
    finally:
        os.close(fd)


def _records(tree: Any) -> Counter[str]:
    return Counter(key for key, _ in tree)


def _what(key: str, record: Any) -> tuple[str, str]:
    """(op, label) of one record, e.g. ("add", "seq 7") or ("", "site-1 seq 4")."""
    if not isinstance(record, dict):
        return "", ""
    op = str(record.get("op", ""))
    if key == "applied":
        return "", f"{record.get('src')} seq {record.get('seq')} ({record.get('outcome')})"
    if key == "gossip_in":
        return "", f"from {record.get('peer')}"
    if "seq" in record:
        return op, f"seq {record['seq']}"
    return op, ""


def _unverified(path: Path, damage: Damage) -> list[Any] | None:
    """The records a damaged frame seems to hold when it still decodes (None: unknown)."""
    try:
        with path.open("rb") as f:
            f.seek(damage.offset)
            raw = f.read(min(damage.end - damage.offset, 1 << 30))
        _, length, _ = _HEADER.unpack_from(raw)
        body = raw[_HEADER.size : _HEADER.size + length]
        (head_len,) = _U32.unpack_from(body)
        tree = decode_state(body[4 : 4 + head_len], body[4 + head_len :])
    except Exception:  # it is damaged: any failure means "unknown"
        return None
    if not isinstance(tree, list) or not all(isinstance(kr, list) and len(kr) == 2 for kr in tree):
        return None
    return tree


# ------------------------------------------------------------------------- output


def _describe_records(
    pairs: list[tuple[str, Any]], out: TextIO, indent: str, *, meaning: bool
) -> None:
    groups: dict[tuple[str, str], list[str]] = {}
    for key, record in pairs:
        op, label = _what(key, record)
        groups.setdefault((key, op), []).append(label)
    for (key, op), labels in groups.items():
        shown = ", ".join(lbl for lbl in labels[:8] if lbl)
        more = f", ... ({len(labels) - 8} more)" if len(labels) > 8 else ""
        kind = f" {op}" if op else ""
        out.write(f"{indent}{len(labels)} {key!r}{kind} record(s){': ' if shown else ''}")
        out.write(f"{shown}{more}\n")
        if meaning:
            text = MEANING.get((key, op)) or MEANING.get((key, ""))
            out.write(f"{indent}  -> {text or 'no known meaning for this key'}\n")


def _role_hint(keys: set[str]) -> str:
    if "applied" in keys:
        return (
            "this is an aggregator's log: a damaged frame may hold acknowledged updates, "
            "which repairing it loses"
        )
    if "site/pending" in keys:
        return "this is a site's log: a damaged frame holds outbox records (see repair)"
    return "its contents are unknown"


def _print_damage(state: _State, out: TextIO) -> None:
    assert state.live is not None
    for d in state.live.damage:
        kind = "torn tail (never acknowledged)" if d.torn else "CORRUPT"
        out.write(f"  {d.path.name} bytes {d.offset}..{d.end}: {kind}: {d.reason}\n")
        if d.torn:
            continue
        tree = _unverified(d.path, d)
        if tree is None:
            keys = {k for fr in state.live.frames for k in _records(fr.tree)}
            out.write(f"    does not decode; {_role_hint(keys)}\n")
        else:
            out.write("    seems to hold (unverified):\n")
            _describe_records([(k, r) for k, r in tree], out, "      ", meaning=False)


def cmd_state_check(directory: Path, *, out: TextIO | None = None) -> int:
    """Print what the state directory holds and any damage; exit 0 if a daemon would start."""
    out = out or sys.stdout
    _require_dir(directory)  # before the lock file is opened: a file there is no disk fault
    try:
        held = _lock_held(directory)
        state = _inspect(directory) if not held else _inspect_live(directory)
        audit_damage = _audit_damage(directory)
    except StateIOError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    if state is None:
        out.write(
            f"state directory: {directory}\n  in use: a running daemon holds its lock and "
            f"replaced its checkpoint or logs during each of {_LIVE_TRIES} reads\n"
            "verdict: NO VERDICT (in use; stop the daemon or try again)\n"
        )
        return EXIT_IN_USE
    out.write(f"state directory: {directory}\n")
    if held:
        out.write("  in use: a running daemon holds its lock (a tail may be mid-write)\n")
    if state.checkpoint is not None:
        size = state.checkpoint.stat().st_size
        out.write(f"checkpoint: epoch {state.epoch} ({state.checkpoint.name}, {size} bytes)\n")
    elif (directory / _CHECKPOINT_FILE).exists():
        out.write(f"checkpoint: DAMAGED ({_CHECKPOINT_FILE}, see below)\n")
    else:
        out.write("checkpoint: none (the log holds every record since the first start)\n")
    out.write(f"values: {', '.join(state.values) or 'none'}\n")
    corrupt = bool(state.bad_values)
    for bad in state.bad_values:
        out.write(f"  CORRUPT value: {bad}\n")
    live = state.live
    if live is None:
        out.write(f"live log: none (wal.{state.epoch:010d}.log: no records since the checkpoint)\n")
    else:
        counts: Counter[str] = Counter()
        for fr in live.frames:
            counts.update(_records(fr.tree))
        per_key = ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) or "none"
        out.write(f"live log: {live.path.name}, {live.size} bytes, {len(live.frames)} frames\n")
        out.write(f"  records per key: {per_key}\n")
        if live.damage:
            out.write("damage:\n")
            _print_damage(state, out)
            boundaries = sorted({fr.start for fr in live.frames} | {d.offset for d in live.damage})
            out.write(f"  frame boundaries (for --truncate-at): {_short(boundaries)}\n")
        corrupt = corrupt or bool(live.corruption)
    for e, path in sorted(state.other_logs.items()):
        if e < state.epoch:
            out.write(f"superseded log: {path.name} (ignored; deleted at the next start)\n")
        else:
            corrupt = True
            out.write(
                f"  CORRUPT: {path.name} is newer than the checkpoint (epoch {state.epoch}): "
                "the checkpoint file is missing or older than its log\n"
            )
    if audit_damage is not None:
        corrupt = True
        out.write(f"  CORRUPT audit log: {audit_damage} (then move the log aside)\n")
    if corrupt:
        out.write(
            "verdict: CORRUPT: `fedloom run` refuses to start; see `fedloom state repair "
            "--help` (a log can be repaired, a checkpoint must be restored from a backup)\n"
        )
        return EXIT_CORRUPT_STATE
    torn = live is not None and live.good_end < live.size
    out.write(
        "verdict: OK"
        + (" (a torn tail, never acknowledged, is dropped at the next start)" if torn else "")
        + "\n"
    )
    return EXIT_OK


def _audit_damage(directory: Path) -> str | None:
    """Why `run` would refuse the audit log (its damaged last entry, exit 65), or None."""
    from fedloom.runtime.audit import AuditError, audit_dir, check_tail

    try:
        with io_errors("read", audit_dir(directory)):
            check_tail(directory)
    except AuditError as exc:
        return str(exc)
    return None


def _short(offsets: list[int]) -> str:
    if len(offsets) <= 12:
        return ", ".join(map(str, offsets))
    return ", ".join(map(str, offsets[:4])) + ", ..., " + ", ".join(map(str, offsets[-6:]))


# ------------------------------------------------------------------------- repair


def cmd_state_repair(
    directory: Path,
    *,
    truncate_at: int | None = None,
    drop_damaged: bool = False,
    out: TextIO | None = None,
) -> int:
    """Drop damaged bytes from the live log (see the module docstring); keep a backup."""
    out = out or sys.stdout
    if (truncate_at is None) == (not drop_damaged):
        raise ConfigError("state repair: give exactly one of --truncate-at OFFSET, --drop-damaged")
    _require_dir(directory)  # as `check` says it (exit 2), before the lock file is made
    if not any(directory.glob("wal.*.log")) and not any(directory.glob("*.ckpt")):
        # A mistyped STATE_DIR: refuse before the lock file would be left behind in it.
        raise ConfigError(
            f"{directory}: not a state directory (no checkpoint, no write-ahead log): "
            "nothing to repair"
        )
    try:
        with _exclusive(directory):
            return _repair(directory, truncate_at, out)
    except StateIOError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT


def _repair(directory: Path, truncate_at: int | None, out: TextIO) -> int:
    state = _inspect(directory)
    live = state.live
    if state.bad_values:
        raise ConfigError(
            f"{state.bad_values[0]}: a damaged value or checkpoint is not repaired here; "
            "restore it from a backup"
        )
    if live is None:
        raise ConfigError(f"{directory}: no live log (wal.{state.epoch:010d}.log) to repair")
    keep: list[tuple[int, int]]  # byte ranges of the live log to keep, in order
    if truncate_at is not None:
        boundaries = {fr.start for fr in live.frames} | {d.offset for d in live.damage}
        boundaries.add(live.size)
        if truncate_at not in boundaries:
            raise ConfigError(
                f"--truncate-at {truncate_at}: not a frame boundary of {live.path.name} "
                f"(boundaries: {_short(sorted(boundaries))})"
            )
        keep = [(0, truncate_at)]
        dropped = [fr for fr in live.frames if fr.start >= truncate_at]
        damaged = [d for d in live.damage if d.offset >= truncate_at]
    else:
        keep = [(fr.start, fr.end) for fr in live.frames]
        dropped, damaged = [], list(live.damage)
    removed = live.size - sum(b - a for a, b in keep)
    if removed == 0:
        out.write(f"{live.path.name}: nothing to drop\n")
        return EXIT_OK
    seemed = {d.offset: None if d.torn else _unverified(live.path, d) for d in damaged}
    floors = _seq_floors(
        live,
        seemed,
        [d for d in damaged if not d.torn],
        dropped,
        _checkpoint_outbox(state.checkpoint),
    )
    tail = b"".join(
        bytes(part)
        for part in encode_state([[key, {"op": "floor", "seq": seq}] for key, seq in floors])
    )
    backup = live.path.with_name(
        f"{live.path.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.bak"
    )
    _rewrite(live.path, keep, backup, tail if floors else b"")
    out.write(f"{live.path.name}: dropped {removed} bytes; the original is kept as {backup}\n")
    for key, seq in floors:
        out.write(
            f"  {key!r}: the node numbers its next update above {seq} (a 'floor' record "
            "appended to the log), so it reuses no seq its parent may have applied\n"
        )
    for d in damaged:
        kind = "torn tail" if d.torn else "damaged frame"
        out.write(f"  {kind} at bytes {d.offset}..{d.end} ({d.reason})\n")
        tree = seemed[d.offset]
        if tree is not None:
            out.write("    it seemed to hold (unverified):\n")
            _describe_records([(k, r) for k, r in tree], out, "      ", meaning=True)
        elif not d.torn:
            keys = {k for fr in live.frames for k in _records(fr.tree)}
            out.write(f"    it does not decode; {_role_hint(keys)}\n")
    if dropped:
        out.write(f"  {len(dropped)} intact frame(s) after offset {truncate_at}, holding:\n")
        pairs = [(k, r) for fr in dropped for k, r in fr.tree]
        _describe_records(pairs, out, "    ", meaning=True)
    out.write("the next `fedloom run` starts from what is left\n")
    return EXIT_OK


def _checkpoint_outbox(checkpoint: Path | None) -> tuple[str, int] | None:
    """(outbox key, seq counter) of a site's or region's checkpoint (None: no outbox)."""
    if checkpoint is None:
        return None
    try:
        _, data, _ = read_value(checkpoint)
        box = data["outbox"]
        key = "region/pending" if data.get("kind") == "regional" else "site/pending"
        return key, int(box["seq"])
    except (CorruptStateError, KeyError, TypeError, ValueError, AttributeError):
        return None


def _seq_floors(
    live: LogScan,
    seemed: dict[int, list[Any] | None],
    corrupt: list[Damage],
    dropped: list[Frame],
    checkpoint: tuple[str, int] | None = None,
) -> list[tuple[str, int]]:
    """The seq each outbox of the log must number above once ``corrupt`` ranges and
    ``dropped`` frames are gone: the highest seq any record of its key mentions (kept,
    dropped, or in a damaged frame that still decodes), plus, for damaged bytes that do not
    decode, one seq per ``_MIN_OUTBOX_RECORD`` bytes (no more records than that fit). A
    skipped seq costs the parent's ledger one out-of-order entry until it jumps the gap
    (``algorithms.ledger``); a reused one loses the next update. ``checkpoint``: the
    checkpoint's outbox (key, seq), the floor's base when no record of the log names it.
    Nothing dropped: none."""
    if not corrupt and not dropped:
        return []
    highest: dict[str, int] = dict([checkpoint]) if checkpoint is not None else {}
    trees = [fr.tree for fr in live.frames] + [t for t in seemed.values() if t is not None]
    for tree in trees:
        for key, record in tree:
            if key in OUTBOX_KEYS and isinstance(record, dict) and "seq" in record:
                with contextlib.suppress(TypeError, ValueError):
                    highest[key] = max(highest.get(key, 0), int(record["seq"]))
    unknown = sum(d.end - d.offset for d in corrupt if seemed.get(d.offset) is None)
    margin = -(-unknown // _MIN_OUTBOX_RECORD)
    return [(key, seq + margin) for key, seq in sorted(highest.items())]


def _rewrite(path: Path, keep: list[tuple[int, int]], backup: Path, tail: bytes = b"") -> None:
    """Keep ``path``'s inode as ``backup`` and atomically put the kept ranges, then
    ``tail`` (whole frames), in its place, with the original's owner and mode."""
    tmp = path.with_name(path.name + ".repair.tmp")  # a leftover is deleted by load()
    with io_errors("keep a backup as", backup):
        os.link(path, backup)
        _fsync_dir(path.parent)
    with io_errors("write", tmp), path.open("rb") as src, tmp.open("wb") as dst:
        for start, end in keep:
            src.seek(start)
            left = end - start
            while left > 0:
                chunk = src.read(min(_COPY_CHUNK, left))
                if not chunk:
                    raise OSError(5, f"{path} shrank while being repaired")
                dst.write(chunk)
                left -= len(chunk)
        dst.write(tail)
        dst.flush()
        # Run as root, the repair must not leave a file the service user cannot open.
        st = os.fstat(src.fileno())
        os.fchown(dst.fileno(), st.st_uid, st.st_gid)
        os.fchmod(dst.fileno(), stat.S_IMODE(st.st_mode))
        os.fsync(dst.fileno())
    with io_errors("replace", path):
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
