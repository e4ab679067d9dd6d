import json
import math
import pickle
from pathlib import Path

import pytest

from fedloom.topology.gossip import gossip
from fedloom.topology.hierarchical import hierarchical
from fedloom.topology.plan import NodeSpec, Plan
from fedloom.topology.specs import Site
from fedloom.topology.star import star
from fedloom.topology.wan import WanModel


def _sites() -> list[Site]:
    return [
        Site("h1", "eu", n_examples=10, uplink_bps=50e6, downlink_bps=200e6, inbound=True),
        Site("h2", "eu", n_examples=20, access_latency_s=0.002),
        Site("h3", "us", n_examples=30, uplink_bps=1e9, downlink_bps=1e9),
        Site("h4", "us", n_examples=40, compute_speed=2.5),
    ]


WAN = WanModel({("eu", "us"): 0.09}, loss=0.02)


def _plans() -> list[Plan]:
    return [
        star(_sites(), wan=WAN),
        hierarchical(_sites(), WAN),
        gossip(_sites(), WAN, "ring"),
        gossip(_sites(), WAN, "exponential"),
    ]


@pytest.mark.parametrize("suffix", [".json", ".toml"])
@pytest.mark.parametrize("index", range(4))
def test_save_load_round_trip_is_exact(tmp_path: Path, suffix: str, index: int) -> None:
    plan = _plans()[index]
    path = tmp_path / f"plan{suffix}"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.to_dict() == plan.to_dict()
    assert loaded.spectral_gap == plan.spectral_gap


def test_dict_round_trip_and_pickle() -> None:
    for plan in _plans():
        assert Plan.from_dict(plan.to_dict()) == plan
        again = pickle.loads(pickle.dumps(plan))
        assert again == plan
        assert again.node(plan.nodes[-1].id) == plan.nodes[-1]


def test_lookups() -> None:
    plan = hierarchical(_sites(), WAN)
    assert plan.roots == ("root",)
    assert plan.children_of("root") == ("region-eu", "region-us")
    assert plan.children_of("region-eu") == ("h1", "h2")
    assert plan.parent_of("h3") == "region-us"
    assert plan.node("h3").role == "site"
    assert plan.site("root@dc").inbound
    assert plan.host_site("root").id == "root@dc"
    assert plan.node_ids("region") == ("region-eu", "region-us")
    with pytest.raises(KeyError, match="nope"):
        plan.node("nope")


def test_link_values() -> None:
    plan = hierarchical(_sites(), WAN)
    # h2 -> region-us (hosted on h3: best closeness and bandwidth in 'us')
    assert plan.node("region-us").host == "h3"
    link = plan.link("h2", "region-us")
    assert link.latency_s == pytest.approx((0.002 + 0.005 + 0.09) / 2)
    assert link.bandwidth_bps == 100e6  # min(h2 uplink 100M, h3 downlink 1G)
    assert link.loss == 0.02
    back = plan.link("region-us", "h2")
    assert back.latency_s == link.latency_s
    assert back.bandwidth_bps == 100e6  # min(h3 uplink 1G, h2 downlink 100M)
    up = plan.link("region-us", "root")
    assert up.bandwidth_bps == 1e9  # min(h3 uplink, dc downlink 10G)
    assert up.latency_s == pytest.approx(
        (0.005 + 0.001 + WAN.region_rtt_s("us", plan.site("root@dc").region)) / 2
    )
    # A site talking to the aggregator it hosts uses loopback.
    loop = plan.link("h3", "region-us")
    assert loop.latency_s == 0.0 and math.isinf(loop.bandwidth_bps) and loop.loss == 0.0


def _tree(**overrides: NodeSpec) -> list[NodeSpec]:
    nodes = {
        "root": NodeSpec("root", "root", children=("r1",), host="root@dc"),
        "r1": NodeSpec("r1", "region", parent="root", children=("a",), host="a", region="eu"),
        "a": NodeSpec("a", "site", parent="r1", host="a", region="eu"),
    }
    nodes.update(overrides)
    return list(nodes.values())


def _plan_dict(nodes: list[NodeSpec], kind: str = "hierarchical") -> dict[str, object]:
    return {
        "kind": kind,
        "nodes": [n.to_dict() for n in nodes],
        "sites": [Site("root@dc", "eu").to_dict(), Site("a", "eu").to_dict()],
    }


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (_tree(a=NodeSpec("a", "site", parent="ghost", host="a")), "unknown parent 'ghost'"),
        (
            _tree(
                root=NodeSpec("root", "root", children=(), host="root@dc"),
                r1=NodeSpec("r1", "region", parent="r2", children=("a", "r2"), host="a"),
                r2=NodeSpec("r2", "region", parent="r1", children=("r1",), host="a"),
            ),
            "cycle",
        ),
        (_tree(a=NodeSpec("a", "peer", host="a")), "role mismatch"),
        (_tree(r1=NodeSpec("r1", "site", parent="root", children=("a",), host="r1")), "r1"),
        (_tree(a=NodeSpec("a", "site", parent="r1", host="root@dc")), "own Site"),
        (_tree(a=NodeSpec("a", "site", parent="r1", host="zzz")), "unknown host site 'zzz'"),
        (_tree(a=NodeSpec("a", "site", parent="root", host="a")), "does not list it"),
        (
            _tree(r1=NodeSpec("r1", "region", parent="root", children=("a",), host="nowhere")),
            "unknown host",
        ),
    ],
)
def test_invalid_plans_are_rejected(tmp_path: Path, nodes: list[NodeSpec], message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_plan_dict(nodes)))
    with pytest.raises(ValueError, match=message):
        Plan.load(path)


def test_role_mismatch_for_kind_and_bad_mixing() -> None:
    with pytest.raises(ValueError, match="role mismatch"):
        Plan.from_dict(_plan_dict(_tree(), kind="gossip"))
    peer = NodeSpec("a", "peer", host="a", peers=(), mixing=(), self_weight=0.5)
    with pytest.raises(ValueError, match="sum to 1"):
        Plan.from_dict(
            {"kind": "gossip", "nodes": [peer.to_dict()], "sites": [Site("a", "eu").to_dict()]}
        )
    with pytest.raises(ValueError, match="unknown field"):
        Plan.from_dict({**_plan_dict(_tree()), "extra": 1})
    with pytest.raises(ValueError, match="unsupported extension"):
        star(_sites()).save("plan.yaml")


def test_links_are_the_wan_formula_for_every_pair_of_nodes() -> None:
    # Links are remembered by what they depend on (both hosts' regions, access latencies
    # and bandwidths): sites alike share one; every pair still gets its own hosts' values.
    sites = [
        *_sites(),
        Site("h5", "eu", access_latency_s=0.002),  # h2's twin
        Site("h6", "eu", access_latency_s=0.002, uplink_bps=5e6, downlink_bps=7e6),
        Site("h7", "us", access_latency_s=0.002),  # h2's but for the region
        Site("h8", "eu", access_latency_s=0.003),  # h2's but for the access latency
    ]
    plan = hierarchical(sites, WAN)
    for src in plan.node_ids():
        for dst in plan.node_ids():
            a, b = plan.host_site(src), plan.host_site(dst)
            link = plan.link(src, dst)
            if a.id == b.id:
                assert (link.latency_s, link.bandwidth_bps, link.loss) == (0.0, math.inf, 0.0)
                continue
            assert link.latency_s == WAN.rtt(a, b) / 2.0
            assert link.bandwidth_bps == min(a.uplink_bps, b.downlink_bps)
            assert link.loss == WAN.loss
