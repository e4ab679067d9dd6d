"""Double masking over Z_{2^32} (numpy ``uint32`` arithmetic wraps around).

Member i uploads

    y_i = v_i + PRG(b_i) + Σ_{j ≠ i} sign(i, j) · PRG(s_ij),   sign(i, j) = +1 if i < j else -1,

where b_i is its fresh self seed and s_ij = s_ji the seed it shares with j. As sign(j, i) =
-sign(i, j), the pairwise terms of two members who both uploaded cancel in the sum. For a
set U of uploaders and D of members that did not upload:

    Σ_{i∈U} y_i = Σ_{i∈U} v_i + Σ_{i∈U} PRG(b_i) + Σ_{i∈U, j∈D} sign(i, j) · PRG(s_ij)

(pairs inside U cancel; pairs with j ∈ D have no partner term). So ``unmask_sum`` takes
Σ y, subtracts PRG(b_i) for i ∈ U and sign(i, j) · PRG(s_ij) for every (i ∈ U, j ∈ D),
and what is left is Σ_{i∈U} v_i. The aggregator is given b_i only for i ∈ U and s_ij only
for j ∈ D (never both for one member), which is the double-masking argument in the
protocol's docstring.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.secagg.prg import Expander

U32 = npt.NDArray[np.uint32]

# Expanding seeds is most of masking's and unmasking's time, and both libsodium (through
# cffi) and NumPy's adds release the GIL: long vectors with several seeds are split over
# a few threads, each summing its share of the masks into its own buffer. Sums mod 2^32
# do not depend on the order, so the result is the same words on any number of threads.
PARALLEL_MIN_WORDS = 1 << 18
MAX_THREADS = 4
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, pool)
_pool_lock = threading.Lock()


def _threads() -> int:
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    """The module's thread pool (made again in a forked child: threads do not survive)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            made = ThreadPoolExecutor(_threads(), thread_name_prefix="secagg-mask")
            _pool = (os.getpid(), made)
        return _pool[1]


def pair_sign(a: str, b: str) -> int:
    """+1 if ``a < b`` else -1: the sign with which ``a`` applies the mask it shares with
    ``b`` (``ValueError`` if they are the same member)."""
    if a == b:
        raise ValueError(f"a member has no pair mask with itself ({a!r})")
    return 1 if a < b else -1


def _as_u32(v: object, what: str) -> U32:
    arr = np.asarray(v)
    if arr.dtype != np.uint32 or arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-d uint32 vector, got {arr.dtype} {arr.shape}")
    return arr


def _apply(acc: U32, prg: Expander, seed: bytes, sign: int) -> None:
    """``acc += sign · PRG(seed)`` in place (mod 2^32)."""
    stream = prg.expand(seed)
    if sign > 0:
        np.add(acc, stream, out=acc)
    else:
        np.subtract(acc, stream, out=acc)


def _partial(n: int, terms: Sequence[tuple[bytes, int]]) -> U32:
    acc = np.zeros(n, dtype=np.uint32)
    prg = Expander(n)
    for seed, sign in terms:
        _apply(acc, prg, seed, sign)
    return acc


def _accumulate(acc: U32, terms: Sequence[tuple[bytes, int]]) -> None:
    """``acc += Σ sign · PRG(seed)`` over ``terms`` in place (mod 2^32), over threads when
    the vector is long and there are several seeds (see ``PARALLEL_MIN_WORDS``)."""
    n = acc.size
    k = min(_threads(), len(terms))
    if k < 2 or n < PARALLEL_MIN_WORDS:
        prg = Expander(n)
        for seed, sign in terms:
            _apply(acc, prg, seed, sign)
        return
    parts = [terms[i::k] for i in range(k)]
    pool = _executor()
    futures = [pool.submit(_partial, n, part) for part in parts[1:]]
    prg = Expander(n)
    for seed, sign in parts[0]:  # this thread's share goes straight into acc
        _apply(acc, prg, seed, sign)
    for f in futures:
        np.add(acc, f.result(), out=acc)


def mask(v: U32, self_seed: bytes, pair_seeds: Mapping[str, bytes], me: str) -> U32:
    """``v + PRG(self_seed) + Σ_j pair_sign(me, j) · PRG(pair_seeds[j])`` mod 2^32, as a new
    array (``v`` is not modified). ``pair_seeds`` maps every other member to the seed
    ``me`` shares with it."""
    vec = _as_u32(v, "v")
    if me in pair_seeds:
        raise ValueError(f"pair_seeds names {me!r} itself")
    out = vec.copy()
    terms = [(self_seed, 1), *((seed, pair_sign(me, peer)) for peer, seed in pair_seeds.items())]
    _accumulate(out, terms)
    return out


def unmask_sum(
    masked: Iterable[U32],
    self_seeds: Iterable[bytes],
    pair_seeds: Iterable[tuple[str, str, bytes]],
) -> U32:
    """Σ_{i∈U} v_i from the survivors' masked vectors ``masked``, their self seeds
    ``self_seeds`` (b_i, i ∈ U) and the triples ``(i, j, s_ij)`` for every survivor i and
    dropped member j: Σ y − Σ PRG(b_i) − Σ pair_sign(i, j) · PRG(s_ij).

    One accumulator and one PRG scratch buffer per thread are allocated; ``ValueError``
    for no vectors or vectors of different lengths or types.
    """
    total: U32 | None = None
    for k, y in enumerate(masked):
        arr = _as_u32(y, f"masked vector {k}")
        if total is None:
            total = arr.copy()
        elif arr.size != total.size:
            raise ValueError(f"masked vector {k} has {arr.size} coordinates, expected {total.size}")
        else:
            np.add(total, arr, out=total)
    if total is None:
        raise ValueError("unmask_sum needs at least one masked vector")
    terms = [(seed, -1) for seed in self_seeds]
    # y_survivor carries +pair_sign(survivor, dropped) · PRG(s): take it back out.
    terms += [(seed, -pair_sign(i, j)) for i, j, seed in pair_seeds]
    _accumulate(total, terms)
    return total
