"""Impossible round sizes are scenario errors naming the field and the limit, and a
misspelled aggregation parameter in an arm is told its near match (issue 15)."""

from __future__ import annotations

from typing import Any

import pytest

from fedloom.federation.config_reader import ConfigError
from fedloom.sim.scenario import parse_scenario
from tests.sim.test_runner import small

FEDAVG: dict[str, Any] = {"name": "a", "algorithm": "fedavg"}  # small(): 8 sites


def test_clients_per_round_above_the_sites_is_an_error_not_a_clamp() -> None:
    with pytest.raises(ConfigError, match=r"^arms\[0\]\.clients_per_round: 80 .* 8 sites"):
        parse_scenario(small([{**FEDAVG, "clients_per_round": 80}]))
    shared = {"concurrency": 4, "clients_per_round": 9}
    with pytest.raises(ConfigError, match=r"^algorithm\.clients_per_round: 9 .*at most 8"):
        parse_scenario(small([FEDAVG], algorithm=shared))
    arm = parse_scenario(small([{**FEDAVG, "clients_per_round": 8}])).arms[0]
    assert arm.params.clients_per_round == 8


def test_min_cohort_above_the_round_is_an_error_not_a_clamp() -> None:
    with pytest.raises(ConfigError, match=r"^arms\[0\]\.min_cohort: 5 .*clients_per_round 4"):
        parse_scenario(small([{**FEDAVG, "clients_per_round": 4, "min_cohort": 5}]))
    # no clients_per_round written: a round selects every one of the 8 sites at most
    with pytest.raises(ConfigError, match=r"^arms\[0\]\.min_cohort: 9 .* 8 sites"):
        parse_scenario(small([{**FEDAVG, "min_cohort": 9}]))


def test_a_misspelled_aggregation_parameter_gets_its_near_match() -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(small([{**FEDAVG, "clients_per_rund": 4}]))
    text = str(err.value)
    assert "did you mean 'clients_per_round'?" in text
    known = text.split("known fields: ")[1].split(", ")
    assert {"clients_per_round", "min_cohort", "round_timeout_s", "server_lr"} <= set(known)
    assert {"lr_sweep", "training"} <= set(known)
