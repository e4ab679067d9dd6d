"""Chaos scenarios: every impossible value is one ConfigError naming the field; targets
(links, nodes, groups, all) resolve to what the runner acts on; the timeline is in order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.chaos.runner import combine_toxics
from fedloom.runtime.chaos.scenario import load_scenario, parse_scenario


def scenario(*faults: dict[str, Any], **top: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "duration_s": 60,
        "federation": {"shape": "hierarchy", "regions": 2, "sites": 4},
    }
    raw.update(top)
    raw["fault"] = list(faults)
    return raw


def error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_scenario(raw)
    return str(info.value)


def test_hierarchy_shape_spreads_sites_over_regions() -> None:
    s = parse_scenario(scenario())
    assert s.shape.regions == {"region-0": ["site-0", "site-2"], "region-1": ["site-1", "site-3"]}
    assert s.shape.nodes == ["root", "region-0", "region-1", "site-0", "site-2", "site-1", "site-3"]
    assert s.shape.parent("site-2") == "region-0"
    assert s.shape.parent("region-1") == "root"
    assert s.shape.parent("root") is None
    assert "site-3->region-1" in s.shape.links and "region-0->root" in s.shape.links
    assert len(s.shape.links) == 6


def test_star_shape_has_sites_under_the_root() -> None:
    s = parse_scenario({"duration_s": 10, "federation": {"shape": "star", "sites": 3}})
    assert s.shape.nodes == ["root", "site-0", "site-1", "site-2"]
    assert s.shape.links == ["site-0->root", "site-1->root", "site-2->root"]
    assert s.shape.children("root") == ["site-0", "site-1", "site-2"]


def test_targets_resolve_links_groups_nodes_and_all() -> None:
    s = parse_scenario(
        scenario(
            {"at_s": 5, "kind": "latency", "latency_ms": 50, "targets": ["region-0/*"]},
            {"at_s": 1, "kind": "loss", "loss": 0.1, "targets": ["region-1"]},
            {"at_s": 2, "kind": "blackhole", "targets": ["site-3->region-1"]},
            {"at_s": 3, "kind": "kill", "targets": ["region-1/*"]},
            {"at_s": 4, "kind": "pause", "targets": ["all"]},
            {"at_s": 6, "kind": "heal"},
        )
    )
    by_name = {f.name: f for f in s.faults}
    assert by_name["latency@5"].targets == ("site-0->region-0", "site-2->region-0")
    # A node's links: its own uplink and its children's links to it.
    assert by_name["loss@1"].targets == ("region-1->root", "site-1->region-1", "site-3->region-1")
    assert by_name["blackhole@2"].targets == ("site-3->region-1",)
    assert by_name["kill@3"].targets == ("site-1", "site-3")
    assert by_name["pause@4"].targets == tuple(s.shape.nodes)
    assert by_name["heal@6"].targets == tuple(s.shape.links)  # heal defaults to all links


def test_timeline_is_sorted_and_end_times_follow() -> None:
    s = parse_scenario(
        scenario(
            {"at_s": 30, "for_s": 5, "kind": "pause", "targets": ["root"]},
            {"at_s": 10, "kind": "kill_all", "for_s": 3},
            {"at_s": 20, "kind": "restart", "targets": ["site-0"], "graceful": False},
        )
    )
    assert [f.at_s for f in s.faults] == [10, 20, 30]
    assert s.faults[0].targets == tuple(s.shape.nodes)
    assert s.faults[0].end_s == 13
    assert s.faults[1].end_s is None and not s.faults[1].graceful
    assert s.faults[2].end_s == 35


def test_defaults_and_expectations() -> None:
    s = parse_scenario(
        scenario(
            {"at_s": 1, "kind": "corrupt", "targets": ["site-1"], "where": "wal_end"},
            {"at_s": 2, "for_s": 3, "kind": "disk_full", "targets": ["site-0"]},
            expect={"refuses_start": "site-1", "resume_within_s": 12},
        )
    )
    assert s.name == "scenario"
    assert s.expect == {"refuses_start": "site-1", "resume_within_s": 12.0}
    assert s.resume_within_s == 12.0
    assert s.faults[0].where == "wal_end"
    assert s.disk_nodes() == ["site-0"]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (scenario(duration_s=0), "duration_s: expected a number >= 1"),
        (scenario(duratoin_s=3), "duratoin_s: unknown field (did you mean 'duration_s'?)"),
        (scenario({"at_s": 1, "kind": "lag", "targets": ["all"]}), "fault[0].kind: 'lag' is not"),
        (scenario({"at_s": 99, "kind": "kill", "targets": ["root"]}), "fault[0].at_s: 99 s"),
        (
            scenario({"at_s": 50, "for_s": 20, "kind": "pause", "targets": ["root"]}),
            "fault[0].for_s: the fault would end at 70 s",
        ),
        (
            scenario({"at_s": 5, "kind": "kill", "targets": ["site-9"]}),
            "fault[0].targets[0]: 'site-9'",
        ),
        (
            scenario({"at_s": 5, "kind": "partition", "targets": ["site-0->root"]}),
            "'site-0->root' is not a link",
        ),
        (scenario({"at_s": 5, "kind": "kill", "targets": ["site-0->region-0"]}), "is a link"),
        (scenario({"at_s": 5, "kind": "latency", "targets": ["all"]}), "latency_ms: required"),
        (
            scenario({"at_s": 5, "kind": "latency", "latency_ms": -3, "targets": ["all"]}),
            "fault[0].latency_ms: expected a number >= 0",
        ),
        (
            scenario({"at_s": 5, "kind": "loss", "loss": 1.5, "targets": ["all"]}),
            "fault[0].loss: expected a number <= 0.99",
        ),
        (
            scenario({"at_s": 5, "kind": "bandwidth", "rate_kbps": 0, "targets": ["all"]}),
            "fault[0].rate_kbps: expected a number > 0.001",
        ),
        (
            scenario({"at_s": 5, "kind": "corrupt", "targets": ["region-0/*"]}),
            "corrupt takes exactly one node, got 2",
        ),
        (
            scenario({"at_s": 5, "kind": "corrupt", "where": "wal", "targets": ["site-0"]}),
            "fault[0].where: 'wal' is not one of",
        ),
        (
            scenario({"at_s": 5, "for_s": 2, "kind": "garbage", "targets": ["site-0"]}),
            "'site-0' does not listen",
        ),
        (scenario({"at_s": 5, "kind": "idle", "targets": ["root"]}), "fault[0].for_s: required"),
        (scenario({"at_s": 5, "for_s": 1, "kind": "heal"}), "a heal is instantaneous"),
        (scenario({"at_s": 5, "kind": "kill_all", "targets": ["root"]}), "remove targets"),
        (
            scenario({"at_s": 5, "kind": "kill", "targets": ["root"], "direction": "up"}),
            "fault[0].direction: unknown field",
        ),
        (
            scenario({"at_s": 5, "kind": "kill", "targets": []}),
            "fault[0].targets: name at least one",
        ),
        (
            scenario(
                {"at_s": 5, "kind": "kill", "targets": ["root"], "name": "x"},
                {"at_s": 6, "kind": "kill", "targets": ["root"], "name": "x"},
            ),
            "fault[1].name: 'x' names an earlier fault",
        ),
        (
            scenario(federation={"shape": "hierarchy", "regions": 5, "sites": 4}),
            "federation.regions: 5 regions for 4 sites",
        ),
        (
            scenario(federation={"shape": "star", "regions": 2, "sites": 4}),
            "federation.regions: a star has no regions",
        ),
        (scenario(federation={"shape": "ring"}), "federation.shape: 'ring' is not one of"),
        (
            scenario(federation={"shape": "star", "failover_after_s": 3}),
            "federation.failover_after_s: only a hierarchy has standby regions",
        ),
        (scenario(expect={"refuses_start": "site-7"}), "expect.refuses_start: 'site-7'"),
        (scenario(expect={"exactly_once": "yes"}), "expect.exactly_once: expected true or false"),
        (scenario(run={"tmpfs_mb": 0}), "run.tmpfs_mb: expected a number >= 1"),
        (scenario(name="../x"), "name: '../x' cannot name a run directory"),
    ],
)
def test_impossible_values_name_the_field(raw: dict[str, Any], needle: str) -> None:
    assert needle in error(raw)


def test_a_file_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("duration_s = 10\n[[fault]]\nat_s = 1\nkind = 'kill'\ntargets = ['nobody']\n")
    with pytest.raises(ConfigError, match=r"bad.toml: fault\[0\].targets\[0\]: 'nobody'"):
        load_scenario(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("duration_s = \n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_scenario(broken)
    with pytest.raises(ConfigError, match="no such scenario file"):
        load_scenario(tmp_path / "missing.toml")
    assert load_scenario(_write(tmp_path / "named.toml", "duration_s = 5\n")).name == "named"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_overlapping_network_faults_combine_to_the_worst_of_each() -> None:
    s = parse_scenario(
        scenario(
            {"at_s": 1, "kind": "latency", "latency_ms": 50, "jitter_ms": 5, "targets": ["all"]},
            {"at_s": 2, "kind": "latency", "latency_ms": 80, "targets": ["all"], "direction": "up"},
            {"at_s": 3, "kind": "bandwidth", "rate_kbps": 64, "targets": ["all"]},
            {"at_s": 4, "kind": "partition", "targets": ["all"], "direction": "down"},
            {"at_s": 5, "kind": "reset", "reset_after_bytes": 100, "targets": ["all"]},
        )
    )
    up = combine_toxics(s.faults, "up")
    down = combine_toxics(s.faults, "down")
    assert (up.latency_ms, up.jitter_ms, up.rate_kbps, up.blackhole) == (80, 5, 64, False)
    assert (down.latency_ms, down.rate_kbps, down.blackhole) == (50, 64, True)
    assert up.reset_after_bytes == down.reset_after_bytes == 100
    healthy = combine_toxics([], "up")
    assert healthy.latency_ms == 0 and not healthy.blackhole and healthy.reset_after_bytes is None


def test_a_gossip_ring_with_a_relay() -> None:
    s = parse_scenario(
        {
            "duration_s": 30,
            "federation": {"shape": "gossip", "peers": 5, "relayed": 2},
            "fault": [
                {"at_s": 1, "kind": "partition", "targets": ["relay"]},
                {"at_s": 2, "kind": "latency", "latency_ms": 5, "targets": ["peer-0/*"]},
                {"at_s": 3, "for_s": 2, "kind": "garbage", "targets": ["peer-0", "relay"]},
            ],
        }
    )
    shape = s.shape
    assert shape.nodes == ["peer-0", "peer-1", "peer-2", "peer-3", "peer-4", "relay"]
    # Listening neighbours: the lower number dials; a relayed peer dials a listening one;
    # two relayed neighbours (peer-3, peer-4) meet through the relay.
    assert shape.links == [
        "peer-0->peer-1",
        "peer-4->peer-0",
        "peer-1->peer-2",
        "peer-3->peer-2",
        "peer-3->relay",
        "peer-4->relay",
    ]
    assert shape.neighbours("peer-0") == ["peer-4", "peer-1"]
    assert shape.parent("peer-0") is None
    assert s.faults[0].targets == ("peer-3->relay", "peer-4->relay")
    assert s.faults[1].targets == ("peer-4->peer-0",)  # the peers that dial peer-0
    assert shape.peer_aggregation == {"gossip_mode": "dpsgd", "gossip_interval_s": 1.0}


@pytest.mark.parametrize(
    ("federation", "needle"),
    [
        ({"shape": "gossip", "peers": 1}, "federation.peers: expected a number >= 2"),
        ({"shape": "gossip", "peers": 3, "relayed": 4}, "federation.relayed: 4 relayed of 3"),
        ({"shape": "gossip", "sites": 3}, "federation.sites: a gossip federation has none"),
        ({"shape": "gossip", "gossip_mode": "flood"}, "federation.gossip_mode: 'flood'"),
        ({"shape": "star", "peers": 3}, "federation.peers: unknown field"),
    ],
)
def test_gossip_mistakes_name_the_field(federation: dict[str, Any], needle: str) -> None:
    assert needle in error({"duration_s": 10, "federation": federation})


def test_bad_input_needs_a_listening_gossip_node() -> None:
    raw = {
        "duration_s": 10,
        "federation": {"shape": "gossip", "peers": 3, "relayed": 1},
        "fault": [{"at_s": 1, "for_s": 1, "kind": "idle", "targets": ["peer-2"]}],
    }
    assert "'peer-2' does not listen" in error(raw)


def test_standby_regions_are_second_parents_of_their_regions_sites() -> None:
    s = parse_scenario(
        scenario(
            {"at_s": 1, "kind": "partition", "targets": ["region-0-standby/*"]},
            federation={"regions": 2, "sites": 4, "standby": True, "failover_after_s": 3},
        )
    )
    shape = s.shape
    assert shape.standbys == {"region-0-standby": "region-0", "region-1-standby": "region-1"}
    assert shape.failover_after_s == 3
    assert "region-1-standby" in shape.nodes and shape.parent("region-1-standby") == "root"
    assert shape.parent("site-0") == "region-0"  # the standby is a fallback, not the parent
    assert shape.children("region-0-standby") == ["site-0", "site-2"]
    assert "site-3->region-1-standby" in shape.links and "region-0-standby->root" in shape.links
    assert s.faults[0].targets == ("site-0->region-0-standby", "site-2->region-0-standby")
    assert "only a hierarchy has standby" in error(
        {"duration_s": 9, "federation": {"shape": "star", "standby": True}}
    )
    assert "not with load_sites" in error(
        {"duration_s": 9, "federation": {"sites": 2, "load_sites": 4, "standby": True}}
    )
