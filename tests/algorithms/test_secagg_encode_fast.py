"""The member's and the coordinator's hot paths, made cheaper for bench/secagg.py, give the
same results: ``encode`` equals the plain formula (float64 flatten, L2 clip, weight,
stochastic rounding with the same draws, integer noise, mod 2^32) bit for bit, ``digest``
remembers large inputs by identity without ever answering for other bytes, and masking or
unmasking split over threads gives the same words as on one."""

from __future__ import annotations

import hashlib
import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.secagg import cohort, masking
from fedloom.algorithms.secagg.field import FieldSpec, encode, flatten, sum_of_squares
from fedloom.federation.signing import masked_digest
from fedloom.transport.wire import MaskedUpdate


def reference_encode(
    delta: dict[str, np.ndarray],
    weight: float,
    spec: FieldSpec,
    rng: np.random.Generator,
    noise: np.ndarray | None,
) -> np.ndarray:
    x = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in delta.values()])
    norm = math.sqrt(sum_of_squares(x))
    factor = weight * spec.scale
    if norm > spec.clip:
        factor *= spec.clip / norm
    y = x * factor
    floor = np.floor(y)
    ints = floor.astype(np.int64) + (rng.random(x.size) < (y - floor))
    if noise is not None:
        ints += noise
    return np.append(ints.astype(np.uint32), np.uint32(round(weight * spec.scale)))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    scale=st.sampled_from([1e-4, 1e-2, 1.0, 50.0]),
    clip=st.sampled_from([0.5, 2.0, 100.0]),
    bits=st.integers(4, 20),
    weight=st.floats(0.0, 1.0),
    with_noise=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_encode_is_the_plain_formula(
    sizes: list[int],
    dtype: type,
    scale: float,
    clip: float,
    bits: int,
    weight: float,
    with_noise: bool,
    seed: int,
) -> None:
    gen = np.random.default_rng(seed)
    delta = {f"t{i}": (gen.standard_normal(n) * scale).astype(dtype) for i, n in enumerate(sizes)}
    d = sum(sizes)
    noise = gen.integers(-5000, 5000, d) if with_noise else None
    spec = FieldSpec(clip, bits, 1)
    got = encode(delta, weight, spec, np.random.default_rng(seed + 1), noise)
    want = reference_encode(delta, weight, spec, np.random.default_rng(seed + 1), noise)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        flatten(delta), np.concatenate([v.astype(np.float64) for v in delta.values()])
    )


def test_encode_still_refuses_non_finite_and_bad_noise() -> None:
    spec = FieldSpec(1.0, 16, 1)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            encode({"a": np.array([1.0, bad])}, 1.0, spec, np.random.default_rng(0))
    with pytest.raises(ValueError, match="noise"):
        encode({"a": np.ones(3)}, 1.0, spec, np.random.default_rng(0), np.ones(3))
    # A finite delta whose sum of squares overflows is clipped to zero, as before.
    huge = encode({"a": np.array([1e300, 1e300])}, 1.0, spec, np.random.default_rng(0))
    assert huge[:2].tolist() == [0, 0]


def test_digest_remembers_by_identity_only() -> None:
    a = bytes(range(256)) * 1024  # 256 KiB: remembered
    b = bytearray(a)  # equal bytes, another object: hashed on its own
    want = hashlib.sha256(a).digest()
    assert cohort.digest(a) == want
    assert cohort.digest(a) == want
    assert cohort.digest(bytes(b)) == want
    other = bytes(len(a))
    assert cohort.digest(other) == hashlib.sha256(other).digest()
    for _ in range(6):  # older entries fall out; answers stay right
        fresh = np.random.default_rng(len(cohort._recent_digests)).bytes(1 << 17)
        assert cohort.digest(fresh) == hashlib.sha256(fresh).digest()
    assert cohort.digest(a) == want
    assert len(cohort._recent_digests) <= cohort._REMEMBER


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 3000),
    scale=st.sampled_from([1e-300, 1e-3, 1.0, 50.0, 1e200]),
    seed=st.integers(0, 2**32 - 1),
)
def test_sum_of_squares_is_the_squared_norm(n: int, scale: float, seed: int) -> None:
    """encode's and the coordinator's Σ x² (off BLAS: a long ``x.dot(x)`` runs in
    OpenBLAS's thread pool, whose threads then spin for ~12 ms of CPU per million
    coordinates) is the exact sum to rounding, inf when the squares overflow."""
    x = np.random.default_rng(seed).standard_normal(n) * scale
    want = math.fsum(float(v) * float(v) for v in x)
    got = sum_of_squares(x)
    if math.isinf(want):
        assert got == math.inf  # encode then clips everything to 0
    else:
        assert got == pytest.approx(want, rel=1e-12, abs=0.0)
    assert math.isnan(sum_of_squares(np.array([1.0, np.nan])))


def test_masked_digest_reuses_the_members_digest() -> None:
    data = np.random.default_rng(3).bytes(1 << 18)
    msg = MaskedUpdate("s", 1, bytes(16), 0, 1, data, (("t", b"box"),))
    first = masked_digest(msg)
    assert cohort._recent_digests[0][0] is data  # remembered from the signing's call
    assert masked_digest(msg) == first
    changed = MaskedUpdate("s", 1, bytes(16), 0, 1, data[:-4] + b"\0\0\0\1", (("t", b"box"),))
    assert masked_digest(changed) != first


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_masking_over_threads_gives_the_same_words(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = masking.PARALLEL_MIN_WORDS + 5  # long enough to be split
    rng = np.random.default_rng(threads)
    members = [f"m{i}" for i in range(6)]
    vecs = {m: rng.integers(0, 2**32, n, dtype=np.uint32) for m in members}
    seeds = {m: rng.bytes(32) for m in members}
    pair = {frozenset((a, b)): rng.bytes(32) for a in members for b in members if a < b}

    def masked(m: str) -> np.ndarray:
        return masking.mask(
            vecs[m], seeds[m], {j: pair[frozenset((m, j))] for j in members if j != m}, m
        )

    monkeypatch.setattr(masking, "_threads", lambda: 1)
    serial = {m: masked(m) for m in members}
    monkeypatch.setattr(masking, "_threads", lambda: threads)
    for m in members:
        np.testing.assert_array_equal(masked(m), serial[m])
    survivors, dropped = members[:4], members[4:]
    total = masking.unmask_sum(
        [masked(m) for m in survivors],
        [seeds[m] for m in survivors],
        [(i, j, pair[frozenset((i, j))]) for i in survivors for j in dropped],
    )
    want = np.zeros(n, dtype=np.uint32)
    for m in survivors:
        want += vecs[m]
    np.testing.assert_array_equal(total, want)  # the masks cancel, whatever the split


@pytest.mark.parametrize("noise_dtype", [None, np.int64, np.int32])
def test_encode_in_blocks_draws_as_one_vector(noise_dtype: type | None) -> None:
    from fedloom.algorithms.secagg import field

    d = 3 * field._BLOCK + 7  # several blocks and a short last one
    gen = np.random.default_rng(11)
    delta = {"a": gen.standard_normal(d - 100).astype(np.float32), "b": gen.standard_normal(100)}
    noise = None if noise_dtype is None else gen.integers(-(2**20), 2**20, d).astype(noise_dtype)
    spec = FieldSpec(2.0, 16, 1)
    got = encode(delta, 0.75, spec, np.random.default_rng(5), noise)
    ref_noise = None if noise is None else noise.astype(np.int64)
    want = reference_encode(delta, 0.75, spec, np.random.default_rng(5), ref_noise)
    np.testing.assert_array_equal(got, want)


def test_an_older_members_masked_payload_is_not_this_versions() -> None:
    # A member on code before the SHA-256 data digest signed the old label over a BLAKE2b
    # data digest: that payload digest must differ from this version's (so its signature
    # never verifies here) even for the same upload.
    data = np.random.default_rng(4).bytes(4096)
    msg = MaskedUpdate("s", 1, bytes(16), 0, 1, data, (("t", b"box"),))
    bundles = hashlib.blake2b(
        msgpack.packb([["t", b"box"]], use_bin_type=True), digest_size=32
    ).digest()
    old_data = hashlib.blake2b(data, digest_size=32).digest()
    for label, digest in (
        ("fedloom/secagg/masked", old_data),  # what an older member signs
        ("fedloom/secagg/masked", hashlib.sha256(data).digest()),  # old label, new digest
    ):
        packed = msgpack.packb([label, bytes(16), digest, bundles])
        assert hashlib.blake2b(packed, digest_size=32).digest() != masked_digest(msg)
    # This version's payload is the v2 label over SHA-256 of the data.
    packed = msgpack.packb(
        ["fedloom/secagg/masked-v2", bytes(16), hashlib.sha256(data).digest(), bundles]
    )
    assert hashlib.blake2b(packed, digest_size=32).digest() == masked_digest(msg)
