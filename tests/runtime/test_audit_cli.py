"""``fedloom audit verify|export`` through the real command line (``fedloom.cli.main``):
exit 0 only for an intact log, the first bad line named, the signed head checked with the
key from ``--public-key`` or ``--config`` (the identity file, else the roster), and an
export that refuses a broken log unless ``--force``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedloom.cli import main
from fedloom.runtime.audit import AuditLog, record
from fedloom.runtime.config import load_config
from fedloom.runtime.exit_status import EXIT_CONFIG, EXIT_CORRUPT_STATE, EXIT_OK
from fedloom.runtime.federation_files import ROOT_ID, write_federation
from fedloom.transport.identity import Identity, key_text


@pytest.fixture
def ident() -> Identity:
    return Identity.generate("site-1", "site")


def fill(state: Path, ident: Identity) -> None:
    log = AuditLog(state, "site-1", ident)
    log.append([("daemon_start", {"role": "site"})])
    for i in range(1, 6):
        log.append([("update_sent", {"seq": i}), ("dataset_used", {"job": i})])
    record(state, "plan_approved", digest="sha256:ab")  # a command's entry, after the head


@pytest.fixture
def state(tmp_path: Path, ident: Identity) -> Path:
    """``tmp_path/state`` holding the audit log ``fill`` writes."""
    path = tmp_path / "state"
    path.mkdir()
    fill(path, ident)
    return path


def log_lines(state: Path) -> list[bytes]:
    return (state / "audit" / "audit.jsonl").read_bytes().splitlines(keepends=True)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_verify_an_intact_log_with_and_without_the_key(
    tmp_path: Path, ident: Identity, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, ident)
    code, out, _ = run(capsys, "audit", "verify", str(tmp_path))
    assert code == EXIT_OK
    assert "12 intact entries, seq 1..12" in out
    assert "signed head: not checked" in out and out.rstrip().endswith("intact")
    pub = tmp_path / "site-1.pub"
    pub.write_text(ident.public_line() + "\n")
    for key in (key_text(ident.public_key), str(pub)):
        # The command's entry after the head is not covered by it: named, exit 65...
        code, out, _ = run(capsys, "audit", "verify", str(tmp_path), "--public-key", key)
        assert code == EXIT_CORRUPT_STATE, out
        assert "signed head: seq 11, signature valid" in out
        assert "NOT COVERED: seq 12 (1 entry) after the signed head (seq 11)" in out
        assert "seq 12" in out and "plan_approved" in out
        # ... unless the auditor accepts an unsigned tail: then it is listed.
        code, out, _ = run(
            capsys, "audit", "verify", str(tmp_path), "--public-key", key, "--allow-unsigned-tail"
        )
        assert code == EXIT_OK, out
        assert "NOT COVERED: seq 12" in out and "plan_approved" in out
    code, out, _ = run(capsys, "audit", "verify", str(tmp_path), "--json")
    verdict = json.loads(out)
    assert verdict["intact"] and verdict["entries"] == 12 and verdict["problem"] is None


def test_verify_names_the_first_bad_line(
    tmp_path: Path, ident: Identity, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, ident)
    lines = log_lines(tmp_path)
    del lines[4]
    (tmp_path / "audit" / "audit.jsonl").write_bytes(b"".join(lines))
    code, out, _ = run(capsys, "audit", "verify", str(tmp_path))
    assert code == EXIT_CORRUPT_STATE
    assert "NOT INTACT: line 5: deleted: seq 5 missing before line 5" in out
    assert "4 intact entries" in out
    code, out, _ = run(capsys, "audit", "verify", str(tmp_path), "--json")
    assert json.loads(out)["problem"] == {
        "line": 5,
        "kind": "deleted",
        "message": "seq 5 missing before line 5 (1 entry deleted)",
    }


def test_verify_finds_a_truncated_tail_only_with_the_key(
    tmp_path: Path, ident: Identity, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, ident)
    (tmp_path / "audit" / "audit.jsonl").write_bytes(b"".join(log_lines(tmp_path)[:7]))
    code, _, _ = run(capsys, "audit", "verify", str(tmp_path))
    assert code == EXIT_OK  # a chain alone cannot tell
    key = key_text(ident.public_key)
    code, out, _ = run(capsys, "audit", "verify", str(tmp_path), "--public-key", key)
    assert code == EXIT_CORRUPT_STATE
    assert "truncated: the signed head covers seq 11 but the log ends at seq 7" in out


def test_verify_with_the_config_takes_the_nodes_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = write_federation(
        tmp_path / "fed", {"region-a": ["site-1"]}, plan={"dataset": "synthetic"}
    )
    cfg_path = fed.nodes["site-1"].config
    cfg = load_config(cfg_path)
    site = Identity.load(cfg.identity_key)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    AuditLog(cfg.state_dir, "site-1", site).append([("daemon_start", {})] * 3)
    code, out, _ = run(capsys, "audit", "verify", "--config", str(cfg_path))
    assert code == EXIT_OK and f"from {cfg.identity_key}" in out
    # An auditor who cannot read the private key: the roster lists the public one.
    if os.geteuid() == 0:  # root reads any file: take the key away instead
        cfg.identity_key.unlink()
    else:
        os.chmod(cfg.identity_key, 0o000)
    code, out, _ = run(capsys, "audit", "verify", "--config", str(cfg_path))
    assert code == EXIT_OK and "from roster version 1" in out
    # Another node's key does not verify the head.
    root_cfg = load_config(fed.nodes[ROOT_ID].config)
    other = key_text(Identity.load(root_cfg.identity_key).public_key)
    code, out, _ = run(capsys, "audit", "verify", str(cfg.state_dir), "--public-key", other)
    assert code == EXIT_CORRUPT_STATE and "signature does not verify" in out


def test_command_line_mistakes_are_one_line(
    tmp_path: Path, ident: Identity, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "audit", "verify", str(tmp_path))
    assert code == EXIT_CONFIG and "no audit log" in err
    fill(tmp_path, ident)
    code, _, err = run(capsys, "audit", "verify", str(tmp_path), "--public-key", "not-a-key")
    assert code == EXIT_CONFIG and "--public-key" in err and "Traceback" not in err
    # The line names the value and says it is no file (a mistyped .pub path or a
    # directory), with the option named once.
    assert err.count("--public-key") == 1 and "'not-a-key' (not a file)" in err, err
    code, _, err = run(capsys, "audit", "verify", str(tmp_path), "--public-key", str(tmp_path))
    assert code == EXIT_CONFIG and f"{str(tmp_path)!r} (not a file)" in err, err
    code, _, err = run(capsys, "audit", "verify")
    assert code == EXIT_CONFIG and "STATE_DIR" in err
    # A missing directory (a node that never ran, a typo) is not called "not a directory".
    code, _, err = run(capsys, "audit", "verify", str(tmp_path / "nope"))
    assert code == EXIT_CONFIG and "nope: no such state directory" in err, err


def test_export_writes_the_verified_entries_and_filters(
    tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "all.jsonl"
    code, out, _ = run(capsys, "audit", "export", str(state), "--out", str(out_file))
    assert code == EXIT_OK and "wrote 12 entries" in out
    assert out_file.read_bytes() == b"".join(log_lines(state))  # the log's own lines
    some = tmp_path / "some.jsonl"
    code, out, _ = run(
        capsys,
        "audit",
        "export",
        str(state),
        "--out",
        str(some),
        "--kind",
        "update_sent",
        "--since",
        "4",
    )
    assert code == EXIT_OK
    entries = [json.loads(line) for line in some.read_text().splitlines()]
    assert [e["fields"]["seq"] for e in entries] == [2, 3, 4, 5]
    assert all(e["kind"] == "update_sent" and e["seq"] >= 4 for e in entries)


def test_export_refuses_a_kind_no_entry_can_have(
    tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped --kind wrote an empty export and exited 0: an auditor reads that as
    "no such event happened". It is a command-line mistake naming the kinds."""
    out_file = tmp_path / "x.jsonl"
    argv = ["audit", "export", str(state), "--out", str(out_file), "--kind", "update_aplied"]
    code, _, err = run(capsys, *argv)
    assert code == EXIT_CONFIG and "--kind 'update_aplied'" in err and "update_applied" in err
    assert not out_file.exists()
    argv[-1] = "plan_approved"  # a command's kind is one
    code, out, _ = run(capsys, *argv)
    assert code == EXIT_OK and "wrote 1 entry" in out


def test_export_to_dash_is_refused_not_a_file_named_dash(
    tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out -` (stdout, by habit) wrote a file named '-' in the working directory."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "audit", "export", str(state), "--out", "-")
    assert code == EXIT_CONFIG and "--out -" in err and "a file" in err, err
    assert not (tmp_path / "-").exists()


def test_export_refuses_a_broken_log_unless_forced(
    tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = log_lines(state)
    lines[6] = lines[6].replace(b'"job":3', b'"job":9')
    (state / "audit" / "audit.jsonl").write_bytes(b"".join(lines))
    out_file = tmp_path / "x.jsonl"
    code, _, err = run(capsys, "audit", "export", str(state), "--out", str(out_file))
    assert code == EXIT_CORRUPT_STATE and "not exported" in err and "line 7: edited" in err
    assert not out_file.exists()
    code, out, _ = run(capsys, "audit", "export", str(state), "--out", str(out_file), "--force")
    assert code == EXIT_CORRUPT_STATE and "WARNING" in out and "wrote 6 entries" in out
    assert len(out_file.read_text().splitlines()) == 6
