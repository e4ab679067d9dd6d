"""Tensor codec: an ordered ``name -> ndarray`` dict <-> (manifest, one contiguous payload).

The manifest is plain msgpack-ready data::

    {"lz4": bool, "tensors": [entry, ...]}          # entries in the dict's order

and each entry describes how its bytes sit in the payload (keys are exact per codec):

    raw   {name, codec: "raw",  dtype, shape}            n little-endian ``dtype`` items
    fp16  {name, codec: "fp16", shape}                   n float16
    int8  {name, codec: "int8", shape, scale}            n int8 q; x ~= q * scale
    topk  {name, codec: "topk", shape, k, index}         k float32 values, then their
                                                         positions: u8/u16/u32 or a bitmap

The payload is the entries' bytes concatenated in manifest order (no padding). With
``"lz4": true`` the whole payload is one LZ4 *frame* (the format the design names; the
frame's own content-size header is never trusted: the expected size comes from the
manifest and decompression is capped at it). The encoder compresses only when that
makes the payload strictly smaller (payloads over 1 MiB are tried only when spread
samples of them compress to at most 95 %: fp32 weights do not compress at all).

Codecs (``CodecSpec.kind``) apply to floating-point tensors; other whitelisted dtypes
(ints, uint8, bool) always travel raw. ``fp32`` sends floats as float32; ``fp16`` casts
(saturating finite values at +-65504); ``int8`` uses one symmetric scale per tensor,
``scale = max|x| / 127``, so the error is at most ``scale / 2``; ``topk`` keeps the
``k = ceil(fraction * size)`` entries of largest magnitude and zeros the rest.

Decoding returns every float tensor as a float32 array of its original shape and every
other tensor in its own dtype; all decoded arrays are read-only (raw ones are views of
the payload). Everything a peer sends is validated against ``Limits`` before any large
allocation; failures raise ``ProtocolError`` subclasses. No pickle, ever.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeAlias

import lz4.frame
import numpy as np
import numpy.typing as npt

from fedloom.transport.errors import (
    CodecError,
    DecompressionBomb,
    DisallowedDtype,
    NonFiniteTensor,
    describe,
)
from fedloom.transport.half import half_all_finite, half_to_float, remember_half, to_half
from fedloom.transport.limits import Limits

# Same alias as ``transport.wire.Tensors`` (not imported from there: wire imports us).
Tensors: TypeAlias = dict[str, npt.NDArray[Any]]
Manifest: TypeAlias = dict[str, Any]
CodecKind: TypeAlias = Literal["fp32", "fp16", "int8", "topk"]

CODEC_KINDS: tuple[str, ...] = ("fp32", "fp16", "int8", "topk")

# The dtype whitelist, by wire name. Always little-endian on the wire.
_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "bool",
    )
}
_NAME_BY_KIND_SIZE: dict[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): name for name, dt in _DTYPES.items()
}
_F16 = _DTYPES["float16"]
_F32 = _DTYPES["float32"]
_F16_MAX = float(np.finfo(np.float16).max)
_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)
# The largest float32 scale with 127 * scale finite in float32 (F32_MAX / 127 itself
# rounds up to a float32 whose product with 127 overflows). Up to _SAFE_INT8_SCALE every
# q in [-128, 127] decodes finite; above it only q = -128 can overflow, and the decoder
# checks its output (an honest encoder never writes -128).
_MAX_INT8_SCALE = float(np.nextafter(np.float32(_F32_MAX / 127.0), np.float32(0)))
_SAFE_INT8_SCALE = _F32_MAX / 128.0  # exact: a power-of-two division
# numpy refuses an array whose product of non-zero dimensions times its itemsize exceeds
# intp (even when a zero dimension makes it empty); no dtype here is wider than 8 bytes.
_MAX_EXTENT = (2**63 - 1) // 8

_INDEX_DTYPES: dict[str, np.dtype[Any]] = {
    "u8": np.dtype("<u1"),
    "u16": np.dtype("<u2"),
    "u32": np.dtype("<u4"),
}
_INDEX_KINDS = frozenset((*_INDEX_DTYPES, "bitmap"))

_MANIFEST_KEYS = frozenset(("lz4", "tensors"))
_ENTRY_KEYS: dict[str, frozenset[str]] = {
    "raw": frozenset(("name", "codec", "dtype", "shape")),
    "fp16": frozenset(("name", "codec", "shape")),
    "int8": frozenset(("name", "codec", "shape", "scale")),
    "topk": frozenset(("name", "codec", "shape", "k", "index")),
}

# An LZ4 frame costs ~15 bytes of header and end mark: smaller payloads never shrink.
_LZ4_MIN_INPUT = 64
# Payloads above 1 MiB are sampled (16 x 64 KiB) before a full compression attempt,
# which goes ahead only if the samples shrink to at most 95 %.
_LZ4_SAMPLE_ABOVE = 1 << 20
_LZ4_SAMPLES = 16
_LZ4_SAMPLE = 1 << 16
_LZ4_SAMPLE_RATIO = 0.95


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """How the float tensors of one message are encoded (see the module docstring)."""

    kind: CodecKind = "fp32"
    topk_fraction: float = 0.01
    lz4: bool = True

    def __post_init__(self) -> None:
        if self.kind not in CODEC_KINDS:
            raise ValueError(f"CodecSpec.kind must be one of {CODEC_KINDS}, got {self.kind!r}")
        fraction = self.topk_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0.0 < fraction <= 1.0
        ):
            raise ValueError(f"CodecSpec.topk_fraction must be in (0, 1], got {fraction!r}")
        if not isinstance(self.lz4, bool):
            raise ValueError(f"CodecSpec.lz4 must be a bool, got {self.lz4!r}")


DEFAULT_SPEC = CodecSpec()
DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------------- encode


def topk_count(size: int, fraction: float) -> int:
    """How many entries the top-k codec keeps for a tensor of ``size`` elements."""
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


def encode_tensors(
    tensors: Mapping[str, npt.NDArray[Any]], spec: CodecSpec = DEFAULT_SPEC
) -> tuple[Manifest, bytes]:
    """Encode ``tensors`` (in order) into ``(manifest, payload)``.

    Raises ``TypeError``/``ValueError`` for local misuse: a non-str name or a dtype
    outside the whitelist. NaN/Inf are encoded as they are (the receiver rejects them).
    """
    entries, parts = encode_tensor_parts(tensors, spec)
    # Joining the arrays' buffers is the one copy of the data.
    payload = b"".join(parts)
    packed = _lz4_if_smaller(payload) if spec.lz4 else None
    if packed is None:
        return {"lz4": False, "tensors": entries}, payload
    return {"lz4": True, "tensors": entries}, packed


def raw_entry(
    name: str, arr: npt.NDArray[Any], spec: CodecSpec
) -> tuple[dict[str, Any], npt.NDArray[Any]] | None:
    """A tensor's manifest entry and stored array when it travels raw under ``spec``
    (every non-float; floats with ``fp32``, as float32), else None: the codec applies.
    Raises ``ValueError`` for a dtype outside the whitelist. Shared by the batch and the
    streaming encoders, so both write the same entries."""
    dtype_name = _NAME_BY_KIND_SIZE.get((arr.dtype.kind, arr.dtype.itemsize))
    if dtype_name is None:
        raise ValueError(
            f"tensor {name!r} has dtype {arr.dtype}, not in the whitelist {sorted(_DTYPES)}"
        )
    if arr.dtype.kind == "f" and spec.kind != "fp32":
        return None
    if arr.dtype.kind == "f":
        dtype_name = "float32"
    stored = np.ascontiguousarray(arr, dtype=_DTYPES[dtype_name])
    return {"name": name, "codec": "raw", "dtype": dtype_name, "shape": list(arr.shape)}, stored


def encode_tensor_parts(
    tensors: Mapping[str, npt.NDArray[Any]], spec: CodecSpec = DEFAULT_SPEC
) -> tuple[list[dict[str, Any]], list[memoryview]]:
    """The manifest entries of ``tensors`` and their stored bytes, one buffer per piece,
    in payload order: ``b"".join(parts)`` is the uncompressed payload of
    ``encode_tensors``. Raw tensors are views of the caller's arrays (no copy), so a
    writer can hand them to the OS directly; do not modify the arrays meanwhile."""
    entries: list[dict[str, Any]] = []
    parts: list[memoryview] = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        arr = np.asarray(value)
        raw = raw_entry(name, arr, spec)
        if raw is not None:
            entries.append(raw[0])
            parts.append(raw[1].data)
            continue
        shape = list(arr.shape)
        if spec.kind == "fp16" and arr.dtype == _F16:
            # Already what the codec would produce (float16 -> float32 -> float16 is exact).
            entries.append({"name": name, "codec": "fp16", "shape": shape})
            parts.append(np.ascontiguousarray(arr).reshape(-1).data)
            continue
        x = np.ascontiguousarray(arr, dtype=_F32).reshape(-1)
        if spec.kind == "fp16":
            entries.append({"name": name, "codec": "fp16", "shape": shape})
            parts.append(_to_fp16(x).data)
        elif spec.kind == "int8":
            q, scale = _to_int8(x)
            entries.append({"name": name, "codec": "int8", "shape": shape, "scale": scale})
            parts.append(q.data)
        else:
            values, index, index_kind = _to_topk(x, topk_count(x.size, spec.topk_fraction))
            entries.append(
                {
                    "name": name,
                    "codec": "topk",
                    "shape": shape,
                    "k": int(values.size),
                    "index": index_kind,
                }
            )
            parts.append(values.data)
            parts.append(index.data)
    return entries, parts


def _lz4_if_smaller(payload: bytes) -> bytes | None:
    """The payload as one LZ4 frame, or None where that would not be smaller."""
    size = len(payload)
    if size < _LZ4_MIN_INPUT:
        return None
    if size > _LZ4_SAMPLE_ABOVE:
        # fp32 weights barely compress (ratio ~1.00) and a full attempt costs ~2 ms/MB:
        # compress evenly spread samples first and give up if they do not shrink.
        view = memoryview(payload)
        step = size // _LZ4_SAMPLES
        sampled = sum(
            len(lz4.frame.compress(view[i * step : i * step + _LZ4_SAMPLE], store_size=False))
            for i in range(_LZ4_SAMPLES)
        )
        if sampled > _LZ4_SAMPLE_RATIO * _LZ4_SAMPLES * _LZ4_SAMPLE:
            return None
    packed: bytes = lz4.frame.compress(payload, store_size=False)
    return packed if len(packed) < size else None


def fp32_lz4_payload_size(payload: bytes) -> int:
    """Bytes of a tensor field's payload as the fp32 codec with LZ4 sends it, given the
    tensors' raw bytes joined in order: their LZ4 frame where that is smaller."""
    packed = _lz4_if_smaller(payload)
    return len(payload) if packed is None else len(packed)


def _to_fp16(x: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
    h = to_half(x)
    if not half_all_finite(h):
        # Saturate finite values beyond fp16's range; genuine Inf stays Inf.
        flat = x.reshape(-1)
        fix = np.isinf(h) & np.isfinite(flat)
        h[fix] = np.copysign(_F16_MAX, flat[fix])
    return h


def _to_int8(x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int8], float]:
    if x.size == 0:
        return np.zeros(0, np.int8), 0.0
    amax = float(np.abs(x).max())  # NaN propagates, so a NaN tensor gets a NaN scale
    scale = int8_scale(amax)  # the float32 the receiver will multiply by
    if not math.isfinite(scale):
        # The receiver rejects a non-finite scale; the values do not matter.
        return np.zeros(x.size, np.int8), float(scale)
    if scale == 0.0:
        if amax == 0.0:
            return np.zeros(x.size, np.int8), 0.0
        scale = _F32_TINY  # amax / 127 underflowed
    scaled = x / scale
    return np.rint(scaled, out=scaled).astype(np.int8), float(scale)


def int8_scale(amax: float) -> np.float32:
    """The int8 codec's scale for a tensor whose largest magnitude is ``amax``: amax / 127,
    capped where 127 * scale would overflow float32 (so the receiver accepts it). A NaN or
    infinite ``amax`` gives a non-finite scale, which the receiver rejects."""
    scale = np.float32(amax / 127.0)
    if math.isfinite(scale) and scale > _MAX_INT8_SCALE:
        return np.float32(_MAX_INT8_SCALE)
    return scale


def _to_topk(
    x: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[Any], str]:
    n = x.size
    if k >= n:
        positions = np.arange(n)
    else:
        positions = np.argpartition(np.abs(x), n - k)[n - k :]
        positions.sort()
    values = x[positions]
    bitmap_bytes = (n + 7) // 8
    width = 1 if n <= 1 << 8 else 2 if n <= 1 << 16 else 4 if n <= 1 << 32 else 0
    if width == 0 or bitmap_bytes < k * width:
        mask = np.zeros(n, np.bool_)
        mask[positions] = True
        return values, np.packbits(mask, bitorder="little"), "bitmap"
    kind = {1: "u8", 2: "u16", 4: "u32"}[width]
    return values, positions.astype(_INDEX_DTYPES[kind]), kind


# ---------------------------------------------------------------------------- decode


class _Entry(NamedTuple):
    """A validated manifest entry and where its bytes are."""

    name: str
    codec: str
    shape: tuple[int, ...]
    size: int  # elements
    stored: int  # bytes in the payload
    dtype: np.dtype[Any]  # raw only
    scale: float  # int8 only
    k: int  # topk only
    index_kind: str  # topk only


def decode_tensors(manifest: object, payload: object, limits: Limits = DEFAULT_LIMITS) -> Tensors:
    """Decode what ``encode_tensors`` produced (and reject anything else).

    Both arguments come from a peer, so their types are checked too. Raises only
    ``ProtocolError`` subclasses (``CodecError``, ``DecompressionBomb``,
    ``DisallowedDtype``, ``NonFiniteTensor``).
    """
    if type(manifest) is not dict or manifest.keys() != _MANIFEST_KEYS:
        raise CodecError("tensor manifest must be a map with exactly the keys 'lz4', 'tensors'")
    use_lz4 = manifest["lz4"]
    raw_entries = manifest["tensors"]
    if type(use_lz4) is not bool:
        raise CodecError("tensor manifest 'lz4' must be a bool")
    if type(raw_entries) is not list and type(raw_entries) is not tuple:
        raise CodecError("tensor manifest 'tensors' must be an array")
    if len(raw_entries) > limits.max_tensors:
        raise CodecError(f"{len(raw_entries)} tensors in one message, limit {limits.max_tensors}")
    if type(payload) is not bytes and type(payload) is not bytearray:
        raise CodecError(f"tensor payload must be bytes, got {type(payload).__name__}")

    entries: list[_Entry] = []
    names: set[str] = set()
    stored_total = 0
    decoded_total = 0
    all_f32 = True
    for i, raw_entry in enumerate(raw_entries):
        entry = _parse_entry(i, raw_entry, limits)
        if entry.name in names:
            raise CodecError(f"tensor name {describe(entry.name)} appears twice")
        names.add(entry.name)
        entries.append(entry)
        all_f32 = all_f32 and entry.codec == "raw" and entry.dtype == _F32
        stored_total += entry.stored
        decoded_total += decoded_bytes(entry)
        if decoded_total > limits.max_decoded_bytes or stored_total > limits.max_decoded_bytes:
            raise DecompressionBomb(
                f"tensors would decode to more than max_decoded_bytes={limits.max_decoded_bytes}"
            )

    buf: bytes | bytearray
    if use_lz4:
        buf = _lz4_decompress(payload, stored_total)
    elif len(payload) != stored_total:
        raise CodecError(
            f"payload is {len(payload)} bytes but the manifest describes {stored_total}"
        )
    else:
        buf = payload

    if all_f32:
        return _decode_all_f32(buf, entries, limits)
    out: Tensors = {}
    offset = 0
    for entry in entries:
        if entry.codec == "raw":
            arr = _decode_raw(buf, offset, entry, limits)
        elif entry.codec == "fp16":
            arr = _decode_fp16(buf, offset, entry, limits)
        elif entry.codec == "int8":
            arr = _decode_int8(buf, offset, entry, limits)
        else:
            arr = _decode_topk(buf, offset, entry, limits)
        arr.flags.writeable = False
        if keeps_half(entry):
            # The float16 it came from (``transport.half.remember_half``), copied: ``buf``
            # may be a caller's bytearray. Handed out frozen: it must stay equal to it.
            half = np.frombuffer(buf, dtype=_F16, count=entry.size, offset=offset)
            arr = remember_half(arr, half.reshape(entry.shape).copy())
        out[entry.name] = arr
        offset += entry.stored
    return out


def keeps_half(entry: _Entry) -> bool:
    """Whether ``entry`` travels as float16 (the fp16 codec, or raw float16): the decoders
    keep its float16 beside the float32 they decode (``transport.half.remember_half``)."""
    return entry.codec == "fp16" or (entry.codec == "raw" and entry.dtype == _F16)


def decoded_bytes(entry: _Entry) -> int:
    """Bytes ``entry`` holds once decoded, counted against ``Limits.max_decoded_bytes``:
    a float tensor decodes to float32 (4 bytes an element, whatever its wire dtype), plus
    2 an element for the float16 kept where it travels as float16; other dtypes raw."""
    itemsize = 4 if entry.codec != "raw" or entry.dtype.kind == "f" else entry.dtype.itemsize
    return entry.size * (itemsize + (2 if keeps_half(entry) else 0))


def _parse_entry(i: int, entry: object, limits: Limits) -> _Entry:
    if type(entry) is not dict:
        raise CodecError(f"tensor entry {i} must be a map")
    codec = entry.get("codec")
    if type(codec) is not str or codec not in _ENTRY_KEYS:
        raise CodecError(f"tensor entry {i}: unknown codec {describe(codec)}")
    if entry.keys() != _ENTRY_KEYS[codec]:
        raise CodecError(
            f"tensor entry {i} ({codec}): keys must be exactly {sorted(_ENTRY_KEYS[codec])}"
        )
    name = entry["name"]
    if type(name) is not str or len(name) > limits.max_str_len:
        raise CodecError(f"tensor entry {i}: name must be a str of at most {limits.max_str_len}")
    shape, size = _parse_shape(name, entry["shape"], limits)
    dtype = _F32
    scale = 0.0
    k = 0
    index = ""
    if codec == "raw":
        dtype_name = entry["dtype"]
        if type(dtype_name) is not str or dtype_name not in _DTYPES:
            raise DisallowedDtype(
                f"tensor {describe(name)}: dtype {describe(dtype_name)} "
                f"is not in the whitelist {sorted(_DTYPES)}"
            )
        dtype = _DTYPES[dtype_name]
        stored = size * dtype.itemsize
    elif codec == "fp16":
        stored = 2 * size
    elif codec == "int8":
        scale = entry["scale"]
        if type(scale) is not float:
            raise CodecError(f"tensor {describe(name)}: int8 scale must be a float")
        if not math.isfinite(scale):
            raise NonFiniteTensor(f"tensor {describe(name)}: int8 scale is {scale}")
        if not 0.0 <= scale <= _MAX_INT8_SCALE:  # else q * scale overflows float32
            raise CodecError(
                f"tensor {describe(name)}: int8 scale {scale} outside [0, {_MAX_INT8_SCALE}]"
            )
        stored = size
    else:
        k = entry["k"]
        index = entry["index"]
        if type(k) is not int or not 0 <= k <= size:
            raise CodecError(
                f"tensor {describe(name)}: top-k count {describe(k)} not in [0, {size}]"
            )
        if type(index) is not str or index not in _INDEX_KINDS:
            raise CodecError(f"tensor {describe(name)}: top-k index kind {describe(index)} unknown")
        index_bytes = (size + 7) // 8 if index == "bitmap" else k * _INDEX_DTYPES[index].itemsize
        stored = 4 * k + index_bytes
    return _Entry(name, codec, shape, size, stored, dtype, scale, k, index)


def _parse_shape(name: str, shape: object, limits: Limits) -> tuple[tuple[int, ...], int]:
    if type(shape) is not list and type(shape) is not tuple:
        raise CodecError(f"tensor {describe(name)}: shape must be an array of ints")
    if len(shape) > limits.max_ndim:
        raise CodecError(
            f"tensor {describe(name)}: {len(shape)} dimensions, limit {limits.max_ndim}"
        )
    cap = min(limits.max_decoded_bytes, _MAX_EXTENT)
    size = 1
    extent = 1  # the product numpy checks: a zero dimension does not make it 0
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise CodecError(f"tensor {describe(name)}: shape must hold non-negative ints")
        if dim > cap:
            raise DecompressionBomb(
                f"tensor {describe(name)}: dimension {dim} exceeds max_decoded_bytes={cap}"
            )
        size *= dim
        extent *= max(dim, 1)
        if extent > cap:  # checked per dimension, so the ints stay below cap**2
            raise DecompressionBomb(  # numpy refuses such a shape even for an empty array
                f"tensor {describe(name)}: its non-zero dimensions multiply to more than "
                f"max_decoded_bytes={cap}"
            )
    return tuple(shape), size


def _lz4_decompress(payload: bytes | bytearray, expected: int) -> bytes:
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        # Bounded: never more than one byte past what the manifest describes.
        out: bytes = decompressor.decompress(payload, max_length=expected + 1)
    except RuntimeError as exc:
        raise CodecError(f"corrupt lz4 frame: {exc}") from None
    if len(out) > expected:
        raise DecompressionBomb(
            f"lz4 payload expands beyond the {expected} bytes its manifest describes"
        )
    if len(out) != expected or not decompressor.eof:
        raise CodecError(
            f"lz4 payload truncated: {len(out)} of {expected} bytes, frame ended: "
            f"{decompressor.eof}"
        )
    if decompressor.unused_data:
        raise CodecError("trailing bytes after the lz4 frame")
    return out


def _decode_all_f32(buf: bytes | bytearray, entries: list[_Entry], limits: Limits) -> Tensors:
    """The common case (fp32 codec): one view of the payload, one finiteness check."""
    flat = np.frombuffer(buf, dtype=_F32)
    flat.flags.writeable = False  # slices inherit it
    out: Tensors = {}
    offset = 0
    for entry in entries:
        end = offset + entry.size
        out[entry.name] = flat[offset:end].reshape(entry.shape)
        offset = end
    if limits.reject_nonfinite and not _all_finite(flat):
        for name, arr in out.items():  # only to name the culprit
            _check_finite(name, arr, limits)
    return out


def _check_finite(name: str, arr: npt.NDArray[Any], limits: Limits) -> None:
    if limits.reject_nonfinite and not _all_finite(arr):
        raise NonFiniteTensor(f"tensor {describe(name)} contains NaN or Inf")


def _all_finite(arr: npt.NDArray[Any]) -> bool:
    if arr.dtype == _F16:
        return half_all_finite(arr)
    if arr.dtype.kind != "f":
        return True  # integers and bools have no NaN or Inf
    # min and max propagate NaN and reach +-Inf: two passes with no temporary array.
    return arr.size == 0 or (math.isfinite(arr.min()) and math.isfinite(arr.max()))


def _decode_raw(
    buf: bytes | bytearray, offset: int, entry: _Entry, limits: Limits
) -> npt.NDArray[Any]:
    dtype = entry.dtype
    arr = np.frombuffer(buf, dtype=dtype, count=entry.size, offset=offset)
    if offset % dtype.itemsize:
        arr = arr.copy()  # keep decoded arrays aligned
    if dtype.kind == "b" and entry.size and arr.view(np.uint8).max() > 1:
        raise CodecError(f"tensor {describe(entry.name)}: bool bytes other than 0/1")
    if dtype.kind == "f":
        if dtype == _F16:
            arr = half_to_float(arr)  # float tensors always decode as float32
        elif dtype != _F32:
            with np.errstate(over="ignore"):
                arr = arr.astype(_F32)
        _check_finite(entry.name, arr, limits)
    return arr.reshape(entry.shape)


def _decode_fp16(
    buf: bytes | bytearray, offset: int, entry: _Entry, limits: Limits
) -> npt.NDArray[Any]:
    half = np.frombuffer(buf, dtype=_F16, count=entry.size, offset=offset)
    _check_finite(entry.name, half, limits)
    return half_to_float(half).reshape(entry.shape)


def _decode_int8(
    buf: bytes | bytearray, offset: int, entry: _Entry, limits: Limits
) -> npt.NDArray[Any]:
    q = np.frombuffer(buf, dtype=np.int8, count=entry.size, offset=offset)
    out = q.astype(_F32)
    with np.errstate(over="ignore"):
        out *= np.float32(entry.scale)
    check_int8_finite(entry, out, limits)
    return out.reshape(entry.shape)


def check_int8_finite(entry: _Entry, out: npt.NDArray[Any], limits: Limits) -> None:
    """Reject decoded int8 values that overflowed: only q = -128 can, above the safe scale."""
    if entry.scale > _SAFE_INT8_SCALE:
        _check_finite(entry.name, out, limits)


def _decode_topk(
    buf: bytes | bytearray, offset: int, entry: _Entry, limits: Limits
) -> npt.NDArray[Any]:
    k, size, name = entry.k, entry.size, entry.name
    values = np.frombuffer(buf, dtype=_F32, count=k, offset=offset)
    _check_finite(name, values, limits)
    dense = np.zeros(size, _F32)
    index_offset = offset + 4 * k
    if entry.index_kind == "bitmap":
        packed = np.frombuffer(buf, dtype=np.uint8, count=(size + 7) // 8, offset=index_offset)
        bits = np.unpackbits(packed, bitorder="little")
        if bits[size:].any() or int(np.count_nonzero(bits)) != k:
            raise CodecError(
                f"tensor {describe(name)}: top-k bitmap does not mark exactly {k} of {size}"
            )
        dense[bits[:size].view(np.bool_)] = values
    else:
        positions = np.frombuffer(
            buf, dtype=_INDEX_DTYPES[entry.index_kind], count=k, offset=index_offset
        )
        if k and (int(positions[-1]) >= size or not (positions[1:] > positions[:-1]).all()):
            raise CodecError(
                f"tensor {describe(name)}: top-k positions not increasing below {size}"
            )
        dense[positions] = values
    return dense.reshape(entry.shape)
