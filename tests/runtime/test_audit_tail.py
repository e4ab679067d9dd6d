"""Entries after the signed head (``runtime.audit``, ``fedloom audit``): a forger who
appends to the log (chained by hand, no key) is named by ``audit verify`` with the key,
and the daemon's writer records an ``audit_foreign_entries`` entry before it signs over
it; a command's entries written through the lock are signed over quietly, and a command
that can read the node's key signs the head itself. ``audit export --out`` never replaces
the live log. A command run as root leaves what it created to the state directory's
owner, and a daemon that cannot write ``audit/lock`` names the file and its owner."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedloom.runtime.audit import AuditLog, canonical, entry_hash, record, verify_log
from fedloom.runtime.exit_status import EXIT_CONFIG, EXIT_CORRUPT_STATE, EXIT_OK
from fedloom.transport.identity import Identity, key_text
from tests.runtime.test_datasets_cli import CSV, run, site_config


def forge(state: Path, kind: str = "plan_approved") -> int:
    """Append an entry chained by hand onto the last one, as someone without the key and
    without the lock would; its seq."""
    path = state / "audit" / "audit.jsonl"
    last = json.loads(path.read_bytes().splitlines()[-1])
    e = {
        "seq": last["seq"] + 1,
        "ts": last["ts"] + 1,
        "node": "site-1",
        "kind": kind,
        "fields": {"digest": "sha256:" + "ab" * 32, "note": "approved by the DPO"},
        "prev": last["hash"],
    }
    e["hash"] = entry_hash(e)
    with open(path, "ab") as f:
        f.write(canonical(e) + b"\n")
    return int(e["seq"])


def kinds(state: Path, key: bytes) -> list[str]:
    return [e["kind"] for e in verify_log(state, key).entries]


def test_a_forged_entry_after_the_head_is_named_and_not_signed_over_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ident = Identity.generate("site-1", "site")
    daemon = AuditLog(tmp_path, "site-1", ident)
    daemon.append([("daemon_start", {"role": "site"}), ("dataset_used", {"job": 1})])
    seq = forge(tmp_path)
    key = key_text(ident.public_key)
    rc, out, _ = run(capsys, "audit", "verify", str(tmp_path), "--public-key", key)
    assert rc == EXIT_CORRUPT_STATE, out
    assert f"NOT COVERED: seq {seq} (1 entry) after the signed head (seq 2)" in out
    rc, out, _ = run(capsys, "audit", "export", str(tmp_path), "--public-key", key, "--out",
                     str(tmp_path / "x.jsonl"))  # fmt: skip
    assert rc == EXIT_CORRUPT_STATE and not (tmp_path / "x.jsonl").exists()
    # The daemon's next batch: it did not write seq 3 and no command wrote it through the
    # lock, so it says so before its head covers it.
    daemon.append([("dataset_used", {"job": 2})])
    entries = verify_log(tmp_path, ident.public_key).entries
    assert [e["kind"] for e in entries] == [
        "daemon_start", "dataset_used", "plan_approved", "audit_foreign_entries", "dataset_used"
    ]  # fmt: skip
    note = entries[3]["fields"]
    assert note["seqs"] == [[seq, seq]] and note["count"] == 1
    assert note["after_signed_seq"] == 2 and note["kinds"] == {"plan_approved": 1}
    rc, out, _ = run(capsys, "audit", "verify", str(tmp_path), "--public-key", key)
    assert rc == EXIT_OK
    assert f"did not write and that are not a command's: seq {seq}" in out
    # A daemon restarted (a new writer) finds one left after its last head too.
    seq = forge(tmp_path, "update_applied")
    AuditLog(tmp_path, "site-1", ident).append([("daemon_start", {"role": "site"})])
    last = verify_log(tmp_path, ident.public_key).entries[-2]
    assert last["kind"] == "audit_foreign_entries" and last["fields"]["seqs"] == [[seq, seq]]


def test_a_command_kind_forged_between_two_commands_is_still_caught(tmp_path: Path) -> None:
    ident = Identity.generate("site-1", "site")
    daemon = AuditLog(tmp_path, "site-1", ident)
    daemon.append([("daemon_start", {"role": "site"})])
    record(tmp_path, "dataset_added", name="a")  # seq 2, through the lock
    forged = forge(tmp_path, "plan_approved")  # seq 3, not
    record(tmp_path, "dataset_revoked", name="a")  # seq 4, through the lock
    daemon.append([("dataset_used", {"job": 1})])
    entries = verify_log(tmp_path, ident.public_key).entries
    notes = [e["fields"] for e in entries if e["kind"] == "audit_foreign_entries"]
    assert len(notes) == 1 and notes[0]["seqs"] == [[forged, forged]]


def test_commands_entries_through_the_lock_are_signed_over_quietly(tmp_path: Path) -> None:
    ident = Identity.generate("site-1", "site")
    daemon = AuditLog(tmp_path, "site-1", ident)
    daemon.append([("daemon_start", {"role": "site"})])
    record(tmp_path, "plan_approved", digest="sha256:" + "cd" * 32)
    record(tmp_path, "dataset_added", name="heart")
    daemon.append([("dataset_used", {"job": 1})])
    verdict = verify_log(tmp_path, ident.public_key)
    assert verdict.covered
    assert [e["kind"] for e in verdict.entries] == [
        "daemon_start", "plan_approved", "dataset_added", "dataset_used"
    ]  # fmt: skip


def test_a_command_that_reads_the_key_signs_the_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ident = Identity.generate("site-a", "site")
    ident.save(tmp_path)  # site-a.key
    data = tmp_path / "cohort.csv"
    data.write_text(CSV)
    cfg = site_config(tmp_path, key="site-a.key")
    rc, _, err = run(
        capsys, "dataset", "add", str(data), "--config", str(cfg), "--name", "c", "--tag", "heart",
        "--label", "outcome",
    )  # fmt: skip
    assert rc == 0, err
    state = tmp_path / "state"
    verdict = verify_log(state, ident.public_key)
    assert verdict.covered and verdict.head_seq == 1
    rc, out, _ = run(capsys, "dataset", "revoke", "c", "--config", str(cfg))
    assert rc == 0
    rc, out, _ = run(capsys, "audit", "verify", "--config", str(cfg))
    assert rc == EXIT_OK, out
    assert "signed head: seq 2, signature valid" in out and "NOT COVERED" not in out
    # With --state-dir there is no key to read: the entry is left for the daemon.
    rc, _, _ = run(capsys, "dataset", "add", str(data), "--state-dir", str(state), "--name", "d",
                   "--tag", "other", "--label", "outcome")  # fmt: skip
    assert rc == 0
    assert [e["seq"] for e in verify_log(state, ident.public_key).unsigned] == [3]


def test_export_never_replaces_the_live_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(5):
        record(tmp_path, "dataset_used" if i % 2 else "plan_approved", job=i)
    log = tmp_path / "audit" / "audit.jsonl"
    before = log.read_bytes()
    link = tmp_path / "innocent.jsonl"
    link.symlink_to(log)
    hard = tmp_path / "hard.jsonl"
    os.link(log, hard)
    for out in (log, tmp_path / "audit" / "head.json", tmp_path / "audit" / "x.jsonl", link, hard):
        rc, _, err = run(capsys, "audit", "export", str(tmp_path), "--kind", "plan_approved",
                         "--out", str(out))  # fmt: skip
        assert rc == EXIT_CONFIG and "audit directory" in err, (out, err)
    assert log.read_bytes() == before and verify_log(tmp_path).intact
    rc, _, _ = run(capsys, "audit", "export", str(tmp_path), "--out", str(tmp_path / "ok.jsonl"))
    assert rc == EXIT_OK and len((tmp_path / "ok.jsonl").read_bytes().splitlines()) == 5


NOBODY = 65534
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)


def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory another user can reach (pytest's own tmp_path is root's, 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="fedloom-audit-"))
    os.chmod(folder, 0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@needs_root
def test_a_root_command_leaves_the_log_to_the_state_owner(open_tmp: Path) -> None:
    state = open_tmp / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    record(state, "plan_approved", digest="sha256:" + "ab" * 32)  # as root
    for path in (state / "audit", state / "audit" / "lock", state / "audit" / "audit.jsonl"):
        assert os.stat(path).st_uid == NOBODY, path
    # ... so the daemon's user can still append.
    done = as_nobody(
        "from fedloom.runtime.audit import record\n"
        f"record({str(state)!r}, 'dataset_added', name='x')\n"
    )
    assert done.returncode == 0, done.stderr
    assert [e["kind"] for e in verify_log(state).entries] == ["plan_approved", "dataset_added"]


@needs_root
def test_an_unwritable_lock_is_named_with_its_owner(open_tmp: Path) -> None:
    state = open_tmp / "state"
    (state / "audit").mkdir(parents=True)
    os.chown(state, NOBODY, NOBODY)
    os.chown(state / "audit", NOBODY, NOBODY)
    (state / "audit" / "lock").touch(mode=0o600)  # a root command of an older fedloom
    done = as_nobody(
        "from fedloom.runtime.audit import AuditLog\n"
        "from fedloom.runtime.audit import describe_os_error\n"
        f"log = AuditLog({str(state)!r}, 'site-1')\n"
        "try:\n    log.check()\n"
        "except OSError as exc:\n    print(describe_os_error(exc, log.path))\n"
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert f"{state / 'audit' / 'lock'}: Permission denied" in line
    assert "belongs to root (uid 0)" in line and f"uid {NOBODY}" in line and "chown" in line
