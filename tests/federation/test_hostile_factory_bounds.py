"""Claim bounds as the node factory sets them, in both drivers: a root built by the
simulator and by the daemons from one hierarchical plan takes a region's inflated
``count`` (a field its signature does not cover) only up to the region's buffer: the
claim is counted as clamped and the bounded count is what the root records."""

from __future__ import annotations

import numpy as np

from fedloom.algorithms.aggregator_base import AggregatorBase
from fedloom.algorithms.protocol import Effect, Metric, PeerUp, Persist, Received
from fedloom.topology.hierarchical import hierarchical
from fedloom.topology.wan import WanModel
from fedloom.transport.wire import Hello, Update
from tests.federation.test_factory import PARAMS, SEED, arm, both_paths, sites


def clamped(effects: list[Effect]) -> list[str]:
    return [
        (m.labels or {}).get("field", "")
        for m in effects
        if isinstance(m, Metric) and m.name == "update_claim_clamped"
    ]


def applied_counts(effects: list[Effect]) -> list[int]:
    return [p.data["count"] for p in effects if isinstance(p, Persist) and p.key == "applied"]


def test_a_regions_inflated_count_is_clamped_by_the_factorys_bound_in_both_drivers() -> None:
    plan = hierarchical(sites(9), WanModel(), by="region", root_id="root", seed=SEED)
    regions = plan.node_ids("region")
    for nodes in both_paths(plan, arm("fedbuff", "hierarchical", PARAMS)):
        root = nodes["root"]
        assert isinstance(root, AggregatorBase)
        bound = root.claim_bounds.count_bound(regions[0], "region")
        assert bound == PARAMS.regional_buffer_size
        for r in regions:
            root.handle(PeerUp(r), 0.0)
            root.handle(Received(r, Hello(r, "region")), 0.0)
        version, weights = root.current_model()  # type: ignore[attr-defined]
        delta = {k: np.full_like(v, 0.01) for k, v in weights.items()}
        evil = Update(regions[0], 1, version, delta, 10, count=10**15)
        out = root.handle(Received(regions[0], evil), 1.0)
        assert clamped(out) == ["count"]
        assert applied_counts(out) == [bound]
