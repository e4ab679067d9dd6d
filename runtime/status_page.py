"""The status page: a status document (``runtime.status``) rendered as one HTML page.

Rendered on the server, self-contained: inline CSS, inline SVG for the topology (the tiers
as columns: this node, its children, the sites under its regions; green connected, red
disconnected, grey not linked to this node; each with the age of its last update) and for
the model version and accuracy curves. No script at all: the page reloads itself every
``REFRESH_S`` seconds (``<meta http-equiv="refresh">``) and ``runtime.health`` serves it
with ``CSP`` (nothing may be loaded from anywhere). Every string in the document (node ids
from configs and rosters, refusal codes and reasons from peers) is escaped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

__all__ = ["CSP", "REFRESH_S", "age_text", "member_link", "render"]

REFRESH_S = 5
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
MAX_DRAWN = 60  # nodes drawn per tier column (the rest are counted)

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#f7f8fa}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
.facts{display:flex;flex-wrap:wrap;gap:.5em 1.5em;margin:.4em 0}
.facts span b{font-weight:600}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #d5d9e0;padding:.2em .6em;text-align:left}
th{background:#eef1f5}.ok{color:#1a7f37}.bad{color:#c62828}.muted{color:#6b7380}
svg{background:#fff;border:1px solid #d5d9e0}
pre{background:#fff;border:1px solid #d5d9e0;padding:.5em;overflow:auto}
"""

_GREEN, _RED, _GREY = "#2da44e", "#d1242f", "#8c959f"


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def age_text(seconds: object) -> str:
    """An age in seconds as a person reads it ("40 s ago", "12 min ago", "2.5 h ago");
    "never" for anything not a number."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "never"
    s = float(seconds)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def member_link(node: Mapping[str, Any]) -> tuple[str, list[object]]:
    """How a member of the document's tiers is linked: "connected", "disconnected", "via
    its region" (a site under a region), or "claimed" (a region's word, unchecked: no
    ``[subtrees]``; its ``parent`` names the region); and the other regions that also
    claim it (8 at the most)."""
    connected = node.get("connected")
    link = (
        "connected"
        if connected is True
        else "disconnected"
        if connected is False
        else "via its region"
    )
    if node.get("claimed"):
        link = "claimed"
    disputed = node.get("disputed_by")
    return link, list(disputed[:8]) if isinstance(disputed, list) else []


def _colour(node: Mapping[str, Any]) -> str:
    connected = node.get("connected")
    if connected is True:
        return _GREEN
    if connected is False:
        return _RED
    return _GREY


def _topology(tiers: Sequence[Sequence[Mapping[str, Any]]]) -> str:
    columns = [list(t) for t in tiers if t]
    if not columns:
        return ""
    col_w, row_h, top = 230, 34, 28
    rows = max(min(len(c), MAX_DRAWN + 1) for c in columns)
    width, height = col_w * len(columns) + 20, top + rows * row_h + 10
    names = ("this node", "children", "sites under regions")
    where: dict[str, tuple[float, float]] = {}
    parts: list[str] = []
    boxes: list[str] = []
    for i, column in enumerate(columns):
        x = 10 + i * col_w
        parts.append(
            f'<text x="{x}" y="16" font-size="12" fill="#6b7380">{_e(names[min(i, 2)])}</text>'
        )
        for j, node in enumerate(column[:MAX_DRAWN]):
            y = top + j * row_h
            nid = str(node.get("id", ""))
            where.setdefault(nid, (x, y + 13))
            boxes.append(
                f'<g class="node" data-id="{_e(nid)}">'
                f'<rect x="{x}" y="{y}" width="{col_w - 40}" height="26" rx="5" fill="#fff" '
                f'stroke="{_colour(node)}" stroke-width="2"/>'
                f'<circle cx="{x + 12}" cy="{y + 13}" r="5" fill="{_colour(node)}"/>'
                f'<text x="{x + 22}" y="{y + 17}" font-size="12">{_e(nid[:24])}'
                f'<tspan fill="#6b7380"> {_e(node.get("role", ""))}'
                f"{'' if i == 0 else ' · ' + _e(age_text(node.get('last_update_age_s')))}"
                "</tspan></text></g>"
            )
        if len(column) > MAX_DRAWN:
            y = top + MAX_DRAWN * row_h + 16
            boxes.append(
                f'<text x="{x}" y="{y}" font-size="12" fill="#6b7380">'
                f"+ {len(column) - MAX_DRAWN} more</text>"
            )
    for column in columns[1:]:
        for node in column[:MAX_DRAWN]:
            here = where.get(str(node.get("id", "")))
            there = where.get(str(node.get("parent")))
            if here is None or there is None:
                continue
            parts.append(
                f'<line x1="{there[0] + col_w - 40}" y1="{there[1]}" x2="{here[0]}" '
                f'y2="{here[1]}" stroke="#c0c6cf"/>'
            )
    return (
        f'<svg id="topology" role="img" aria-label="topology" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}{"".join(boxes)}</svg>'
    )


def _finite(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]


def _curve(
    element_id: str,
    title: str,
    points: Sequence[tuple[float, float]],
    step: bool,
    x_unit: str = "{:.0f} s",
) -> str:
    pts = _finite(points)
    width, height, pad = 520, 200, 36
    head = (
        f'<svg id="{element_id}" role="img" aria-label="{_e(title)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
        f'<text x="{pad}" y="16" font-size="12" fill="#6b7380">{_e(title)}</text>'
    )
    if not pts:
        return head + f'<text x="{pad}" y="{height / 2}" font-size="12">no data yet</text></svg>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)

    def frac(v: float, lo: float, hi: float) -> float:
        span = hi - lo
        return (v - lo) / span if span > 0 and math.isfinite(span) else 0.5

    def sx(x: float) -> float:
        return pad + frac(x, x0, x1) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad + 10 - frac(y, y0, y1) * (height - 2 * pad)

    coords: list[str] = []
    prev: tuple[float, float] | None = None
    for x, y in pts:
        if step and prev is not None:
            coords.append(f"{sx(x):.1f},{sy(prev[1]):.1f}")
        coords.append(f"{sx(x):.1f},{sy(y):.1f}")
        prev = (x, y)
    axis = (
        f'<line x1="{pad}" y1="{height - pad + 10}" x2="{width - pad}" y2="{height - pad + 10}" '
        f'stroke="#c0c6cf"/><line x1="{pad}" y1="26" x2="{pad}" y2="{height - pad + 10}" '
        'stroke="#c0c6cf"/>'
        f'<text x="2" y="30" font-size="11">{y1:.4g}</text>'
        f'<text x="2" y="{height - pad + 10}" font-size="11">{y0:.4g}</text>'
        f'<text x="{pad}" y="{height - 6}" font-size="11">{_e(x_unit.format(x0))}</text>'
        f'<text x="{width - pad - 40}" y="{height - 6}" font-size="11">'
        f"{_e(x_unit.format(x1))}</text>"
    )
    line = (
        f'<polyline class="curve" fill="none" stroke="#0969da" stroke-width="2" '
        f'points="{" ".join(coords)}"/>'
    )
    return head + axis + line + "</svg>"


def _facts(doc: Mapping[str, Any]) -> str:
    node = doc.get("node") or {}
    model = doc.get("model") or {}
    acc = doc.get("accuracy") or []
    last_acc = acc[-1][2] if acc and isinstance(acc[-1][2], int | float) else None
    privacy = doc.get("privacy")
    federated = federated_points(doc)
    items = [
        ("role", node.get("role")),
        ("model version", model.get("version")),
        ("last new version", age_text(model.get("version_age_s"))),
        ("accuracy", "—" if last_acc is None else f"{last_acc:.4f}"),
        *(
            [("federated accuracy", f"{federated[-1][1]:.4f} at v{federated[-1][0]:.0f}")]
            if federated
            else []
        ),
        ("algorithm", node.get("algorithm") or "—"),
        ("secure aggregation", "on" if node.get("secure_aggregation") else "off"),
        ("roster version", node.get("roster_version")),
        ("uptime", f"{float(node.get('uptime_s') or 0):.0f} s"),
    ]
    if isinstance(privacy, Mapping):
        budget = privacy.get("epsilon_budget")
        eps = privacy.get("epsilon")
        text = f"ε = {eps:.4g}" if isinstance(eps, int | float) else "ε = ?"
        if isinstance(budget, int | float):
            text += f" of {budget:.4g}"
        if privacy.get("exhausted"):
            text += " (exhausted)"
        items.append(("privacy", text))
    spans = "".join(
        f'<span id="fact-{_e(k.replace(" ", "-"))}"><b>{_e(k)}:</b> {_e(v)}</span>'
        for k, v in items
    )
    return f'<div class="facts">{spans}</div>'


def _sites_table(tiers: Sequence[Sequence[Mapping[str, Any]]]) -> str:
    rows = []
    for tier in tiers[1:]:
        for node in tier:
            link, others = member_link(node)
            css = {"connected": "ok", "disconnected": "bad"}.get(link, "muted")
            text = f"claimed by {node.get('parent') or '?'}" if link == "claimed" else link
            state = f'<span class="{css}">{_e(text)}</span>'
            if others:
                also = ", ".join(_e(r) for r in others)
                state += f' <span class="bad">also claimed by {also}</span>'
            rows.append(
                f"<tr><td>{_e(node.get('id'))}</td><td>{_e(node.get('role'))}</td>"
                f"<td>{_e(node.get('parent') or '')}</td><td>{state}</td>"
                f"<td>{_e(age_text(node.get('last_update_age_s')))}</td>"
                f"<td>{_e(node.get('updates', 0))}</td></tr>"
            )
    if not rows:
        return '<p class="muted">no children</p>'
    return (
        '<table id="members"><tr><th>node</th><th>role</th><th>under</th><th>link</th>'
        f"<th>last update</th><th>updates</th></tr>{''.join(rows)}</table>"
    )


def _refusals(view: object) -> str:
    if not isinstance(view, Mapping) or not view:
        return '<p class="muted">none</p>'
    rows = []
    for site, entry in list(view.items())[:200]:
        e = entry if isinstance(entry, Mapping) else {"reason": entry}
        rows.append(
            f"<tr><td>{_e(site)}</td><td>{_e(e.get('code', ''))}</td>"
            f"<td>{_e(e.get('count', ''))}</td><td>{_e(e.get('version', ''))}</td>"
            f"<td>{_e(age_text(e.get('last_age_s')))}</td><td>{_e(e.get('reason', ''))}</td></tr>"
        )
    return (
        '<table id="refusals"><tr><th>site</th><th>code</th><th>count</th>'
        f"<th>version</th><th>last</th><th>reason</th></tr>{''.join(rows)}</table>"
    )


def _json_block(element_id: str, value: object) -> str:
    if value is None:
        return '<p class="muted">not configured</p>'
    text = json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False)[:20000]
    return f'<pre id="{element_id}">{_e(text)}</pre>'


def federated_points(doc: Mapping[str, Any]) -> list[tuple[float, float]]:
    """(version, accuracy) of each published federated evaluation (``runtime.reports``)."""
    fed = doc.get("federated_evaluation")
    ev = fed.get("evaluation") if isinstance(fed, Mapping) else None
    published = ev.get("published") if isinstance(ev, Mapping) else None
    out: list[tuple[float, float]] = []
    for entry in published if isinstance(published, list) else []:
        if not isinstance(entry, Mapping):
            continue
        v, a = entry.get("version"), entry.get("accuracy")
        if isinstance(v, int | float) and isinstance(a, int | float):
            out.append((float(v), float(a)))
    return out


def render(doc: Mapping[str, Any]) -> str:
    """The HTML page of status document ``doc``."""
    node = doc.get("node") or {}
    tiers = doc.get("tiers") or []
    versions = [(float(t), float(v)) for t, v in doc.get("versions") or []]
    accuracy = [
        (float(p[0]), float(p[2]))
        for p in doc.get("accuracy") or []
        if isinstance(p[2], int | float)
    ]
    curves = [
        _curve("versions", "model version over time", versions, step=True),
        _curve("accuracy", "accuracy (own evaluation) over time", accuracy, step=False),
    ]
    federated = federated_points(doc)
    if federated:
        title = "federated accuracy (the sites' held-out data) by version"
        curves.append(_curve("federated-accuracy", title, federated, False, "v{:.0f}"))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{REFRESH_S}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e('fedloom · ' + str(node.get('id', '?')))}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f'<h1 id="node">{_e(node.get("id", "?"))}</h1>'
        f"{_facts(doc)}"
        f"<h2>Topology</h2>{_topology(tiers)}"
        f"<h2>Progress</h2>{' '.join(curves)}"
        f"<h2>Members</h2>{_sites_table(tiers)}"
        f"<h2>Refusals</h2>{_refusals(doc.get('refusals'))}"
        "<h2>Federated evaluation</h2>"
        f"{_json_block('federated-evaluation', doc.get('federated_evaluation'))}"
        f'<p class="muted">schema {_e(doc.get("schema", ""))} · '
        f'<a href="/status.json">status.json</a> · <a href="/metrics">metrics</a></p>'
        "</body></html>"
    )
