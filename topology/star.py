"""Star planner: every site talks directly to one root aggregator in a data centre."""

from __future__ import annotations

from collections.abc import Iterable

from fedloom.topology.plan import NodeSpec, Plan, dc_site_id
from fedloom.topology.planning import check_sites, dc_site
from fedloom.topology.specs import Site
from fedloom.topology.wan import WanModel


def star(
    sites: Iterable[Site],
    root_id: str = "root",
    root_region: str | None = None,
    *,
    wan: WanModel | None = None,
    root_site: Site | None = None,
) -> Plan:
    """One root (hosted on ``f"{root_id}@dc"``) whose children are all the sites."""
    members = check_sites(sites, "star", reserved=(root_id, dc_site_id(root_id)))
    host = dc_site(root_id, members, root_region, root_site)
    site_ids = tuple(s.id for s in members)
    nodes = [NodeSpec(id=root_id, role="root", children=site_ids, host=host.id)]
    nodes.extend(
        NodeSpec(id=s.id, role="site", parent=root_id, host=s.id, region=s.region) for s in members
    )
    return Plan(
        kind="star",
        nodes=tuple(nodes),
        sites=(host, *members),
        wan=wan if wan is not None else WanModel(),
        meta={"planner": "star", "root_region": host.region},
    )
