"""Sites, links, clustering and gossip graphs, turned into a plain, serialisable ``Plan``."""

from fedloom.topology.clustering import auto_kmedoids, kmedoids
from fedloom.topology.election import Election, elect, election_scores
from fedloom.topology.gossip import (
    GRAPHS,
    gossip,
    gossip_graph,
    metropolis_hastings,
    metropolis_hastings_matrix,
    mixing_matrix,
    plan_from_neighbours,
    spectral_gap,
)
from fedloom.topology.hierarchical import MAX_RTT_CLUSTER_SITES, hierarchical, region_node_id
from fedloom.topology.plan import KINDS, ROLES, NodeSpec, Plan, dc_site_id, load_plan, save_plan
from fedloom.topology.specs import Link, Site
from fedloom.topology.star import star
from fedloom.topology.summary import format_summary, summarize
from fedloom.topology.wan import (
    CITY_COORDS,
    WanModel,
    mean_rtt_within,
    region_rtt_from_coords,
    rtt_matrix,
)

__all__ = [
    "CITY_COORDS",
    "GRAPHS",
    "KINDS",
    "MAX_RTT_CLUSTER_SITES",
    "ROLES",
    "Election",
    "Link",
    "NodeSpec",
    "Plan",
    "Site",
    "WanModel",
    "auto_kmedoids",
    "dc_site_id",
    "elect",
    "election_scores",
    "format_summary",
    "gossip",
    "gossip_graph",
    "hierarchical",
    "kmedoids",
    "load_plan",
    "mean_rtt_within",
    "metropolis_hastings",
    "metropolis_hastings_matrix",
    "mixing_matrix",
    "plan_from_neighbours",
    "region_node_id",
    "region_rtt_from_coords",
    "rtt_matrix",
    "save_plan",
    "spectral_gap",
    "star",
    "summarize",
]
