"""Relayed envelopes: what a relay carries cannot be read, forged, altered, redirected or
replayed."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.transport import relay, wire
from fedloom.transport.e2e import ReplayedUpdateError, SignatureError
from fedloom.transport.errors import MalformedMessage, ProtocolError
from fedloom.transport.identity import Identity
from fedloom.transport.relay import (
    EPK_BYTES,
    PAYLOAD,
    RedirectedError,
    RelayInbox,
    RelaySender,
    UndecryptableError,
    decrypt_with,
    encrypt_to,
    relay_associated_data,
    relay_signed_bytes,
    x25519_public,
)
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.tensors import CodecSpec

A = Identity.generate("peer-a", "peer")
B = Identity.generate("peer-b", "peer")
C = Identity.generate("peer-c", "peer")
ROSTER = Roster(1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (A, B, C)])


@pytest.fixture(autouse=True, params=["in_place", "public_bindings"])
def aead_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both AEAD paths: PyNaCl's cffi module (sealing in place, when its
    symbols are there) and the public ``nacl.bindings`` functions (the fallback)."""
    if request.param == "public_bindings":
        monkeypatch.setattr(relay, "_in_place_aead", lambda: None)
    else:
        assert relay._in_place_aead() is not None, "this PyNaCl has the in-place symbols"
    return str(request.param)


def test_both_aead_paths_open_each_others_envelopes(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = bytes(B.signing_key.to_curve25519_private_key())
    public = x25519_public(B.public_key)
    aad = relay_associated_data("peer-a", "peer-b", 7)
    plain = wire.encode(share())
    in_place = encrypt_to(public, plain, aad)
    monkeypatch.setattr(relay, "_in_place_aead", lambda: None)
    sealed_public = encrypt_to(public, plain, aad)
    assert bytes(decrypt_with(secret, public, in_place.data.cast("B"), aad)) == plain
    monkeypatch.undo()
    assert bytes(decrypt_with(secret, public, sealed_public.data.cast("B"), aad)) == plain
    tampered = sealed_public.copy()
    tampered[-1] ^= 1
    with pytest.raises(UndecryptableError):
        decrypt_with(secret, public, tampered.data.cast("B"), aad)


def share(src: str = "peer-a", step: int = 3) -> wire.GossipShare:
    rng = np.random.default_rng(step)
    return wire.GossipShare(src, step, {"w": rng.standard_normal((40, 5)).astype(np.float32)}, 0.5)


def test_a_share_arrives_as_sent_and_numbers_increase() -> None:
    sender, inbox = RelaySender(A, ROSTER), RelayInbox(B, ROSTER)
    first = sender.seal("peer-b", share(step=1))
    second = sender.seal("peer-b", wire.Heartbeat("peer-a", 2))
    assert second.seq > first.seq
    got = inbox.open(first)
    assert isinstance(got, wire.GossipShare) and got.step == 1 and got.w == 0.5
    assert np.array_equal(got.x["w"], share(step=1).x["w"])
    assert inbox.open(second) == wire.Heartbeat("peer-a", 2)


def test_the_inner_message_keeps_its_codec() -> None:
    env = RelaySender(A, ROSTER).seal("peer-b", share(), CodecSpec(kind="fp16"))
    got = RelayInbox(B, ROSTER).open(env)
    assert isinstance(got, wire.GossipShare)
    assert np.allclose(got.x["w"], share().x["w"], atol=1e-2)
    assert not np.array_equal(got.x["w"], share().x["w"])  # it did travel as fp16


def test_the_envelope_survives_the_wire_codec() -> None:
    env = RelaySender(A, ROSTER).seal("peer-b", share())
    again = wire.decode(wire.encode(env))
    assert isinstance(again, wire.Relayed)
    assert isinstance(RelayInbox(B, ROSTER).open(again), wire.GossipShare)


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
    env = RelaySender(A, ROSTER).seal("peer-b", share())
    inbox = RelayInbox(B, ROSTER)
    with pytest.raises(error):
        inbox.open(attack(env))  # type: ignore[operator]
    assert isinstance(inbox.open(env), wire.GossipShare)  # the genuine one still opens


def test_a_replay_is_refused() -> None:
    sender, inbox = RelaySender(A, ROSTER), RelayInbox(B, ROSTER)
    old, new = sender.seal("peer-b", share(step=1)), sender.seal("peer-b", share(step=2))
    inbox.open(old)
    inbox.open(new)
    for again in (old, new):
        with pytest.raises(ReplayedUpdateError, match="replay"):
            inbox.open(again)


def test_a_peer_cannot_speak_in_another_peers_name_inside_a_valid_envelope() -> None:
    seq = 1
    aad = relay_associated_data("peer-a", "peer-b", seq)
    payload = encrypt_to(x25519_public(B.public_key), wire.encode(share(src="peer-c")), aad)
    digest = hashlib.sha256(payload.tobytes()).digest()
    sig = A.sign(relay_signed_bytes("peer-a", "peer-b", seq, digest))
    env = wire.Relayed("peer-a", "peer-b", seq, {PAYLOAD: payload}, sig)
    with pytest.raises(SignatureError, match="in the name of"):
        RelayInbox(B, ROSTER).open(env)


def test_only_gossip_traffic_is_relayed_and_only_ones_own() -> None:
    sender = RelaySender(A, ROSTER)
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
        RelayInbox(B, ROSTER).open(env)


# ------------------------------------------------------------ end-to-end encryption


def resigned(env: wire.Relayed, signer: Identity = A, **fields: object) -> wire.Relayed:
    """``env`` with ``fields`` changed and signed again by ``signer``: what a relay cannot
    do (it holds no roster key) but a rostered peer or the sender could, so the AEAD must
    stand on its own."""
    env = dataclasses.replace(env, **fields)  # type: ignore[arg-type]
    digest = hashlib.sha256(env.payload[PAYLOAD].tobytes()).digest()
    return dataclasses.replace(
        env, sig=signer.sign(relay_signed_bytes(env.src, env.dst, env.seq, digest))
    )


def test_the_payload_is_ciphertext_a_relay_cannot_read() -> None:
    msg = share()
    env = RelaySender(A, ROSTER).seal("peer-b", msg)
    carried = wire.encode(env)  # every byte the relay handles for this envelope
    assert wire.encode(msg) not in carried
    assert msg.x["w"].tobytes()[:64] not in carried  # not even a row of the weights
    assert b"gossip_share" not in carried  # nor the inner message's type
    assert isinstance(RelayInbox(B, ROSTER).open(env), wire.GossipShare)


def test_each_envelope_has_its_own_ephemeral_key() -> None:
    sender = RelaySender(A, ROSTER)
    one, two = sender.seal("peer-b", share()), sender.seal("peer-b", share())
    assert bytes(one.payload[PAYLOAD][:EPK_BYTES]) != bytes(two.payload[PAYLOAD][:EPK_BYTES])


def flip(env: wire.Relayed, at: int) -> wire.Relayed:
    data = env.payload[PAYLOAD].copy()
    data[at] ^= 0x40
    return dataclasses.replace(env, payload={PAYLOAD: data})


def other_epk(env: wire.Relayed) -> wire.Relayed:
    data = env.payload[PAYLOAD].copy()
    data[:EPK_BYTES] = RelaySender(A, ROSTER).seal("peer-b", share()).payload[PAYLOAD][:EPK_BYTES]
    return dataclasses.replace(env, payload={PAYLOAD: data})


def zero_epk(env: wire.Relayed) -> wire.Relayed:  # a low-order point: no shared secret
    data = env.payload[PAYLOAD].copy()
    data[:EPK_BYTES] = 0
    return dataclasses.replace(env, payload={PAYLOAD: data})


def truncated(env: wire.Relayed) -> wire.Relayed:
    return dataclasses.replace(env, payload={PAYLOAD: env.payload[PAYLOAD][:-1].copy()})


@pytest.mark.parametrize(
    "attack",
    [
        lambda e: resigned(flip(e, EPK_BYTES + 3)),  # ciphertext
        lambda e: resigned(flip(e, -1)),  # tag
        lambda e: resigned(flip(e, 0)),  # ephemeral key altered
        lambda e: resigned(other_epk(e)),  # ephemeral key of another envelope
        lambda e: resigned(zero_epk(e)),
        lambda e: resigned(truncated(e)),
        lambda e: resigned(e, seq=e.seq + 1),  # renumbered: the AAD binds seq
        lambda e: resigned(e, C, src="peer-c"),  # another peer claims the ciphertext
    ],
)
def test_the_aead_refuses_any_change_even_under_a_valid_signature(attack: object) -> None:
    env = RelaySender(A, ROSTER).seal("peer-b", share())
    inbox = RelayInbox(B, ROSTER)
    with pytest.raises(UndecryptableError):
        inbox.open(attack(env))  # type: ignore[operator]
    assert isinstance(inbox.open(env), wire.GossipShare)  # the genuine one still opens


@pytest.mark.parametrize(
    "attack",
    [
        lambda e: flip(e, EPK_BYTES + 3),
        lambda e: flip(e, 0),
        other_epk,
        lambda e: dataclasses.replace(e, seq=e.seq + 1),
    ],
)
def test_a_relay_cannot_alter_the_ciphertext_or_the_key(attack: object) -> None:
    env = RelaySender(A, ROSTER).seal("peer-b", share())
    with pytest.raises(SignatureError):  # refused before any decryption
        RelayInbox(B, ROSTER).open(attack(env))  # type: ignore[operator]


def test_only_the_destination_can_decrypt() -> None:
    env = RelaySender(A, ROSTER).seal("peer-b", share())
    data = env.payload[PAYLOAD].data.cast("B")
    c_secret = bytes(C.signing_key.to_curve25519_private_key())
    c_public = x25519_public(C.public_key)
    for dst in ("peer-b", "peer-c"):  # C holds the envelope and tries either header
        aad = relay_associated_data(env.src, dst, env.seq)
        with pytest.raises(UndecryptableError):
            decrypt_with(c_secret, c_public, data, aad)
    # Re-addressed to C (signed again by the sender itself): still sealed to B's key.
    with pytest.raises(UndecryptableError):
        RelayInbox(C, ROSTER).open(resigned(env, dst="peer-c"))
    with pytest.raises(RedirectedError):
        RelayInbox(C, ROSTER).open(env)
    # A ciphertext made for B under another header does not open at B either (AAD: dst).
    aad_c = relay_associated_data("peer-a", "peer-c", env.seq)
    stray = encrypt_to(x25519_public(B.public_key), wire.encode(share()), aad_c)
    with pytest.raises(UndecryptableError):
        RelayInbox(B, ROSTER).open(resigned(env, payload={PAYLOAD: stray}))


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(max_size=300), seq=st.integers(1, 2**63 - 1))
def test_any_payload_under_a_valid_signature_raises_only_protocol_errors(
    payload: bytes, seq: int
) -> None:
    """A rostered peer signs whatever it likes: a payload too short to hold the ephemeral
    key and tag, or random bytes of any length, is refused by the AEAD on either path."""
    data = np.frombuffer(payload, np.uint8).copy()
    env = resigned(wire.Relayed("peer-a", "peer-b", seq, {PAYLOAD: data}, b""))
    with pytest.raises((MalformedMessage, UndecryptableError)):
        RelayInbox(B, ROSTER).open(env)


def test_the_floor_survives_in_what_the_inbox_reports() -> None:
    sender = RelaySender(A, ROSTER)
    old, new = sender.seal("peer-b", share(step=1)), sender.seal("peer-b", share(step=2))
    first = RelayInbox(B, ROSTER)
    first.open(old)
    first.open(new)
    restarted = RelayInbox(B, ROSTER, floors=first.floors())
    for again in (old, new):
        with pytest.raises(ReplayedUpdateError):
            restarted.open(again)
    restarted_sender = RelaySender(A, ROSTER, last=new.seq + 10**15)  # clock far behind
    assert isinstance(
        restarted.open(restarted_sender.seal("peer-b", share(step=3))), wire.GossipShare
    )
