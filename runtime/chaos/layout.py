"""A local federation on disk: keys, a signed roster and one config per node.

``lay_out`` writes a star (root + sites) or a hierarchy (root -> regions -> sites) with
``runtime.demo.write_federation`` (the demo's plan, training and aggregation defaults, each
overridable), so ``fedloom chaos`` and ``fedloom local init`` produce the layout the demo and
the end-to-end tests use: ``keys/``, ``roster.toml``, ``consortium.pub``, ``<node>.toml``,
``state/<node>/``, ``logs/<node>.log``. A star is written as a one-region hierarchy whose
region is then taken out (its config and roster entry), the sites re-pointed at the root.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from runtime.demo import (
    DEMO_PLAN,
    DEMO_TRAINING,
    ROOT_ID,
    Federation,
    NodeFiles,
    site_examples,
    write_federation,
    write_roster,
)
from transport.identity import Identity

__all__ = ["README_NAME", "lay_out", "read_config", "set_parent_url", "write_readme"]

README_NAME = "README.txt"
_STAR_REGION = "region-0"


def read_config(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def _write_config(path: Path, cfg: Mapping[str, Any]) -> None:
    path.write_text(tomli_w.dumps(dict(cfg)), encoding="utf-8")


def lay_out(
    workdir: Path,
    regions: Mapping[str, Sequence[str]],
    *,
    star: bool = False,
    seed: int = 1,
    plan: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    root_aggregation: Mapping[str, Any] | None = None,
    region_aggregation: Mapping[str, Any] | None = None,
    connection: Mapping[str, Any] | None = None,
) -> Federation:
    """Write the federation into ``workdir`` (every node with a ``/metrics`` port).

    ``regions`` maps each region to its sites; with ``star`` it holds one entry whose sites
    become the root's children (the key is ignored).
    """
    if star:
        sites = [s for members in regions.values() for s in members]
        regions = {_STAR_REGION: sites}
    fed = write_federation(
        workdir,
        regions,
        seed=seed,
        plan={**DEMO_PLAN, **(plan or {})},
        training={**DEMO_TRAINING, **(training or {})},
        root_aggregation=root_aggregation,
        region_aggregation=region_aggregation,
        connection=connection,
        site_metrics=True,
    )
    return _to_star(fed, root_aggregation or {}) if star else fed


def _to_star(fed: Federation, root_aggregation: Mapping[str, Any]) -> Federation:
    """Take the one region out: the root aggregates the sites itself."""
    root = fed.nodes[ROOT_ID]
    region = fed.nodes[_STAR_REGION]
    sites = [n for n in fed.nodes.values() if n.role == "site"]
    root_cfg = read_config(root.config)
    root_cfg["children"] = [s.node_id for s in sites]
    if "regional_buffer_size" not in root_aggregation:
        # Only regions claim regional buffers; the sites' own bound applies.
        root_cfg["aggregation"].pop("regional_buffer_size", None)
    _write_config(root.config, root_cfg)
    assert root.url is not None
    for s in sites:
        set_parent_url(s.config, root.url, parent_id=ROOT_ID)
    region.config.unlink()
    keys = fed.workdir / "keys"
    for suffix in (".key", ".pub"):
        (keys / f"{_STAR_REGION}{suffix}").unlink(missing_ok=True)
    consortium = Identity.load(keys / "consortium.key")
    members = [Identity.load(keys / f"{n}.key") for n in fed.nodes if n != _STAR_REGION]
    examples = site_examples(fed.plan, [s.node_id for s in sites])
    write_roster(fed.roster, members, consortium, examples=examples)
    nodes: dict[str, NodeFiles] = {k: v for k, v in fed.nodes.items() if k != _STAR_REGION}
    return Federation(fed.workdir, fed.roster, fed.consortium_pub, fed.plan, nodes)


def set_parent_url(config: Path, url: str, *, parent_id: str | None = None) -> None:
    """Point a child's config at ``url`` (a fault proxy, or its parent itself)."""
    cfg = read_config(config)
    cfg["parent"]["url"] = url
    if parent_id is not None:
        cfg["parent"]["id"] = parent_id
    _write_config(config, cfg)


def write_readme(fed: Federation) -> Path:
    """``README.txt`` in the workdir: what is where and how to start each daemon."""
    lines = [
        "A local fedloom federation (written by `fedloom local init`).",
        "",
        "Files: keys/ (one private identity per node, and the consortium's), roster.toml (the",
        "signed roster: who may connect), consortium.pub, one <node>.toml config per node.",
        f"State lives in {fed.workdir / 'state'}/<node>/ (delete it to start over); logs go",
        "wherever you send each daemon's output (`fedloom local up` writes logs/<node>.log).",
        "Every node's [plan] agrees (the same workload and n_sites; each site has its own",
        "site_index): change one, change all.",
        "",
        "Start each daemon in its own terminal (aggregators first, though order does not",
        "matter: children keep retrying), or all at once with `fedloom local up DIR`:",
        "",
    ]
    order = {"root": 0, "region": 1, "site": 2}
    for node in sorted(fed.nodes.values(), key=lambda n: (order.get(n.role, 3), n.node_id)):
        extra = f"   # listens on {node.url}" if node.url else ""
        lines.append(f"  fedloom run --config {node.config}{extra}")
    lines += ["", "Metrics and health (Prometheus text, JSON):"]
    for node in fed.nodes.values():
        if node.metrics_url:
            lines.append(
                f"  {node.node_id:<12} {node.metrics_url}/metrics  {node.metrics_url}/healthz"
            )
    path = fed.workdir / README_NAME
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
