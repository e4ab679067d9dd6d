"""Double faults in the write-ahead log (issue 13 review): only the LAST write can be torn.

Zeros longer than any frame of the log, or a frame whose damaged length field runs over an
intact frame boundary, would each swallow acknowledged frames if taken for a torn tail:
both must be refused, naming file and offset. A torn tail that is dropped is logged at
WARNING with file and offset.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedloom.algorithms.protocol import Persist
from fedloom.federation.store import CorruptStateError, StateStore, scan_log


def _log(directory: Path, n: int = 3) -> Path:
    """A log of ``n`` one-record frames after a checkpoint."""
    with StateStore(directory) as store:
        store.load()
        store.apply(Persist("checkpoint", {"v": 1}))
        for i in range(n):
            record = {"seq": i, "w": np.arange(3, dtype=np.float32)}
            store.apply(Persist("applied", record, append=True))
    (path,) = directory.glob("wal.*.log")
    return path


def _load(directory: Path) -> list[int]:
    with StateStore(directory) as store:
        return [r["seq"] for r in store.load().records("applied")]


def _frames(path: Path) -> list[tuple[int, int]]:
    return [(f.start, f.end) for f in scan_log(path).frames]


def test_zeros_longer_than_any_frame_are_refused(tmp_path: Path) -> None:
    path = _log(tmp_path)
    frames = _frames(path)
    data = bytearray(path.read_bytes())
    start = frames[1][0]  # frames 1 and 2 (acknowledged) zeroed to the end
    data[start:] = bytes(len(data) - start)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStateError) as info:
        _load(tmp_path)
    assert info.value.path == path and info.value.offset == start
    assert f"offset {start}" in str(info.value) and "zero bytes" in str(info.value)
    assert path.stat().st_size == len(data)  # nothing truncated


def test_zeros_of_the_last_frame_alone_are_a_torn_tail(tmp_path: Path) -> None:
    path = _log(tmp_path)
    frames = _frames(path)
    data = bytearray(path.read_bytes())
    data[frames[2][0] :] = bytes(len(data) - frames[2][0])
    path.write_bytes(bytes(data))
    assert _load(tmp_path) == [0, 1]
    assert path.stat().st_size == frames[2][0]


def test_a_damaged_length_before_a_torn_write_is_refused(tmp_path: Path) -> None:
    """Bit rot in an acknowledged frame's length field, then a crash in the next write:
    the damaged frame must not be dropped with the torn one after it."""
    path = _log(tmp_path)
    frames = _frames(path)
    data = bytearray(path.read_bytes())
    data += data[frames[0][0] : frames[0][1]][:30]  # a torn fourth frame
    last = frames[2][0]
    data[last + 4 + 1] ^= 0x01  # its length grows by 256: past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStateError) as info:
        _load(tmp_path)
    assert info.value.offset == last and "length field is damaged" in str(info.value)
    assert f"ending at offset {frames[2][1]}" in str(info.value)


def test_a_dropped_torn_tail_is_a_warning_naming_file_and_offset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _log(tmp_path)
    end = path.stat().st_size
    with path.open("ab") as f:
        f.write(path.read_bytes()[:30])  # a write cut short
    with caplog.at_level(logging.WARNING, logger="fedloom.federation.store"):
        assert _load(tmp_path) == [0, 1, 2]
    (rec,) = [r for r in caplog.records if "torn tail" in r.getMessage()]
    assert rec.levelno == logging.WARNING
    assert str(path) in rec.getMessage() and f"offset {end}" in rec.getMessage()
