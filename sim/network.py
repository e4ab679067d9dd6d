"""Message delivery on the virtual clock: latency, bandwidth, loss, partitions, deaths.

Delivery model (per directed link ``src -> dst``):

* A link is a FIFO byte pipe. A message starts transmitting when the previous one on the
  same link has finished (``busy_until``), takes ``8 * size / bw_eff`` seconds to
  serialise, then ``latency_s`` to propagate::

      start   = max(now, busy_until)
      arrival = start + 8 * size / bw_eff + latency_s

  so a link never reorders its messages (arrivals at equal times keep send order, since
  the kernel runs ties FIFO).
* ``size`` is ``len(codec.encode(msg, spec))`` with the real wire codec, and the receiver
  gets ``codec.decode(bytes)``: a lossy codec changes both the simulated time and what
  arrives. The spec is chosen per message type (``transport.codec_policy.CodecPolicy``).
* Packet loss (``LinkParams.loss``): links are reliable TCP-like streams, so packet loss
  does not drop messages; it lowers throughput as in Mathis, Semke, Mahdavi & Ott, "The
  macroscopic behavior of the TCP congestion avoidance algorithm" (CCR 1997)::

      bw_eff = min(bw, (MSS / RTT) * (1.22 / sqrt(p)))      MSS = 1460 bytes

  with ``RTT`` the sum of both directions' latencies.
* Message loss (``set_message_loss``): each message on a link is lost with its own
  probability (what a connection reset, a crashed proxy or a timed-out request does to one
  message): it takes its time on the link as any other (its bytes are counted) but never
  arrives, and is counted in ``messages_dropped_loss``. The draws come from one generator
  per directed link (``entity_rng(seed, "message-loss", src, dst)``), so which messages
  are lost depends only on the seed and the order of that link's messages. Two nodes on
  one host (a zero-latency, unbounded loopback link) never lose a message. The protocol's
  own time-outs and resends are what recover (none is simulated here). Two effects:
  ``"drop"`` loses the message alone and the link stays up (a middlebox swallowing a
  request: only time-outs notice); ``"reset"`` also breaks the connection, as a TCP
  stream does when a segment cannot get through: everything in flight on the link, both
  directions, is lost, both ends get ``PeerDown``, nothing is carried for ``reconnect_s``
  and then both ends get ``PeerUp`` (so unacknowledged updates are resent).
* Partitions: during ``[start, end)`` the nodes of a ``Partition`` are cut from every
  other node (links inside the set, and outside it, still work). A link that goes down
  loses everything in flight on it (the TCP connection is reset) and messages sent across
  the cut while it lasts are lost. At the start both ends of every affected neighbour link
  (parent/child or gossip peer) get ``PeerDown``; when it heals each end gets ``PeerUp``
  after the link's latency, so nodes can resend what was not acknowledged.
* Deaths: a dead node's links go down at once and stay down; its neighbours hear
  ``PeerDown`` after a detection delay, the dead node hears nothing.
* Rejections: bytes the receiver's decoder refuses (``transport.errors.ProtocolError``,
  e.g. a NaN delta) still cross the link, then are dropped on arrival and counted
  (``messages_rejected``), as a real receiver would refuse them. Encoding errors are
  local bugs and propagate.

Encoding cost: with the real wire codec, a message under a lossless (``fp32``) spec is not
encoded at all: ``sim.wire_size`` computes the encoder's exact length from its structure
(the tensors still go through the tensor codec and LZ4, whose output size depends on the
data), and the receiver gets the message itself (``decode_lossless`` turns this off;
``verify_encoding`` checks each size against a full encode). Lossy specs are encoded and
decoded, as follows. A broadcast (one message object sent to many peers) is encoded once per
burst. Models are also sent as many *different* messages carrying the *same* tensors (one
``TrainRequest`` per site, each with its own task id): for those the tensor part is encoded
and decoded once and reused. That is exact, not an estimate: a wire envelope is a msgpack
map whose fields encode independently, so ``size(msg) = size(msg without tensors) +
size(tensor field) - size(empty tensor field)``, and receivers get the same decoded values
(arrays are immutable by contract, so sharing them is safe).

Neighbours are told about their links only on transitions (up, down, up, ...): a node
never gets two ``PeerDown`` for the same peer in a row.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from fedloom.federation.seeds import entity_rng
from fedloom.sim.kernel import Kernel, SimulationError
from fedloom.sim.wire_size import WireSizer
from fedloom.transport.codec_policy import CodecPolicy

_INF = math.inf
_push = heapq.heappush

MSS_BYTES = 1460
MATHIS_C = 1.22  # sqrt(3/2), periodic-loss constant of Mathis et al. 1997


class LinkParams(NamedTuple):
    """One direction of a link: one-way latency (s), bandwidth (bit/s), packet loss rate."""

    latency_s: float
    bandwidth_bps: float
    loss: float = 0.0


class LinkModel(Protocol):
    """Where link parameters come from (a ``topology.plan.Plan`` has this method)."""

    def link(self, src: str, dst: str) -> Any:
        """``LinkParams``, a ``(latency_s, bandwidth_bps, loss)`` tuple, or an object
        with those attributes (``topology.specs.Link``)."""
        ...


class Codec(Protocol):
    """The wire codec: ``transport.wire`` satisfies this (see ``WireCodec``).

    A codec may list in a ``rejects`` attribute the exception types its ``decode`` raises
    for bytes a receiver must refuse; those messages are dropped on arrival.
    """

    def encode(self, msg: Any, spec: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class Rejected:
    """Stands in for a message whose bytes the receiver's decoder refuses."""

    __slots__ = ("kind", "reason")

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason


def link_params(raw: Any) -> LinkParams:
    """Normalise whatever a ``LinkModel`` returned into ``LinkParams``."""
    if isinstance(raw, LinkParams):
        return raw
    if isinstance(raw, tuple):
        return LinkParams(*raw)
    return LinkParams(float(raw.latency_s), float(raw.bandwidth_bps), float(raw.loss))


def mathis_bandwidth(
    bandwidth_bps: float, rtt_s: float, loss: float, mss_bytes: int = MSS_BYTES
) -> float:
    """Effective TCP throughput (bit/s) of a link with packet loss ``loss`` (Mathis 1997)."""
    if loss <= 0.0 or rtt_s <= 0.0:
        return bandwidth_bps
    if loss >= 1.0:
        raise ValueError(f"loss must be < 1, got {loss!r}")
    cap = (mss_bytes * 8.0 / rtt_s) * (MATHIS_C / math.sqrt(loss))
    return min(bandwidth_bps, cap)


class UniformLinks:
    """Every directed link has the same parameters (tests, toy scenarios)."""

    def __init__(self, latency_s: float = 0.01, bandwidth_bps: float = 100e6, loss: float = 0.0):
        if latency_s < 0 or not bandwidth_bps > 0 or not 0 <= loss < 1:
            raise ValueError("UniformLinks: need latency_s >= 0, bandwidth_bps > 0, 0 <= loss < 1")
        self._params = LinkParams(latency_s, bandwidth_bps, loss)

    def link(self, src: str, dst: str) -> LinkParams:
        return self._params


class WireCodec:
    """``transport.wire`` as a ``Codec`` (imported lazily; ``limits`` passed to ``decode``)."""

    def __init__(self, limits: Any = None) -> None:
        from fedloom.transport import wire
        from fedloom.transport.errors import ProtocolError

        self._encode = wire.encode
        self._decode = wire.decode
        self._limits = limits
        self.rejects: tuple[type[Exception], ...] = (ProtocolError,)

    def encode(self, msg: Any, spec: Any) -> bytes:
        data: bytes = self._encode(msg, spec)
        return data

    def decode(self, data: bytes) -> Any:
        if self._limits is None:
            return self._decode(data)
        return self._decode(data, limits=self._limits)


# Messages whose tensors are often shared by several messages (models sent to many
# children or neighbours), and the name of their tensor field.
_SHARED_TENSOR_FIELDS = {"TrainRequest": "weights", "ModelBroadcast": "weights", "GossipShare": "x"}
_TENSOR_MEMO_SIZE = 4  # recent tensor dicts remembered (a few model versions in flight)


@dataclass(frozen=True, slots=True)
class Partition:
    """During ``[start_s, end_s)`` the ``nodes`` are cut from everyone else."""

    start_s: float
    end_s: float
    nodes: frozenset[str]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise ValueError(f"Partition.start_s must be finite and >= 0, got {self.start_s!r}")
        if not self.end_s > self.start_s:
            raise ValueError(
                f"Partition.end_s ({self.end_s!r}) must be after start_s ({self.start_s!r})"
            )
        if not self.nodes:
            raise ValueError("Partition.nodes must not be empty")
        object.__setattr__(self, "nodes", frozenset(self.nodes))


class _LinkState:
    """Mutable state of one directed link."""

    __slots__ = (
        "busy_until",
        "bw",
        "bytes",
        "down_until",
        "drop",
        "dst",
        "epoch",
        "latency",
        "messages",
        "rng",
        "src",
        "tier",
    )

    def __init__(self, src: str, dst: str, latency: float, bw: float, tier: str) -> None:
        self.src = src
        self.dst = dst
        self.latency = latency
        self.bw = bw
        self.tier = tier
        self.drop = 0.0  # probability that a message is lost (set_message_loss)
        self.rng: np.random.Generator | None = None  # this link's loss draws
        self.down_until = 0.0  # reset by a lost message: nothing carried before this
        self.busy_until = 0.0
        self.epoch = 0  # bumped whenever the link goes down: in-flight messages are lost
        self.bytes = 0  # counted here, summed per tier on demand (keeps send() cheap)
        self.messages = 0


@dataclass(slots=True)
class NetworkStats:
    messages_sent: int = 0  # accepted onto a link
    messages_delivered: int = 0
    messages_blocked: int = 0  # sent while the link was down (partition, death)
    messages_lost: int = 0  # in flight when the link went down
    messages_rejected: int = 0  # arrived, but the receiver's decoder refused the bytes
    messages_dropped_loss: int = 0  # sent, then lost to the link's message loss
    connection_resets: int = 0  # links broken by a lost message (effect "reset")
    bytes_sent: int = 0
    encodings: int = 0  # real encode calls (broadcasts share one)

    def to_dict(self) -> dict[str, int]:
        return {
            "messages_sent": self.messages_sent,
            "messages_delivered": self.messages_delivered,
            "messages_blocked": self.messages_blocked,
            "messages_lost": self.messages_lost,
            "messages_rejected": self.messages_rejected,
            "messages_dropped_loss": self.messages_dropped_loss,
            "connection_resets": self.connection_resets,
            "bytes_sent": self.bytes_sent,
            "encodings": self.encodings,
        }


DeliverFn = Callable[[str, str, Any], None]  # (src, dst, decoded message)
NotifyFn = Callable[[str, str, bool], None]  # (node, peer, up)


class Network:
    """Moves messages between nodes on the kernel's clock (see the module docstring)."""

    def __init__(
        self,
        kernel: Kernel,
        links: LinkModel,
        *,
        deliver: DeliverFn,
        notify: NotifyFn,
        codec: Codec | None = None,
        codecs: CodecPolicy | None = None,
        roles: Mapping[str, str] | None = None,
        neighbours: Iterable[tuple[str, str]] = (),
        mss_bytes: int = MSS_BYTES,
    ) -> None:
        if mss_bytes <= 0:
            raise ValueError(f"mss_bytes must be positive, got {mss_bytes!r}")
        self._kernel = kernel
        self._links = links
        self._deliver = deliver
        self._notify = notify
        self._codec: Codec = codec if codec is not None else WireCodec()
        # The real wire codec: lossless (fp32) messages are sized without encoding them.
        self._sizer = WireSizer() if isinstance(self._codec, WireCodec) else None
        self._rejects: tuple[type[Exception], ...] = tuple(getattr(self._codec, "rejects", ()))
        self.rejections: dict[str, int] = {}  # reason -> count
        self._codecs = codecs if codecs is not None else CodecPolicy()
        self._roles = dict(roles or {})
        self._mss = mss_bytes
        self._states: dict[tuple[str, str], _LinkState] = {}
        self._tiers: dict[tuple[str, str], str] = {}  # (src role, dst role) -> tier name
        self._incident: dict[str, list[_LinkState]] = {}
        self._adj: dict[str, set[str]] = {}
        for a, b in neighbours:
            self.add_neighbours(a, b)
        self._partitions: list[frozenset[str]] = []
        self._dead: set[str] = set()
        self._notified: dict[tuple[str, str], bool] = {}
        # Broadcast memo: (id(msg), id(spec)) -> (msg, spec, size, decoded). Holding msg
        # and spec keeps their ids from being reused while the entry lives (ids: hashing a
        # spec dataclass costs more than the lookup); cleared by end_burst().
        self._memo: dict[tuple[int, int], tuple[Any, Any, int, Any]] = {}
        # The last message sized under a lossless spec, with its spec and size: a broadcast
        # sends one message to many peers in a row, each other message is sized once (a
        # size is a function of the message's content, so a miss only costs time). Held
        # objects keep their ids; cleared by end_burst() as the memo is.
        self._last_msg: Any = None
        self._last_spec: Any = None
        self._last_size = 0
        # Shared tensors: (type, id(tensors), spec) -> (tensors, extra bytes, decoded
        # tensors), most recent last; holding the tensors keeps their id from being reused.
        self._tensor_memo: dict[tuple[type, int, Any], tuple[Any, int, Any]] = {}
        self.verify_encoding = False  # tests: check every shortcut against a full encode
        self.decode_lossless = False  # tests: decode even lossless (fp32) encodings
        self.stats = NetworkStats()
        self._deliver_cb = self._arrive  # bound once: send() schedules it for every message
        self._bytes_by_type: dict[type, int] = {}
        # Message loss (set_message_loss): probability by tier ("site->region"), run seed.
        self._message_loss: dict[str, float] = {}
        self._default_message_loss = 0.0
        self._loss_seed = 0
        self._loss_resets = False  # "reset": a lost message breaks the connection
        self._reconnect_s = 1.0
        # Codecs by tier (set_tier_codecs): a tier not named uses ``codecs``.
        self._tier_codecs: dict[str, CodecPolicy] = {}

    # --------------------------------------------------------------------- counters

    @property
    def bytes_by_tier(self) -> dict[str, int]:
        """Bytes put on links, by ``"<src role>-><dst role>"`` (e.g. ``"site->region"``)."""
        out: dict[str, int] = {}
        for st in self._states.values():
            if st.messages:
                out[st.tier] = out.get(st.tier, 0) + st.bytes
        return dict(sorted(out.items()))

    @property
    def messages_by_tier(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for st in self._states.values():
            if st.messages:
                out[st.tier] = out.get(st.tier, 0) + st.messages
        return dict(sorted(out.items()))

    @property
    def bytes_by_type(self) -> dict[str, int]:
        """Bytes put on links, by message type name."""
        return dict(sorted((cls.__name__, n) for cls, n in self._bytes_by_type.items()))

    # ------------------------------------------------------------------- topology

    def add_neighbours(self, a: str, b: str) -> None:
        """Declare ``a`` and ``b`` neighbours (they get PeerUp/PeerDown about each other)."""
        if a == b:
            raise ValueError(f"a node cannot be its own neighbour: {a!r}")
        self._adj.setdefault(a, set()).add(b)
        self._adj.setdefault(b, set()).add(a)

    def neighbours(self, node: str) -> frozenset[str]:
        return frozenset(self._adj.get(node, ()))

    def _state(self, src: str, dst: str) -> _LinkState:
        key = (src, dst)
        st = self._states.get(key)
        if st is None:
            if src == dst:
                raise SimulationError(f"{src!r} cannot send a message to itself")
            fwd = link_params(self._links.link(src, dst))
            bw = fwd.bandwidth_bps
            if fwd.loss > 0.0:  # the reverse direction only matters for the RTT
                back = link_params(self._links.link(dst, src))
                bw = mathis_bandwidth(bw, fwd.latency_s + back.latency_s, fwd.loss, self._mss)
            roles = (self._roles.get(src, "?"), self._roles.get(dst, "?"))
            tier = self._tiers.get(roles)
            if tier is None:  # one string per tier, not one per link (200,000 at 100k sites)
                tier = self._tiers[roles] = f"{roles[0]}->{roles[1]}"
            st = _LinkState(src, dst, fwd.latency_s, bw, tier)
            self._set_drop(st)
            self._states[key] = st
            self._incident.setdefault(src, []).append(st)
            self._incident.setdefault(dst, []).append(st)
        return st

    def set_message_loss(
        self,
        loss: float,
        *,
        by_tier: Mapping[str, float] | None = None,
        seed: int = 0,
        effect: str = "drop",
        reconnect_s: float = 1.0,
    ) -> None:
        """Lose each message with probability ``loss`` (``by_tier[tier]`` on the links of
        that tier, e.g. ``"site->region"``), drawn per directed link from ``seed``; the
        ``effect`` of a loss is ``"drop"`` or ``"reset"`` (the module docstring). Call
        before the run starts (links already used get the new probabilities too)."""
        probs = {"*": loss, **(by_tier or {})}
        for tier, p in probs.items():
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p < 1.0:
                raise ValueError(f"message loss of {tier!r} must be in [0, 1), got {p!r}")
        if effect not in ("drop", "reset"):
            raise ValueError(f"message loss effect must be 'drop' or 'reset', got {effect!r}")
        if not 0.0 < reconnect_s < math.inf:
            raise ValueError(f"reconnect_s must be > 0 and finite, got {reconnect_s!r}")
        self._loss_resets = effect == "reset"
        self._reconnect_s = float(reconnect_s)
        self._default_message_loss = float(loss)
        self._message_loss = {k: float(v) for k, v in (by_tier or {}).items()}
        self._loss_seed = seed
        for st in self._states.values():
            self._set_drop(st)

    def _set_drop(self, st: _LinkState) -> None:
        loopback = st.latency == 0.0 and math.isinf(st.bw)
        p = 0.0 if loopback else self._message_loss.get(st.tier, self._default_message_loss)
        st.drop = p
        if p > 0.0 and st.rng is None:
            st.rng = entity_rng(self._loss_seed, "message-loss", st.src, st.dst)

    def set_tier_codecs(self, by_tier: Mapping[str, CodecPolicy]) -> None:
        """Encode the messages on the links of a tier (``"region->root"``) with that
        tier's policy; other tiers keep the network's ``codecs``."""
        self._tier_codecs = dict(by_tier)

    def spec_for(self, src: str, dst: str, msg: Any) -> Any:
        """The codec spec ``msg`` travels with on ``src -> dst``."""
        if self._tier_codecs:
            tier = f"{self._roles.get(src, '?')}->{self._roles.get(dst, '?')}"
            policy = self._tier_codecs.get(tier)
            if policy is not None:
                return policy.spec_for(msg)
        return self._codecs.spec_for(msg)

    def effective_bandwidth(self, src: str, dst: str) -> float:
        """The bandwidth (bit/s) messages on ``src -> dst`` actually get (after loss)."""
        return self._state(src, dst).bw

    def latency(self, src: str, dst: str) -> float:
        return self._state(src, dst).latency

    # -------------------------------------------------------------- connectivity

    def is_dead(self, node: str) -> bool:
        return node in self._dead

    def connected(self, a: str, b: str) -> bool:
        """Whether a message from ``a`` to ``b`` can be carried now."""
        dead = self._dead
        if dead and (a in dead or b in dead):
            return False
        partitions = self._partitions
        return not partitions or all((a in g) == (b in g) for g in partitions)

    def _tell(self, node: str, peer: str, up: bool) -> None:
        """Notify ``node`` about ``peer`` if that is a change for it (and it is alive)."""
        if node in self._dead:
            return
        key = (node, peer)
        if self._notified.get(key, False) == up:
            return
        self._notified[key] = up
        self._notify(node, peer, up)

    def _schedule_up(self, node: str, peer: str) -> None:
        """``node`` hears ``peer`` is up once a message could travel ``peer -> node``."""
        st = self._state(peer, node)
        self._kernel.schedule_in(st.latency, self._up_notice, node, peer, st, st.epoch)

    def _up_notice(self, node: str, peer: str, st: _LinkState, epoch: int) -> None:
        if st.epoch == epoch and st.down_until <= self._kernel.now and self.connected(node, peer):
            self._tell(node, peer, True)

    def start(self) -> None:
        """Announce every neighbour link: each end gets PeerUp after the link's latency."""
        for a in sorted(self._adj):
            for b in sorted(self._adj[a]):
                if self.connected(a, b):
                    self._schedule_up(a, b)

    def add_partition(self, partition: Partition) -> None:
        """Schedule a partition window (its start must not be in the past)."""
        self._kernel.schedule_at(partition.start_s, self._partition_start, partition.nodes)
        self._kernel.schedule_at(partition.end_s, self._partition_end, partition.nodes)

    def _crossing_neighbours(self, group: frozenset[str]) -> list[tuple[str, str]]:
        pairs = []
        for a in sorted(group):
            for b in sorted(self._adj.get(a, ())):
                if b not in group:
                    pairs.append((a, b))
        return pairs

    def _partition_start(self, group: frozenset[str]) -> None:
        now = self._kernel.now
        pairs = self._crossing_neighbours(group)
        before = [self.connected(a, b) for a, b in pairs]
        self._partitions.append(group)
        for st in list(self._incident_of(group)):
            if (st.src in group) != (st.dst in group):
                st.epoch += 1
                st.busy_until = now
        for (a, b), was_up in zip(pairs, before, strict=True):
            if was_up:
                self._tell(a, b, False)
                self._tell(b, a, False)

    def _partition_end(self, group: frozenset[str]) -> None:
        self._partitions.remove(group)
        for a, b in self._crossing_neighbours(group):
            if self.connected(a, b):
                self._schedule_up(a, b)
                self._schedule_up(b, a)

    def _incident_of(self, group: frozenset[str]) -> Iterable[_LinkState]:
        seen: set[int] = set()
        for node in sorted(group):
            for st in self._incident.get(node, ()):
                if id(st) not in seen:
                    seen.add(id(st))
                    yield st

    def kill(self, node: str, detection_delay_s: float = 0.0) -> None:
        """``node`` dies now: its links go down for good; neighbours hear after a delay."""
        if not detection_delay_s >= 0:
            raise ValueError(f"detection_delay_s must be >= 0, got {detection_delay_s!r}")
        if node in self._dead:
            return
        self._dead.add(node)
        now = self._kernel.now
        for st in self._incident.get(node, ()):
            st.epoch += 1
            st.busy_until = now
        for peer in sorted(self._adj.get(node, ())):
            self._kernel.schedule_in(detection_delay_s, self._tell, peer, node, False)

    # -------------------------------------------------------------------- sending

    def encoded(self, msg: Any, spec: Any = None) -> tuple[int, Any]:
        """``(size in bytes, decoded copy)`` of ``msg`` with ``spec`` (default: its type's
        spec in ``codecs``), memoised per burst (under a lossless spec: the last message
        sized, which is what a broadcast sends again)."""
        if spec is None:
            spec = self._codecs.spec_for(msg)
        sizer = self._sizer
        if sizer is not None and spec.kind == "fp32" and not self.decode_lossless:
            # Lossless: the receiver gets what was sent, so only the size is needed, and
            # wire_size gives the encoder's exact length without encoding.
            if msg is self._last_msg and spec is self._last_spec:
                return self._last_size, msg
            size = sizer.size(msg, spec)
            if self.verify_encoding:
                self._verify(msg, spec, size)
            self._last_msg, self._last_spec, self._last_size = msg, spec, size
            return size, msg
        key = (id(msg), id(spec))
        memo = self._memo
        hit = memo.get(key)
        if hit is not None:
            return hit[2], hit[3]
        field = _SHARED_TENSOR_FIELDS.get(type(msg).__name__)
        if field is None:
            size, decoded = self._encode_decode(msg, spec)
        else:
            size, decoded = self._encode_shared(msg, spec, field)
        memo[key] = (msg, spec, size, decoded)
        return size, decoded

    def _verify(self, msg: Any, spec: Any, size: int) -> None:
        full = len(self._codec.encode(msg, spec))
        if full != size:
            raise SimulationError(f"wire_size is wrong for {type(msg).__name__}: {size} != {full}")

    def _encode_decode(self, msg: Any, spec: Any) -> tuple[int, Any]:
        data = self._codec.encode(msg, spec)
        self.stats.encodings += 1
        if not self.decode_lossless and getattr(spec, "kind", None) == "fp32":
            # fp32 is lossless: decoding would hand over an equal message, so skip the
            # cost. The size still comes from the real encoding; the receiving node
            # validates the message as it validates any peer input.
            return len(data), msg
        try:
            return len(data), self._codec.decode(data)
        except self._rejects as exc:
            reason = str(getattr(exc, "reason", type(exc).__name__))
            return len(data), Rejected(type(msg).__name__, reason)

    def _encode_shared(self, msg: Any, spec: Any, field: str) -> tuple[int, Any]:
        tensors = getattr(msg, field)
        tkey = (type(msg), id(tensors), spec)
        memo = self._tensor_memo
        hit = memo.get(tkey)
        bare = dataclasses.replace(msg, **{field: {}})
        bare_size, bare_decoded = self._encode_decode(bare, spec)
        if hit is None or type(bare_decoded) is Rejected:
            size, decoded = self._encode_decode(msg, spec)
            if type(decoded) is Rejected or type(bare_decoded) is Rejected:
                return size, decoded
            memo[tkey] = (tensors, size - bare_size, getattr(decoded, field))
            if len(memo) > _TENSOR_MEMO_SIZE:
                del memo[next(iter(memo))]
            return size, decoded
        memo[tkey] = memo.pop(tkey)  # most recently used last
        size = bare_size + hit[1]
        decoded = dataclasses.replace(bare_decoded, **{field: hit[2]})
        if self.verify_encoding:
            full_size, full = self._encode_decode(msg, spec)
            if full_size != size or type(full) is not type(decoded):
                raise SimulationError(
                    f"shared-tensor size shortcut is wrong for {type(msg).__name__}: "
                    f"{size} != {full_size}"
                )
        return size, decoded

    def end_burst(self) -> None:
        """Forget the encodings of the current burst (call after each node's effects)."""
        if self._memo:
            self._memo.clear()
        self._last_msg = self._last_spec = None

    def send(self, src: str, dst: str, msg: Any) -> bool:
        """Put ``msg`` on the link ``src -> dst``. Returns False if it was lost at once."""
        st = self._states.get((src, dst))
        if st is None:
            st = self._state(src, dst)
        stats = self.stats
        if (self._dead or self._partitions) and not self.connected(src, dst):
            stats.messages_blocked += 1
            return False
        kernel = self._kernel
        now = kernel._now
        if st.down_until > now:  # reset by a lost message: reconnecting
            stats.messages_blocked += 1
            return False
        tiered = self._tier_codecs.get(st.tier) if self._tier_codecs else None
        size, decoded = self.encoded(msg, None if tiered is None else tiered.spec_for(msg))
        start = st.busy_until if st.busy_until > now else now
        finish = start + size * 8.0 / st.bw  # bw may be inf (loopback): 0 s
        st.busy_until = finish
        rng = st.rng
        if rng is not None and st.drop > 0.0 and rng.random() < st.drop:
            if self._loss_resets:  # on the link for its time; the connection breaks then
                kernel.schedule_at(finish, self._lost_reset, st, st.epoch)
            else:
                stats.messages_dropped_loss += 1  # on the link for its time, then lost
        else:
            # kernel.schedule_at(t, self._arrive, st, st.epoch, decoded), inline: a call
            # for every message sent (the entry's layout is the kernel's, priority 0).
            t = finish + st.latency
            if not now <= t < _INF:
                kernel._refuse(t, self._arrive)
            seq = kernel._seq = kernel._seq + 1
            _push(kernel._heap, (t, 0, seq, [self._deliver_cb, (st, st.epoch, decoded), t]))
        st.bytes += size
        st.messages += 1
        stats.messages_sent += 1
        stats.bytes_sent += size
        by_type = self._bytes_by_type
        cls = type(msg)
        by_type[cls] = by_type.get(cls, 0) + size
        return True

    def _lost_reset(self, st: _LinkState, epoch: int) -> None:
        """A message lost under ``loss_effect = "reset"`` has taken its time on the link:
        the connection breaks now, unless it already broke under it (then the message was
        lost with that break, not to loss)."""
        if st.epoch != epoch:
            self.stats.messages_lost += 1
            return
        self.stats.messages_dropped_loss += 1
        self._reset(st)

    def _reset(self, st: _LinkState) -> None:
        """A lost message broke the connection ``st.src`` - ``st.dst`` (at the end of its
        time on the link): both directions lose what is in flight (messages queued behind
        it included) and carry nothing for ``reconnect_s``; both ends hear ``PeerDown`` now
        and ``PeerUp`` once it is back (``_reconnected``)."""
        now = self._kernel.now
        back = self._state(st.dst, st.src)
        for link in (st, back):
            link.epoch += 1
            link.busy_until = now
            link.down_until = now + self._reconnect_s
        self.stats.connection_resets += 1
        if st.dst in self._adj.get(st.src, ()):
            self._tell(st.src, st.dst, False)
            self._tell(st.dst, st.src, False)
            self._kernel.schedule_in(self._reconnect_s, self._reconnected, st.src, st.dst)

    def _reconnected(self, a: str, b: str) -> None:
        if self.connected(a, b):
            self._schedule_up(a, b)
            self._schedule_up(b, a)

    def _arrive(self, st: _LinkState, epoch: int, msg: Any) -> None:
        if st.epoch != epoch:
            self.stats.messages_lost += 1
            return
        if type(msg) is Rejected:
            self.stats.messages_rejected += 1
            key = f"{msg.kind}:{msg.reason}"
            self.rejections[key] = self.rejections.get(key, 0) + 1
            return
        self.stats.messages_delivered += 1
        self._deliver(st.src, st.dst, msg)
