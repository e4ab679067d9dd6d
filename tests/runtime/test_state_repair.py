"""`fedloom state repair` and `check` (issue 13 review): a repaired outbox never reuses a
seq its parent may have applied, the repaired file keeps its owner and mode, a missing
directory is a usage error for both, every log key has a meaning, and `check` on a running
daemon that checkpoints gives no false verdict."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedloom.algorithms.outbox import Outbox
from fedloom.algorithms.protocol import Persist
from fedloom.federation import store as store_mod
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.store import StateStore, scan_log
from fedloom.runtime import state_cli
from fedloom.runtime.audit import AuditLog
from fedloom.runtime.exit_status import EXIT_CORRUPT_STATE, EXIT_IN_USE, EXIT_OK
from fedloom.runtime.state_cli import MEANING, cmd_state_check, cmd_state_repair
from fedloom.transport.identity import Identity
from fedloom.transport.wire import Update

KEY = "site/pending"


def _site_log(directory: Path, records: list[dict[str, object]]) -> Path:
    with StateStore(directory) as store:
        store.load()
        store.apply(Persist("checkpoint", {"v": 1}))
        for rec in records:
            store.apply(Persist(KEY, rec, append=True))
    (path,) = directory.glob("wal.*.log")
    return path


def _add(seq: int) -> dict[str, object]:
    update = Update("site-1", seq, 0, {"w": np.full(16, seq, np.float32)}, 5)
    return {"op": "add", "seq": seq, "update": update}


def _seq_after_restart(directory: Path) -> tuple[int, list[int]]:
    with StateStore(directory) as store:
        rec = store.load()
    box = Outbox(KEY)
    box.restore({"seq": 0, "pending": []}, rec.records(KEY))
    return box.seq, [u.seq for u in box.pending()]


def _damage(path: Path, frame: int, *, header: bool = False) -> tuple[int, int]:
    frames = scan_log(path).frames
    start, end = frames[frame].start, frames[frame].end
    data = bytearray(path.read_bytes())
    data[start + 20 if header else (start + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return start, end


def test_dropping_an_add_whose_ack_survived_does_not_reuse_its_seq(tmp_path: Path) -> None:
    """The review's case: bit rot in update 3's frame, its ack after it."""
    path = _site_log(tmp_path, [_add(1), _add(2), _add(3), {"op": "ack", "seq": 3}])
    _damage(path, 2)
    out = io.StringIO()
    assert cmd_state_repair(tmp_path, drop_damaged=True, out=out) == EXIT_OK
    assert _seq_after_restart(tmp_path) == (3, [1, 2])  # the next update is 4


def test_a_frame_that_does_not_decode_raises_the_floor_by_a_margin(tmp_path: Path) -> None:
    """The damaged frame (update 4, its ack lost with it) cannot say which seq it held:
    the floor skips as many seqs as records its bytes could hold."""
    path = _site_log(tmp_path, [_add(1), _add(2), _add(3), _add(4)])
    start, end = _damage(path, 3, header=True)  # the head: nothing in it decodes
    out = io.StringIO()
    assert cmd_state_repair(tmp_path, drop_damaged=True, out=out) == EXIT_OK
    seq, pending = _seq_after_restart(tmp_path)
    assert pending == [1, 2, 3] and seq >= 4 and seq == 3 + -(-(end - start) // 32)
    assert f"numbers its next update above {seq}" in out.getvalue()


def test_truncating_intact_frames_keeps_their_seqs_used(tmp_path: Path) -> None:
    path = _site_log(tmp_path, [_add(1), _add(2), _add(3)])
    second = scan_log(path).frames[1].start
    assert cmd_state_repair(tmp_path, truncate_at=second, out=io.StringIO()) == EXIT_OK
    assert _seq_after_restart(tmp_path) == (3, [1])


def test_a_torn_tail_alone_writes_no_floor(tmp_path: Path) -> None:
    path = _site_log(tmp_path, [_add(1)])
    intact = path.read_bytes()
    with path.open("ab") as f:
        f.write(intact[:30])
    assert cmd_state_repair(tmp_path, drop_damaged=True, out=io.StringIO()) == EXIT_OK
    assert path.read_bytes() == intact


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_repair_as_root_keeps_the_service_users_owner_and_mode(tmp_path: Path) -> None:
    uid = gid = 61234
    path = _site_log(tmp_path, [_add(1), _add(2), {"op": "ack", "seq": 2}])
    for p in (tmp_path, *tmp_path.iterdir()):
        os.chown(p, uid, gid)
    os.chmod(path, 0o640)
    _damage(path, 1)
    old = os.umask(0o077)
    try:
        assert cmd_state_repair(tmp_path, drop_damaged=True, out=io.StringIO()) == EXIT_OK
    finally:
        os.umask(old)
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o640)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_lock_file_repair_creates_belongs_to_the_directorys_owner(tmp_path: Path) -> None:
    path = _site_log(tmp_path, [_add(1), _add(2)])
    (tmp_path / "lock").unlink()
    os.chown(tmp_path, 61234, 61234)
    _damage(path, 1)
    assert cmd_state_repair(tmp_path, drop_damaged=True, out=io.StringIO()) == EXIT_OK
    assert (tmp_path / "lock").stat().st_uid == 61234


def test_a_missing_directory_is_a_usage_error_for_check_and_repair(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="no such state directory"):
        cmd_state_check(missing, out=io.StringIO())
    with pytest.raises(ConfigError, match="no such state directory"):
        cmd_state_repair(missing, drop_damaged=True, out=io.StringIO())
    assert not missing.exists()


def test_a_file_is_a_usage_error_for_check_and_repair(tmp_path: Path) -> None:
    """A file given as STATE_DIR (a config, a log) is a mistake on the command line (exit
    2), not a disk that cannot be read (75): the line says it is not a directory."""
    path = tmp_path / "site.toml"
    path.write_text("role = 'site'\n")
    with pytest.raises(ConfigError, match=r"site\.toml: not a directory"):
        cmd_state_check(path, out=io.StringIO())
    with pytest.raises(ConfigError, match=r"site\.toml: not a directory"):
        cmd_state_repair(path, drop_damaged=True, out=io.StringIO())


def test_repair_of_a_directory_without_state_leaves_nothing_behind(tmp_path: Path) -> None:
    """A mistyped STATE_DIR (the config directory) is refused before a lock file is made
    there: the refused repair changes nothing."""
    (tmp_path / "site.toml").write_text("role = 'site'\n")
    with pytest.raises(ConfigError, match="not a state directory"):
        cmd_state_repair(tmp_path, drop_damaged=True, out=io.StringIO())
    assert [p.name for p in tmp_path.iterdir()] == ["site.toml"]


def test_check_refuses_what_run_refuses_a_damaged_audit_log(tmp_path: Path) -> None:
    """`run` stops with exit 65 on an audit log whose last complete line is not an entry
    (a crash cannot leave one); `check` said "verdict: OK" (exit 0) about the same
    directory, though it is documented to exit 65 whenever `run` would refuse."""
    _site_log(tmp_path, [_add(1)])
    AuditLog(tmp_path, "site-1", Identity.generate("site-1", "site")).append(
        [("daemon_start", {"role": "site"})]
    )
    out = io.StringIO()
    assert cmd_state_check(tmp_path, out=out) == EXIT_OK, out.getvalue()
    with (tmp_path / "audit" / "audit.jsonl").open("ab") as f:
        f.write(b'{"seq": 2, "edited": true}\n')
    out = io.StringIO()
    assert cmd_state_check(tmp_path, out=out) == EXIT_CORRUPT_STATE, out.getvalue()
    assert "audit.jsonl: the last complete entry" in out.getvalue()
    assert "fedloom audit verify" in out.getvalue()


@pytest.mark.parametrize(
    ("key", "op"),
    [
        ("site/held", "keep"),
        ("site/held", "settle"),
        ("region/forwards", "settle"),
        ("gossip_in", ""),
        ("site/pending", "floor"),
        ("region/pending", "floor"),
    ],
)
def test_every_log_key_says_what_dropping_it_loses(key: str, op: str) -> None:
    assert len(MEANING[(key, op)]) > 40


@pytest.mark.parametrize("checkpoints", [1, 3, 1000])
def test_check_while_a_daemon_checkpoints_gives_no_false_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoints: int
) -> None:
    """The daemon (holding the lock) checkpoints right after `check` read the checkpoint,
    during the first ``checkpoints`` reads: the new log then looks newer than the old
    checkpoint (a false CORRUPT before). Reads that saw a checkpoint are retried; if every
    read does, the verdict is 'in use', never CORRUPT."""
    store = StateStore(tmp_path)
    store.load()
    store.apply(Persist("checkpoint", {"v": 0}))
    store.apply(Persist(KEY, _add(1), append=True))
    left = [checkpoints]
    real = store_mod.read_value

    def read_then_checkpoint(path: Path) -> tuple[str, object, int]:
        value = real(path)
        if path.name == "checkpoint.ckpt" and left[0] > 0:
            left[0] -= 1
            store.apply(Persist("checkpoint", {"v": left[0]}))
            store.apply(Persist(KEY, {"op": "ack", "seq": 1}, append=True))
        return value

    monkeypatch.setattr(state_cli, "read_value", read_then_checkpoint)
    monkeypatch.setattr(state_cli, "_LIVE_PAUSE_S", 0.0)
    out = io.StringIO()
    try:
        rc = cmd_state_check(tmp_path, out=out)
    finally:
        store.close()
    if checkpoints < state_cli._LIVE_TRIES:
        assert rc == EXIT_OK and "verdict: OK" in out.getvalue(), out.getvalue()
    else:
        assert rc == EXIT_IN_USE and "NO VERDICT" in out.getvalue(), out.getvalue()


def test_check_without_a_daemon_still_finds_corruption(tmp_path: Path) -> None:
    path = _site_log(tmp_path, [_add(1), _add(2)])
    _damage(path, 0)
    assert cmd_state_check(tmp_path, out=io.StringIO()) == EXIT_CORRUPT_STATE


def test_a_log_whose_only_outbox_frame_does_not_decode_floors_on_the_checkpoint(
    tmp_path: Path,
) -> None:
    """No record left names the outbox: the checkpoint's seq counter is the floor's base."""
    with StateStore(tmp_path) as store:
        store.load()
        store.apply(Persist("checkpoint", {"outbox": {"seq": 5, "pending": []}, "model": None}))
        store.apply(Persist(KEY, _add(6), append=True))
    (path,) = tmp_path.glob("wal.*.log")
    start, end = _damage(path, 0, header=True)
    out = io.StringIO()
    assert cmd_state_repair(tmp_path, drop_damaged=True, out=out) == EXIT_OK
    floor = 5 + -(-(end - start) // 32)
    assert f"{KEY!r}: the node numbers its next update above {floor}" in out.getvalue()
    with StateStore(tmp_path) as store:
        rec = store.load()
    assert isinstance(rec.checkpoint, dict)
    box = Outbox(KEY)
    box.restore(rec.checkpoint["outbox"], rec.records(KEY))
    assert box.seq == floor > 6
