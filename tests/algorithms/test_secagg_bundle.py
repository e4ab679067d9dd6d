"""The share bundle's parser is total: a Bundle that matches, or BundleError."""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.secagg import shamir
from fedloom.algorithms.secagg.bundle import Bundle, BundleError, pack_bundle, unpack_bundle

MEMBERS = ["site-a", "site-b", "site-c", "site-d"]
COHORT = b"\x11" * 16


def _share() -> bytes:
    return shamir.split(os.urandom(32), 4, 2, os.urandom)[0]


def _good() -> tuple[bytes, dict[str, Any]]:
    pairs = {j: _share() for j in MEMBERS if j != "site-a"}
    self_share = _share()
    raw = pack_bundle(COHORT, "site-a", "site-c", 3, self_share, pairs)
    return raw, {"b": self_share, "s": pairs}


def _unpack(raw: bytes, **over: Any) -> Bundle:
    kw: dict[str, Any] = {
        "cohort": COHORT,
        "owner": "site-a",
        "recipient": "site-c",
        "x": 3,
        "members": MEMBERS,
    }
    kw.update(over)
    return unpack_bundle(raw, **kw)


def test_round_trip() -> None:
    raw, parts = _good()
    bundle = _unpack(raw)
    assert bundle.cohort == COHORT and bundle.owner == "site-a" and bundle.recipient == "site-c"
    assert bundle.x == 3
    assert bundle.self_share == parts["b"]
    assert dict(bundle.pair_shares) == parts["s"]


@pytest.mark.parametrize(
    "over",
    [
        {"cohort": b"\x12" * 16},
        {"owner": "site-b"},
        {"recipient": "site-b"},
        {"x": 2},
        {"members": [*MEMBERS, "site-e"]},  # a member's pair share missing
        {"members": [*MEMBERS[:3], "site-e"]},  # an unknown key in the bundle
        {"members": ["site-b", "site-c", "site-d"]},  # owner not a member
    ],
)
def test_a_bundle_for_something_else_is_refused(over: dict[str, Any]) -> None:
    raw, _ = _good()
    with pytest.raises(BundleError):
        _unpack(raw, **over)


def _body() -> dict[str, Any]:
    raw, _ = _good()
    body: dict[str, Any] = msgpack.unpackb(raw, raw=False)
    return body


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b.pop("x"),
        lambda b: b.update(extra=1),
        lambda b: b.update(x=True),
        lambda b: b.update(x=3.0),
        lambda b: b.update(c="11" * 8),
        lambda b: b.update(o=b"site-a"),
        lambda b: b.update(b=b["b"][:-1]),
        lambda b: b.update(b=shamir.PRIME.to_bytes(66, "big")),
        lambda b: b.update(b=None),
        lambda b: b["s"].update({"site-b": b"\0" * 65}),
        lambda b: b["s"].update({"site-b": 7}),
        lambda b: b.update(s=list(b["s"].items())),
    ],
)
def test_malformed_fields_are_refused(edit: Any) -> None:
    body = _body()
    edit(body)
    with pytest.raises(BundleError):
        _unpack(msgpack.packb(body, use_bin_type=True))


def test_non_map_trailing_and_oversize() -> None:
    raw, _ = _good()
    for bad in (raw + b"\x00", msgpack.packb([1, 2]), b"", b"\xc1", raw[:-3]):
        with pytest.raises(BundleError):
            _unpack(bad)
    with pytest.raises(BundleError, match="limit"):
        _unpack(raw + b"\x00" * 100_000)
    # An int map key is refused by the strict reader.
    with pytest.raises(BundleError):
        _unpack(msgpack.packb({1: 2}))


leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=70)
    | st.text(max_size=8)
)
values = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=600))
def test_total_on_random_bytes(raw: bytes) -> None:
    try:
        bundle = _unpack(raw)
    except BundleError:
        return
    assert isinstance(bundle, Bundle)


@settings(max_examples=300, deadline=None)
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "c": st.just(COHORT) | values,
            "o": st.just("site-a") | values,
            "r": st.just("site-c") | values,
            "x": st.just(3) | values,
            "b": st.just(_share()) | values,
            "s": st.dictionaries(
                st.sampled_from(MEMBERS) | st.text(max_size=4),
                st.just(_share()) | values,
                max_size=5,
            )
            | values,
            "z": values,
        },
    )
)
def test_total_on_structured_garbage(body: dict[str, Any]) -> None:
    try:
        bundle = _unpack(msgpack.packb(body, use_bin_type=True))
    except BundleError:
        return
    assert set(bundle.pair_shares) == set(MEMBERS) - {"site-a"}


def test_pack_refuses_local_misuse() -> None:
    with pytest.raises(ValueError):
        pack_bundle(COHORT, "site-a", "site-c", 0, _share(), {})
    with pytest.raises(ValueError):
        pack_bundle(COHORT, "site-a", "site-c", 1, b"short", {})
    with pytest.raises(ValueError):
        pack_bundle(COHORT, "site-a", "site-c", 1, _share(), {"site-a": _share()})
    assert issubclass(BundleError, ValueError)
