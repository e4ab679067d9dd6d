"""Double masking: masks cancel for any member order and any survivor/dropout split."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.secagg import field, masking
from fedloom.algorithms.secagg.masking import pair_sign
from fedloom.algorithms.secagg.prg import expand


def _seed(*parts: str) -> bytes:
    return hashlib.blake2b("/".join(parts).encode(), digest_size=32).digest()


def _pair(a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return _seed("pair", lo, hi)


def _cohort(
    members: list[str], d: int, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    plain = {m: rng.integers(0, 2**32, size=d, dtype=np.uint32) for m in members}
    masked = {
        m: masking.mask(plain[m], _seed("self", m), {j: _pair(m, j) for j in members if j != m}, m)
        for m in members
    }
    return plain, masked


@settings(max_examples=120, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 9),
    d=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_masks_cancel_for_any_order_and_any_split(
    data: st.DataObject, n: int, d: int, seed: int
) -> None:
    members = data.draw(st.permutations([f"site-{k:02d}" for k in range(n)]))
    plain, masked = _cohort(members, d, np.random.default_rng(seed))
    survivors = data.draw(st.lists(st.sampled_from(members), min_size=1, unique=True))
    dropped = [m for m in members if m not in survivors]
    triples = [(i, j, _pair(i, j)) for i in survivors for j in dropped]
    triples = data.draw(st.permutations(triples))
    total = masking.unmask_sum(
        [masked[i] for i in survivors], [_seed("self", i) for i in survivors], triples
    )
    expected = np.zeros(d, dtype=np.uint32)
    for i in survivors:
        expected += plain[i]
    np.testing.assert_array_equal(total, expected)


def test_a_single_masked_vector_hides_its_value() -> None:
    """Even with every pair seed of member a (the aggregator claiming everyone else
    dropped), what is left is v_a + PRG(b_a): a one-time pad without b_a."""
    members = ["a", "b", "c"]
    plain, masked = _cohort(members, 1000, np.random.default_rng(3))
    stripped = masking.unmask_sum(
        [masked["a"]], [], [("a", "b", _pair("a", "b")), ("a", "c", _pair("a", "c"))]
    )
    np.testing.assert_array_equal(stripped - plain["a"], expand(_seed("self", "a"), 1000))
    assert not np.array_equal(stripped, plain["a"])
    # And with b_a but none of its pair seeds (a claimed as survivor), the pair masks remain.
    partial = masking.unmask_sum([masked["a"]], [_seed("self", "a")], [])
    assert np.count_nonzero(partial == plain["a"]) < 5


def test_missing_or_wrong_seeds_leave_garbage() -> None:
    members = ["a", "b", "c", "d"]
    plain, masked = _cohort(members, 256, np.random.default_rng(5))
    expected = plain["a"] + plain["b"] + plain["c"]
    survivors = ["a", "b", "c"]
    good = [(i, "d", _pair(i, "d")) for i in survivors]
    ok = masking.unmask_sum(
        [masked[i] for i in survivors], [_seed("self", i) for i in survivors], good
    )
    np.testing.assert_array_equal(ok, expected)
    # A triple with its roles swapped applies the opposite sign.
    swapped = [("d", "a", _pair("a", "d")), *good[1:]]
    bad = masking.unmask_sum(
        [masked[i] for i in survivors], [_seed("self", i) for i in survivors], swapped
    )
    assert not np.array_equal(bad, expected)
    # A missing self seed.
    bad = masking.unmask_sum([masked[i] for i in survivors], [_seed("self", "a")], good)
    assert not np.array_equal(bad, expected)


def test_mask_leaves_input_untouched_and_wraps() -> None:
    v = np.full(8, 2**32 - 1, dtype=np.uint32)
    before = v.copy()
    y = masking.mask(v, _seed("s"), {"z": _seed("p")}, "a")
    np.testing.assert_array_equal(v, before)
    assert y.dtype == np.uint32
    expected = (
        v.astype(np.uint64) + expand(_seed("s"), 8) + expand(_seed("p"), 8)
    ) % 2**32  # "a" < "z": +PRG
    np.testing.assert_array_equal(y, expected.astype(np.uint32))


def test_pair_sign_is_antisymmetric() -> None:
    for a, b in itertools.permutations(["a", "b", "B", "site-1", "site-10"], 2):
        assert pair_sign(a, b) == -pair_sign(b, a)
    assert pair_sign("a", "b") == 1
    with pytest.raises(ValueError):
        pair_sign("a", "a")


def test_argument_errors() -> None:
    v = np.zeros(4, dtype=np.uint32)
    with pytest.raises(ValueError):
        masking.mask(v.astype(np.int64), _seed("s"), {}, "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        masking.mask(v, _seed("s"), {"a": _seed("p")}, "a")
    with pytest.raises(ValueError):
        masking.mask(v, b"short", {}, "a")
    with pytest.raises(ValueError):
        masking.unmask_sum([], [], [])
    with pytest.raises(ValueError):
        masking.unmask_sum([v, np.zeros(5, dtype=np.uint32)], [], [])


def test_a_member_masking_with_a_wrong_pair_seed_is_caught_by_the_range_check() -> None:
    members = ["a", "b", "c"]
    spec = field.FieldSpec(clip=1.0, precision_bits=16, weight_cap=1)
    template = {"w": np.zeros(500)}
    rng = np.random.default_rng(2)
    encoded = {m: field.encode({"w": rng.normal(size=500) * 0.01}, 1.0, spec, rng) for m in members}
    masked = {}
    for m in members:
        pairs = {j: _pair(m, j) for j in members if j != m}
        if m == "c":
            pairs["a"] = _seed("not the pair seed")  # misconfigured or malicious
        masked[m] = masking.mask(encoded[m], _seed("self", m), pairs, m)
    honest = masking.unmask_sum(
        [masked["a"], masked["b"]],
        [_seed("self", "a"), _seed("self", "b")],
        [("a", "c", _pair("a", "c")), ("b", "c", _pair("b", "c"))],
    )
    field.decode_sum(honest, spec, template, members=2)
    total = masking.unmask_sum(
        [masked[m] for m in members], [_seed("self", m) for m in members], []
    )
    with pytest.raises(field.SumOutOfRangeError):
        field.decode_sum(total, spec, template, members=3)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 6), d=st.integers(1, 64), seed=st.integers(0, 2**32 - 1))
def test_in_place_masking_writes_the_same_words_into_the_callers_vector(
    n: int, d: int, seed: int
) -> None:
    members = [f"site-{k:02d}" for k in range(n)]
    me = members[0]
    pairs = {j: _pair(me, j) for j in members[1:]}
    v = np.random.default_rng(seed).integers(0, 2**32, size=d, dtype=np.uint32)
    want = masking.mask(v, _seed("self", me), pairs, me)
    premasked = masking.mask(v, _seed("self", me), {}, me)
    assert not np.shares_memory(want, v) and not np.shares_memory(premasked, v)
    own = v.copy()
    got = masking.mask(own, _seed("self", me), {}, me, in_place=True)
    assert got is own  # no copy: the self mask went into the vector
    np.testing.assert_array_equal(got, premasked)
    got = masking.add_pair_masks(own, pairs, me, in_place=True)
    assert got is own
    np.testing.assert_array_equal(got, want)
    # A read-only vector is never written: in_place then masks a copy.
    frozen = v.copy()
    frozen.flags.writeable = False
    out = masking.mask(frozen, _seed("self", me), pairs, me, in_place=True)
    np.testing.assert_array_equal(out, want)
    assert out is not frozen
