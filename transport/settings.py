"""The digest of a training config: what the root's model signature says sites train with.

The root signs each model version together with the settings it sends with it
(``transport.e2e.model_signed_bytes``: ``{version, parent, digest, settings}``), where
``settings`` is ``settings_digest`` of the training config map (``TrainRequest.config``,
``ModelBroadcast.config``: lr, local_steps, batch_size, mu, ...). A region relays the
root's config with the root's proof; a site trains only on a request whose config hashes
to what the root signed (``algorithms.site``; refused ``unsigned_settings`` otherwise).

Canonical encoding: SHA-256 of the msgpack array ``["fedloom-settings-v1", [[key,
value], ...]]`` with the keys sorted; values are str, int, bool or float (msgpack keeps
bool apart from int, and a float is always its 64-bit IEEE value: no text repr to
disagree on), numpy scalars as their Python value, as ``transport.wire`` puts them on the
wire. So a config decoded from the wire hashes as the sender's did. Pure: no I/O, no
clock (``algorithms`` imports it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from fedloom.transport.errors import describe

__all__ = ["NO_SETTINGS", "SETTINGS_BYTES", "settings_digest", "settings_problem"]

SETTINGS_BYTES = 32
_LABEL = "fedloom-settings-v1"
_SCALARS = (str, int, float, bool)


def _plain(key: object, value: object) -> list[Any]:
    if not isinstance(key, str):
        raise TypeError(f"training config keys must be str, got {key!r}")
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, _SCALARS):
        raise TypeError(f"training config {key!r} must be str, int, float or bool, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"training config {key!r} must be finite, got {value!r}")
    return [key, value]


def settings_digest(config: Mapping[str, Any]) -> bytes:
    """SHA-256 of ``config``'s canonical encoding (module docstring).

    ``TypeError``/``ValueError`` for a map that cannot travel on the wire (a key that is
    not a str, a value that is not a finite scalar, an int beyond 64 bits)."""
    items = sorted((_plain(k, v) for k, v in config.items()), key=lambda kv: str(kv[0]))
    try:
        packed: bytes = msgpack.packb([_LABEL, items], use_bin_type=True)
    except OverflowError as exc:
        raise ValueError(f"training config: {exc}") from None
    return hashlib.sha256(packed).digest()


NO_SETTINGS = settings_digest({})  # the digest of an empty config


def settings_problem(config: Mapping[str, Any], signed: bytes) -> str | None:
    """None if ``config`` is exactly the settings whose digest is ``signed``; else why not
    (one line, no peer text)."""
    try:
        digest = settings_digest(config)
    except (TypeError, ValueError) as exc:
        return f"the training config cannot be hashed ({type(exc).__name__})"
    if digest != signed:
        keys = ", ".join(sorted(describe(k, 24) for k in list(config)[:8]))
        return (
            f"the training config ({keys}) is not what the root signed for this model "
            f"(digest {digest.hex()[:16]}..., signed {bytes(signed).hex()[:16]}...)"
        )
    return None
