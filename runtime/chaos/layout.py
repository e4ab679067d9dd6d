"""A local federation on disk: keys, a signed roster and one config per node.

``lay_out`` writes a star (root + sites) or a hierarchy (root -> regions -> sites) with
``runtime.federation_files.write_federation`` (the demo's plan, training and aggregation
defaults, each overridable), so ``fedloom chaos`` and ``fedloom local init`` produce the
layout the demo and the end-to-end tests use: ``keys/``, ``roster.toml``,
``consortium.pub``, ``<node>.toml``, ``state/<node>/``, ``logs/<node>.log``. A star is
written as a one-region hierarchy whose region is then taken out (its config and roster
entry), the sites re-pointed at the root.
``lay_out_gossip`` writes gossip peers on a ring, and a relay for those that do not listen,
in the same layout.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from fedloom.runtime.chaos.scenario import RELAY_ID, Shape
from fedloom.runtime.federation_files import (
    DEMO_PLAN,
    DEMO_TRAINING,
    ROOT_ID,
    Federation,
    NodeFiles,
    free_port,
    new_workdir,
    site_examples,
    write_federation,
    write_roster,
)
from fedloom.transport.identity import Identity

__all__ = [
    "README_NAME",
    "add_standbys",
    "lay_out",
    "lay_out_gossip",
    "point_link",
    "read_config",
    "set_parent_url",
    "write_readme",
]

README_NAME = "README.txt"
_STAR_REGION = "region-0"
# write_federation's link timing, for gossip peers and the relay too.
GOSSIP_CONNECTION = {
    "keepalive_s": 2.0,
    "down_after_s": 10.0,
    "backoff_base_s": 0.1,
    "backoff_cap_s": 1.0,
}


def read_config(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def _write_config(path: Path, cfg: Mapping[str, Any]) -> None:
    path.write_text(tomli_w.dumps(dict(cfg)), encoding="utf-8")


def _plan(plan: Mapping[str, Any] | None) -> dict[str, Any]:
    """The demo's plan with ``plan``'s fields over it; a field ``plan`` sets to None is left
    out (another data set has other fields: synthetic has no ``dirichlet_alpha``)."""
    merged = {**DEMO_PLAN, **(plan or {})}
    return {k: v for k, v in merged.items() if v is not None}


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
    declare_examples: bool = True,
) -> Federation:
    """Write the federation into ``workdir`` (every node with a ``/metrics`` port).

    ``regions`` maps each region to its sites; with ``star`` it holds one entry whose sites
    become the root's children (the key is ignored). ``declare_examples``: the roster
    declares each site's examples (a built-in workload's; not for a site's own table).
    A hierarchy's root declares each region's sites (``[subtrees]``).
    """
    if star:
        sites = [s for members in regions.values() for s in members]
        regions = {_STAR_REGION: sites}
    fed = write_federation(
        workdir,
        regions,
        seed=seed,
        plan=_plan(plan),
        training={**DEMO_TRAINING, **(training or {})},
        root_aggregation=root_aggregation,
        region_aggregation=region_aggregation,
        connection=connection,
        site_metrics=True,
        declare_examples=declare_examples,
    )
    if star:
        return _to_star(fed, root_aggregation or {}, declare_examples)
    # The root checks each region's forwards against the sites under it and counts every
    # site update once (``algorithms.incorporation``): a region cannot speak for sites it
    # does not have, and the checker's conservation reaches the root.
    root = fed.nodes[ROOT_ID]
    root_cfg = read_config(root.config)
    root_cfg["subtrees"] = {r: list(members) for r, members in regions.items()}
    _write_config(root.config, root_cfg)
    return fed


def _to_star(
    fed: Federation, root_aggregation: Mapping[str, Any], declare_examples: bool = True
) -> Federation:
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
    examples = site_examples(fed.plan, [s.node_id for s in sites]) if declare_examples else None
    write_roster(fed.roster, members, consortium, examples=examples)
    nodes: dict[str, NodeFiles] = {k: v for k, v in fed.nodes.items() if k != _STAR_REGION}
    return Federation(fed.workdir, fed.roster, fed.consortium_pub, fed.plan, nodes)


def add_standbys(fed: Federation, standbys: Mapping[str, str], failover_after_s: float) -> None:
    """Give each region of ``standbys`` (standby id -> region) a standby region daemon: the
    region's config under its own identity, ports and state (both with ``[failover]
    has_standby``); the root takes both as
    children with the same ``[subtrees]``, and the region's sites list the standby as their
    ``[[parent.fallback]]`` (``failover_after_s``)."""
    keys = fed.workdir / "keys"
    root = fed.nodes[ROOT_ID]
    root_cfg = read_config(root.config)
    subtrees: dict[str, list[str]] = dict(root_cfg.get("subtrees") or {})
    for standby, region in standbys.items():
        Identity.generate(standby, "region").save(keys, overwrite=True)
        cfg = read_config(fed.nodes[region].config)
        # Both keep their unsettled forwards' deltas, to rebuild one the root refuses for
        # site updates the other delivered (``algorithms.incorporation``).
        cfg["failover"] = {"has_standby": True}
        _write_config(fed.nodes[region].config, cfg)
        port, metrics = free_port(), free_port()
        cfg.update(
            node_id=standby,
            identity={"key": str(keys / f"{standby}.key")},
            state_dir=str(fed.workdir / "state" / standby),
            listen={"host": "127.0.0.1", "port": port},
            metrics={"host": "127.0.0.1", "port": metrics},
        )
        path = fed.workdir / f"{standby}.toml"
        _write_config(path, cfg)
        fed.nodes[standby] = NodeFiles(
            standby,
            "region",
            path,
            fed.workdir / "state" / standby,
            fed.workdir / "logs" / f"{standby}.log",
            port,
            metrics,
        )
        sites = list(cfg["children"])
        subtrees[region] = subtrees[standby] = sites
        for site in sites:
            site_cfg = read_config(fed.nodes[site].config)
            site_cfg["parent"]["failover_after_s"] = failover_after_s
            site_cfg["parent"]["fallback"] = [
                {"id": standby, "url": f"ws://127.0.0.1:{port}/fedloom"}
            ]
            _write_config(fed.nodes[site].config, site_cfg)
    root_cfg["children"] = [*root_cfg["children"], *standbys]
    root_cfg["subtrees"] = subtrees
    _write_config(root.config, root_cfg)
    consortium = Identity.load(keys / "consortium.key")
    members = [Identity.load(keys / f"{n}.key") for n in fed.nodes]
    sites = [n for n, f in fed.nodes.items() if f.role == "site"]
    write_roster(fed.roster, members, consortium, examples=site_examples(fed.plan, sites))


def lay_out_gossip(
    workdir: Path,
    shape: Shape,
    *,
    seed: int = 1,
    plan: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    aggregation: Mapping[str, Any] | None = None,
    connection: Mapping[str, Any] | None = None,
) -> Federation:
    """Gossip peers on ``shape``'s ring (each with its own share of the demo's data), and
    the relay its non-listening neighbours meet through; every node with ``/metrics``."""
    workdir, keys, consortium, pub = new_workdir(workdir)
    plan_table = {**_plan(plan), "n_sites": len(shape.peers), "seed": seed}
    conn = {**GOSSIP_CONNECTION, **(connection or {})}
    ports = {n: free_port() for n in shape.nodes if shape.listening(n)}
    identities: list[Identity] = []
    nodes: dict[str, NodeFiles] = {}
    for node_id in shape.nodes:
        role = "relay" if node_id == RELAY_ID else "peer"
        ident = Identity.generate(node_id, role)
        ident.save(keys, overwrite=True)
        identities.append(ident)
        cfg: dict[str, Any] = {
            "role": role,
            "node_id": node_id,
            "state_dir": str(workdir / "state" / node_id),
            "seed": seed,
            "identity": {"key": str(keys / f"{node_id}.key")},
            "roster": {"path": str(workdir / "roster.toml"), "consortium_key_file": str(pub)},
            "connection": conn,
        }
        if node_id in ports:
            cfg["listen"] = {"host": "127.0.0.1", "port": ports[node_id]}
        if role == "peer":
            dials = {b for a, b in shape.edges if a == node_id}
            cfg["peers"] = [
                {"id": p, "url": f"ws://127.0.0.1:{ports[p]}/fedloom"} if p in dials else {"id": p}
                for p in shape.neighbours(node_id)
            ]
            if RELAY_ID in dials:
                cfg["relay"] = {"id": RELAY_ID, "url": f"ws://127.0.0.1:{ports[RELAY_ID]}/fedloom"}
            index = shape.peers.index(node_id)
            cfg["plan"] = {**plan_table, "site_index": index}
            cfg["training"] = {**DEMO_TRAINING, **(training or {})}
            cfg["aggregation"] = {"algorithm": "gossip", **(aggregation or {})}
            cfg["codec"] = {"up": "fp32", "down": "fp32"}
        metrics = free_port()
        cfg["metrics"] = {"host": "127.0.0.1", "port": metrics}
        path = workdir / f"{node_id}.toml"
        _write_config(path, cfg)
        nodes[node_id] = NodeFiles(
            node_id,
            role,
            path,
            workdir / "state" / node_id,
            workdir / "logs" / f"{node_id}.log",
            ports.get(node_id, 0),
            metrics,
        )
    write_roster(workdir / "roster.toml", identities, consortium)
    return Federation(workdir, workdir / "roster.toml", pub, plan_table, nodes)


def point_link(config: Path, target: str, url: str) -> None:
    """Make the node of ``config`` reach ``target`` (its parent, a fallback parent, its
    relay or a gossip neighbour) at ``url``: a fault proxy's port."""
    cfg = read_config(config)
    fallbacks = {f.get("id"): f for f in cfg.get("parent", {}).get("fallback", [])}
    if cfg.get("parent", {}).get("id") == target:
        cfg["parent"]["url"] = url
    elif target in fallbacks:
        fallbacks[target]["url"] = url
    elif cfg.get("relay", {}).get("id") == target:
        cfg["relay"]["url"] = url
    else:
        entry = next(p for p in cfg.get("peers", []) if p.get("id") == target)
        entry["url"] = url
    _write_config(config, cfg)


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
