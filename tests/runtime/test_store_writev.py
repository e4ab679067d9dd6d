"""The store writes each frame with ``os.writev`` and goes on after short writes: what it
wrote reads back bit for bit, however the kernel splits the calls."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import Persist
from fedloom.federation import store as store_mod
from fedloom.federation.store import StateStore
from fedloom.transport.half import half_to_float, remember_half


def _records(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Arrays of several dtypes and sizes, an fp16-decoded delta (written as its float16,
    a memoryview of 2-byte items) and more tensors than one ``writev`` takes."""
    half = (rng.standard_normal(10_000) * 1e-3).astype(np.float16)
    decoded = half_to_float(half)
    decoded.flags.writeable = False
    remember_half(decoded, half.copy())
    many = {f"t{i}": np.full(3, i, np.float32) for i in range(store_mod._IOV_MAX + 100)}
    return [
        {"delta": decoded, "f64": rng.standard_normal((7, 9)), "i8": np.arange(5, dtype=np.int8)},
        {"many": many},
        {"model": rng.standard_normal(50_000).astype(np.float32), "note": "x" * 300},
    ]


def _check(path: Path, written: list[dict[str, Any]]) -> None:
    with StateStore(path) as st:
        got = st.load().records("log")
    assert len(got) == len(written)
    for g, w in zip(got, written, strict=True):
        assert g.keys() == w.keys()
    assert got[0]["delta"].tobytes() == written[0]["delta"].tobytes()
    assert got[0]["f64"].tobytes() == written[0]["f64"].tobytes()
    assert got[0]["i8"].tobytes() == written[0]["i8"].tobytes()
    assert {k: v.tolist() for k, v in got[1]["many"].items()} == {
        k: v.tolist() for k, v in written[1]["many"].items()
    }
    assert got[2]["model"].tobytes() == written[2]["model"].tobytes()
    assert got[2]["note"] == written[2]["note"]


def test_records_round_trip_through_writev(tmp_path: Path) -> None:
    recs = _records(np.random.default_rng(0))
    with StateStore(tmp_path / "s") as st:
        st.load()
        st.apply_many([Persist("log", r, append=True) for r in recs])
    _check(tmp_path / "s", recs)


def test_short_writes_are_resumed_where_they_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that takes at most 777 bytes and 3 buffers a call (cutting items of the
    float16 view in half): every byte still lands once, in order."""
    real = os.writev
    calls = 0

    def short_writev(fd: int, buffers: Any) -> int:
        nonlocal calls
        calls += 1
        taken, left = [], 777
        for b in list(buffers)[:3]:
            piece = memoryview(b)[:left]
            taken.append(piece)
            left -= piece.nbytes
            if not left:
                break
        return real(fd, taken)

    monkeypatch.setattr(store_mod.os, "writev", short_writev)
    recs = _records(np.random.default_rng(1))
    with StateStore(tmp_path / "s") as st:
        st.load()
        st.apply_many([Persist("log", r, append=True) for r in recs[:2]])
        st.apply_many([Persist("log", recs[2], append=True)])  # a second frame after it
        st.apply(Persist("value", {"model": recs[2]["model"]}))  # a replaced file, too
    assert calls > 300
    monkeypatch.setattr(store_mod.os, "writev", real)
    _check(tmp_path / "s", recs)
    with StateStore(tmp_path / "s") as st:
        value = st.load().values["value"]
    assert value["model"].tobytes() == recs[2]["model"].tobytes()


def test_a_write_that_makes_no_progress_breaks_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with StateStore(tmp_path / "s") as st:
        st.load()
        monkeypatch.setattr(store_mod.os, "writev", lambda fd, buffers: 0)
        with pytest.raises(OSError, match="no progress"):
            st.apply(Persist("log", {"a": np.zeros(10_000, np.float32)}, append=True))
        with pytest.raises(store_mod.StoreError, match="earlier write failed"):
            st.apply(Persist("log", {"a": 1}, append=True))
