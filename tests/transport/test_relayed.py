"""Relayed envelopes: what a relay carries cannot be forged, altered, redirected or replayed."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import wire
from transport.e2e import ReplayedUpdateError, SignatureError
from transport.errors import MalformedMessage, ProtocolError
from transport.identity import Identity
from transport.relay import PAYLOAD, RedirectedError, RelayInbox, RelaySender, relay_signed_bytes
from transport.roster import Roster, RosterEntry
from transport.tensors import CodecSpec

A = Identity.generate("peer-a", "peer")
B = Identity.generate("peer-b", "peer")
C = Identity.generate("peer-c", "peer")
ROSTER = Roster(1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (A, B, C)])


def share(src: str = "peer-a", step: int = 3) -> wire.GossipShare:
    rng = np.random.default_rng(step)
    return wire.GossipShare(src, step, {"w": rng.standard_normal((40, 5)).astype(np.float32)}, 0.5)


def test_a_share_arrives_as_sent_and_numbers_increase() -> None:
    sender, inbox = RelaySender(A), RelayInbox("peer-b", ROSTER)
    first = sender.seal("peer-b", share(step=1))
    second = sender.seal("peer-b", wire.Heartbeat("peer-a", 2))
    assert second.seq > first.seq
    got = inbox.open(first)
    assert isinstance(got, wire.GossipShare) and got.step == 1 and got.w == 0.5
    assert np.array_equal(got.x["w"], share(step=1).x["w"])
    assert inbox.open(second) == wire.Heartbeat("peer-a", 2)


def test_the_inner_message_keeps_its_codec() -> None:
    env = RelaySender(A).seal("peer-b", share(), CodecSpec(kind="fp16"))
    got = RelayInbox("peer-b", ROSTER).open(env)
    assert isinstance(got, wire.GossipShare)
    assert np.allclose(got.x["w"], share().x["w"], atol=1e-2)
    assert not np.array_equal(got.x["w"], share().x["w"])  # it did travel as fp16


def test_the_envelope_survives_the_wire_codec() -> None:
    env = RelaySender(A).seal("peer-b", share())
    again = wire.decode(wire.encode(env))
    assert isinstance(again, wire.Relayed)
    assert isinstance(RelayInbox("peer-b", ROSTER).open(again), wire.GossipShare)


def tampered(env: wire.Relayed) -> wire.Relayed:
    data = env.payload[PAYLOAD].copy()
    data[len(data) // 2] ^= 1
    return dataclasses.replace(env, payload={PAYLOAD: data})


@pytest.mark.parametrize(
    ("attack", "error"),
    [
        (tampered, SignatureError),
        (lambda e: dataclasses.replace(e, seq=e.seq + 1), SignatureError),  # renumbered
        (lambda e: dataclasses.replace(e, src="peer-c"), SignatureError),  # claims another sender
        (lambda e: dataclasses.replace(e, dst="peer-c"), RedirectedError),  # redirected
        (lambda e: dataclasses.replace(e, src="peer-z"), SignatureError),  # not in the roster
        (lambda e: dataclasses.replace(e, sig=b""), SignatureError),
        (lambda e: dataclasses.replace(e, payload={}), MalformedMessage),
        (
            lambda e: dataclasses.replace(e, payload={PAYLOAD: np.zeros(4, np.int8)}),
            MalformedMessage,
        ),
    ],
)
def test_every_alteration_is_refused(attack: object, error: type[ProtocolError]) -> None:
    env = RelaySender(A).seal("peer-b", share())
    inbox = RelayInbox("peer-b", ROSTER)
    with pytest.raises(error):
        inbox.open(attack(env))  # type: ignore[operator]
    assert isinstance(inbox.open(env), wire.GossipShare)  # the genuine one still opens


def test_a_replay_is_refused() -> None:
    sender, inbox = RelaySender(A), RelayInbox("peer-b", ROSTER)
    old, new = sender.seal("peer-b", share(step=1)), sender.seal("peer-b", share(step=2))
    inbox.open(old)
    inbox.open(new)
    for again in (old, new):
        with pytest.raises(ReplayedUpdateError, match="replay"):
            inbox.open(again)


def test_a_peer_cannot_speak_in_another_peers_name_inside_a_valid_envelope() -> None:
    payload = wire.encode(share(src="peer-c"))
    seq = 1
    digest = hashlib.sha256(payload).digest()
    sig = A.sign(relay_signed_bytes("peer-a", "peer-b", seq, digest))
    env = wire.Relayed("peer-a", "peer-b", seq, {PAYLOAD: np.frombuffer(payload, np.uint8)}, sig)
    with pytest.raises(SignatureError, match="in the name of"):
        RelayInbox("peer-b", ROSTER).open(env)


def test_only_gossip_traffic_is_relayed_and_only_ones_own() -> None:
    sender = RelaySender(A)
    with pytest.raises(TypeError):
        sender.seal("peer-b", wire.Ack("peer-a", 1))
    with pytest.raises(ValueError, match="cannot relay a message from"):
        sender.seal("peer-b", share(src="peer-c"))
    with pytest.raises(ValueError, match="to itself"):
        sender.seal("peer-a", share())


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(max_size=300), sig=st.binary(max_size=80), seq=st.integers(0, 2**63))
def test_arbitrary_envelopes_raise_only_protocol_errors(
    payload: bytes, sig: bytes, seq: int
) -> None:
    env = wire.Relayed("peer-a", "peer-b", seq, {PAYLOAD: np.frombuffer(payload, np.uint8)}, sig)
    with pytest.raises(ProtocolError):
        RelayInbox("peer-b", ROSTER).open(env)
