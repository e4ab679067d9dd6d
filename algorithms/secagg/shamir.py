"""t-of-n Shamir secret sharing of 32-byte seeds over GF(p), p = 2^521 - 1 (a Mersenne
prime, so any 256-bit secret is a field element and Python's ints do the arithmetic).

``split`` draws a random polynomial f of degree t - 1 with f(0) = secret and gives share i
(0-based) the value f(i + 1) as 66 bytes big-endian. Any t shares determine f(0) by
Lagrange interpolation; any t - 1 shares are uniformly distributed whatever the secret
(for each secret exactly one polynomial matches them), so they say nothing about it.

The aggregator reconstructs many secrets from the same members' shares, so the
interpolation weights are computed once per set of x's (``lagrange_at_zero``) and reused
(``combine``: t multiplications per secret). Every parser is total: a malformed share is a
``ShareError`` (a ``ValueError``), never another exception.

Wrong shares. A reconstruction that is not a 256-bit number means some share was wrong,
but that catches only random errors: a member that adds a small δ to its share shifts the
secret by λ·δ, still a valid-looking seed, and the unmasked sum becomes garbage. So
``reconstruct`` given more than t shares also checks that every extra share lies on the
polynomial the first t define (``ShareError`` "inconsistent" otherwise), and
``robust_reconstruct`` finds the secret and the wrong shares (Berlekamp-Welch) when at
most (m - t) / 2 of m shares are wrong: the caller then knows whom to blame and exclude.
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
    # f(x) = c[0] + c[1] x + ... + c[t-1] x^(t-1); Horner from the top coefficient, with
    # one reduction per share: each step grows y by at most log2(n) + 1 bits (x <= n, and
    # c < p), so y stays below 2^(521 + t (log2(n) + 1)): a few hundred bits more, far
    # cheaper than t reductions of 521-bit products.
    coeffs = [int.from_bytes(secret, "big")] + [_random_element(randbytes) for _ in range(t - 1)]
    top = coeffs[::-1]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in top:
            y = y * x + c
        shares.append((y % PRIME).to_bytes(SHARE_BYTES, "big"))
    return shares


def split_many(
    secrets: Sequence[bytes], n: int, t: int, randbytes: Callable[[int], bytes]
) -> list[list[bytes]]:
    """``split`` for each secret: ``result[k][i]`` is secret k's share for x = i + 1 (the
    same shares as ``split`` of each secret in turn from the same ``randbytes`` stream:
    the coefficients are drawn in the same order).

    The polynomials are evaluated together (Kronecker substitution): coefficient k of
    every secret is packed into one integer C_k, secret s in bits [s B, (s + 1) B), and
    Y(x) = Σ_k C_k x^k is t multiply-adds of one long integer by x per point. B exceeds
    the bits of any unreduced value Σ_k c_k x^k < p · t · n^(t-1), so no slot carries
    into the next; each slot is then reduced mod p. A member seals 2 × its cohort size
    secrets: at 50 members that is ~65,000 big-integer steps per member one by one, ~2,500
    here."""
    for secret in secrets:
        if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
            raise ValueError(f"secret must be {SECRET_BYTES} bytes")
    _check_nt(n, t)
    if not secrets:
        return []
    polys = [
        [int.from_bytes(secret, "big")] + [_random_element(randbytes) for _ in range(t - 1)]
        for secret in secrets
    ]
    # Σ_k c_k x^k < p · Σ_{k<t} n^k <= p · t · n^(t-1): its bits, plus one, in whole bytes.
    width = (PRIME.bit_length() + t.bit_length() + (t - 1) * n.bit_length() + 1 + 7) // 8
    packed = [
        int.from_bytes(b"".join(p[k].to_bytes(width, "little") for p in polys), "little")
        for k in range(t)
    ]
    top = packed[::-1]
    count = len(secrets)
    out: list[list[bytes]] = [[] for _ in range(count)]
    for x in range(1, n + 1):
        y = 0
        for c in top:
            y = y * x + c
        raw = y.to_bytes(count * width, "little")
        for k in range(count):
            value = int.from_bytes(raw[k * width : (k + 1) * width], "little") % PRIME
            out[k].append(value.to_bytes(SHARE_BYTES, "big"))
    return out


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


def lagrange_at(xs: Sequence[int], at: int, n: int | None = None) -> list[int]:
    """The weights λ_k with f(at) = Σ λ_k f(x_k) for any polynomial f of degree < len(xs):
    λ_k = Π_{j≠k} (x_j - at) / (x_j - x_k) mod p. ``xs`` must be distinct ints in 1..n
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
                num = num * (xj - at) % PRIME
                den = den * (xj - xk) % PRIME
        coeffs.append(num * pow(den, -1, PRIME) % PRIME)
    return coeffs


def lagrange_at_zero(xs: Sequence[int], n: int | None = None) -> list[int]:
    """The weights λ_k with f(0) = Σ λ_k f(x_k) (see ``lagrange_at``): compute them once
    per set of x's and ``combine`` every secret shared at those x's."""
    return lagrange_at(xs, 0, n)


def _to_secret(value: int) -> bytes:
    if value >= _SECRET_LIMIT:
        raise ShareError("shares are inconsistent: the reconstruction is not a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def _dot(coeffs: Sequence[int], ys: Sequence[int]) -> int:
    return sum(c * y for c, y in zip(coeffs, ys, strict=True)) % PRIME


def combine(coeffs: Sequence[int], shares: Sequence[bytes]) -> bytes:
    """The 32-byte secret from shares at the x's ``coeffs`` were computed for (same
    order); ``ShareError`` for a malformed share or a result that is not 32 bytes."""
    if len(coeffs) != len(shares):
        raise ShareError(f"{len(shares)} share(s) for {len(coeffs)} coefficient(s)")
    return _to_secret(_dot(coeffs, [parse_share(share) for share in shares]))


class Reconstructor:
    """Rebuilds many secrets shared at the same x's (the members that answered), with
    every share beyond the first ``t`` checked against the polynomial the first ``t``
    define. Weights are computed once, in the constructor."""

    __slots__ = ("_check", "_zero", "t", "xs")

    def __init__(self, xs: Sequence[int], t: int, n: int | None = None) -> None:
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ShareError(f"threshold t must be an int >= 1, got {t!r}")
        checked = [_check_x(x, n) for x in xs]
        if len(set(checked)) != len(checked):
            raise ShareError("duplicate share index x")
        if len(checked) < t:
            raise ShareError(f"{len(checked)} share(s), {t} needed")
        self.t = t
        self.xs = tuple(checked)
        base = checked[:t]
        self._zero = lagrange_at(base, 0)
        self._check = [lagrange_at(base, x) for x in checked[t:]]

    def __call__(self, shares: Sequence[bytes]) -> bytes:
        """The secret from ``shares`` (one per x, in the constructor's order);
        ``ShareError`` for a malformed share or shares that are not on one polynomial of
        degree < t."""
        if len(shares) != len(self.xs):
            raise ShareError(f"{len(shares)} share(s) for {len(self.xs)} index(es)")
        ys = [parse_share(share) for share in shares]
        base = ys[: self.t]
        for k, weights in enumerate(self._check):
            if _dot(weights, base) != ys[self.t + k]:
                raise ShareError(
                    f"shares are inconsistent: the share for x = {self.xs[self.t + k]} is not "
                    f"on the polynomial of the others (or one of those is wrong)"
                )
        return _to_secret(_dot(self._zero, base))


def reconstruct(shares: Mapping[int, bytes], t: int, n: int | None = None) -> bytes:
    """The secret from ``shares`` (x -> share bytes), using all of them: the ``t`` with the
    smallest x interpolate, the rest must agree. ``ShareError`` for fewer than ``t``
    shares, an x outside 1..n (``n`` defaults to the largest possible), a malformed share,
    or inconsistent shares (``robust_reconstruct`` then finds the wrong ones)."""
    xs = sorted(_check_x(x, n) for x in shares)
    return Reconstructor(xs, t, n)([shares[x] for x in xs])


def _solve(rows: list[list[int]], unknowns: int) -> list[int] | None:
    """A solution of the augmented system ``rows`` mod p (free variables set to 0), or
    None if it has none."""
    m = [list(r) for r in rows]
    pivots: list[int] = []
    r = 0
    for col in range(unknowns):
        pivot = next((i for i in range(r, len(m)) if m[i][col] % PRIME), None)
        if pivot is None:
            continue
        m[r], m[pivot] = m[pivot], m[r]
        inv = pow(m[r][col], -1, PRIME)
        m[r] = [v * inv % PRIME for v in m[r]]
        for i in range(len(m)):
            if i != r and m[i][col]:
                f = m[i][col]
                m[i] = [(a - f * b) % PRIME for a, b in zip(m[i], m[r], strict=True)]
        pivots.append(col)
        r += 1
        if r == len(m):
            break
    if any(row[unknowns] % PRIME for row in m[r:]):
        return None
    solution = [0] * unknowns
    for i, col in enumerate(pivots):
        solution[col] = m[i][unknowns]
    return solution


def _poly_divide(num: list[int], den: list[int]) -> tuple[list[int], bool]:
    """``num / den`` (coefficients constant term first; ``den`` monic): (quotient, exact)."""
    rem = list(num)
    quotient = [0] * max(len(num) - len(den) + 1, 1)
    for shift in range(len(num) - len(den), -1, -1):
        coef = rem[shift + len(den) - 1]
        quotient[shift] = coef
        if coef:
            for k, d in enumerate(den):
                rem[shift + k] = (rem[shift + k] - coef * d) % PRIME
    return quotient, not any(rem)


def _evaluate(poly: Sequence[int], x: int) -> int:
    y = 0
    for c in reversed(poly):
        y = (y * x + c) % PRIME
    return y


def robust_reconstruct(
    shares: Mapping[int, bytes], t: int, n: int | None = None
) -> tuple[bytes, list[int]]:
    """``(secret, wrong)``: the secret and the x's whose shares are wrong, correct when at
    most ``(len(shares) - t) // 2`` shares are wrong (Berlekamp-Welch). ``ShareError`` for
    malformed input, or more wrong shares than that. Costs a Gaussian elimination of
    ~len(shares) unknowns: use it to find whom to exclude, then ``Reconstructor``."""
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ShareError(f"threshold t must be an int >= 1, got {t!r}")
    xs = sorted(_check_x(x, n) for x in shares)
    if len(xs) < t:
        raise ShareError(f"{len(xs)} share(s), {t} needed")
    ys = [parse_share(shares[x]) for x in xs]
    for e in range((len(xs) - t) // 2, -1, -1):
        # Q(x) = y E(x) at every point, E monic of degree e, deg Q < t + e: unknowns are
        # E's e low coefficients then Q's t + e coefficients.
        rows = []
        for x, y in zip(xs, ys, strict=True):
            powers = [pow(x, k, PRIME) for k in range(t + e)]
            row = [y * powers[k] % PRIME for k in range(e)]
            row += [(-p) % PRIME for p in powers]
            row.append((-y * pow(x, e, PRIME)) % PRIME)
            rows.append(row)
        solution = _solve(rows, 2 * e + t)
        if solution is None:
            continue
        error_poly = [*solution[:e], 1]
        poly, exact = _poly_divide(solution[e:], error_poly)
        if not exact or any(poly[t:]):
            continue
        wrong = [x for x, y in zip(xs, ys, strict=True) if _evaluate(poly, x) != y]
        if len(wrong) > (len(xs) - t) // 2:
            continue
        return _to_secret(poly[0] if poly else 0), wrong
    raise ShareError(
        f"shares are inconsistent beyond repair: more than {(len(xs) - t) // 2} of "
        f"{len(xs)} are wrong"
    )
