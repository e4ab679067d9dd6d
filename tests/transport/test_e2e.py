"""End-to-end signatures: relays cannot forge, alter, redirect or replay what they carry."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.e2e import (
    ModelVersionGuard,
    ReplayedUpdateError,
    ReplayGuard,
    SignatureError,
    StaleModelError,
    payload_hash,
    sign_model,
    sign_update,
    verify_model,
    verify_update,
)
from transport.identity import Identity
from transport.roster import Roster, RosterEntry
from transport.tensors import CodecSpec, encode_tensors

ROOT = Identity.generate("root", "root")
REGION = Identity.generate("region-eu", "region")
SITE_A = Identity.generate("site-a", "site")
SITE_B = Identity.generate("site-b", "site")
ROSTER = Roster(
    1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (ROOT, REGION, SITE_A, SITE_B)]
)
PAYLOAD = b"encoded tensor payload"
HASH = payload_hash(PAYLOAD)
UPDATE: dict[str, Any] = dict(
    site="site-a",
    update_id=7,
    base_version=3,
    recipient="region-eu",
    n_examples=120,
    payload_hash=HASH,
)


def test_payload_hash_is_blake2b_256_of_the_encoded_payload() -> None:
    import hashlib

    import numpy as np

    _, payload = encode_tensors({"w": np.arange(6, dtype=np.float32)}, CodecSpec())
    assert payload_hash(payload) == hashlib.blake2b(payload, digest_size=32).digest()
    assert len(HASH) == 32


def test_update_signed_by_its_site_verifies() -> None:
    sig = sign_update(SITE_A, **UPDATE)
    assert len(sig) == 64
    verify_update(ROSTER, sig, **UPDATE)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("update_id", 8),
        ("base_version", 4),
        ("n_examples", 1_000_000),  # inflating its weight in the average
        ("recipient", "root"),  # redirected by the relay
        ("payload_hash", payload_hash(b"another delta")),
        ("site", "site-b"),
    ],
)
def test_altered_or_redirected_update_fails(field: str, value: object) -> None:
    sig = sign_update(SITE_A, **UPDATE)
    with pytest.raises(SignatureError, match="does not match"):
        verify_update(ROSTER, sig, **{**UPDATE, field: value})


def test_update_whose_signature_does_not_match_its_sender_is_refused() -> None:
    # site-b (or a relay with its own key) signs an update claiming to come from site-a.
    forged = SITE_B.sign(b"anything")
    with pytest.raises(SignatureError, match="signature does not match 'site-a'"):
        verify_update(ROSTER, forged, **UPDATE)
    forged = sign_update(SITE_B, **{**UPDATE, "site": "site-b"})
    with pytest.raises(SignatureError):
        verify_update(ROSTER, forged, **UPDATE)
    with pytest.raises(ValueError, match="cannot sign an update as"):
        sign_update(SITE_B, **UPDATE)


def test_update_from_unknown_site_or_with_bad_fields_is_refused() -> None:
    sig = sign_update(SITE_A, **UPDATE)
    with pytest.raises(SignatureError, match="not in the roster"):
        verify_update(ROSTER, sig, **{**UPDATE, "site": "site-x"})
    with pytest.raises(SignatureError, match="payload_hash"):
        verify_update(ROSTER, sig, **{**UPDATE, "payload_hash": b"short"})
    with pytest.raises(SignatureError, match="update_id"):
        verify_update(ROSTER, sig, **{**UPDATE, "update_id": -1})


def test_model_signed_by_the_root_verifies_and_alterations_fail() -> None:
    sig = sign_model(ROOT, 5, 4, HASH)
    verify_model(ROSTER, "root", sig, 5, 4, HASH)
    for version, parent, model_hash in [(6, 4, HASH), (5, 3, HASH), (5, 4, payload_hash(b"x"))]:
        with pytest.raises(SignatureError, match="does not match"):
            verify_model(ROSTER, "root", sig, version, parent, model_hash)


def test_only_a_root_may_sign_models() -> None:
    with pytest.raises(ValueError, match="only a root"):
        sign_model(REGION, 5, 4, HASH)
    region_sig = REGION.sign(b"model")
    with pytest.raises(SignatureError, match="not a root"):
        verify_model(ROSTER, "region-eu", region_sig, 5, 4, HASH)
    with pytest.raises(SignatureError, match="not in the roster"):
        verify_model(ROSTER, "nobody", region_sig, 5, 4, HASH)


def test_signatures_are_domain_separated() -> None:
    # An update signature by the root never passes as a model signature, and vice versa.
    root_update = {**UPDATE, "site": "root", "update_id": 5, "base_version": 4}
    sig = sign_update(ROOT, **root_update)
    with pytest.raises(SignatureError):
        verify_model(ROSTER, "root", sig, 5, 4, HASH)
    with pytest.raises(SignatureError):
        verify_update(ROSTER, sign_model(ROOT, 5, 4, HASH), **root_update)


# ------------------------------------------------------------------ replay


def test_replayed_update_id_is_refused() -> None:
    guard = ReplayGuard()
    guard.accept("site-a", 1)
    guard.accept("site-a", 2)
    guard.accept("site-b", 1)  # ids are per site
    with pytest.raises(ReplayedUpdateError, match="update 2 from 'site-a' was already received"):
        guard.accept("site-a", 2)
    with pytest.raises(ReplayedUpdateError, match="not >= 1"):
        guard.check("site-a", 0)


def test_out_of_order_ids_are_accepted_once_and_memory_stays_compact() -> None:
    guard = ReplayGuard()
    for update_id in [3, 1, 5, 2]:
        guard.accept("s", update_id)
    assert guard.snapshot() == {"s": (3, (5,))}
    guard.accept("s", 4)
    assert guard.snapshot() == {"s": (5, ())}
    for update_id in range(1, 6):
        with pytest.raises(ReplayedUpdateError):
            guard.check("s", update_id)
    guard.accept("s", 6)


def test_replay_guard_survives_a_restart_through_its_snapshot() -> None:
    guard = ReplayGuard()
    for update_id in [1, 2, 4]:
        guard.accept("site-a", update_id)
    restored = ReplayGuard.from_snapshot(guard.snapshot())
    for update_id in [1, 2, 4]:
        assert restored.seen("site-a", update_id)
    restored.accept("site-a", 3)
    assert restored.snapshot() == {"site-a": (4, ())}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=80))
def test_replay_guard_accepts_each_id_exactly_once(ids: list[int]) -> None:
    guard, accepted = ReplayGuard(), set()
    for update_id in ids:
        try:
            guard.accept("s", update_id)
        except ReplayedUpdateError:
            assert update_id in accepted
        else:
            assert update_id not in accepted
            accepted.add(update_id)


def test_model_with_older_or_equal_version_is_refused() -> None:
    guard = ModelVersionGuard()
    guard.accept(3)
    with pytest.raises(StaleModelError, match="version 2 is not newer than version 3"):
        guard.accept(2)
    with pytest.raises(StaleModelError):
        guard.accept(3)
    guard.accept(4)
    assert ModelVersionGuard(current=guard.current).current == 4
    with pytest.raises(StaleModelError):
        ModelVersionGuard(current=4).accept(1)
