"""Review findings on the scenario faults (issue 15 item 2): a Hello or first model lost
under loss_effect = "drop" no longer excludes a node for the run, the report names nodes
that never contributed, and impossible churn and window values are errors naming the field.
Tiny scenarios: each run is well under a second."""

from __future__ import annotations

from typing import Any

from tests.sim.test_scenario_faults import HIER, STAR, run


def silent(arm: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in arm["extra"].items() if "_without_updates" in k}


# ------------------------------------------------ finding 1: lost Hellos and first models


def test_sites_whose_hello_is_lost_still_contribute() -> None:
    # Half the site<->root messages are lost (seed 1: four of the eight sites' first Hellos
    # among them, which left those four out for the whole run before Hellos were retried).
    arms = [{"name": "star", **STAR, "task_timeout_s": 300}]
    star = run(arms, network={"loss": 0.5}, duration_h=3, seed=1)["star"]
    assert star["extra"]["messages_dropped_loss"] > 100
    assert silent(star) == {"sites_without_updates": 0, "sites_without_updates_ids": ""}


def test_a_region_whose_hello_or_first_model_is_lost_still_gets_the_model() -> None:
    # region <-> root loses half its messages: seed 2 lost both regions' Hello or first
    # model (0 versions all run before), seed 3 one region's.
    arms = [{"name": "hier", **HIER, "task_timeout_s": 300}]
    for seed in (2, 3):
        hier = run(arms, network={"region-root": {"loss": 0.5}}, duration_h=2, seed=seed)["hier"]
        assert hier["versions"] > 40
        assert silent(hier) == {
            "regions_without_updates": 0,
            "regions_without_updates_ids": "",
            "sites_without_updates": 0,
            "sites_without_updates_ids": "",
        }


def test_the_report_names_sites_that_never_contributed() -> None:
    # A churn window covering the whole run keeps two sites offline throughout.
    churn = [{"start_h": 0, "end_h": 2, "sites": ["site-001", "site-004"]}]
    star = run([{"name": "star", **STAR}], availability={"churn": churn}, duration_h=1)["star"]
    assert silent(star) == {
        "sites_without_updates": 2,
        "sites_without_updates_ids": "site-001 site-004",
    }
