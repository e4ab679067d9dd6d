"""Streaming tensor codec: the same tensors as the batch codec, and the same rejections."""

from __future__ import annotations

import contextlib
from typing import Any

import lz4.block
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedloom.transport.errors import (
    CodecError,
    DecompressionBomb,
    DisallowedDtype,
    FrameTooLarge,
    NonFiniteTensor,
    ProtocolError,
)
from fedloom.transport.half import half_source
from fedloom.transport.limits import Limits
from fedloom.transport.streaming import (
    MIN_PIECE_BYTES,
    TensorStreamDecoder,
    TensorStreamEncoder,
    encodes_in_place,
)
from fedloom.transport.tensors import CodecSpec, decode_tensors, encode_tensors

Tensors = dict[str, np.ndarray]
CODECS = ["fp32", "fp16", "int8", "topk"]


def stream(
    tensors: Tensors, spec: CodecSpec, piece: int = MIN_PIECE_BYTES
) -> tuple[Any, list[bytes]]:
    encoder = TensorStreamEncoder(tensors, spec, piece=piece)
    pieces = []
    while not encoder.done:
        pieces.append(bytes(encoder.next_piece()))
    return encoder.manifest, pieces


def decode(manifest: Any, pieces: list[bytes], limits: Limits | None = None) -> Tensors:
    decoder = TensorStreamDecoder(manifest, limits or Limits())
    for piece in pieces:
        decoder.feed_piece(piece)
    return decoder.finish()


def decode_direct(manifest: Any, pieces: list[bytes], limits: Limits | None = None) -> Tensors:
    """As the channel does with AEGIS-256: a piece that fits ``direct_target()`` exactly
    is written there (decrypted, in the channel) and taken with ``feed_direct``."""
    decoder = TensorStreamDecoder(manifest, limits or Limits())
    for piece in pieces:
        target = decoder.direct_target()
        if target is not None and target.nbytes == len(piece):
            target[:] = piece
            decoder.feed_direct()
        else:
            decoder.feed_piece(piece)
    return decoder.finish()


DECODERS = [decode, decode_direct]


def assert_same(got: Tensors, expected: Tensors) -> None:
    assert list(got) == list(expected)
    for name, arr in expected.items():
        assert got[name].dtype == arr.dtype, name
        assert got[name].shape == arr.shape, name
        assert np.array_equal(got[name], arr), name
        assert not got[name].flags.writeable


def sample_tensors(seed: int = 0) -> Tensors:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((101, 97)).astype(np.float32),
        "odd": np.array([True, False, True]),  # 3 bytes: later pieces start unaligned
        "b64": rng.standard_normal(2001),
        "h": rng.standard_normal(777).astype(np.float16),
        "steps": np.arange(3000, dtype=np.int16),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(2.5, np.float32),
        "zeros": np.zeros(20_000, np.float32),  # compresses
    }


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("lz4", [True, False])
@pytest.mark.parametrize("piece", [MIN_PIECE_BYTES, 4099, 65_536])
def test_matches_the_batch_codec(codec: str, lz4: bool, piece: int, decoder: Any) -> None:
    tensors = sample_tensors()
    spec = CodecSpec(kind=codec, lz4=lz4)  # type: ignore[arg-type]
    manifest, pieces = stream(tensors, spec, piece)
    assert len(pieces) == -(-manifest["stored"] // piece)
    assert_same(decoder(manifest, pieces), decode_tensors(*encode_tensors(tensors, spec)))


def feed_direct_where_offered(
    decoder: TensorStreamDecoder, pieces: list[bytes], *, decodes: bool
) -> list[bool]:
    """Feed every piece, writing it into ``direct_target()`` where one is offered (as the
    channel decrypts into it); which pieces went direct. ``decodes``: what
    ``direct_decodes()`` must say of each direct piece."""
    kinds = []
    for piece in pieces:
        target = decoder.direct_target()
        kinds.append(target is not None)
        if target is not None:
            assert target.nbytes == len(piece) and not target.readonly
            assert decoder.direct_decodes() is decodes
            target[:] = piece
            decoder.feed_direct()
        else:
            decoder.feed_piece(piece)
    return kinds


def test_direct_targets_are_whole_fp32_pieces_inside_one_tensor() -> None:
    rng = np.random.default_rng(2)
    tensors = {
        "b": np.ones(3, np.float32),  # 12 bytes: the next tensor starts inside piece 0
        "w": rng.standard_normal(10_000).astype(np.float32),
        "h": np.arange(5000, dtype=np.int16),  # raw, but not float32
    }
    manifest, pieces = stream(tensors, CodecSpec(lz4=False), MIN_PIECE_BYTES)
    decoder = TensorStreamDecoder(manifest)
    kinds = feed_direct_where_offered(decoder, pieces, decodes=False)
    spec = CodecSpec(lz4=False)
    assert_same(decoder.finish(), decode_tensors(*encode_tensors(tensors, spec)))
    # piece 0 holds "b" and the start of "w"; then "w" only, until the piece that
    # straddles "w" and "h"; int16 pieces are never written directly.
    assert kinds[0] is False and all(kinds[1:9]) and not any(kinds[9:])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_direct_targets_of_float16_pieces_are_the_float16_kept_for_the_tensor(
    dtype: type,
) -> None:
    # Sent as fp16: a whole piece inside one tensor goes straight into the float16 the
    # decoder keeps for it, is checked there and converted; what it hands out is the
    # batch codec's result, remembering that float16.
    rng = np.random.default_rng(3)
    w = rng.standard_normal(10_000).astype(np.float32)
    tensors = {"b": np.ones(3, np.float32), "w": w.astype(dtype)}
    spec = CodecSpec(kind="fp16", lz4=False)
    manifest, pieces = stream(tensors, spec, MIN_PIECE_BYTES)
    decoder = TensorStreamDecoder(manifest)
    kinds = feed_direct_where_offered(decoder, pieces, decodes=True)
    got = decoder.finish()
    assert_same(got, decode_tensors(*encode_tensors(tensors, spec)))
    # piece 0 holds "b" and the start of "w"; the rest is "w" alone, the last one short
    assert kinds[0] is False and all(kinds[1:])
    kept = half_source(got["w"])
    assert kept is not None
    assert np.array_equal(kept.view(np.uint16), w.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_float16_written_directly_is_refused(bad: float) -> None:
    tensors = {"w": np.zeros(10_000, np.float16)}
    manifest, pieces = stream(tensors, CodecSpec(kind="fp16", lz4=False), MIN_PIECE_BYTES)
    decoder = TensorStreamDecoder(manifest)
    for i, piece in enumerate(pieces):
        target = decoder.direct_target()
        assert target is not None
        target[:] = piece
        if i == 2:
            np.frombuffer(target, dtype=np.float16)[7] = bad  # as a hostile peer sent it
            with pytest.raises(NonFiniteTensor):
                decoder.feed_direct()
            return
        decoder.feed_direct()
    raise AssertionError("the bad piece was never fed")


def test_compressible_pieces_shrink_and_random_ones_do_not() -> None:
    rng = np.random.default_rng(1)
    tensors = {"z": np.zeros(50_000, np.float32), "r": rng.standard_normal(50_000).astype("f4")}
    manifest, pieces = stream(tensors, CodecSpec(), 65_536)
    assert len(pieces[0]) < 65_536  # zeros: an lz4 block
    assert len(pieces[-2]) == 65_536  # random fp32: sent as it is
    assert sum(map(len, pieces)) < manifest["stored"]


def test_empty_stream() -> None:
    manifest, pieces = stream({}, CodecSpec())
    assert manifest["stored"] == 0 and len(pieces) == 1
    assert decode(manifest, pieces) == {}


dtypes = st.sampled_from(["<f4", "<f8", "<f2", "<i8", "<i2", "|i1", "|u1", "|b1"])


@st.composite
def tensor_dicts(draw: st.DrawFn) -> Tensors:
    out: Tensors = {}
    for i in range(draw(st.integers(0, 4))):
        dtype = np.dtype(draw(dtypes))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40))
        elements = (
            st.floats(-1e4, 1e4, width=16 if dtype.itemsize == 2 else 32)
            if dtype.kind == "f"
            else None
        )
        out[f"t{i}"] = draw(hnp.arrays(dtype, shape, elements=elements))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=tensor_dicts(), codec=st.sampled_from(CODECS), lz4=st.booleans())
def test_matches_the_batch_codec_property(tensors: Tensors, codec: str, lz4: bool) -> None:
    spec = CodecSpec(kind=codec, lz4=lz4)  # type: ignore[arg-type]
    manifest, pieces = stream(tensors, spec)
    expected = decode_tensors(*encode_tensors(tensors, spec))
    assert_same(decode(manifest, pieces), expected)
    assert_same(decode_direct(manifest, pieces), expected)


# ------------------------------------------------------------------ rejections


def good() -> tuple[dict[str, Any], list[bytes]]:
    return stream(sample_tensors(), CodecSpec(lz4=False))


def entry(**fields: Any) -> dict[str, Any]:
    base = {"name": "x", "codec": "raw", "dtype": "float32", "shape": [4]}
    base.update(fields)
    return base


@pytest.mark.parametrize(
    ("manifest", "error"),
    [
        (None, CodecError),
        ({"tensors": [], "stored": 0}, CodecError),
        ({"tensors": [], "stored": 0, "piece": 4096, "x": 1}, CodecError),
        ({"tensors": {}, "stored": 0, "piece": 4096}, CodecError),
        ({"tensors": [], "stored": 0, "piece": 100}, CodecError),
        ({"tensors": [], "stored": 0, "piece": 1 << 21}, CodecError),
        ({"tensors": [], "stored": -1, "piece": 4096}, CodecError),
        ({"tensors": [], "stored": True, "piece": 4096}, CodecError),
        ({"tensors": [entry()], "stored": 15, "piece": 4096}, CodecError),
        ({"tensors": [entry(), entry()], "stored": 32, "piece": 4096}, CodecError),
        ({"tensors": [entry(dtype="object")], "stored": 16, "piece": 4096}, DisallowedDtype),
        ({"tensors": [entry(codec="pickle")], "stored": 16, "piece": 4096}, CodecError),
        ({"tensors": [entry(shape=[10**12])], "stored": 4 * 10**12, "piece": 4096}, FrameTooLarge),
        (
            {"tensors": [entry(shape=[1 << 20, 1 << 20])], "stored": 0, "piece": 4096},
            DecompressionBomb,
        ),
        (
            {
                "tensors": [entry(codec="int8", scale=float("nan"), dtype=None)],
                "stored": 4,
                "piece": 4096,
            },
            CodecError,
        ),
    ],
)
def test_bad_manifests(manifest: Any, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        TensorStreamDecoder(manifest)


def test_limits_apply_before_allocation() -> None:
    manifest = {"tensors": [entry(shape=[1 << 20])], "stored": 4 << 20, "piece": 4096}
    with pytest.raises(FrameTooLarge):
        TensorStreamDecoder(manifest, Limits(max_message_bytes=1 << 20))
    with pytest.raises(DecompressionBomb):
        TensorStreamDecoder(manifest, Limits(max_decoded_bytes=1 << 20))
    with pytest.raises(CodecError, match="limit 1"):
        TensorStreamDecoder(
            {**manifest, "tensors": [entry(), entry(name="y")]}, Limits(max_tensors=1)
        )


def test_int8_non_finite_scale() -> None:
    manifest = {
        "tensors": [{"name": "q", "codec": "int8", "shape": [4], "scale": float("inf")}],
        "stored": 4,
        "piece": 4096,
    }
    with pytest.raises(NonFiniteTensor):
        TensorStreamDecoder(manifest)


def test_piece_sequence_errors() -> None:
    manifest, pieces = good()
    with pytest.raises(CodecError, match="more pieces"):
        decode(manifest, [*pieces, pieces[-1]])
    decoder = TensorStreamDecoder(manifest)
    decoder.feed_piece(pieces[0])
    with pytest.raises(CodecError, match="truncated"):
        decoder.finish()
    compressed_short = lz4.block.compress(bytes(100), store_size=False)
    for bad, match in [
        (b"", "lz4"),  # shorter than the piece: must be an lz4 block, and is not one
        (pieces[0][:-1], "lz4"),
        (pieces[0] + b"x", "expected"),
        (b"\xff" * 100, "lz4"),
        (compressed_short, "decompressed to 100 bytes"),
    ]:
        with pytest.raises(CodecError, match=match):
            TensorStreamDecoder(manifest).feed_piece(bad)


def raw_stream(entries: list[dict[str, Any]], data: bytes) -> None:
    manifest = {"tensors": entries, "stored": len(data), "piece": 4096}
    decode(manifest, [data])


def test_bad_values() -> None:
    with pytest.raises(NonFiniteTensor, match="'x'"):
        raw_stream([entry()], np.array([1, 2, np.nan, 3], "<f4").tobytes())
    with pytest.raises(NonFiniteTensor):
        raw_stream([entry(dtype="float64")], np.array([1, 2, 1e300, 3], "<f8").tobytes())
    with pytest.raises(NonFiniteTensor):
        raw_stream(
            [{"name": "h", "codec": "fp16", "shape": [2]}], np.array([1, np.inf], "<f2").tobytes()
        )
    with pytest.raises(CodecError, match="bool"):
        raw_stream([entry(dtype="bool", shape=[3])], b"\x00\x01\x02")
    with pytest.raises(CodecError, match="top-k"):
        topk = {"name": "k", "codec": "topk", "shape": [8], "k": 2, "index": "u8"}
        raw_stream([topk], np.array([1, 2], "<f4").tobytes() + bytes([5, 3]))  # not increasing


@pytest.mark.parametrize("decoder", DECODERS)
def test_nan_split_across_pieces_is_caught(decoder: Any) -> None:
    x = np.ones(5000, np.float32)
    x[1023] = np.nan  # bytes 4092..4095: straddles nothing, but the next one does
    x[1024 + 1] = np.inf
    manifest, pieces = stream({"odd": np.array([True]), "x": x}, CodecSpec(lz4=False))
    with pytest.raises(NonFiniteTensor):
        decoder(manifest, pieces)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_written_directly_are_caught(value: float) -> None:
    x = np.ones(5000, np.float32)
    x[3000] = value  # inside the third piece, which goes direct
    manifest, pieces = stream({"x": x}, CodecSpec(lz4=False))
    with pytest.raises(NonFiniteTensor, match="'x'"):
        decode_direct(manifest, pieces)


@settings(max_examples=150, deadline=None)
@given(
    manifest=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=8)
        | st.binary(max_size=8),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "tensors",
                        "stored",
                        "piece",
                        "name",
                        "codec",
                        "dtype",
                        "shape",
                        "k",
                        "index",
                        "scale",
                    ]
                ),
                children,
                max_size=5,
            )
        ),
        max_leaves=20,
    )
)
def test_arbitrary_manifests_raise_only_protocol_errors(manifest: Any) -> None:
    with contextlib.suppress(ProtocolError):
        TensorStreamDecoder(manifest, Limits(max_decoded_bytes=1 << 24, max_message_bytes=1 << 24))


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.binary(max_size=5000), max_size=4))
def test_arbitrary_pieces_raise_only_protocol_errors(pieces: list[bytes]) -> None:
    manifest, _ = good()
    decoder = TensorStreamDecoder(manifest)
    with contextlib.suppress(ProtocolError):
        for piece in pieces:
            decoder.feed_piece(piece)
        decoder.finish()


def test_encoder_misuse() -> None:
    with pytest.raises(ValueError, match="piece"):
        TensorStreamEncoder({}, piece=10)
    with pytest.raises(ValueError, match="whitelist"):
        TensorStreamEncoder({"c": np.zeros(3, np.complex64)})
    with pytest.raises(TypeError):
        TensorStreamEncoder({1: np.zeros(3)})  # type: ignore[dict-item]
    encoder = TensorStreamEncoder({})
    encoder.next_piece()
    with pytest.raises(ValueError, match="every piece"):
        encoder.next_piece()


@pytest.mark.parametrize("lz4", [True, False])
def test_fp16_arrays_go_as_they_are_and_match_their_fp32_values(lz4: bool) -> None:
    # float16 input under the fp16 codec is sent without conversion: the bytes must be
    # exactly those of the same values given as float32 (Inf, NaN, subnormals, a
    # non-contiguous view included), in both encoders.
    rng = np.random.default_rng(3)
    half = (rng.standard_normal((64, 130)) * 1e-3).astype(np.float16)
    half[0, :4] = [np.inf, -np.inf, np.nan, np.float16(6e-8)]
    tensors = {"h": half, "t": half.T, "z": np.zeros(5000, np.float16)}
    as_f32 = {k: v.astype(np.float32) for k, v in tensors.items()}
    spec = CodecSpec(kind="fp16", lz4=lz4)
    assert stream(tensors, spec) == stream(as_f32, spec)
    assert encode_tensors(tensors, spec) == encode_tensors(as_f32, spec)
    assert not TensorStreamEncoder(tensors, spec).computes_pieces


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int64, np.bool_]),
    codec=st.sampled_from(CODECS),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_in_place_encoders_only_slice_the_tensors_memory(
    dtype: type, codec: str, strided: bool, seed: int
) -> None:
    # encodes_in_place says True exactly where the pieces are the tensor's own bytes (no
    # conversion, no copy); test_matches_the_batch_codec_property covers what they decode to.
    raw = np.random.default_rng(seed).standard_normal(2 * 20_000)  # noise: lz4 cannot shrink it
    base: np.ndarray = raw.astype(dtype)
    arr = base[::2] if strided else base[: raw.size // 2]
    spec = CodecSpec(kind=codec, lz4=False)  # type: ignore[arg-type]
    in_place = encodes_in_place({"w": arr}, spec)
    want_in_place = not strided and (
        (dtype is np.float32 and codec == "fp32") or (dtype is np.float16 and codec == "fp16")
    )
    assert in_place == want_in_place
    encoder = TensorStreamEncoder({"w": arr}, spec, piece=MIN_PIECE_BYTES)
    first = np.frombuffer(encoder.next_piece(), dtype=np.uint8)
    if in_place:
        assert np.shares_memory(first, arr)


def test_in_place_needs_every_tensor_in_place() -> None:
    spec = CodecSpec(kind="fp32")
    ok = np.zeros(10, np.float32)
    assert encodes_in_place({"a": ok, "b": ok}, spec)
    assert not encodes_in_place({"a": ok, "b": np.zeros(10, np.float64)}, spec)
    assert not encodes_in_place({"a": ok, "b": [0.0] * 10}, spec)  # not an array
    assert encodes_in_place({}, spec)
