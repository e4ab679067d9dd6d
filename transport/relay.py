"""End-to-end encrypted and signed envelopes for messages that travel through a relay.

A gossip peer that accepts no inbound connections reaches a neighbour like itself
through a relay (``algorithms.relay``). The sender encodes the inner message exactly as
it would send it directly (``wire.encode`` with its codec), encrypts the bytes to the
destination, and wraps them in ``Relayed(src, dst, seq, payload, sig)``:

* ``payload`` = ``epk || AEAD ciphertext || tag``. ``epk`` is a fresh X25519 key for this
  envelope alone; the AEAD (XChaCha20-Poly1305 IETF) key and nonce are
  ``BLAKE2b(X25519(esk, dst_x) || epk || dst_x, person="fedloom-relay-v2")``, where
  ``dst_x`` is the destination's roster key (Ed25519) converted to X25519, and the
  associated data is ``["fedloom-relay-v2", src, dst, seq]``. Only ``dst`` can open it
  (ECIES, like libsodium's sealed box); the ephemeral key is discarded once sealed, so a
  later theft of the sender's key opens nothing (the destination's key would);
* ``sig`` is ``src``'s Ed25519 signature of ``["fedloom-relay-v2", src, dst, seq,
  SHA-256(payload)]``: it covers the ciphertext and the ephemeral key, so it is checked
  before anything is decrypted, and a relay cannot re-encrypt, re-sign or renumber.

The payload travels as a ``uint8`` tensor, so a large share is streamed record by record
like any other tensor message; sealing and opening each make one copy of it.

The relay authenticates only its hops and sees ciphertext. The destination checks:

* the signature, against ``src``'s roster key (a relay cannot forge or alter);
* ``dst`` is itself (a relay cannot redirect a share to another peer);
* ``seq`` is above the last one accepted from ``src`` (a relay cannot replay). The
  receiver keeps that floor durably (``runtime.relay_seq``: written before the message is
  delivered, so it holds across restarts); senders number envelopes
  ``max(last + 1, time_ns())`` from a floor they also keep durably;
* the ciphertext opens with its own key and the associated data (a relay cannot swap
  ``epk``, the ciphertext, ``src``, ``dst`` or ``seq`` without the signature failing, and a
  sender's envelope for one peer opens for no other);
* the inner message decodes under the receiver's limits and names ``src`` as its own
  source (a peer cannot speak in another's name inside a valid envelope).

The signing identity key doubles as the encryption key (Ed25519 -> X25519, libsodium's
conversion): the roster has one key per node. That joint use is proven secure for
hashed-ECDH encryption (Thormarker, "On using the same key pair for Ed25519 and an X25519
based KEM", 2021); the domain labels keep a relay signature from ever passing for an
update, model, roster or handshake signature (``transport.e2e``, ``transport.handshake``).

``RelayInbox.open`` is ``unseal`` (pure: may run in a thread) then ``admit`` (the floor's
check-and-set: run it where envelopes are serialised, i.e. on the event loop).
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar, TypeAlias

import msgpack
import nacl.bindings as sodium
import nacl.exceptions
import numpy as np
import numpy.typing as npt

from fedloom.transport import wire
from fedloom.transport.e2e import ReplayedUpdateError, SignatureError
from fedloom.transport.errors import MalformedMessage, ProtocolError
from fedloom.transport.identity import Identity, verify_signature
from fedloom.transport.limits import Limits
from fedloom.transport.roster import Roster
from fedloom.transport.tensors import DEFAULT_SPEC, CodecSpec

_RELAY_LABEL = "fedloom-relay-v2"  # v2: the payload is encrypted (v1 carried it in clear)
_KDF_PERSON = b"fedloom-relay-v2"  # BLAKE2b personalisation (16 bytes) of the envelope key
EPK_BYTES = 32
_KEY_BYTES: int = sodium.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
_NONCE_BYTES: int = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_ABYTES: int = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES
OVERHEAD = EPK_BYTES + _ABYTES  # payload bytes beyond the encoded inner message
PAYLOAD = "payload"  # the name of the one tensor a Relayed message carries
Relayable: TypeAlias = wire.GossipShare | wire.Heartbeat  # what gossip peers exchange


class RedirectedError(ProtocolError):
    """A relayed envelope addressed to another node."""

    reason: ClassVar[str] = "redirected"


class UndecryptableError(ProtocolError):
    """A signed envelope whose ciphertext does not open with this node's key."""

    reason: ClassVar[str] = "undecryptable"


def relay_signed_bytes(src: str, dst: str, seq: int, digest: bytes) -> bytes:
    packed: bytes = msgpack.packb([_RELAY_LABEL, src, dst, seq, digest], use_bin_type=True)
    return packed


def relay_associated_data(src: str, dst: str, seq: int) -> bytes:
    packed: bytes = msgpack.packb([_RELAY_LABEL, src, dst, seq], use_bin_type=True)
    return packed


def _digest(payload: bytes | memoryview) -> bytes:
    return hashlib.sha256(payload).digest()


def x25519_public(ed25519_public: bytes) -> bytes:
    """A roster key (Ed25519) as the X25519 key envelopes for that node are sealed to."""
    converted: bytes = sodium.crypto_sign_ed25519_pk_to_curve25519(ed25519_public)
    return converted


def _envelope_key(shared: bytes, epk: bytes, recipient: bytes) -> tuple[bytes, bytes]:
    """(AEAD key, nonce), unique to this envelope because ``epk`` is."""
    okm = hashlib.blake2b(
        shared + epk + recipient, digest_size=_KEY_BYTES + _NONCE_BYTES, person=_KDF_PERSON
    ).digest()
    return okm[:_KEY_BYTES], okm[_KEY_BYTES:]


@functools.cache
def _in_place_aead() -> tuple[Any, Any] | None:
    """PyNaCl's own cffi module, when it has what sealing in place needs (else None).

    Sealing into one preallocated buffer saves a copy of every relayed envelope; it calls
    libsodium through ``nacl._sodium``, which is not PyNaCl's public API, so it is used
    only when every symbol is there. Otherwise the public ``nacl.bindings`` functions
    seal and open the same bytes (one copy more).
    """
    try:
        from nacl._sodium import ffi, lib
    except ImportError:
        return None
    needed = (
        "crypto_aead_xchacha20poly1305_ietf_encrypt",
        "crypto_aead_xchacha20poly1305_ietf_decrypt",
    )
    if not all(callable(getattr(lib, name, None)) for name in needed) or not callable(
        getattr(ffi, "from_buffer", None)
    ):
        return None
    return ffi, lib


def encrypt_to(recipient: bytes, plain: bytes, aad: bytes) -> npt.NDArray[np.uint8]:
    """``epk || ciphertext || tag`` for the X25519 key ``recipient``, in one buffer."""
    esk = os.urandom(32)
    epk: bytes = sodium.crypto_scalarmult_base(esk)
    key, nonce = _envelope_key(sodium.crypto_scalarmult(esk, recipient), epk, recipient)
    out = np.empty(EPK_BYTES + len(plain) + _ABYTES, np.uint8)
    out[:EPK_BYTES] = np.frombuffer(epk, np.uint8)
    sodium_lib = _in_place_aead()
    if sodium_lib is None:
        sealed = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(bytes(plain), aad, nonce, key)
        out[EPK_BYTES:] = np.frombuffer(sealed, np.uint8)
        return out
    ffi, lib = sodium_lib
    rc = lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        ffi.from_buffer("unsigned char[]", out[EPK_BYTES:], require_writable=True),
        ffi.NULL,
        ffi.from_buffer("unsigned char[]", plain),
        len(plain),
        aad,
        len(aad),
        ffi.NULL,
        nonce,
        key,
    )
    if rc != 0:
        raise RuntimeError("libsodium refused to encrypt a relayed envelope")
    return out


def decrypt_with(secret: bytes, public: bytes, payload: memoryview, aad: bytes) -> memoryview:
    """The plaintext of an ``encrypt_to`` payload for the X25519 pair (secret, public)."""
    if len(payload) < OVERHEAD:
        raise MalformedMessage(f"a relayed payload holds at least {OVERHEAD} bytes")
    epk = bytes(payload[:EPK_BYTES])
    try:
        shared = sodium.crypto_scalarmult(secret, epk)
    except Exception:  # a low-order point (all-zero secret): libsodium refuses it
        raise UndecryptableError("a relayed envelope with an invalid ephemeral key") from None
    key, nonce = _envelope_key(shared, epk, public)
    sodium_lib = _in_place_aead()
    if sodium_lib is None:
        try:
            plain: bytes = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                bytes(payload[EPK_BYTES:]), aad, nonce, key
            )
        except nacl.exceptions.CryptoError:
            raise UndecryptableError(
                "a relayed envelope does not open with this node's key"
            ) from None
        return memoryview(plain).cast("B")
    ffi, lib = sodium_lib
    out = np.empty(len(payload) - OVERHEAD, np.uint8)
    rc = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        ffi.from_buffer("unsigned char[]", out, require_writable=True),
        ffi.NULL,
        ffi.NULL,
        ffi.from_buffer("unsigned char[]", payload[EPK_BYTES:]),
        len(payload) - EPK_BYTES,
        aad,
        len(aad),
        nonce,
        key,
    )
    if rc != 0:
        raise UndecryptableError("a relayed envelope does not open with this node's key")
    return out.data.cast("B")


class RelaySender:
    """Seals this node's messages for ``dst`` (one per node: it numbers the envelopes).

    ``last``: the highest number this node may already have used (its durable floor
    after a restart); every envelope is numbered above it.
    """

    def __init__(self, identity: Identity, roster: Roster, *, last: int = 0) -> None:
        self.identity = identity
        self.roster = roster
        self.last = last

    def next_seq(self) -> int:
        self.last = max(self.last + 1, time.time_ns())
        return self.last

    def seal(
        self,
        dst: str,
        msg: wire.Message,
        spec: CodecSpec = DEFAULT_SPEC,
        *,
        seq: int | None = None,
    ) -> wire.Relayed:
        """``msg`` (a ``Relayable`` sent by this node) encrypted and signed for ``dst``,
        numbered ``seq`` (default: ``next_seq()``)."""
        if not isinstance(msg, wire.GossipShare | wire.Heartbeat):
            raise TypeError(f"only gossip shares and heartbeats are relayed, not {msg!r}")
        src = self.identity.node_id
        if msg.src != src:
            raise ValueError(f"{src!r} cannot relay a message from {msg.src!r}")
        if dst == src:
            raise ValueError(f"{src!r} cannot relay a message to itself")
        entry = self.roster.lookup(dst)
        if entry is None:
            raise ValueError(f"{src!r} cannot relay to {dst!r}, which is not in the roster")
        recipient = x25519_public(entry.public_key)
        seq = self.next_seq() if seq is None else seq
        plain = wire.encode(msg, spec)
        payload = encrypt_to(recipient, plain, relay_associated_data(src, dst, seq))
        del plain  # one copy at a time beyond the caller's tensors
        sig = self.identity.sign(relay_signed_bytes(src, dst, seq, _digest(payload.data)))
        return wire.Relayed(src, dst, seq, {PAYLOAD: payload}, sig)


class RelayInbox:
    """Opens envelopes addressed to ``identity`` (see the module docstring for the checks).

    ``floors``: the last ``seq`` accepted from each source, as kept durably (``floors()``
    is what to keep).
    """

    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        limits: Limits | None = None,
        *,
        floors: Mapping[str, int] | None = None,
    ) -> None:
        self.node_id = identity.node_id
        self.roster = roster
        self.limits = limits if limits is not None else Limits()
        self._secret = bytes(identity.signing_key.to_curve25519_private_key())
        self._public = x25519_public(identity.public_key)
        self._last: dict[str, int] = dict(floors or {})

    def floors(self) -> dict[str, int]:
        """The last ``seq`` accepted from each source (a copy)."""
        return dict(self._last)

    def restore(self, floors: Mapping[str, int]) -> None:
        """Raise the floors to ``floors`` (as kept durably before a restart)."""
        for src, seq in floors.items():
            self._last[src] = max(self._last.get(src, 0), seq)

    def open(self, msg: wire.Relayed) -> wire.Message:
        """The verified inner message, its ``seq`` admitted; a ``ProtocolError`` subclass
        for anything else."""
        inner = self.unseal(msg)
        self.admit(msg.src, msg.seq)
        return inner

    def admit(self, src: str, seq: int) -> None:
        """Raise ``ReplayedUpdateError`` unless ``seq`` is newer than ``src``'s floor, else
        raise the floor to it."""
        last = self._last.get(src, 0)
        if seq <= last:
            raise ReplayedUpdateError(
                f"relayed message {seq} from {src!r} is not newer than {last} (replay)"
            )
        self._last[src] = seq

    def unseal(self, msg: wire.Relayed) -> wire.Message:
        """The verified inner message; changes nothing (``admit`` decides about replays)."""
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
        if msg.seq <= last:  # refused before the work of decrypting; admit() decides
            raise ReplayedUpdateError(
                f"relayed message {msg.seq} from {msg.src!r} is not newer than {last} (replay)"
            )
        aad = relay_associated_data(msg.src, msg.dst, msg.seq)
        plain = decrypt_with(self._secret, self._public, data, aad)
        inner = wire.decode(plain, self.limits)
        if not isinstance(inner, wire.GossipShare | wire.Heartbeat):
            raise MalformedMessage(f"a {type(inner).__name__} cannot travel through a relay")
        if inner.src != msg.src:
            raise SignatureError(f"{msg.src!r} relayed a message in the name of {inner.src!r}")
        return inner
