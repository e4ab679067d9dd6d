"""Decoding is total (issue 10, items 1 and 8): every decoder refuses what numpy cannot
represent or what would overflow float32 with a declared ``ProtocolError``, never with
numpy's own ``ValueError``/overflow, on every path (batch, lz4, streamed, wire messages,
stream headers)."""

from __future__ import annotations

import base64
from typing import Any

import lz4.frame
import msgpack
import numpy as np
import pytest

from fedloom.transport import wire
from fedloom.transport.channel import _parse_stream_header
from fedloom.transport.errors import CodecError, DecompressionBomb, NonFiniteTensor, ProtocolError
from fedloom.transport.limits import Limits
from fedloom.transport.roster import Roster, RosterError
from fedloom.transport.streaming import TensorStreamDecoder, TensorStreamEncoder
from fedloom.transport.tensors import (
    _MAX_INT8_SCALE,
    _SAFE_INT8_SCALE,
    CodecSpec,
    decode_tensors,
    encode_tensors,
)

F32_MAX = float(np.finfo(np.float32).max)
BIG = 2**31  # == the default max_decoded_bytes: each dimension alone is allowed

# Zero elements, but numpy cannot shape an array like them (it multiplies the non-zero
# dimensions), or (last) one numpy could, with more elements than the limits allow.
HOSTILE_SHAPES = [
    [0, BIG, BIG],
    [BIG, BIG, 0],
    [0, 2**16, 2**16, 2**16],
    [0, 4] + [2] * 30,  # 2**32 by doubling, within max_ndim
    [0] + [BIG] * 31,
    [1 << 40, 0],
]

ENTRIES: dict[str, dict[str, Any]] = {
    **{
        f"raw-{dtype}": {"codec": "raw", "dtype": dtype}
        for dtype in ("float32", "float64", "float16", "int8", "int64", "uint8", "bool")
    },
    "fp16": {"codec": "fp16"},
    "int8": {"codec": "int8", "scale": 1.0},
    "topk-u8": {"codec": "topk", "k": 0, "index": "u8"},
    "topk-u32": {"codec": "topk", "k": 0, "index": "u32"},
    "topk-bitmap": {"codec": "topk", "k": 0, "index": "bitmap"},
}


def entry(kind: str, shape: list[int], name: str = "w") -> dict[str, Any]:
    return {"name": name, "shape": shape, **ENTRIES[kind]}


@pytest.mark.parametrize("shape", HOSTILE_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ENTRIES)
@pytest.mark.parametrize("use_lz4", [False, True], ids=["plain", "lz4"])
def test_batch_decoder_refuses_shapes_numpy_cannot_build(
    kind: str, shape: list[int], use_lz4: bool
) -> None:
    payload = lz4.frame.compress(b"") if use_lz4 else b""
    with pytest.raises(DecompressionBomb):
        decode_tensors({"lz4": use_lz4, "tensors": [entry(kind, shape)]}, payload)


@pytest.mark.parametrize("shape", HOSTILE_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ENTRIES)
def test_stream_decoder_refuses_shapes_numpy_cannot_build(kind: str, shape: list[int]) -> None:
    manifest = {"tensors": [entry(kind, shape)], "stored": 0, "piece": 4096}
    with pytest.raises(DecompressionBomb):
        TensorStreamDecoder(manifest)


@pytest.mark.parametrize("kind", ENTRIES)
def test_empty_tensors_numpy_can_build_still_decode(kind: str) -> None:
    shape = [0, BIG]  # the extent is exactly the limit
    out = decode_tensors({"lz4": False, "tensors": [entry(kind, shape)]}, b"")
    assert out["w"].shape == (0, BIG)
    decoder = TensorStreamDecoder({"tensors": [entry(kind, shape)], "stored": 0, "piece": 4096})
    decoder.feed_piece(b"")
    assert decoder.finish()["w"].shape == (0, BIG)


def test_the_extent_is_also_bounded_by_what_numpy_can_index() -> None:
    # Limits far above what numpy can address do not let a shape past numpy's own bound.
    huge = Limits(max_decoded_bytes=1 << 62)
    with pytest.raises(DecompressionBomb):
        decode_tensors(
            {"lz4": False, "tensors": [entry("raw-int64", [0, 1 << 31, 1 << 31])]}, b"", huge
        )


def message_with_shape(msg: wire.Message, spec: CodecSpec, shape: list[int]) -> bytes:
    env = msgpack.unpackb(wire.encode(msg, spec), raw=False)
    field = next(k for k, v in env.items() if isinstance(v, dict) and v.keys() == {"m", "p"})
    env[field]["m"]["tensors"][0]["shape"] = shape
    packed: bytes = msgpack.packb(env, use_bin_type=True)
    return packed


EMPTY = {"w": np.zeros((0, 3), np.float32)}
TENSOR_MESSAGES = [
    wire.ModelBroadcast(1, EMPTY),
    wire.TrainRequest(1, 1, EMPTY),
    wire.Update("s", 1, 0, EMPTY, 1),
    wire.GossipShare("g", 1, EMPTY),
    wire.Relayed("a", "b", 1, {"payload": np.zeros(0, np.uint8)}),
]
SPECS = [CodecSpec(kind, lz4=False) for kind in ("fp32", "fp16", "int8", "topk")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@pytest.mark.parametrize("msg", TENSOR_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_with_tensors_refuses_the_hostile_shape(
    msg: wire.Message, spec: CodecSpec
) -> None:
    data = message_with_shape(msg, spec, [0, BIG, BIG])
    with pytest.raises(DecompressionBomb):
        wire.decode(data)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_a_stream_header_with_the_hostile_shape_is_refused(spec: CodecSpec) -> None:
    encoder = TensorStreamEncoder(EMPTY, spec)
    encoder.manifest["tensors"][0]["shape"] = [0, BIG, BIG]
    header = msgpack.packb(
        {"envelope": wire.encode(wire.TrainRequest(1, 1, {})), "stream": encoder.manifest},
        use_bin_type=True,
    )
    with pytest.raises(DecompressionBomb):
        _parse_stream_header(header, Limits())


# ------------------------------------------------------------- int8 scales (item 8)


def int8_manifest(scale: float, n: int) -> dict[str, Any]:
    return {"lz4": False, "tensors": [{"name": "q", "codec": "int8", "shape": [n], "scale": scale}]}


def decode_int8_both_ways(scale: float, q: bytes, limits: Limits | None = None) -> list[Any]:
    """The int8 tensor decoded by the batch and by the stream decoder."""
    limits = limits or Limits()
    batch = decode_tensors(int8_manifest(scale, len(q)), q, limits)["q"]
    manifest = {"tensors": int8_manifest(scale, len(q))["tensors"], "stored": len(q), "piece": 4096}
    decoder = TensorStreamDecoder(manifest, limits)
    decoder.feed_piece(q)
    return [batch, decoder.finish()["q"]]


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
@pytest.mark.parametrize("q", [-128, 127], ids=["q=-128", "q=127"])
def test_the_old_largest_scale_is_refused(q: int, stream: bool) -> None:
    # F32_MAX / 127 was accepted and rounds up to a float32 whose product with 127
    # (and with -128) is infinite.
    data = np.array([q], np.int8).tobytes()
    with pytest.raises(CodecError):
        if stream:
            manifest = {
                "tensors": int8_manifest(F32_MAX / 127, 1)["tensors"],
                "stored": 1,
                "piece": 4096,
            }
            TensorStreamDecoder(manifest)
        else:
            decode_tensors(int8_manifest(F32_MAX / 127, 1), data)


@pytest.mark.parametrize(
    "scale",
    [
        _MAX_INT8_SCALE,
        float(np.nextafter(np.float32(_SAFE_INT8_SCALE), np.float32(np.inf))),
        F32_MAX / 127.5,
    ],
    ids=["largest", "just-above-safe", "between"],
)
def test_a_hostile_scale_with_q_minus_128_is_refused_as_non_finite(scale: float) -> None:
    data = np.array([1, -128, 127], np.int8).tobytes()
    for decode in (
        lambda: decode_tensors(int8_manifest(float(scale), 3), data),
        lambda: decode_int8_both_ways(float(scale), data)[1],
    ):
        with pytest.raises(NonFiniteTensor):
            decode()
    # Without -128 the same scale decodes, every value finite.
    for out in decode_int8_both_ways(float(scale), np.array([1, -127, 127], np.int8).tobytes()):
        assert np.isfinite(out).all()


@pytest.mark.parametrize(
    "scale", [_SAFE_INT8_SCALE, _MAX_INT8_SCALE, 1e30, 1.0, 2.0**-149, 0.0], ids=str
)
def test_every_accepted_scale_decodes_every_q_finite_or_refuses(scale: float) -> None:
    data = np.arange(-128, 128, dtype=np.int8).tobytes()
    try:
        outs = decode_int8_both_ways(scale, data)
    except ProtocolError:
        assert scale > _SAFE_INT8_SCALE  # only -128 above the safe scale is refused
        return
    for out in outs:
        assert np.isfinite(out).all()


def test_without_reject_nonfinite_the_overflow_is_passed_through_not_raised() -> None:
    data = np.array([-128], np.int8).tobytes()
    for out in decode_int8_both_ways(_MAX_INT8_SCALE, data, Limits(reject_nonfinite=False)):
        assert out[0] == -np.inf


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "stream"])
def test_the_encoder_caps_its_scale_so_the_largest_floats_still_round_trip(stream: bool) -> None:
    x = {"x": np.array([F32_MAX, -F32_MAX, 1.0], np.float32)}
    spec = CodecSpec("int8", lz4=False)
    if stream:
        encoder = TensorStreamEncoder(x, spec)
        decoder = TensorStreamDecoder(encoder.manifest)
        while not encoder.done:
            decoder.feed_piece(encoder.next_piece())
        out = decoder.finish()["x"]
    else:
        out = decode_tensors(*encode_tensors(x, spec))["x"]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:2], [F32_MAX, -F32_MAX], rtol=1e-6)


def test_fp16_and_topk_extremes_decode_finite() -> None:
    # fp16 -> fp32 cannot overflow; top-k values are float32 checked as they are.
    h = np.array([65504.0, -65504.0], np.float16)
    out = decode_tensors(
        {"lz4": False, "tensors": [{"name": "h", "codec": "fp16", "shape": [2]}]}, h.tobytes()
    )
    assert np.isfinite(out["h"]).all()
    values = np.array([F32_MAX, np.inf], np.float32)
    manifest = {
        "lz4": False,
        "tensors": [{"name": "t", "codec": "topk", "shape": [4], "k": 2, "index": "u8"}],
    }
    with pytest.raises(NonFiniteTensor):
        decode_tensors(manifest, values.tobytes() + bytes([0, 3]))


# ------------------------------------------------------------- roster text (found by bench/fuzz.py)


@pytest.mark.parametrize("opener", ["[", "{a = "], ids=["arrays", "inline-tables"])
@pytest.mark.parametrize("depth", [600, 100_000])
def test_deeply_nested_roster_text_is_a_roster_error_not_a_recursion_error(
    opener: str, depth: int
) -> None:
    closer = "]" if opener == "[" else "}"
    text = f"version = 1\nx = {opener * depth}1{closer * depth}\n"
    for load in (Roster.loads_unsigned, lambda t: Roster.loads(t, bytes(32))):
        with pytest.raises(RosterError, match="nested too deeply"):
            load(text)


def test_brackets_in_strings_and_comments_are_not_nesting() -> None:
    deep = "[" * 40
    text = (
        "version = 1\n"
        f"# {deep}\n"
        "[[nodes]]\n"
        'id = "site-1"\n'
        'role = "site"\n'
        f'public_key = "{base64.b64encode(bytes(range(32))).decode()}"\n'
        f"endpoints = [\"wss://[::1]:8443/{deep}\", '{deep}']  # {deep}\n"
    )
    roster = Roster.loads_unsigned(text)
    assert roster.lookup("site-1") is not None
