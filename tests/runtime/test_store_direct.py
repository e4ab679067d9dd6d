"""Large log frames go to the disk with direct I/O (``StateStore._write_direct``): padded
to end on a block boundary with a tensor no record refers to, written from an aligned
buffer, the acknowledged bytes of a shared block written again unchanged. What they hold,
what a crash leaves of them and how a failed write ends are what buffered frames give.

Direct I/O needs a file system that takes O_DIRECT: the suite's ``tmp_path`` is tmpfs
(``tests/conftest.py``), which does not, so these tests write under ``build/`` in the
checkout (a disk), and skip, saying so, only where that refuses O_DIRECT too.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.protocol import Persist
from fedloom.federation import store as store_mod
from fedloom.federation.store import (
    CorruptStateError,
    StateIOError,
    StateStore,
    StoreError,
    decode_state,
    encode_state,
    scan_log,
)

BLOCK = store_mod._BLOCK
BIG = 200_000  # float32 values: an 800 kB record, above the direct-I/O threshold
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    base = ROOT / "build"
    base.mkdir(exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="store-direct-", dir=base))
    try:
        probe = directory / "probe"
        try:  # open, and one aligned write: some file systems open but refuse the I/O
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | store_mod._O_DIRECT, 0o600)
            try:
                with mmap.mmap(-1, BLOCK) as block:
                    os.pwrite(fd, block, 0)
            finally:
                os.close(fd)
        except OSError as exc:
            pytest.skip(f"{base} does not take O_DIRECT ({exc.strerror}): nothing to test here")
        probe.unlink()
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def record(n: int, size: int) -> dict[str, Any]:
    rng = np.random.default_rng(n)
    return {"n": n, "w": rng.standard_normal(size).astype(np.float32)}


def wal(directory: Path) -> Path:
    [path] = sorted(directory.glob("wal.*.log"))
    return path


def loaded(directory: Path) -> list[Any]:
    with StateStore(directory) as store:
        return store.load().records("log")


def same(got: list[Any], written: list[dict[str, Any]]) -> bool:
    return [g["n"] for g in got] == [w["n"] for w in written] and all(
        g["w"].tobytes() == w["w"].tobytes() for g, w in zip(got, written, strict=True)
    )


def test_large_frames_go_direct_end_on_blocks_and_read_back_bit_for_bit(disk_dir: Path) -> None:
    written = []
    sizes = []
    with StateStore(disk_dir) as store:
        store.load()
        for n, size in enumerate([BIG, 10, 3, BIG, BIG, 7, BIG]):
            written.append(record(n, size))
            store.apply(Persist("log", written[-1], append=True))
            assert store._direct_fd is not None  # direct I/O stays on throughout
            sizes.append(wal(disk_dir).stat().st_size)
    # Large frames end on a block (padded); small ones are not padded (no 4 kB per ack).
    assert [s % BLOCK == 0 for s in sizes] == [True, False, False, True, True, False, True]
    # A large frame after small ones wrote their block again: they are still intact.
    assert same(loaded(disk_dir), written)
    scan = scan_log(wal(disk_dir))
    assert not scan.damage and len(scan.frames) == len(written)


def test_checkpoints_and_later_epochs_keep_going_direct(disk_dir: Path) -> None:
    written = [record(0, BIG)]
    with StateStore(disk_dir) as store:
        store.load()
        store.apply(Persist("log", written[0], append=True))
        store.apply(Persist("checkpoint", {"at": 1}))
        written = [record(1, BIG), record(2, BIG)]
        store.apply_many([Persist("log", r, append=True) for r in written])
        assert store._direct_fd is not None
    with StateStore(disk_dir) as store:
        rec = store.load()
    assert rec.checkpoint == {"at": 1} and same(rec.records("log"), written)


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(0, 3 * BLOCK),
    values=st.integers(0, 3000),
    names=st.integers(0, 40),
)
def test_padding_ends_the_frame_on_a_block_and_is_invisible(
    start: int, values: int, names: int
) -> None:
    array = np.arange(values, dtype=np.float32)
    obj: list[Any] = [["log", {"k" * names: array, "note": "x" * names}]]
    parts = encode_state(obj, end_on_block_from=start)
    raw = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    assert (start + len(raw)) % BLOCK == 0
    plain = b"".join(bytes(memoryview(p).cast("B")) for p in encode_state(obj))
    assert len(raw) - len(plain) < BLOCK + 256 + 64  # the gap, 256 bytes and its entry
    head_len = int.from_bytes(raw[16:20], "little")
    tree = decode_state(raw[20 : 20 + head_len], raw[20 + head_len :])
    assert tree[0][0] == "log" and tree[0][1]["note"] == "x" * names
    assert tree[0][1]["k" * names].tobytes() == array.tobytes()


def test_small_frames_are_not_padded() -> None:
    obj = [["log", {"n": 1}]]
    assert encode_state(obj, end_on_block_from=100, pad_from=BLOCK) == encode_state(obj)


def test_a_kernel_refusing_direct_io_gets_buffered_frames(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite

    def refuse_direct(fd: int, data: Any, offset: int) -> int:
        if fd == store._direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    written = [record(0, 10), record(1, BIG), record(2, BIG)]
    with StateStore(disk_dir) as store:
        store.load()
        store.apply(Persist("log", written[0], append=True))
        store.apply(Persist("log", written[1], append=True))
        assert store._direct_fd is None  # fell back for good
        store.apply(Persist("log", written[2], append=True))
    assert same(loaded(disk_dir), written)


def test_short_direct_writes_are_finished(disk_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    cuts = iter([2 * BLOCK, BLOCK + 100])  # one on a block boundary, one off it

    def short(fd: int, data: Any, offset: int) -> int:
        if fd != store._direct_fd:
            return real(fd, data, offset)
        cut = next(cuts, None)
        if cut is None:
            return real(fd, data, offset)
        if cut % BLOCK:  # what a direct write cannot do itself: write it buffered
            plain = os.open(wal(disk_dir), os.O_WRONLY)
            try:
                return real(plain, memoryview(data)[:cut], offset)
            finally:
                os.close(plain)
        return real(fd, memoryview(data)[:cut], offset)

    monkeypatch.setattr(os, "pwrite", short)
    written = [record(0, 10), record(1, BIG), record(2, BIG)]
    with StateStore(disk_dir) as store:
        store.load()
        store.apply_many([Persist("log", written[0], append=True)])
        store.apply(Persist("log", written[1], append=True))
        store.apply(Persist("log", written[2], append=True))
    assert same(loaded(disk_dir), written)


def test_a_failed_direct_write_breaks_the_store_and_leaves_no_half_frame(
    disk_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = [record(0, BIG)]
    with StateStore(disk_dir) as store:
        store.load()
        store.apply(Persist("log", written[0], append=True))
        good = wal(disk_dir).stat().st_size
        real = os.pwrite

        def full(fd: int, data: Any, offset: int) -> int:
            if fd == store._direct_fd:
                real(fd, memoryview(data)[:BLOCK], offset)  # some of it lands first
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(StateIOError) as info:
            store.apply(Persist("log", record(1, BIG), append=True))
        assert info.value.errno == errno.ENOSPC and str(wal(disk_dir)) in str(info.value)
        with pytest.raises(StoreError):
            store.apply(Persist("log", record(2, 10), append=True))
    monkeypatch.undo()
    assert wal(disk_dir).stat().st_size == good
    assert same(loaded(disk_dir), written)


def test_a_torn_direct_frame_is_dropped_and_a_damaged_one_refused(disk_dir: Path) -> None:
    written = [record(n, BIG) for n in range(3)]
    with StateStore(disk_dir) as store:
        store.load()
        for r in written:
            store.apply(Persist("log", r, append=True))
    path = wal(disk_dir)
    starts = [f.start for f in scan_log(path, decode=False).frames]
    intact = path.read_bytes()
    # A crash mid-write of the last frame: a prefix of its blocks.
    path.write_bytes(intact[: starts[2] + 5 * BLOCK])
    assert same(loaded(disk_dir), written[:2])
    # A complete last frame with a flipped byte in its padding: corruption, not a tear.
    damaged = bytearray(intact)
    damaged[-10] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(CorruptStateError) as info:
        loaded(disk_dir)
    assert info.value.offset == starts[2]
