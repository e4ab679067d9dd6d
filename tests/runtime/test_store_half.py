"""The store keeps float32 arrays that are exactly float16 (deltas that travelled fp16) as
float16, and gives back the very same float32 bits: a recovered aggregator equals the live
one, with a write-ahead log half the size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Persist, Received
from fedloom.algorithms.server_opt import ServerAdam
from fedloom.federation.store import StateStore, decode_state, encode_state
from fedloom.transport.wire import Hello, Update

N = 20_000  # elements: above the store's threshold for trying float16


def frame_bytes(obj: Any) -> int:
    return sum(memoryview(p).nbytes for p in encode_state(obj))


def round_trip(obj: Any) -> Any:
    parts = [bytes(p) for p in encode_state(obj)]
    head_len = int.from_bytes(parts[1], "little")
    body = b"".join(parts[2:])
    return decode_state(body[:head_len], body[head_len:])


def halves(seed: int, n: int = N) -> np.ndarray:
    """float32 values that are all exactly float16, with the awkward ones among them."""
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal(n) * 1e-3).astype(np.float16)
    h[:6] = [-0.0, 0.0, 6e-8, -65504.0, np.inf, -np.inf]  # signed zero, subnormal, extremes
    h[6] = np.float16("nan")
    return h.astype(np.float32)


def test_exact_float16_values_are_stored_as_float16_and_read_back_bit_for_bit() -> None:
    arr = halves(1).reshape(100, -1)
    back = round_trip({"delta": arr})["delta"]
    assert back.dtype == np.float32 and back.shape == arr.shape
    assert back.tobytes() == arr.tobytes()  # NaN, -0.0 and subnormals included
    assert frame_bytes({"delta": arr}) < arr.nbytes * 0.55


def test_arrays_that_are_not_exactly_float16_stay_float32() -> None:
    almost = halves(2)
    almost[N - 1] += np.float32(1e-7)  # one value off, far from the probed head
    weights = np.random.default_rng(3).standard_normal(N).astype(np.float32)
    for arr in (almost, weights):
        back = round_trip([arr])[0]
        assert back.dtype == np.float32 and back.tobytes() == arr.tobytes()
        assert frame_bytes([arr]) > arr.nbytes
    small = halves(4, 100)  # below the threshold: not worth a check
    assert frame_bytes([small]) > small.nbytes
    raw16 = halves(5).astype(np.float16)  # float16 arrays keep their dtype
    back16 = round_trip([raw16])[0]
    assert back16.dtype == np.float16 and back16.tobytes() == raw16.tobytes()


SITES = {f"s{i}": "site" for i in range(3)}


def make_root() -> FedBuffAggregator:
    weights = {
        "w": np.random.default_rng(0).standard_normal((N // 10, 10)).astype(np.float32),
        "b": np.zeros(10, np.float32),
    }
    return FedBuffAggregator(
        "root", SITES, weights, buffer_size=3, concurrency=0,
        server_opt=ServerAdam(lr=0.1), checkpoint_every=2,
    )  # fmt: skip


def updates(n: int, exact: bool) -> list[Received]:
    rng = np.random.default_rng(7)
    events = [Received(s, Hello(s, "site")) for s in SITES]
    for i in range(n):
        src = f"s{i % 3}"
        delta = {
            "w": (rng.standard_normal((N // 10, 10)) * 1e-2).astype(np.float16).astype(np.float32),
            "b": rng.standard_normal(10).astype(np.float32),
        }
        if not exact:  # nudged off the float16 grid
            noise = np.float32(1e-9) * rng.standard_normal(delta["w"].shape)
            delta["w"] = (delta["w"] + noise).astype(np.float32)
        events.append(Received(src, Update(src, i // 3 + 1, i // 3 // 3, delta, 5)))
    return events


def run_and_recover(directory: Path, events: list[Received]) -> tuple[Any, Any, int]:
    live = make_root()
    store = StateStore(directory)
    store.load()
    for ev in events:
        store.apply_many([e for e in live.handle(ev, 0.0) if isinstance(e, Persist)])
    store.close()
    wal_bytes = sum(p.stat().st_size for p in directory.glob("wal.*"))
    store = StateStore(directory)
    rec = store.load()
    store.close()
    back = make_root()
    back.restore(rec.checkpoint, rec)
    return live, back, wal_bytes


def same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    else:
        assert a == b


def test_a_fedbuff_root_recovered_from_float16_records_equals_the_live_one(tmp_path: Path) -> None:
    # 11 updates, buffer 3, a checkpoint every 2 versions: the log after the checkpoint
    # holds 5 records, replayed through one more flush (Adam step) into the buffer.
    live, back, exact_bytes = run_and_recover(tmp_path / "exact", updates(11, exact=True))
    same(back.snapshot(), live.snapshot())
    assert back.version == live.version == 3
    assert back._buffer.snapshot()["kept"][0]["w"].dtype == np.float32
    live2, back2, inexact_bytes = run_and_recover(tmp_path / "inexact", updates(11, exact=False))
    same(back2.snapshot(), live2.snapshot())
    assert exact_bytes < 0.6 * inexact_bytes  # the float16 records are half the size
