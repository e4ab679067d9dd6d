"""The store's CRC-32 comes from zlib-ng where it is installed (SIMD) and from the standard
library's zlib otherwise: the same values, so a log written with one reads back with the
other, and a flipped bit is refused by either."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedloom.algorithms.protocol import Persist
from fedloom.federation import store as store_mod
from fedloom.federation.store import CorruptStateError, StateStore

zlib_ng = pytest.importorskip("zlib_ng.zlib_ng")


@given(st.binary(max_size=4096), st.integers(0, 2**32 - 1))
def test_zlib_ng_crc32_is_zlibs(data: bytes, start: int) -> None:
    assert zlib_ng.crc32(data, start) == zlib.crc32(data, start)


def _write(directory: Path) -> dict[str, np.ndarray]:
    delta = {"w": np.random.default_rng(3).standard_normal(300_000).astype(np.float32)}
    with StateStore(directory) as st_:
        st_.load()
        st_.apply(Persist("log", {"n": 1, "delta": delta}, append=True))
    return delta


@pytest.mark.parametrize(("write_crc", "read_crc"), [(zlib.crc32, None), (None, zlib.crc32)])
def test_logs_read_back_across_the_two_implementations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_crc: object, read_crc: object
) -> None:
    if write_crc is not None:
        monkeypatch.setattr(store_mod, "crc32", write_crc)
    delta = _write(tmp_path)
    monkeypatch.setattr(store_mod, "crc32", read_crc or zlib_ng.crc32)
    with StateStore(tmp_path) as st_:
        [got] = st_.load().records("log")
    assert got["delta"]["w"].tobytes() == delta["w"].tobytes()


@pytest.mark.parametrize("crc", [zlib.crc32, zlib_ng.crc32])
def test_a_flipped_bit_in_the_middle_of_a_frame_is_refused_by_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crc: object
) -> None:
    monkeypatch.setattr(store_mod, "crc32", crc)
    _write(tmp_path)
    [wal] = sorted(tmp_path.glob("wal.*.log"))
    raw = bytearray(wal.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    wal.write_bytes(bytes(raw))
    with pytest.raises(CorruptStateError) as info, StateStore(tmp_path) as st_:
        st_.load()
    assert info.value.path == wal
