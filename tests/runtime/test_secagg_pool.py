"""The daemon's masking thread pool (runtime/secagg_pool.py): installed, masking splits
long vectors over real threads and gives the same words as on the calling thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fedloom.algorithms.secagg import masking
from fedloom.runtime import secagg_pool


def _case(n: int) -> tuple[np.ndarray, bytes, dict[str, bytes]]:
    rng = np.random.default_rng(7)
    pairs = {f"m{i}": rng.bytes(32) for i in range(1, 6)}
    return rng.integers(0, 2**32, n, dtype=np.uint32), rng.bytes(32), pairs


def test_installed_pool_masks_on_its_threads_with_the_same_words() -> None:
    n = masking.PARALLEL_MIN_WORDS + 3
    v, self_seed, pairs = _case(n)
    serial = masking.mask(v, self_seed, pairs, "m0")
    seen: set[str] = set()
    real_partial = masking._partial

    def spy(size: int, terms: masking.Terms) -> masking.U32:
        seen.add(threading.current_thread().name)
        return real_partial(size, terms)

    masking._partial = spy  # type: ignore[assignment]
    try:
        pool = secagg_pool.install(3)
        assert pool is not None
        assert masking._threads() == 3
        np.testing.assert_array_equal(masking.mask(v, self_seed, pairs, "m0"), serial)
        total = masking.unmask_sum([serial], [self_seed], [("m0", j, s) for j, s in pairs.items()])
        np.testing.assert_array_equal(total, v)
    finally:
        masking._partial = real_partial  # type: ignore[assignment]
        secagg_pool.uninstall()
    assert seen and all(name.startswith("secagg-mask") for name in seen)
    assert masking._threads() == 1  # uninstalled: back on the calling thread


def test_a_per_call_parallel_map_gives_the_same_words() -> None:
    n = masking.PARALLEL_MIN_WORDS + 1
    v, self_seed, pairs = _case(n)
    serial = masking.mask(v, self_seed, pairs, "m0")
    with ThreadPoolExecutor(2) as pool:
        np.testing.assert_array_equal(
            masking.mask(v, self_seed, pairs, "m0", parallel_map=pool.map), serial
        )


def test_one_worker_installs_nothing() -> None:
    assert secagg_pool.install(1) is None
    assert masking._threads() == 1
