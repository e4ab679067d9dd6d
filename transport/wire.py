"""Wire messages exchanged between fedloom nodes.

Every message is a frozen, slotted dataclass. Tensor payloads are ordered
``name -> numpy array`` dicts; the tensor codec (``transport.tensors``) turns them
into bytes. Conventions:

* ``delta`` is ``trained_weights - base_weights`` (the direction the site moved);
  aggregators *add* a scaled, aggregated delta to the model.
* ``seq`` numbers a source's updates 1, 2, 3, ... and never repeats; receivers apply
  each ``(src, seq)`` at most once and acknowledge it after recording it durably.
* ``version`` numbers the models issued by the root aggregator; it only increases.
* ``sig`` fields carry end-to-end signatures (``transport.e2e``): a site or region signs
  its own ``Update``; the root signs each model version ``{version, parent, digest}``
  and regions relay that proof (``signer``, ``parent``, ``sig``) unchanged. Empty
  defaults mean "unsigned": the simulator and in-memory runs do not sign; daemons
  refuse unsigned updates and models.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import msgpack
import numpy as np
import numpy.typing as npt

from fedloom.transport.errors import FrameTooLarge, MalformedMessage, ProtocolError, describe
from fedloom.transport.limits import Limits as Limits  # re-exported: callers import it from here
from fedloom.transport.strict_msgpack import unpack_strict
from fedloom.transport.tensors import DEFAULT_SPEC, decode_tensors, encode_tensors
from fedloom.transport.tensors import CodecSpec as CodecSpec  # re-exported

Tensors: TypeAlias = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Hello:
    """A child introduces itself to its parent (a site to its aggregator, a region to the root)."""

    src: str
    role: str
    n_examples: int = 0


@dataclass(frozen=True, slots=True)
class ModelBroadcast:
    """A new model version, pushed from the root down the tree (relayed by regions).

    ``signer``/``parent``/``sig``: the root's signature of ``{version, parent, digest}``.
    """

    version: int
    weights: Tensors
    signer: str = ""
    parent: int = 0
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class TrainRequest:
    """An aggregator asks a site to train ``weights`` (model ``version``) with ``config``."""

    task: int
    version: int
    weights: Tensors
    config: Mapping[str, Any] = field(default_factory=dict)
    signer: str = ""  # the root's model signature, as in ModelBroadcast
    parent: int = 0
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class Update:
    """A delta from ``src``, computed on model ``base_version``.

    ``n_examples`` is the number of training examples behind the delta and
    ``count`` the number of site updates folded into it (1 for a site, more for a
    regional aggregator forwarding an aggregate). ``task`` echoes the request that
    caused it (-1 when unsolicited). ``sig`` is ``src``'s signature of the envelope
    ``{src, seq, base_version, recipient, n_examples, digest of delta}``.
    """

    src: str
    seq: int
    base_version: int
    delta: Tensors
    n_examples: int
    count: int = 1
    task: int = -1
    metrics: Mapping[str, float] = field(default_factory=dict)
    sig: bytes = b""
    # A region's forward: the site updates ``(site, seq)`` folded into it (nested regions
    # pass their children's on), so a parent can tell whose updates it already has.
    pairs: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    """``dst`` has durably recorded update ``(src, seq)``; the sender may forget it."""

    src: str
    seq: int


@dataclass(frozen=True, slots=True)
class Incorporated:
    """Update ``(src, seq)`` is settled for good: it is in the root's model, or the tree
    decided never to apply it (stale, rejected). Its sender need not keep it any longer
    (``algorithms.incorporation``)."""

    src: str
    seq: int


@dataclass(frozen=True, slots=True)
class Overlap:
    """Forward ``(src, seq)`` is refused, unrecorded: the parent already took the site
    updates ``pairs`` (through a standby region). The region rebuilds it without them."""

    src: str
    seq: int
    pairs: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class GossipShare:
    """A gossip peer's share: model ``x`` and push-sum weight ``w`` at local step ``step``.

    For D-PSGD mixing ``w`` is 1.0 and ``x`` is the sender's model.
    For push-sum ``x`` is already scaled by the mixing weight (so the receiver adds it).
    """

    src: str
    step: int
    x: Tensors
    w: float = 1.0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness beacon between gossip peers (and on idle tree links)."""

    src: str
    step: int = 0


@dataclass(frozen=True, slots=True)
class Relayed:
    """A message from ``src`` for ``dst`` that travels through a relay (``transport.relay``).

    ``payload`` holds one ``uint8`` tensor, the encoded inner message encrypted to
    ``dst``; ``seq`` increases with every envelope ``src`` sends; ``sig`` is ``src``'s
    signature of ``{src, dst, seq, digest of the payload}``. The relay forwards it
    untouched.
    """

    src: str
    dst: str
    seq: int
    payload: Tensors
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class RosterUpdate:
    """A signed roster (``transport.roster`` TOML text) for the receiver to install.

    Handled by the runtime's peer set, never shown to a node. A parent pushes its roster
    down the tree; a child announces the version it holds with ``text = ""`` when it
    connects, so that a parent with a newer one sends it. The receiver verifies the
    consortium signature itself (the sender vouches for nothing) and installs only a
    roster newer than its own.
    """

    version: int
    text: str = ""


Message: TypeAlias = (
    Hello
    | ModelBroadcast
    | TrainRequest
    | Update
    | Ack
    | GossipShare
    | Heartbeat
    | Relayed
    | RosterUpdate
    | Incorporated
    | Overlap
)

MESSAGE_TYPES: tuple[type, ...] = (
    Hello,
    ModelBroadcast,
    TrainRequest,
    Update,
    Ack,
    GossipShare,
    Heartbeat,
    Relayed,
    RosterUpdate,
    Incorporated,
    Overlap,
)


# =============================================================== envelope codec
#
# One message is one msgpack map: {"v": 1, "type": "<name>", <every field>}. Every
# field is always present (defaults included), so the schema check is exact. A
# tensor field is {"m": manifest, "p": payload-bin} from ``transport.tensors``.
# Mappings (config, metrics) hold str -> str | int | float | bool. A bin field (a
# signature) is a msgpack bin of at most MAX_BIN_BYTES.

WIRE_VERSION = 1
MAX_BIN_BYTES = 256  # bin fields hold 64-byte signatures; anything longer is refused
# Site updates one forward may name; aggregators bound it further by the region's count.
MAX_PAIRS = 1 << 16

_STR, _INT, _FLOAT, _TENSORS, _MAP, _BIN = "str", "int", "float", "tensors", "map", "bin"
_PAIRS = "pairs"  # an array of distinct [str, int >= 1] pairs
_SCALAR_TYPES = (str, int, float, bool)
_TENSOR_FIELD_KEYS = frozenset(("m", "p"))
_PACK_BUF_SIZE = 1 << 16


@dataclass(frozen=True, slots=True)
class _Schema:
    name: str
    make: Callable[..., Message]
    fields: tuple[tuple[str, str], ...]
    keys: frozenset[str]  # every key the envelope must have, "v" and "type" included


def _schema(name: str, cls: Callable[..., Message], *fields: tuple[str, str]) -> _Schema:
    return _Schema(name, cls, fields, frozenset(("v", "type", *(f for f, _ in fields))))


_SCHEMAS: dict[type, _Schema] = {
    Hello: _schema("hello", Hello, ("src", _STR), ("role", _STR), ("n_examples", _INT)),
    ModelBroadcast: _schema(
        "model_broadcast",
        ModelBroadcast,
        ("version", _INT),
        ("weights", _TENSORS),
        ("signer", _STR),
        ("parent", _INT),
        ("sig", _BIN),
    ),
    TrainRequest: _schema(
        "train_request",
        TrainRequest,
        ("task", _INT),
        ("version", _INT),
        ("weights", _TENSORS),
        ("config", _MAP),
        ("signer", _STR),
        ("parent", _INT),
        ("sig", _BIN),
    ),
    Update: _schema(
        "update",
        Update,
        ("src", _STR),
        ("seq", _INT),
        ("base_version", _INT),
        ("delta", _TENSORS),
        ("n_examples", _INT),
        ("count", _INT),
        ("task", _INT),
        ("metrics", _MAP),
        ("sig", _BIN),
        ("pairs", _PAIRS),
    ),
    Ack: _schema("ack", Ack, ("src", _STR), ("seq", _INT)),
    Incorporated: _schema("incorporated", Incorporated, ("src", _STR), ("seq", _INT)),
    Overlap: _schema("overlap", Overlap, ("src", _STR), ("seq", _INT), ("pairs", _PAIRS)),
    GossipShare: _schema(
        "gossip_share", GossipShare, ("src", _STR), ("step", _INT), ("x", _TENSORS), ("w", _FLOAT)
    ),
    Heartbeat: _schema("heartbeat", Heartbeat, ("src", _STR), ("step", _INT)),
    Relayed: _schema(
        "relayed",
        Relayed,
        ("src", _STR),
        ("dst", _STR),
        ("seq", _INT),
        ("payload", _TENSORS),
        ("sig", _BIN),
    ),
    RosterUpdate: _schema("roster_update", RosterUpdate, ("version", _INT), ("text", _STR)),
}
_SCHEMAS_BY_NAME: dict[str, _Schema] = {s.name: s for s in _SCHEMAS.values()}
_DEFAULT_LIMITS = Limits()


def message_type_name(cls: type) -> str:
    """The ``"type"`` a message class has on the wire (``Update`` -> ``"update"``)."""
    return _SCHEMAS[cls].name


def encode(msg: Message, spec: CodecSpec = DEFAULT_SPEC) -> bytes:
    """Encode ``msg`` as one msgpack envelope; ``spec`` applies to its tensor fields.

    Raises ``TypeError``/``ValueError`` for local misuse (not a message, a field of the
    wrong type, a tensor dtype outside the whitelist).
    """
    schema = _SCHEMAS.get(type(msg))
    if schema is None:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    env: dict[str, Any] = {"v": WIRE_VERSION, "type": schema.name}
    buf_size = _PACK_BUF_SIZE
    for name, kind in schema.fields:
        value = getattr(msg, name)
        if kind == _TENSORS:
            manifest, payload = encode_tensors(value, spec)
            env[name] = {"m": manifest, "p": payload}
            buf_size = max(buf_size, len(payload) + _PACK_BUF_SIZE)  # no regrowth copies
        elif kind == _INT:
            env[name] = int(operator.index(value))  # numpy ints too; never a bool
        elif kind == _FLOAT:
            env[name] = float(value)
        elif kind == _STR:
            if not isinstance(value, str):
                raise TypeError(f"{schema.name}.{name} must be a str, got {value!r}")
            env[name] = value
        elif kind == _BIN:
            if type(value) is not bytes:
                raise TypeError(f"{schema.name}.{name} must be bytes, got {type(value).__name__}")
            if len(value) > MAX_BIN_BYTES:
                raise ValueError(
                    f"{schema.name}.{name} has {len(value)} bytes, limit {MAX_BIN_BYTES}"
                )
            env[name] = value
        elif kind == _PAIRS:
            env[name] = _plain_pairs(schema.name, name, value)
        else:
            env[name] = _plain_mapping(schema.name, name, value)
    packed: bytes = msgpack.packb(env, use_bin_type=True, buf_size=buf_size)
    return packed


def _plain_pairs(msg_name: str, field_name: str, value: Any) -> list[list[Any]]:
    out: list[list[Any]] = []
    for item in value:
        src, seq = item
        if not isinstance(src, str):
            raise TypeError(f"{msg_name}.{field_name}: site ids must be str, got {src!r}")
        out.append([src, int(operator.index(seq))])
    if len(out) > MAX_PAIRS:
        raise ValueError(f"{msg_name}.{field_name}: {len(out)} pairs, limit {MAX_PAIRS}")
    return out


def _plain_mapping(msg_name: str, field_name: str, value: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{msg_name}.{field_name} keys must be str, got {key!r}")
        if isinstance(item, np.generic):
            item = item.item()
        if not isinstance(item, _SCALAR_TYPES):
            raise TypeError(
                f"{msg_name}.{field_name}[{key!r}] must be str, int, float or bool, got {item!r}"
            )
        out[key] = item
    return out


def decode(data: bytes | bytearray | memoryview, limits: Limits = _DEFAULT_LIMITS) -> Message:
    """Decode one message from a peer, strictly; raises only ``ProtocolError`` subclasses.

    Order: size cap; msgpack with every container and string capped (by ``limits`` and by
    the input length), no ext types, str map keys, no trailing bytes; then the exact
    schema of the message type; tensor fields go through ``decode_tensors``.

    The msgpack step is ``transport.strict_msgpack.unpack_strict`` (shared with stream
    headers and handshake flights). Nesting is bounded by msgpack's own stack (1024
    levels) and then by the schema, which never accepts a container where it expects a
    scalar, so nothing here recurses on peer data.
    """
    size = memoryview(data).nbytes if isinstance(data, memoryview) else len(data)
    if size > limits.max_message_bytes:
        raise FrameTooLarge(f"message of {size} bytes, limit {limits.max_message_bytes}")
    obj = unpack_strict(
        data,
        what="message",
        error=MalformedMessage,
        max_str=min(limits.max_str_len, size),
        max_bin=min(limits.max_message_bytes, size),
        max_array=min(limits.max_array_len, size),
        max_map=min(limits.max_map_len, size),
        use_list=False,
    )
    if type(obj) is not dict:
        raise MalformedMessage("a message must be a msgpack map")
    version = obj.get("v")
    if type(version) is not int or version != WIRE_VERSION:
        raise MalformedMessage(
            f"unsupported wire version {describe(version)} (expected {WIRE_VERSION})"
        )
    type_name = obj.get("type")
    schema = _SCHEMAS_BY_NAME.get(type_name) if type(type_name) is str else None
    if schema is None:
        raise MalformedMessage(f"unknown message type {describe(type_name)}")
    if obj.keys() != schema.keys:
        missing = sorted(schema.keys - obj.keys())
        if missing:
            raise MalformedMessage(f"{schema.name}: missing field {missing[0]!r}")
        extra = [k for k in obj if k not in schema.keys]
        raise MalformedMessage(f"{schema.name}: unexpected field {describe(extra[0])}")
    kwargs: dict[str, Any] = {}
    for name, kind in schema.fields:
        value = obj[name]
        if kind == _INT:
            if type(value) is not int:
                raise MalformedMessage(f"{schema.name}.{name} must be an int")
        elif kind == _STR:
            if type(value) is not str:
                raise MalformedMessage(f"{schema.name}.{name} must be a str")
        elif kind == _BIN:
            if type(value) is not bytes:
                raise MalformedMessage(f"{schema.name}.{name} must be bytes (a msgpack bin)")
            if len(value) > MAX_BIN_BYTES:
                raise MalformedMessage(
                    f"{schema.name}.{name} has {len(value)} bytes, limit {MAX_BIN_BYTES}"
                )
        elif kind == _TENSORS:
            value = _decode_tensor_field(schema.name, name, value, limits)
        elif kind == _FLOAT:
            value = _check_float(schema.name, name, value, limits)
        elif kind == _PAIRS:
            value = _check_pairs(schema.name, name, value)
        else:
            _check_mapping(schema.name, name, value, limits)
        kwargs[name] = value
    return schema.make(**kwargs)


def _decode_tensor_field(msg_name: str, name: str, value: object, limits: Limits) -> Tensors:
    if type(value) is not dict or value.keys() != _TENSOR_FIELD_KEYS:
        raise MalformedMessage(f"{msg_name}.{name} must be a map with keys 'm' and 'p'")
    try:
        return decode_tensors(value["m"], value["p"], limits)
    except ProtocolError as exc:
        raise type(exc)(f"{msg_name}.{name}: {exc}") from None


def _check_float(msg_name: str, name: str, value: object, limits: Limits) -> float:
    if type(value) is int:
        value = float(value)
    if type(value) is not float:
        raise MalformedMessage(f"{msg_name}.{name} must be a float")
    if limits.reject_nonfinite and not math.isfinite(value):
        raise MalformedMessage(f"{msg_name}.{name} must be finite, got {value}")
    return value


def _check_pairs(msg_name: str, name: str, value: object) -> tuple[tuple[str, int], ...]:
    """Distinct ``(str, int >= 1)`` pairs, at most ``MAX_PAIRS`` (strings are already
    capped by the unpacker)."""
    if type(value) is not tuple:
        raise MalformedMessage(f"{msg_name}.{name} must be an array")
    if len(value) > MAX_PAIRS:
        raise MalformedMessage(f"{msg_name}.{name} has {len(value)} pairs, limit {MAX_PAIRS}")
    seen: set[tuple[str, int]] = set()
    for item in value:
        if type(item) is not tuple or len(item) != 2:
            raise MalformedMessage(f"{msg_name}.{name} entries must be [site, seq] arrays")
        src, seq = item
        if type(src) is not str or not src or type(seq) is not int or seq < 1:
            raise MalformedMessage(f"{msg_name}.{name} entries must be [non-empty str, int >= 1]")
        if item in seen:
            raise MalformedMessage(f"{msg_name}.{name} names ({src!r}, {seq}) twice")
        seen.add(item)
    return value


def _check_mapping(msg_name: str, name: str, value: object, limits: Limits) -> None:
    if type(value) is not dict:
        raise MalformedMessage(f"{msg_name}.{name} must be a map")
    for key, item in value.items():
        if type(key) is not str:
            raise MalformedMessage(f"{msg_name}.{name} keys must be str")
        kind = type(item)
        if kind is float:
            if limits.reject_nonfinite and not math.isfinite(item):
                raise MalformedMessage(f"{msg_name}.{name}[{describe(key)}] must be finite")
        elif kind is not str and kind is not int and kind is not bool:
            raise MalformedMessage(
                f"{msg_name}.{name}[{describe(key)}] must be str, int, float or bool"
            )
