"""End-to-end signatures: relays cannot forge, alter, redirect or replay what they carry."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.transport.e2e import (
    ModelConflictError,
    ModelVersionGuard,
    ReplayedUpdateError,
    ReplayGuard,
    SignatureError,
    StaleModelError,
    as_received,
    digest_as_received,
    sign_model,
    sign_update,
    tensors_digest,
    verify_model,
    verify_update,
)
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.streaming import TensorStreamDecoder, TensorStreamEncoder
from fedloom.transport.tensors import CodecKind, CodecSpec, decode_tensors, encode_tensors

ROOT = Identity.generate("root", "root")
REGION = Identity.generate("region-eu", "region")
SITE_A = Identity.generate("site-a", "site")
SITE_B = Identity.generate("site-b", "site")
ROSTER = Roster(
    1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (ROOT, REGION, SITE_A, SITE_B)]
)
HASH = tensors_digest({"w": np.arange(6, dtype=np.float32)})
OTHER_HASH = tensors_digest({"w": np.arange(7, dtype=np.float32)})
UPDATE: dict[str, Any] = dict(
    site="site-a",
    update_id=7,
    base_version=3,
    recipient="region-eu",
    n_examples=120,
    payload_hash=HASH,
)


def test_tensors_digest_is_sha256_of_a_canonical_header_and_the_bytes() -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([True, False])
    header = msgpack.packb([["w", "<f4", [2, 3]], ["b", "|b1", [2]]], use_bin_type=True)
    want = hashlib.sha256(header + w.tobytes() + b.tobytes()).digest()
    assert tensors_digest({"w": w, "b": b}) == want
    assert len(want) == 32
    # Layout, byte order and contiguity do not matter; names, order, shapes and dtypes do.
    assert tensors_digest({"w": np.asfortranarray(w), "b": b}) == want
    assert tensors_digest({"w": w.astype(">f4"), "b": b}) == want
    for other in (
        {"b": b, "w": w},
        {"v": w, "b": b},
        {"w": w.reshape(3, 2), "b": b},
        {"w": w.astype(np.float64), "b": b},
        {"w": w, "b": b.astype(np.uint8)},
    ):
        assert tensors_digest(other) != want
    assert tensors_digest({}) == hashlib.sha256(msgpack.packb([])).digest()


def mixed_tensors(n: int = 5_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "w": rng.standard_normal((n // 50, 50)).astype(np.float32),
        "w64": rng.standard_normal(n),  # float64: travels as float32
        "h": rng.standard_normal(7).astype(np.float16),
        "steps": np.arange(5, dtype=np.int64),
        "mask": rng.random(9) < 0.5,
        "empty": np.zeros((0, 3), np.float32),
        "zero": np.zeros(300, np.float32),
    }


def streamed(tensors: dict[str, np.ndarray], spec: CodecSpec) -> dict[str, np.ndarray]:
    encoder = TensorStreamEncoder(tensors, spec, piece=4096)
    decoder = TensorStreamDecoder(encoder.manifest)
    while not encoder.done:
        decoder.feed_piece(encoder.next_piece())
    return decoder.finish()


KINDS: tuple[CodecKind, ...] = ("fp32", "fp16", "int8", "topk")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lz4", [True, False])
def test_streamed_and_whole_messages_decode_to_the_same_digest(kind: CodecKind, lz4: bool) -> None:
    # What signatures cover must not depend on how the message travelled.
    tensors = mixed_tensors()
    spec = CodecSpec(kind, topk_fraction=0.05, lz4=lz4)
    whole = decode_tensors(*encode_tensors(tensors, spec))
    assert tensors_digest(streamed(tensors, spec)) == tensors_digest(whole)
    # ... and the sender predicts it without sending anything.
    assert digest_as_received(tensors, spec) == tensors_digest(whole)
    for name, arr in as_received(tensors, spec).items():
        assert arr.dtype == whole[name].dtype and arr.shape == whole[name].shape


def test_int8_digests_agree_across_the_streaming_encoders_chunked_scale() -> None:
    # More than 2**20 elements: the streaming encoder finds the scale chunk by chunk.
    x = {"big": np.random.default_rng(2).standard_normal((1 << 20) + 5).astype(np.float32)}
    spec = CodecSpec("int8")
    assert tensors_digest(streamed(x, spec)) == digest_as_received(x, spec)


def test_lossy_codecs_change_the_digest_and_fp32_only_casts() -> None:
    tensors = mixed_tensors()
    own = tensors_digest(
        {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    )
    assert digest_as_received(tensors, CodecSpec("fp32")) == own
    for kind in ("fp16", "int8", "topk"):
        assert digest_as_received(tensors, CodecSpec(kind)) != own  # type: ignore[arg-type]


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
        ("payload_hash", OTHER_HASH),
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
    for version, parent, model_hash in [(6, 4, HASH), (5, 3, HASH), (5, 4, OTHER_HASH)]:
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


def test_model_with_an_older_version_or_a_conflicting_model_is_refused() -> None:
    guard = ModelVersionGuard()
    guard.accept(3, HASH)
    with pytest.raises(StaleModelError, match="version 2 is older than version 3"):
        guard.accept(2, HASH)
    guard.accept(3, HASH)  # the same model again: many tasks share one version
    with pytest.raises(ModelConflictError, match="a second, different model under version 3"):
        guard.accept(3, OTHER_HASH)
    guard.accept(4, OTHER_HASH)
    assert (guard.current, guard.digest) == (4, OTHER_HASH)
    with pytest.raises(StaleModelError):
        ModelVersionGuard(current=4).accept(1, HASH)
    with pytest.raises(StaleModelError, match="not an int"):
        guard.accept("5", HASH)  # type: ignore[arg-type]
