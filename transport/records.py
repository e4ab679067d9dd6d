"""Encrypted records: one ``crypto_secretstream_xchacha20poly1305`` stream per direction.

A logical message is cut into chunks of at most ``CHUNK_SIZE`` bytes; each chunk is one
record. The stream header is sent once, first. secretstream authenticates every record
and its position, so a modified, truncated, removed, reordered or duplicated record
fails to decrypt; ``TAG_FINAL`` marks an orderly close, so a stream that simply stops is
detectable (``RecordReceiver.closed`` is still False).

Tags: MESSAGE (more chunks of this message follow), PUSH (the last chunk), REKEY (both
ends ratchet the key after this record), FINAL (empty; orderly close). secretstream's
tags are exclusive, so a record cannot be both PUSH and REKEY; a REKEY record therefore
starts its plaintext with one flags byte (bit 0: end of message). Only REKEY records
carry it (one per 64 MiB or 10 minutes), so ordinary records are sealed and opened
without an extra copy. A rekey goes on whichever record is due, so single-chunk
traffic (heartbeats, small models) rekeys on time too.

Sans-I/O: bytes in, bytes out; the caller passes ``now`` (a monotonic clock reading).
"""

from __future__ import annotations

import math

import nacl.bindings as sodium
import nacl.exceptions

from transport.errors import RecordError as RecordError  # re-exported
from transport.limits import GiB

CHUNK_SIZE = 1 << 20
REKEY_BYTES = 64 << 20
REKEY_SECONDS = 600.0
HEADER_BYTES: int = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
KEY_BYTES: int = sodium.crypto_secretstream_xchacha20poly1305_KEYBYTES
_ABYTES: int = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
RECORD_OVERHEAD = _ABYTES + 1  # MAC and tag, plus a REKEY record's flags byte (at most)
MAX_RECORD_BYTES = CHUNK_SIZE + RECORD_OVERHEAD

TAG_MESSAGE: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_PUSH: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_PUSH
TAG_REKEY: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_REKEY
TAG_FINAL: int = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL

_END = 0x01
_FLAG_MORE = b"\x00"
_FLAG_END = b"\x01"


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"record key must be {KEY_BYTES} bytes")
    return key


class RecordSender:
    """Seals chunks into records; rekeys itself every ``rekey_bytes`` or ``rekey_seconds``."""

    __slots__ = (
        "_bytes_since_rekey",
        "_closed",
        "_header",
        "_rekey_at",
        "_rekey_bytes",
        "_rekey_seconds",
        "_state",
        "records_sealed",
        "rekeys",
    )

    overhead: int = RECORD_OVERHEAD

    def __init__(
        self,
        key: bytes,
        *,
        rekey_bytes: int = REKEY_BYTES,
        rekey_seconds: float = REKEY_SECONDS,
    ) -> None:
        _check_key(key)
        if isinstance(rekey_bytes, bool) or not isinstance(rekey_bytes, int) or rekey_bytes < 1:
            raise ValueError(f"rekey_bytes must be a positive int, got {rekey_bytes!r}")
        if not (isinstance(rekey_seconds, int | float) and rekey_seconds > 0):
            raise ValueError(f"rekey_seconds must be > 0, got {rekey_seconds!r}")
        self._rekey_bytes = rekey_bytes
        self._rekey_seconds = float(rekey_seconds)
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._header: bytes = sodium.crypto_secretstream_xchacha20poly1305_init_push(
            self._state, key
        )
        self._bytes_since_rekey = 0
        self._rekey_at: float | None = None  # set by the first seal (no clock reads here)
        self._closed = False
        self.records_sealed = 0
        self.rekeys = 0

    def header(self) -> bytes:
        """The stream header; send it once, before the first record."""
        return self._header

    @property
    def closed(self) -> bool:
        return self._closed

    def seal(self, chunk: bytes | bytearray | memoryview, *, last: bool, now: float) -> bytes:
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
        rekey = self._bytes_since_rekey >= self._rekey_bytes or now >= self._rekey_at
        if rekey:
            tag = TAG_REKEY
            plaintext = b"".join((_FLAG_END if last else _FLAG_MORE, chunk))
            self._bytes_since_rekey = 0
            self._rekey_at = now + self._rekey_seconds
            self.rekeys += 1
        else:
            tag = TAG_PUSH if last else TAG_MESSAGE
            # A fresh 1 MiB copy here would halve throughput (page faults): pass bytes through.
            plaintext = chunk if type(chunk) is bytes else bytes(chunk)
        self.records_sealed += 1
        record: bytes = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, plaintext, None, tag
        )
        return record

    def close(self) -> bytes:
        """The ``TAG_FINAL`` record for an orderly close; no record may follow it."""
        if self._closed:
            raise ValueError("close() called twice")
        self._closed = True
        record: bytes = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, b"", None, TAG_FINAL
        )
        return record


class RecordReceiver:
    """Opens records in order; any failure is final (the connection must close)."""

    __slots__ = (
        "_closed",
        "_failed",
        "_in_message",
        "_max_message_bytes",
        "_message_bytes",
        "_started",
        "_state",
        "key",
    )

    def __init__(self, key: bytes, *, max_message_bytes: int = 2 * GiB) -> None:
        self.key = _check_key(key)
        if (
            isinstance(max_message_bytes, bool)
            or not isinstance(max_message_bytes, int)
            or max_message_bytes < 1
        ):
            raise ValueError(f"max_message_bytes must be a positive int, got {max_message_bytes!r}")
        self._max_message_bytes = max_message_bytes
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._started = False
        self._closed = False
        self._failed = False
        self._in_message = False
        self._message_bytes = 0

    @property
    def closed(self) -> bool:
        """True once the peer's ``TAG_FINAL`` arrived (False at EOF means truncation)."""
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

    def start(self, header: bytes | bytearray | memoryview) -> None:
        """Take the peer's stream header (the first thing it sends)."""
        if self._failed:
            raise RecordError("the record stream already failed")
        if self._started:
            raise self._error("a second stream header")
        if memoryview(header).nbytes != HEADER_BYTES:
            raise self._error(
                f"stream header of {memoryview(header).nbytes} bytes, expected {HEADER_BYTES}"
            )
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, bytes(header), self.key)
        self._started = True

    def open(self, record: bytes | bytearray | memoryview) -> tuple[bytes, bool]:
        """Decrypt the next record: ``(chunk, end_of_message)``."""
        if self._failed:
            raise RecordError("the record stream already failed")
        if not self._started:
            raise self._error("a record before the stream header")
        if self._closed:
            raise self._error("a record after TAG_FINAL (the stream was closed)")
        size = memoryview(record).nbytes
        if size > MAX_RECORD_BYTES:
            raise self._error(f"record of {size} bytes, limit {MAX_RECORD_BYTES}")
        if size < _ABYTES:
            raise self._error(f"record of {size} bytes is shorter than its overhead")
        try:
            plaintext, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                self._state, record if type(record) is bytes else bytes(record), None
            )
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise self._error(
                "record failed authentication (tampered, truncated, reordered or duplicated)"
            ) from None
        if tag == TAG_MESSAGE:
            chunk, end = plaintext, False
        elif tag == TAG_PUSH:
            chunk, end = plaintext, True
        elif tag == TAG_REKEY:
            if not plaintext or plaintext[0] & ~_END:
                raise self._error("malformed TAG_REKEY record (bad flags byte)")
            chunk, end = plaintext[1:], bool(plaintext[0] & _END)
        elif tag == TAG_FINAL:
            if plaintext:
                raise self._error("malformed TAG_FINAL record (not empty)")
            if self._in_message:
                raise self._error("stream closed in the middle of a message")
            self._closed = True
            return b"", False
        else:
            raise self._error(f"record with unknown tag {tag}")
        total = self._message_bytes + len(chunk)
        if total > self._max_message_bytes:
            raise self._error(f"message larger than {self._max_message_bytes} bytes")
        self._message_bytes = 0 if end else total
        self._in_message = not end
        return chunk, end
