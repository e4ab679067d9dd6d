"""Tensor codec: round trips, sizes, compression and rejection of hostile manifests/payloads."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import lz4.frame
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedloom.transport.errors import (
    CodecError,
    DecompressionBomb,
    DisallowedDtype,
    NonFiniteTensor,
    ProtocolError,
)
from fedloom.transport.limits import Limits, MiB
from fedloom.transport.tensors import (
    CodecKind,
    CodecSpec,
    decode_tensors,
    encode_tensors,
    topk_count,
)

KINDS: tuple[CodecKind, ...] = ("fp32", "fp16", "int8", "topk")
NON_FLOAT = ("int8", "int16", "int32", "int64", "uint8", "bool")


DEFAULT_LIMITS = Limits()


def roundtrip(
    tensors: dict[str, Any], spec: CodecSpec, limits: Limits = DEFAULT_LIMITS
) -> dict[str, Any]:
    manifest, payload = encode_tensors(tensors, spec)
    return decode_tensors(manifest, payload, limits)


def randn(*shape: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------ spec


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "bf16"},
        {"topk_fraction": 0.0},
        {"topk_fraction": 1.5},
        {"topk_fraction": float("nan")},
        {"topk_fraction": True},
        {"lz4": 1},
    ],
)
def test_codec_spec_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="CodecSpec"):
        CodecSpec(**kwargs)


def test_codec_spec_defaults() -> None:
    spec = CodecSpec()
    assert (spec.kind, spec.topk_fraction, spec.lz4) == ("fp32", 0.01, True)


# ------------------------------------------------------------------ round trips


def test_fp32_roundtrip_is_exact_and_ordered_and_read_only() -> None:
    tensors = {"z": randn(3, 4), "a": randn(5, seed=1), "m": randn(2, 1, 2, seed=2)}
    out = roundtrip(tensors, CodecSpec("fp32"))
    assert list(out) == ["z", "a", "m"]
    for name, arr in tensors.items():
        assert out[name].dtype == np.float32
        assert out[name].shape == arr.shape
        np.testing.assert_array_equal(out[name], arr)
        assert not out[name].flags.writeable


@pytest.mark.parametrize("kind", KINDS)
def test_float64_and_float16_inputs_decode_as_float32(kind: CodecKind) -> None:
    tensors: dict[str, Any] = {
        "d": randn(40).astype(np.float64),
        "h": randn(40, seed=3).astype(np.float16),
    }
    out = roundtrip(tensors, CodecSpec(kind, topk_fraction=1.0))
    for name, arr in tensors.items():
        assert out[name].dtype == np.float32
        assert out[name].shape == arr.shape
    if kind in ("fp32", "topk"):
        np.testing.assert_array_equal(out["h"], tensors["h"].astype(np.float32))
        np.testing.assert_array_equal(out["d"], tensors["d"].astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", NON_FLOAT)
def test_non_float_tensors_pass_through_raw(kind: CodecKind, dtype: str) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) % 2 == 0) if dtype == "bool" else np.arange(24)
    arr = np.asarray(arr).astype(dtype).reshape(2, 3, 4)
    out = roundtrip({"t": arr, "f": randn(7)}, CodecSpec(kind))
    assert out["t"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out["t"], arr)
    assert not out["t"].flags.writeable


@pytest.mark.parametrize("kind", KINDS)
def test_empty_dict_zero_size_and_scalar_tensors(kind: CodecKind) -> None:
    assert roundtrip({}, CodecSpec(kind)) == {}
    tensors = {"empty": np.zeros((0, 3), np.float32), "scalar": np.float32(2.5), "one": randn(1)}
    out = roundtrip(tensors, CodecSpec(kind, topk_fraction=1.0))
    assert out["empty"].shape == (0, 3)
    assert out["scalar"].shape == ()
    assert out["scalar"] == pytest.approx(2.5, rel=1e-2)


def test_big_endian_and_non_contiguous_inputs() -> None:
    base = randn(6, 8)
    tensors = {
        "be": base.astype(">f4"),
        "strided": base[:, ::2],
        "be_int": np.arange(5, dtype=">i8"),
    }
    out = roundtrip(tensors, CodecSpec())
    np.testing.assert_array_equal(out["be"], base)
    np.testing.assert_array_equal(out["strided"], base[:, ::2])
    np.testing.assert_array_equal(out["be_int"], np.arange(5))


def test_fp16_roundtrip_and_saturation() -> None:
    x = randn(1000)
    out = roundtrip({"x": x}, CodecSpec("fp16"))["x"]
    np.testing.assert_allclose(out, x, rtol=1e-3, atol=1e-4)
    big = roundtrip({"b": np.array([1e6, -1e6, 3.0], np.float32)}, CodecSpec("fp16"))["b"]
    np.testing.assert_array_equal(big, [65504.0, -65504.0, 3.0])


def test_int8_error_is_at_most_half_a_scale_step() -> None:
    x = randn(5000) * 3
    manifest, payload = encode_tensors({"x": x}, CodecSpec("int8", lz4=False))
    (entry,) = manifest["tensors"]
    scale = entry["scale"]
    assert scale == pytest.approx(float(np.abs(x).max()) / 127, rel=1e-6)
    out = decode_tensors(manifest, payload)["x"]
    assert np.abs(out - x).max() <= scale / 2 * (1 + 1e-5)
    zeros = roundtrip({"z": np.zeros(10, np.float32)}, CodecSpec("int8"))["z"]
    np.testing.assert_array_equal(zeros, 0.0)


def test_topk_keeps_the_largest_magnitudes() -> None:
    x = randn(1000)
    out = roundtrip({"x": x}, CodecSpec("topk", topk_fraction=0.05))["x"]
    k = topk_count(1000, 0.05)
    assert k == 50
    kept = np.flatnonzero(out)
    assert kept.size == k
    np.testing.assert_array_equal(out[kept], x[kept])
    dropped = np.setdiff1d(np.arange(1000), kept)
    assert np.abs(x[kept]).min() >= np.abs(x[dropped]).max()


def test_topk_count_is_ceil_of_fraction() -> None:
    assert topk_count(0, 0.01) == 0
    assert topk_count(1, 0.01) == 1
    assert topk_count(25_000, 0.01) == 250
    assert topk_count(101, 0.01) == 2
    assert topk_count(10, 1.0) == 10


@pytest.mark.parametrize(
    ("size", "fraction", "index"),
    [(200, 0.01, "u8"), (25_000, 0.01, "u16"), (70_000, 0.001, "u32"), (1000, 0.5, "bitmap")],
)
def test_topk_picks_the_cheapest_index_encoding(size: int, fraction: float, index: str) -> None:
    x = randn(size)
    manifest, payload = encode_tensors({"x": x}, CodecSpec("topk", fraction, lz4=False))
    entry = manifest["tensors"][0]
    k = topk_count(size, fraction)
    assert (entry["index"], entry["k"]) == (index, k)
    width = {"u8": 1, "u16": 2, "u32": 4}.get(index)
    assert len(payload) == 4 * k + (k * width if width else (size + 7) // 8)
    out = decode_tensors(manifest, payload)["x"]
    assert np.count_nonzero(out) == k


def test_codec_sizes_against_fp32_for_25k_floats() -> None:
    x = {"w": randn(250, 100)}
    sizes = {kind: len(encode_tensors(x, CodecSpec(kind, lz4=False))[1]) for kind in KINDS}
    assert sizes["fp32"] == 100_000
    assert sizes["fp16"] == 50_000  # 2x smaller
    assert sizes["int8"] == 25_000  # 4x smaller
    assert sizes["topk"] == 250 * (4 + 2)  # 1% kept, u16 positions: ~67x smaller


def test_lz4_is_used_only_when_it_shrinks() -> None:
    zeros = {"z": np.zeros(10_000, np.float32)}
    manifest, payload = encode_tensors(zeros, CodecSpec())
    assert manifest["lz4"] is True
    assert len(payload) < 1000
    np.testing.assert_array_equal(decode_tensors(manifest, payload)["z"], 0.0)

    noise = {"n": randn(10_000)}
    manifest, payload = encode_tensors(noise, CodecSpec())
    assert manifest["lz4"] is False
    assert len(payload) == 40_000

    manifest, payload = encode_tensors(zeros, CodecSpec(lz4=False))
    assert manifest["lz4"] is False
    assert len(payload) == 40_000


def test_lz4_on_large_payloads_still_only_when_it_shrinks() -> None:
    noise = randn(1 << 20)  # 4 MiB: sampled first, and noise does not compress
    manifest, payload = encode_tensors({"n": noise}, CodecSpec())
    assert manifest["lz4"] is False
    assert len(payload) == 4 << 20
    sparse = noise.copy()
    sparse[np.arange(sparse.size) % 8 != 0] = 0.0  # a mostly-zero delta compresses
    manifest, payload = encode_tensors({"s": sparse}, CodecSpec())
    assert manifest["lz4"] is True
    assert len(payload) < 2 << 20
    np.testing.assert_array_equal(decode_tensors(manifest, payload)["s"], sparse)


def test_encode_rejects_local_misuse() -> None:
    with pytest.raises(ValueError, match="whitelist"):
        encode_tensors({"c": np.zeros(3, np.complex64)}, CodecSpec())
    with pytest.raises(ValueError, match="whitelist"):
        encode_tensors({"o": np.array([object()])}, CodecSpec())
    with pytest.raises(TypeError):
        encode_tensors({1: np.zeros(3, np.float32)}, CodecSpec())  # type: ignore[dict-item]


# ------------------------------------------------------------------ rejections


def raw_manifest(*entries: dict[str, Any], use_lz4: bool = False) -> dict[str, Any]:
    return {"lz4": use_lz4, "tensors": list(entries)}


def f32_entry(name: str, shape: list[Any]) -> dict[str, Any]:
    return {"name": name, "codec": "raw", "dtype": "float32", "shape": shape}


def zero_bomb_frame(mib: int) -> bytes:
    """An LZ4 frame of ``mib`` MiB of zeros, built a chunk at a time (no big buffer)."""
    compressor = lz4.frame.LZ4FrameCompressor()
    chunk = bytes(MiB)
    parts = [compressor.begin()]
    parts.extend(compressor.compress(chunk) for _ in range(mib))
    parts.append(compressor.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    frame = zero_bomb_frame(256)
    assert len(frame) < 2 * MiB  # 256 MiB of zeros squeeze to about 1 MB
    return frame


def test_zero_bomb_declared_too_large_is_rejected_before_decompressing(bomb: bytes) -> None:
    manifest = raw_manifest(f32_entry("w", [64 * MiB]), use_lz4=True)
    with pytest.raises(DecompressionBomb, match="max_decoded_bytes"):
        decode_tensors(manifest, bomb, Limits(max_decoded_bytes=16 * MiB))


def test_zero_bomb_with_small_declared_shape_stops_at_the_bound(bomb: bytes) -> None:
    manifest = raw_manifest(f32_entry("w", [1000]), use_lz4=True)
    with pytest.raises(DecompressionBomb, match="expands beyond"):
        decode_tensors(manifest, bomb)


def forge_content_size(frame: bytes, size: int) -> bytes:
    """Rewrite an LZ4 frame's content-size header (and find the header checksum that fits)."""
    head = bytearray(frame[:15])
    assert head[4] & 0x08, "frame must carry a content size"
    head[6:14] = size.to_bytes(8, "little")
    for checksum in range(256):
        head[14] = checksum
        try:
            lz4.frame.LZ4FrameDecompressor().decompress(bytes(head))
        except RuntimeError:
            continue
        return bytes(head) + frame[15:]
    raise AssertionError("no header checksum fits")


@pytest.mark.parametrize("claimed", [1 << 40, 10])
def test_forged_content_size_is_not_trusted(claimed: int) -> None:
    data = np.zeros(1000, np.float32).tobytes()
    frame = forge_content_size(lz4.frame.compress(data, store_size=True), claimed)
    manifest = raw_manifest(f32_entry("w", [1000]), use_lz4=True)
    with pytest.raises(CodecError):
        decode_tensors(manifest, frame)


def test_truncated_and_trailing_lz4_frames_are_rejected() -> None:
    manifest, payload = encode_tensors({"z": np.zeros(10_000, np.float32)}, CodecSpec())
    assert manifest["lz4"]
    with pytest.raises(CodecError):
        decode_tensors(manifest, payload[:-4])
    with pytest.raises(CodecError, match="trailing"):
        decode_tensors(manifest, payload + payload)
    with pytest.raises(CodecError, match="corrupt"):
        decode_tensors(manifest, b"not an lz4 frame at all")
    smaller = raw_manifest(f32_entry("z", [9_999]), use_lz4=True)
    with pytest.raises(DecompressionBomb):
        decode_tensors(smaller, payload)
    larger = raw_manifest(f32_entry("z", [10_001]), use_lz4=True)
    with pytest.raises(CodecError, match="truncated"):
        decode_tensors(larger, payload)


@pytest.mark.parametrize("dtype", ["object", "complex64", "float128", "<f4", "O", "str", "V8"])
def test_disallowed_dtype(dtype: str) -> None:
    manifest = raw_manifest({"name": "x", "codec": "raw", "dtype": dtype, "shape": [1]})
    with pytest.raises(DisallowedDtype, match="whitelist"):
        decode_tensors(manifest, bytes(8))


def test_payload_length_must_match_exactly() -> None:
    manifest, payload = encode_tensors({"a": randn(10), "b": randn(3)}, CodecSpec(lz4=False))
    for bad in (payload[:-1], payload + b"\0", b""):
        with pytest.raises(CodecError, match="manifest describes"):
            decode_tensors(manifest, bad)


@pytest.mark.parametrize(
    "shape",
    [[-1], [1.0], [True], ["3"], None, 3, [1] * 33, [2**40, 2**40], [2**63, 0]],
)
def test_bad_shapes_are_rejected(shape: Any) -> None:
    with pytest.raises(CodecError):
        decode_tensors(raw_manifest(f32_entry("x", shape)), bytes(4))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_rejected(kind: CodecKind, bad: float) -> None:
    x = randn(100)
    x[17] = bad
    manifest, payload = encode_tensors({"x": x}, CodecSpec(kind, topk_fraction=0.1))
    with pytest.raises(NonFiniteTensor):
        decode_tensors(manifest, payload)
    if kind in ("fp32", "fp16", "topk"):
        out = decode_tensors(manifest, payload, Limits(reject_nonfinite=False))["x"]
        assert not np.isfinite(out[17])


def test_float64_raw_overflowing_float32_is_rejected() -> None:
    manifest = raw_manifest({"name": "d", "codec": "raw", "dtype": "float64", "shape": [1]})
    with pytest.raises(NonFiniteTensor):
        decode_tensors(manifest, np.array([1e300]).tobytes())


def good_manifest(kind: CodecKind) -> tuple[dict[str, Any], bytes]:
    return encode_tensors({"x": randn(300)}, CodecSpec(kind, topk_fraction=0.1, lz4=False))


@pytest.mark.parametrize(
    ("kind", "patch", "match"),
    [
        ("fp32", {"codec": "zip"}, "unknown codec"),
        ("fp32", {"extra": 1}, "keys must be exactly"),
        ("fp32", {"name": 5}, "name must be a str"),
        ("int8", {"scale": -1.0}, "scale"),
        ("int8", {"scale": 1e38}, "scale"),
        ("int8", {"scale": 1}, "scale must be a float"),
        ("topk", {"k": 301}, "top-k count"),
        ("topk", {"k": -1}, "top-k count"),
        ("topk", {"index": "u64"}, "index kind"),
    ],
)
def test_bad_entries_are_rejected(kind: CodecKind, patch: dict[str, Any], match: str) -> None:
    manifest, payload = good_manifest(kind)
    manifest["tensors"][0].update(patch)
    with pytest.raises(CodecError, match=match):
        decode_tensors(manifest, payload)


def test_int8_non_finite_scale_is_reported_as_non_finite() -> None:
    manifest, payload = good_manifest("int8")
    manifest["tensors"][0]["scale"] = float("nan")
    with pytest.raises(NonFiniteTensor):
        decode_tensors(manifest, payload)


def test_missing_entry_key_and_bad_manifest_shapes() -> None:
    manifest, payload = good_manifest("fp32")
    del manifest["tensors"][0]["dtype"]
    with pytest.raises(CodecError, match="keys must be exactly"):
        decode_tensors(manifest, payload)
    bads: list[Any] = [
        None,
        [],
        {"lz4": False},
        {"lz4": 0, "tensors": []},
        {"lz4": 0, "tensors": {}},
    ]
    for bad in bads:
        with pytest.raises(CodecError):
            decode_tensors(bad, b"")
    with pytest.raises(CodecError, match="payload must be bytes"):
        decode_tensors({"lz4": False, "tensors": []}, "")


def test_duplicate_names_and_too_many_tensors() -> None:
    entry = f32_entry("x", [1])
    with pytest.raises(CodecError, match="twice"):
        decode_tensors(raw_manifest(entry, dict(entry)), bytes(8))
    with pytest.raises(CodecError, match="limit 2"):
        decode_tensors(
            raw_manifest(*(f32_entry(str(i), [1]) for i in range(3))),
            bytes(12),
            Limits(max_tensors=2),
        )


def test_topk_positions_must_increase_and_stay_in_range() -> None:
    values = np.ones(2, np.float32).tobytes()
    entry = {"name": "x", "codec": "topk", "shape": [10], "k": 2, "index": "u8"}
    for positions in ([3, 3], [5, 2], [3, 10]):
        payload = values + bytes(positions)
        with pytest.raises(CodecError, match="not increasing"):
            decode_tensors(raw_manifest(entry), payload)
    out = decode_tensors(raw_manifest(entry), values + bytes([2, 9]))["x"]
    np.testing.assert_array_equal(np.flatnonzero(out), [2, 9])


def test_topk_bitmap_must_mark_exactly_k_and_have_zero_padding() -> None:
    values = np.ones(2, np.float32).tobytes()
    entry = {"name": "x", "codec": "topk", "shape": [10], "k": 2, "index": "bitmap"}
    for bitmap in (b"\x07\x00", b"\x01\x00", b"\x01\x04"):  # 3 marked, 1 marked, padding bit
        with pytest.raises(CodecError, match="bitmap"):
            decode_tensors(raw_manifest(entry), values + bitmap)
    out = decode_tensors(raw_manifest(entry), values + b"\x01\x02")["x"]
    np.testing.assert_array_equal(np.flatnonzero(out), [0, 9])


def test_bool_bytes_must_be_zero_or_one() -> None:
    entry = {"name": "b", "codec": "raw", "dtype": "bool", "shape": [3]}
    with pytest.raises(CodecError, match="bool"):
        decode_tensors(raw_manifest(entry), b"\x00\x01\x02")


def test_declared_sizes_over_the_limit_are_rejected_before_allocation() -> None:
    topk = {"name": "x", "codec": "topk", "shape": [1 << 30], "k": 0, "index": "u32"}
    with pytest.raises(DecompressionBomb):
        decode_tensors(raw_manifest(topk), b"", Limits(max_decoded_bytes=MiB))


def test_unaligned_raw_tensors_decode_aligned() -> None:
    tensors = {"b": np.array([True]), "d": np.arange(3, dtype=np.int64), "f": randn(3)}
    out = roundtrip(tensors, CodecSpec(lz4=False))
    assert out["d"].flags.aligned and out["f"].flags.aligned
    np.testing.assert_array_equal(out["d"], [0, 1, 2])


# ------------------------------------------------------------------- properties

names = st.text(min_size=0, max_size=8)
float_dtypes = st.sampled_from(["float16", "float32", "float64"])
all_dtypes = st.sampled_from(["float16", "float32", "float64", *NON_FLOAT])
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)


@st.composite
def tensor_dicts(draw: st.DrawFn, dtypes: st.SearchStrategy[str] = all_dtypes) -> dict[str, Any]:
    keys = draw(st.lists(names, max_size=5, unique=True))
    out: dict[str, Any] = {}
    for key in keys:
        dtype = np.dtype(draw(dtypes))
        elements = (
            st.floats(-1e4, 1e4, width=16 if dtype.itemsize == 2 else 32)
            if dtype.kind == "f"
            else None
        )
        out[key] = draw(hnp.arrays(dtype, draw(shapes), elements=elements))
    return out


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(tensors=tensor_dicts(), fraction=st.floats(0.01, 1.0), use_lz4=st.booleans())
def test_roundtrip_property(
    kind: str, tensors: dict[str, Any], fraction: float, use_lz4: bool
) -> None:
    out = roundtrip(tensors, CodecSpec(kind, fraction, use_lz4))  # type: ignore[arg-type]
    assert list(out) == list(tensors)
    for name, arr in tensors.items():
        got = out[name]
        assert got.shape == arr.shape
        assert not got.flags.writeable
        if arr.dtype.kind != "f":
            assert got.dtype == arr.dtype
            np.testing.assert_array_equal(got, arr)
            continue
        assert got.dtype == np.float32
        x = arr.astype(np.float32)
        if kind == "fp32":
            np.testing.assert_array_equal(got, x)
        elif kind == "fp16":
            np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
        elif kind == "int8":
            amax = float(np.abs(x).max()) if x.size else 0.0
            assert np.all(np.abs(got - x) <= amax / 127 / 2 * (1 + 1e-5) + 1e-30)
        else:
            k = topk_count(x.size, fraction)
            flat_x, flat_got = x.reshape(-1), got.reshape(-1)
            kept = np.flatnonzero(flat_got)
            assert kept.size <= k  # kept zeros do not show up as non-zero
            np.testing.assert_array_equal(flat_got[kept], flat_x[kept])
            dropped_mags = np.abs(np.delete(flat_x, kept))
            if kept.size and dropped_mags.size and kept.size == k:
                assert np.abs(flat_x[kept]).min() >= dropped_mags.max()


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


# Mostly plausible values (so decoding gets deep), sometimes anything at all.
def mostly(
    plausible: st.SearchStrategy[Any], weird: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    return st.integers(0, 9).flatmap(lambda roll: weird if roll == 7 else plausible)


entry_values: dict[str, st.SearchStrategy[Any]] = {
    "name": mostly(st.text(max_size=4), json_like),
    "dtype": mostly(
        st.sampled_from(["float32", "float16", "float64", "int64", "bool", "uint8"]),
        st.sampled_from(["c8", "object", "<f4"]) | json_like,
    ),
    "shape": mostly(
        st.lists(st.integers(0, 9), max_size=3),
        st.lists(st.integers(-2, 2**40), max_size=3) | json_like,
    ),
    "scale": mostly(st.floats(0, 10), st.floats() | json_like),
    "k": mostly(st.integers(0, 30), st.integers(-2, 2**33) | json_like),
    "index": mostly(st.sampled_from(["u8", "u16", "u32", "bitmap"]), json_like),
}
ENTRY_KEYS = {
    "raw": ("dtype",),
    "fp16": (),
    "int8": ("scale",),
    "topk": ("k", "index"),
}
INDEX_WIDTH = {"u8": 1, "u16": 2, "u32": 4}


def stored_size(entry: dict[str, Any]) -> int:
    """Payload bytes an entry takes, as the module docstring specifies (best effort)."""
    try:
        size = math.prod(entry["shape"])
        codec = entry["codec"]
        if codec == "raw":
            return int(size * np.dtype(entry["dtype"]).itemsize)
        if codec == "fp16":
            return int(2 * size)
        if codec == "int8":
            return int(size)
        index = entry["index"]
        k = int(entry["k"])
        return 4 * k + ((size + 7) // 8 if index == "bitmap" else k * INDEX_WIDTH[index])
    except Exception:
        return 0


@st.composite
def hostile_inputs(draw: st.DrawFn) -> tuple[Any, bytes]:
    if draw(st.integers(0, 9)) == 7:
        return draw(json_like), draw(st.binary(max_size=64))
    entries = []
    for _ in range(draw(st.integers(0, 3))):
        codec = draw(st.sampled_from(sorted(ENTRY_KEYS)))
        keys = {"name", "shape", *ENTRY_KEYS[codec]}
        if draw(st.integers(0, 9)) == 7:
            keys ^= draw(st.sets(st.sampled_from(sorted(entry_values)), max_size=2))
        entry = {key: draw(entry_values[key]) for key in keys}
        entry["codec"] = codec if draw(st.integers(0, 19)) != 7 else draw(json_like)
        entries.append(entry)
    use_lz4 = draw(st.booleans())
    size = min(max(sum(stored_size(e) for e in entries), 0), 4096)
    payload = draw(st.binary(min_size=size, max_size=size))
    if draw(st.integers(0, 4)) == 0:
        payload += draw(st.binary(min_size=1, max_size=4))
    if use_lz4:
        payload = lz4.frame.compress(payload)
    return {"lz4": use_lz4, "tensors": entries}, payload


@settings(max_examples=250, deadline=None)
@given(hostile=hostile_inputs())
def test_hostile_input_raises_only_protocol_errors(hostile: tuple[Any, bytes]) -> None:
    manifest, payload = hostile
    try:
        out = decode_tensors(manifest, payload, Limits(max_decoded_bytes=MiB))
    except ProtocolError:
        return
    for arr in out.values():
        assert not arr.flags.writeable
        if arr.dtype.kind == "f":
            assert arr.dtype == np.float32
            assert np.isfinite(arr).all()


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    data=st.data(),
)
def test_corrupted_payloads_raise_only_protocol_errors(
    kind: CodecKind, data: st.DataObject
) -> None:
    tensors = data.draw(tensor_dicts(float_dtypes))
    manifest, payload = encode_tensors(tensors, CodecSpec(kind, 0.2))
    mutated = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if op == "flip" and mutated:
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut" and mutated:
            del mutated[data.draw(st.integers(0, len(mutated) - 1)) :]
        else:
            mutated += data.draw(st.binary(min_size=1, max_size=8))
    with contextlib.suppress(ProtocolError):
        decode_tensors(manifest, bytes(mutated))


def test_nan_scale_from_encoder_is_a_float() -> None:
    x = np.array([1.0, math.nan], np.float32)
    manifest, _ = encode_tensors({"x": x}, CodecSpec("int8"))
    assert math.isnan(manifest["tensors"][0]["scale"])
