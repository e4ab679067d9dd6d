"""Streaming tensor codec: tensors cut into record-sized pieces, decoded piece by piece.

``transport.tensors`` turns a whole tensor dict into one payload; that is right for small
messages but, for a 100 MB delta, means holding the payload (and its encrypted copy) in
memory and doing all the work before the first byte leaves. Here the same per-tensor
codecs (raw/fp32, fp16, int8 with one scale per tensor, top-k) produce the *stored*
bytes lazily, piece by piece, and the receiver decodes each piece straight into
preallocated output arrays.

Stream manifest (msgpack-ready, sent in the stream header)::

    {"tensors": [entry, ...], "stored": total stored bytes, "piece": bytes per piece}

Entries are exactly ``transport.tensors`` manifest entries and are validated by the same
code (``tensors._parse_entry``) under the same ``Limits``. The stored bytes are the
entries' bytes concatenated in order (the layout ``encode_tensors`` uses without lz4);
they travel as ``max(1, ceil(stored / piece))`` pieces, each ``min(piece, remaining)``
bytes long. A piece arrives either as exactly those bytes, or as one LZ4 *block*
strictly shorter than them that must decompress to exactly that size (so decompression
is bounded by construction, and no flag byte is needed: the length says which). The
sender compresses per piece, tries a sample first, and keeps compression only where it
shrinks the piece: fp32 weights do not compress, and then a piece goes out as a view of
the tensor's own memory, with no copy on this side.

Memory on the receiving side: the decoded arrays and the float16 kept for each tensor
that travels as float16 (``transport.half.remember_half``), together checked against
``max_decoded_bytes`` before anything is allocated (``tensors.decoded_bytes``: 4 bytes per
float element, 2 more where its float16 is kept); large decoded arrays reuse the memory of
earlier decoded tensors that are no longer referenced (``transport.buffer_pool``); plus,
for top-k tensors only, their stored bytes (small by design). Nothing is buffered beyond
what the validated manifest declares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lz4.block
import numpy as np
import numpy.typing as npt

from fedloom.transport.buffer_pool import DECODED
from fedloom.transport.errors import CodecError, DecompressionBomb, FrameTooLarge, describe
from fedloom.transport.half import half_to_float, remember_half
from fedloom.transport.limits import Limits
from fedloom.transport.records import CHUNK_SIZE
from fedloom.transport.tensors import (
    _F16,
    _F32,
    _F32_TINY,
    DEFAULT_LIMITS,
    DEFAULT_SPEC,
    CodecSpec,
    Tensors,
    _check_finite,
    _decode_topk,
    _Entry,
    _parse_entry,
    _to_fp16,
    _to_topk,
    check_int8_finite,
    decoded_bytes,
    int8_scale,
    keeps_half,
    raw_entry,
    topk_count,
)

# One piece is one record's plaintext (at most CHUNK_SIZE bytes); a power of two keeps
# the pieces of fp32 tensors element-aligned.
PIECE_BYTES = CHUNK_SIZE
MIN_PIECE_BYTES = 4096  # refuse streams cut into absurdly many tiny records
MAX_PIECE_BYTES = CHUNK_SIZE

_MANIFEST_KEYS = frozenset(("tensors", "stored", "piece"))
_LZ4_SAMPLE = 1 << 16
_LZ4_SAMPLE_RATIO = 0.95
_LZ4_MIN_INPUT = 64
_MAX_CHUNK_ELEMS = 1 << 20  # elements per temporary when scanning a whole tensor


def n_pieces(stored: int, piece: int) -> int:
    """How many pieces (records) a stream of ``stored`` bytes travels in."""
    return max(1, -(-stored // piece))


# ---------------------------------------------------------------------------- encoder


def encodes_in_place(tensors: Mapping[str, object], spec: CodecSpec) -> bool:
    """Whether ``TensorStreamEncoder(tensors, spec)`` makes no pass over the values: each
    is a C-contiguous array already in the dtype ``spec`` sends (float32 under ``fp32``,
    float16 under ``fp16``), so the encoder only slices its memory. A channel builds such
    an encoder on the event loop: a worker thread would cost more in hand-offs than it
    saves."""
    for value in tensors.values():
        if not isinstance(value, np.ndarray) or not value.flags.c_contiguous:
            return False
        dtype = value.dtype
        if not ((dtype == _F32 and spec.kind == "fp32") or (dtype == _F16 and spec.kind == "fp16")):
            return False
    return True


@dataclass(frozen=True, slots=True)
class _Source:
    """Where one entry's stored bytes come from: ``convert(i0, i1)`` encodes elements."""

    stored: int
    itemsize: int  # stored bytes per element (1 for byte-addressed sources)
    convert: Callable[[int, int], memoryview]
    computed: bool  # pieces are computed (fp16/int8), not views of the tensor's memory


def _bytes_of(arr: npt.NDArray[Any]) -> memoryview:
    return arr.reshape(-1).data.cast("B")


def _raw_source(arr: npt.NDArray[Any]) -> _Source:
    view = _bytes_of(arr)
    return _Source(len(view), 1, lambda i0, i1: view[i0:i1], computed=False)


def _dense_source(
    size: int, itemsize: int, encode: Callable[[int, int], npt.NDArray[Any]]
) -> _Source:
    return _Source(
        size * itemsize, itemsize, lambda i0, i1: _bytes_of(encode(i0, i1)), computed=True
    )


def _int8_scale(x: npt.NDArray[np.float32]) -> tuple[float, np.float32 | None]:
    """``(scale for the manifest, divisor or None for all-zero q)``, as ``_to_int8`` does."""
    if x.size == 0:
        return 0.0, None
    # max |x| in slices (no full-size temporary); NaN in any slice propagates through np.max.
    maxima = [np.abs(x[i : i + _MAX_CHUNK_ELEMS]).max() for i in range(0, x.size, _MAX_CHUNK_ELEMS)]
    amax = float(np.max(maxima))
    scale = int8_scale(amax)
    if not math.isfinite(scale):
        return float(scale), None  # the receiver rejects a non-finite scale
    if scale == 0.0:
        if amax == 0.0:
            return 0.0, None
        scale = _F32_TINY  # amax / 127 underflowed
    return float(scale), scale


def _int8_encoder(
    x: npt.NDArray[np.float32], divisor: np.float32 | None
) -> Callable[[int, int], npt.NDArray[Any]]:
    def encode(i0: int, i1: int) -> npt.NDArray[Any]:
        if divisor is None:
            return np.zeros(i1 - i0, np.int8)
        scaled = x[i0:i1] / divisor
        q: npt.NDArray[np.int8] = np.rint(scaled, out=scaled).astype(np.int8)
        return q

    return encode


class TensorStreamEncoder:
    """Encodes a tensor dict as a stream manifest plus pieces, produced one at a time.

    The constructor does the whole-tensor work (int8 scales, top-k selection); pieces are
    then encoded lazily by ``next_piece`` in order. The arrays are read while pieces are
    produced: do not modify them until the stream has been sent.
    """

    def __init__(
        self,
        tensors: Mapping[str, npt.NDArray[Any]],
        spec: CodecSpec = DEFAULT_SPEC,
        *,
        piece: int = PIECE_BYTES,
    ) -> None:
        if not MIN_PIECE_BYTES <= piece <= MAX_PIECE_BYTES:
            raise ValueError(f"piece must be in [{MIN_PIECE_BYTES}, {MAX_PIECE_BYTES}]")
        self._spec = spec
        entries: list[dict[str, Any]] = []
        self._sources: list[_Source] = []
        for name, value in tensors.items():
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be str, got {name!r}")
            entry, source = self._encode_entry(name, np.asarray(value), spec)
            entries.append(entry)
            self._sources.append(source)
        self.stored = sum(s.stored for s in self._sources)
        self.piece = piece
        self.n_pieces = n_pieces(self.stored, piece)
        # True when making a piece converts values (fp16/int8), not just slices memory.
        self.computes_pieces = any(s.computed for s in self._sources)
        self.manifest: dict[str, Any] = {"tensors": entries, "stored": self.stored, "piece": piece}
        self._pieces_made = 0
        self._source = 0  # index of the source the next byte comes from
        self._offset = 0  # byte offset inside that source

    @staticmethod
    def _encode_entry(
        name: str, arr: npt.NDArray[Any], spec: CodecSpec
    ) -> tuple[dict[str, Any], _Source]:
        raw = raw_entry(name, arr, spec)
        if raw is not None:
            return raw[0], _raw_source(raw[1])
        shape = list(arr.shape)
        entry: dict[str, Any]
        if spec.kind == "fp16" and arr.dtype == _F16:
            # Already what the codec would produce (float16 -> float32 -> float16 is exact,
            # Inf stays Inf): its bytes travel as they are, with no conversion per piece.
            entry = {"name": name, "codec": "fp16", "shape": shape}
            return entry, _raw_source(np.ascontiguousarray(arr).reshape(-1))
        x = np.ascontiguousarray(arr, dtype=_F32).reshape(-1)
        if spec.kind == "fp16":
            entry = {"name": name, "codec": "fp16", "shape": shape}
            return entry, _dense_source(x.size, 2, lambda i0, i1: _to_fp16(x[i0:i1]))
        if spec.kind == "int8":
            scale, divisor = _int8_scale(x)
            entry = {"name": name, "codec": "int8", "shape": shape, "scale": scale}
            return entry, _dense_source(x.size, 1, _int8_encoder(x, divisor))
        values, index, index_kind = _to_topk(x, topk_count(x.size, spec.topk_fraction))
        blob = np.concatenate((_bytes_of(values), _bytes_of(index))) if x.size else np.zeros(0)
        entry = {
            "name": name,
            "codec": "topk",
            "shape": shape,
            "k": int(values.size),
            "index": index_kind,
        }
        return entry, _raw_source(np.ascontiguousarray(blob, dtype=np.uint8))

    @property
    def done(self) -> bool:
        return self._pieces_made == self.n_pieces

    def next_piece(self) -> bytes | memoryview:
        """The next piece as it goes into a record (raw bytes, or a shorter LZ4 block).

        Often a view of a tensor's memory: seal it before the tensor changes."""
        if self.done:
            raise ValueError("every piece has been produced")
        want = min(self.piece, self.stored - self._pieces_made * self.piece)
        parts: list[memoryview] = []
        while want > 0:
            source = self._sources[self._source]
            take = min(want, source.stored - self._offset)
            if take > 0:
                parts.append(self._read(source, self._offset, self._offset + take))
                self._offset += take
                want -= take
            if self._offset == source.stored:
                self._source += 1
                self._offset = 0
        self._pieces_made += 1
        data: memoryview = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
        packed = _lz4_if_smaller(data) if self._spec.lz4 else None
        return data if packed is None else packed

    @staticmethod
    def _read(source: _Source, start: int, end: int) -> memoryview:
        size = source.itemsize
        i0, i1 = start // size, -(-end // size)
        encoded = source.convert(i0, i1)
        base = i0 * size
        return encoded[start - base : end - base]


def _lz4_if_smaller(data: memoryview) -> bytes | None:
    """``data`` as one LZ4 block, or None where that would not be smaller."""
    size = len(data)
    if size < _LZ4_MIN_INPUT:
        return None
    if size > 4 * _LZ4_SAMPLE:
        # A sample from the middle first: fp32 weights do not compress, so skip the rest.
        mid = (size - _LZ4_SAMPLE) // 2
        sample = lz4.block.compress(data[mid : mid + _LZ4_SAMPLE], store_size=False)
        if len(sample) > _LZ4_SAMPLE_RATIO * _LZ4_SAMPLE:
            return None
    packed: bytes = lz4.block.compress(data, store_size=False)
    return packed if len(packed) < size else None


# ---------------------------------------------------------------------------- decoder


class TensorStreamDecoder:
    """Validates a stream manifest, then decodes its pieces into preallocated arrays.

    Raises only ``ProtocolError`` subclasses for peer input (the same classes and checks
    as ``decode_tensors``). Feed every piece in order with ``feed_piece``; ``finish``
    returns the tensors (read-only float32 arrays for float codecs, the raw dtype
    otherwise) once all declared bytes have arrived.
    """

    def __init__(self, manifest: object, limits: Limits = DEFAULT_LIMITS) -> None:
        if type(manifest) is not dict or manifest.keys() != _MANIFEST_KEYS:
            raise CodecError(
                "stream manifest must be a map with exactly the keys 'piece', 'stored', 'tensors'"
            )
        raw_entries, stored, piece = manifest["tensors"], manifest["stored"], manifest["piece"]
        if type(raw_entries) is not list and type(raw_entries) is not tuple:
            raise CodecError("stream manifest 'tensors' must be an array")
        if len(raw_entries) > limits.max_tensors:
            raise CodecError(
                f"{len(raw_entries)} tensors in one message, limit {limits.max_tensors}"
            )
        if type(piece) is not int or not MIN_PIECE_BYTES <= piece <= MAX_PIECE_BYTES:
            raise CodecError(
                f"stream piece size {describe(piece)} not in [{MIN_PIECE_BYTES}, {MAX_PIECE_BYTES}]"
            )
        if type(stored) is not int or stored < 0:
            raise CodecError(f"stream size {describe(stored)} is not a non-negative int")
        if stored > limits.max_message_bytes:
            raise FrameTooLarge(
                f"tensor stream of {stored} bytes, limit {limits.max_message_bytes}"
            )
        self._limits = limits
        self._entries: list[_Entry] = []
        names: set[str] = set()
        stored_total = decoded_total = 0
        for i, item in enumerate(raw_entries):
            entry = _parse_entry(i, item, limits)
            if entry.name in names:
                raise CodecError(f"tensor name {describe(entry.name)} appears twice")
            names.add(entry.name)
            self._entries.append(entry)
            stored_total += entry.stored
            decoded_total += decoded_bytes(entry)
            if decoded_total > limits.max_decoded_bytes or stored_total > limits.max_decoded_bytes:
                raise DecompressionBomb(
                    "tensors would decode to more than "
                    f"max_decoded_bytes={limits.max_decoded_bytes}"
                )
        if stored_total != stored:
            raise CodecError(
                f"stream declares {stored} bytes but its tensors describe {stored_total}"
            )
        self.stored = stored
        self.piece = piece
        self.n_pieces = n_pieces(stored, piece)
        # Allocated only now that every size is validated (np.empty: pages are touched
        # as pieces arrive).
        self._outputs = [_allocate(entry) for entry in self._entries]
        # The float16 bytes of the entries that travel as float16, kept as they are
        # decoded (``transport.half.remember_half``): their signed digest covers them.
        self._halves = [
            np.empty(entry.size, dtype=_F16) if keeps_half(entry) else None
            for entry in self._entries
        ]
        self._pieces_fed = 0
        self._received = 0
        self._index = 0  # entry receiving the next byte
        self._entry_bytes = 0  # bytes of that entry received so far
        self._element = 0  # elements of that entry decoded so far (dense codecs)
        self._carry = bytearray()  # a partial element split across pieces
        self._stage: bytearray | None = None  # a top-k entry's stored bytes
        self._skip_empty()

    @property
    def done(self) -> bool:
        return self._pieces_fed == self.n_pieces

    def expected_piece(self) -> int:
        """Stored bytes the next piece must carry."""
        return min(self.piece, self.stored - self._received)

    def feed_piece(self, piece: bytes | bytearray | memoryview) -> None:
        """Decode one piece as it came out of a record (raw, or a shorter LZ4 block)."""
        if self.done:
            raise CodecError(f"more pieces than the {self.n_pieces} the stream declared")
        data: bytes | memoryview = memoryview(piece).cast("B")
        expected = self.expected_piece()
        if len(data) > expected:
            raise CodecError(f"stream piece of {len(data)} bytes, expected {expected}")
        if len(data) < expected:  # a compressed piece
            try:
                data = lz4.block.decompress(data, uncompressed_size=expected)
            except lz4.block.LZ4BlockError as exc:
                raise CodecError(f"corrupt lz4 block in stream piece: {exc}") from None
            if len(data) != expected:
                raise CodecError(
                    f"lz4 piece decompressed to {len(data)} bytes, expected {expected}"
                )
        self._pieces_fed += 1
        self._received += expected
        self._consume(memoryview(data))

    def direct_target(self) -> memoryview | None:
        """Where the next piece may be written as it arrives, or None.

        That is the destination of its bytes, when the whole piece falls inside one
        tensor sent raw as float32 (the fp32 codec: inside the tensor) or sent as float16
        (the fp16 codec or raw float16: inside the float16 kept for it), so the record
        layer decrypts straight there: no buffer per record, no copy of it. If the piece
        turns out to be compressed it will not fit exactly, so use ``feed_piece``; if it
        was written here, call ``feed_direct`` (which validates it, and converts float16)
        instead."""
        if self.done or self._carry or self._index >= len(self._entries):
            return None
        entry = self._entries[self._index]
        expected = self.expected_piece()
        if expected > entry.stored - self._entry_bytes:
            return None
        half = self._halves[self._index]
        if half is not None:
            if expected % 2:
                return None
            flat = half.view(np.uint8)
        elif entry.codec == "raw" and entry.dtype == _F32 and not expected % 4:
            flat = self._outputs[self._index].view(np.uint8)
        else:
            return None
        return flat.data[self._entry_bytes : self._entry_bytes + expected]

    def direct_decodes(self) -> bool:
        """Whether a piece written to ``direct_target()`` is float16 that ``feed_direct``
        converts to float32 (work for a worker thread), not float32 it only checks."""
        return self._index < len(self._entries) and self._halves[self._index] is not None

    def feed_direct(self) -> None:
        """The next piece is already in ``direct_target()``'s memory: check and take it."""
        expected = self.expected_piece()
        entry = self._entries[self._index]
        start = self._element
        half = self._halves[self._index]
        if half is None:
            count = expected // 4
            dst = self._outputs[self._index][start : start + count]
            _check_finite(entry.name, dst, self._limits)
        else:  # checked as float16 (finite exactly when its float32 is), then converted
            count = expected // 2
            part = half[start : start + count]
            _check_finite(entry.name, part, self._limits)
            half_to_float(part, out=self._outputs[self._index][start : start + count])
        self._pieces_fed += 1
        self._received += expected
        self._element = start + count
        self._entry_bytes += expected
        if self._entry_bytes == entry.stored:
            self._complete(entry)

    def finish(self) -> Tensors:
        """The decoded tensors; ``CodecError`` if the stream ended early."""
        if not self.done or self._index != len(self._entries):
            raise CodecError(
                f"tensor stream truncated: {self._received} of {self.stored} bytes, "
                f"{self._pieces_fed} of {self.n_pieces} pieces"
            )
        out: Tensors = {}
        for entry, arr, half in zip(self._entries, self._outputs, self._halves, strict=True):
            arr = arr.reshape(entry.shape)
            arr.flags.writeable = False
            if half is not None:  # handed out frozen: it must stay equal to its float16
                arr = remember_half(arr, half.reshape(entry.shape))
            out[entry.name] = arr
        return out

    # -- walking the entries

    def _consume(self, view: memoryview) -> None:
        while view.nbytes:
            entry = self._entries[self._index]
            take = min(view.nbytes, entry.stored - self._entry_bytes)
            part, view = view[:take], view[take:]
            if entry.codec == "topk":
                assert self._stage is not None
                self._stage[self._entry_bytes : self._entry_bytes + take] = part
            else:
                self._dense(entry, part)
            self._entry_bytes += take
            if self._entry_bytes == entry.stored:
                self._complete(entry)

    def _complete(self, entry: _Entry) -> None:
        if entry.codec == "topk":
            assert self._stage is not None
            self._outputs[self._index] = _decode_topk(self._stage, 0, entry, self._limits)
        self._index += 1
        self._entry_bytes = 0
        self._element = 0
        self._stage = None
        self._skip_empty()

    def _skip_empty(self) -> None:
        """Complete entries with no stored bytes; set up the stage of a top-k entry."""
        while self._index < len(self._entries):
            entry = self._entries[self._index]
            if entry.stored:
                if entry.codec == "topk":
                    self._stage = bytearray(entry.stored)
                return
            if entry.codec == "topk":
                self._outputs[self._index] = _decode_topk(b"", 0, entry, self._limits)
            self._index += 1

    def _dense(self, entry: _Entry, part: memoryview) -> None:
        size = _stored_itemsize(entry)
        if self._carry:
            need = size - len(self._carry)
            self._carry += part[:need]
            part = part[need:]
            if len(self._carry) < size:
                return
            self._decode(entry, memoryview(bytes(self._carry)), 1)
            self._carry.clear()
        count = part.nbytes // size
        if count:
            self._decode(entry, part[: count * size], count)
        if part.nbytes > count * size:
            self._carry += part[count * size :]

    def _decode(self, entry: _Entry, data: memoryview, count: int) -> None:
        start = self._element
        dst = self._outputs[self._index][start : start + count]
        limits = self._limits
        if entry.codec == "raw":
            src = np.frombuffer(data, dtype=entry.dtype, count=count)
            if entry.dtype.kind == "b" and src.view(np.uint8).max() > 1:
                raise CodecError(f"tensor {describe(entry.name)}: bool bytes other than 0/1")
            if entry.dtype == _F16:
                self._keep_half(src, start, count)
                half_to_float(src, out=dst)
            else:
                with np.errstate(over="ignore"):
                    dst[...] = src  # float64 -> float32, checked below
            if entry.dtype.kind == "f":
                _check_finite(entry.name, dst, limits)
        elif entry.codec == "fp16":
            half = np.frombuffer(data, dtype=_F16, count=count)
            _check_finite(entry.name, half, limits)
            self._keep_half(half, start, count)
            half_to_float(half, out=dst)
        else:  # int8: x ~= q * scale, in float32 as decode_tensors computes it
            q = np.frombuffer(data, dtype=np.int8, count=count)
            with np.errstate(over="ignore"):
                np.multiply(q, np.float32(entry.scale), out=dst)
            check_int8_finite(entry, dst, limits)
        self._element = start + count

    def _keep_half(self, half: npt.NDArray[Any], start: int, count: int) -> None:
        kept = self._halves[self._index]
        assert kept is not None
        kept[start : start + count] = half


def _stored_itemsize(entry: _Entry) -> int:
    if entry.codec == "raw":
        return entry.dtype.itemsize
    return 2 if entry.codec == "fp16" else 1


def _allocate(entry: _Entry) -> npt.NDArray[Any]:
    if entry.codec == "raw" and entry.dtype.kind != "f":
        return DECODED.empty(entry.size, entry.dtype)
    return DECODED.empty(entry.size, _F32)
