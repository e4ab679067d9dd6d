"""The daemon's worker threads for secure aggregation's masking and unmasking.

``fedloom.algorithms`` starts no threads (nodes are sans-I/O; the algorithms-pure import
contract forbids ``threading``), but expanding seeds (libsodium through cffi) and NumPy's
adds release the GIL, so a long masked vector is split over a few threads. The daemon
calls ``install()`` once at start: a process-wide ``ThreadPoolExecutor`` whose ``map``
``fedloom.algorithms.secagg.masking`` then uses by default. The words are the same with
or without it (sums mod 2^32 do not depend on the order).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from fedloom.algorithms.secagg import masking

MAX_THREADS = 4
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, pool)


def threads() -> int:
    """Workers for this machine: its cores, at most ``MAX_THREADS``."""
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def install(workers: int | None = None) -> ThreadPoolExecutor | None:
    """Make a thread pool masking's default (again in a forked child: threads do not
    survive a fork). ``None`` (and nothing installed) on a one-core machine."""
    global _pool
    n = threads() if workers is None else workers
    if n < 2:
        masking.use_parallel_map(None)
        return None
    if _pool is None or _pool[0] != os.getpid() or _pool[1]._max_workers != n:
        _pool = (os.getpid(), ThreadPoolExecutor(n, thread_name_prefix="secagg-mask"))
    masking.use_parallel_map(_pool[1].map, n)
    return _pool[1]


def uninstall() -> None:
    """Back to masking on the calling thread; the pool's threads are stopped."""
    global _pool
    masking.use_parallel_map(None)
    if _pool is not None:
        _pool[1].shutdown(wait=True)
        _pool = None
