"""The relay node forwards envelopes between connected peers and refuses what it can check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.protocol import (
    Deadline,
    Log,
    Metric,
    PeerDown,
    PeerUp,
    ProtocolMisuseError,
    Received,
    Send,
    TrainDone,
    TrainResult,
)
from fedloom.algorithms.relay import RelayNode
from fedloom.transport.wire import Ack, Heartbeat, Relayed


def envelope(src: str, dst: str, seq: int = 1) -> Relayed:
    return Relayed(src, dst, seq, {"payload": np.zeros(8, np.uint8)}, b"s" * 64)


def relay_with(*peers: str) -> RelayNode:
    node = RelayNode("relay")
    for p in peers:
        node.handle(PeerUp(p), 0.0)
    return node


def metric_names(effects: list[object]) -> list[str]:
    return [e.name for e in effects if isinstance(e, Metric)]


def test_an_envelope_goes_to_its_connected_destination_unchanged() -> None:
    node = relay_with("a", "b")
    msg = envelope("a", "b")
    out = node.handle(Received("a", msg), 1.0)
    assert [e for e in out if isinstance(e, Send)] == [Send("b", msg)]
    assert node.forwarded == 1 and node.next_deadline() is None


def test_a_destination_that_is_not_connected_gets_nothing() -> None:
    node = relay_with("a", "b")
    node.handle(PeerDown("b"), 1.0)
    out = node.handle(Received("a", envelope("a", "b")), 2.0)
    assert not [e for e in out if isinstance(e, Send)]
    assert metric_names(out) == ["relay_dropped"] and node.dropped == 1
    node.handle(PeerUp("b"), 3.0)  # back: forwarding resumes
    assert [
        e for e in node.handle(Received("a", envelope("a", "b", 2)), 4.0) if isinstance(e, Send)
    ]


@pytest.mark.parametrize(
    ("peer", "msg", "reason"),
    [
        ("a", envelope("c", "b"), "spoofed_src"),  # a speaks in c's name
        ("a", envelope("a", "a"), "loop"),
        ("a", Ack("a", 1), "not_relayed"),
    ],
)
def test_what_the_relay_can_check_is_refused(peer: str, msg: object, reason: str) -> None:
    node = relay_with("a", "b", "c")
    out = node.handle(Received(peer, msg), 1.0)  # type: ignore[arg-type]
    assert not [e for e in out if isinstance(e, Send)]
    rejected = [e for e in out if isinstance(e, Metric) and e.name == "relay_rejected"]
    assert rejected and rejected[0].labels == {"reason": reason}
    assert [e for e in out if isinstance(e, Log)] and node.rejected == 1


def test_heartbeats_deadlines_and_misuse() -> None:
    node = relay_with("a")
    assert node.handle(Received("a", Heartbeat("a", 3)), 1.0) == []
    assert node.handle(Deadline(), 1.0) == []
    with pytest.raises(ProtocolMisuseError):
        node.handle(TrainDone(1, TrainResult({}, 0)), 1.0)
    with pytest.raises(ValueError, match="node id"):
        RelayNode("")


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["up", "down", "msg"]),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["a", "b", "c"]),
        ),
        max_size=40,
    )
)
def test_it_only_ever_forwards_authentic_hops_to_connected_peers(
    steps: list[tuple[str, str, str, str]],
) -> None:
    node = RelayNode("relay")
    up: set[str] = set()
    for i, (kind, peer, src, dst) in enumerate(steps):
        if kind == "up":
            node.handle(PeerUp(peer), float(i))
            up.add(peer)
        elif kind == "down":
            node.handle(PeerDown(peer), float(i))
            up.discard(peer)
        else:
            msg = envelope(src, dst, i + 1)
            for e in node.handle(Received(peer, msg), float(i)):
                if isinstance(e, Send):
                    assert e.msg is msg and src == peer and dst != peer and dst in up
    assert node.connected() == frozenset(up)


def test_a_flood_of_refused_messages_is_one_log_line_a_minute_and_a_metric_each() -> None:
    """A rostered peer sends 10,000 messages the relay refuses: 10,000 metrics, one line."""
    node = relay_with("evil", "b")
    bad = Received("evil", Ack("evil", 1))
    effects = [e for i in range(10_000) for e in node.handle(bad, i * 1e-3)]
    assert metric_names(effects).count("relay_rejected") == 10_000 and node.rejected == 10_000
    assert len([e for e in effects if isinstance(e, Log)]) == 1
    later = node.handle(bad, 70.0)
    assert [e.fields["unlogged_before"] for e in later if isinstance(e, Log)] == [9_999]
    spoof = node.handle(Received("evil", envelope("b", "evil")), 70.0)  # another reason
    assert [e.fields["reason"] for e in spoof if isinstance(e, Log)] == ["spoofed_src"]
    # The relay still serves honest traffic.
    out = node.handle(Received("b", envelope("b", "evil")), 71.0)
    assert [e.peer for e in out if isinstance(e, Send)] == ["evil"]
