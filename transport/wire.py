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

    ``signer``/``parent``/``sig``: the root's signature of ``{version, parent, digest,
    settings}``. ``config``: the root's training settings for this version, which a region
    hands its sites unchanged; ``settings``: the digest the root signed (of ``config``;
    ``transport.settings``; empty when unsigned).
    """

    version: int
    weights: Tensors
    signer: str = ""
    parent: int = 0
    sig: bytes = b""
    config: Mapping[str, Any] = field(default_factory=dict)
    settings: bytes = b""


@dataclass(frozen=True, slots=True)
class TrainRequest:
    """An aggregator asks a site to train ``weights`` (model ``version``) with ``config``.

    ``signer``/``parent``/``sig``/``settings``: the root's signature, as in
    ``ModelBroadcast``; ``settings`` is the digest of the config the root signed, which
    the site checks ``config`` against before training (empty when unsigned)."""

    task: int
    version: int
    weights: Tensors
    config: Mapping[str, Any] = field(default_factory=dict)
    signer: str = ""  # the root's model signature, as in ModelBroadcast
    parent: int = 0
    sig: bytes = b""
    settings: bytes = b""


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


# ====================================================== secure aggregation (cohorts)
#
# The messages of cohort-sealed secure aggregation (``algorithms.secagg``): a site that
# finished training asks to join a cohort, the aggregator seals a cohort of members, each
# member uploads its masked vector with one boxed share bundle per member, the members
# sign the aggregator's view of who uploaded, and reveal shares for a view carrying at
# least ``threshold`` signatures. Sizes are capped on the wire (``MAX_COHORT`` members,
# ``MAX_BUNDLE_BYTES`` per bundle, shares of exactly ``SHARE_BYTES``, cohort ids of
# exactly ``COHORT_ID_BYTES``); a masked vector is at most the receiving link's
# ``Limits.max_decoded_bytes`` (the model's fp32 size plus slack), and its exact length,
# (d + 1) * 4, is checked by the coordinator that knows the model.


@dataclass(frozen=True, slots=True)
class SecAggJoin:
    """``src`` finished training update ``seq`` on model ``base_version`` and asks to join
    a cohort (a secure site sends this where it would send an ``Update``)."""

    src: str
    seq: int
    base_version: int
    task: int = -1
    n_examples: int = 0


@dataclass(frozen=True, slots=True)
class SecAggSeal:
    """The aggregator sealed cohort ``cohort`` of ``members`` (with the ``seqs`` of the
    updates they joined with; masks are bound to them): upload within ``deadline_s``
    seconds, encoded with ``clip``/``precision_bits``/``weight_cap`` (and per-member
    discrete Gaussian noise of ``noise_sigma``); reveals need ``threshold`` members."""

    cohort: bytes
    members: tuple[str, ...]
    seqs: tuple[int, ...]  # the update each member joined with (members[k] -> seqs[k])
    threshold: int
    clip: float
    precision_bits: int
    weight_cap: int
    deadline_s: float
    noise_sigma: float = 0.0


@dataclass(frozen=True, slots=True)
class MaskedUpdate:
    """Member ``src``'s masked update ``seq`` for ``cohort``: ``data`` is (d + 1) little-
    endian uint32 field elements; ``bundles`` one boxed share bundle per other member
    (recipient, box). ``sig`` is ``src``'s end-to-end signature where daemons sign."""

    src: str
    seq: int
    cohort: bytes
    base_version: int
    n_examples: int
    data: bytes
    bundles: tuple[tuple[str, bytes], ...]
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class SecAggView:
    """The aggregator's view of cohort ``cohort``: who uploaded and who did not."""

    cohort: bytes
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SecAggViewSig:
    """A member's signature of the view it was sent (at most one view per cohort)."""

    cohort: bytes
    sig: bytes


@dataclass(frozen=True, slots=True)
class SecAggUnmask:
    """Reveal for view (``survivors``, ``dropped``), proven by members' ``sigs`` (member,
    signature); ``bundles`` are the share bundles addressed to the receiver (owner, box)."""

    cohort: bytes
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    sigs: tuple[tuple[str, bytes], ...]
    bundles: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class SecAggShares:
    """A member's reveal: its shares of b_j for survivors j (``self_shares``: j, share)
    and of s_ij for survivor i and dropped j (``pair_shares``: i, j, share)."""

    cohort: bytes
    self_shares: tuple[tuple[str, bytes], ...]
    pair_shares: tuple[tuple[str, str, bytes], ...]


@dataclass(frozen=True, slots=True)
class SecAggAbort:
    """Cohort ``cohort`` ends without a sum (``reason``); members that had not uploaded
    join again, members that had uploaded drop that update."""

    cohort: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class TrainRefused:
    """Site ``src`` did not train task ``task`` (model ``version``): it refused the job
    (``code``: "plan_not_approved", "out_of_bounds", "dataset_missing", "dataset_revoked",
    "unsigned_settings", "privacy_budget", ...) or the plan failed ("failed").
    ``reason`` is the site's one-line explanation. A region relays it to its parent
    unchanged, so the root sees every site's refusals (``fedloom status``)."""

    src: str
    task: int
    version: int
    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class EvalReport:
    """Site ``src``'s evaluation of global model ``version`` on its own held-out split:
    ``metrics`` (accuracy, loss, ...) over ``n_examples`` examples. Regions relay it up; the
    root publishes only aggregates over at least a minimum number of sites."""

    src: str
    version: int
    n_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StatsRequest:
    """The root asks for federated statistics ``query`` over the sites' registered dataset
    tagged ``spec["tag"]`` (the other keys of ``spec`` say which columns and bins:
    ``federation`` analytics module). Regions pass it down to their sites."""

    query: str
    spec: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StatsReport:
    """Site ``src``'s answer to ``query``: ``values`` (counts, sums, histogram cells, with
    cells below the minimum size suppressed) over ``n`` rows, or a refusal (``code`` and
    ``reason`` set, ``values`` empty). Regions relay it up."""

    src: str
    query: str
    n: int
    values: Mapping[str, float] = field(default_factory=dict)
    code: str = ""
    reason: str = ""


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
    | SecAggJoin
    | SecAggSeal
    | MaskedUpdate
    | SecAggView
    | SecAggViewSig
    | SecAggUnmask
    | SecAggShares
    | SecAggAbort
    | TrainRefused
    | EvalReport
    | StatsRequest
    | StatsReport
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
    SecAggJoin,
    SecAggSeal,
    MaskedUpdate,
    SecAggView,
    SecAggViewSig,
    SecAggUnmask,
    SecAggShares,
    SecAggAbort,
    TrainRefused,
    EvalReport,
    StatsRequest,
    StatsReport,
)

SECAGG_MESSAGE_TYPES: tuple[type, ...] = (
    SecAggJoin,
    SecAggSeal,
    MaskedUpdate,
    SecAggView,
    SecAggViewSig,
    SecAggUnmask,
    SecAggShares,
    SecAggAbort,
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
# Secure aggregation (the caps are documented with the messages above).
COHORT_ID_BYTES = 16
SHARE_BYTES = 66  # a Shamir share's y over GF(2**521 - 1), big-endian
MAX_COHORT = 1024  # members of one cohort
_ID_BYTES = 130  # a node id (at most 128 ASCII characters) as one msgpack str
# A plaintext bundle holds a share of b_i and one of s_ij per other member (keyed by the
# member's id), plus the cohort id, ids and an index (``algorithms.secagg.bundle`` caps
# it at 2 KiB + (id + 82 bytes) per member); boxing adds 40 bytes.
_BUNDLE_FIXED = 2048 + 64
_BUNDLE_PER_MEMBER = _ID_BYTES + SHARE_BYTES + 16
MAX_BUNDLE_BYTES = _BUNDLE_FIXED + _BUNDLE_PER_MEMBER * MAX_COHORT
# A reveal names at most |U| * |D| <= N**2 / 4 pairwise shares.
MAX_PAIR_SHARES = MAX_COHORT * MAX_COHORT // 4
_COHORT, _NAMES, _DATA, _SEQS = "cohort", "names", "data", "seqs"
_BUNDLES, _SIGS, _SHARES, _PAIR_SHARES = "bundles", "sigs", "shares", "pair_shares"
# (arity, exact bin length or None, max bin length, max entries) of each named-bin kind.
_NAMED_BINS: dict[str, tuple[int, int | None, int, int]] = {
    _BUNDLES: (2, None, MAX_BUNDLE_BYTES, MAX_COHORT),
    _SIGS: (2, None, MAX_BIN_BYTES, MAX_COHORT),
    _SHARES: (2, SHARE_BYTES, SHARE_BYTES, MAX_COHORT),
    _PAIR_SHARES: (3, SHARE_BYTES, SHARE_BYTES, MAX_PAIR_SHARES),
}


def secagg_message_bound(elements: int, members: int) -> int:
    """An upper bound on the encoded size of any secure-aggregation message of a cohort
    of ``members`` for a model of ``elements`` coordinates: a ``MaskedUpdate`` ((d + 1)
    uint32 words and ``members - 1`` bundles) or a ``SecAggUnmask`` (as many bundles and
    signatures) or a ``SecAggShares`` (at most members**2 / 4 + members shares). A link
    whose caps come from ``Limits.for_model`` holds (d + 1) * 4 bytes plus 1 MiB of slack,
    which covers cohorts of up to about 60 members (even with 128-character ids); larger
    cohorts need that much more ``max_message_bytes`` (``slack``)."""
    if elements < 0 or not 1 <= members <= MAX_COHORT:
        raise ValueError(f"elements >= 0 and 1 <= members <= {MAX_COHORT} required")
    bundle = _BUNDLE_FIXED + _BUNDLE_PER_MEMBER * members
    shares = (members * members // 4 + members) * (2 * _ID_BYTES + SHARE_BYTES + 8)
    per_member = max(bundle, MAX_BIN_BYTES + _ID_BYTES + 8)
    return max(4 * (elements + 1) + members * per_member, shares) + 4096


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
        ("config", _MAP),
        ("settings", _BIN),
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
        ("settings", _BIN),
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
    SecAggJoin: _schema(
        "secagg_join",
        SecAggJoin,
        ("src", _STR),
        ("seq", _INT),
        ("base_version", _INT),
        ("task", _INT),
        ("n_examples", _INT),
    ),
    SecAggSeal: _schema(
        "secagg_seal",
        SecAggSeal,
        ("cohort", _COHORT),
        ("members", _NAMES),
        ("seqs", _SEQS),
        ("threshold", _INT),
        ("clip", _FLOAT),
        ("precision_bits", _INT),
        ("weight_cap", _INT),
        ("deadline_s", _FLOAT),
        ("noise_sigma", _FLOAT),
    ),
    MaskedUpdate: _schema(
        "masked_update",
        MaskedUpdate,
        ("src", _STR),
        ("seq", _INT),
        ("cohort", _COHORT),
        ("base_version", _INT),
        ("n_examples", _INT),
        ("data", _DATA),
        ("bundles", _BUNDLES),
        ("sig", _BIN),
    ),
    SecAggView: _schema(
        "secagg_view",
        SecAggView,
        ("cohort", _COHORT),
        ("survivors", _NAMES),
        ("dropped", _NAMES),
    ),
    SecAggViewSig: _schema("secagg_view_sig", SecAggViewSig, ("cohort", _COHORT), ("sig", _BIN)),
    SecAggUnmask: _schema(
        "secagg_unmask",
        SecAggUnmask,
        ("cohort", _COHORT),
        ("survivors", _NAMES),
        ("dropped", _NAMES),
        ("sigs", _SIGS),
        ("bundles", _BUNDLES),
    ),
    SecAggShares: _schema(
        "secagg_shares",
        SecAggShares,
        ("cohort", _COHORT),
        ("self_shares", _SHARES),
        ("pair_shares", _PAIR_SHARES),
    ),
    SecAggAbort: _schema("secagg_abort", SecAggAbort, ("cohort", _COHORT), ("reason", _STR)),
    TrainRefused: _schema(
        "train_refused",
        TrainRefused,
        ("src", _STR),
        ("task", _INT),
        ("version", _INT),
        ("code", _STR),
        ("reason", _STR),
    ),
    EvalReport: _schema(
        "eval_report",
        EvalReport,
        ("src", _STR),
        ("version", _INT),
        ("n_examples", _INT),
        ("metrics", _MAP),
    ),
    StatsRequest: _schema("stats_request", StatsRequest, ("query", _STR), ("spec", _MAP)),
    StatsReport: _schema(
        "stats_report",
        StatsReport,
        ("src", _STR),
        ("query", _STR),
        ("n", _INT),
        ("values", _MAP),
        ("code", _STR),
        ("reason", _STR),
    ),
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
        elif kind == _COHORT:
            env[name] = _plain_bin(schema.name, name, value, COHORT_ID_BYTES, COHORT_ID_BYTES)
        elif kind == _DATA:
            env[name] = _plain_bin(schema.name, name, value, 4, None)
            buf_size = max(buf_size, len(value) + _PACK_BUF_SIZE)
        elif kind == _NAMES:
            env[name] = _plain_names(schema.name, name, value)
        elif kind == _SEQS:
            env[name] = [int(operator.index(v)) for v in value]
            if len(env[name]) > MAX_COHORT or min(env[name], default=1) < 1:
                raise ValueError(f"{schema.name}.{name}: at most {MAX_COHORT} ints >= 1")
        elif kind in _NAMED_BINS:
            env[name] = _plain_named_bins(schema.name, name, value, kind)
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


def _plain_bin(msg_name: str, field_name: str, value: Any, low: int, high: int | None) -> bytes:
    if type(value) is not bytes:
        raise TypeError(f"{msg_name}.{field_name} must be bytes, got {type(value).__name__}")
    if len(value) < low or (high is not None and len(value) > high):
        want = f"{low}" if low == high else f"at least {low}"
        raise ValueError(f"{msg_name}.{field_name} has {len(value)} bytes, expected {want}")
    return value


def _plain_names(msg_name: str, field_name: str, value: Any) -> list[str]:
    out = list(value)
    if not all(isinstance(item, str) and item for item in out):
        raise TypeError(f"{msg_name}.{field_name}: node ids must be non-empty str, got {out!r}")
    if len(set(out)) != len(out) or len(out) > MAX_COHORT:
        raise ValueError(f"{msg_name}.{field_name}: at most {MAX_COHORT} distinct ids")
    return out


def _plain_named_bins(msg_name: str, field_name: str, value: Any, kind: str) -> list[list[Any]]:
    arity, exact, most, max_items = _NAMED_BINS[kind]
    out: list[list[Any]] = []
    for item in value:
        item = tuple(item)
        if len(item) != arity or not all(isinstance(x, str) and x for x in item[:-1]):
            raise TypeError(f"{msg_name}.{field_name}: entries are ({arity - 1} ids, bytes)")
        out.append([*item[:-1], _plain_bin(msg_name, field_name, item[-1], exact or 0, most)])
    if len(out) > max_items:
        raise ValueError(f"{msg_name}.{field_name}: {len(out)} entries, limit {max_items}")
    if len({tuple(e[:-1]) for e in out}) != len(out):
        raise ValueError(f"{msg_name}.{field_name}: an id appears twice")
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
        elif kind == _COHORT:
            if type(value) is not bytes or len(value) != COHORT_ID_BYTES:
                raise MalformedMessage(
                    f"{schema.name}.{name} must be {COHORT_ID_BYTES} bytes (a msgpack bin)"
                )
        elif kind == _DATA:
            _check_data(schema.name, name, value, limits)
        elif kind == _NAMES:
            _check_names(schema.name, name, value)
        elif kind == _SEQS:
            if type(value) is not tuple or len(value) > MAX_COHORT:
                raise MalformedMessage(
                    f"{schema.name}.{name} must be an array of {MAX_COHORT} ints at most"
                )
            if not all(type(v) is int and v >= 1 for v in value):
                raise MalformedMessage(f"{schema.name}.{name} entries must be ints >= 1")
        elif kind in _NAMED_BINS:
            _check_named_bins(schema.name, name, value, kind)
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


def _check_data(msg_name: str, name: str, value: object, limits: Limits) -> None:
    """A masked vector: a bin of whole uint32 words, at least one (the weight), at most
    the link's decoded-bytes cap (an fp32 model's size plus slack)."""
    if type(value) is not bytes:
        raise MalformedMessage(f"{msg_name}.{name} must be bytes (a msgpack bin)")
    if len(value) > limits.max_decoded_bytes:
        raise MalformedMessage(
            f"{msg_name}.{name} has {len(value)} bytes, limit {limits.max_decoded_bytes}"
        )
    if len(value) < 4 or len(value) % 4:
        raise MalformedMessage(f"{msg_name}.{name} must be whole uint32 words, got {len(value)}")


def _check_names(msg_name: str, name: str, value: object) -> None:
    if type(value) is not tuple:
        raise MalformedMessage(f"{msg_name}.{name} must be an array")
    if len(value) > MAX_COHORT:
        raise MalformedMessage(f"{msg_name}.{name} has {len(value)} ids, limit {MAX_COHORT}")
    for item in value:
        if type(item) is not str or not item:
            raise MalformedMessage(f"{msg_name}.{name} entries must be non-empty str")
    if len(set(value)) != len(value):
        raise MalformedMessage(f"{msg_name}.{name} names an id twice")


def _check_named_bins(msg_name: str, name: str, value: object, kind: str) -> None:
    """An array of distinct ``[id, ..., bin]`` entries (``_NAMED_BINS`` gives the arity and
    the caps); ids are non-empty str, the ids of one entry differ from each other."""
    arity, exact, most, max_items = _NAMED_BINS[kind]
    if type(value) is not tuple:
        raise MalformedMessage(f"{msg_name}.{name} must be an array")
    if len(value) > max_items:
        raise MalformedMessage(f"{msg_name}.{name} has {len(value)} entries, limit {max_items}")
    seen: set[tuple[object, ...]] = set()
    for item in value:
        if type(item) is not tuple or len(item) != arity:
            raise MalformedMessage(f"{msg_name}.{name} entries must be {arity}-element arrays")
        ids, blob = item[:-1], item[-1]
        if not all(type(x) is str and x for x in ids) or len(set(ids)) != len(ids):
            raise MalformedMessage(f"{msg_name}.{name} entries must name distinct non-empty ids")
        if type(blob) is not bytes or len(blob) > most or (exact and len(blob) != exact):
            size = f"{exact} bytes" if exact else f"bytes of at most {most}"
            raise MalformedMessage(f"{msg_name}.{name} entries must end with {size}")
        if ids in seen:
            raise MalformedMessage(f"{msg_name}.{name} names {ids!r} twice")
        seen.add(ids)


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
