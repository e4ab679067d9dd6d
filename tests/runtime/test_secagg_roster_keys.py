"""A daemon's secure-aggregation keys come from its identity and the signed roster; a newer
roster (``bound_claims``, called for every roster installed) swaps its keys in, so a site
added later can be paired with, and one the roster lacks is refused, not a crash."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.algorithms.secagg.keys import SecAggKeyError
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.federation.secagg_params import SecureAggregationConfig
from fedloom.runtime.nodes import bound_claims, secagg_keys_of
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.secagg_keys import RosterSecAggKeys
from tests.runtime.test_config import parse, site_raw

IDS = {
    n: Identity.generate(n, r)
    for n, r in (("root", "root"), ("site-1", "site"), ("site-2", "site"))
}


def roster(version: int, *names: str) -> Roster:
    return Roster(version, [RosterEntry(n, IDS[n].role, IDS[n].public_key) for n in names])


def test_a_newer_roster_swaps_the_sites_keys_in() -> None:
    keys = RosterSecAggKeys("site-1", IDS["site-1"], roster(1, "root", "site-1"))
    node = build_node(
        "site",
        "site-1",
        "fedbuff",
        AlgorithmConfig(),
        TrainingConfig(lr=0.1, local_steps=1, batch_size=1, mu=0.0),
        Neighbours(parent="root", parent_role="root"),
        seed=0,
        secagg=SecureAggregationConfig(enabled=True),
        secagg_keys=keys,
    )
    assert secagg_keys_of(node) is keys
    with pytest.raises(SecAggKeyError):
        keys.pair_seed("site-2", b"context")  # not in roster version 1
    cfg = parse({**site_raw(), "codec": {"up": "fp32"}, "secure_aggregation": {"enabled": True}})
    bound_claims(cfg, node, roster(2, "root", "site-1", "site-2"))
    other = RosterSecAggKeys("site-2", IDS["site-2"], roster(2, "root", "site-1", "site-2"))
    seed = keys.pair_seed("site-2", b"context")
    assert seed == other.pair_seed("site-1", b"context") and len(seed) == 32
    assert np.frombuffer(seed, np.uint8).any()
