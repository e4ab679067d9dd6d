"""An update's signed digest covers its delta as it travels: float16 as float16
(``transport.e2e.update_digest``), and still fixes exactly the delta the receiver applies.
It is BLAKE3 after the update label (``fedloom-update-v3``), never a model's SHA-256
``tensors_digest``; signatures of the older SHA-256 envelopes are refused, and named."""

from __future__ import annotations

import gc
import hashlib
import tracemalloc
from collections.abc import Callable

import blake3
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedloom.transport.e2e import (
    OldUpdateVersionError,
    SignatureError,
    as_received,
    digest_as_received,
    previous_update_digests,
    sign_update,
    tensors_digest,
    update_digest,
    update_digest_sent,
    verify_update,
)
from fedloom.transport.errors import DecompressionBomb
from fedloom.transport.half import forget_halves, half_source, half_to_float, remember_half
from fedloom.transport.limits import Limits
from fedloom.transport.streaming import TensorStreamDecoder, TensorStreamEncoder
from fedloom.transport.tensors import (
    DEFAULT_LIMITS,
    CodecKind,
    CodecSpec,
    decode_tensors,
    encode_tensors,
)
from tests.transport.test_e2e import ROSTER, SITE_A, mixed_tensors, streamed

KINDS: tuple[CodecKind, ...] = ("fp32", "fp16", "int8", "topk")
FP16 = CodecSpec("fp16")


def whole(tensors: dict[str, np.ndarray], spec: CodecSpec) -> dict[str, np.ndarray]:
    return decode_tensors(*encode_tensors(tensors, spec))


def layout_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """The bytes both digests cover (module doc of ``transport.e2e``), written out here:
    ``msgpack([[name, dtype.str, shape], ...])`` (little-endian dtypes), then each
    array's C-order little-endian bytes."""
    header = []
    data = b""
    for name, arr in tensors.items():
        le = arr.astype(arr.dtype.newbyteorder("<"))
        header.append([name, le.dtype.str, list(arr.shape)])
        data += le.tobytes(order="C")
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    return packed + data


def blake3_update(tensors: dict[str, np.ndarray]) -> bytes:
    """An update digest computed without ``transport.e2e``: BLAKE3 of the msgpack str
    ``fedloom-update-v3``, then ``layout_bytes``."""
    prefix = msgpack.packb("fedloom-update-v3", use_bin_type=True)
    assert prefix == b"\xb1fedloom-update-v3"
    return blake3.blake3(prefix + layout_bytes(tensors)).digest()


def test_an_update_digest_is_blake3_of_the_documented_bytes() -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    n = np.arange(5, dtype=np.int64)
    b = np.array([True, False])
    want = blake3_update({"w": w, "n": n, "b": b})
    assert len(want) == 32
    assert update_digest({"w": w, "n": n, "b": b}) == want
    assert update_digest_sent({"w": w, "n": n, "b": b}, CodecSpec("fp32")) == want
    # Layout, byte order and contiguity do not matter; names, order, shapes and dtypes do.
    assert update_digest({"w": np.asfortranarray(w), "n": n.astype(">i8"), "b": b}) == want
    others: list[dict[str, np.ndarray]] = [
        {"n": n, "w": w, "b": b},
        {"v": w, "n": n, "b": b},
        {"w": w.reshape(3, 2), "n": n, "b": b},
        {"w": w, "n": n, "b": b.astype(np.uint8)},
        {"w": w + 1, "n": n, "b": b},
    ]
    for other in others:
        assert update_digest(other) != want
    assert update_digest({}) == blake3_update({})
    # A float tensor not decoded from float16 is held (and hashed) as the float32 every
    # decoder returns.
    assert update_digest({"w": w.astype(np.float64)}) == blake3_update({"w": w})
    assert update_digest({"w": w.astype(np.float16)}) == blake3_update({"w": w})
    # The fp16 codec's wire form: float16 (``<f2``) in the header and the bytes.
    x = {"x": np.random.default_rng(7).standard_normal(3000).astype(np.float32)}
    on_wire = {"x": x["x"].astype(np.float16)}
    assert update_digest_sent(x, FP16) == blake3_update(on_wire)
    assert update_digest(whole(x, FP16)) == blake3_update(on_wire)


@pytest.mark.parametrize("kind", KINDS)
def test_an_update_digest_is_never_the_model_digest_of_the_same_tensors(
    kind: CodecKind,
) -> None:
    # Domain separation: BLAKE3 after the update label. Neither SHA-256 of the same bytes
    # (a model's ``tensors_digest``) nor BLAKE3 of them without the label.
    got = whole(mixed_tensors(), CodecSpec(kind, topk_fraction=0.05))
    held: dict[str, np.ndarray] = {}  # what the update digest covers: float16 as float16
    for name, arr in got.items():
        half = half_source(arr)
        held[name] = arr if half is None else half
    digest = update_digest(got)
    assert digest == blake3_update(held)
    assert tensors_digest(held) == hashlib.sha256(layout_bytes(held)).digest()
    assert digest != tensors_digest(held)
    assert digest != tensors_digest(got)
    assert digest != blake3.blake3(layout_bytes(held)).digest()
    assert update_digest({}) != tensors_digest({})


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lz4", [True, False])
def test_the_senders_digest_is_the_receivers_streamed_or_whole(kind: CodecKind, lz4: bool) -> None:
    tensors = mixed_tensors()
    spec = CodecSpec(kind, topk_fraction=0.05, lz4=lz4)
    sent = update_digest_sent(tensors, spec)
    assert update_digest(whole(tensors, spec)) == sent
    assert update_digest(streamed(tensors, spec)) == sent
    if kind != "fp16":  # the decoded tensors are what is hashed
        assert sent == blake3_update(as_received(tensors, spec))


def test_fp16_tensors_are_hashed_as_the_float16_on_the_wire() -> None:
    tensors = mixed_tensors()
    got = whole(tensors, FP16)
    wire = {
        name: (np.asarray(v).astype(np.float32).astype(np.float16) if v.dtype.kind == "f" else v)
        for name, v in tensors.items()
    }
    assert update_digest(got) == blake3_update(wire)
    # Not the digest of the float32 the receiver decoded, though it decodes alike.
    assert update_digest(got) != blake3_update(got)
    # What older fedloom signed: v2 SHA-256 of the same float16, v1 that of the float32.
    assert previous_update_digests(got) == (tensors_digest(wire), tensors_digest(got))
    fp32 = whole(tensors, CodecSpec("fp32"))
    assert previous_update_digests(fp32) == (tensors_digest(fp32),)  # v1's is v2's
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


def old_signature(label: str, digest: bytes) -> bytes:
    """What a peer of an older fedloom signs: the ``fedloom-update-v2`` or ``-v1``
    envelope, built here byte for byte as it was (v2's digest: SHA-256
    ``tensors_digest``, float16 as float16; v1's: that of every float tensor as float32)."""
    envelope = [label, "site-a", 1, 0, "root", 10, digest]
    return SITE_A.sign(msgpack.packb(envelope, use_bin_type=True))


def previous(got: dict[str, np.ndarray], asked: list[str]) -> Callable[[], tuple[bytes, ...]]:
    def old_hashes() -> tuple[bytes, ...]:
        asked.append("old")
        return previous_update_digests(got)

    return old_hashes


@pytest.mark.parametrize("codec", ["fp16", "fp32"])
def test_a_v2_sha256_signature_no_longer_verifies_and_is_named(codec: str) -> None:
    # A v2 peer signed the SHA-256 update digest (float16 as float16) under
    # ``fedloom-update-v2``: against the BLAKE3 digest it is a clear refusal, a
    # SignatureError, never a crash; named as an old peer's where the verifier offers
    # the old digests (computed on this failure path only).
    spec = CodecSpec(codec)  # type: ignore[arg-type]
    delta = {"w": np.random.default_rng(4).standard_normal(5000).astype(np.float32)}
    got = whole(delta, spec)
    v2_digest = tensors_digest(as_sent_held(delta, spec))
    assert v2_digest == previous_update_digests(got)[0]
    old = old_signature("fedloom-update-v2", v2_digest)
    with pytest.raises(SignatureError, match="forged, altered or redirected") as plain:
        verify_update(ROSTER, old, "site-a", 1, 0, "root", 10, update_digest(got))
    assert type(plain.value) is SignatureError and plain.value.reason == "bad_signature"
    asked: list[str] = []
    with pytest.raises(OldUpdateVersionError, match=r"signs fedloom-update-v2.*v3; upgrade it"):
        verify_update(
            ROSTER, old, "site-a", 1, 0, "root", 10, update_digest(got), previous(got, asked)
        )
    assert asked == ["old"]
    # The SHA-256 digest under the v3 label is no update digest either: a plain refusal.
    mixed = sign_update(SITE_A, "site-a", 1, 0, "root", 10, v2_digest)
    with pytest.raises(SignatureError, match="forged, altered or redirected") as bad:
        verify_update(
            ROSTER, mixed, "site-a", 1, 0, "root", 10, update_digest(got), previous(got, asked)
        )
    assert type(bad.value) is SignatureError
    # The same site upgraded: verifies, and never asks for the old digests.
    sig = sign_update(SITE_A, "site-a", 1, 0, "root", 10, update_digest_sent(delta, spec))
    verify_update(ROSTER, sig, "site-a", 1, 0, "root", 10, update_digest(got), previous(got, asked))
    assert asked == ["old", "old"]


def as_sent_held(delta: dict[str, np.ndarray], spec: CodecSpec) -> dict[str, np.ndarray]:
    """What v2 hashed: each float tensor as float16 with fp16, as float32 otherwise."""
    dtype = np.float16 if spec.kind == "fp16" else np.float32
    return {k: v.astype(np.float32).astype(dtype) for k, v in delta.items()}


def test_a_v1_signature_is_refused_and_named_as_one() -> None:
    delta = {"w": np.random.default_rng(4).standard_normal(5000).astype(np.float32)}
    # A v1 peer signed the SHA-256 of the float32 it sent (fp32) or the receiver decoded
    # (fp16): named only where the verifier offers the old digests.
    for spec in (CodecSpec("fp32"), FP16):
        got = whole(delta, spec)
        old = old_signature("fedloom-update-v1", digest_as_received(delta, spec))
        with pytest.raises(SignatureError) as plain:
            verify_update(ROSTER, old, "site-a", 1, 0, "root", 10, update_digest(got))
        assert type(plain.value) is SignatureError
        asked: list[str] = []
        with pytest.raises(OldUpdateVersionError, match=r"signs fedloom-update-v1.*upgrade it"):
            verify_update(
                ROSTER, old, "site-a", 1, 0, "root", 10, update_digest(got), previous(got, asked)
            )
        assert asked == ["old"]
    # A forgery still reads as one, old digests offered or not.
    forged = bytes(64)
    with pytest.raises(SignatureError, match="forged, altered or redirected") as bad:
        verify_update(
            ROSTER, forged, "site-a", 1, 0, "root", 10, update_digest(got), previous(got, [])
        )
    assert type(bad.value) is SignatureError


def test_a_masked_upload_of_an_older_peer_is_named_by_its_unchanged_digest() -> None:
    # A masked upload's payload digest did not change (``masked_digest``); only the
    # envelope's label did: one signed under v2 is named from ``payload_hash`` alone.
    payload = bytes(range(32))
    old = old_signature("fedloom-update-v2", payload)
    with pytest.raises(OldUpdateVersionError, match="fedloom-update-v2"):
        verify_update(ROSTER, old, "site-a", 1, 0, "root", 10, payload)


def test_one_flipped_float16_bit_changes_the_digest() -> None:
    delta = {"w": np.linspace(-1, 1, 4096, dtype=np.float32)}
    manifest, payload = encode_tensors(delta, FP16)
    good = update_digest(decode_tensors(manifest, payload))
    bad = bytearray(payload)
    bad[2 * 1000] ^= 0x01  # the lowest mantissa bit of element 1000
    assert update_digest(decode_tensors(manifest, bad)) != good


def test_a_float16_source_is_forgotten_when_its_tensor_dies_or_is_let_go() -> None:
    got = whole({"w": np.linspace(-1, 1, 9000, dtype=np.float32)}, FP16)
    arr = got["w"]
    assert half_source(arr) is not None
    assert half_source(arr.reshape(-1)) is None  # a view is another tensor: unknown
    assert half_source(arr.copy()) is None
    copy = arr.copy()
    copy.flags.writeable = False
    assert half_source(copy) is None
    other = whole({"w": np.ones(5000, np.float32)}, FP16)
    forget_halves(other)
    assert half_source(other["w"]) is None
    assert np.array_equal(other["w"], np.ones(5000, np.float32))  # the tensor itself stays
    with pytest.raises(ValueError, match="same shape"):
        remember_half(np.ones(3, np.float32), np.ones(4, np.float16))
    from fedloom.transport import half as half_module

    before = len(half_module._SOURCES)
    del got, arr
    gc.collect()
    assert len(half_module._SOURCES) < before


def writes(arr: np.ndarray) -> list[str]:
    """The ways ordinary numpy code could change ``arr``'s values that worked (review
    finding: each left a stale float16 behind a signature that still verified)."""
    worked = []
    try:
        arr.flags.writeable = True
        arr.reshape(-1)[5000] = 9.0
        worked.append("flag toggle")
    except ValueError:
        pass
    base = arr.base
    while isinstance(base, np.ndarray):
        try:
            base.reshape(-1)[0] = 9.0
            worked.append("write through base")
        except ValueError:
            pass
        try:
            base.flags.writeable = True
            worked.append("base flag toggle")
        except ValueError:
            pass
        base = base.base
    assert isinstance(base, memoryview) and base.readonly
    return worked


def raw_half(h: np.ndarray, decode: str, limits: Limits = DEFAULT_LIMITS) -> dict[str, np.ndarray]:
    """``h`` (float16) decoded from a message that carries it raw, as float16: a peer's
    choice (our encoders send floats as float32 or with the fp16 codec)."""
    entry = {"name": "w", "codec": "raw", "dtype": "float16", "shape": list(h.shape)}
    data = h.tobytes()
    if decode == "whole":
        return decode_tensors({"lz4": False, "tensors": [entry]}, data, limits)
    piece = 1 << 16
    manifest = {"tensors": [entry], "stored": len(data), "piece": piece}
    decoder = TensorStreamDecoder(manifest, limits)
    for i in range(0, len(data), piece):
        decoder.feed_piece(data[i : i + piece])
    return decoder.finish()


@pytest.mark.parametrize("decode", ["whole", "streamed"])
@pytest.mark.parametrize("codec", ["fp16", "raw16"])
def test_a_tensor_decoded_from_float16_cannot_change_under_its_signature(
    decode: str, codec: str
) -> None:
    delta = {"w": np.linspace(-1, 1, 8192, dtype=np.float32).reshape(64, 128)}
    signed = update_digest_sent(delta, FP16)
    if codec == "raw16":
        got = raw_half(delta["w"].astype(np.float16), decode)
    else:
        got = (whole if decode == "whole" else streamed)(delta, FP16)
    before = got["w"].copy()
    assert writes(got["w"]) == []
    half = half_source(got["w"])
    assert half is not None and writes(half) == []
    assert np.array_equal(got["w"].view(np.uint32), before.view(np.uint32))
    assert update_digest(got) == signed


@pytest.mark.parametrize("decode", ["whole", "streamed"])
@pytest.mark.parametrize("codec", ["fp16", "raw16"])
def test_max_decoded_bytes_counts_the_float32_and_the_float16_kept(decode: str, codec: str) -> None:
    n = 300_000
    tensors = {"w": np.full(n, 0.5, np.float32)}
    spec = CodecSpec("fp16", lz4=False)
    held = 6 * n  # float32 (4 bytes an element) and the float16 kept (2)

    def run(cap: int) -> dict[str, np.ndarray]:
        limits = Limits(max_decoded_bytes=cap)
        if codec == "raw16":  # counted at 2 bytes an element before: 3x the cap held
            return raw_half(tensors["w"].astype(np.float16), decode, limits)
        if decode == "whole":
            manifest, payload = encode_tensors(tensors, spec)
            return decode_tensors(manifest, payload, limits)
        encoder = TensorStreamEncoder(tensors, spec, piece=1 << 16)
        decoder = TensorStreamDecoder(encoder.manifest, limits)
        pieces = []
        while not encoder.done:
            pieces.append(bytes(encoder.next_piece()))
        for piece in pieces:
            decoder.feed_piece(piece)
        return decoder.finish()

    with pytest.raises(DecompressionBomb, match="max_decoded_bytes"):
        run(held - 1)
    tracemalloc.start()
    try:
        got = run(held)
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert half_source(got["w"]) is not None
    assert held <= kept <= held + 64 * 1024  # what it holds is what the cap counted
