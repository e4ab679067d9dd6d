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

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.secagg.prg import Expander

U32 = npt.NDArray[np.uint32]
Terms = Sequence[tuple[bytes, int]]
# A callable like ``concurrent.futures.Executor.map``: ``fn`` over ``items``, results in order.
ParallelMap = Callable[[Callable[[Terms], U32], Iterable[Terms]], Iterator[U32]]

# Expanding seeds is most of masking's and unmasking's time, and both libsodium (through
# cffi) and NumPy's adds release the GIL: long vectors with several seeds may be split
# over a few workers, each summing its share of the masks into its own buffer. Nodes are
# sans-I/O and start no threads: a DRIVER injects the workers, either per call
# (``parallel_map=``) or process-wide with ``use_parallel_map`` (the daemon installs a
# thread pool at start, ``fedloom.runtime.secagg_pool``). Without one, masking runs on
# the calling thread. Sums mod 2^32 do not depend on the order, so the result is the
# same words on any number of workers.
PARALLEL_MIN_WORDS = 1 << 18
PER_CALL_WAYS = 4  # ways a call that passes its own ``parallel_map`` is split
_default_map: tuple[ParallelMap, int] | None = None  # (map, workers) from use_parallel_map


def use_parallel_map(parallel_map: ParallelMap | None, workers: int = 1) -> None:
    """Make ``parallel_map`` (with ``workers`` workers) the default of every later
    ``mask``/``unmask_sum`` call in this process; ``None`` goes back to sequential."""
    global _default_map
    use = parallel_map is not None and workers >= 2
    _default_map = (parallel_map, int(workers)) if use and parallel_map else None


def _threads() -> int:
    """How many ways a long masking is split: the installed map's workers, else 1."""
    installed = _default_map
    return installed[1] if installed is not None else 1


def _sequential_map(fn: Callable[[Terms], U32], items: Iterable[Terms]) -> Iterator[U32]:
    return map(fn, items)


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


def _partial(n: int, terms: Terms) -> U32:
    acc = np.zeros(n, dtype=np.uint32)
    prg = Expander(n)
    for seed, sign in terms:
        _apply(acc, prg, seed, sign)
    return acc


def _accumulate(acc: U32, terms: Terms, parallel_map: ParallelMap | None = None) -> None:
    """``acc += Σ sign · PRG(seed)`` over ``terms`` in place (mod 2^32); split over the
    workers of ``parallel_map`` (else the installed default, see ``use_parallel_map``)
    when the vector is long and there are several seeds (``PARALLEL_MIN_WORDS``)."""
    n = acc.size
    installed = _default_map
    pmap = parallel_map or (installed[0] if installed is not None else _sequential_map)
    ways = _threads() if parallel_map is None else PER_CALL_WAYS
    k = min(ways, len(terms))
    if k < 2 or n < PARALLEL_MIN_WORDS:
        prg = Expander(n)
        for seed, sign in terms:
            _apply(acc, prg, seed, sign)
        return
    parts = [terms[i::k] for i in range(k)]
    others = pmap(partial(_partial, n), parts[1:])  # Executor.map submits them now
    prg = Expander(n)
    for seed, sign in parts[0]:  # this thread's share goes straight into acc
        _apply(acc, prg, seed, sign)
    for part in others:
        np.add(acc, part, out=acc)


def mask(
    v: U32,
    self_seed: bytes,
    pair_seeds: Mapping[str, bytes],
    me: str,
    parallel_map: ParallelMap | None = None,
    *,
    in_place: bool = False,
) -> U32:
    """``v + PRG(self_seed) + Σ_j pair_sign(me, j) · PRG(pair_seeds[j])`` mod 2^32, as a new
    array (``v`` is not modified), or into ``v`` itself with ``in_place`` (a vector the
    caller owns and drops: no 4-byte-per-coordinate copy). ``pair_seeds`` maps every other
    member to the seed ``me`` shares with it. ``parallel_map``: see ``_accumulate``."""
    vec = _as_u32(v, "v")
    if me in pair_seeds:
        raise ValueError(f"pair_seeds names {me!r} itself")
    out = vec if in_place and vec.flags.writeable else vec.copy()
    terms = [(self_seed, 1), *((seed, pair_sign(me, peer)) for peer, seed in pair_seeds.items())]
    _accumulate(out, terms, parallel_map)
    return out


def add_pair_masks(
    v: U32,
    pair_seeds: Mapping[str, bytes],
    me: str,
    parallel_map: ParallelMap | None = None,
    *,
    in_place: bool = False,
) -> U32:
    """``v + Σ_j pair_sign(me, j) · PRG(pair_seeds[j])`` mod 2^32, as a new array (or into
    ``v`` with ``in_place``, as ``mask``): the seal-dependent half of ``mask`` for a ``v``
    that already carries ``PRG(self_seed)``
    (``mask(v, b, pairs, me) == add_pair_masks(mask(v, b, {}, me), pairs, me)``)."""
    vec = _as_u32(v, "v")
    if me in pair_seeds:
        raise ValueError(f"pair_seeds names {me!r} itself")
    out = vec if in_place and vec.flags.writeable else vec.copy()
    _accumulate(
        out, [(seed, pair_sign(me, peer)) for peer, seed in pair_seeds.items()], parallel_map
    )
    return out


def unmask_sum(
    masked: Iterable[U32],
    self_seeds: Iterable[bytes],
    pair_seeds: Iterable[tuple[str, str, bytes]],
    parallel_map: ParallelMap | None = None,
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
    _accumulate(total, terms, parallel_map)
    return total
