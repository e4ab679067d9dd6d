"""Hierarchical planner: sites -> regional aggregators -> one root (HierFAVG-style tiers).

Clusters come from region labels (``by="region"``) or from measured RTTs (``by="rtt"``:
k-medoids, with k chosen by silhouette when ``n_clusters`` is not given; see
``topology.clustering``). Each cluster gets a regional aggregator node ``region-{name}``
hosted on the site elected by ``topology.election`` and a standby (the runner-up).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

from fedloom.topology.clustering import auto_kmedoids, kmedoids
from fedloom.topology.election import elect
from fedloom.topology.plan import NodeSpec, Plan, dc_site_id
from fedloom.topology.planning import check_sites, dc_site
from fedloom.topology.specs import Site
from fedloom.topology.wan import WanModel, rtt_matrix

# Clustering by RTT needs the dense n × n matrix; beyond this, cluster by region label.
MAX_RTT_CLUSTER_SITES = 3_000


def region_node_id(cluster: str) -> str:
    return f"region-{cluster}"


def hierarchical(
    sites: Iterable[Site],
    wan: WanModel,
    by: Literal["region", "rtt"] = "region",
    n_clusters: int | None = None,
    root_id: str = "root",
    seed: int = 0,
    *,
    root_region: str | None = None,
    root_site: Site | None = None,
) -> Plan:
    """Build a root -> regional aggregators -> sites plan."""
    members = check_sites(sites, "hierarchical", reserved=(root_id, dc_site_id(root_id)))
    if by == "region":
        named = _clusters_by_region(members, n_clusters)
    elif by == "rtt":
        named = _clusters_by_rtt(members, wan, n_clusters, seed)
    else:
        raise ValueError(f"hierarchical: by must be 'region' or 'rtt', got {by!r}")

    site_ids = {s.id for s in members}
    for name, _ in named:
        if region_node_id(name) in site_ids or region_node_id(name) == root_id:
            raise ValueError(
                f"hierarchical: node id {region_node_id(name)!r} clashes with a site or root id"
            )

    host = dc_site(root_id, members, root_region, root_site)
    region_ids = tuple(region_node_id(name) for name, _ in named)
    nodes: list[NodeSpec] = [NodeSpec(id=root_id, role="root", children=region_ids, host=host.id)]
    clusters_meta: list[dict[str, object]] = []
    for (name, cluster), region_id in zip(named, region_ids, strict=True):
        chosen = elect(cluster, wan)
        nodes.append(
            NodeSpec(
                id=region_id,
                role="region",
                parent=root_id,
                children=tuple(s.id for s in cluster),
                host=chosen.host.id,
                region=name,
                standby=None if chosen.standby is None else chosen.standby.id,
            )
        )
        nodes.extend(
            NodeSpec(id=s.id, role="site", parent=region_id, host=s.id, region=name)
            for s in cluster
        )
        clusters_meta.append({"name": name, "size": len(cluster)})
    return Plan(
        kind="hierarchical",
        nodes=tuple(nodes),
        sites=(host, *members),
        wan=wan,
        meta={
            "planner": "hierarchical",
            "by": by,
            "seed": seed,
            "n_clusters": len(named),
            "root_region": host.region,
        },
    )


def _clusters_by_region(
    members: Sequence[Site], n_clusters: int | None
) -> list[tuple[str, list[Site]]]:
    groups: dict[str, list[Site]] = {}
    for s in members:
        groups.setdefault(s.region, []).append(s)
    if n_clusters is not None and n_clusters != len(groups):
        raise ValueError(
            f"hierarchical(by='region') makes one cluster per region label ({len(groups)} here) "
            f"and cannot honour n_clusters={n_clusters}; use by='rtt' to choose the count"
        )
    return sorted(groups.items())


def _clusters_by_rtt(
    members: Sequence[Site], wan: WanModel, n_clusters: int | None, seed: int
) -> list[tuple[str, list[Site]]]:
    n = len(members)
    if n > MAX_RTT_CLUSTER_SITES:
        raise ValueError(
            f"hierarchical(by='rtt') needs a dense {n} x {n} RTT matrix and is limited to "
            f"{MAX_RTT_CLUSTER_SITES} sites; use by='region' for larger populations"
        )
    if n_clusters is not None and not 1 <= n_clusters <= n:
        raise ValueError(f"hierarchical: n_clusters must be in 1..{n}, got {n_clusters}")
    rtt = rtt_matrix(members, wan)
    groups = (
        auto_kmedoids(rtt, seed=seed)
        if n_clusters is None
        else kmedoids(rtt, n_clusters, seed=seed)
    )
    clusters = [[members[i] for i in g] for g in groups]
    return list(zip(_cluster_names(clusters), clusters, strict=True))


def _cluster_names(clusters: Sequence[Sequence[Site]]) -> list[str]:
    """Name each cluster after its most common region label, suffixed -2, -3... on repeats."""
    names: list[str] = []
    taken: set[str] = set()
    for cluster in clusters:
        counts = Counter(s.region for s in cluster)
        base = min(counts, key=lambda r: (-counts[r], r))
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}-{k}"
        taken.add(name)
        names.append(name)
    return names
