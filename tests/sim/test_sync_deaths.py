"""FedAvg that selects every site keeps training after a site dies (issue 15): its rounds
cannot fill min_cohort any more, so they run with the live sites instead of stalling."""

from __future__ import annotations

from typing import Any

from fedloom.sim.report import report_to_dict
from fedloom.sim.runner import run_scenario
from fedloom.sim.scenario import parse_scenario
from tests.sim.test_runner import small

SITES = 10
EVERY_SITE = {
    "algorithm": "fedavg",
    "clients_per_round": SITES,
    "min_cohort": SITES,
    "round_timeout_s": 600,
}


def test_fedavg_over_every_site_keeps_training_after_a_death() -> None:
    arms: list[dict[str, Any]] = [
        {"name": "no-deaths", **EVERY_SITE},
        {
            "name": "a-death",
            **EVERY_SITE,
            "availability": {"death_fraction": 0.1, "death_at_h": 0.5},
        },
    ]
    scenario = small(arms, sites={"count": SITES, "regions": ["a"]}, duration_h=4)
    report = report_to_dict(run_scenario(parse_scenario(scenario)))
    by_name = {a["name"]: a for a in report["arms"]}
    healthy, dead = by_name["no-deaths"], by_name["a-death"]
    # Before the fix the arm stopped for good at the death (about an eighth of the
    # fault-free run's versions); now it keeps closing rounds with the nine live sites.
    assert healthy["versions"] > 50
    assert dead["versions"] > 0.8 * healthy["versions"]
    assert dead["final_accuracy"] > 0.85 and dead["updates_duplicated"] == 0
