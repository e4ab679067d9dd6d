"""Reusable memory for large decoded tensors.

An aggregator decodes a long run of same-shaped updates, each into freshly allocated
arrays. Once the heap has fragmented, fresh memory means first-touch page faults: about
25 ms per 100 MB on these machines, as much as decrypting the bytes. The pool hands out
the memory of earlier decoded tensors that nobody uses any more, so steady-state decoding
writes into pages that are already mapped.

A pooled buffer is free when only the pool refers to it: every tensor handed out is a
view of it, and a numpy view keeps its base alive (CPython reference counts tell). The
pool keeps at most ``max_bytes`` of buffers, reuses only exact sizes, and leaves arrays
below ``min_bytes`` to numpy's allocator.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

_FREE_REFS = 3  # the pool's list, the loop variable, and getrefcount's own argument


class BufferPool:
    """Hands out uninitialised 1-D arrays, reusing big buffers that are no longer used."""

    def __init__(self, max_bytes: int = 512 << 20, min_bytes: int = 4 << 20) -> None:
        if max_bytes < 0 or min_bytes < 1:
            raise ValueError("max_bytes must be >= 0 and min_bytes >= 1")
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._buffers: list[npt.NDArray[np.uint8]] = []
        self._lock = threading.Lock()  # decoders run on the loop thread and in workers
        self.reused = 0

    @property
    def pooled_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    def empty(self, count: int, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        """Like ``np.empty(count, dtype)``; the contents are arbitrary."""
        nbytes = count * dtype.itemsize
        if nbytes < self.min_bytes or nbytes > self.max_bytes:
            return np.empty(count, dtype=dtype)
        with self._lock:
            match, free = self._scan(nbytes)
            if match is not None:
                self.reused += 1
                return match.view(dtype)
            # Make room by dropping free buffers of other sizes.
            for i in reversed(free):
                if self.pooled_bytes + nbytes <= self.max_bytes:
                    break
                del self._buffers[i]
            buf = np.empty(nbytes, dtype=np.uint8)
            if self.pooled_bytes + nbytes <= self.max_bytes:
                self._buffers.append(buf)
            return buf.view(dtype)

    def _scan(self, nbytes: int) -> tuple[npt.NDArray[np.uint8] | None, list[int]]:
        """A free buffer of exactly ``nbytes`` (or None), and the indices of free ones."""
        free = []
        for i in range(len(self._buffers)):
            buf = self._buffers[i]
            if sys.getrefcount(buf) == _FREE_REFS:
                if buf.nbytes == nbytes:
                    return buf, []
                free.append(i)
        return None, free


DECODED = BufferPool()  # the pool every tensor stream decodes into
