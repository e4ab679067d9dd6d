"""End-to-end signed envelopes for messages that travel through a relay.

A gossip peer that accepts no inbound connections reaches a neighbour like itself
through a relay (``algorithms.relay``). The sender encodes the inner message exactly as
it would send it directly (``wire.encode`` with its codec), and wraps the bytes in
``Relayed(src, dst, seq, payload, sig)``, where ``sig`` is its Ed25519 signature of the
canonical list ``["fedloom-relay-v1", src, dst, seq, SHA-256(payload)]``. The payload
travels as a ``uint8`` tensor, so a large share is streamed record by record like any
other tensor message. The relay authenticates only its hops; the destination checks:

* the signature, against ``src``'s roster key (a relay cannot forge or alter);
* ``dst`` is itself (a relay cannot redirect a share to another peer);
* ``seq`` is above the last one accepted from ``src`` (a relay cannot replay). Senders
  number envelopes ``max(last + 1, time_ns())``, so numbers keep increasing across a
  sender's restarts as long as its clock does not step back past them;
* the inner message decodes under the receiver's limits and names ``src`` as its own
  source (a peer cannot speak in another's name inside a valid envelope).

The domain label keeps a relay signature from ever passing for an update, model or
handshake signature (``transport.e2e``, ``transport.handshake``).
"""

from __future__ import annotations

import hashlib
import time
from typing import ClassVar, TypeAlias

import msgpack
import numpy as np

from transport import wire
from transport.e2e import ReplayedUpdateError, SignatureError
from transport.errors import MalformedMessage, ProtocolError
from transport.identity import Identity, verify_signature
from transport.limits import Limits
from transport.roster import Roster
from transport.tensors import DEFAULT_SPEC, CodecSpec

_RELAY_LABEL = "fedloom-relay-v1"
PAYLOAD = "payload"  # the name of the one tensor a Relayed message carries
Relayable: TypeAlias = wire.GossipShare | wire.Heartbeat  # what gossip peers exchange


class RedirectedError(ProtocolError):
    """A relayed envelope addressed to another node."""

    reason: ClassVar[str] = "redirected"


def relay_signed_bytes(src: str, dst: str, seq: int, digest: bytes) -> bytes:
    packed: bytes = msgpack.packb([_RELAY_LABEL, src, dst, seq, digest], use_bin_type=True)
    return packed


def _digest(payload: bytes | memoryview) -> bytes:
    return hashlib.sha256(payload).digest()


class RelaySender:
    """Wraps this node's messages for ``dst`` (one per node: it numbers the envelopes)."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._last = 0

    def next_seq(self) -> int:
        self._last = max(self._last + 1, time.time_ns())
        return self._last

    def seal(self, dst: str, msg: wire.Message, spec: CodecSpec = DEFAULT_SPEC) -> wire.Relayed:
        """``msg`` (a ``Relayable`` sent by this node) in a signed envelope for ``dst``."""
        if not isinstance(msg, wire.GossipShare | wire.Heartbeat):
            raise TypeError(f"only gossip shares and heartbeats are relayed, not {msg!r}")
        src = self.identity.node_id
        if msg.src != src:
            raise ValueError(f"{src!r} cannot relay a message from {msg.src!r}")
        if dst == src:
            raise ValueError(f"{src!r} cannot relay a message to itself")
        payload = wire.encode(msg, spec)
        seq = self.next_seq()
        sig = self.identity.sign(relay_signed_bytes(src, dst, seq, _digest(payload)))
        tensor = np.frombuffer(payload, dtype=np.uint8)
        return wire.Relayed(src, dst, seq, {PAYLOAD: tensor}, sig)


class RelayInbox:
    """Opens envelopes addressed to ``node_id`` (see the module docstring for the checks)."""

    def __init__(self, node_id: str, roster: Roster, limits: Limits | None = None) -> None:
        self.node_id = node_id
        self.roster = roster
        self.limits = limits if limits is not None else Limits()
        self._last: dict[str, int] = {}

    def open(self, msg: wire.Relayed) -> wire.Message:
        """The verified inner message; a ``ProtocolError`` subclass for anything else."""
        if msg.dst != self.node_id:
            raise RedirectedError(f"envelope from {msg.src!r} is for {msg.dst!r}, not for us")
        entry = self.roster.lookup(msg.src)
        if entry is None:
            raise SignatureError(f"relayed message from {msg.src!r}, which is not in the roster")
        payload = msg.payload.get(PAYLOAD) if len(msg.payload) == 1 else None
        if payload is None or payload.dtype != np.uint8 or payload.ndim != 1:
            raise MalformedMessage(f"a relayed envelope carries one 1-D uint8 {PAYLOAD!r} tensor")
        data = np.ascontiguousarray(payload).data.cast("B")
        signed = relay_signed_bytes(msg.src, msg.dst, msg.seq, _digest(data))
        if not verify_signature(entry.public_key, signed, msg.sig):
            raise SignatureError(
                f"relayed message {msg.seq} claimed to be from {msg.src!r}: signature does not "
                "match (forged or altered on the way)"
            )
        last = self._last.get(msg.src, 0)
        if msg.seq <= last:
            raise ReplayedUpdateError(
                f"relayed message {msg.seq} from {msg.src!r} is not newer than {last} (replay)"
            )
        inner = wire.decode(data, self.limits)
        if not isinstance(inner, wire.GossipShare | wire.Heartbeat):
            raise MalformedMessage(f"a {type(inner).__name__} cannot travel through a relay")
        if inner.src != msg.src:
            raise SignatureError(f"{msg.src!r} relayed a message in the name of {inner.src!r}")
        self._last[msg.src] = msg.seq
        return inner
