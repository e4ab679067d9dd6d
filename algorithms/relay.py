"""Relay for gossip peers that accept no inbound connections (hospital firewalls).

Two gossip neighbours that both refuse inbound connections cannot open a link to each
other. Each dials a relay instead, and sends what it has for the other as a
``Relayed(src, dst, seq, payload, sig)`` envelope: ``payload`` is the encoded inner
message encrypted to ``dst`` and ``sig`` the sender's end-to-end signature of
``{src, dst, seq, digest of the payload}`` (``transport.relay``). The relay passes an
envelope from its hop source to its destination if that one is connected, and drops it
otherwise (gossip absorbs loss: the sender's liveness timers suspect and prune a
neighbour that stays silent). It is the forwarding half of a TURN server (RFC 8656) with
the relay unable to read, forge, alter, redirect or replay what it carries: only the
destination holds the key, it checks the signature against the roster, and it refuses a
``seq`` not above the last it accepted from that source (a floor kept across restarts).

The relay holds no model and no durable state of its own (its daemon keeps only the
newest roster), and cannot open a payload. It checks only what it can check without
trusting the payload: the envelope's ``src`` is the
authenticated peer it came from (no injecting traffic in another peer's name), and the
destination is not that same peer. Bounded work per event: O(1).
"""

from __future__ import annotations

from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    Event,
    Log,
    Metric,
    PeerDown,
    PeerUp,
    ProtocolMisuseError,
    Received,
    Send,
    TrainDone,
    TrainFailed,
)
from fedloom.algorithms.warn_limit import WarnLimiter
from fedloom.transport.wire import Heartbeat, Relayed

__all__ = ["RelayNode"]


class RelayNode:
    """Sans-I/O relay: ``handle(event, now) -> effects`` (see the module docstring)."""

    def __init__(self, node_id: str) -> None:
        if not node_id:
            raise ValueError("a relay needs a node id")
        self._id = node_id
        self._up: set[str] = set()
        self.forwarded = 0
        self.dropped = 0
        self.rejected = 0
        self._warn = WarnLimiter()  # one refusal line per peer and reason per minute

    @property
    def node_id(self) -> str:
        return self._id

    def connected(self) -> frozenset[str]:
        """Peers the relay can reach now."""
        return frozenset(self._up)

    def next_deadline(self) -> float | None:
        return None

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, Received):
            return self._on_received(event, now)
        if isinstance(event, PeerUp):
            self._up.add(event.peer)
            return [Metric("relay_peers", float(len(self._up)))]
        if isinstance(event, PeerDown):
            self._up.discard(event.peer)
            return [Metric("relay_peers", float(len(self._up)))]
        if isinstance(event, Deadline):
            return []
        if isinstance(event, TrainDone | TrainFailed):
            raise ProtocolMisuseError(f"relay {self._id} never starts training jobs")
        raise ProtocolMisuseError(f"relay {self._id}: unknown event {event!r}")

    def _on_received(self, event: Received, now: float) -> list[Effect]:
        msg, peer = event.msg, event.peer
        if not isinstance(msg, Relayed):
            if isinstance(msg, Heartbeat):
                return []  # a peer's liveness beacon to the relay itself: nothing to do
            return self._reject(peer, "not_relayed", type(msg).__name__, now)
        if msg.src != peer:
            return self._reject(peer, "spoofed_src", msg.src, now)
        if msg.dst == peer:
            return self._reject(peer, "loop", msg.dst, now)
        if msg.dst not in self._up:
            self.dropped += 1
            return [Metric("relay_dropped", 1.0, {"reason": "not_connected"})]
        self.forwarded += 1
        return [Send(msg.dst, msg), Metric("relay_forwarded", 1.0, {"dst": msg.dst})]

    def _reject(self, peer: str, reason: str, detail: str, now: float) -> list[Effect]:
        """A metric per refused message; a log line per peer and reason per minute at most."""
        self.rejected += 1
        out: list[Effect] = [Metric("relay_rejected", 1.0, {"reason": reason})]
        unlogged = self._warn.due(peer, reason, now)
        if unlogged is not None:
            fields = {"peer": peer, "reason": reason, "detail": detail, "unlogged_before": unlogged}
            out.append(Log("warning", "relay refused a message", fields))
        return out
