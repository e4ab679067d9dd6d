"""Scenario files: every shipped scenario loads; mistakes name their field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedloom.federation.config_reader import ConfigError
from fedloom.sim.scenario import load_scenario, parse_scenario

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
