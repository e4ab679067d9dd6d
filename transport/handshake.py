"""Mutually authenticated, forward-secret channel handshake (sans-I/O).

SIGMA-style signed ephemeral Diffie-Hellman (Krawczyk, "SIGMA: the 'SIGn-and-MAc'
approach to authenticated Diffie-Hellman", CRYPTO 2003), three flights::

    client -> server  c1 {t, v, suites, id, role, pk, kx, n}
    server -> client  s1 {t, v, suite, id, role, pk, kx, n, sig}
    client -> server  c2 {t, sig}

``pk`` is the Ed25519 identity key, ``kx`` a fresh X25519 (``crypto_kx``) public key and
``n`` a fresh 32-byte nonce. The transcript hash is a BLAKE2b chain over every field of
c1, every field of s1 (version and suites included), then the server's signature. The
server signs the hash after s1's fields, the client the hash after the server's
signature, each under its own context string (no reflection). Identities are checked
against the roster as soon as they are claimed (c1 for the client, s1 for the server),
and proven by the signatures. Fresh nonces and ephemeral keys on both sides make every
transcript unique, so a replayed or spliced flight fails a signature check.

Session keys: ``crypto_kx_{client,server}_session_keys`` give one raw key per direction;
each is bound to the final transcript hash with keyed BLAKE2b under a per-direction
personalisation string. Nothing here reads a clock: the caller enforces
``HANDSHAKE_TIMEOUT_S`` and caps concurrent unauthenticated handshakes.

Every failure raises ``HandshakeError`` (``PeerRefused`` for roster decisions) and leaves
the object failed: later calls raise again.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import nacl.bindings
import nacl.exceptions

from fedloom.transport.errors import HandshakeError as HandshakeError  # re-exported
from fedloom.transport.errors import PeerRefused as PeerRefused  # re-exported
from fedloom.transport.errors import ProtocolError, describe
from fedloom.transport.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, verify_signature
from fedloom.transport.records import CIPHERS, available_ciphers, preferred_ciphers, unavailable
from fedloom.transport.roster import Roster
from fedloom.transport.strict_msgpack import unpack_strict

HANDSHAKE_TIMEOUT_S = 10.0
MAX_HANDSHAKE_MESSAGE = 4096
HANDSHAKE_VERSION = 1
_SUITE_PREFIX = "x25519-ed25519-blake2b-"
# Every suite this node speaks: key exchange, identity signatures and key binding are
# fixed; the record cipher (``transport.records``) is what the suites differ in.
SUITES: tuple[str, ...] = tuple(_SUITE_PREFIX + cipher for cipher in CIPHERS)
NONCE_BYTES = 32
SESSION_KEY_BYTES = 32

_MAX_SUITES = 8
_MAX_STR = 256
_SERVER_CONTEXT = b"fedloom handshake v1: server signature\x00"
_CLIENT_CONTEXT = b"fedloom handshake v1: client signature\x00"
_TRANSCRIPT_PERSON = b"fedloom-hs-v1"
_C2S_PERSON = b"fedloom-c2s-key"
_S2C_PERSON = b"fedloom-s2c-key"

_P = 2**255 - 19
# X25519 public keys of small order (as in libsodium's blocklist), compared with the top
# bit cleared: 0, 1, two points of order 8, p - 1, p and p + 1 (non-canonical 0 and 1).
_LOW_ORDER_POINTS = frozenset(
    u.to_bytes(32, "little")
    for u in (
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P - 1,
        _P,
        _P + 1,
    )
)


def is_low_order(public_key: bytes) -> bool:
    """True for the all-zero key and every small-order (or non-canonical small-order)
    X25519 point: a shared secret with one of these is predictable."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return True
    return public_key[:31] + bytes((public_key[31] & 0x7F,)) in _LOW_ORDER_POINTS


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Per-direction record keys and the authenticated peer (never persisted)."""

    send_key: bytes
    recv_key: bytes
    peer_id: str
    peer_role: str
    transcript_hash: bytes
    cipher: str  # the record cipher both sides agreed on (``transport.records.CIPHERS``)

    def __repr__(self) -> str:  # keep keys out of logs
        return (
            f"SessionKeys(peer_id={self.peer_id!r}, peer_role={self.peer_role!r}, "
            f"cipher={self.cipher!r})"
        )


def suites_for(ciphers: Sequence[str] | None = None) -> tuple[str, ...]:
    """Handshake suites for record ciphers in order of preference (default: the fastest
    first on this CPU, ``transport.records.preferred_ciphers``). A cipher this process
    cannot use (``transport.records.available_ciphers``: AEGIS-256 where libsodium lacks
    it) is left out, so it is neither offered nor accepted; ValueError if none is left."""
    chosen = preferred_ciphers() if ciphers is None else tuple(ciphers)
    unknown = [c for c in chosen if c not in CIPHERS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"record ciphers must be distinct names from {', '.join(CIPHERS)}; got {list(chosen)}"
        )
    usable = available_ciphers()
    kept = [c for c in chosen if c in usable]
    if not kept:
        why = "; ".join(f"{c}: {unavailable(c)}" for c in chosen)
        raise ValueError(f"none of the record ciphers {list(chosen)} is available here ({why})")
    return tuple(_SUITE_PREFIX + c for c in kept)


def _cipher_of(suite: str) -> str:
    return suite.removeprefix(_SUITE_PREFIX)


class _State(enum.Enum):
    START = "start"
    AWAIT_SERVER_HELLO = "await_server_hello"
    AWAIT_CLIENT_HELLO = "await_client_hello"
    AWAIT_CLIENT_FINISH = "await_client_finish"
    DONE = "done"
    FAILED = "failed"


# ------------------------------------------------------------------ message codec


def _pack(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _unpack(
    data: bytes | bytearray | memoryview, kind: str, keys: frozenset[str]
) -> dict[str, Any]:
    size = memoryview(data).nbytes
    if size > MAX_HANDSHAKE_MESSAGE:
        raise HandshakeError(
            f"{kind}: handshake message of {size} bytes, limit {MAX_HANDSHAKE_MESSAGE}"
        )
    obj = unpack_strict(
        data,
        what=f"{kind} handshake message",
        error=HandshakeError,
        max_str=_MAX_STR,
        max_bin=SIGNATURE_BYTES,
        max_array=_MAX_SUITES,
        max_map=16,
    )
    if type(obj) is not dict:
        raise HandshakeError(f"{kind}: a handshake message must be a msgpack map")
    if obj.get("t") != kind:
        raise HandshakeError(f"expected handshake message {kind!r}, got {describe(obj.get('t'))}")
    if obj.keys() != keys:
        missing = sorted(keys - obj.keys())
        problem = f"missing {missing[0]!r}" if missing else "unexpected fields"
        raise HandshakeError(f"{kind}: garbled handshake message ({problem})")
    return obj


def _field_str(msg: dict[str, Any], kind: str, name: str) -> str:
    value = msg[name]
    if type(value) is not str:
        raise HandshakeError(f"{kind}.{name} must be a string")
    return value


def _field_bytes(msg: dict[str, Any], kind: str, name: str, size: int) -> bytes:
    value = msg[name]
    if type(value) is not bytes or len(value) != size:
        raise HandshakeError(f"{kind}.{name} must be {size} bytes")
    return value


def _field_version(msg: dict[str, Any], kind: str) -> int:
    version = msg["v"]
    if type(version) is not int or version != HANDSHAKE_VERSION:
        raise HandshakeError(
            f"{kind}: unsupported handshake version {describe(version)} "
            f"(this node speaks {HANDSHAKE_VERSION})"
        )
    return version


def _field_kx(msg: dict[str, Any], kind: str) -> bytes:
    kx = _field_bytes(msg, kind, "kx", PUBLIC_KEY_BYTES)
    if is_low_order(kx):
        raise HandshakeError(f"{kind}: all-zero or low-order ephemeral public key")
    return kx


_C1_KEYS = frozenset(("t", "v", "suites", "id", "role", "pk", "kx", "n"))
_S1_KEYS = frozenset(("t", "v", "suite", "id", "role", "pk", "kx", "n", "sig"))
_C2_KEYS = frozenset(("t", "sig"))


# ------------------------------------------------------------------ shared helpers


def _transcript() -> Any:  # hashlib's blake2b type is private
    return hashlib.blake2b(digest_size=32, person=_TRANSCRIPT_PERSON)


def _bind(raw_key: bytes, transcript_hash: bytes, person: bytes) -> bytes:
    return hashlib.blake2b(
        transcript_hash, digest_size=SESSION_KEY_BYTES, key=raw_key, person=person
    ).digest()


def _check_role(entry_role: str, allowed: frozenset[str] | None, peer: str) -> None:
    if allowed is not None and entry_role not in allowed:
        raise PeerRefused(
            f"{peer!r} has role {entry_role!r}, which may not connect here "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


def _shared_secret_ok(secret_key: bytes, peer_kx: bytes) -> None:
    # crypto_kx refuses an all-zero shared secret itself; this check states it explicitly.
    try:
        shared = nacl.bindings.crypto_scalarmult(secret_key, peer_kx)
    except nacl.exceptions.CryptoError:
        raise HandshakeError("low-order ephemeral public key (all-zero shared secret)") from None
    if not any(shared):
        raise HandshakeError("low-order ephemeral public key (all-zero shared secret)")


class _Base:
    __slots__ = (
        "_allowed",
        "_identity",
        "_keys",
        "_kx_pk",
        "_kx_sk",
        "_nonce",
        "_roster",
        "_state",
        "_suites",
    )

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        allowed_roles: Collection[str] | None,
        ciphers: Sequence[str] | None,
    ) -> None:
        if not isinstance(identity, Identity):
            raise TypeError(f"identity must be an Identity, got {type(identity).__name__}")
        if not isinstance(roster, Roster):
            raise TypeError(f"roster must be a Roster, got {type(roster).__name__}")
        self._identity = identity
        self._roster = roster
        self._allowed = None if allowed_roles is None else frozenset(allowed_roles)
        self._suites = suites_for(ciphers)
        self._kx_pk, self._kx_sk = nacl.bindings.crypto_kx_keypair()
        self._nonce = os.urandom(NONCE_BYTES)
        self._keys: SessionKeys | None = None
        self._state = _State.START

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    @property
    def failed(self) -> bool:
        return self._state is _State.FAILED

    @property
    def keys(self) -> SessionKeys:
        if self._keys is None:
            raise ValueError("the handshake has not completed")
        return self._keys

    def _fail(self) -> None:
        self._state = _State.FAILED
        self._kx_sk = b""  # forget the ephemeral secret as soon as it is useless

    def _finish(self, keys: SessionKeys) -> None:
        self._keys = keys
        self._state = _State.DONE
        self._kx_sk = b""


class ClientHandshake(_Base):
    """The dialling side (a site, or a region dialling the root)."""

    __slots__ = ("_c1_fields", "_expected_peer")

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        expected_peer: str | None = None,
        *,
        allowed_roles: Collection[str] | None = None,
        ciphers: Sequence[str] | None = None,
    ) -> None:
        """``ciphers``: the record ciphers to offer, preferred first (default: all, the
        fastest on this CPU first)."""
        super().__init__(identity, roster, allowed_roles, ciphers)
        self._expected_peer = expected_peer
        self._c1_fields: list[Any] = []

    def start(self) -> bytes:
        """The first flight (c1)."""
        if self._state is not _State.START:
            raise ValueError("start() may be called once")
        ident = self._identity
        self._c1_fields = [
            "c1",
            HANDSHAKE_VERSION,
            list(self._suites),
            ident.node_id,
            ident.role,
            ident.public_key,
            self._kx_pk,
            self._nonce,
        ]
        self._state = _State.AWAIT_SERVER_HELLO
        return _pack(
            dict(
                zip(
                    ("t", "v", "suites", "id", "role", "pk", "kx", "n"),
                    self._c1_fields,
                    strict=True,
                )
            )
        )

    def receive(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """Take the server's flight (s1); return the last flight (c2) to send."""
        if self._state is _State.START:
            raise ValueError("call start() before receive()")
        if self._state is _State.FAILED:
            raise HandshakeError("the handshake already failed")
        if self._state is _State.DONE:
            raise HandshakeError("unexpected handshake message after the handshake completed")
        try:
            return self._on_server_hello(data)
        except ProtocolError:
            self._fail()
            raise

    def _on_server_hello(self, data: bytes | bytearray | memoryview) -> bytes:
        msg = _unpack(data, "s1", _S1_KEYS)
        version = _field_version(msg, "s1")
        suite = _field_str(msg, "s1", "suite")
        if suite not in self._suites:
            raise HandshakeError(f"s1: server chose suite {describe(suite)}, which was not offered")
        peer_id = _field_str(msg, "s1", "id")
        role = _field_str(msg, "s1", "role")
        pk = _field_bytes(msg, "s1", "pk", PUBLIC_KEY_BYTES)
        kx = _field_kx(msg, "s1")
        nonce = _field_bytes(msg, "s1", "n", NONCE_BYTES)
        sig = _field_bytes(msg, "s1", "sig", SIGNATURE_BYTES)
        if self._expected_peer is not None and peer_id != self._expected_peer:
            raise PeerRefused(
                f"dialled {self._expected_peer!r} but the server is {describe(peer_id)}"
            )
        entry = self._roster.check(peer_id, role, pk)
        _check_role(entry.role, self._allowed, peer_id)

        transcript = _transcript()
        transcript.update(_pack(self._c1_fields))
        transcript.update(_pack(["s1", version, suite, peer_id, role, pk, kx, nonce]))
        if not verify_signature(pk, _SERVER_CONTEXT + transcript.digest(), sig):
            raise HandshakeError(
                f"s1: signature of {peer_id!r} does not verify (substituted or replayed flight)"
            )
        transcript.update(sig)
        client_sig = self._identity.sign(_CLIENT_CONTEXT + transcript.digest())
        transcript.update(client_sig)
        transcript_hash: bytes = transcript.digest()

        _shared_secret_ok(self._kx_sk, kx)
        try:
            rx, tx = nacl.bindings.crypto_kx_client_session_keys(self._kx_pk, self._kx_sk, kx)
        except nacl.exceptions.CryptoError:
            raise HandshakeError("s1: key exchange failed (low-order ephemeral key)") from None
        self._finish(
            SessionKeys(
                send_key=_bind(tx, transcript_hash, _C2S_PERSON),
                recv_key=_bind(rx, transcript_hash, _S2C_PERSON),
                peer_id=peer_id,
                peer_role=role,
                transcript_hash=transcript_hash,
                cipher=_cipher_of(suite),
            )
        )
        return _pack({"t": "c2", "sig": client_sig})


class ServerHandshake(_Base):
    """The listening side (an aggregator)."""

    __slots__ = ("_client_kx", "_peer_id", "_peer_pk", "_peer_role", "_suite", "_transcript")

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        *,
        allowed_roles: Collection[str] | None = None,
        ciphers: Sequence[str] | None = None,
    ) -> None:
        """``ciphers``: the record ciphers to accept (default: all); the client's order
        of preference decides among them."""
        super().__init__(identity, roster, allowed_roles, ciphers)
        self._state = _State.AWAIT_CLIENT_HELLO
        self._suite = ""
        self._transcript: Any = None
        self._client_kx = b""
        self._peer_id = ""
        self._peer_role = ""
        self._peer_pk = b""

    def receive(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """c1 -> returns s1; c2 -> returns None and the handshake is done."""
        if self._state is _State.FAILED:
            raise HandshakeError("the handshake already failed")
        if self._state is _State.DONE:
            raise HandshakeError("unexpected handshake message after the handshake completed")
        try:
            if self._state is _State.AWAIT_CLIENT_HELLO:
                return self._on_client_hello(data)
            self._on_client_finish(data)
            return None
        except ProtocolError:
            self._fail()
            raise

    def _on_client_hello(self, data: bytes | bytearray | memoryview) -> bytes:
        msg = _unpack(data, "c1", _C1_KEYS)
        version = _field_version(msg, "c1")
        suites = msg["suites"]
        if type(suites) is not list or not all(type(s) is str for s in suites):
            raise HandshakeError("c1.suites must be a list of strings")
        chosen = next((s for s in suites if s in self._suites), None)
        if chosen is None:
            offered = ", ".join(repr(s[:80]) for s in suites[:_MAX_SUITES]) or "none"
            raise HandshakeError(
                f"c1: no common cipher suite (offered {offered}; "
                f"this node accepts {', '.join(self._suites)})"
            )
        peer_id = _field_str(msg, "c1", "id")
        role = _field_str(msg, "c1", "role")
        pk = _field_bytes(msg, "c1", "pk", PUBLIC_KEY_BYTES)
        kx = _field_kx(msg, "c1")
        nonce = _field_bytes(msg, "c1", "n", NONCE_BYTES)
        # Refuse unknown peers before doing any signing work for them.
        entry = self._roster.check(peer_id, role, pk)
        _check_role(entry.role, self._allowed, peer_id)
        _shared_secret_ok(self._kx_sk, kx)

        ident = self._identity
        s1_fields = [
            "s1",
            HANDSHAKE_VERSION,
            chosen,
            ident.node_id,
            ident.role,
            ident.public_key,
            self._kx_pk,
            self._nonce,
        ]
        transcript = _transcript()
        transcript.update(_pack(["c1", version, suites, peer_id, role, pk, kx, nonce]))
        transcript.update(_pack(s1_fields))
        sig = ident.sign(_SERVER_CONTEXT + transcript.digest())
        transcript.update(sig)
        self._transcript = transcript
        self._client_kx = kx
        self._peer_id, self._peer_role, self._peer_pk = peer_id, role, pk
        self._suite = chosen
        self._state = _State.AWAIT_CLIENT_FINISH
        reply = dict(
            zip(("t", "v", "suite", "id", "role", "pk", "kx", "n"), s1_fields, strict=True)
        )
        reply["sig"] = sig
        return _pack(reply)

    def _on_client_finish(self, data: bytes | bytearray | memoryview) -> None:
        msg = _unpack(data, "c2", _C2_KEYS)
        sig = _field_bytes(msg, "c2", "sig", SIGNATURE_BYTES)
        transcript = self._transcript
        if not verify_signature(self._peer_pk, _CLIENT_CONTEXT + transcript.digest(), sig):
            raise HandshakeError(
                f"c2: signature of {self._peer_id!r} does not verify "
                "(substituted or replayed flight)"
            )
        transcript.update(sig)
        transcript_hash: bytes = transcript.digest()
        try:
            rx, tx = nacl.bindings.crypto_kx_server_session_keys(
                self._kx_pk, self._kx_sk, self._client_kx
            )
        except nacl.exceptions.CryptoError:
            raise HandshakeError("c2: key exchange failed (low-order ephemeral key)") from None
        self._finish(
            SessionKeys(
                send_key=_bind(tx, transcript_hash, _S2C_PERSON),
                recv_key=_bind(rx, transcript_hash, _C2S_PERSON),
                peer_id=self._peer_id,
                peer_role=self._peer_role,
                transcript_hash=transcript_hash,
                cipher=_cipher_of(self._suite),
            )
        )


def keys_match(a: SessionKeys, b: SessionKeys) -> bool:
    """True when two ends derived matching keys (tests and diagnostics)."""
    return hmac.compare_digest(a.send_key, b.recv_key) and hmac.compare_digest(
        a.recv_key, b.send_key
    )
