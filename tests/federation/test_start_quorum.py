"""The start quorum's parameters: read strictly (scenario and daemon config alike), and
passed by the one node factory to every aggregator, in the simulator and the daemons."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from fedloom.algorithms.aggregator_base import AggregatorBase
from fedloom.federation.config_reader import Table
from fedloom.federation.params import AlgorithmConfig, read_algorithm
from fedloom.topology.hierarchical import hierarchical
from fedloom.topology.star import star
from fedloom.topology.wan import WanModel
from tests.federation.aggregation_tables import daemon_config_error, scenario_error
from tests.federation.test_factory import PARAMS, arm, both_paths, sites


def quorums(nodes: dict[str, Any]) -> dict[str, tuple[int, float]]:
    return {n: node.start_quorum for n, node in nodes.items() if isinstance(node, AggregatorBase)}


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedasync"])
def test_both_drivers_give_every_aggregator_all_its_children_as_quorum(algorithm: str) -> None:
    plan = hierarchical(sites(9), WanModel(), by="region", root_id="root", seed=7)
    params = replace(PARAMS, start_quorum="all", start_wait_s=4.0)
    simulated, daemons = both_paths(plan, arm(algorithm, "hierarchical", params))
    expected = {
        spec.id: (len(spec.children), 4.0) for spec in plan.nodes if spec.role in ("root", "region")
    }
    assert quorums(simulated) == expected
    assert quorums(daemons) == expected
    assert all(simulated[n].waiting_for_quorum for n in expected)  # type: ignore[attr-defined]


def test_a_number_above_the_children_is_all_of_them_and_zero_is_off() -> None:
    plan = star(sites(5), "root", "eu", wan=WanModel())
    for quorum, expected in ((3, 3), (99, 5), (0, 0)):
        params = replace(PARAMS, start_quorum=quorum, start_wait_s=2.0)
        for nodes in both_paths(plan, arm("fedprox", "star", params)):
            root = nodes["root"]
            assert isinstance(root, AggregatorBase)
            assert root.start_quorum == (expected, 2.0)
            assert root.waiting_for_quorum == (expected > 0)


def test_off_by_default() -> None:
    assert AlgorithmConfig().start_quorum == 0
    assert read_algorithm(Table({}, "algorithm")).start_quorum == 0
    got = read_algorithm(Table({"start_quorum": "all", "start_wait_s": 3}, "algorithm"))
    assert (got.start_quorum, got.start_wait_s) == ("all", 3.0)


BAD = [
    ({"start_quorum": -1}, "start_quorum: expected a number >= 0"),
    ({"start_quorum": 1.5}, "start_quorum: expected a whole number"),
    ({"start_quorum": True}, "start_quorum: expected a whole number"),
    ({"start_quorum": "most"}, "start_quorum: 'most' is not one of all"),
    ({"start_wait_s": 0}, "start_wait_s: expected a number > 0.0"),
    ({"start_wait_s": -2.0}, "start_wait_s: expected a number > 0.0"),
    ({"start_wait_s": float("inf")}, "start_wait_s: expected a number <= 3600"),
    ({"start_wait_s": float("nan")}, "start_wait_s: expected a number, got nan"),
    ({"start_wait_s": "5s"}, "start_wait_s: expected a number"),
    ({"start_quorm": 2}, "start_quorm: unknown field (did you mean 'start_quorum'?)"),
]


@pytest.mark.parametrize(("table", "message"), BAD)
def test_a_scenario_with_a_bad_quorum_is_refused_with_the_field_path(
    table: dict[str, Any], message: str
) -> None:
    assert scenario_error(table).startswith(f"algorithm.{message}")  # the shared table


@pytest.mark.parametrize(("table", "message"), BAD)
def test_a_daemon_config_with_a_bad_quorum_is_refused_with_the_field_path(
    table: dict[str, Any], message: str
) -> None:
    assert f"aggregation.{message}" in daemon_config_error(table)
