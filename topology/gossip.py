"""Gossip planner: every site is a peer that averages with its neighbours (D-PSGD style).

Mixing weights are Metropolis–Hastings (Xiao & Boyd 2004): W_ij = 1/(1 + max(d_i, d_j)) on each
edge and W_ii = 1 − Σ_j W_ij, which is symmetric and doubly stochastic from local degrees only.
Convergence slows as 1/(1 − β) with β the second-largest eigenvalue magnitude of W; the plan
records the spectral gap 1 − β (Θ(1/n²) for a ring, Θ(1) for an expander).

Graphs: ``ring``; ``kregular`` (random k-regular, ``nx.random_regular_graph``);
``exponential`` (peers at ±2^i hops, Assran et al. 2019, undirected union); ``smallworld``
(``nx.connected_watts_strogatz_graph``). Sites that accept no inbound connections are still
peers; routing their traffic through a relay is the transport's job.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from fedloom.topology.plan import NodeSpec, Plan
from fedloom.topology.planning import check_sites
from fedloom.topology.specs import Site
from fedloom.topology.wan import WanModel

GraphKind = Literal["ring", "kregular", "exponential", "smallworld"]
GRAPHS: tuple[str, ...] = ("ring", "kregular", "exponential", "smallworld")

# Dense eigvalsh is O(n³); above this the gap comes from a sparse Lanczos solve (or is None).
MAX_DENSE_SPECTRUM = 2_048
_REGULAR_TRIES = 20
# Bounded so a graph with a tiny gap gives up quickly (gap None) instead of spinning.
_LANCZOS_ITERS = 1_000


def gossip(
    sites: Iterable[Site],
    wan: WanModel,
    graph: GraphKind = "ring",
    k: int = 4,
    seed: int = 0,
    *,
    rewire_p: float = 0.1,
) -> Plan:
    """Build a gossip plan over ``sites`` (node ids are the site ids, in the given order)."""
    members = check_sites(sites, "gossip")
    n = len(members)
    if n < 2:
        raise ValueError("gossip: need at least 2 sites")
    neighbours = gossip_graph(graph, n, k=k, seed=seed, rewire_p=rewire_p)
    meta: dict[str, object] = {"planner": "gossip", "graph": graph, "seed": seed}
    if graph in ("kregular", "smallworld"):
        meta["k"] = k
    if graph == "smallworld":
        meta["rewire_p"] = rewire_p
    return plan_from_neighbours(members, wan, neighbours, meta=meta)


def gossip_graph(
    graph: str, n: int, *, k: int = 4, seed: int = 0, rewire_p: float = 0.1
) -> list[list[int]]:
    """Sorted neighbour lists (undirected, no self loops) of the named graph on n nodes."""
    if graph == "ring":
        return _from_edges(n, ((i, (i + 1) % n) for i in range(n)))
    if graph == "exponential":
        hops = [1 << i for i in range(max(1, (n - 1).bit_length())) if (1 << i) < n]
        return _from_edges(n, ((i, (i + h) % n) for i in range(n) for h in hops))
    # networkx (the sim extra) only for the random graphs: topology stays importable without it.
    if graph == "kregular":
        import networkx as nx

        if not 1 <= k < n or (n * k) % 2:
            raise ValueError(f"gossip(kregular): need 1 <= k < n and n*k even, got k={k}, n={n}")
        for attempt in range(_REGULAR_TRIES):
            g = nx.random_regular_graph(k, n, seed=seed + attempt)
            if nx.is_connected(g):
                return _from_edges(n, g.edges())
        raise ValueError(f"gossip(kregular): no connected {k}-regular graph on {n} nodes found")
    if graph == "smallworld":
        if not 2 <= k < n:
            raise ValueError(f"gossip(smallworld): need 2 <= k < n, got k={k}, n={n}")
        if not 0.0 <= rewire_p <= 1.0:
            raise ValueError(f"gossip(smallworld): rewire_p must be in [0, 1], got {rewire_p}")
        import networkx as nx

        g = nx.connected_watts_strogatz_graph(n, k, rewire_p, tries=100, seed=seed)
        return _from_edges(n, g.edges())
    raise ValueError(f"gossip: graph must be one of {list(GRAPHS)}, got {graph!r}")


def _from_edges(n: int, edges: Iterable[tuple[int, int]]) -> list[list[int]]:
    adjacency: list[set[int]] = [set() for _ in range(n)]
    for a, b in edges:
        if a != b:
            adjacency[a].add(b)
            adjacency[b].add(a)
    return [sorted(s) for s in adjacency]


def metropolis_hastings(neighbours: Sequence[Sequence[int]]) -> list[tuple[float, list[float]]]:
    """Per node: (W_ii, [W_ij for j in neighbours[i]]) with W_ij = 1/(1 + max(d_i, d_j))."""
    degree = [len(ns) for ns in neighbours]
    out: list[tuple[float, list[float]]] = []
    for i, ns in enumerate(neighbours):
        weights = [1.0 / (1.0 + max(degree[i], degree[j])) for j in ns]
        out.append((1.0 - sum(weights), weights))
    return out


def metropolis_hastings_matrix(neighbours: Sequence[Sequence[int]]) -> npt.NDArray[np.float64]:
    """Dense Metropolis–Hastings matrix for the given (undirected) neighbour lists."""
    n = len(neighbours)
    w = np.zeros((n, n), dtype=np.float64)
    for i, (self_w, weights) in enumerate(metropolis_hastings(neighbours)):
        w[i, i] = self_w
        for j, wij in zip(neighbours[i], weights, strict=True):
            w[i, j] = wij
    return w


def plan_from_neighbours(
    sites: Sequence[Site],
    wan: WanModel,
    neighbours: Sequence[Sequence[int]],
    *,
    meta: dict[str, object] | None = None,
) -> Plan:
    """A gossip plan from explicit undirected neighbour lists (indices into ``sites``)."""
    if len(neighbours) != len(sites):
        raise ValueError("plan_from_neighbours: one neighbour list per site is required")
    for i, ns in enumerate(neighbours):
        for j in ns:
            if not 0 <= j < len(sites) or j == i or i not in neighbours[j]:
                raise ValueError(
                    f"plan_from_neighbours: neighbour lists must be undirected without "
                    f"self loops (node {i}, neighbour {j})"
                )
    ids = [s.id for s in sites]
    nodes = []
    for i, (self_w, weights) in enumerate(metropolis_hastings(neighbours)):
        peers = tuple(ids[j] for j in neighbours[i])
        nodes.append(
            NodeSpec(
                id=ids[i],
                role="peer",
                host=ids[i],
                region=sites[i].region,
                peers=peers,
                mixing=tuple(zip(peers, weights, strict=True)),
                self_weight=self_w,
            )
        )
    return Plan(
        kind="gossip",
        nodes=tuple(nodes),
        sites=tuple(sites),
        wan=wan,
        spectral_gap=spectral_gap_of(neighbours),
        meta=dict(meta or {}),
    )


def mixing_matrix(plan: Plan) -> npt.NDArray[np.float64]:
    """Dense W of a gossip plan, rows and columns in plan node order."""
    if plan.kind != "gossip":
        raise ValueError(f"mixing_matrix: plan kind is {plan.kind!r}, not 'gossip'")
    index = {n.id: i for i, n in enumerate(plan.nodes)}
    w = np.zeros((len(index), len(index)), dtype=np.float64)
    for i, node in enumerate(plan.nodes):
        w[i, i] = node.self_weight
        for peer, weight in node.mixing:
            w[i, index[peer]] = weight
    return w


def spectral_gap(w: npt.NDArray[np.float64]) -> float:
    """1 − (second-largest eigenvalue magnitude) of a symmetric mixing matrix."""
    if w.shape[0] < 2:
        return 1.0
    eig = np.sort(np.abs(np.linalg.eigvalsh(w)))
    return float(1.0 - eig[-2])


def spectral_gap_of(neighbours: Sequence[Sequence[int]]) -> float | None:
    """Spectral gap of the MH matrix of a graph; sparse Lanczos for large graphs (None if it
    fails to converge)."""
    n = len(neighbours)
    circulant = _circulant_gap(neighbours)
    if circulant is not None:
        return circulant
    if n <= MAX_DENSE_SPECTRUM:
        return spectral_gap(metropolis_hastings_matrix(neighbours))
    return _sparse_gap(neighbours)


def _circulant_gap(neighbours: Sequence[Sequence[int]]) -> float | None:
    """Exact gap via FFT when node i's neighbours are {i + o mod n} for one offset set (ring,
    exponential graph): W is then circulant and its eigenvalues are the DFT of its first row.
    Lanczos cannot resolve a ring's Θ(1/n²) gap, this can. None if the graph is not circulant.
    """
    n = len(neighbours)
    offsets = sorted(j % n for j in neighbours[0])
    for i, ns in enumerate(neighbours):
        if sorted((j - i) % n for j in ns) != offsets:
            return None
    row = np.zeros(n, dtype=np.float64)
    weight = 1.0 / (1.0 + len(offsets))  # every degree is the same
    row[offsets] = weight
    row[0] = 1.0 - weight * len(offsets)
    eig = np.sort(np.abs(np.fft.fft(row).real))
    return float(1.0 - eig[-2])


def _sparse_gap(neighbours: Sequence[Sequence[int]]) -> float | None:
    import scipy.sparse as sp  # networkx's own optional dependency; only needed for big graphs
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    n = len(neighbours)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, (self_w, weights) in enumerate(metropolis_hastings(neighbours)):
        rows.append(i)
        cols.append(i)
        vals.append(self_w)
        rows.extend([i] * len(weights))
        cols.extend(neighbours[i])
        vals.extend(weights)
    w = sp.csr_matrix((vals, (rows, cols)), shape=(n, n))
    try:
        top = eigsh(w, k=2, which="LA", return_eigenvectors=False, maxiter=_LANCZOS_ITERS)
        bottom = eigsh(w, k=1, which="SA", return_eigenvectors=False, maxiter=_LANCZOS_ITERS)
    except ArpackNoConvergence:
        return None
    # The largest eigenvalue of a connected MH matrix is exactly 1; β is the next magnitude.
    beta = max(float(np.sort(top)[0]), abs(float(bottom[0])))
    return float(1.0 - beta)
