"""Encrypted records: one authenticated-encryption stream per direction.

A logical message is cut into chunks of at most ``CHUNK_SIZE`` bytes; each chunk is one
record. The stream header is sent once, first. Every record is authenticated together
with its position, so a modified, truncated, removed, reordered or duplicated record
fails to open; a FINAL record marks an orderly close, so a stream that simply stops is
detectable (``RecordReceiver.closed`` is still False).

Each record carries flags: END (the last chunk of a message), REKEY (both ends ratchet
the key after this record), FINAL (empty; orderly close). A rekey goes on whichever
record is due (every 64 MiB or 10 minutes), so single-chunk traffic (heartbeats, small
models) rekeys on time too.

Two record ciphers; the handshake picks one inside its signed transcript:

``xchacha20poly1305-secretstream``
    libsodium's ``crypto_secretstream_xchacha20poly1305``. Its tags are exclusive
    (MESSAGE, PUSH, REKEY, FINAL), so a record cannot be both PUSH and REKEY: a REKEY
    record starts its plaintext with one flags byte (bit 0: end of message). Only REKEY
    records carry it, so ordinary records are sealed and opened without an extra copy.

``aegis256-stream``
    AEGIS-256 (draft-irtf-cfrg-aegis-aead; libsodium's ``crypto_aead_aegis256``, 256-bit
    key, nonce and tag) in the STREAM construction of Hoang, Reyhanitabar, Rogaway and
    Vizár (CRYPTO 2015): the header is 24 random bytes, and record i is sealed under the
    nonce ``header || u64le(i)``, so a record opens only at its own position. A record
    is ``flags || ciphertext || tag`` with the flags byte in clear and authenticated as
    associated data (it tells where messages end and when the key turns, which record
    lengths and the rekey schedule tell anyway). REKEY ratchets the key one way,
    ``key <- BLAKE2b-256(keyed by key, personalised)``, so a later key does not reveal
    an earlier one. Why a second cipher: with AES instructions AEGIS-256 seals and opens
    at about 4-5 GB/s per core against about 1 GB/s for secretstream, and on two cores
    secretstream alone costs more CPU than moving the bytes (``bench/transport_throughput.py``).
    Records are sealed from, and opened into, caller memory through libsodium's C calls
    (PyNaCl's cffi module; the GIL is released), with no intermediate copies.

    PyNaCl's cffi module (``nacl._sodium``) is not its public API, and PyNaCl before 1.6
    bundles a libsodium without AEGIS, so this cipher exists only where
    ``aegis_available()`` finds every symbol it calls (``aegis_missing`` says which are
    absent; one WARNING says so). Elsewhere it is never offered nor accepted in a
    handshake (``available_ciphers``, ``preferred_ciphers``) and the handshake agrees on
    secretstream, with any peer.

Sans-I/O: bytes in, bytes out; the caller passes ``now`` (a monotonic clock reading).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from typing import Any, Protocol

import nacl.bindings as sodium
import nacl.exceptions
import numpy as np

from fedloom.transport.errors import RecordError as RecordError  # re-exported
from fedloom.transport.limits import GiB

log = logging.getLogger(__name__)

try:  # PyNaCl's own cffi binding of its bundled libsodium (not its public API)
    from nacl._sodium import ffi as ffi  # re-exported: tests hide symbols in them
    from nacl._sodium import lib as lib
except ImportError:  # pragma: no cover - a PyNaCl without it: secretstream only
    ffi = lib = None

CIPHER_SECRETSTREAM = "xchacha20poly1305-secretstream"
CIPHER_AEGIS256 = "aegis256-stream"
CIPHERS: tuple[str, ...] = (CIPHER_AEGIS256, CIPHER_SECRETSTREAM)

CHUNK_SIZE = 1 << 20
REKEY_BYTES = 64 << 20
REKEY_SECONDS = 600.0
HEADER_BYTES = 24
KEY_BYTES = 32

_SS_ABYTES: int = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
# AEGIS-256's tag, key and nonce are 256 bits each (draft-irtf-cfrg-aegis-aead);
# ``aegis_missing`` checks that libsodium says so too before the cipher is used.
_AEGIS_ABYTES = 32
_AEGIS_KEYBYTES = 32
_AEGIS_NPUBBYTES = HEADER_BYTES + 8  # header || u64 counter
# What _AegisSealer and _AegisOpener call in libsodium, and the sizes it must report.
_AEGIS_FUNCTIONS = ("crypto_aead_aegis256_encrypt", "crypto_aead_aegis256_decrypt")
_AEGIS_SIZES = {
    "crypto_aead_aegis256_abytes": _AEGIS_ABYTES,
    "crypto_aead_aegis256_keybytes": _AEGIS_KEYBYTES,
    "crypto_aead_aegis256_npubbytes": _AEGIS_NPUBBYTES,
}
# Per record: the cipher's MAC (and secretstream's tag byte), plus one flags byte (always
# for aegis256; only on REKEY records for secretstream).
RECORD_OVERHEAD: dict[str, int] = {
    CIPHER_SECRETSTREAM: _SS_ABYTES + 1,
    CIPHER_AEGIS256: _AEGIS_ABYTES + 1,
}
_SHORTEST_RECORD: dict[str, int] = {  # an empty chunk
    CIPHER_SECRETSTREAM: _SS_ABYTES,
    CIPHER_AEGIS256: _AEGIS_ABYTES + 1,
}
MAX_RECORD_BYTES = CHUNK_SIZE + max(RECORD_OVERHEAD.values())

TAG_MESSAGE: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_PUSH: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_PUSH
TAG_REKEY: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_REKEY
TAG_FINAL: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL

# Record flags (the aegis256 stream sends them as they are; secretstream maps them to tags).
END = 0x01
REKEY = 0x02
FINAL = 0x04
_KNOWN_FLAGS = END | REKEY | FINAL
_REKEY_PERSON = b"fedloom-rekey"

assert sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES == HEADER_BYTES
assert sodium.crypto_secretstream_xchacha20poly1305_KEYBYTES == KEY_BYTES
assert _AEGIS_KEYBYTES == KEY_BYTES

Chunk = bytes | bytearray | memoryview
Record = bytes | bytearray | memoryview  # what seal() makes and open() returns


class _ForgedRecordError(Exception):
    """A record that did not authenticate (turned into a ``RecordError`` by the receiver)."""


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"record key must be {KEY_BYTES} bytes")
    return key


def _check_cipher(cipher: str | None) -> str:
    if cipher is None:
        return available_ciphers()[0]
    if cipher not in RECORD_OVERHEAD:
        raise ValueError(f"unknown record cipher {cipher!r}; known: {', '.join(CIPHERS)}")
    if cipher not in available_ciphers():
        raise ValueError(f"record cipher {cipher!r} is not available here: {unavailable(cipher)}")
    return cipher


def aegis_missing(sodium_ffi: Any = None, sodium_lib: Any = None) -> tuple[str, ...]:
    """What the AEGIS-256 record cipher needs and the libsodium binding lacks (default:
    PyNaCl's cffi module as imported): the module itself, a function it calls, or a size
    that differs from AEGIS-256's. Empty: the cipher can be used. Never raises."""
    found_ffi = ffi if sodium_ffi is None else sodium_ffi
    found_lib = lib if sodium_lib is None else sodium_lib
    if found_ffi is None or found_lib is None:
        return ("nacl._sodium (ffi, lib)",)
    missing = [
        f"ffi.{name}" for name in ("from_buffer", "NULL") if getattr(found_ffi, name, None) is None
    ]
    missing += [
        f"lib.{name}" for name in _AEGIS_FUNCTIONS if not callable(getattr(found_lib, name, None))
    ]
    for name, size in _AEGIS_SIZES.items():
        try:
            reported = getattr(found_lib, name)()
        except (AttributeError, TypeError) as exc:
            missing.append(f"lib.{name} ({type(exc).__name__})")
            continue
        if reported != size:
            missing.append(f"lib.{name}() == {size} (says {reported!r})")
    return tuple(missing)


@functools.cache
def aegis_available() -> bool:
    """True where libsodium (through PyNaCl's cffi module) has everything the AEGIS-256
    record cipher calls; checked once per process, with one WARNING when it has not."""
    missing = aegis_missing()
    if missing:
        log.warning(
            "record cipher %s is off (the libsodium PyNaCl bundles lacks %s): channels use %s",
            CIPHER_AEGIS256,
            "; ".join(missing),
            CIPHER_SECRETSTREAM,
        )
    return not missing


def available_ciphers() -> tuple[str, ...]:
    """The record ciphers this process can use (``CIPHERS`` order)."""
    return tuple(c for c in CIPHERS if c != CIPHER_AEGIS256 or aegis_available())


def unavailable(cipher: str) -> str:
    """Why ``cipher`` cannot be used here (for error messages)."""
    if cipher == CIPHER_AEGIS256:
        return "the libsodium PyNaCl bundles lacks " + "; ".join(aegis_missing())
    return "unknown cipher"


@functools.cache
def hardware_aes() -> bool:
    """True where the CPU advertises AES instructions (Linux ``/proc/cpuinfo``: x86
    ``flags`` or Arm ``Features``); AEGIS is fast only there."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


def preferred_ciphers() -> tuple[str, ...]:
    """Every record cipher available here, the fastest on this CPU first (what a node
    offers by default)."""
    order = (
        (CIPHER_AEGIS256, CIPHER_SECRETSTREAM)
        if hardware_aes()
        else (CIPHER_SECRETSTREAM, CIPHER_AEGIS256)
    )
    usable = available_ciphers()
    return tuple(c for c in order if c in usable)


def _ratchet(key: bytes) -> bytes:
    return hashlib.blake2b(b"", digest_size=KEY_BYTES, key=key, person=_REKEY_PERSON).digest()


# ------------------------------------------------------------------ the two ciphers


class _Sealer(Protocol):
    header: bytes

    def seal(self, chunk: Chunk, flags: int) -> Record: ...


class _Opener(Protocol):
    def start(self, header: bytes) -> None: ...

    def open(self, record: Chunk, into: memoryview | None) -> tuple[Record, int]: ...


class _SecretstreamSealer:
    __slots__ = ("_state", "header")

    def __init__(self, key: bytes) -> None:
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self.header: bytes = sodium.crypto_secretstream_xchacha20poly1305_init_push(
            self._state, key
        )

    def seal(self, chunk: Chunk, flags: int) -> bytes:
        if flags & FINAL:
            tag, plaintext = TAG_FINAL, b""
        elif flags & REKEY:
            tag, plaintext = TAG_REKEY, b"".join((bytes((flags & END,)), chunk))
        else:
            tag = TAG_PUSH if flags & END else TAG_MESSAGE
            # A fresh 1 MiB copy here would cost throughput: pass bytes through.
            plaintext = chunk if type(chunk) is bytes else bytes(chunk)
        record: bytes = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, plaintext, None, tag
        )
        return record


class _SecretstreamOpener:
    __slots__ = ("_key", "_state")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()

    def start(self, header: bytes) -> None:
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, self._key)

    def open(self, record: Chunk, into: memoryview | None) -> tuple[Record, int]:
        # ``into`` is a hint only: PyNaCl's secretstream call always returns fresh bytes.
        try:
            plaintext, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                self._state, record if type(record) is bytes else bytes(record), None
            )
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise _ForgedRecordError from None
        if tag == TAG_MESSAGE:
            return plaintext, 0
        if tag == TAG_PUSH:
            return plaintext, END
        if tag == TAG_REKEY:
            if not plaintext or plaintext[0] & ~END:
                raise RecordError("malformed TAG_REKEY record (bad flags byte)")
            return plaintext[1:], REKEY | plaintext[0]
        if tag == TAG_FINAL:
            return plaintext, FINAL
        raise RecordError(f"record with unknown tag {tag}")


def _aegis_nonce(prefix: bytes, counter: int) -> bytes:
    return prefix + counter.to_bytes(8, "little")


class _AegisSealer:
    __slots__ = ("_counter", "_key", "header")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.header = os.urandom(HEADER_BYTES)
        self._counter = 0

    def seal(self, chunk: Chunk, flags: int) -> memoryview:
        size = memoryview(chunk).nbytes
        # np.empty, not bytearray: every byte is written below, so skip zeroing 1 MiB.
        record = np.empty(1 + size + _AEGIS_ABYTES, dtype=np.uint8)
        record[0] = flags
        out = ffi.from_buffer("unsigned char[]", record, require_writable=True)
        rc = lib.crypto_aead_aegis256_encrypt(
            out + 1,
            ffi.NULL,
            ffi.from_buffer("unsigned char[]", chunk),
            size,
            out,  # associated data: the flags byte
            1,
            ffi.NULL,
            _aegis_nonce(self.header, self._counter),
            self._key,
        )
        if rc != 0:  # pragma: no cover - libsodium fails only on oversize input
            raise ValueError("crypto_aead_aegis256_encrypt failed")
        self._counter += 1
        if flags & REKEY:
            self._key = _ratchet(self._key)
        return record.data


class _AegisOpener:
    __slots__ = ("_counter", "_key", "_prefix")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._prefix = b""
        self._counter = 0

    def start(self, header: bytes) -> None:
        self._prefix = header

    def open(self, record: Chunk, into: memoryview | None) -> tuple[Record, int]:
        size = memoryview(record).nbytes - 1 - _AEGIS_ABYTES
        # Straight into the caller's memory where the plaintext fits it exactly (a
        # tensor's own bytes); on a failed open the stream is dead and so is ``into``.
        chunk: Record = into if into is not None and into.nbytes == size else bytearray(size)
        src = ffi.from_buffer("unsigned char[]", record)
        rc = lib.crypto_aead_aegis256_decrypt(
            ffi.from_buffer("unsigned char[]", chunk, require_writable=True),
            ffi.NULL,
            ffi.NULL,
            src + 1,
            size + _AEGIS_ABYTES,
            src,  # associated data: the flags byte
            1,
            _aegis_nonce(self._prefix, self._counter),
            self._key,
        )
        if rc != 0:
            raise _ForgedRecordError
        flags = memoryview(record)[0]
        if flags & ~_KNOWN_FLAGS:
            raise RecordError(f"record with unknown flags 0x{flags:02x}")
        if flags & FINAL and flags != FINAL:
            raise RecordError("malformed FINAL record (other flags set)")
        self._counter += 1
        if flags & REKEY:
            self._key = _ratchet(self._key)
        return chunk, flags


def _sealer(cipher: str, key: bytes) -> _Sealer:
    return _AegisSealer(key) if cipher == CIPHER_AEGIS256 else _SecretstreamSealer(key)


def _opener(cipher: str, key: bytes) -> _Opener:
    return _AegisOpener(key) if cipher == CIPHER_AEGIS256 else _SecretstreamOpener(key)


# ------------------------------------------------------------------ the record stream


class RecordSender:
    """Seals chunks into records; rekeys itself every ``rekey_bytes`` or ``rekey_seconds``.
    ``cipher`` None: the first of ``available_ciphers()`` (as ``RecordReceiver``'s)."""

    __slots__ = (
        "_bytes_since_rekey",
        "_closed",
        "_rekey_at",
        "_rekey_bytes",
        "_rekey_seconds",
        "_sealer",
        "cipher",
        "overhead",
        "records_sealed",
        "rekeys",
    )

    def __init__(
        self,
        key: bytes,
        *,
        cipher: str | None = None,
        rekey_bytes: int = REKEY_BYTES,
        rekey_seconds: float = REKEY_SECONDS,
    ) -> None:
        _check_key(key)
        self.cipher = _check_cipher(cipher)
        if isinstance(rekey_bytes, bool) or not isinstance(rekey_bytes, int) or rekey_bytes < 1:
            raise ValueError(f"rekey_bytes must be a positive int, got {rekey_bytes!r}")
        if not (isinstance(rekey_seconds, int | float) and rekey_seconds > 0):
            raise ValueError(f"rekey_seconds must be > 0, got {rekey_seconds!r}")
        self._rekey_bytes = rekey_bytes
        self._rekey_seconds = float(rekey_seconds)
        self._sealer = _sealer(self.cipher, key)
        self.overhead = RECORD_OVERHEAD[self.cipher]
        self._bytes_since_rekey = 0
        self._rekey_at: float | None = None  # set by the first seal (no clock reads here)
        self._closed = False
        self.records_sealed = 0
        self.rekeys = 0

    def header(self) -> bytes:
        """The stream header; send it once, before the first record."""
        return self._sealer.header

    @property
    def closed(self) -> bool:
        return self._closed

    def seal(self, chunk: Chunk, *, last: bool, now: float) -> Record:
        """One record holding ``chunk`` (<= ``CHUNK_SIZE`` bytes); ``last`` ends the message."""
        if self._closed:
            raise ValueError("seal() after close()")
        size = memoryview(chunk).nbytes
        if size > CHUNK_SIZE:
            raise ValueError(f"chunk of {size} bytes, limit {CHUNK_SIZE}")
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now!r}")
        if self._rekey_at is None:
            self._rekey_at = now + self._rekey_seconds
        self._bytes_since_rekey += size
        flags = END if last else 0
        if self._bytes_since_rekey >= self._rekey_bytes or now >= self._rekey_at:
            flags |= REKEY
            self._bytes_since_rekey = 0
            self._rekey_at = now + self._rekey_seconds
            self.rekeys += 1
        self.records_sealed += 1
        return self._sealer.seal(chunk, flags)

    def close(self) -> Record:
        """The FINAL record for an orderly close; no record may follow it."""
        if self._closed:
            raise ValueError("close() called twice")
        self._closed = True
        return self._sealer.seal(b"", FINAL)


class RecordReceiver:
    """Opens records in order; any failure is final (the connection must close)."""

    __slots__ = (
        "_closed",
        "_failed",
        "_in_message",
        "_max_message_bytes",
        "_message_bytes",
        "_opener",
        "_shortest",
        "_started",
        "cipher",
    )

    def __init__(
        self, key: bytes, *, cipher: str | None = None, max_message_bytes: int = 2 * GiB
    ) -> None:
        _check_key(key)
        self.cipher = _check_cipher(cipher)
        if (
            isinstance(max_message_bytes, bool)
            or not isinstance(max_message_bytes, int)
            or max_message_bytes < 1
        ):
            raise ValueError(f"max_message_bytes must be a positive int, got {max_message_bytes!r}")
        self._max_message_bytes = max_message_bytes
        self._opener = _opener(self.cipher, key)
        self._shortest = _SHORTEST_RECORD[self.cipher]
        self._started = False
        self._closed = False
        self._failed = False
        self._in_message = False
        self._message_bytes = 0

    @property
    def closed(self) -> bool:
        """True once the peer's FINAL record arrived (False at EOF means truncation)."""
        return self._closed

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def in_message(self) -> bool:
        """True while a message has started but its last chunk has not arrived."""
        return self._in_message

    def _error(self, text: str) -> RecordError:
        self._failed = True
        return RecordError(text)

    def start(self, header: Chunk) -> None:
        """Take the peer's stream header (the first thing it sends)."""
        if self._failed:
            raise RecordError("the record stream already failed")
        if self._started:
            raise self._error("a second stream header")
        size = memoryview(header).nbytes
        if size != HEADER_BYTES:
            raise self._error(f"stream header of {size} bytes, expected {HEADER_BYTES}")
        self._opener.start(bytes(header))
        self._started = True

    def open(self, record: Chunk, into: memoryview | None = None) -> tuple[Record, bool]:
        """Decrypt the next record: ``(chunk, end_of_message)``.

        ``into`` (writable, contiguous bytes) is where the plaintext should go if it
        has exactly that size; the returned chunk is then ``into`` itself. Ciphers that
        cannot decrypt in place (secretstream) return fresh bytes, so check identity."""
        if self._failed:
            raise RecordError("the record stream already failed")
        if not self._started:
            raise self._error("a record before the stream header")
        if self._closed:
            raise self._error("a record after FINAL (the stream was closed)")
        size = memoryview(record).nbytes
        if size > MAX_RECORD_BYTES:
            raise self._error(f"record of {size} bytes, limit {MAX_RECORD_BYTES}")
        if size < self._shortest:
            raise self._error(f"record of {size} bytes is shorter than its overhead")
        try:
            chunk, flags = self._opener.open(record, into)
        except _ForgedRecordError:
            raise self._error(
                "record failed authentication (tampered, truncated, reordered or duplicated)"
            ) from None
        except RecordError as exc:
            raise self._error(str(exc)) from None
        if flags & FINAL:
            if len(chunk):
                raise self._error("malformed FINAL record (not empty)")
            if self._in_message:
                raise self._error("stream closed in the middle of a message")
            self._closed = True
            return b"", False
        end = bool(flags & END)
        total = self._message_bytes + len(chunk)
        if total > self._max_message_bytes:
            raise self._error(f"message larger than {self._max_message_bytes} bytes")
        self._message_bytes = 0 if end else total
        self._in_message = not end
        return chunk, end
