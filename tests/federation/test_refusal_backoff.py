"""``refusal_backoff_s``: how long an aggregator gives a site that refused a task no new one
(``algorithms.refusals``). Read strictly (scenario and daemon config alike), 5 s unless
written, passed by the one node factory to every aggregator in the simulator and the
daemons, and the backoff a root then applies: the written one, doubled per refusal in a
row up to ``MAX_BACKOFF_S``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from fedloom.algorithms.aggregator_base import AggregatorBase
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Deadline
from fedloom.algorithms.refusals import BACKOFF_S, MAX_BACKOFF_S, RefusalBook
from fedloom.federation.config_reader import Table
from fedloom.federation.params import AlgorithmConfig, read_algorithm
from fedloom.topology.hierarchical import hierarchical
from fedloom.topology.star import star
from fedloom.topology.wan import WanModel
from fedloom.transport.wire import TrainRefused
from tests.algorithms.alg_helpers import hello, model, recv, requests
from tests.federation.aggregation_tables import daemon_config_error, scenario_error
from tests.federation.test_factory import PARAMS, arm, both_paths, sites


def backoffs(nodes: dict[str, Any]) -> dict[str, float]:
    return {
        n: node.refusal_backoff_s for n, node in nodes.items() if isinstance(node, AggregatorBase)
    }


def test_five_seconds_unless_written() -> None:
    assert BACKOFF_S == 5.0
    assert AlgorithmConfig().refusal_backoff_s == BACKOFF_S
    assert read_algorithm(Table({}, "algorithm")).refusal_backoff_s == BACKOFF_S
    assert read_algorithm(Table({"refusal_backoff_s": 2}, "algorithm")).refusal_backoff_s == 2.0
    assert RefusalBook().backoff_s == BACKOFF_S
    root = FedBuffAggregator("root", {"s1": "site"}, model(0.0), buffer_size=1, concurrency=1)
    assert root.refusal_backoff_s == BACKOFF_S


@pytest.mark.parametrize("algorithm", ["fedbuff", "fedasync"])
def test_both_drivers_give_every_aggregator_the_written_backoff(algorithm: str) -> None:
    plan = hierarchical(sites(9), WanModel(), by="region", root_id="root", seed=7)
    simulated, daemons = both_paths(plan, arm(algorithm, "hierarchical", PARAMS))
    aggregators = [spec.id for spec in plan.nodes if spec.role in ("root", "region")]
    assert backoffs(simulated) == backoffs(daemons) == dict.fromkeys(aggregators, BACKOFF_S)
    params = replace(PARAMS, refusal_backoff_s=0.75)
    simulated, daemons = both_paths(plan, arm(algorithm, "hierarchical", params))
    assert backoffs(simulated) == backoffs(daemons) == dict.fromkeys(aggregators, 0.75)


def test_a_sync_root_gets_it_too() -> None:
    plan = star(sites(5), "root", "eu", wan=WanModel())
    params = replace(PARAMS, refusal_backoff_s=12.5)
    for nodes in both_paths(plan, arm("fedavg", "star", params)):
        assert backoffs(nodes) == {"root": 12.5}


def test_a_root_backs_a_refusing_site_off_for_the_written_time_doubled_up_to_the_cap() -> None:
    root = FedBuffAggregator(
        "root", {"s1": "site"}, model(0.0), buffer_size=1, concurrency=1, clip_norm=None
    )
    root.set_refusal_backoff(0.5)
    [(_, req)] = requests(root.handle(hello("s1"), 0.0))
    root.handle(recv("s1", TrainRefused("s1", req.task, 0, "failed", "r")), 1.0)
    assert root.refusals_view()["s1"]["backoff_until"] == 1.5
    assert root.next_deadline() == 1.5
    assert requests(root.handle(Deadline(), 1.4)) == []  # still backing off
    [(_, req)] = requests(root.handle(Deadline(), 1.5))
    root.handle(recv("s1", TrainRefused("s1", req.task, 0, "failed", "r")), 2.0)
    assert root.refusals_view()["s1"]["backoff_until"] == 3.0  # doubled: 2 x 0.5 s
    # a long base stops at the cap on the second refusal in a row
    book = RefusalBook(backoff_s=200.0)
    assert book.back_off("s", 0.0) == 200.0
    assert book.back_off("s", 0.0) == MAX_BACKOFF_S


@pytest.mark.parametrize("bad", [0.0, -1.0, MAX_BACKOFF_S + 1, float("nan"), float("inf")])
def test_the_book_refuses_a_backoff_outside_its_bounds(bad: float) -> None:
    with pytest.raises(ValueError, match="backoff_s must be > 0"):
        RefusalBook(backoff_s=bad)
    root = FedBuffAggregator("root", {"s1": "site"}, model(0.0), buffer_size=1, concurrency=1)
    with pytest.raises(ValueError, match="backoff_s must be > 0"):
        root.set_refusal_backoff(bad)
    assert root.refusal_backoff_s == BACKOFF_S


BAD = [
    ({"refusal_backoff_s": 0}, "refusal_backoff_s: expected a number > 0.0"),
    ({"refusal_backoff_s": -2.0}, "refusal_backoff_s: expected a number > 0.0"),
    ({"refusal_backoff_s": 301}, "refusal_backoff_s: expected a number <= 300"),
    ({"refusal_backoff_s": float("nan")}, "refusal_backoff_s: expected a number, got nan"),
    ({"refusal_backoff_s": "5s"}, "refusal_backoff_s: expected a number"),
    (
        {"refusal_backof_s": 2},
        "refusal_backof_s: unknown field (did you mean 'refusal_backoff_s'?)",
    ),
]


@pytest.mark.parametrize(("table", "message"), BAD)
def test_a_scenario_with_a_bad_backoff_is_refused_with_the_field_path(
    table: dict[str, Any], message: str
) -> None:
    assert scenario_error(table).startswith(f"algorithm.{message}")  # the shared table


@pytest.mark.parametrize(("table", "message"), BAD)
def test_a_daemon_config_with_a_bad_backoff_is_refused_with_the_field_path(
    table: dict[str, Any], message: str
) -> None:
    assert f"aggregation.{message}" in daemon_config_error(table)
