"""Shamir sharing over GF(2^521 - 1): any t rebuild, t - 1 say nothing, parsers are total."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.secagg import shamir
from fedloom.algorithms.secagg.cohort import byte_stream
from fedloom.algorithms.secagg.shamir import PRIME, SHARE_BYTES, ShareError


def _seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


@settings(max_examples=150, deadline=None)
@given(data=st.data(), secret=st.binary(min_size=32, max_size=32), seed=st.integers(0, 2**32))
def test_any_t_of_n_shares_reconstruct(data: st.DataObject, secret: bytes, seed: int) -> None:
    n = data.draw(st.integers(1, 12))
    t = data.draw(st.integers(1, n))
    shares = shamir.split(secret, n, t, _seeded(seed))
    assert len(shares) == n and all(len(s) == SHARE_BYTES for s in shares)
    xs = data.draw(st.lists(st.integers(1, n), min_size=t, max_size=n, unique=True))
    assert shamir.reconstruct({x: shares[x - 1] for x in xs}, t, n) == secret


def _poly_mul(a: list[int], b: list[int]) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] = (out[i + j] + x * y) % PRIME
    return out


def _feeder(values: list[int]) -> Callable[[int], bytes]:
    it: Iterator[int] = iter(values)

    def randbytes(k: int) -> bytes:
        assert k == SHARE_BYTES
        return next(it).to_bytes(SHARE_BYTES, "big")

    return randbytes


@pytest.mark.parametrize(("n", "t"), [(3, 2), (5, 3), (10, 6), (50, 26)])
def test_t_minus_1_shares_of_two_different_secrets_can_be_equal(n: int, t: int) -> None:
    """For secrets s1 != s2 and any polynomial f1 for s1 there is a polynomial f2 for s2
    that agrees with f1 at x = 1..t-1: f2 = f1 + (s2 - s1) * prod_k (1 - x/k). So those
    t - 1 shares are equally likely under either secret."""
    rng = random.Random(n * 100 + t)
    s1, s2 = os.urandom(32), os.urandom(32)
    c1 = [rng.randrange(PRIME) for _ in range(t - 1)]
    shares1 = shamir.split(s1, n, t, _feeder(c1))
    # prod_{k=1}^{t-1} (1 - x/k) as coefficients (constant term first).
    vanish = [1]
    for k in range(1, t):
        vanish = _poly_mul(vanish, [1, (-pow(k, -1, PRIME)) % PRIME])
    diff = (int.from_bytes(s2, "big") - int.from_bytes(s1, "big")) % PRIME
    f1 = [int.from_bytes(s1, "big"), *c1]
    f2 = [(a + diff * v) % PRIME for a, v in zip(f1, vanish, strict=True)]
    assert f2[0] == int.from_bytes(s2, "big")
    shares2 = shamir.split(s2, n, t, _feeder(f2[1:]))
    assert shares1[: t - 1] == shares2[: t - 1]
    assert shares1[t - 1] != shares2[t - 1]  # the t-th share tells them apart
    assert shamir.reconstruct(dict(enumerate(shares2, start=1)), t) == s2


def test_lagrange_weights_are_reused_across_secrets() -> None:
    n, t = 50, 26
    randbytes = _seeded(1)
    secrets = [os.urandom(32) for _ in range(50)]
    shares = shamir.split_many(secrets, n, t, randbytes)
    xs = [3, 7, *range(20, 44)]
    coeffs = shamir.lagrange_at_zero(xs, n)
    assert len(coeffs) == t
    for secret, row in zip(secrets, shares, strict=True):
        assert shamir.combine(coeffs, [row[x - 1] for x in xs]) == secret


def test_extra_shares_are_checked_against_the_first_t() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 6, 3, os.urandom)
    given = dict(enumerate(shares, start=1))
    assert shamir.reconstruct(given, 3) == secret
    given[6] = b"\x00" * SHARE_BYTES
    with pytest.raises(ShareError, match="inconsistent"):
        shamir.reconstruct(given, 3)


def _nudge(share: bytes, delta: int) -> bytes:
    return ((int.from_bytes(share, "big") + delta) % PRIME).to_bytes(SHARE_BYTES, "big")


def test_a_small_targeted_error_passes_t_shares_but_not_t_plus_1() -> None:
    """Adding δ to one share shifts the secret by λ·δ: with exactly t shares it still
    looks like a 32-byte seed (nothing can tell), one more share exposes it."""
    secret = (10**30).to_bytes(32, "big")
    shares = shamir.split(secret, 5, 3, os.urandom)
    bad = _nudge(shares[1], 1)
    wrong = shamir.reconstruct({1: shares[0], 2: bad, 3: shares[2]}, 3)
    assert wrong != secret  # undetectable from t shares alone
    with pytest.raises(ShareError, match="inconsistent"):
        shamir.reconstruct({1: shares[0], 2: bad, 3: shares[2], 4: shares[3]}, 3)
    rec = shamir.Reconstructor([1, 2, 3, 4], 3)
    assert rec([shares[0], shares[1], shares[2], shares[3]]) == secret
    with pytest.raises(ShareError):
        rec([shares[0], bad, shares[2], shares[3]])


@settings(max_examples=40, deadline=None)
@given(data=st.data(), secret=st.binary(min_size=32, max_size=32), seed=st.integers(0, 2**32))
def test_robust_reconstruct_finds_the_wrong_shares(
    data: st.DataObject, secret: bytes, seed: int
) -> None:
    n = data.draw(st.integers(1, 14))
    t = data.draw(st.integers(1, n))
    shares = dict(enumerate(shamir.split(secret, n, t, _seeded(seed)), start=1))
    budget = (n - t) // 2
    liars = data.draw(st.lists(st.integers(1, n), max_size=budget, unique=True))
    for x in liars:
        delta = data.draw(st.integers(1, PRIME - 1))
        shares[x] = _nudge(shares[x], delta)
    got, wrong = shamir.robust_reconstruct(shares, t, n)
    assert got == secret
    assert wrong == sorted(liars)


def test_robust_reconstruct_gives_up_beyond_its_budget() -> None:
    secret = os.urandom(32)
    shares = dict(enumerate(shamir.split(secret, 5, 3, _seeded(3)), start=1))
    shares[1] = _nudge(shares[1], 5)
    shares[2] = _nudge(shares[2], 7)  # 2 wrong of 5 with t = 3: only 1 can be corrected
    try:
        got, _ = shamir.robust_reconstruct(shares, 3)
    except ShareError:
        return
    assert got != secret  # never silently "repairs" into the true secret by chance


def test_share_errors() -> None:
    shares = shamir.split(bytes(32), 4, 2, os.urandom)
    with pytest.raises(ShareError, match="needed"):
        shamir.reconstruct({1: shares[0]}, 2)
    with pytest.raises(ShareError, match="66 bytes"):
        shamir.reconstruct({1: shares[0], 2: shares[1][:-1]}, 2)
    with pytest.raises(ShareError, match="field element"):
        shamir.reconstruct({1: shares[0], 2: PRIME.to_bytes(SHARE_BYTES, "big")}, 2)
    with pytest.raises(ShareError, match="out of range"):
        shamir.reconstruct({1: shares[0], 5: shares[1]}, 2, n=4)
    for x in (0, -1, True, "1"):
        with pytest.raises(ShareError):
            shamir.reconstruct({1: shares[0], x: shares[1]}, 2)  # type: ignore[dict-item]
    with pytest.raises(ShareError, match="duplicate"):
        shamir.lagrange_at_zero([1, 2, 2])
    with pytest.raises(ShareError):
        shamir.lagrange_at_zero([])
    with pytest.raises(ShareError):
        shamir.combine([1, 2], [shares[0]])
    with pytest.raises(ShareError):
        shamir.reconstruct({1: shares[0]}, 0)
    assert issubclass(ShareError, ValueError)


@settings(max_examples=200, deadline=None)
@given(
    shares=st.dictionaries(
        st.integers(-3, 70) | st.booleans() | st.text(max_size=2),  # type: ignore[arg-type]
        st.binary(max_size=70) | st.integers() | st.none(),  # type: ignore[arg-type]
        max_size=6,
    ),
    t=st.integers(-1, 6),
    n=st.none() | st.integers(1, 64),
)
def test_reconstruct_is_total(shares: dict[object, object], t: int, n: int | None) -> None:
    try:
        out = shamir.reconstruct(shares, t, n)  # type: ignore[arg-type]
    except ShareError:
        return
    assert isinstance(out, bytes) and len(out) == 32


def test_split_argument_checks_and_rejection_sampling() -> None:
    with pytest.raises(ValueError):
        shamir.split(bytes(31), 3, 2, os.urandom)
    for n, t in ((3, 0), (3, 4), (0, 0), (True, 1)):
        with pytest.raises(ValueError):
            shamir.split(bytes(32), n, t, os.urandom)
    with pytest.raises(ValueError):
        shamir.split(bytes(32), 3, 2, lambda k: b"short")
    # A draw equal to p (after masking to 521 bits) is rejected and drawn again.
    draws = [PRIME, 5]
    secret = (7).to_bytes(32, "big")
    shares = shamir.split(secret, 2, 2, _feeder(draws))
    assert int.from_bytes(shares[0], "big") == 7 + 5  # f(1) = 7 + 5 * 1
    assert int.from_bytes(shares[1], "big") == 7 + 10
    # t = 1: every share is the secret itself.
    assert shamir.split(secret, 3, 1, os.urandom) == [(7).to_bytes(SHARE_BYTES, "big")] * 3


@settings(max_examples=60, deadline=None)
@given(
    secrets=st.lists(st.binary(min_size=32, max_size=32), min_size=0, max_size=6),
    n=st.integers(1, 64),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_many_gives_split_of_each_secret_from_the_same_stream(
    secrets: list[bytes], n: int, data: st.DataObject, seed: int
) -> None:
    """The batched evaluation (all polynomials packed in one integer) is exactly the
    one-by-one Horner evaluation, up to 64 shares of degree 63 (the largest slots)."""
    t = data.draw(st.integers(1, n))
    many = shamir.split_many(secrets, n, t, byte_stream(seed.to_bytes(32, "big")))
    one = byte_stream(seed.to_bytes(32, "big"))
    assert many == [shamir.split(s, n, t, one) for s in secrets]
    for secret, shares in zip(secrets, many, strict=True):
        assert shamir.reconstruct(dict(enumerate(shares[-t:], start=n - t + 1)), t) == secret


def test_split_many_draws_the_top_coefficients_and_checks_its_arguments() -> None:
    # Coefficients at p - 1 (the largest): every slot holds its largest value, no carry.
    n, t = 64, 64
    top = [PRIME - 1] * (t - 1)
    secret = (2**256 - 1).to_bytes(32, "big")
    (shares,) = shamir.split_many([secret], n, t, _feeder(list(top)))
    assert shares == shamir.split(secret, n, t, _feeder(list(top)))
    with pytest.raises(ValueError):
        shamir.split_many([bytes(31)], 3, 2, os.urandom)
    with pytest.raises(ValueError):
        shamir.split_many([bytes(32)], 3, 4, os.urandom)
