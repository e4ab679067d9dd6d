"""Secure-aggregation keys for the simulator and in-memory runs.

``derived_secagg_keys`` gives every node a real Ed25519 identity derived from the run's
seed and its id, and a ``transport.secagg_keys.RosterSecAggKeys`` over the resulting key
table: the simulator runs exactly the daemons' cryptography (X25519 pair seeds, boxes,
signatures), only the keys come from the seed instead of key files.

The self-mask secrets (``fresh_secret``) are drawn from a generator seeded with (run seed,
node id), so a simulated run is reproducible, masks included, ON PURPOSE. That is fine
for a simulation and wrong anywhere else: real daemons use ``RosterSecAggKeys`` with the
node's identity file and ``os.urandom``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import nacl.signing
import numpy as np

from fedloom.algorithms.secagg.keys import SecAggKeys
from fedloom.federation.seeds import entity_rng, entity_seed
from fedloom.transport.secagg_keys import RosterSecAggKeys

_KEY_LABEL = "secagg-identity"
_SECRET_LABEL = "secagg-secret"


def derived_signing_key(node_id: str, seed: int) -> nacl.signing.SigningKey:
    """The Ed25519 key of ``node_id`` in run ``seed`` (256 bits from the seed sequence)."""
    state = entity_seed(seed, _KEY_LABEL, node_id).generate_state(8, dtype=np.uint32)
    return nacl.signing.SigningKey(state.astype("<u4").tobytes())


def derived_secagg_keys(
    node_ids: Iterable[str], seed: int, roles: Mapping[str, str] | None = None
) -> dict[str, SecAggKeys]:
    """One ``SecAggKeys`` per node in ``node_ids``, each knowing every other node's public
    key (and ``roles``, node id -> role, as a roster would: members then refuse seals
    naming a non-site; None: no roles known); deterministic in ``seed`` (keys and fresh
    secrets alike)."""
    ids = list(dict.fromkeys(node_ids))
    signing = {node: derived_signing_key(node, seed) for node in ids}
    table = {node: bytes(key.verify_key) for node, key in signing.items()}
    out: dict[str, SecAggKeys] = {}
    for node in ids:
        rng = entity_rng(seed, _SECRET_LABEL, node)
        out[node] = RosterSecAggKeys(
            node, signing[node], table, fresh_secret=_secret_source(rng), roles=roles
        )
    return out


def _secret_source(rng: np.random.Generator) -> Callable[[], bytes]:
    def draw() -> bytes:
        return rng.bytes(32)

    return draw
