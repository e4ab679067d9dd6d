"""The size of a wire message without encoding it: exactly ``len(transport.wire.encode(msg,
spec))``, for the simulator's links (``sim.network``).

An envelope is one msgpack map ``{"v": 1, "type": <name>, <every field>}`` and msgpack
writes each key and value on its own, so the size is the sum of its parts: a per-type
constant (map header, ``v``, ``type`` and the field names), plus each value's size by the
msgpack rules (the smallest int format, a float as a 9-byte double, a str or bin with its
length header, a map or array with its count header). A tensor field is
``{"m": manifest, "p": payload}`` from ``transport.tensors.encode_tensors`` itself, so
codecs and LZ4 (whose output size depends on the data) are exactly what the encoder does:
the manifest's msgpack size plus the payload's length. Where the codec sends the tensors
as they are (``fp32``, C-contiguous float32 arrays: a model's weights and deltas), the
manifest's size is remembered per layout (names and shapes) and the payload is the arrays'
bytes, put through the encoder's own LZ4 step.

Only message types whose fields are all plain (int, float, str, bytes, tensors, a str ->
scalar mapping, ``(site, seq)`` pairs) are sized here; secure-aggregation messages, and
any field value the encoder would refuse (wrong type, a signature over its cap), make
``wire_size`` call ``wire.encode`` instead, so the sizes and the errors stay the
encoder's own. ``tests/sim/test_wire_size.py`` checks the equality for every message
type and codec under Hypothesis.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np

from fedloom.algorithms.weights_math import MeasuredDelta
from fedloom.transport import wire
from fedloom.transport.tensors import DEFAULT_SPEC, CodecSpec, encode_tensors, fp32_lz4_payload_size

_INT, _FLOAT, _STR, _BIN, _TENSORS, _MAP, _PAIRS = range(7)
# Field annotations (``transport.wire``'s dataclasses) -> how the encoder writes them.
_KINDS = {
    "int": _INT,
    "float": _FLOAT,
    "str": _STR,
    "bytes": _BIN,
    "Tensors": _TENSORS,
    "Mapping[str, Any]": _MAP,
    "Mapping[str, float]": _MAP,
    "tuple[tuple[str, int], ...]": _PAIRS,
}


class _UnsizedError(Exception):
    """A value this module does not size (the encoder decides: a size or its error)."""


def _int_size(v: int) -> int:
    """Bytes of a msgpack int (msgpack-python picks the smallest format)."""
    if v >= 0:
        if v < 2**32:
            return 1 if v < 0x80 else 2 if v < 0x100 else 3 if v < 0x10000 else 5
        if v < 2**64:
            return 9
    elif v >= -(2**63):
        return (
            1 if v >= -32 else 2 if v >= -128 else 3 if v >= -(2**15) else 5 if v >= -(2**31) else 9
        )
    raise _UnsizedError  # msgpack cannot write it: the encoder raises


def _str_size(s: str) -> int:
    """Bytes of a msgpack str (UTF-8, fixstr / str8 / str16 / str32 header)."""
    n = len(s) if s.isascii() else len(s.encode("utf-8"))
    return n + (1 if n < 32 else 2 if n < 0x100 else 3 if n < 0x10000 else 5)


def _bin_size(n: int) -> int:
    """Bytes of a msgpack bin of ``n`` bytes."""
    return n + (2 if n < 0x100 else 3 if n < 0x10000 else 5)


def _count_header(n: int) -> int:
    """Bytes of a msgpack map or array header of ``n`` entries."""
    return 1 if n < 16 else 3 if n < 0x10000 else 5


def _tensors_size(tensors: Mapping[str, Any], spec: CodecSpec) -> int:
    """Bytes of a tensor field ``{"m": manifest, "p": payload}`` as the wire encodes it."""
    if spec.kind == "fp32":
        size = _float32_tensors_size(tensors, spec.lz4)
        if size is not None:
            return size
    manifest, payload = encode_tensors(tensors, spec)
    return _TENSOR_FIELD + len(msgpack.packb(manifest, use_bin_type=True)) + _bin_size(len(payload))


_TENSOR_FIELD = 1 + 2 + 2  # fixmap(2), "m", "p"
_F32 = np.dtype("<f4")  # numpy's own float32 descriptor
_RAW = CodecSpec("fp32", lz4=False)
# Manifest bytes by layout (names..., shapes...) of float32 tensors sent raw (fp32): a
# federation sends a few layouts (its model's) many times.
_MANIFESTS: dict[tuple[Any, ...], int] = {}
_MAX_MANIFESTS = 256


def _float32_tensors_size(tensors: Mapping[str, Any], lz4: bool) -> int | None:
    """The tensor field's size where every tensor is a C-contiguous little-endian float32
    array (the payload is then their bytes as they are), else None. The manifest's size
    is the encoder's for the layout (remembered); LZ4 is the encoder's own function."""
    arrays = list(tensors.values())
    for value in arrays:
        if type(value) is not np.ndarray or not value.flags.c_contiguous:
            return None
        dtype = value.dtype
        # An array unpickled (a process pool's result) has an equal float32 descriptor
        # that is not numpy's own object: compared only then.
        if dtype is not _F32 and dtype != _F32:
            return None
    key = (*tensors, *[value.shape for value in arrays])  # names, then shapes
    manifest = _MANIFESTS.get(key)
    if manifest is None:
        if len(_MANIFESTS) >= _MAX_MANIFESTS:
            _MANIFESTS.clear()
        raw, _ = encode_tensors(tensors, _RAW)  # its "lz4" flag is one byte either way
        manifest = _MANIFESTS[key] = len(msgpack.packb(raw, use_bin_type=True))
    if not lz4:
        n = sum(value.nbytes for value in arrays)
    elif type(tensors) is MeasuredDelta and tensors.lz4_payload is not None:
        n = tensors.lz4_payload  # measured where it was made, by the same function
    else:  # their bytes in order, as the encoder joins them
        n = fp32_lz4_payload_size(b"".join(arrays))
    return _TENSOR_FIELD + manifest + _bin_size(n)


def _scalar_size(v: Any) -> int:
    if isinstance(v, np.generic):
        v = v.item()
    t = type(v)
    if t is bool:
        return 1
    if t is int:
        return _int_size(v)
    if t is float:
        return 9
    if t is str:
        return _str_size(v)
    raise _UnsizedError


def _map_size(value: Any) -> int:
    if type(value) is not dict and not isinstance(value, Mapping):
        raise _UnsizedError
    n = _count_header(len(value))
    for key, item in value.items():
        if type(key) is not str:
            raise _UnsizedError
        # _str_size(key) + _scalar_size(item), with the common cases (ASCII keys, float
        # values) inline: a message's metrics or config map is sized on every send.
        k = len(key) if key.isascii() else len(key.encode("utf-8"))
        n += k + (1 if k < 32 else 2 if k < 0x100 else 3 if k < 0x10000 else 5)
        n += 9 if type(item) is float else _scalar_size(item)
    return n


def _pairs_size(value: Any) -> int:
    items = tuple(value)
    if len(items) > wire.MAX_PAIRS:
        raise _UnsizedError
    n = _count_header(len(items))
    for item in items:
        src, seq = item
        if type(src) is not str:
            raise _UnsizedError
        n += 1 + _str_size(src) + _int_size(operator.index(seq))  # fixarray(2) + src + seq
    return n


_Plan = tuple[int, tuple[tuple[str, int], ...], bool]
# Messages whose tensors are often the same object in many messages (a model sent to many
# sites or peers): their tensor field sizes are remembered.
_SHARED_TENSORS = (wire.TrainRequest, wire.ModelBroadcast, wire.GossipShare)


def _plan(cls: type) -> _Plan | None:
    """(constant bytes, ((field, kind), ...), shared tensors) of a message type, or None
    where it is not sized here."""
    if cls in wire.SECAGG_MESSAGE_TYPES:
        return None
    fields = []
    for f in dataclasses.fields(cls):
        kind = _KINDS.get(str(f.type))
        if kind is None:
            return None
        fields.append((f.name, kind))
    fixed = _count_header(len(fields) + 2)
    fixed += _str_size("v") + _int_size(wire.WIRE_VERSION)
    fixed += _str_size("type") + _str_size(wire.message_type_name(cls))
    fixed += sum(_str_size(name) for name, _ in fields)
    return fixed, tuple(fields), cls in _SHARED_TENSORS


_PLANS: dict[type, _Plan | None] = {cls: _plan(cls) for cls in wire.MESSAGE_TYPES}
# A value that is not bytes fails type(...) is bytes below, so the encoder reports it.
_MAX_BIN = wire.MAX_BIN_BYTES

# How each kind of field adds its bytes to ``n`` (``v`` is the field's value), as the
# lines of a function compiled per message type (``_compile``): a loop over a plan's
# fields, fetching each by name and branching on its kind, cost more than the sizing
# itself (every message sent in a simulation is sized). A value this module does not size
# raises _UnsizedError, TypeError or ValueError: the encoder then decides.
_KIND_CODE = {
    # _int_size(operator.index(v)), inline for a plain int below 2**16
    _INT: (
        "if type(v) is int and 0 <= v < 0x10000:",
        "    n += 1 if v < 0x80 else 2 if v < 0x100 else 3",
        "else:",
        "    n += _int_size(_index(v))",
    ),
    _STR: (
        "if type(v) is not str:",
        "    raise _UnsizedError",
        "k = len(v) if v.isascii() else len(v.encode('utf-8'))",
        "n += k + (1 if k < 32 else 2 if k < 0x100 else 3 if k < 0x10000 else 5)",
    ),
    _BIN: (
        "if type(v) is not bytes or len(v) > _MAX_BIN:",
        "    raise _UnsizedError",
        "k = len(v)",
        "n += k + (2 if k < 0x100 else 3 if k < 0x10000 else 5)",
    ),
    _MAP: ("n += _map_size(v)",),
    # float(v): what the encoder does (TypeError for a non-number)
    _FLOAT: ("float(v)", "n += 9"),
    # _pairs_size(v), whose answer for no pairs (an empty tuple) is one count byte
    _PAIRS: ("n += 1 if type(v) is tuple and not v else _pairs_size(v)",),
}
_SHARED_CODE = ("n += self._tensors(v, spec)",)  # a model sent to many: remembered
_TENSORS_CODE = ("n += _tensors_size(v, spec)",)

_Sizer = Callable[["WireSizer", Any, CodecSpec], int]


def _compile(cls: type, plan: _Plan) -> _Sizer:
    """``size(sizer, msg, spec)`` for messages of type ``cls`` laid out by ``plan``."""
    fixed, fields, shared = plan
    lines = ["def size(self, msg, spec):", f"    n = {fixed}"]
    for name, kind in fields:
        if not name.isidentifier():  # dataclass fields are; never code from elsewhere
            raise ValueError(f"{cls.__name__}: field name {name!r}")
        code = _KIND_CODE.get(kind) or (_SHARED_CODE if shared else _TENSORS_CODE)
        lines.append(f"    v = msg.{name}")
        lines.extend(f"    {line}" for line in code)
    lines.append("    return n")
    scope: dict[str, Any] = {
        "_UnsizedError": _UnsizedError,
        "_int_size": _int_size,
        "_index": operator.index,
        "_MAX_BIN": _MAX_BIN,
        "_map_size": _map_size,
        "_pairs_size": _pairs_size,
        "_tensors_size": _tensors_size,
    }
    exec(compile("\n".join(lines), f"<wire size of {cls.__name__}>", "exec"), scope)
    fn: _Sizer = scope["size"]
    return fn


_SIZERS: dict[type, _Sizer] = {
    cls: _compile(cls, plan) for cls, plan in _PLANS.items() if plan is not None
}


def wire_size(msg: Any, spec: CodecSpec = DEFAULT_SPEC) -> int:
    """``len(wire.encode(msg, spec))``, without encoding ``msg`` where it can."""
    return WireSizer(memo_size=0).size(msg, spec)


class WireSizer:
    """``size(msg, spec) == len(wire.encode(msg, spec))``; a tensor dict sent again (the
    same object: a model sent to many sites) reuses its tensor field's size."""

    __slots__ = ("_memo", "memo_size")

    def __init__(self, memo_size: int = 4) -> None:
        # (id(tensors), id(spec)) -> (tensors, spec, bytes), most recent last; holding the
        # tensors and the spec keeps their ids from being reused while the entry lives.
        self._memo: dict[tuple[int, int], tuple[Any, CodecSpec, int]] = {}
        self.memo_size = memo_size

    def size(self, msg: Any, spec: CodecSpec) -> int:
        sizer = _SIZERS.get(type(msg))
        if sizer is not None:
            try:
                return sizer(self, msg, spec)
            except (_UnsizedError, TypeError, ValueError):
                pass  # the encoder below gives the size, or raises its own error
        return len(wire.encode(msg, spec))

    def _tensors(self, tensors: Any, spec: CodecSpec) -> int:
        key = (id(tensors), id(spec))
        memo = self._memo
        hit = memo.get(key)
        if hit is not None:
            if len(memo) > 1:
                memo[key] = memo.pop(key)  # most recently used last
            return hit[2]
        size = _tensors_size(tensors, spec)
        memo[key] = (tensors, spec, size)
        if len(memo) > self.memo_size:
            del memo[next(iter(memo))]
        return size
