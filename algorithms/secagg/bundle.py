"""The share bundle member i seals to member m: i's Shamir shares for m's index.

Plaintext (msgpack map, sealed with ``SecAggKeys.seal_to``; the aggregator only relays
the box)::

    {"c": cohort id, "o": owner i, "r": recipient m, "x": m's share index,
     "b": share of b_i, "s": {j: share of s_ij for every member j != i}}

``unpack_bundle`` is total: whatever the bytes, it returns a ``Bundle`` that matches what
the caller expects (cohort, owner, recipient, x, exactly the other members' keys, every
share a valid 66-byte field element) or raises ``BundleError``. A box opened with the
owner's key proves who wrote it; the checks prove it was written for this cohort, this
recipient and this index, so a bundle cannot be replayed into another cohort or slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from fedloom.algorithms.secagg.shamir import SHARE_BYTES, ShareError, parse_share
from fedloom.transport.errors import ProtocolError
from fedloom.transport.strict_msgpack import unpack_strict

MAX_MEMBERS = 4096
MAX_ID_BYTES = 512  # node ids are <= 128 characters (transport.identity); UTF-8 slack
_KEYS = frozenset({"c", "o", "r", "x", "b", "s"})


class BundleError(ValueError):
    """A share bundle is malformed or not the one expected; the message says why."""


class _GarbledBundleError(ProtocolError):
    reason: ClassVar[str] = "secagg_bundle"


@dataclass(frozen=True, slots=True)
class Bundle:
    """A parsed, checked share bundle."""

    cohort: bytes
    owner: str
    recipient: str
    x: int
    self_share: bytes
    pair_shares: Mapping[str, bytes]


def max_bundle_bytes(members: Sequence[str]) -> int:
    """The largest packed bundle a cohort with ``members`` can produce (with slack)."""
    per_member = SHARE_BYTES + 16
    return 1024 + 2 * MAX_ID_BYTES + sum(len(m.encode("utf-8")) + per_member for m in members)


def pack_bundle(
    cohort: bytes,
    owner: str,
    recipient: str,
    x: int,
    self_share: bytes,
    pair_shares: Mapping[str, bytes],
) -> bytes:
    """The plaintext bundle (``ValueError`` for ill-typed arguments: a local bug)."""
    if (
        not isinstance(cohort, bytes)
        or not isinstance(owner, str)
        or not isinstance(recipient, str)
    ):
        raise ValueError("cohort must be bytes, owner and recipient str")
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"x must be an int >= 1, got {x!r}")
    for share in (self_share, *pair_shares.values()):
        parse_share(share)  # ShareError is a ValueError
    if owner in pair_shares:
        raise ValueError(f"pair_shares names the owner {owner!r}")
    body = {
        "c": cohort,
        "o": owner,
        "r": recipient,
        "x": x,
        "b": self_share,
        "s": {j: pair_shares[j] for j in sorted(pair_shares)},
    }
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def _field(body: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BundleError(f"share bundle: {what} ({key!r}) has the wrong type")
    return value


def unpack_bundle(
    raw: bytes,
    *,
    cohort: bytes,
    owner: str,
    recipient: str,
    x: int,
    members: Sequence[str],
) -> Bundle:
    """Parse and check the bundle ``owner`` sealed to ``recipient`` (share index ``x``) in
    ``cohort`` whose members are ``members``; ``BundleError`` for anything else."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise BundleError("share bundle: not bytes")
    if len(members) > MAX_MEMBERS:
        raise BundleError(f"share bundle: cohort of {len(members)} members, limit {MAX_MEMBERS}")
    expected_keys = set(members)
    if owner not in expected_keys or recipient not in expected_keys:
        raise BundleError("share bundle: owner or recipient is not a member")
    expected_keys.discard(owner)
    limit = max_bundle_bytes(members)
    if len(raw) > limit:
        raise BundleError(f"share bundle: {len(raw)} bytes, limit {limit}")
    try:
        body = unpack_strict(
            raw,
            what="share bundle",
            error=_GarbledBundleError,
            max_str=MAX_ID_BYTES,
            max_bin=SHARE_BYTES + 64,
            max_array=0,
            max_map=max(len(_KEYS), len(members)),
        )
    except ProtocolError as exc:
        raise BundleError(str(exc)) from None
    if not isinstance(body, dict) or set(body) != _KEYS:
        raise BundleError(f"share bundle: expected a map with keys {sorted(_KEYS)}")
    if _field(body, "c", bytes, "cohort") != cohort:
        raise BundleError("share bundle: written for another cohort")
    if _field(body, "o", str, "owner") != owner:
        raise BundleError("share bundle: written by another owner")
    if _field(body, "r", str, "recipient") != recipient:
        raise BundleError("share bundle: written for another recipient")
    if _field(body, "x", int, "share index") != x:
        raise BundleError("share bundle: written for another share index")
    pairs = _field(body, "s", dict, "pair shares")
    if set(pairs) != expected_keys:
        unknown = sorted(set(pairs) - expected_keys)[:3]
        missing = sorted(expected_keys - set(pairs))[:3]
        raise BundleError(
            f"share bundle: pair shares do not match the members (unknown {unknown}, "
            f"missing {missing})"
        )
    try:
        self_share = _field(body, "b", bytes, "self share")
        parse_share(self_share)
        for share in pairs.values():
            if not isinstance(share, bytes):
                raise BundleError("share bundle: a pair share is not bytes")
            parse_share(share)
    except ShareError as exc:
        raise BundleError(f"share bundle: {exc}") from None
    return Bundle(
        cohort=bytes(cohort),
        owner=owner,
        recipient=recipient,
        x=x,
        self_share=self_share,
        pair_shares=dict(pairs),
    )
