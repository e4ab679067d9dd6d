"""What the cohort protocol's two sides (``member`` and ``coordinator``) must agree on.

* ``threshold(n, min_cohort, colluders)``: t = max(min_cohort, floor((n + c) / 2) + 1),
  c = ``max_colluders``: two views that each gather t signatures share at least
  2t - n >= c + 1 signers, so with at most c members colluding with the aggregator at
  least one honest member signed both, which it never does (it signs one view per
  cohort). With c = 0 (a bare majority) ONE colluding member, or the aggregator's own
  identity sealed as a member, could split the honest members into two views.
* ``seal_digest``: BLAKE2b-256 of everything a seal asks of its members (aggregator,
  cohort id, members, seqs, threshold, clip, precision_bits, weight_cap, noise_sigma).
* ``member_pair_context``: the context of a pair seed. The spec's ``keys.pair_context``
  (label, aggregator, cohort id, both ids) extended with the two members' update seqs as
  sealed (``SecAggSeal.seqs``) and the digest of the seal the member accepted. A site
  never uploads the same seq twice, so the masks of two uploads can never be equal, even
  when an aggregator replays a cohort id long after its members forgot it (their records
  are bounded): no difference of two updates of one member can be unmasked. Two members
  given different seals (an aggregator that sends each member its own weight_cap, clip,
  precision_bits, noise or threshold to make all but one contribution vanish) derive
  different pair seeds: their pair masks never cancel and the cohort aborts
  (``sum_out_of_range``).
* ``view_message``: the bytes a member signs for a view (aggregator, cohort, the seal's
  digest, survivors and dropped, each sorted), so the signature is bound to one view of
  one cohort under one seal: views signed under different seals never combine.
* ``refused``: the Metric + Log pair every refusal emits (metric ``secagg_refused{reason}``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgpack

from fedloom.algorithms.protocol import Effect, Log, Metric
from fedloom.algorithms.secagg.keys import pair_context
from fedloom.transport.wire import SecAggSeal

VIEW_LABEL = "fedloom/secagg/view"
SEAL_LABEL = "fedloom/secagg/seal"
MIN_COHORT_FLOOR = 2  # a cohort of one would hand its member's update to the aggregator
DEFAULT_MAX_COLLUDERS = 1  # c: members that may collude with the aggregator
DEFAULT_MAX_COHORT = 64  # members a site accepts in one seal (what the link caps carry)


def threshold(n: int, min_cohort: int, colluders: int = DEFAULT_MAX_COLLUDERS) -> int:
    """t = max(min_cohort, (n + colluders) // 2 + 1): more than half of the members plus
    the ``colluders`` (c) the cohort must withstand, never below ``min_cohort``. Two views
    with t signatures each share at least 2t - n >= c + 1 signers (see the module
    docstring). May exceed ``n``: callers refuse such a cohort."""
    return max(min_cohort, (n + colluders) // 2 + 1)


def seal_digest(aggregator: str, seal: SecAggSeal) -> bytes:
    """BLAKE2b-256 of what ``aggregator``'s ``seal`` asks of every member (not its
    ``deadline_s``): each member binds its pair seeds and view signatures to the digest of
    the seal IT was sent, so members holding different seals never cancel or co-sign."""
    packed: bytes = msgpack.packb(
        [
            SEAL_LABEL,
            str(aggregator),
            bytes(seal.cohort),
            [str(m) for m in seal.members],
            [int(q) for q in seal.seqs],
            int(seal.threshold),
            float(seal.clip),
            int(seal.precision_bits),
            int(seal.weight_cap),
            float(seal.noise_sigma),
        ],
        use_bin_type=True,
    )
    return hashlib.blake2b(packed, digest_size=32).digest()


def member_pair_context(
    aggregator: str, cohort: bytes, a: str, seq_a: int, b: str, seq_b: int, seal: bytes
) -> bytes:
    """``pair_context(aggregator, cohort, a, b)`` followed by the seqs of the lower and the
    higher id (symmetric in the two members) and ``seal`` (``seal_digest`` of the seal the
    member accepted)."""
    lo, hi = (seq_a, seq_b) if a < b else (seq_b, seq_a)
    tail: bytes = msgpack.packb([lo, hi, bytes(seal)], use_bin_type=True)
    return pair_context(aggregator, cohort, a, b) + tail


def view_message(
    aggregator: str,
    cohort: bytes,
    survivors: Iterable[str],
    dropped: Iterable[str],
    seal: bytes,
) -> bytes:
    """The canonical bytes of view (``survivors``, ``dropped``) of ``aggregator``'s
    ``cohort`` under the seal whose ``seal_digest`` is ``seal`` (each list sorted: the
    order a message uses does not matter)."""
    packed: bytes = msgpack.packb(
        [VIEW_LABEL, aggregator, cohort, bytes(seal), sorted(survivors), sorted(dropped)],
        use_bin_type=True,
    )
    return packed


def check_view(
    members: Iterable[str], t: int, survivors: Iterable[str], dropped: Iterable[str]
) -> str | None:
    """Why a view of a cohort of ``members`` with threshold ``t`` is unacceptable, or
    None: survivors and dropped must be disjoint, together exactly the members, and at
    least ``t`` members must have survived."""
    u, d, m = list(survivors), list(dropped), set(members)
    if len(set(u)) != len(u) or len(set(d)) != len(d):
        return "view_repeats"
    if set(u) & set(d):
        return "view_overlap"
    if set(u) | set(d) != m or len(u) + len(d) != len(m):
        return "view_members"
    if len(u) < t:
        return "view_too_few"
    return None


def refused(reason: str, text: str, fields: Mapping[str, Any] | None = None) -> list[Effect]:
    """Metric ``secagg_refused{reason}`` and a warning Log saying why."""
    return [
        Metric("secagg_refused", 1.0, {"reason": reason}),
        Log("warning", text, {"reason": reason, **(fields or {})}),
    ]


_STREAM_LABEL = b"fedloom/secagg/coefficients"
_STREAM_BLOCK = 4096  # bytes per refill: a 50-member seal draws ~170 KB of coefficients


def byte_stream(seed: bytes) -> Callable[[int], bytes]:
    """``randbytes(k)`` drawing from SHAKE-256(label, seed, counter) in 4 KiB blocks:
    polynomial coefficients for Shamir come from a 32-byte ``SecAggKeys.fresh_secret()``
    (os.urandom in daemons), never from the node's statistical rng. (One SHAKE call per
    4 KiB rather than one keyed BLAKE2b per 64 bytes: a 50-member seal draws ~2,500
    coefficients of 66 bytes.)"""
    counter = 0
    buf = b""
    pos = 0

    def randbytes(k: int) -> bytes:
        nonlocal counter, buf, pos
        if pos + k > len(buf):
            parts = [buf[pos:]]
            have = len(buf) - pos
            while have < k:
                block = hashlib.shake_256(
                    _STREAM_LABEL + seed + counter.to_bytes(8, "little")
                ).digest(_STREAM_BLOCK)
                counter += 1
                parts.append(block)
                have += len(block)
            buf, pos = b"".join(parts), 0
        out = buf[pos : pos + k]
        pos += k
        return out

    return randbytes


_recent_digests: tuple[tuple[bytes, bytes], ...] = ()  # (data, digest) of large inputs
_REMEMBER = 4
_REMEMBER_FROM = 1 << 16
_REMEMBER_BYTES = 1 << 28  # what the remembered inputs may keep alive, at most


def digest(data: bytes) -> bytes:
    """SHA-256 of ``data`` (what a member records of what it uploaded, and what its
    masked upload's signature covers). SHA-256, as ``transport.e2e.tensors_digest``: with
    SHA-NI it hashes a 4 MB upload in ~2.2 ms here against BLAKE2b's ~4.5 ms, once at the
    member and once at the aggregator for each upload.

    The digests of the latest few large ``bytes`` objects are remembered by identity (the
    objects are kept, so their ids cannot be reused): a member digests its masked upload
    for its record and its daemon's signing digests the same object again
    (``federation.signing.masked_digest``), so 4 MB per million coordinates is hashed
    once, also when a process hosts several sites (at most 256 MiB of inputs kept)."""
    global _recent_digests
    recent = _recent_digests
    for seen, out in recent:
        if seen is data:
            return out
    out = hashlib.sha256(data).digest()
    if type(data) is bytes and _REMEMBER_FROM <= len(data) <= _REMEMBER_BYTES:
        kept = [(data, out)]
        total = len(data)
        for seen, d in recent[: _REMEMBER - 1]:
            total += len(seen)
            if total > _REMEMBER_BYTES:
                break
            kept.append((seen, d))
        _recent_digests = tuple(kept)
    return out
