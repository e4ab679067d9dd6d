"""``[secure_aggregation]`` on fedavg/fedprox arms: the simulator runs each synchronous
round as one cohort through the same node code and real cryptography as the daemons,
including a root restart from its log and sites going offline."""

from __future__ import annotations

from typing import Any

import pytest

from fedloom.federation.config_reader import ConfigError
from fedloom.sim.runner import run_scenario
from fedloom.sim.scenario import parse_scenario
from tests.sim.test_runner import small

# max_colluders = 0: t = 2 of a small cohort (the collusion bound has its own tests).
SECURE = {"enabled": True, "min_cohort": 2, "clip": 5.0, "max_colluders": 0}


def test_secure_fedavg_rounds_learn_through_restarts_and_churn() -> None:
    arms: list[dict[str, Any]] = [
        {
            "name": "fedavg-secure",
            "algorithm": "fedavg",
            "clients_per_round": 5,
            "over_selection": 1.4,  # 7 of the 8 sites drawn: 2 stragglers a round are late
            "round_timeout_s": 900.0,
            "availability": {"offline_per_h": 1.0, "offline_s": 300},
            "durability": {
                "log": True,
                "restarts": [
                    {"node": "root", "at_s": 1500.0, "down_s": 20.0},
                    {"node": "site-003", "at_s": 2500.0, "down_s": 20.0},
                ],
            },
        }
    ]
    scenario = parse_scenario(small(arms, secure_aggregation=SECURE, duration_h=1))
    (arm,) = run_scenario(scenario).arms
    assert arm.final_accuracy > 0.85
    assert arm.updates_duplicated == 0
    extra = arm.extra
    assert extra["restarts"] == 2
    # Every version is one completed cohort; nothing else moved the model.
    assert extra["secagg_cohorts_completed"] == arm.versions > 0
    # Each applied update is a survivor of one of those cohorts.
    survivors = extra["secagg_mean_survivors"] * extra["secagg_cohorts_completed"]
    assert arm.updates_applied == pytest.approx(survivors)
    assert extra["late_updates"] > 0  # over-selected stragglers: never masked, late


@pytest.mark.parametrize(
    ("arm", "match"),
    [
        ({"algorithm": "fedasync"}, "secure aggregation runs on fedbuff"),
        (
            {"algorithm": "fedavg", "clients_per_round": 4, "codec": {"up": "fp16"}},
            "cannot compose with masking",
        ),
    ],
)
def test_what_cannot_run_securely_is_a_config_error(arm: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_scenario(small([{"name": "a", **arm}], secure_aggregation=SECURE))
