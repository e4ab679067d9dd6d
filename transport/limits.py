"""Caps applied when decoding bytes from a peer (shared by ``wire`` and ``tensors``).

``Limits()`` are the global defaults, for links whose model is not known yet.
``Limits.for_model(layout)`` ties them to a model (``ModelLayout``: its tensors' names,
shapes and dtypes): a node that knows its model decodes each message under caps of
about the model's size, so a small hostile message can never decode to more.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

GiB = 1 << 30
MiB = 1 << 20

# Bytes an honest message of a model needs beyond the model as decoded: a top-k tensor
# stores at most 4 k + n / 8 bytes (its bitmap: 1/32 of the fp32 bytes), a relayed share
# carries the encoded message, and a whole message adds its envelope. The factor covers
# the first two; per-tensor manifest bytes and ``DEFAULT_MODEL_SLACK`` the rest (envelope
# fields, metrics, a roster text: nothing in them is model-sized).
MODEL_FACTOR = 1.125
# What decoding an honest message of a model holds, over the model as decoded: a tensor
# that travels as float16 decodes to float32 (4 bytes an element) and keeps its float16
# (2 more, ``transport.half.remember_half``), all counted against ``max_decoded_bytes``
# (``transport.tensors.decoded_bytes``).
DECODED_FACTOR = 1.5
DEFAULT_MODEL_SLACK = 1 * MiB
# What a node that has no model yet (a fresh region) takes from the peers that dial it:
# control messages (hello, heartbeats, roster versions) fit, tensors of any real model
# do not. Its children have nothing to send before it has handed out a model.
BEFORE_MODEL = 256 * 1024
_ENTRY_BYTES = 96  # one manifest entry without its name and shape (codec, k, index, scale)
_DIM_BYTES = 9  # one msgpack int of a shape, at most


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

    @classmethod
    def before_model(cls, base: Limits | None = None) -> Limits:
        """``base`` capped for links accepted before the model's layout is known: a
        message of at most ``BEFORE_MODEL`` bytes, decoded or not."""
        return dataclasses.replace(
            base if base is not None else cls(),
            max_message_bytes=BEFORE_MODEL,
            max_decoded_bytes=BEFORE_MODEL,
        )

    @classmethod
    def for_model(
        cls,
        model: ModelLayout | Mapping[str, Any],
        *,
        slack: int = DEFAULT_MODEL_SLACK,
        base: Limits | None = None,
    ) -> Limits:
        """``base`` (default ``Limits()``) with its size caps set from ``model`` (a layout,
        or the weights themselves): message bytes at most ``MODEL_FACTOR`` times the
        model as decoded plus its manifest and ``slack``, decoded bytes (float16 kept
        included) at most ``DECODED_FACTOR`` times plus the same; as
        many tensors and dimensions as the model has. An honest update, model, gossip
        share or relayed envelope of that model always fits (any codec, see
        ``MODEL_FACTOR``); a message that claims more is refused before decoding."""
        layout = model if isinstance(model, ModelLayout) else ModelLayout.of(model)
        if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
            raise ValueError(f"slack must be a non-negative int, got {slack!r}")
        manifest = sum(
            _ENTRY_BYTES + len(name.encode()) + _DIM_BYTES * len(shape)
            for name, shape, _ in layout.tensors
        )
        cap = math.ceil(MODEL_FACTOR * layout.decoded_bytes) + manifest + slack
        decoded = math.ceil(DECODED_FACTOR * layout.decoded_bytes) + manifest + slack
        return dataclasses.replace(
            base if base is not None else cls(),
            max_message_bytes=cap,
            max_decoded_bytes=max(cap, decoded),
            max_tensors=max(1, len(layout.tensors)),
            max_ndim=max(1, max((len(shape) for _, shape, _ in layout.tensors), default=1)),
        )


_F32 = np.dtype("<f4")


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """The names, shapes and dtypes of a model's tensors as a receiver decodes them
    (every float tensor as float32): what each update, model or gossip share of that
    model must match. ``mismatch`` is the cheap check (no pass over the data) done
    before anything is hashed; ``Limits.for_model`` the caps that apply before decoding.
    """

    tensors: tuple[tuple[str, tuple[int, ...], np.dtype[Any]], ...]
    _by_name: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        by_name = {name: (shape, dtype) for name, shape, dtype in self.tensors}
        if len(by_name) != len(self.tensors):
            raise ValueError("ModelLayout: a tensor name appears twice")
        object.__setattr__(self, "_by_name", by_name)

    @classmethod
    def of(cls, weights: Mapping[str, Any]) -> ModelLayout:
        """The layout of ``weights`` (arrays, or anything with ``shape`` and ``dtype``)."""
        tensors = []
        for name, value in weights.items():
            arr = (
                value if hasattr(value, "shape") and hasattr(value, "dtype") else np.asarray(value)
            )
            dtype = np.dtype(arr.dtype)
            decoded = _F32 if dtype.kind == "f" else dtype.newbyteorder("<")
            tensors.append((str(name), tuple(int(d) for d in arr.shape), decoded))
        return cls(tuple(tensors))

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the model's tensors once decoded."""
        return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.tensors)

    def mismatch(self, tensors: object) -> str | None:
        """Why ``tensors`` (decoded from a peer) are not shaped like this model, or None.

        The rules of ``algorithms.weights_math.check_compatible``: exactly these names,
        numpy arrays of these shapes, float where the model is float (any width: codecs
        decode to float32), else the model's own dtype. Reasons: "not_a_mapping",
        "names", "not_array", "shape", "dtype"."""
        if not isinstance(tensors, Mapping):
            return "not_a_mapping"
        if len(tensors) != len(self._by_name):
            return "names"
        for name, (shape, dtype) in self._by_name.items():
            arr = tensors.get(name)
            if arr is None:
                return "names"
            if not isinstance(arr, np.ndarray):
                return "not_array"
            if arr.shape != shape:
                return "shape"
            if arr.dtype != dtype and (dtype.kind != "f" or arr.dtype.kind != "f"):
                return "dtype"
        return None
