"""Deterministic seeds shared by the simulator and the daemons.

Randomness never comes from a global RNG. ``entity_rng(seed, *keys)`` gives every entity
(a site's compute draws, its dropout draws, ...) its own ``numpy.random.Generator`` from
``SeedSequence([seed, *keys])``, with string keys hashed stably (not Python's salted
``hash``), so adding an entity never shifts another entity's stream. ``derived_seed`` names
a training job's seed the same way in both drivers, so a job trains identically in either.
"""

from __future__ import annotations

import hashlib
from typing import Final

import numpy as np


def stable_key(key: int | str) -> int:
    """A non-negative integer for ``key`` that is the same in every process and run."""
    if isinstance(key, bool):
        raise TypeError("stable_key: bool is not a valid key")
    if isinstance(key, int):
        return key & 0xFFFF_FFFF_FFFF_FFFF
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _words(key: int, out: list[int]) -> None:
    """Append ``key``'s 32-bit words, least significant first (``[0]`` for 0): how
    ``SeedSequence`` reads an int of its entropy list."""
    if key == 0:
        out.append(0)
    while key:
        out.append(key & 0xFFFF_FFFF)
        key >>= 32


def _seed_sequence(words: list[int]) -> np.random.SeedSequence:
    # The entropy as the uint32 words SeedSequence would make of the keys: the same pool
    # and streams as ``SeedSequence([k0, k1, ...])``, without its per-int conversions.
    return np.random.SeedSequence(np.array(words, dtype=np.uint32))


def seed_sequence(*keys: int) -> np.random.SeedSequence:
    """``SeedSequence([k0, k1, ...])`` of non-negative ints (the same pool and streams),
    built without its per-int conversions: a data set's per-site streams use it."""
    words: list[int] = []
    for k in keys:
        if k < 0:
            raise ValueError(f"seed_sequence: keys must be non-negative, got {k}")
        _words(int(k), words)
    return _seed_sequence(words)


def entity_seed(seed: int, *keys: int | str) -> np.random.SeedSequence:
    """The seed sequence of the entity named by ``keys`` within run ``seed``: that of
    ``SeedSequence([stable_key(seed), *map(stable_key, keys)])``."""
    words: list[int] = []
    _words(stable_key(seed), words)
    for k in keys:
        _words(stable_key(k), words)
    return _seed_sequence(words)


def entity_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """An independent generator for one entity (e.g. ``entity_rng(seed, "compute", site)``)."""
    return np.random.default_rng(entity_seed(seed, *keys))


class EntityRngs:
    """``entity_rng(seed, *prefix, *keys)`` for many entities under one prefix (a site's
    compute or dropout stream: ``EntityRngs(seed, "compute").rng(site)``), with the
    prefix's keys hashed once."""

    __slots__ = ("_prefix",)

    def __init__(self, seed: int, *prefix: int | str) -> None:
        words: list[int] = []
        _words(stable_key(seed), words)
        for k in prefix:
            _words(stable_key(k), words)
        self._prefix = tuple(words)

    def rng(self, *keys: int | str) -> np.random.Generator:
        words = list(self._prefix)
        for k in keys:
            _words(stable_key(k), words)
        return np.random.default_rng(_seed_sequence(words))


def derived_seed(seed: int, *keys: int | str) -> int:
    """A deterministic seed in [0, 2**31) for ``keys`` within run ``seed``.

    31 bits so that any consumer (``torch.manual_seed``, ``np.random.RandomState``,
    ``random.seed``) accepts it. A keyed hash, not a SeedSequence: it is called once per
    training job and must be cheap.
    """
    for k in keys:
        t = type(k)  # str and int first: the usual keys, without the isinstance calls
        if t is not str and t is not int and (isinstance(k, bool) or not isinstance(k, int | str)):
            raise TypeError(f"derived_seed: keys are ints or strings, got {k!r}")
    h = _SEED_HASH.copy()  # cheaper than building one from its parameters each time
    h.update(repr((int(seed), *keys)).encode("utf-8"))
    return int.from_bytes(h.digest(), "little") >> 1


class DerivedSeeds:
    """``derived_seed(seed, *prefix, key)`` for many keys under one prefix (a node's
    training jobs: ``DerivedSeeds(seed, "train", node_id).seed(job)``), the same seeds
    with the prefix's text written once: the text hashed is the ``repr`` of the tuple of
    keys, whose head is the same for every key."""

    __slots__ = ("_head", "key")

    def __init__(self, seed: int, *prefix: int | str) -> None:
        for k in prefix:
            _check_key(k)
        self.key = (seed, *prefix)
        # repr((seed, *prefix, key)) is this head, repr(key) and ")".
        self._head = "(" + "".join(f"{k!r}, " for k in (int(seed), *prefix))

    def seed(self, key: int | str) -> int:
        t = type(key)
        if t is not str and t is not int:
            _check_key(key)
        h = _SEED_HASH.copy()
        h.update((self._head + repr(key) + ")").encode("utf-8"))
        return int.from_bytes(h.digest(), "little") >> 1


def _check_key(k: object) -> None:
    if isinstance(k, bool) or not isinstance(k, int | str):
        raise TypeError(f"derived_seed: keys are ints or strings, got {k!r}")


# An empty keyed-by-personalisation hash: ``derived_seed`` copies it and feeds the text.
_SEED_HASH: Final = hashlib.blake2b(digest_size=4, person=b"fedloom-seed")
