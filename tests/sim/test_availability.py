from __future__ import annotations

from typing import Any

import pytest

from fedloom.sim.availability import Availability, ChurnWindow, Death

SITES = [f"s{i:02d}" for i in range(20)]


def test_no_dropout_by_default() -> None:
    av = Availability()
    assert not any(av.job_dropped("s") for _ in range(100))
    assert not av.any_dropout


def test_dropout_rate_and_determinism() -> None:
    av = Availability(dropout=0.3, seed=1)
    draws = [av.job_dropped("s1") for _ in range(3000)]
    assert sum(draws) / len(draws) == pytest.approx(0.3, abs=0.03)
    again = Availability(dropout=0.3, seed=1)
    assert [again.job_dropped("s1") for _ in range(3000)] == draws
    other = Availability(dropout=0.3, seed=2)
    assert [other.job_dropped("s1") for _ in range(3000)] != draws


def test_per_site_dropout() -> None:
    av = Availability(dropout={"flaky": 0.9}, seed=0)
    assert sum(av.job_dropped("flaky") for _ in range(200)) > 150
    assert not any(av.job_dropped("solid") for _ in range(200))


def test_from_config_deaths_by_fraction_and_ids() -> None:
    cfg = {
        "death_fraction": 0.25,
        "death_at_s": 100.0,
        "deaths": [{"at_s": 50.0, "ids": ["s19"]}],
        "detection_delay_s": 12.0,
    }
    av = Availability.from_config(cfg, sites=SITES, seed=4)
    assert av.detection_delay_s == 12.0
    assert av.deaths[0] == Death(50.0, "s19")
    fraction_deaths = [d for d in av.deaths if d.at_s == 100.0]
    assert len(fraction_deaths) == 5
    assert "s19" not in {d.node for d in fraction_deaths}  # a site dies once
    # Same seed, same victims; another seed, (almost surely) others.
    again = Availability.from_config(cfg, sites=list(reversed(SITES)), seed=4)
    assert again.deaths == av.deaths
    other = Availability.from_config(cfg, sites=SITES, seed=5)
    assert other.deaths != av.deaths


def test_fraction_deaths_skip_sites_already_listed() -> None:
    cfg = {"deaths": [{"at_s": 1.0, "ids": SITES[:15]}, {"at_s": 2.0, "fraction": 0.5}]}
    av = Availability.from_config(cfg, sites=SITES)
    assert len(av.deaths) == 20
    assert {d.node for d in av.deaths if d.at_s == 2.0} == set(SITES[15:])


def test_from_config_churn_becomes_one_node_partitions() -> None:
    cfg = {"churn": [{"start_s": 10.0, "end_s": 20.0, "ids": ["s01", "s02"]}]}
    av = Availability.from_config(cfg, sites=SITES)
    assert av.churn == (ChurnWindow("s01", 10.0, 20.0), ChurnWindow("s02", 10.0, 20.0))
    parts = av.partitions()
    assert [sorted(p.nodes) for p in parts] == [["s01"], ["s02"]]
    assert parts[0].start_s == 10.0 and parts[0].end_s == 20.0
    frac = Availability.from_config(
        {"churn": [{"start_s": 0, "end_s": 5, "fraction": 0.5}]}, sites=SITES
    )
    assert len(frac.churn) == 10


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"dropout": 1.0}, "dropout must be < 1"),
        ({"dropout": -0.1}, "dropout must be >= 0"),
        ({"dropout": "x"}, "must be a number"),
        ({"bogus": 1}, "unknown field"),
        ({"deaths": [{"at_s": 1.0}]}, "exactly one of fraction or ids"),
        ({"deaths": [{"fraction": 0.1}]}, "at_s is required"),
        ({"deaths": [{"at_s": 1.0, "ids": ["nope"]}]}, "unknown site"),
        (
            {"deaths": [{"at_s": 1.0, "ids": ["s01"]}, {"at_s": 2.0, "ids": ["s01"]}]},
            "more than once",
        ),
        ({"churn": [{"start_s": 5.0, "end_s": 5.0, "ids": ["s01"]}]}, "after start_s"),
        ({"churn": {"start_s": 1}}, "must be a list"),
        ({"detection_delay_s": -1}, "detection_delay_s"),
        ({"deaths": [{"at_s": 1.0, "fraction": 2.0}]}, "fraction must be"),
    ],
)
def test_config_errors_are_clear(cfg: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Availability.from_config(cfg, sites=SITES)
