"""Draw a topology Plan to a PNG (matplotlib, Agg backend).

Hierarchical plans are drawn radially: the root in the centre, regional aggregators on an inner
ring, sites on an outer ring in their cluster's sector, coloured by cluster. Large plans show a
deterministic sample of sites (said in the title). Gossip plans use a circular layout with every
edge; star plans put the root in the centre and the sites around it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.topology.plan import Plan

MAX_DRAWN_SITES = 600


def draw_plan(plan: Plan, path: Path) -> None:
    """Render ``plan`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    fig, ax = plt.subplots(figsize=(9, 9), dpi=110)
    try:
        if plan.kind == "hierarchical":
            subtitle = _draw_hierarchical(plan, ax, LineCollection)
        elif plan.kind == "gossip":
            subtitle = _draw_gossip(plan, ax, LineCollection)
        else:
            subtitle = _draw_star(plan, ax, LineCollection)
        n_sites = sum(1 for node in plan.nodes if node.role in ("site", "peer"))
        gap = "" if plan.spectral_gap is None else f", spectral gap {plan.spectral_gap:.4g}"
        ax.set_title(f"{plan.kind}: {n_sites} sites{gap}\n{subtitle}", fontsize=11)
        ax.set_aspect("equal")
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(Path(path), format="png")
    finally:
        plt.close(fig)


def _sample(ids: list[str], limit: int, keep: tuple[str | None, ...] = ()) -> list[str]:
    """Evenly spaced ids (deterministic), plus the ``keep`` ids, in their original order."""
    if len(ids) <= limit:
        return ids
    picks = set(np.linspace(0, len(ids) - 1, limit).round().astype(int).tolist())
    wanted = {k for k in keep if k is not None}
    return [node_id for i, node_id in enumerate(ids) if i in picks or node_id in wanted]


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if n > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(n)]


def _draw_hierarchical(plan: Plan, ax: Any, line_collection: Any) -> str:
    regions = [n for n in plan.nodes if n.role == "region"]
    total = sum(len(r.children) for r in regions)
    budget = MAX_DRAWN_SITES
    # Every cluster keeps at least one drawn site; the rest of the budget is proportional.
    # The aggregator host and standby are always drawn.
    shown = {
        r.id: _sample(
            list(r.children),
            max(1, round(budget * len(r.children) / max(total, 1))),
            keep=(r.host, r.standby),
        )
        for r in regions
    }
    drawn = sum(len(v) for v in shown.values())
    colors = _colors(len(regions))
    segments: list[list[tuple[float, float]]] = []
    seg_colors: list[Any] = []
    start = 0.0
    for region, color in zip(regions, colors, strict=True):
        members = shown[region.id]
        span = 2 * math.pi * len(members) / max(drawn, 1)
        mid = start + span / 2
        rx, ry = math.cos(mid), math.sin(mid)
        segments.append([(0.0, 0.0), (rx, ry)])
        seg_colors.append((0.3, 0.3, 0.3, 0.8))
        xs, ys = [], []
        for k, site_id in enumerate(members):
            angle = start + span * (k + 0.5) / len(members)
            x, y = 2.0 * math.cos(angle), 2.0 * math.sin(angle)
            xs.append(x)
            ys.append(y)
            segments.append([(rx, ry), (x, y)])
            seg_colors.append((*color[:3], 0.25))
            if site_id == region.host:
                ax.scatter([x], [y], s=90, marker="*", color=color, edgecolors="k", zorder=4)
            elif site_id == region.standby:
                ax.scatter([x], [y], s=50, facecolors="none", edgecolors=color, zorder=4)
        ax.scatter(xs, ys, s=8, color=color, zorder=3)
        ax.scatter([rx], [ry], s=140, marker="s", color=color, edgecolors="k", zorder=5)
        ax.annotate(str(region.region), (rx * 1.12, ry * 1.12), ha="center", fontsize=7)
        start += span
    ax.add_collection(line_collection(segments, colors=seg_colors, linewidths=0.5, zorder=1))
    ax.scatter([0.0], [0.0], s=220, marker="o", color="black", zorder=6)
    ax.set_xlim(-2.3, 2.3)
    ax.set_ylim(-2.3, 2.3)
    sampled = f"showing {drawn} of {total} sites (sampled)" if drawn < total else "all sites"
    return f"{len(regions)} clusters; {sampled}; ★ aggregator host, ○ standby"


def _region_colors(plan: Plan, ids: list[str]) -> list[Any]:
    labels = sorted({plan.site(i).region for i in ids})
    palette = dict(zip(labels, _colors(len(labels)), strict=True))
    return [palette[plan.site(i).region] for i in ids]


def _draw_gossip(plan: Plan, ax: Any, line_collection: Any) -> str:
    ids = [n.id for n in plan.nodes]
    if len(ids) > MAX_DRAWN_SITES:
        ids = ids[:MAX_DRAWN_SITES]  # a contiguous arc keeps ring/exponential structure visible
    index = {node_id: k for k, node_id in enumerate(ids)}
    angles = np.linspace(0.0, 2 * math.pi, len(ids), endpoint=False)
    xy = np.column_stack([np.cos(angles), np.sin(angles)])
    segments = [
        [tuple(xy[i]), tuple(xy[index[p]])]
        for node_id, i in index.items()
        for p in plan.node(node_id).peers
        if p in index and index[p] > i
    ]
    ax.add_collection(line_collection(segments, colors=[(0.2, 0.2, 0.5, 0.25)], linewidths=0.5))
    ax.scatter(xy[:, 0], xy[:, 1], s=14, c=_region_colors(plan, ids), zorder=3)
    ax.set_xlim(-1.15, 1.15)
    ax.set_ylim(-1.15, 1.15)
    graph = plan.meta.get("graph", "graph")
    if len(ids) < len(plan.nodes):
        return f"{graph}; induced subgraph of the first {len(ids)} of {len(plan.nodes)} peers"
    return f"{graph}; all peers, coloured by region"


def _draw_star(plan: Plan, ax: Any, line_collection: Any) -> str:
    root = plan.roots[0]
    children = list(plan.children_of(root))
    ids = _sample(children, MAX_DRAWN_SITES)
    angles = np.linspace(0.0, 2 * math.pi, len(ids), endpoint=False)
    xy = np.column_stack([np.cos(angles), np.sin(angles)])
    segments = [[(0.0, 0.0), tuple(p)] for p in xy]
    ax.add_collection(line_collection(segments, colors=[(0.3, 0.3, 0.3, 0.3)], linewidths=0.5))
    ax.scatter(xy[:, 0], xy[:, 1], s=14, c=_region_colors(plan, ids), zorder=3)
    ax.scatter([0.0], [0.0], s=220, color="black", zorder=4)
    ax.set_xlim(-1.15, 1.15)
    ax.set_ylim(-1.15, 1.15)
    if len(ids) < len(children):
        return f"root {root}; showing {len(ids)} of {len(children)} sites (sampled)"
    return f"root {root}; sites coloured by region"
