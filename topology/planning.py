"""Helpers shared by the planners: input checks and the data-centre site that hosts a root."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from fedloom.topology.plan import dc_site_id
from fedloom.topology.specs import Site

# Defaults for the machine that runs the root aggregator: a well-connected data centre.
DC_BANDWIDTH_BPS = 10e9
DC_ACCESS_LATENCY_S = 0.001


def check_sites(sites: Iterable[Site], planner: str, *, reserved: Iterable[str] = ()) -> list[Site]:
    """Materialise ``sites``; refuse an empty list, non-Site items, duplicates, reserved ids."""
    out = list(sites)
    if not out:
        raise ValueError(f"{planner}: no sites given")
    seen: set[str] = set()
    taken = set(reserved)
    for s in out:
        if not isinstance(s, Site):
            raise ValueError(f"{planner}: expected Site objects, got {s!r}")
        if s.id in seen:
            raise ValueError(f"{planner}: duplicate site id {s.id!r}")
        if s.id in taken:
            raise ValueError(f"{planner}: site id {s.id!r} clashes with a node id of the plan")
        seen.add(s.id)
    return out


def most_common_region(sites: Sequence[Site]) -> str:
    """The region label with the most sites (ties broken alphabetically)."""
    counts = Counter(s.region for s in sites)
    return min(counts, key=lambda r: (-counts[r], r))


def dc_site(
    root_id: str, sites: Sequence[Site], root_region: str | None, root_site: Site | None
) -> Site:
    """The Site entry for the machine hosting ``root_id``.

    Default: a data centre in ``root_region`` (or the most populated region) with 10 Gb/s
    links, 1 ms access latency and inbound connections allowed.
    """
    if root_site is not None:
        if root_site.id != dc_site_id(root_id):
            raise ValueError(f"root_site.id must be {dc_site_id(root_id)!r}, got {root_site.id!r}")
        return root_site
    return Site(
        id=dc_site_id(root_id),
        region=root_region if root_region is not None else most_common_region(sites),
        uplink_bps=DC_BANDWIDTH_BPS,
        downlink_bps=DC_BANDWIDTH_BPS,
        access_latency_s=DC_ACCESS_LATENCY_S,
        inbound=True,
    )
