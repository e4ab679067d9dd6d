import numpy as np
import pytest

from fedloom.topology.election import elect
from fedloom.topology.hierarchical import MAX_RTT_CLUSTER_SITES, hierarchical
from fedloom.topology.plan import Plan
from fedloom.topology.specs import Site
from fedloom.topology.star import star
from fedloom.topology.wan import WanModel


def _cluster_sets(plan: Plan) -> dict[str, frozenset[str]]:
    return {r: frozenset(plan.children_of(r)) for r in plan.children_of(plan.roots[0])}


def test_by_region_builds_three_tiers() -> None:
    sites = [Site(f"s{i}", ["eu", "us", "asia"][i % 3]) for i in range(30)]
    plan = hierarchical(sites, WanModel())
    assert plan.kind == "hierarchical"
    assert plan.children_of("root") == ("region-asia", "region-eu", "region-us")
    for region_id in plan.children_of("root"):
        region = plan.node(region_id)
        assert region.role == "region" and region.parent == "root"
        assert len(region.children) == 10
        assert region.host in region.children and region.standby in region.children
        assert region.standby != region.host
        for child in region.children:
            node = plan.node(child)
            assert node.parent == region_id and node.host == child
            assert plan.site(child).region == region.region
    assert plan.host_site("root").id == "root@dc"
    with pytest.raises(ValueError, match="n_clusters"):
        hierarchical(sites, WanModel(), by="region", n_clusters=2)


def _grouped_sites() -> tuple[list[Site], WanModel, list[frozenset[str]]]:
    """Three groups of eight sites; each site has its own region label, and the WAN makes
    sites close (4 ms) inside a group and far (120 ms) across groups."""
    rng = np.random.default_rng(7)
    sites, groups = [], []
    for g in range(3):
        ids = []
        for k in range(8):
            sid = f"g{g}-{k}"
            ids.append(sid)
            sites.append(Site(sid, sid, access_latency_s=float(rng.uniform(0.0005, 0.003))))
        groups.append(frozenset(ids))
    order = rng.permutation(len(sites))
    shuffled = [sites[i] for i in order]
    rtts = {
        (a.region, b.region): 0.004
        for a in sites
        for b in sites
        if a.id < b.id and a.id.split("-")[0] == b.id.split("-")[0]
    }
    return shuffled, WanModel(rtts, default_inter_rtt_s=0.12), groups


@pytest.mark.parametrize("n_clusters", [None, 3])
def test_by_rtt_recovers_latency_groups(n_clusters: int | None) -> None:
    sites, wan, groups = _grouped_sites()
    plan = hierarchical(sites, wan, by="rtt", n_clusters=n_clusters, seed=3)
    assert sorted(_cluster_sets(plan).values(), key=min) == sorted(groups, key=min)
    assert plan.meta["by"] == "rtt"


def test_by_rtt_honours_n_clusters_and_limits() -> None:
    sites, wan, _ = _grouped_sites()
    plan = hierarchical(sites, wan, by="rtt", n_clusters=6)
    clusters = _cluster_sets(plan)
    assert len(clusters) == 6 and sum(len(c) for c in clusters.values()) == len(sites)
    assert len(set(clusters)) == 6  # names stay unique when labels repeat
    with pytest.raises(ValueError, match="n_clusters"):
        hierarchical(sites, wan, by="rtt", n_clusters=0)
    many = [Site(f"s{i}", "eu") for i in range(MAX_RTT_CLUSTER_SITES + 1)]
    with pytest.raises(ValueError, match="by='region'"):
        hierarchical(many, wan, by="rtt")
    with pytest.raises(ValueError, match="by must be"):
        hierarchical(sites, wan, by="latency")  # type: ignore[arg-type]


def test_election_picks_best_connected_site() -> None:
    wan = WanModel()
    members = [
        Site("slow-far", "eu", access_latency_s=0.02, uplink_bps=10e6, downlink_bps=10e6),
        Site("best", "eu", access_latency_s=0.001, uplink_bps=1e9, downlink_bps=1e9),
        Site("mid", "eu", access_latency_s=0.002, uplink_bps=200e6, downlink_bps=200e6),
        Site("fat-far", "eu", access_latency_s=0.03, uplink_bps=1e9, downlink_bps=900e6),
    ]
    result = elect(members, wan)
    assert result.host.id == "best"
    assert result.standby is not None and result.standby.id == "fat-far"
    assert max(result.scores) == result.scores[1]
    plan = hierarchical(members, wan)
    assert plan.node("region-eu").host == "best"
    assert plan.node("region-eu").standby == "fat-far"


def test_election_prefers_sites_accepting_inbound() -> None:
    members = [
        Site("best-closed", "eu", access_latency_s=0.001, uplink_bps=1e9, downlink_bps=1e9),
        Site("open", "eu", access_latency_s=0.01, inbound=True),
        Site("other", "eu", access_latency_s=0.01),
    ]
    result = elect(members, WanModel())
    assert result.host.id == "open"
    assert result.standby is not None and result.standby.id == "best-closed"


def test_single_site_cluster_has_no_standby() -> None:
    plan = hierarchical([Site("a", "eu"), Site("b", "us"), Site("c", "us")], WanModel())
    assert plan.node("region-eu").host == "a"
    assert plan.node("region-eu").standby is None


def test_planner_input_errors() -> None:
    with pytest.raises(ValueError, match="no sites"):
        hierarchical([], WanModel())
    with pytest.raises(ValueError, match="duplicate site id"):
        hierarchical([Site("a", "eu"), Site("a", "us")], WanModel())
    with pytest.raises(ValueError, match="clashes"):
        star([Site("root", "eu")])
    with pytest.raises(ValueError, match="clashes"):
        hierarchical([Site("region-eu", "eu")], WanModel())


def test_ten_thousand_site_plans_build() -> None:
    rng = np.random.default_rng(0)
    sites = [
        Site(
            f"site-{i}",
            f"r{i % 20}",
            access_latency_s=float(rng.uniform(0.001, 0.02)),
            uplink_bps=float(rng.uniform(10e6, 1e9)),
        )
        for i in range(10_000)
    ]
    plan = hierarchical(sites, WanModel())
    assert len(plan.children_of("root")) == 20
    assert sum(len(plan.children_of(r)) for r in plan.children_of("root")) == 10_000
    assert plan.link("site-17", plan.parent_of("site-17") or "").latency_s > 0
    assert len(star(sites).children_of("root")) == 10_000
