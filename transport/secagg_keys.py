"""Secure-aggregation keys from the signed roster (``algorithms.secagg.keys.SecAggKeys``).

Every node already has one Ed25519 identity key, listed in the roster. Secure
aggregation converts both sides to X25519 (libsodium's ``crypto_sign_ed25519_sk_to_curve25519``
and ``..._pk_to_curve25519``, as ``transport.relay`` does; that module cites why the joint
use of one key pair is sound), so no new key or trust anchor is needed:

* ``pair_seed(peer, context)`` = BLAKE2b-256(key = X25519(my secret, peer's public),
  ``context``): both sides compute the same 32 bytes; the context binds it to one
  aggregator's cohort (``algorithms.secagg.keys.pair_context``). The X25519 result is
  cached per peer (and dropped when a new roster changes the peer's key);
* ``seal_to`` / ``open_from``: ``crypto_box`` (X25519 + XSalsa20-Poly1305) between the two
  static keys with a random 24-byte nonce prepended: authenticated both ways, so a box
  opens only for its recipient and only as coming from its sender;
* ``sign`` / ``verify``: Ed25519 with the identity key over ``b"fedloom/secagg/v1\\0" +
  message``, so a secure-aggregation signature never passes for any other signature
  the identity key makes (handshakes, updates, models, rosters, relayed envelopes);
* ``fresh_secret``: ``os.urandom(32)`` unless a source is given (the simulator's is seeded).

A peer the roster does not list raises ``SecAggKeyError`` from every method naming it.
``role(peer)`` is the roster's role for it (None for a plain key table given no roles):
a member accepts only sites as fellow members.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping

import nacl.bindings as sodium
import nacl.exceptions
import nacl.public
import nacl.signing

from fedloom.transport.identity import Identity, verify_signature
from fedloom.transport.roster import Roster

SIGN_PREFIX = b"fedloom/secagg/v1\0"
SEED_BYTES = 32


class SecAggCryptoError(ValueError):
    """A box did not open (tampered, misaddressed or from another sender), or a peer's key
    cannot be used."""


class SecAggKeyError(SecAggCryptoError):
    """The peer has no key in the roster (reason label ``unknown_key``)."""


class RosterSecAggKeys:
    """``SecAggKeys`` for ``node_id`` holding ``signing_key``, with peers' keys from
    ``roster`` (a ``Roster``, or a mapping node id -> Ed25519 public key for in-memory
    runs)."""

    __slots__ = (
        "_boxes",
        "_fresh",
        "_keys",
        "_roles",
        "_secret",
        "_shared",
        "_signing",
        "node_id",
    )

    def __init__(
        self,
        node_id: str,
        signing_key: nacl.signing.SigningKey | Identity,
        roster: Roster | Mapping[str, bytes],
        *,
        fresh_secret: Callable[[], bytes] | None = None,
        roles: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(signing_key, Identity):
            if signing_key.node_id != node_id:
                raise ValueError(
                    f"identity {signing_key.node_id!r} cannot hold keys for {node_id!r}"
                )
            signing_key = signing_key.signing_key
        if not isinstance(signing_key, nacl.signing.SigningKey):
            raise TypeError(f"signing_key must be a nacl SigningKey, got {type(signing_key)}")
        self.node_id = node_id
        self._signing = signing_key
        self._secret = nacl.public.PrivateKey(bytes(signing_key.to_curve25519_private_key()))
        self._fresh = fresh_secret if fresh_secret is not None else _urandom32
        self._keys: dict[str, bytes] = {}
        self._shared: dict[str, bytes] = {}
        self._boxes: dict[str, nacl.public.Box] = {}
        self._roles: dict[str, str] | None = None
        self.update_roster(roster, roles)

    def __repr__(self) -> str:
        return f"RosterSecAggKeys({self.node_id!r}, {len(self._keys)} peer key(s))"

    def update_roster(
        self, roster: Roster | Mapping[str, bytes], roles: Mapping[str, str] | None = None
    ) -> None:
        """Use ``roster``'s keys (and roles: a ``Roster``'s own, else ``roles``) from now on
        (cached secrets of peers whose key changed or who left are dropped)."""
        if isinstance(roster, Roster):
            keys = {e.node_id: e.public_key for e in roster.entries}
            self._roles = {e.node_id: e.role for e in roster.entries}
        else:
            keys = {str(k): bytes(v) for k, v in roster.items()}
            self._roles = None if roles is None else {str(k): str(v) for k, v in roles.items()}
        for peer in set(self._shared) | set(self._boxes):
            if keys.get(peer) != self._keys.get(peer):
                self._shared.pop(peer, None)
                self._boxes.pop(peer, None)
        self._keys = keys

    # ------------------------------------------------------------------ peers
    def _public(self, peer: str) -> bytes:
        key = self._keys.get(peer)
        if key is None:
            raise SecAggKeyError(f"unknown_key: {peer!r} has no key in the roster")
        return key

    def _peer_x25519(self, peer: str) -> bytes:
        public = self._public(peer)  # SecAggKeyError (a ValueError) before the try
        try:
            converted: bytes = sodium.crypto_sign_ed25519_pk_to_curve25519(public)
        except (nacl.exceptions.CryptoError, ValueError, TypeError, RuntimeError):
            raise SecAggCryptoError(f"{peer!r}'s roster key is not a usable public key") from None
        return converted

    def _shared_secret(self, peer: str) -> bytes:
        shared = self._shared.get(peer)
        if shared is None:
            if peer == self.node_id:
                raise ValueError("a node has no pair seed with itself")
            try:
                shared = sodium.crypto_scalarmult(bytes(self._secret), self._peer_x25519(peer))
            except (nacl.exceptions.CryptoError, RuntimeError):
                # A low-order point gives the all-zero result, which libsodium refuses.
                raise SecAggCryptoError(f"{peer!r}'s roster key gives no shared secret") from None
            self._shared[peer] = shared
        return shared

    def _box(self, peer: str) -> nacl.public.Box:
        box = self._boxes.get(peer)
        if box is None:
            try:
                box = nacl.public.Box(self._secret, nacl.public.PublicKey(self._peer_x25519(peer)))
            except (nacl.exceptions.CryptoError, RuntimeError):
                raise SecAggCryptoError(f"{peer!r}'s roster key gives no shared secret") from None
            self._boxes[peer] = box
        return box

    # ------------------------------------------------------------- SecAggKeys
    def pair_seed(self, peer: str, context: bytes) -> bytes:
        """BLAKE2b-256 keyed with X25519(me, peer), over ``context``."""
        return hashlib.blake2b(
            context, digest_size=SEED_BYTES, key=self._shared_secret(peer)
        ).digest()

    def seal_to(self, peer: str, plaintext: bytes) -> bytes:
        """``crypto_box`` from me to ``peer``: nonce (24 bytes) || ciphertext || tag."""
        return bytes(self._box(peer).encrypt(bytes(plaintext)))

    def open_from(self, peer: str, boxed: bytes) -> bytes:
        """What ``peer`` sealed to me; ``SecAggCryptoError`` if the box does not open."""
        box = self._box(peer)
        if not isinstance(boxed, bytes | bytearray | memoryview):
            raise SecAggCryptoError(f"box from {peer!r} is not bytes")
        try:
            return bytes(box.decrypt(bytes(boxed)))
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise SecAggCryptoError(f"box from {peer!r} does not open") from None

    def sign(self, message: bytes) -> bytes:
        """Ed25519 over ``SIGN_PREFIX + message`` (64 bytes)."""
        return bytes(self._signing.sign(SIGN_PREFIX + bytes(message)).signature)

    def verify(self, peer: str, message: bytes, sig: bytes) -> bool:
        """True when ``sig`` is ``peer``'s ``sign(message)``; ``SecAggKeyError`` for a peer
        the roster does not list."""
        public = self._public(peer)
        if not isinstance(sig, bytes) or not isinstance(message, bytes | bytearray | memoryview):
            return False
        return verify_signature(public, SIGN_PREFIX + bytes(message), sig)

    def role(self, peer: str) -> str | None:
        """``peer``'s roster role; None when this table has no roles. ``SecAggKeyError``
        for a peer without a key."""
        self._public(peer)
        return None if self._roles is None else self._roles.get(peer)

    def fresh_secret(self) -> bytes:
        secret = self._fresh()
        if not isinstance(secret, bytes) or len(secret) != SEED_BYTES:
            raise ValueError(f"fresh_secret source must give {SEED_BYTES} bytes")
        return secret


def _urandom32() -> bytes:
    return os.urandom(SEED_BYTES)
