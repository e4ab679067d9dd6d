"""The decoded-tensor pool reuses memory only once nothing refers to it."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.transport.buffer_pool import BufferPool
from fedloom.transport.streaming import TensorStreamDecoder, TensorStreamEncoder

F4 = np.dtype("<f4")
MiB = 1 << 20


def test_a_buffer_is_reused_only_after_every_view_of_it_is_gone() -> None:
    pool = BufferPool(max_bytes=64 * MiB, min_bytes=MiB)
    a = pool.empty(MiB, F4)
    b = pool.empty(MiB, F4)
    assert not np.shares_memory(a, b) and pool.reused == 0
    view = a.reshape(1024, 1024)[3]  # a view of a view still holds the buffer
    del a
    c = pool.empty(MiB, F4)
    assert not np.shares_memory(c, view) and pool.reused == 0
    base = view.base
    del view, base
    d = pool.empty(MiB, F4)
    assert pool.reused == 1 and not np.shares_memory(d, b) and not np.shares_memory(d, c)


def test_only_exact_sizes_are_reused_and_small_or_huge_arrays_bypass_the_pool() -> None:
    pool = BufferPool(max_bytes=16 * MiB, min_bytes=MiB)
    pool.empty(MiB, F4)  # 4 MiB, pooled and immediately free
    assert pool.pooled_bytes == 4 * MiB
    pool.empty(MiB + 1, F4)
    assert pool.reused == 0
    pool.empty(10, F4)  # below min_bytes
    pool.empty(5 * MiB, F4)  # 20 MiB: above max_bytes
    assert pool.pooled_bytes <= 16 * MiB and pool.reused == 0
    pool.empty(MiB + 1, F4)
    assert pool.reused == 1


def test_free_buffers_of_other_sizes_make_room_busy_ones_stay() -> None:
    pool = BufferPool(max_bytes=11 * MiB, min_bytes=MiB)
    busy = pool.empty(MiB, F4)  # 4 MiB, held
    pool.empty(MiB // 2, F4)  # 2 MiB, free
    pool.empty(3 * MiB // 2, F4)  # 6 MiB: the free 2 MiB buffer goes to make room
    assert pool.pooled_bytes == 10 * MiB
    assert busy.base is not None and any(b is busy.base for b in pool._buffers)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        BufferPool(max_bytes=-1)
    with pytest.raises(ValueError):
        BufferPool(min_bytes=0)


def test_consecutive_decodes_reuse_memory_once_the_first_is_dropped() -> None:
    tensors = {"w": np.random.default_rng(0).standard_normal(2 * MiB).astype(np.float32)}
    encoder = TensorStreamEncoder(tensors)
    pieces = [bytes(encoder.next_piece()) for _ in range(encoder.n_pieces)]

    def decode() -> dict[str, np.ndarray]:
        decoder = TensorStreamDecoder(encoder.manifest)
        for piece in pieces:
            decoder.feed_piece(piece)
        return dict(decoder.finish())

    first = decode()
    second = decode()  # the first is alive: fresh memory
    assert not np.shares_memory(first["w"], second["w"])
    address = first["w"].__array_interface__["data"][0]
    del first
    third = decode()
    assert third["w"].__array_interface__["data"][0] == address  # the first's memory
    assert np.array_equal(third["w"], tensors["w"]) and np.array_equal(second["w"], tensors["w"])
