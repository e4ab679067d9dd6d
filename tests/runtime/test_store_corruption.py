"""A torn tail (what a crash before fsync leaves) is dropped; a damaged complete frame is
refused wherever it is, naming file and offset, and the file is left as it was."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from fedloom.algorithms.protocol import Persist
from fedloom.federation.store import CorruptStateError, Recovery, StateStore, scan_log

HEADER = 16  # magic, u64 length, u32 crc


def reopen(directory: Path, *, repair: bool = True) -> tuple[StateStore, Recovery]:
    store = StateStore(directory)
    try:
        return store, store.load(repair=repair)
    except BaseException:
        store.close()
        raise


def wal(directory: Path) -> Path:
    [path] = sorted(directory.glob("wal.*.log"))
    return path


def three_frames(directory: Path) -> list[int]:
    """A log of three one-record frames; returns each frame's start offset."""
    store, _ = reopen(directory)
    starts = []
    for n in range(3):
        starts.append(wal(directory).stat().st_size if n else 0)
        delta = {"w": np.full(64, n, np.float32)}
        store.apply(Persist("applied", {"n": n, "delta": delta}, append=True))
    store.close()
    return starts


def damage(path: Path, offset: int, data: bytes) -> bytes:
    """Overwrite bytes at ``offset``; returns the file's bytes afterwards."""
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return bytes(raw)


def refused(directory: Path, offset: int) -> CorruptStateError:
    with pytest.raises(CorruptStateError) as info:
        reopen(directory)
    err = info.value
    assert err.path == wal(directory) and err.offset == offset
    assert str(wal(directory)) in str(err) and f"offset {offset}" in str(err)
    return err


def test_a_bad_checksum_in_the_complete_last_frame_is_refused_not_dropped(tmp_path: Path) -> None:
    starts = three_frames(tmp_path)
    path = wal(tmp_path)
    before = damage(path, path.stat().st_size - 5, b"\x7f")  # one byte of the last delta
    err = refused(tmp_path, starts[2])
    assert "checksum" in str(err)
    assert path.read_bytes() == before  # nothing truncated: the operator decides
    # Without repair too, and a later open still refuses (nothing was "fixed" meanwhile).
    with pytest.raises(CorruptStateError):
        reopen(tmp_path, repair=False)
    refused(tmp_path, starts[2])


@pytest.mark.parametrize("where", ["magic", "crc", "head_len"])
def test_damage_to_the_header_of_the_complete_last_frame_is_refused(
    tmp_path: Path, where: str
) -> None:
    starts = three_frames(tmp_path)
    at = {"magic": 0, "crc": 12, "head_len": HEADER}[where]
    damage(wal(tmp_path), starts[2] + at, b"\xee")
    refused(tmp_path, starts[2])


def test_a_damaged_length_field_of_the_last_frame_is_not_a_torn_write(tmp_path: Path) -> None:
    """Larger: the length runs past the end of the file as a torn frame's does, but the bytes
    there are the whole frame (its checksum verifies with the true length). Smaller: the
    frame looks complete and fails its checksum."""
    starts = three_frames(tmp_path)
    path = wal(tmp_path)
    true_length = path.stat().st_size - starts[2] - HEADER
    for length in (true_length + 1, true_length + (1 << 40), true_length - 1):
        damage(path, starts[2] + 4, struct.pack("<Q", length))
        refused(tmp_path, starts[2])


def test_the_first_and_only_frame_is_no_different(tmp_path: Path) -> None:
    store, _ = reopen(tmp_path)
    store.apply(Persist("site/pending", {"op": "add", "seq": 1}, append=True))
    store.close()
    path = wal(tmp_path)
    full = path.read_bytes()
    damage(path, len(full) - 1, bytes([full[-1] ^ 1]))
    refused(tmp_path, 0)
    path.write_bytes(full[:-1])  # the file ends inside the frame: torn, never acknowledged
    store, rec = reopen(tmp_path)
    store.close()
    assert rec.logs == {} and rec.torn_bytes == len(full) - 1
    assert path.stat().st_size == 0


def test_an_empty_log_is_an_empty_log(tmp_path: Path) -> None:
    store, _ = reopen(tmp_path)
    store.apply(Persist("checkpoint", {"v": 1}))
    store.close()
    (tmp_path / "wal.0000000001.log").touch()  # created, crashed before the first frame
    store, rec = reopen(tmp_path)
    store.close()
    assert rec.epoch == 1 and rec.logs == {} and rec.torn_bytes == 0


@pytest.mark.parametrize("zeros", [HEADER, 300])
def test_a_tail_of_zeros_is_a_torn_write(tmp_path: Path, zeros: int) -> None:
    """Blocks a power loss left unwritten behind a grown size read back as zeros (no longer
    than a frame of the log: see test_store_faults for longer ones)."""
    starts = three_frames(tmp_path)
    path = wal(tmp_path)
    end = path.stat().st_size
    with path.open("ab") as f:
        f.write(b"\x00" * zeros)
    store, rec = reopen(tmp_path)
    store.close()
    assert [r["n"] for r in rec.records("applied")] == [0, 1, 2] and rec.torn_bytes == zeros
    assert path.stat().st_size == end and len(starts) == 3


def test_a_complete_last_frame_with_zeroed_blocks_is_refused(tmp_path: Path) -> None:
    """The one case a crash could leave that the store does not guess at: a complete frame
    whose end reads as zeros (a file system that wrote the size before the data) cannot be
    told from an acknowledged frame damaged later, so the operator decides."""
    starts = three_frames(tmp_path)
    path = wal(tmp_path)
    size = path.stat().st_size
    damage(path, size - 100, b"\x00" * 100)
    err = refused(tmp_path, starts[2])
    assert "checksum" in str(err)


def test_scan_reports_every_damaged_range_and_the_intact_frames(tmp_path: Path) -> None:
    starts = three_frames(tmp_path)
    path = wal(tmp_path)
    size = path.stat().st_size
    damage(path, starts[1] + HEADER + 8, b"\xaa\xbb")  # the middle frame's body
    with path.open("ab") as f:
        f.write(b"FLs1\x01")  # and a torn tail after the last frame
    scan = scan_log(path)
    assert [(fr.start, fr.end) for fr in scan.frames] == [(0, starts[1]), (starts[2], size)]
    assert [fr.tree[0][1]["n"] for fr in scan.frames] == [0, 2]
    assert [(d.offset, d.end, d.torn) for d in scan.damage] == [
        (starts[1], starts[2], False),
        (size, size + 5, True),
    ]
    assert "intact frame follows at offset" in scan.damage[0].reason
    assert scan.good_end == size and [d.offset for d in scan.corruption] == [starts[1]]
    refused(tmp_path, starts[1])


def test_a_torn_tail_is_still_torn_at_every_cut(tmp_path: Path) -> None:
    """The refusal did not turn crashes into corruption: every prefix of the last frame
    (header cut, body cut) is dropped, never refused."""
    live = tmp_path / "live"
    starts = three_frames(live)
    full = wal(live).read_bytes()
    for cut in range(starts[2] + 1, len(full), 7):
        crash = tmp_path / f"cut{cut}"
        shutil.copytree(live, crash)
        wal(crash).write_bytes(full[:cut])
        scan = scan_log(wal(crash))
        assert [d.torn for d in scan.damage] == [True], (cut, scan.damage)
        store, rec = reopen(crash)
        store.close()
        assert len(rec.records("applied")) == 2 and rec.torn_bytes == cut - starts[2]
        shutil.rmtree(crash)
