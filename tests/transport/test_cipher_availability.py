"""AEGIS-256 is offered only where libsodium has it; secretstream otherwise, with any peer.

``transport.records`` calls AEGIS-256 through PyNaCl's cffi module (``nacl._sodium``),
which PyNaCl does not promise to keep and which has no AEGIS before PyNaCl 1.6. The
``no_aegis`` fixture hides it the way such a PyNaCl would: the module's ``lib`` loses
one AEGIS function, and the probe (``aegis_available``) runs again against it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from fedloom.transport import records
from fedloom.transport.channel import ChannelOptions
from fedloom.transport.handshake import (
    ClientHandshake,
    HandshakeError,
    ServerHandshake,
    suites_for,
)
from fedloom.transport.identity import Identity
from fedloom.transport.records import (
    CIPHER_AEGIS256,
    CIPHER_SECRETSTREAM,
    RecordReceiver,
    RecordSender,
)
from fedloom.transport.roster import Roster, RosterEntry
from tests.transport.cipher_params import needs_aegis
from tests.transport.link_pairs import LINK_KINDS, channel_pair, link_pair, make_pki

ROOT = Identity.generate("root", "root")
SITE = Identity.generate("site-a", "site")
ROSTER = Roster(2, [RosterEntry(i.node_id, i.role, i.public_key) for i in (ROOT, SITE)])
TIMEOUT_S = 10.0


class _Without:
    """A libsodium binding missing some names (a PyNaCl that bundles an older libsodium)."""

    def __init__(self, inner: Any, *missing: str) -> None:
        self._inner = inner
        self._missing = set(missing)

    def __getattr__(self, name: str) -> Any:
        if name in self._missing:
            raise AttributeError(name)
        return getattr(self._inner, name)


class _Reporting:
    """A libsodium binding whose AEGIS reports another tag size (a different variant)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "crypto_aead_aegis256_abytes":
            return lambda: 16
        return getattr(self._inner, name)


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    """The probe runs again in the test, and again after it (its result is cached)."""
    records.aegis_available.cache_clear()
    yield
    records.aegis_available.cache_clear()


@pytest.fixture
def no_aegis(monkeypatch: pytest.MonkeyPatch, fresh_probe: None) -> None:
    monkeypatch.setattr(records, "lib", _Without(records.lib, "crypto_aead_aegis256_decrypt"))
    assert not records.aegis_available()


def handshake(client: ClientHandshake, server: ServerHandshake) -> tuple[Any, Any]:
    c2 = client.receive(server.receive(client.start()) or b"")
    assert c2 is not None and server.receive(c2) is None
    return client.keys, server.keys


def exchange(sender_keys: Any, receiver_keys: Any, message: bytes) -> bytes:
    """``message`` sealed under one end's keys and opened under the other's."""
    sender = RecordSender(sender_keys.send_key, cipher=sender_keys.cipher)
    receiver = RecordReceiver(receiver_keys.recv_key, cipher=receiver_keys.cipher)
    receiver.start(sender.header())
    out = bytearray()
    for at in range(0, len(message), records.CHUNK_SIZE):
        chunk = message[at : at + records.CHUNK_SIZE]
        last = at + records.CHUNK_SIZE >= len(message)
        opened, end = receiver.open(sender.seal(chunk, last=last, now=0.0))
        out += opened
        assert end == last
    return bytes(out)


MESSAGE = bytes(range(256)) * 5000  # 1.2 MiB: two records


# ------------------------------------------------------------------ the probe


@needs_aegis
def test_this_pynacl_has_aegis(fresh_probe: None) -> None:
    assert records.aegis_missing() == ()
    assert records.aegis_available()
    assert records.available_ciphers() == records.CIPHERS


@pytest.mark.parametrize(
    ("binding", "named"),
    [
        (lambda lib: _Without(lib, "crypto_aead_aegis256_encrypt"), "crypto_aead_aegis256_encrypt"),
        (lambda lib: _Without(lib, "crypto_aead_aegis256_decrypt"), "crypto_aead_aegis256_decrypt"),
        (lambda lib: _Without(lib, "crypto_aead_aegis256_npubbytes"), "npubbytes"),
        (_Reporting, "abytes() == 32 (says 16)"),
    ],
)
def test_the_probe_names_what_libsodium_lacks(binding: Any, named: str) -> None:
    missing = records.aegis_missing(sodium_lib=binding(records.lib))
    assert missing and any(named in m for m in missing), missing


def test_without_pynacls_cffi_module_aegis_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "lib", None)  # as the guarded import leaves it
    assert records.aegis_missing() == ("nacl._sodium (ffi, lib)",)


def test_a_libsodium_without_aegis_is_reported_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_probe: None
) -> None:
    monkeypatch.setattr(records, "lib", _Without(records.lib, "crypto_aead_aegis256_encrypt"))
    with caplog.at_level(logging.WARNING, logger=records.__name__):
        for _ in range(3):
            assert records.available_ciphers() == (CIPHER_SECRETSTREAM,)
            assert records.preferred_ciphers() == (CIPHER_SECRETSTREAM,)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "crypto_aead_aegis256_encrypt" in warnings[0]


# ------------------------------------------------------------------ AEGIS present


@needs_aegis
def test_with_aegis_both_ends_negotiate_it_and_exchange_records(fresh_probe: None) -> None:
    client = ClientHandshake(SITE, ROSTER, ciphers=[CIPHER_AEGIS256, CIPHER_SECRETSTREAM])
    client_keys, server_keys = handshake(client, ServerHandshake(ROOT, ROSTER))
    assert client_keys.cipher == server_keys.cipher == CIPHER_AEGIS256
    assert exchange(client_keys, server_keys, MESSAGE) == MESSAGE
    assert exchange(server_keys, client_keys, MESSAGE[:1000]) == MESSAGE[:1000]


# ------------------------------------------------------------------ AEGIS hidden


@pytest.mark.usefixtures("no_aegis")
def test_without_aegis_it_is_neither_offered_nor_accepted() -> None:
    c1 = msgpack.unpackb(ClientHandshake(SITE, ROSTER).start(), raw=False)
    assert [s for s in c1["suites"] if "aegis" in s] == []
    # A preference that names AEGIS first offers the rest.
    assert suites_for([CIPHER_AEGIS256, CIPHER_SECRETSTREAM]) == suites_for([CIPHER_SECRETSTREAM])
    with pytest.raises(ValueError, match="crypto_aead_aegis256_decrypt"):
        suites_for([CIPHER_AEGIS256])
    with pytest.raises(ValueError, match="not available here"):
        RecordSender(bytes(32), cipher=CIPHER_AEGIS256)
    with pytest.raises(ValueError, match="available here"):
        ChannelOptions(ciphers=(CIPHER_AEGIS256,))
    assert RecordSender(bytes(32)).cipher == CIPHER_SECRETSTREAM  # the default follows


@pytest.mark.usefixtures("no_aegis")
def test_without_aegis_both_ends_negotiate_secretstream_and_exchange_records() -> None:
    client = ClientHandshake(SITE, ROSTER, ciphers=[CIPHER_AEGIS256, CIPHER_SECRETSTREAM])
    client_keys, server_keys = handshake(client, ServerHandshake(ROOT, ROSTER))
    assert client_keys.cipher == server_keys.cipher == CIPHER_SECRETSTREAM
    assert exchange(client_keys, server_keys, MESSAGE) == MESSAGE
    assert exchange(server_keys, client_keys, MESSAGE[:1000]) == MESSAGE[:1000]


AEGIS_SUITE = "x25519-ed25519-blake2b-" + CIPHER_AEGIS256
SECRETSTREAM_SUITE = "x25519-ed25519-blake2b-" + CIPHER_SECRETSTREAM


def rewritten(message: bytes, **fields: Any) -> bytes:
    """A handshake message with ``fields`` replaced: what a hostile peer sends."""
    packed: bytes = msgpack.packb({**msgpack.unpackb(message, raw=False), **fields})
    return packed


@pytest.mark.usefixtures("no_aegis")
@pytest.mark.parametrize(
    "suites",
    [[AEGIS_SUITE], ["x25519-ed25519-blake2b-rot13"], ["bogus"], [AEGIS_SUITE.upper()], []],
    ids=["aegis-only", "unknown-cipher", "unknown-suite", "aegis-uppercase", "none"],
)
def test_without_aegis_a_client_offering_only_aegis_or_unknown_suites_is_refused(
    suites: list[str],
) -> None:
    c1 = rewritten(ClientHandshake(SITE, ROSTER).start(), suites=suites)
    server = ServerHandshake(ROOT, ROSTER, ciphers=[CIPHER_AEGIS256, CIPHER_SECRETSTREAM])
    with pytest.raises(HandshakeError, match="accepts " + SECRETSTREAM_SUITE + r"\)"):
        server.receive(c1)
    with pytest.raises(HandshakeError):  # and it stays failed
        server.receive(ClientHandshake(SITE, ROSTER).start())


@pytest.mark.usefixtures("no_aegis")
def test_without_aegis_a_client_preferring_unknown_suites_gets_secretstream() -> None:
    c1 = rewritten(
        ClientHandshake(SITE, ROSTER).start(),
        suites=["bogus", AEGIS_SUITE, SECRETSTREAM_SUITE],
    )
    s1 = ServerHandshake(ROOT, ROSTER).receive(c1)
    assert s1 is not None
    assert msgpack.unpackb(s1, raw=False)["suite"] == SECRETSTREAM_SUITE


@pytest.mark.usefixtures("no_aegis")
@pytest.mark.parametrize("suite", [AEGIS_SUITE, "bogus"])
def test_without_aegis_a_server_choosing_aegis_or_an_unknown_suite_is_refused(suite: str) -> None:
    client = ClientHandshake(SITE, ROSTER, ciphers=[CIPHER_AEGIS256, CIPHER_SECRETSTREAM])
    s1 = ServerHandshake(ROOT, ROSTER).receive(client.start())
    assert s1 is not None
    with pytest.raises(HandshakeError, match="which was not offered"):
        client.receive(rewritten(s1, suite=suite))
    with pytest.raises(HandshakeError):  # the genuine answer no longer completes it
        client.receive(s1)


@pytest.mark.parametrize("without", ["client", "server"])
@needs_aegis
def test_mixed_peers_agree_on_secretstream(
    without: str, monkeypatch: pytest.MonkeyPatch, fresh_probe: None
) -> None:
    # Each end fixes what it offers or accepts when it is made: the end without AEGIS is
    # made while it is hidden, the other once it is back (as two processes would be).
    prefer_aegis = [CIPHER_AEGIS256, CIPHER_SECRETSTREAM]
    with monkeypatch.context() as hidden:
        hidden.setattr(records, "lib", _Without(records.lib, "crypto_aead_aegis256_encrypt"))
        records.aegis_available.cache_clear()
        poor: ClientHandshake | ServerHandshake = (
            ClientHandshake(SITE, ROSTER, ciphers=prefer_aegis)
            if without == "client"
            else ServerHandshake(ROOT, ROSTER, ciphers=prefer_aegis)
        )
    records.aegis_available.cache_clear()
    assert records.aegis_available()
    if isinstance(poor, ClientHandshake):
        client, server = poor, ServerHandshake(ROOT, ROSTER, ciphers=prefer_aegis)
    else:
        client, server = ClientHandshake(SITE, ROSTER, ciphers=prefer_aegis), poor
    client_keys, server_keys = handshake(client, server)
    assert client_keys.cipher == server_keys.cipher == CIPHER_SECRETSTREAM
    assert exchange(client_keys, server_keys, MESSAGE) == MESSAGE
    assert exchange(server_keys, client_keys, MESSAGE) == MESSAGE


@pytest.mark.usefixtures("no_aegis")
@pytest.mark.parametrize("kind", LINK_KINDS)
async def test_without_aegis_secure_channels_carry_messages(kind: str) -> None:
    pki = make_pki()
    async with asyncio.timeout(TIMEOUT_S), link_pair(kind) as (a, b):
        client, server = await channel_pair(a, b, pki)
        try:
            assert client.cipher == server.cipher == CIPHER_SECRETSTREAM
            await client.send_message(MESSAGE)
            assert bytes(await server.recv_message()) == MESSAGE
            await server.send_message(b"ok")
            assert bytes(await client.recv_message()) == b"ok"
        finally:
            await asyncio.gather(client.close(), server.close())  # each answers the other
