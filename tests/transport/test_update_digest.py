"""An update's signed digest covers its delta as it travels: float16 as float16
(``transport.e2e.update_digest``), and still fixes exactly the delta the receiver applies."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedloom.transport.e2e import (
    SignatureError,
    as_received,
    digest_as_received,
    sign_update,
    tensors_digest,
    update_digest,
    update_digest_sent,
    verify_update,
)
from fedloom.transport.half import half_source, half_to_float, remember_half
from fedloom.transport.tensors import CodecKind, CodecSpec, decode_tensors, encode_tensors
from tests.transport.test_e2e import ROSTER, SITE_A, mixed_tensors, streamed

KINDS: tuple[CodecKind, ...] = ("fp32", "fp16", "int8", "topk")
FP16 = CodecSpec("fp16")


def whole(tensors: dict[str, np.ndarray], spec: CodecSpec) -> dict[str, np.ndarray]:
    return decode_tensors(*encode_tensors(tensors, spec))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lz4", [True, False])
def test_the_senders_digest_is_the_receivers_streamed_or_whole(kind: CodecKind, lz4: bool) -> None:
    tensors = mixed_tensors()
    spec = CodecSpec(kind, topk_fraction=0.05, lz4=lz4)
    sent = update_digest_sent(tensors, spec)
    assert update_digest(whole(tensors, spec)) == sent
    assert update_digest(streamed(tensors, spec)) == sent
    if kind != "fp16":  # the digest of the decoded tensors, as before
        assert sent == digest_as_received(tensors, spec)


def test_fp16_tensors_are_hashed_as_the_float16_on_the_wire() -> None:
    tensors = mixed_tensors()
    got = whole(tensors, FP16)
    wire = {
        name: (np.asarray(v).astype(np.float32).astype(np.float16) if v.dtype.kind == "f" else v)
        for name, v in tensors.items()
    }
    assert update_digest(got) == tensors_digest(wire)
    # Not the digest of the float32 the receiver decoded (v1's), though it decodes alike.
    assert update_digest(got) != tensors_digest(got)
    for name, arr in got.items():
        half = half_source(arr)
        if tensors[name].dtype.kind == "f":
            assert half is not None and half.dtype == np.float16 and half.shape == arr.shape
            assert np.array_equal(half_to_float(half).reshape(arr.shape), arr)
        else:
            assert half is None


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(0, 300),
        elements=st.floats(-1e5, 1e5, width=32, allow_nan=False),
    )
)
def test_fp16_digests_agree_for_any_values(x: np.ndarray) -> None:
    # Saturated values, subnormals, signed zeros: what the sender hashes is what arrives.
    tensors = {"x": x, "small": x[:3].astype(np.float64)}
    sent = update_digest_sent(tensors, FP16)
    assert update_digest(whole(tensors, FP16)) == sent
    assert update_digest(streamed(tensors, FP16)) == sent


def test_an_fp16_signature_does_not_verify_the_same_delta_sent_as_fp32() -> None:
    # A transcoded update (the float16 values re-sent as float32, e.g. by a peer that
    # re-encodes what it holds) no longer carries a matching digest: the signature binds
    # the wire form, and fp32 decodes carry no float16 source.
    delta = {"w": np.random.default_rng(3).standard_normal(5000).astype(np.float32)}
    sent = update_digest_sent(delta, FP16)
    sig = sign_update(SITE_A, "site-a", 1, 0, "root", 10, sent)
    transcoded = whole(as_received(delta, FP16), CodecSpec("fp32"))
    for name in delta:
        assert half_source(transcoded[name]) is None
        assert np.array_equal(transcoded[name], as_received(delta, FP16)[name])
    with pytest.raises(SignatureError, match="forged, altered or redirected"):
        verify_update(ROSTER, sig, "site-a", 1, 0, "root", 10, update_digest(transcoded))
    verify_update(ROSTER, sig, "site-a", 1, 0, "root", 10, update_digest(whole(delta, FP16)))


def test_a_signature_over_the_decoded_float32_v1_is_refused() -> None:
    delta = {"w": np.random.default_rng(4).standard_normal(5000).astype(np.float32)}
    old = sign_update(SITE_A, "site-a", 1, 0, "root", 10, digest_as_received(delta, FP16))
    with pytest.raises(SignatureError):
        verify_update(ROSTER, old, "site-a", 1, 0, "root", 10, update_digest(whole(delta, FP16)))


def test_one_flipped_float16_bit_changes_the_digest() -> None:
    delta = {"w": np.linspace(-1, 1, 4096, dtype=np.float32)}
    manifest, payload = encode_tensors(delta, FP16)
    good = update_digest(decode_tensors(manifest, payload))
    bad = bytearray(payload)
    bad[2 * 1000] ^= 0x01  # the lowest mantissa bit of element 1000
    assert update_digest(decode_tensors(manifest, bad)) != good


def test_a_float16_source_is_forgotten_when_its_tensor_dies_or_becomes_writable() -> None:
    got = whole({"w": np.linspace(-1, 1, 9000, dtype=np.float32)}, FP16)
    arr = got["w"]
    assert half_source(arr) is not None
    assert half_source(arr.reshape(-1)) is None  # a view is another tensor: unknown
    assert half_source(arr.copy()) is None
    copy = arr.copy()
    copy.flags.writeable = False
    assert half_source(copy) is None
    writable = whole({"w": np.ones(5000, np.float32)}, FP16)["w"]
    writable.flags.writeable = True  # its memory could now change
    assert half_source(writable) is None
    with pytest.raises(ValueError, match="read-only float32"):
        remember_half(np.ones(3, np.float32), np.ones(3, np.float16))  # writable
    from fedloom.transport import half as half_module

    before = len(half_module._SOURCES)
    del got, arr, writable
    gc.collect()
    assert len(half_module._SOURCES) < before
