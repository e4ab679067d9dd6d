"""Human-readable facts about a Plan: sizes, clusters and their aggregators, gossip degrees."""

from __future__ import annotations

from typing import Any

from fedloom.topology.plan import Plan


def summarize(plan: Plan) -> dict[str, Any]:
    """A plain dict: kind, counts, clusters (regional aggregators), degrees, spectral gap."""
    members = [n for n in plan.nodes if n.role in ("site", "peer")]
    out: dict[str, Any] = {
        "kind": plan.kind,
        "n_sites": len(members),
        "n_nodes": len(plan.nodes),
        "n_regions": len({plan.site(n.id).region for n in members}),
        "roots": list(plan.roots),
        "spectral_gap": plan.spectral_gap,
    }
    clusters: list[dict[str, Any]] = []
    for node in plan.nodes:
        if node.role == "region":
            clusters.append(
                {
                    "id": node.id,
                    "name": node.region,
                    "size": len(node.children),
                    "aggregator": node.host,
                    "standby": node.standby,
                }
            )
    if clusters:
        sizes = [len(n.children) for n in plan.nodes if n.role == "region"]
        out["clusters"] = clusters
        out["cluster_size"] = {
            "min": min(sizes),
            "mean": sum(sizes) / len(sizes),
            "max": max(sizes),
        }
    if plan.kind == "gossip":
        degrees = [len(n.peers) for n in plan.nodes]
        out["degree"] = {
            "min": min(degrees),
            "mean": sum(degrees) / len(degrees),
            "max": max(degrees),
        }
        out["graph"] = plan.meta.get("graph")
        out["no_inbound"] = sum(1 for n in members if not plan.site(n.id).inbound)
    return out


def format_summary(plan: Plan, *, max_clusters: int = 50) -> str:
    """Plain-text lines: a header, then a cluster table (hierarchical) or degree line (gossip)."""
    s = summarize(plan)
    gap = "n/a" if s["spectral_gap"] is None else f"{s['spectral_gap']:.6g}"
    lines = [
        f"plan: {s['kind']}",
        f"sites: {s['n_sites']}  nodes: {s['n_nodes']}  region labels: {s['n_regions']}",
    ]
    if s["roots"]:
        roots = ", ".join(f"{r} on {plan.host_site(r).id}" for r in s["roots"])
        lines.append(f"root: {roots}")
    if "clusters" in s:
        size = s["cluster_size"]
        lines.append(
            f"clusters: {len(s['clusters'])}  size min/mean/max: "
            f"{size['min']}/{size['mean']:.1f}/{size['max']}"
        )
        rows = [("cluster", "sites", "aggregator", "standby")]
        rows += [
            (str(c["name"]), str(c["size"]), str(c["aggregator"]), str(c["standby"] or "-"))
            for c in s["clusters"][:max_clusters]
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if len(s["clusters"]) > max_clusters:
            lines.append(f"... {len(s['clusters']) - max_clusters} more clusters")
    if "degree" in s:
        d = s["degree"]
        lines.append(
            f"graph: {s['graph']}  degree min/mean/max: {d['min']}/{d['mean']:.2f}/{d['max']}"
        )
        lines.append(f"peers refusing inbound connections: {s['no_inbound']}")
    lines.append(f"spectral gap: {gap}")
    return "\n".join(line.rstrip() for line in lines)
