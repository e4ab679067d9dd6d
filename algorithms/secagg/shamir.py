"""t-of-n Shamir secret sharing of 32-byte seeds over GF(p), p = 2^521 - 1 (a Mersenne
prime, so any 256-bit secret is a field element and Python's ints do the arithmetic).

``split`` draws a random polynomial f of degree t - 1 with f(0) = secret and gives share i
(0-based) the value f(i + 1) as 66 bytes big-endian. Any t shares determine f(0) by
Lagrange interpolation; any t - 1 shares are uniformly distributed whatever the secret
(for each secret exactly one polynomial matches them), so they say nothing about it.

The aggregator reconstructs many secrets from the same members' shares, so the
interpolation weights are computed once per set of x's (``lagrange_at_zero``) and reused
(``combine``: t multiplications per secret). Every parser is total: a malformed share is a
``ShareError`` (a ``ValueError``), never another exception. A reconstruction that is not a
256-bit number means some share was wrong (a random error lands below 2^256 with
probability 2^-265): ``ShareError`` too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32
_SECRET_LIMIT = 1 << (8 * SECRET_BYTES)
_MASK_521 = (1 << 521) - 1
MAX_SHARES = 1 << 16  # x is a member index; cohorts are far smaller


class ShareError(ValueError):
    """A share (or set of shares) cannot be used: the message says why."""


def _random_element(randbytes: Callable[[int], bytes]) -> int:
    """A uniform element of GF(p) from ``randbytes`` (rejection sampling on 521 bits)."""
    while True:
        raw = randbytes(SHARE_BYTES)
        if not isinstance(raw, bytes | bytearray) or len(raw) != SHARE_BYTES:
            raise ValueError(f"randbytes({SHARE_BYTES}) must return {SHARE_BYTES} bytes")
        value = int.from_bytes(raw, "big") & _MASK_521
        if value < PRIME:  # fails only for value == p (probability 2^-521)
            return value


def _check_nt(n: int, t: int) -> None:
    for name, v in (("n", n), ("t", t)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if not 1 <= t <= n <= MAX_SHARES:
        raise ValueError(f"need 1 <= t <= n <= {MAX_SHARES}, got n={n}, t={t}")


def split(secret: bytes, n: int, t: int, randbytes: Callable[[int], bytes]) -> list[bytes]:
    """``n`` shares of the 32-byte ``secret``, any ``t`` of which rebuild it; share ``i``
    belongs to x = i + 1. ``randbytes(k)`` supplies the polynomial's randomness (e.g.
    ``os.urandom``, or a seeded generator's ``bytes`` in the simulator)."""
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes")
    _check_nt(n, t)
    # f(x) = c[0] + c[1] x + ... + c[t-1] x^(t-1); Horner from the top coefficient.
    coeffs = [int.from_bytes(secret, "big")] + [_random_element(randbytes) for _ in range(t - 1)]
    top = coeffs[::-1]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in top:
            y = (y * x + c) % PRIME
        shares.append(y.to_bytes(SHARE_BYTES, "big"))
    return shares


def split_many(
    secrets: Sequence[bytes], n: int, t: int, randbytes: Callable[[int], bytes]
) -> list[list[bytes]]:
    """``split`` for each secret: ``result[k][i]`` is secret k's share for x = i + 1."""
    return [split(s, n, t, randbytes) for s in secrets]


def parse_share(share: object) -> int:
    """The field element a share carries; ``ShareError`` unless it is 66 bytes below p."""
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        length = len(share) if isinstance(share, bytes) else type(share).__name__
        raise ShareError(f"a share must be {SHARE_BYTES} bytes, got {length}")
    y = int.from_bytes(share, "big")
    if y >= PRIME:
        raise ShareError("share value is not a field element (y >= 2^521 - 1)")
    return y


def _check_x(x: object, n: int | None) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ShareError(f"share index x must be an int >= 1, got {x!r}")
    limit = MAX_SHARES if n is None else n
    if x > limit:
        raise ShareError(f"share index x = {x} is out of range 1..{limit}")
    return x


def lagrange_at_zero(xs: Sequence[int], n: int | None = None) -> list[int]:
    """The weights λ_k with f(0) = Σ λ_k f(x_k) for any polynomial f of degree < len(xs):
    λ_k = Π_{j≠k} x_j / (x_j - x_k) mod p. ``xs`` must be distinct ints in 1..n
    (``ShareError`` otherwise)."""
    checked = [_check_x(x, n) for x in xs]
    if len(set(checked)) != len(checked):
        raise ShareError("duplicate share index x")
    if not checked:
        raise ShareError("no shares")
    coeffs = []
    for k, xk in enumerate(checked):
        num = 1
        den = 1
        for j, xj in enumerate(checked):
            if j != k:
                num = num * xj % PRIME
                den = den * (xj - xk) % PRIME
        coeffs.append(num * pow(den, -1, PRIME) % PRIME)
    return coeffs


def combine(coeffs: Sequence[int], shares: Sequence[bytes]) -> bytes:
    """The 32-byte secret from shares at the x's ``coeffs`` were computed for (same
    order); ``ShareError`` for a malformed share or a result that is not 32 bytes."""
    if len(coeffs) != len(shares):
        raise ShareError(f"{len(shares)} share(s) for {len(coeffs)} coefficient(s)")
    acc = 0
    for c, share in zip(coeffs, shares, strict=True):
        acc += c * parse_share(share)
    secret = acc % PRIME
    if secret >= _SECRET_LIMIT:
        raise ShareError("shares are inconsistent: the reconstruction is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def reconstruct(shares: Mapping[int, bytes], t: int, n: int | None = None) -> bytes:
    """The secret from ``shares`` (x -> share bytes): the ``t`` shares with the smallest x
    are used. ``ShareError`` for fewer than ``t`` shares, an x outside 1..n (``n`` defaults
    to the largest possible), a malformed share, or an inconsistent result."""
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ShareError(f"threshold t must be an int >= 1, got {t!r}")
    xs = sorted(_check_x(x, n) for x in shares)
    if len(xs) < t:
        raise ShareError(f"{len(xs)} share(s), {t} needed")
    chosen = xs[:t]
    return combine(lagrange_at_zero(chosen, n), [shares[x] for x in chosen])
