"""The audit log's file format (``runtime.audit``): ``record()`` and ``AuditLog.append``
write a hash chain with a signed head; ``verify_log`` finds an edit, a deletion (middle and
tail), a reordering, an insertion and a torn tail, each by its line; two processes
appending at once keep the chain intact."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.runtime import audit
from fedloom.runtime.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    canonical,
    entry_hash,
    read_entries,
    record,
    verify_log,
)
from fedloom.transport.identity import Identity


def log_path(state: Path) -> Path:
    return state / "audit" / "audit.jsonl"


def lines_of(state: Path) -> list[bytes]:
    return log_path(state).read_bytes().splitlines(keepends=True)


def write_lines(state: Path, lines: list[bytes]) -> None:
    log_path(state).write_bytes(b"".join(lines))


@pytest.fixture
def ident() -> Identity:
    return Identity.generate("site-1", "site")


def filled(state: Path, ident: Identity, n: int = 6) -> AuditLog:
    log = AuditLog(state, "site-1", ident)
    for i in range(n):
        log.append([("update_sent", {"seq": i + 1, "digest": bytes([i]) * 32})])
    return log


def test_record_writes_a_chain_of_canonical_entries(tmp_path: Path) -> None:
    record(tmp_path, "dataset_added", tag="icu", sha256=b"\xab\xcd", rows=120, cols=["a", "b"])
    record(tmp_path, "plan_approved", node="site-9", hash="ff" * 32, bounds={"lr": [0.0, 1.0]})
    raw = lines_of(tmp_path)
    assert len(raw) == 2 and all(line.endswith(b"\n") for line in raw)
    first, second = (json.loads(line) for line in raw)
    assert first["seq"] == 1 and first["prev"] == GENESIS
    assert first["fields"] == {"tag": "icu", "sha256": "abcd", "rows": 120, "cols": ["a", "b"]}
    assert first["node"] == "local"  # no node given and nothing before it
    assert second["seq"] == 2 and second["prev"] == first["hash"]
    assert second["node"] == "site-9"
    for line, entry in zip(raw, (first, second), strict=True):
        assert entry["hash"] == entry_hash(entry)
        assert line == canonical(entry) + b"\n"
    record(tmp_path, "plan_revoked", hash="ff" * 32)
    assert json.loads(lines_of(tmp_path)[2])["node"] == "site-9"  # the last entry's node
    verdict = verify_log(tmp_path)
    assert verdict.intact and [e["seq"] for e in verdict.entries] == [1, 2, 3]
    assert not verdict.head_checked
    assert os.stat(log_path(tmp_path)).st_mode & 0o077 == 0


def test_record_refuses_what_is_not_json_data(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not JSON data"):
        record(tmp_path, "x", when=object())
    with pytest.raises(TypeError, match="finite"):
        record(tmp_path, "x", v=float("nan"))
    with pytest.raises(AuditError, match="record digests, not data"):
        record(tmp_path, "x", blob="a" * (audit.MAX_ENTRY_BYTES + 1))
    assert verify_log(tmp_path).entries == []


def test_signed_head_follows_every_batch(tmp_path: Path, ident: Identity) -> None:
    filled(tmp_path, ident, 3)
    verdict = verify_log(tmp_path, ident.public_key)
    assert verdict.intact and verdict.head_checked and verdict.head_seq == 3
    other = Identity.generate("site-1", "site")
    wrong = verify_log(tmp_path, other.public_key)
    assert wrong.problem is not None and wrong.problem.kind == "head"
    assert "does not verify" in wrong.problem.message


def test_verify_detects_an_edit(tmp_path: Path, ident: Identity) -> None:
    filled(tmp_path, ident)
    lines = lines_of(tmp_path)
    lines[2] = lines[2].replace(b'"seq":3},', b'"seq":4},')  # fields.seq
    assert lines[2] != lines_of(tmp_path)[2]
    write_lines(tmp_path, lines)
    problem = verify_log(tmp_path).problem
    assert problem is not None and (problem.line, problem.kind) == (3, "edited")
    assert len(verify_log(tmp_path).entries) == 2


def test_verify_detects_an_edit_rehashed(tmp_path: Path, ident: Identity) -> None:
    # An editor who recomputes the entry's hash breaks the next entry's link...
    filled(tmp_path, ident)
    lines = lines_of(tmp_path)
    entry = json.loads(lines[2])
    entry["fields"]["seq"] = 99
    entry["hash"] = entry_hash(entry)
    lines[2] = canonical(entry) + b"\n"
    write_lines(tmp_path, lines)
    problem = verify_log(tmp_path).problem
    assert problem is not None and (problem.line, problem.kind) == (3, "edited")
    # ... and one who rewrites the whole chain after it is caught by the signed head.
    prev = entry["hash"]
    for i in range(3, len(lines)):
        e = json.loads(lines[i])
        e["prev"] = prev
        e["hash"] = prev = entry_hash(e)
        lines[i] = canonical(e) + b"\n"
    write_lines(tmp_path, lines)
    assert verify_log(tmp_path).intact  # the chain alone cannot tell
    problem = verify_log(tmp_path, ident.public_key).problem
    assert problem is not None and problem.kind == "edited" and "signed head" in problem.message


@pytest.mark.parametrize("where", [0, 2, 3])
def test_verify_detects_a_deletion_in_the_middle(
    tmp_path: Path, ident: Identity, where: int
) -> None:
    filled(tmp_path, ident)
    lines = lines_of(tmp_path)
    del lines[where : where + 2]
    write_lines(tmp_path, lines)
    problem = verify_log(tmp_path).problem
    assert problem is not None and problem.kind == "deleted"
    assert problem.line == where + 1
    assert f"seq {where + 1} to {where + 2} missing" in problem.message


def test_verify_detects_a_deletion_at_the_tail_with_the_key(
    tmp_path: Path, ident: Identity
) -> None:
    filled(tmp_path, ident)
    write_lines(tmp_path, lines_of(tmp_path)[:4])
    unkeyed = verify_log(tmp_path)
    assert unkeyed.intact and not unkeyed.head_checked  # a chain alone cannot see it
    problem = verify_log(tmp_path, ident.public_key).problem
    assert problem is not None and (problem.line, problem.kind) == (5, "truncated")
    assert "last 2 entries were deleted" in problem.message
    # Deleting the head too does not hide it.
    (tmp_path / "audit" / "head.json").unlink()
    problem = verify_log(tmp_path, ident.public_key).problem
    assert problem is not None and problem.kind == "head" and "missing" in problem.message


def test_verify_detects_a_reordering(tmp_path: Path, ident: Identity) -> None:
    filled(tmp_path, ident)
    lines = lines_of(tmp_path)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(tmp_path, lines)
    problem = verify_log(tmp_path).problem
    assert problem is not None and (problem.line, problem.kind) == (3, "reordered")


@pytest.mark.parametrize("copy", [True, False])
def test_verify_detects_an_insertion(tmp_path: Path, ident: Identity, copy: bool) -> None:
    filled(tmp_path, ident)
    lines = lines_of(tmp_path)
    if copy:  # a replayed copy of an earlier entry
        lines.insert(3, lines[0])
        where = 4
    else:  # a forged entry that fits the chain where it is put, with a valid hash
        two = json.loads(lines[1])
        forged = {"seq": 3, "ts": two["ts"], "node": "site-1", "kind": "update_sent"}
        forged |= {"fields": {"seq": 42}, "prev": two["hash"]}
        forged["hash"] = entry_hash(forged)
        lines.insert(2, canonical(forged) + b"\n")
        where = 4  # the genuine seq 3 now repeats it
    write_lines(tmp_path, lines)
    problem = verify_log(tmp_path).problem
    assert problem is not None and (problem.line, problem.kind) == (where, "inserted")


def test_verify_names_an_inserted_entry_with_a_foreign_seq(tmp_path: Path, ident: Identity) -> None:
    filled(tmp_path, ident)
    lines = lines_of(tmp_path)
    two = json.loads(lines[1])
    forged = {"seq": 50, "ts": 0.0, "node": "x", "kind": "k", "fields": {}, "prev": two["hash"]}
    forged["hash"] = entry_hash(forged)
    lines.insert(2, canonical(forged) + b"\n")
    write_lines(tmp_path, lines)
    problem = verify_log(tmp_path).problem
    assert problem is not None and (problem.line, problem.kind) == (3, "inserted")


def test_verify_reports_a_line_that_is_not_an_entry(tmp_path: Path, ident: Identity) -> None:
    filled(tmp_path, ident)
    lines = lines_of(tmp_path)
    lines[1] = b"hello\n"
    write_lines(tmp_path, lines)
    problem = verify_log(tmp_path).problem
    assert problem is not None and (problem.line, problem.kind) == (2, "unparsable")
    with pytest.raises(AuditError, match="line 2 is not an audit entry"):
        read_entries(tmp_path)
    # A damaged complete last line is not a crash's: writers refuse to append after it.
    lines[-1] = b"junk\n"
    write_lines(tmp_path, lines)
    with pytest.raises(AuditError, match="damaged, which a crash cannot do"):
        record(tmp_path, "x")


def test_torn_tail_is_reported_then_sealed_by_the_next_append(
    tmp_path: Path, ident: Identity
) -> None:
    log = filled(tmp_path, ident, 3)
    whole = log_path(tmp_path).read_bytes()
    extra = canonical({"seq": 4, "ts": 1.0})[:-3]
    log_path(tmp_path).write_bytes(whole + extra)  # a crash in the middle of a write
    verdict = verify_log(tmp_path, ident.public_key)
    assert verdict.problem is not None
    assert (verdict.problem.line, verdict.problem.kind) == (4, "torn_tail")
    assert len(read_entries(tmp_path)) == 3  # the torn line was never acknowledged
    log.append([("daemon_start", {})])
    verdict = verify_log(tmp_path, ident.public_key)
    assert verdict.intact and verdict.head_seq == 5
    assert [e["kind"] for e in verdict.entries[-2:]] == ["torn_tail", "daemon_start"]
    sealed = verdict.entries[-2]["fields"]
    assert sealed["offset"] == len(whole) and sealed["bytes"] == len(extra)
    assert any("torn by a crash" in note for note in verdict.notes)
    assert log_path(tmp_path).read_bytes().startswith(whole + extra + b"\n")  # kept
    # A whole entry that lacks only its newline is finished, not sealed.
    last = log_path(tmp_path).read_bytes()
    log_path(tmp_path).write_bytes(last[:-1])
    record(tmp_path, "plan_approved")
    verdict = verify_log(tmp_path, ident.public_key)
    assert verdict.intact and [e["kind"] for e in verdict.entries[-2:]] == [
        "daemon_start",
        "plan_approved",
    ]


def test_a_crash_while_sealing_a_torn_tail_is_sealed_too(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "n")
    log.append([("a", {}), ("b", {})])
    whole = log_path(tmp_path).read_bytes()
    torn = b'{"fields":{"x":'
    # The first crash left a torn line; the second crashed in the write that sealed it
    # (its newline and part of the torn_tail entry reached the disk).
    cut_seal = b'\n{"fields":{"bytes":15,"off'
    log_path(tmp_path).write_bytes(whole + torn + cut_seal)
    assert verify_log(tmp_path).problem is not None
    log.append([("c", {})])
    verdict = verify_log(tmp_path)
    assert verdict.intact, verdict.problem
    assert [e["kind"] for e in verdict.entries] == ["a", "b", "torn_tail", "c"]
    sealed = verdict.entries[2]["fields"]
    assert sealed["offset"] == len(whole) and sealed["bytes"] == len(torn + cut_seal)
    assert verdict.entries[2]["prev"] == verdict.entries[1]["hash"]


def test_torn_first_line_seals_from_the_genesis(tmp_path: Path) -> None:
    (tmp_path / "audit").mkdir()
    log_path(tmp_path).write_bytes(b"\x00\x00\x00\x00")  # power loss: zeros
    assert verify_log(tmp_path).problem is not None
    record(tmp_path, "x")
    verdict = verify_log(tmp_path)
    assert verdict.intact and [e["kind"] for e in verdict.entries] == ["torn_tail", "x"]
    assert verdict.entries[0]["prev"] == GENESIS


def _append_many(state: str, who: str, n: int) -> None:
    for i in range(n):
        record(state, "dataset_tick", node=who, i=i)  # a command's kind, through the lock


def test_two_processes_appending_keep_the_chain(tmp_path: Path, ident: Identity) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, 100)) for w in "ab"]
    for p in procs:
        p.start()
    # ... and this process's signed batches at the same time.
    log = AuditLog(tmp_path, "site-1", ident)
    for i in range(30):
        log.append([("batch", {"i": i}), ("batch", {"i": i, "second": True})])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    verdict = verify_log(tmp_path, ident.public_key)
    assert verdict.intact, verdict.problem
    assert len(verdict.entries) == 260
    per_node: dict[str, list[int]] = {}
    for e in verdict.entries:
        if e["kind"] == "dataset_tick":
            per_node.setdefault(e["node"], []).append(e["fields"]["i"])
    assert per_node == {"a": list(range(100)), "b": list(range(100))}


_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
_json = st.recursive(
    _scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(
    fields=st.dictionaries(st.text(min_size=1, max_size=6), _json, max_size=4),
    cut=st.integers(min_value=0, max_value=10_000),
)
def test_any_single_byte_flip_or_cut_is_caught(
    tmp_path_factory: pytest.TempPathFactory, fields: dict[str, Any], cut: int
) -> None:
    state = tmp_path_factory.mktemp("a")
    log = AuditLog(state, "n")
    log.append([("k", fields), ("k", {"x": 1})])
    log.append([("k", fields)])
    data = bytearray(log_path(state).read_bytes())
    assert verify_log(state).intact
    pos = cut % len(data)
    flipped = bytearray(data)
    flipped[pos] ^= 0x01
    log_path(state).write_bytes(bytes(flipped))
    verdict = verify_log(state)
    assert not verdict.intact, f"byte {pos} flipped and the log still verifies"
    log_path(state).write_bytes(bytes(data[:pos]))
    short = verify_log(state)
    # Intact when the cut falls between lines, or just before a newline: a whole entry
    # lacking only its newline (writers finish such a line; a crash can leave it).
    assert short.intact is (pos == 0 or b"\n" in (data[pos - 1 : pos], data[pos : pos + 1]))
