"""Electing the site that hosts a cluster's regional aggregator, and its standby.

Score (higher is better), each term normalised to [0, 1] within the cluster:

    score_i = 0.5 · closeness_i + 0.5 · bandwidth_i
    closeness_i = min_j mean_rtt_j / mean_rtt_i   (mean RTT from i to the other members)
    bandwidth_i = (uplink_i + downlink_i) / max_j (uplink_j + downlink_j)

Sites that accept inbound connections are ranked before those that do not (children dial in
to their aggregator); among equals the higher score wins, then the smaller site id. The
winner hosts the aggregator; the runner-up is the standby.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedloom.topology.specs import Site
from fedloom.topology.wan import WanModel, mean_rtt_within

CLOSENESS_WEIGHT = 0.5
BANDWIDTH_WEIGHT = 0.5


@dataclass(frozen=True, slots=True)
class Election:
    host: Site
    standby: Site | None
    scores: tuple[float, ...]  # one per member, in the order given


def election_scores(members: Sequence[Site], wan: WanModel) -> np.ndarray:
    """The score above for each member (vectorised; O(m · regions in the cluster))."""
    mean_rtt = mean_rtt_within(members, wan)
    best = float(mean_rtt.min()) if len(members) else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        closeness = np.where(mean_rtt > 0.0, best / mean_rtt, 1.0)
    bandwidth = np.fromiter(
        (s.uplink_bps + s.downlink_bps for s in members), dtype=np.float64, count=len(members)
    )
    bandwidth /= bandwidth.max()
    scores: np.ndarray = CLOSENESS_WEIGHT * closeness + BANDWIDTH_WEIGHT * bandwidth
    return scores


def elect(members: Sequence[Site], wan: WanModel) -> Election:
    """Pick the aggregator host and standby for one cluster (see the module docstring)."""
    if not members:
        raise ValueError("elect: empty cluster")
    scores = election_scores(members, wan)
    order = sorted(
        range(len(members)),
        key=lambda i: (not members[i].inbound, -scores[i], members[i].id),
    )
    return Election(
        host=members[order[0]],
        standby=members[order[1]] if len(order) > 1 else None,
        scores=tuple(float(x) for x in scores),
    )
