"""The Plan: who aggregates for whom, who gossips with whom, and which machine runs each role.

A Plan is plain frozen data (no networkx objects) shared by the simulator and the daemons. It
validates itself on construction (unknown parents, cycles, role mismatches, bad mixing rows)
and precomputes lookup tables so ``node``, ``site``, ``children_of`` and ``link`` are O(1).
It serialises to a dict, JSON and TOML; the round trip is exact (TOML has no null, so absent
optional values are simply omitted).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from fedloom.topology.specs import Link, Site
from fedloom.topology.wan import WanModel

Role = Literal["root", "region", "site", "peer"]
Kind = Literal["star", "hierarchical", "gossip"]

ROLES: frozenset[str] = frozenset({"root", "region", "site", "peer"})
KINDS: frozenset[str] = frozenset({"star", "hierarchical", "gossip"})
_ROLES_BY_KIND: dict[str, frozenset[str]] = {
    "star": frozenset({"root", "site"}),
    "hierarchical": frozenset({"root", "region", "site"}),
    "gossip": frozenset({"peer"}),
}
# Which roles a node of a given role may have as its parent (None: must have no parent).
_PARENT_ROLES: dict[str, frozenset[str] | None] = {
    "root": None,
    "region": frozenset({"root", "region"}),
    "site": frozenset({"root", "region"}),
    "peer": None,
}
_MIXING_TOL = 1e-9
FORMAT_VERSION = 1


def dc_site_id(root_id: str) -> str:
    """Id of the data-centre Site entry that hosts the root node ``root_id``."""
    return f"{root_id}@dc"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One protocol node in a plan.

    ``host`` is the id of the Site whose machine runs this node (site and peer nodes host
    themselves; the root runs on ``dc_site_id(root_id)``). ``region`` is the cluster a region or
    site node belongs to, the site's region label for a peer, None for the root. ``standby`` is
    the site that takes over a region aggregator. ``mixing`` lists (neighbour, W_ij) for
    gossip; ``self_weight`` is W_ii (1.0 for a node that mixes with nobody).
    """

    id: str
    role: Role
    parent: str | None = None
    children: tuple[str, ...] = ()
    host: str | None = None
    region: str | None = None
    standby: str | None = None
    peers: tuple[str, ...] = ()
    mixing: tuple[tuple[str, float], ...] = ()
    self_weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"NodeSpec.id must be a non-empty string, got {self.id!r}")
        if self.role not in ROLES:
            raise ValueError(
                f"NodeSpec {self.id!r}: role must be one of {sorted(ROLES)}, got {self.role!r}"
            )
        set_ = object.__setattr__
        # Accept lists (e.g. from hand-written dicts) but store tuples so specs stay hashable.
        set_(self, "children", tuple(self.children))
        set_(self, "peers", tuple(self.peers))
        set_(self, "mixing", tuple((str(p), float(w)) for p, w in self.mixing))
        if isinstance(self.self_weight, bool) or not isinstance(self.self_weight, int | float):
            raise ValueError(f"NodeSpec {self.id!r}: self_weight must be a number")
        set_(self, "self_weight", float(self.self_weight))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "role": self.role}
        for name in ("parent", "host", "region", "standby"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.children:
            out["children"] = list(self.children)
        if self.peers:
            out["peers"] = list(self.peers)
        if self.mixing:
            out["mixing"] = dict(self.mixing)
        if self.self_weight != 1.0:
            out["self_weight"] = self.self_weight
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"NodeSpec: unknown field(s) {sorted(unknown)} in {dict(data)!r}")
        if "id" not in data or "role" not in data:
            raise ValueError(f"NodeSpec: 'id' and 'role' are required, got {dict(data)!r}")
        mixing = data.get("mixing", {})
        if not isinstance(mixing, Mapping):
            raise ValueError(f"NodeSpec {data['id']!r}: mixing must be a table of weights")
        return cls(
            id=data["id"],
            role=data["role"],
            parent=data.get("parent"),
            children=tuple(data.get("children", ())),
            host=data.get("host"),
            region=data.get("region"),
            standby=data.get("standby"),
            peers=tuple(data.get("peers", ())),
            mixing=tuple(mixing.items()),
            self_weight=data.get("self_weight", 1.0),
        )


_LOOPBACK = Link(latency_s=0.0, bandwidth_bps=math.inf, loss=0.0)


@dataclass(frozen=True, slots=True)
class _Index:
    nodes: dict[str, NodeSpec]
    sites: dict[str, Site]
    host_of: dict[str, Site]
    roots: tuple[str, ...]
    n_peers: int
    # Links by what they depend on (both hosts' regions, access latencies and bandwidths):
    # sites configured alike share one (``Plan.link``).
    links: dict[tuple[Any, ...], Link] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Plan:
    """A complete topology: node roles and wiring, the sites that host them, the WAN model."""

    kind: Kind
    nodes: tuple[NodeSpec, ...]
    sites: tuple[Site, ...]
    wan: WanModel
    spectral_gap: float | None = None
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    _index: _Index = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "_index", _validate(self))

    # ------------------------------------------------------------------ lookups (all O(1))

    def node(self, node_id: str) -> NodeSpec:
        try:
            return self._index.nodes[node_id]
        except KeyError:
            raise KeyError(f"plan has no node {node_id!r}") from None

    def site(self, site_id: str) -> Site:
        try:
            return self._index.sites[site_id]
        except KeyError:
            raise KeyError(f"plan has no site {site_id!r}") from None

    def has_node(self, node_id: str) -> bool:
        return node_id in self._index.nodes

    def host_site(self, node_id: str) -> Site:
        """The Site whose machine runs ``node_id``."""
        try:
            return self._index.host_of[node_id]
        except KeyError:
            self.node(node_id)  # raises for an unknown node
            raise KeyError(f"node {node_id!r} has no host") from None

    @property
    def roots(self) -> tuple[str, ...]:
        """Ids of the root nodes (empty for a gossip plan)."""
        return self._index.roots

    @property
    def n_peers(self) -> int:
        """How many gossip peers the plan has (counted once, when the plan is built)."""
        return self._index.n_peers

    def children_of(self, node_id: str) -> tuple[str, ...]:
        return self.node(node_id).children

    def parent_of(self, node_id: str) -> str | None:
        return self.node(node_id).parent

    def peers_of(self, node_id: str) -> tuple[str, ...]:
        return self.node(node_id).peers

    def node_ids(self, role: Role | None = None) -> tuple[str, ...]:
        """All node ids in plan order, optionally only those with ``role``."""
        return tuple(n.id for n in self.nodes if role is None or n.role == role)

    def link(self, src: str, dst: str) -> Link:
        """The directed link from node ``src`` to node ``dst``.

        Latency is half the RTT between the hosts; bandwidth is the bottleneck of the sender's
        uplink and the receiver's downlink; loss comes from the WAN model. Two nodes on the same
        host talk over loopback: zero latency, unbounded bandwidth, no loss.
        """
        a = self.host_site(src)
        b = self.host_site(dst)
        if a.id == b.id:
            return _LOOPBACK
        key = (
            a.region,
            a.access_latency_s,
            a.uplink_bps,
            b.region,
            b.access_latency_s,
            b.downlink_bps,
        )
        links = self._index.links
        link = links.get(key)
        if link is None:
            link = links[key] = Link(
                latency_s=self.wan.rtt(a, b) / 2.0,
                bandwidth_bps=min(a.uplink_bps, b.downlink_bps),
                loss=self.wan.loss,
            )
        return link

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT_VERSION, "kind": self.kind}
        if self.spectral_gap is not None:
            out["spectral_gap"] = self.spectral_gap
        out["meta"] = dict(self.meta)
        out["wan"] = self.wan.to_dict()
        out["sites"] = [s.to_dict() for s in self.sites]
        out["nodes"] = [n.to_dict() for n in self.nodes]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        known = {"format", "kind", "spectral_gap", "meta", "wan", "sites", "nodes"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Plan: unknown field(s) {sorted(unknown)}")
        version = data.get("format", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"Plan: unsupported format {version!r} (expected {FORMAT_VERSION})")
        for required in ("kind", "nodes", "sites"):
            if required not in data:
                raise ValueError(f"Plan: missing field {required!r}")
        gap = data.get("spectral_gap")
        return cls(
            kind=data["kind"],
            nodes=tuple(NodeSpec.from_dict(n) for n in data["nodes"]),
            sites=tuple(Site.from_dict(dict(s)) for s in data["sites"]),
            wan=WanModel.from_dict(data.get("wan", {})),
            spectral_gap=None if gap is None else float(gap),
            meta=dict(data.get("meta", {})),
        )

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (``.json``) or TOML (``.toml``)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        elif suffix == ".toml":
            path.write_text(tomli_w.dumps(self.to_dict()), encoding="utf-8")
        else:
            raise ValueError(f"Plan.save: unsupported extension {path.suffix!r} (.json or .toml)")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read and validate a plan written by ``save`` (or by hand)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"Plan.load: unsupported extension {path.suffix!r} (.json or .toml)")
        if not isinstance(data, dict):
            raise ValueError(f"Plan.load: {path} does not hold a table/object")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


# ---------------------------------------------------------------------- validation


def _validate(plan: Plan) -> _Index:
    if plan.kind not in KINDS:
        raise ValueError(f"Plan.kind must be one of {sorted(KINDS)}, got {plan.kind!r}")
    if not isinstance(plan.wan, WanModel):
        raise ValueError("Plan.wan must be a WanModel")
    if plan.spectral_gap is not None and not math.isfinite(plan.spectral_gap):
        raise ValueError(f"Plan.spectral_gap must be finite, got {plan.spectral_gap!r}")
    if not plan.nodes:
        raise ValueError("Plan has no nodes")

    sites: dict[str, Site] = {}
    for s in plan.sites:
        if not isinstance(s, Site):
            raise ValueError(f"Plan.sites must hold Site objects, got {s!r}")
        if s.id in sites:
            raise ValueError(f"duplicate site id {s.id!r}")
        sites[s.id] = s

    nodes: dict[str, NodeSpec] = {}
    for n in plan.nodes:
        if not isinstance(n, NodeSpec):
            raise ValueError(f"Plan.nodes must hold NodeSpec objects, got {n!r}")
        if n.id in nodes:
            raise ValueError(f"duplicate node id {n.id!r}")
        nodes[n.id] = n

    allowed = _ROLES_BY_KIND[plan.kind]
    host_of: dict[str, Site] = {}
    roots: list[str] = []
    # Each node's children as a set: a site's parent lists it among up to thousands.
    child_sets = {n.id: frozenset(n.children) for n in plan.nodes if n.children}
    for n in plan.nodes:
        _check_node(plan.kind, allowed, n, nodes, sites, child_sets)
        if n.host is not None:
            host_of[n.id] = sites[n.host]
        if n.role == "root":
            roots.append(n.id)

    # Children are checked after every node's own parent, so the more specific error wins.
    for n in plan.nodes:
        _check_children(n, nodes)

    if plan.kind != "gossip":
        if not roots:
            raise ValueError(f"{plan.kind} plan has no root node")
        if plan.kind == "star" and len(roots) != 1:
            raise ValueError(f"star plan must have exactly one root, found {roots}")
        _check_acyclic(nodes)
    n_peers = sum(1 for n in plan.nodes if n.role == "peer")
    return _Index(nodes=nodes, sites=sites, host_of=host_of, roots=tuple(roots), n_peers=n_peers)


def _check_node(
    kind: str,
    allowed: frozenset[str],
    n: NodeSpec,
    nodes: Mapping[str, NodeSpec],
    sites: Mapping[str, Site],
    child_sets: Mapping[str, frozenset[str]],
) -> None:
    where = f"node {n.id!r} ({n.role})"
    if n.role not in allowed:
        raise ValueError(f"role mismatch: {where} cannot appear in a {kind} plan")
    if n.host is not None and n.host not in sites:
        raise ValueError(f"{where}: unknown host site {n.host!r}")
    if n.role in ("site", "peer") and (n.host != n.id or n.id not in sites):
        raise ValueError(f"{where}: a {n.role} node must be hosted on its own Site entry")
    if n.standby is not None:
        if n.role != "region":
            raise ValueError(f"{where}: only region nodes have a standby")
        if n.standby not in sites:
            raise ValueError(f"{where}: unknown standby site {n.standby!r}")
        if n.standby == n.host:
            raise ValueError(f"{where}: standby must differ from the host")

    parent_roles = _PARENT_ROLES[n.role]
    if n.parent is not None:
        if parent_roles is None:
            raise ValueError(f"role mismatch: {where} must not have a parent")
        parent = nodes.get(n.parent)
        if parent is None:
            raise ValueError(f"{where}: unknown parent {n.parent!r}")
        if parent.role not in parent_roles:
            raise ValueError(
                f"role mismatch: {where} has parent {parent.id!r} with role {parent.role!r}"
            )
        if n.id not in child_sets.get(parent.id, ()):
            raise ValueError(f"{where}: parent {parent.id!r} does not list it as a child")
    elif n.role in ("region", "site"):
        raise ValueError(f"{where}: has no parent")

    if n.role != "peer":
        if n.peers or n.mixing:
            raise ValueError(f"role mismatch: {where} has gossip peers or mixing weights")
        return
    if len(set(n.peers)) != len(n.peers):
        raise ValueError(f"{where}: duplicate peers")
    for p in n.peers:
        other = nodes.get(p)
        if other is None:
            raise ValueError(f"{where}: unknown peer {p!r}")
        if other.role != "peer":
            raise ValueError(f"role mismatch: {where} has peer {p!r} with role {other.role!r}")
        if p == n.id:
            raise ValueError(f"{where}: lists itself as a peer")
    peer_set = set(n.peers)
    total = n.self_weight
    for p, w in n.mixing:
        if p not in peer_set:
            raise ValueError(f"{where}: mixing weight for {p!r}, which is not a peer")
        if not (math.isfinite(w) and w >= 0.0):
            raise ValueError(f"{where}: mixing weight for {p!r} must be finite and >= 0")
        total += w
    if not (0.0 <= n.self_weight <= 1.0 + _MIXING_TOL) or abs(total - 1.0) > _MIXING_TOL:
        raise ValueError(f"{where}: self_weight plus mixing weights must sum to 1 (got {total!r})")


def _check_children(n: NodeSpec, nodes: Mapping[str, NodeSpec]) -> None:
    where = f"node {n.id!r} ({n.role})"
    for child_id in n.children:
        child = nodes.get(child_id)
        if child is None:
            raise ValueError(f"{where}: unknown child {child_id!r}")
        if child.parent != n.id:
            raise ValueError(f"{where} lists child {child_id!r} whose parent is {child.parent!r}")
    if len(set(n.children)) != len(n.children):
        raise ValueError(f"{where}: duplicate children")


def _check_acyclic(nodes: Mapping[str, NodeSpec]) -> None:
    # Walk up from every node, memoising nodes already known to reach a root: O(n) overall.
    reaches_root: set[str] = set()
    for start in nodes:
        path: list[str] = []
        on_path: set[str] = set()
        current: str | None = start
        while current is not None and current not in reaches_root:
            if current in on_path:
                cycle = " -> ".join([*path[path.index(current) :], current])
                raise ValueError(f"cycle in parent links: {cycle}")
            path.append(current)
            on_path.add(current)
            current = nodes[current].parent
        reaches_root.update(path)


def load_plan(path: str | Path) -> Plan:
    """Shorthand for ``Plan.load``."""
    return Plan.load(path)


def save_plan(plan: Plan, path: str | Path) -> None:
    """Shorthand for ``plan.save``."""
    plan.save(path)
