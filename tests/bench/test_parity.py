"""bench/parity.py's parts that need no daemon: the scenario is the demo's federation (and
a different one is refused), the simulated side evaluates every version reproducibly, the
staleness read from a daemon's /metrics page, and the figure line."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import generate_latest

from fedloom.algorithms.protocol import Metric
from fedloom.runtime.federation_files import DEMO_START_QUORUM, Federation, write_federation
from fedloom.runtime.harness import parse_metrics
from fedloom.runtime.metrics import MetricsSink
from fedloom.sim.scenario import Scenario, load_scenario
from tests.bench.loader import load_bench


def load_parity() -> ModuleType:
    return load_bench("parity")


@pytest.fixture(scope="module")
def parity() -> ModuleType:
    return load_parity()


@pytest.fixture(scope="module")
def scenario(parity: ModuleType) -> Scenario:
    loaded: Scenario = load_scenario(parity.SCENARIO)
    return loaded


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return write_federation(tmp_path_factory.mktemp("demo"), seed=1, start_quorum=DEMO_START_QUORUM)


def test_the_scenario_is_the_demo_federation(
    parity: ModuleType, scenario: Scenario, fed: Federation
) -> None:
    parity.check_equivalent(fed, scenario)


def _arm(scenario: Scenario, **changes: Any) -> Scenario:
    arm = scenario.arms[0]
    return replace(scenario, arms=(replace(arm, **changes),))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s, _: replace(s, seed=2), "seed: demo 1, scenario 2"),
        (
            lambda s, _: _arm(s, training=replace(s.arms[0].training, lr=0.1)),
            "training: demo",
        ),
        (
            lambda s, _: _arm(s, params=replace(s.arms[0].params, regional_buffer_size=2)),
            "region-north buffer_size: demo 3, scenario 2",
        ),
        (
            # hospital-3 moved to the south: the clusters differ from the demo's regions.
            lambda s, _: replace(
                s,
                sites=replace(s.sites, placement={**s.sites.placement, "hospital-3": "south"}),
            ),
            "regions: demo",
        ),
        (
            lambda s, _: replace(s, data={**s.data, "dirichlet_alpha": 0.5}),
            "data: demo",
        ),
        (
            lambda s, _: _arm(s, params=replace(s.arms[0].params, start_quorum=0)),
            "region-north start_quorum: demo 'all', scenario 0",
        ),
    ],
    ids=["seed", "lr", "region-buffer", "placement", "data", "start-quorum"],
)
def test_a_different_federation_is_refused(
    parity: ModuleType, scenario: Scenario, fed: Federation, change: object, message: str
) -> None:
    changed = change(scenario, fed)  # type: ignore[operator]
    with pytest.raises(parity.NotEquivalentError) as err:
        parity.check_equivalent(fed, changed)
    assert message in str(err.value)


def test_the_simulation_evaluates_every_version_reproducibly(
    parity: ModuleType, scenario: Scenario
) -> None:
    first = parity.run_sim(scenario, 12)
    again = parity.run_sim(scenario, 12)
    assert set(range(1, 13)) <= set(first.points)
    assert first.points == again.points
    # Each root version takes a buffer of two region forwards (root_buffer_size = 2), and
    # each forward three hospital updates (regional_buffer_size = 3).
    root_applied = sum(first.applied["root"].values())
    region_applied = sum(first.applied["region-north"].values()) + sum(
        first.applied["region-south"].values()
    )
    assert root_applied >= 2 * 12
    assert region_applied >= 3 * root_applied
    accuracies = [first.points[v][0] for v in range(1, 13)]
    assert all(0.5 < a <= 1.0 for a in accuracies)


def test_staleness_and_applied_counts_from_a_daemon_metrics_page(parity: ModuleType) -> None:
    sink = MetricsSink(per_source=True)
    taus = {"region-north": [0, 0, 1, 2, 5], "region-south": [1, 1, 0]}
    for src, values in taus.items():
        for tau in values:
            sink(Metric("update_applied", float(tau), {"src": src, "seq": "1"}))
    applied, staleness = parity.tier_counts(parse_metrics(generate_latest(sink.registry).decode()))
    assert applied == Counter({"region-north": 5, "region-south": 3})
    # Staleness 5 falls into the histogram's (4, 6] bucket, which the page names by 6.
    assert staleness == Counter({0: 3, 1: 3, 2: 1, 6: 1})


def test_the_figure_is_the_largest_gap_and_names_what_was_left_out(parity: ModuleType) -> None:
    real = parity.Series(points={1: (0.90, 0.3), 2: (0.95, 0.2), 4: (0.95, 0.1)})
    sim = parity.Series(points={1: (0.90, 0.3), 2: (0.97, 0.21), 3: (0.95, 0.2), 4: (0.95, 0.1)})
    c = parity.compare(real, sim, 4, 100)
    assert c.gaps == [0, 2, 0]
    # v4: the same accuracy and loss, but after a version that differed
    assert [row[3] for row in c.rows] == [True, False, False, True]
    assert c.missing_real == [3] and c.missing_sim == []
    assert parity.identical_prefix(c) == 1
    line = parity.figure_line(c, 4)
    assert line.startswith("parity: largest gap over versions 1-4 = 2 test examples (2.00%)")
    assert "[goal <= 2]" in line and "1 version(s) not evaluated on both sides" in line


def test_the_runs_line_gives_the_spread_and_the_figure_stays_the_worst(
    parity: ModuleType,
) -> None:
    sim = parity.Series(points={1: (0.90, 0.3), 2: (0.90, 0.3)})
    comparisons = [
        parity.compare(parity.Series(points={1: (0.90 + gap / 100, 0.3)}), sim, 2, 100)
        for gap in (1, 3, 1, 2)
    ]
    assert [c.largest for c in comparisons] == [1, 3, 1, 2]
    line = parity.runs_line(comparisons)
    assert "worst 3, median 1.5, best 1 test examples; within the goal in 3 of 4" in line


def test_without_the_start_quorum_both_sides_are_still_the_same_federation(
    parity: ModuleType, scenario: Scenario, tmp_path: Path
) -> None:
    """``--no-start-quorum``: the demo's configs without the quorum (its wait left at the
    default) and the scenario with ``start_quorum = 0``."""
    fed = write_federation(tmp_path / "fed", seed=1)
    assert "start_quorum" not in fed.config("root")["aggregation"]
    off = _arm(scenario, params=replace(scenario.arms[0].params, start_quorum=0))
    parity.check_equivalent(fed, off)
    with pytest.raises(parity.NotEquivalentError, match="start_quorum: demo 0, scenario 'all'"):
        parity.check_equivalent(fed, scenario)
