"""The channel handshake: mutual authentication, fresh keys, and every refusal."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import nacl.bindings
import nacl.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.transport.errors import HandshakeError, PeerRefused, ProtocolError
from fedloom.transport.handshake import (
    _LOW_ORDER_POINTS,
    MAX_HANDSHAKE_MESSAGE,
    SUITES,
    ClientHandshake,
    ServerHandshake,
    is_low_order,
    keys_match,
    suites_for,
)
from fedloom.transport.identity import Identity
from fedloom.transport.records import (
    CIPHER_AEGIS256,
    CIPHER_SECRETSTREAM,
    available_ciphers,
    preferred_ciphers,
)
from fedloom.transport.roster import Roster, RosterEntry
from tests.transport.cipher_params import needs_aegis

ROOT = Identity.generate("root", "root")
REGION = Identity.generate("region-eu", "region")
SITE_A = Identity.generate("site-a", "site")
SITE_B = Identity.generate("site-b", "site")
OUTSIDER = Identity.generate("site-x", "site")
ROSTER = Roster(
    5, [RosterEntry(i.node_id, i.role, i.public_key) for i in (ROOT, REGION, SITE_A, SITE_B)]
)


def unpack(data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = msgpack.unpackb(data, raw=False)
    return obj


def pack(obj: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def edit(data: bytes, **changes: Any) -> bytes:
    msg = unpack(data)
    msg.update(changes)
    return pack(msg)


def run(
    client: ClientHandshake, server: ServerHandshake
) -> tuple[ClientHandshake, ServerHandshake]:
    c2 = client.receive(server.receive(client.start()) or b"")
    assert c2 is not None
    assert server.receive(c2) is None
    return client, server


def pair(
    client_id: Identity = SITE_A, server_id: Identity = ROOT, **kw: Any
) -> tuple[ClientHandshake, ServerHandshake]:
    return ClientHandshake(client_id, ROSTER, **kw), ServerHandshake(server_id, ROSTER)


# ------------------------------------------------------------------ success


def test_handshake_authenticates_both_ends_and_derives_matching_keys() -> None:
    client, server = run(*pair(expected_peer="root"))
    assert client.done and server.done
    assert (client.keys.peer_id, client.keys.peer_role) == ("root", "root")
    assert (server.keys.peer_id, server.keys.peer_role) == ("site-a", "site")
    assert keys_match(client.keys, server.keys)
    assert client.keys.send_key != client.keys.recv_key
    assert client.keys.transcript_hash == server.keys.transcript_hash
    assert "key" not in repr(client.keys).replace("SessionKeys", "")


def test_every_handshake_derives_fresh_keys() -> None:
    first, _ = run(*pair())
    second, _ = run(*pair())
    assert first.keys.send_key != second.keys.send_key
    assert first.keys.transcript_hash != second.keys.transcript_hash


def test_a_region_can_dial_the_root_and_sites_can_dial_a_region() -> None:
    assert run(*pair(REGION, ROOT))[1].keys.peer_role == "region"
    assert run(*pair(SITE_B, REGION))[0].keys.peer_id == "region-eu"


# ------------------------------------------------------------------ record cipher


@needs_aegis
def test_the_clients_first_offered_cipher_that_the_server_accepts_wins() -> None:
    for ciphers in ([CIPHER_AEGIS256, CIPHER_SECRETSTREAM], [CIPHER_SECRETSTREAM]):
        client, server = run(
            ClientHandshake(SITE_A, ROSTER, ciphers=ciphers), ServerHandshake(ROOT, ROSTER)
        )
        assert client.keys.cipher == server.keys.cipher == ciphers[0]
    only_aegis = ServerHandshake(ROOT, ROSTER, ciphers=[CIPHER_AEGIS256])
    client, server = run(ClientHandshake(SITE_A, ROSTER), only_aegis)
    assert client.keys.cipher == server.keys.cipher == CIPHER_AEGIS256
    assert CIPHER_AEGIS256 in repr(client.keys)


def test_nodes_of_the_previous_release_still_agree_on_secretstream() -> None:
    # The previous release offered and accepted only the secretstream suite.
    old_server = ServerHandshake(ROOT, ROSTER, ciphers=[CIPHER_SECRETSTREAM])
    client, _ = run(ClientHandshake(SITE_A, ROSTER), old_server)
    assert client.keys.cipher == CIPHER_SECRETSTREAM
    old_client = ClientHandshake(SITE_A, ROSTER, ciphers=[CIPHER_SECRETSTREAM])
    _, server = run(old_client, ServerHandshake(ROOT, ROSTER))
    assert server.keys.cipher == CIPHER_SECRETSTREAM
    # ... under the very suite name the previous release put on the wire.
    assert "x25519-ed25519-blake2b-xchacha20poly1305-secretstream" in SUITES


def test_by_default_the_fastest_cipher_here_is_offered_first() -> None:
    client, _ = run(*pair())
    assert client.keys.cipher == preferred_ciphers()[0]
    offered = set(unpack(ClientHandshake(SITE_A, ROSTER).start())["suites"])
    assert offered == {s for s in SUITES if s.endswith(available_ciphers())}


@needs_aegis
def test_no_common_cipher_is_refused_with_both_lists() -> None:
    client = ClientHandshake(SITE_A, ROSTER, ciphers=[CIPHER_SECRETSTREAM])
    server = ServerHandshake(ROOT, ROSTER, ciphers=[CIPHER_AEGIS256])
    with pytest.raises(HandshakeError, match="no common cipher suite") as info:
        server.receive(client.start())
    assert "secretstream" in str(info.value) and "aegis256" in str(info.value)


@needs_aegis
def test_a_downgraded_cipher_offer_is_detected_by_the_client() -> None:
    # A man in the middle strips the faster cipher from c1: the server's signature
    # covers the c1 it saw, so the client (which signed nothing yet) refuses.
    client, server = pair()
    c1 = client.start()
    stripped = edit(c1, suites=[SUITES[-1]])
    with pytest.raises(HandshakeError, match="signature"):
        client.receive(server.receive(stripped) or b"")


@needs_aegis
def test_a_cipher_the_client_did_not_offer_is_refused() -> None:
    client = ClientHandshake(SITE_A, ROSTER, ciphers=[CIPHER_SECRETSTREAM])
    s1 = ServerHandshake(ROOT, ROSTER).receive(
        ClientHandshake(SITE_A, ROSTER, ciphers=[CIPHER_AEGIS256]).start()
    )
    client.start()
    with pytest.raises(HandshakeError, match="not offered"):
        client.receive(s1 or b"")


def test_unknown_cipher_names_are_value_errors() -> None:
    with pytest.raises(ValueError, match="record ciphers must be distinct names"):
        ClientHandshake(SITE_A, ROSTER, ciphers=["rot13"])
    with pytest.raises(ValueError, match="record ciphers must be distinct names"):
        ServerHandshake(ROOT, ROSTER, ciphers=[])
    with pytest.raises(ValueError, match="record ciphers must be distinct names"):
        suites_for([CIPHER_AEGIS256, CIPHER_AEGIS256])


# ------------------------------------------------------------------ roster refusals


def test_server_refuses_unknown_key_before_signing_anything() -> None:
    client, server = pair(OUTSIDER)
    with pytest.raises(PeerRefused, match="unknown key"):
        server.receive(client.start())
    assert server.failed


def test_client_refuses_unknown_server_key() -> None:
    client = ClientHandshake(SITE_A, ROSTER)
    rogue = ServerHandshake(Identity("root", "root", OUTSIDER.signing_key), ROSTER)
    with pytest.raises(PeerRefused, match=r"unknown key.*another key for 'root'"):
        client.receive(rogue.receive(client.start()) or b"")


def test_key_listed_under_another_id_is_refused() -> None:
    impostor = Identity("site-b", "site", SITE_A.signing_key)  # site-a's key, site-b's name
    with pytest.raises(PeerRefused, match="another id"):
        pair(impostor)[1].receive(ClientHandshake(impostor, ROSTER).start())


def test_key_under_another_role_is_refused() -> None:
    as_region = Identity("site-a", "region", SITE_A.signing_key)
    with pytest.raises(PeerRefused, match="wrong role"):
        ServerHandshake(ROOT, ROSTER).receive(ClientHandshake(as_region, ROSTER).start())
    # And a server posing under another role.
    client = ClientHandshake(SITE_A, ROSTER)
    fake_root = ServerHandshake(Identity("region-eu", "root", REGION.signing_key), ROSTER)
    with pytest.raises(PeerRefused, match="wrong role"):
        client.receive(fake_root.receive(client.start()) or b"")


def test_client_refuses_a_server_other_than_the_one_dialled() -> None:
    client, _ = pair(expected_peer="root")
    with pytest.raises(PeerRefused, match="dialled 'root'"):
        client.receive(ServerHandshake(REGION, ROSTER).receive(client.start()) or b"")


def test_allowed_roles_restrict_who_may_connect() -> None:
    server = ServerHandshake(ROOT, ROSTER, allowed_roles={"region"})
    with pytest.raises(PeerRefused, match="may not connect here"):
        server.receive(ClientHandshake(SITE_A, ROSTER).start())


def test_a_peer_must_hold_the_private_key_of_the_identity_it_claims() -> None:
    # An outsider copies site-a's public identity into c1; it can answer s1 only with a
    # signature by a key it holds, which is not site-a's.
    server = ServerHandshake(ROOT, ROSTER)
    c1 = edit(ClientHandshake(OUTSIDER, ROSTER).start(), id="site-a", pk=SITE_A.public_key)
    assert server.receive(c1) is not None
    forged = pack({"t": "c2", "sig": OUTSIDER.sign(b"transcript")})
    with pytest.raises(HandshakeError, match="signature of 'site-a' does not verify"):
        server.receive(forged)
    assert server.failed and not server.done


# ------------------------------------------------------------------ man in the middle


def test_substituted_client_ephemeral_key_is_detected() -> None:
    client, server = pair()
    mallory_pk, _ = nacl.bindings.crypto_kx_keypair()
    s1 = server.receive(edit(client.start(), kx=mallory_pk))
    with pytest.raises(HandshakeError, match="signature of 'root' does not verify"):
        client.receive(s1 or b"")


def test_substituted_server_ephemeral_key_is_detected() -> None:
    client, server = pair()
    mallory_pk, _ = nacl.bindings.crypto_kx_keypair()
    s1 = server.receive(client.start()) or b""
    with pytest.raises(HandshakeError, match="does not verify"):
        client.receive(edit(s1, kx=mallory_pk))


@pytest.mark.parametrize("field", ["n", "suite", "id"])
def test_any_altered_server_field_is_detected(field: str) -> None:
    client, server = pair()
    s1 = server.receive(client.start()) or b""
    value = {"n": b"\x01" * 32, "suite": "x", "id": "region-eu"}[field]
    with pytest.raises(HandshakeError):
        client.receive(edit(s1, **{field: value}))


def test_replayed_server_flight_fails_for_a_new_client() -> None:
    client, server = pair()
    old_s1 = server.receive(client.start()) or b""
    fresh = ClientHandshake(SITE_A, ROSTER)
    fresh.start()
    with pytest.raises(HandshakeError, match="does not verify"):
        fresh.receive(old_s1)


def test_replayed_client_flights_fail_at_a_new_server() -> None:
    client, server = pair()
    c1 = client.start()
    c2 = client.receive(server.receive(c1) or b"") or b""
    server.receive(c2)
    replay = ServerHandshake(ROOT, ROSTER)
    assert replay.receive(c1) is not None  # c1 carries no proof yet: the server answers...
    with pytest.raises(HandshakeError, match="signature of 'site-a' does not verify"):
        replay.receive(c2)  # ...but the old c2 signs another transcript
    assert not replay.done


def test_reflected_server_signature_is_not_a_client_signature() -> None:
    client, server = pair(SITE_A, ROOT)
    s1 = server.receive(client.start()) or b""
    with pytest.raises(HandshakeError):
        server.receive(pack({"t": "c2", "sig": unpack(s1)["sig"]}))


# ------------------------------------------------------------------ low-order keys


def test_blocklist_holds_exactly_points_that_give_no_shared_secret() -> None:
    _, secret = nacl.bindings.crypto_kx_keypair()
    for point in _LOW_ORDER_POINTS:
        shared = None
        with contextlib.suppress(nacl.exceptions.CryptoError):
            shared = nacl.bindings.crypto_scalarmult(secret, point)
        assert shared is None or not any(shared)
    assert not is_low_order(nacl.bindings.crypto_kx_keypair()[0])


@pytest.mark.parametrize("point", sorted(_LOW_ORDER_POINTS))
@pytest.mark.parametrize("top_bit", [False, True])
def test_low_order_ephemeral_keys_are_refused_by_both_sides(point: bytes, top_bit: bool) -> None:
    if top_bit:
        point = point[:31] + bytes((point[31] | 0x80,))
    client, server = pair()
    c1 = client.start()
    with pytest.raises(HandshakeError, match="low-order"):
        ServerHandshake(ROOT, ROSTER).receive(edit(c1, kx=point))
    s1 = server.receive(c1) or b""
    with pytest.raises(HandshakeError, match="low-order"):
        client.receive(edit(s1, kx=point))


# ------------------------------------------------------------------ garbage


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c1: c1 + b"\x00", "trailing bytes"),
        (lambda c1: c1[:-3], "garbled"),
        (lambda c1: b"\xc1" + c1, "garbled"),
        (lambda c1: b"\x00" * (MAX_HANDSHAKE_MESSAGE + 1), "limit 4096"),
        (lambda c1: edit(c1, v=2), "unsupported handshake version 2"),
        (lambda c1: edit(c1, v=True), "unsupported handshake version"),
        (lambda c1: edit(c1, suites=["tls-rsa"]), "no common cipher suite"),
        (lambda c1: edit(c1, suites="x25519"), "list of strings"),
        (lambda c1: edit(c1, t="s1"), "expected handshake message 'c1'"),
        (lambda c1: edit(c1, kx=b"\x09" * 31), "kx must be 32 bytes"),
        (lambda c1: edit(c1, id=7), "id must be a string"),
        (lambda c1: edit(c1, extra=1), "unexpected fields"),
        (lambda c1: pack({k: v for k, v in unpack(c1).items() if k != "n"}), "missing 'n'"),
        (lambda c1: pack({**unpack(c1), "n": msgpack.ExtType(1, b"x")}), "ext_len"),
        (lambda c1: msgpack.packb({1: 2}), "garbled"),
        (lambda c1: msgpack.packb([[[[[[[]]]]]]]), "must be a msgpack map"),
        (lambda c1: b"\xdd\xff\xff\xff\xff", "garbled"),  # array claiming 2**32-1 items
        (lambda c1: b"\xdf\xff\xff\xff\xff", "garbled"),  # map claiming 2**32-1 items
        (lambda c1: b"\x91" * 2000 + b"\xc0", "garbled"),  # 2,000-deep nesting
    ],
)
def test_garbled_client_hello_is_a_handshake_error(mutate: Any, message: str) -> None:
    c1 = ClientHandshake(SITE_A, ROSTER).start()
    server = ServerHandshake(ROOT, ROSTER)
    with pytest.raises(HandshakeError, match=message):
        server.receive(mutate(c1))
    with pytest.raises(HandshakeError, match="already failed"):
        server.receive(c1)  # a failed handshake stays failed


def test_messages_out_of_order_are_refused() -> None:
    client, server = run(*pair())
    with pytest.raises(HandshakeError, match="after the handshake completed"):
        server.receive(b"\x80")
    with pytest.raises(HandshakeError, match="after the handshake completed"):
        client.receive(b"\x80")
    assert client.done and server.done
    fresh = ServerHandshake(ROOT, ROSTER)
    with pytest.raises(HandshakeError, match="expected handshake message 'c1'"):
        fresh.receive(pack({"t": "c2", "sig": b"\x00" * 64}))


def test_local_misuse_raises_value_error() -> None:
    client = ClientHandshake(SITE_A, ROSTER)
    with pytest.raises(ValueError, match="start"):
        client.receive(b"")
    client.start()
    with pytest.raises(ValueError, match="once"):
        client.start()
    with pytest.raises(ValueError, match="not completed"):
        _ = client.keys


# ------------------------------------------------------------------ fuzzing

SETTINGS = settings(max_examples=150, deadline=None)


@SETTINGS
@given(st.binary(max_size=600))
def test_arbitrary_bytes_to_a_fresh_server_raise_only_handshake_errors(data: bytes) -> None:
    server = ServerHandshake(ROOT, ROSTER)
    try:
        server.receive(data)
    except HandshakeError:
        assert server.failed


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_client_finish_raise_only_handshake_errors(data: bytes) -> None:
    server = ServerHandshake(ROOT, ROSTER)
    server.receive(ClientHandshake(SITE_A, ROSTER).start())
    with pytest.raises(HandshakeError):
        server.receive(data)


@SETTINGS
@given(st.binary(max_size=600))
def test_arbitrary_bytes_to_a_client_raise_only_handshake_errors(data: bytes) -> None:
    client = ClientHandshake(SITE_A, ROSTER)
    client.start()
    with pytest.raises(HandshakeError):
        client.receive(data)


@SETTINGS
@given(st.data())
def test_mutated_flights_never_complete_and_raise_only_protocol_errors(data: st.DataObject) -> None:
    client, server = pair()
    c1 = bytearray(client.start())
    flight = data.draw(st.sampled_from(["c1", "s1", "c2"]))
    pos = data.draw(st.integers(0, 10_000))
    bit = 1 << data.draw(st.integers(0, 7))
    try:
        if flight == "c1":
            c1[pos % len(c1)] ^= bit
        s1 = bytearray(server.receive(bytes(c1)) or b"")
        if flight == "s1":
            s1[pos % len(s1)] ^= bit
        c2 = bytearray(client.receive(bytes(s1)) or b"")
        if flight == "c2":
            c2[pos % len(c2)] ^= bit
        server.receive(bytes(c2))
    except ProtocolError:
        assert not server.done
        return
    # A flipped bit may land in a msgpack header and leave an equivalent message (for
    # example a suite list re-encoded): then both ends must agree on the keys.
    assert keys_match(client.keys, server.keys)
