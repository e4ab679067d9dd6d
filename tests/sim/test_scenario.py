"""Scenario files: every shipped scenario loads; mistakes name their field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.federation.config_reader import ConfigError
from fedloom.sim.scenario import load_scenario, parse_scenario, site_ids

SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "scenarios").glob("*.toml"))


def minimal(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "t",
        "duration_h": 1,
        "data": {"dataset": "breast_cancer"},
        "sites": {"count": 4, "regions": ["a", "b"]},
        "arms": [{"name": "x", "algorithm": "fedbuff"}],
    }
    base.update(over)
    return base


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_shipped_scenarios_load(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.arms and scenario.duration_s > 0


def test_required_scenarios_are_shipped() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {
        "hospitals",
        "fedbuff-vs-fedavg",
        "gossip-topologies",
        "partition-and-deaths",
        "hierarchical-10k",
    } <= names


def test_hierarchical_100k_scenario_has_100000_sites_in_regions_of_1000() -> None:
    # Only parsed here: bench/hierarchical_scale.py --scenario hierarchical-100k runs it.
    path = next(p for p in SCENARIOS if p.stem == "hierarchical-100k")
    s = load_scenario(path)
    assert s.sites.count == 100_000 and len(s.sites.site_names()) == 100_000
    assert len(s.sites.regions) == 100 and s.duration_s == 24 * 3600
    per_region: dict[str, int] = {}
    for i in range(s.sites.count):
        region = s.sites.region_of(i)
        per_region[region] = per_region.get(region, 0) + 1
    assert set(per_region.values()) == {1000}


def test_arm_overrides_shared_sections_and_takes_its_own_parameters() -> None:
    s = parse_scenario(
        minimal(
            training={"lr": 0.1, "local_steps": 3},
            algorithm={"buffer_size": 7, "concurrency": 3},
            arms=[
                {"name": "a", "algorithm": "fedbuff", "buffer_size": 2, "training": {"lr": 0.5}},
                {"name": "b", "algorithm": "fedasync", "codec": {"up": "int8"}},
            ],
        )
    )
    a, b = s.arms
    assert a.training.lr == 0.5 and a.training.local_steps == 3
    assert a.params.buffer_size == 2 and a.params.concurrency == 3
    assert b.training.lr == 0.1 and b.params.buffer_size == 7
    assert b.codec.up == "int8" and a.codec.up == "fp32"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"duration_h": -1}, "duration_h: expected a number > 0"),
        ({"sites": {"count": 0}}, "sites.count: expected a number >= 1"),
        ({"sites": {"count": 3, "regoins": ["a"]}}, "did you mean 'regions'"),
        ({"arms": [{"algorithm": "fedbuf"}]}, "did you mean 'fedbuff'"),
        ({"arms": [{"algorithm": "fedbuff", "training": {"lr": "fast"}}]}, "arms[0].training.lr"),
        ({"arms": [{"algorithm": "fedbuff", "bufer_size": 3}]}, "arms[0].bufer_size: unknown"),
        ({"arms": [{"algorithm": "gossip", "topology": "star"}]}, "goes with topology 'gossip'"),
        # it said "algorithm 'gossip' goes with ..." of a fedbuff arm
        (
            {"arms": [{"algorithm": "fedbuff", "topology": "gossip"}]},
            "arms[0].topology: a gossip topology runs algorithm 'gossip' only, not 'fedbuff'",
        ),
        ({"arms": [{"algorithm": "fedprox"}]}, "needs a proximal term"),
        ({"arms": []}, "at least one [[arms]]"),
        ({"baseline": "nope"}, "baseline: 'nope' is not an arm name"),
        ({"data": {}}, "data.dataset: required field is missing"),
        (
            {"arms": [{"algorithm": "fedbuff", "availability": {"partitions": [{"region": "z"}]}}]},
            "partitions[0].region",
        ),
    ],
)
def test_mistakes_are_reported_with_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(minimal(**change))
    assert message in str(err.value)


def test_load_reports_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_scenario(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(bad)


def test_a_scenario_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    # Editors on Windows save UTF-8 with a BOM: it read "not valid TOML: Invalid statement
    # (at line 1, column 1)" of a file that looked right.
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + SCENARIOS[0].read_bytes())
    assert load_scenario(path).name == load_scenario(SCENARIOS[0]).name


def test_clip_norm_is_auto_by_default_and_can_be_a_number_or_off() -> None:
    def clip(**arm: Any) -> object:
        scenario = parse_scenario(minimal(arms=[{"name": "x", "algorithm": "fedbuff", **arm}]))
        return scenario.arms[0].params.clip_norm

    assert clip() == "auto"
    assert clip(clip_norm=2.5) == 2.5
    assert clip(clip_norm="off") is None
    with pytest.raises(ConfigError, match="clip_norm"):
        clip(clip_norm="sometimes")
    with pytest.raises(ConfigError, match="clip_norm"):
        clip(clip_norm=0)


def test_gossip_bounds_are_auto_by_default_and_can_be_a_number_or_off() -> None:
    def params(**arm: Any) -> tuple[object, object]:
        arms = [{"name": "x", "algorithm": "gossip", "topology": "gossip", **arm}]
        p = parse_scenario(minimal(arms=arms)).arms[0].params
        return p.gossip_clip, p.gossip_max_share_weight

    assert params() == ("auto", "auto")
    assert params(gossip_clip=2.0, gossip_max_share_weight="off") == (2.0, None)
    assert params(gossip_clip="off", gossip_max_share_weight=4) == (None, 4.0)
    with pytest.raises(ConfigError, match="gossip_max_share_weight"):
        params(gossip_max_share_weight=-1)


# ----------------------------------------------------------- explicit region placement


def placed(placement: dict[str, list[str]], **sites: Any) -> dict[str, Any]:
    arms = [{"name": "h", "algorithm": "fedbuff", "topology": "hierarchical"}]
    return minimal(sites={**sites, "placement": placement}, arms=arms)


@settings(max_examples=40, deadline=None)
@given(
    regions=st.lists(st.integers(0, 3), min_size=1, max_size=12),
    named=st.booleans(),
)
def test_the_planner_uses_exactly_the_placement(regions: list[int], named: bool) -> None:
    """Site i goes to region ``regions[i]``: the hierarchical plan has one region node per
    placed region, holding exactly its sites, and site i holds data partition i."""
    from fedloom.sim.runner import build_plan, build_sites, build_workload

    n = len(regions)
    names = [f"h{i}" for i in range(n)] if named else site_ids(n)
    placement: dict[str, list[str]] = {}
    for name, r in zip(names, regions, strict=True):
        placement.setdefault(f"r{r}", []).append(name)
    sites_table: dict[str, Any] = {"names": names} if named else {"count": n}
    scenario = parse_scenario(placed(placement, **sites_table))
    workload = build_workload(scenario, 0)
    sites = build_sites(scenario, workload, 0)
    assert [s.id for s in sites] == names
    assert [s.n_examples for s in sites] == [workload.n_examples(i) for i in range(n)]
    plan = build_plan(scenario, scenario.arms[0], sites, 0)
    clusters = {spec.id: set(spec.children) for spec in plan.nodes if spec.role == "region"}
    assert clusters == {f"region-{r}": set(members) for r, members in placement.items()}
    assert plan.node("root").children == tuple(sorted(clusters))


def test_placement_gives_the_region_order_and_defaults_to_round_robin() -> None:
    s = parse_scenario(placed({"south": ["site-001"], "north": ["site-000", "site-002"]}, count=3))
    assert s.sites.regions == ("south", "north")
    assert [s.sites.region_of(i) for i in range(3)] == ["north", "south", "north"]
    rr = parse_scenario(minimal(sites={"count": 3, "regions": ["a", "b"]}))
    assert [rr.sites.region_of(i) for i in range(3)] == ["a", "b", "a"]
    assert rr.sites.site_names() == ("site-000", "site-001", "site-002")


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        ({"names": ["a", "a"]}, "sites.names[1]: 'a' is listed twice"),
        ({"names": ["a", " b"]}, "sites.names[1]: expected a site id"),
        ({"count": 3, "names": ["a", "b"]}, "sites.count: 3 sites, but names lists 2"),
        ({"count": 2, "placement": {"x": ["site-000"]}}, "not placed: site-001"),
        (
            {"count": 2, "placement": {"x": ["site-000", "site-9"]}},
            "sites.placement.x[1]: 'site-9' is not a site of this scenario",
        ),
        (
            {"count": 2, "placement": {"x": ["site-000"], "y": ["site-000", "site-001"]}},
            "sites.placement.y[0]: 'site-000' is already placed in region 'x'",
        ),
        ({"count": 1, "placement": {"x": "site-000"}}, "sites.placement.x: expected a list"),
        (
            {"count": 1, "placement": {"x": [], "y": ["site-000"]}},
            "sites.placement.x: a region needs at least one site",
        ),
        (
            {"count": 1, "regions": ["x", "y"], "placement": {"x": ["site-000"]}},
            "sites.placement: region(s) y of sites.regions have no site",
        ),
        (
            {"count": 1, "regions": ["x"], "placement": {"z": ["site-000"]}},
            "sites.placement.z: 'z' is not in sites.regions",
        ),
        ({"count": 1, "placement": ["site-000"]}, "sites.placement: expected a table"),
        ({"count": 3, "placement": {"x": 1, "y": 1}}, "the counts place 2 sites, but there are 3"),
        ({"count": 2, "placement": {"x": 1, "y": ["site-001"]}}, "sites.placement.y: give every"),
        ({"count": 2, "placement": {"x": 2, "y": 0}}, "sites.placement.y: expected a number >= 1"),
        (
            {"count": 2, "regions": ["x", "z"], "placement": {"x": 2}},
            "sites.placement: region(s) z of sites.regions have no site",
        ),
    ],
)
def test_placement_mistakes_name_their_field(sites: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(minimal(sites=sites))
    assert message in str(err.value)


def test_placement_by_counts_gives_consecutive_blocks_in_the_tables_order() -> None:
    s = parse_scenario(placed({"south": 2, "north": 3}, count=5))  # type: ignore[dict-item]
    assert s.sites.regions == ("south", "north")
    assert [s.sites.region_of(i) for i in range(5)] == ["south"] * 2 + ["north"] * 3


def test_placement_and_rtt_clustering_are_refused_together() -> None:
    raw = placed({"x": ["site-000"]}, count=1)
    raw["arms"][0]["clustering"] = "rtt"
    with pytest.raises(ConfigError, match=r"arms\[0\].clustering: \[sites.placement\]"):
        parse_scenario(raw)
