import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.topology.gossip import (
    gossip,
    gossip_graph,
    metropolis_hastings_matrix,
    mixing_matrix,
    plan_from_neighbours,
    spectral_gap,
)
from fedloom.topology.specs import Site
from fedloom.topology.wan import WanModel


def _sites(n: int) -> list[Site]:
    return [Site(f"p{i}", f"r{i % 3}", inbound=i % 2 == 0) for i in range(n)]


@st.composite
def graphs(draw: st.DrawFn) -> list[list[int]]:
    n = draw(st.integers(min_value=2, max_value=14))
    pairs = draw(st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=n * 3))
    adjacency: list[set[int]] = [set() for _ in range(n)]
    for a, b in pairs:
        if a != b:
            adjacency[a].add(b)
            adjacency[b].add(a)
    return [sorted(s) for s in adjacency]


@settings(max_examples=100, deadline=None)
@given(graphs())
def test_mh_weights_are_symmetric_and_doubly_stochastic(neighbours: list[list[int]]) -> None:
    w = metropolis_hastings_matrix(neighbours)
    assert np.allclose(w, w.T)
    assert np.allclose(w.sum(axis=0), 1.0) and np.allclose(w.sum(axis=1), 1.0)
    assert (w >= -1e-15).all()
    for i, ns in enumerate(neighbours):
        for j in ns:
            assert w[i, j] == pytest.approx(1 / (1 + max(len(ns), len(neighbours[j]))))
    plan = plan_from_neighbours(_sites(len(neighbours)), WanModel(), neighbours)
    assert np.array_equal(mixing_matrix(plan), w)


@pytest.mark.parametrize("graph", ["ring", "kregular", "exponential", "smallworld"])
def test_gossip_plans_are_connected_and_mix(graph: str) -> None:
    plan = gossip(_sites(64), WanModel(), graph, k=4, seed=1)  # type: ignore[arg-type]
    assert plan.kind == "gossip" and plan.roots == ()
    w = mixing_matrix(plan)
    assert np.allclose(w.sum(axis=1), 1.0) and np.allclose(w, w.T)
    assert plan.spectral_gap is not None and 0 < plan.spectral_gap <= 1
    assert plan.spectral_gap == pytest.approx(spectral_gap(w), abs=1e-9)
    for node in plan.nodes:
        assert node.role == "peer" and node.host == node.id
        for peer in node.peers:
            assert node.id in plan.node(peer).peers  # undirected
    # Peers that refuse inbound connections still take part.
    assert not plan.site("p1").inbound and plan.node("p1").peers


def test_graph_shapes() -> None:
    assert gossip_graph("ring", 5) == [[1, 4], [0, 2], [1, 3], [2, 4], [0, 3]]
    expo = gossip_graph("exponential", 16)
    assert expo[0] == [1, 2, 4, 8, 12, 14, 15]  # ±1, ±2, ±4, ±8 (8 is its own mirror)
    regular = gossip_graph("kregular", 20, k=3, seed=2)
    assert {len(ns) for ns in regular} == {3}
    assert gossip_graph("kregular", 20, k=3, seed=2) == regular  # seeded


def test_spectral_gap_ordering_for_64_peers() -> None:
    gaps = {g: gossip(_sites(64), WanModel(), g).spectral_gap for g in ("ring", "kregular")}
    gaps["exponential"] = gossip(_sites(64), WanModel(), "exponential").spectral_gap
    ring = gaps["ring"]
    assert ring is not None
    assert ring < (gaps["kregular"] or 0.0)
    assert ring < (gaps["exponential"] or 0.0)
    # The ring's gap matches its closed form: MH weights 1/3, λ₂ = 1/3 + 2/3·cos(2π/n).
    assert ring == pytest.approx(2 / 3 * (1 - np.cos(2 * np.pi / 64)), rel=1e-9)


def test_gossip_errors() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        gossip(_sites(1), WanModel())
    with pytest.raises(ValueError, match="n\\*k even"):
        gossip(_sites(7), WanModel(), "kregular", k=3)
    with pytest.raises(ValueError, match="graph must be one of"):
        gossip(_sites(7), WanModel(), "tree")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not 'gossip'"):
        from fedloom.topology.star import star

        mixing_matrix(star(_sites(3)))
    with pytest.raises(ValueError, match="undirected"):
        plan_from_neighbours(_sites(2), WanModel(), [[1], []])
