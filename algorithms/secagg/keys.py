"""The keys seam: what a node needs from its identity for secure aggregation.

Nodes are sans-I/O and never touch key files: a driver gives each node a ``SecAggKeys``.
``transport.secagg_keys.RosterSecAggKeys`` implements it over the signed roster (the
roster's Ed25519 identity keys converted to X25519: no new trust anchor);
``federation.secagg_keys.derived_secagg_keys`` builds the same class over keys derived
from a seed, so the simulator runs the same cryptography.

Pair seeds are bound to one cohort of one aggregator (``pair_context``): a seed revealed
to unmask one cohort is useless for any other.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import msgpack

# Defined next to their one implementation (transport sits below algorithms in the layer
# contract, so it cannot import them from here); this is where nodes import them from.
from fedloom.transport.secagg_keys import SecAggCryptoError as SecAggCryptoError
from fedloom.transport.secagg_keys import SecAggKeyError as SecAggKeyError

PAIR_LABEL = "fedloom/secagg/pair"
SEED_BYTES = 32


@runtime_checkable
class SecAggKeys(Protocol):
    """One node's secure-aggregation key operations.

    Every method taking a ``peer`` raises ``SecAggKeyError`` when the roster has no key
    for that peer (``verify`` too: an unknown signer is a different failure from a bad
    signature).
    """

    @property
    def node_id(self) -> str: ...

    def pair_seed(self, peer: str, context: bytes) -> bytes:
        """The 32-byte seed this node shares with ``peer`` for ``context`` (both sides
        compute the same bytes; see ``pair_context``)."""
        ...

    def seal_to(self, peer: str, plaintext: bytes) -> bytes:
        """``plaintext`` encrypted and authenticated from this node to ``peer``."""
        ...

    def open_from(self, peer: str, boxed: bytes) -> bytes:
        """The plaintext ``peer`` sealed to this node; ``SecAggCryptoError`` if it does
        not open."""
        ...

    def sign(self, message: bytes) -> bytes:
        """This node's signature of ``message`` (domain-separated for secure aggregation)."""
        ...

    def verify(self, peer: str, message: bytes, sig: bytes) -> bool:
        """True when ``sig`` is ``peer``'s ``sign(message)``."""
        ...

    def fresh_secret(self) -> bytes:
        """32 fresh random bytes (self-mask seeds)."""
        ...

    def role(self, peer: str) -> str | None:
        """``peer``'s role in the roster ("site", "region", "root", ...), or None when the
        key table carries no roles (in-memory tables built without them). A member
        refuses a seal naming a member whose role is known and is not "site"."""
        ...


def pair_context(aggregator: str, cohort: bytes, a: str, b: str) -> bytes:
    """The context of the pair seed of members ``a`` and ``b`` in ``aggregator``'s
    ``cohort``: the label, the aggregator, the cohort id and the two ids in order
    (msgpack, so the parts cannot run into each other). Symmetric in ``a`` and ``b``."""
    if not all(isinstance(s, str) for s in (aggregator, a, b)):
        raise TypeError("aggregator and member ids must be str")
    if not isinstance(cohort, bytes):
        raise TypeError("cohort id must be bytes")
    if a == b:
        raise ValueError(f"a member has no pair seed with itself ({a!r})")
    lo, hi = (a, b) if a < b else (b, a)
    packed: bytes = msgpack.packb([PAIR_LABEL, aggregator, cohort, lo, hi], use_bin_type=True)
    return packed
