"""Caps applied when decoding bytes from a peer (shared by ``wire`` and ``tensors``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    """What a received message may contain; anything beyond is a ``ProtocolError``.

    * ``max_message_bytes``: size of the encoded message (checked before parsing).
    * ``max_decoded_bytes``: bytes of all tensors of one message once decoded and
      decompressed (a top-k payload expands, so this is separate from the message size).
    * ``max_tensors``: tensors in one tensor field; ``max_ndim``: dimensions per tensor.
    * ``max_array_len`` / ``max_map_len`` / ``max_str_len``: msgpack container and string
      caps (each is also capped by the message length, so a 5-byte header can never
      claim 2**32 elements).
    * ``reject_nonfinite``: reject NaN/Inf in float tensors and float fields.
    """

    max_message_bytes: int = 2 * GiB
    max_decoded_bytes: int = 2 * GiB
    max_tensors: int = 100_000
    max_ndim: int = 32
    max_array_len: int = 1_000_000
    max_map_len: int = 100_000
    max_str_len: int = 1 * MiB
    reject_nonfinite: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "reject_nonfinite":
                if not isinstance(value, bool):
                    raise ValueError(f"Limits.reject_nonfinite must be a bool, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{f.name} must be a positive int, got {value!r}")
        if self.max_ndim > 64:
            raise ValueError(f"Limits.max_ndim is at most 64 (numpy's limit), got {self.max_ndim}")
