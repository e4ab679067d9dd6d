"""Errors for bytes received from a peer.

Every way in which a peer's bytes can be rejected raises a subclass of
``ProtocolError``, so a driver needs one ``except ProtocolError`` around
``wire.decode``. Each class carries a short ``reason`` label, suitable for
``Metric("update_rejected", labels={"reason": err.reason})``.

Local misuse (encoding a message with an unsupported dtype, a bad ``CodecSpec``)
raises ``ValueError``/``TypeError`` instead: those are bugs, not peer input.
"""

# The names are the shared contract (the brief names them), hence no "Error" suffix.
# ruff: noqa: N818

from __future__ import annotations

from typing import ClassVar


class ProtocolError(Exception):
    """Bad bytes from a peer: the message is rejected, the process carries on."""

    reason: ClassVar[str] = "protocol"


class FrameTooLarge(ProtocolError):
    """The encoded message is larger than ``Limits.max_message_bytes``."""

    reason: ClassVar[str] = "too_large"


class MalformedMessage(ProtocolError):
    """Not valid msgpack, or valid msgpack that does not match the message schema."""

    reason: ClassVar[str] = "malformed"


class CodecError(ProtocolError):
    """A tensor manifest or payload is inconsistent (shapes, lengths, codec parameters)."""

    reason: ClassVar[str] = "codec"


class DecompressionBomb(CodecError):
    """A compressed payload would expand beyond what its manifest (or the limits) allow."""

    reason: ClassVar[str] = "decompression_bomb"


class DisallowedDtype(CodecError):
    """A tensor declares a dtype outside the whitelist."""

    reason: ClassVar[str] = "dtype"


class NonFiniteTensor(CodecError):
    """A float tensor (or a codec scale) contains NaN or infinity."""

    reason: ClassVar[str] = "non_finite"


def describe(value: object, limit: int = 40) -> str:
    """A short, bounded description of a peer-supplied value for an error message.

    Containers are named by type only: their repr could be huge (or slow) to build.
    """
    if value is None or isinstance(value, bool | int | float):
        text = repr(value)
    elif isinstance(value, str | bytes):
        text = repr(value[: limit + 1])
    else:
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


class HandshakeError(ProtocolError):
    """A channel handshake failed: garbled or oversize message, bad signature, bad key."""

    reason: ClassVar[str] = "handshake"


class PeerRefused(HandshakeError):
    """The peer authenticated (or claimed) an identity the roster does not allow here."""

    reason: ClassVar[str] = "peer_refused"


class RecordError(ProtocolError):
    """An encrypted record failed: tampered, truncated, reordered, duplicated or misplaced."""

    reason: ClassVar[str] = "record"
