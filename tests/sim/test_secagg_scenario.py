"""``[secure_aggregation]`` in scenario files: the simulator runs secure FedBuff arms (star
and hierarchical) through the same node code and real cryptography as the daemons, and
refuses what cannot compose with masking."""

from __future__ import annotations

from typing import Any

import pytest

from fedloom.federation.config_reader import ConfigError
from fedloom.sim.runner import run_scenario
from fedloom.sim.scenario import parse_scenario
from tests.sim.test_runner import small

# max_colluders = 0: t = 2 of a 3-member cohort (the collusion bound has its own tests).
SECURE = {"enabled": True, "min_cohort": 2, "clip": 5.0, "form_wait_s": 60.0, "max_colluders": 0}


def test_secure_arms_learn_on_cohort_sums() -> None:
    arms: list[dict[str, Any]] = [
        {"name": "star-secure", "algorithm": "fedbuff", "buffer_size": 3},
        {
            "name": "hier-secure",
            "algorithm": "fedbuff",
            "topology": "hierarchical",
            "regional_buffer_size": 3,
        },
    ]
    scenario = parse_scenario(small(arms, secure_aggregation=SECURE))
    assert all(a.secure_aggregation.enabled for a in scenario.arms)
    report = run_scenario(scenario)
    for arm in report.arms:
        assert arm.final_accuracy > 0.85, arm.name
        assert arm.updates_duplicated == 0
        assert arm.updates_applied > 0 and arm.versions > 0


@pytest.mark.parametrize(
    ("arm", "match"),
    [
        ({"algorithm": "fedbuff", "codec": {"up": "int8"}}, "cannot compose with masking"),
        ({"algorithm": "fedasync"}, "secure aggregation runs on fedbuff"),
        ({"algorithm": "fedbuff", "secure_aggregation": {"min_cohrt": 3}}, "unknown field"),
    ],
)
def test_what_cannot_run_securely_is_a_config_error(arm: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_scenario(small([{"name": "a", **arm}], secure_aggregation=SECURE))
