"""Faults the scenario format expresses (issue 15): message loss that drops messages (or
resets the connection), scheduled churn windows, per-link codecs and ``[compute]``
overrides that switch the distribution. Tiny scenarios: each run is well under a second."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.federation.config_reader import ConfigError
from fedloom.sim.availability import periodic_windows
from fedloom.sim.report import report_to_dict
from fedloom.sim.runner import (
    build_availability,
    build_plan,
    build_sites,
    build_workload,
    run_scenario,
)
from fedloom.sim.scenario import ChurnSpec, parse_scenario
from tests.sim.test_runner import small
from tests.sim.test_scenario import minimal

STAR = {"algorithm": "fedbuff", "buffer_size": 3}
HIER = {"algorithm": "fedbuff", "topology": "hierarchical"}


def run(arms: list[dict[str, Any]], **over: Any) -> dict[str, dict[str, Any]]:
    report = report_to_dict(run_scenario(parse_scenario(small(arms, **over))))
    return {a["name"]: a for a in report["arms"]}


# ---------------------------------------------------------------------------- message loss


def test_lost_messages_are_dropped_counted_and_training_recovers_through_timeouts() -> None:
    # "drop": a lost TrainRequest or Update is noticed by the root's task time-out only.
    arms = [{"name": "lossy", **STAR, "task_timeout_s": 300}]
    lossless = run(arms, network={"loss": 0.0})["lossy"]
    lossy = run(arms, network={"loss": 0.1})["lossy"]
    again = run(arms, network={"loss": 0.1})["lossy"]
    extra = lossy["extra"]
    assert lossless["extra"]["messages_dropped_loss"] == 0
    assert extra["messages_dropped_loss"] > 10 and extra["connection_resets"] == 0
    assert extra["messages_dropped"] >= extra["messages_dropped_loss"]
    assert extra["job_timeouts"] > 0  # what noticed the losses
    assert lossy["versions"] > 0.3 * lossless["versions"] and lossy["final_accuracy"] > 0.85
    assert lossy["updates_duplicated"] == 0  # nothing applied twice (the ledger invariant)
    same = ("accuracy_series", "versions", "bytes_by_tier")  # all but wall-clock figures
    assert [lossy[k] for k in same] == [again[k] for k in same]  # losses follow the seed
    assert extra["messages_dropped_loss"] == again["extra"]["messages_dropped_loss"]


def test_a_loss_that_resets_the_connection_is_recovered_by_resends() -> None:
    # "reset": the link breaks, both ends see it, and unacknowledged updates are resent:
    # the parents see resends (deduplicated by their ledgers), none is applied twice.
    arms = [{"name": "hier", **HIER}, {"name": "fedavg", "algorithm": "fedavg"}]
    lossless = run(arms)
    lossy = run(arms, network={"loss": 0.2, "loss_effect": "reset", "reconnect_s": 2})
    for name in ("hier", "fedavg"):
        extra = lossy[name]["extra"]
        assert extra["connection_resets"] == extra["messages_dropped_loss"] > 20
        assert extra["duplicates_received"] > 0
        assert lossy[name]["updates_duplicated"] == 0
        assert lossy[name]["versions"] > 0.6 * lossless[name]["versions"]
        assert lossy[name]["final_accuracy"] > 0.85


def test_arms_compare_their_own_loss_over_the_shared_network() -> None:
    arms = [
        {"name": "clean", **STAR},
        {"name": "lossy", **STAR, "network": {"loss": 0.2, "loss_effect": "reset"}},
    ]
    by_name = run(arms, network={"inter_region_rtt_ms": 80}, duration_h=1)
    assert by_name["clean"]["extra"]["messages_dropped_loss"] == 0
    assert by_name["lossy"]["extra"]["connection_resets"] > 0
    s = parse_scenario(small(arms, network={"inter_region_rtt_ms": 80}))
    clean, lossy = s.arms
    assert clean.network is None and s.network.loss == 0.0
    assert lossy.network is not None and lossy.network.inter_region_rtt_ms == 80  # inherited
    with pytest.raises(ConfigError, match=r"arms\[0\]\.network\.loss: expected a number <= 0\.9"):
        parse_scenario(minimal(arms=[{"name": "x", **STAR, "network": {"loss": 2}}]))


def test_loss_of_one_link_only() -> None:
    arms = [{"name": "hier", **HIER}]
    lossy = run(arms, network={"region-root": {"loss": 0.3}}, duration_h=1)["hier"]
    assert lossy["extra"]["messages_dropped_loss"] > 0
    # Only region -> root and root -> region messages could be lost: no site link's.
    site_links = run(arms, network={"site-root": {"loss": 0.5}}, duration_h=1)["hier"]
    assert site_links["extra"]["messages_dropped_loss"] == 0


# ----------------------------------------------------------------------- churn windows


def churn_sites(churn: list[dict[str, Any]], **sites: Any) -> dict[str, list[tuple[float, float]]]:
    scenario = parse_scenario(
        minimal(
            sites={"count": 6, "regions": ["a", "b"], **sites},
            arms=[{"name": "x", **STAR, "availability": {"churn": churn}}],
        )
        | {"duration_h": 50}
    )
    arm = scenario.arms[0]
    workload = build_workload(scenario, 0)
    sites_ = build_sites(scenario, workload, 0)
    _, partitions = build_availability(
        scenario, arm, build_plan(scenario, arm, sites_, 0), sites_, 0
    )
    out: dict[str, list[tuple[float, float]]] = {}
    for p in partitions:
        (node,) = p.nodes  # a star: each machine runs its site alone
        out.setdefault(node, []).append((p.start_s, p.end_s))
    return out


def test_a_machine_offline_takes_the_aggregator_it_hosts_along() -> None:
    scenario = parse_scenario(
        minimal(
            sites={"count": 4, "regions": ["a", "b"]},
            arms=[
                {"name": "h", **HIER, "availability": {"churn": [{"start_h": 0.2, "end_h": 0.5}]}}
            ],
        )
    )
    arm = scenario.arms[0]
    sites = build_sites(scenario, build_workload(scenario, 0), 0)
    plan = build_plan(scenario, arm, sites, 0)
    _, partitions = build_availability(scenario, arm, plan, sites, 0)
    groups = {p.nodes for p in partitions}
    aggregators = {n.id: n.host for n in plan.nodes if n.role == "region"}
    assert len(groups) == 4  # one machine each
    for region, host in aggregators.items():
        assert frozenset({host, region}) in groups


def test_a_daily_window_repeats_until_the_run_ends() -> None:
    windows = churn_sites([{"region": "a", "start_h": 20, "end_h": 22, "every_h": 24}])
    h = 3600.0
    assert set(windows) == {"site-000", "site-002", "site-004"}  # round-robin region a
    assert windows["site-000"] == [(20 * h, 22 * h), (44 * h, 46 * h)]


def test_churn_picks_ids_a_fraction_or_every_site() -> None:
    assert set(churn_sites([{"sites": ["site-001"], "start_h": 1, "duration_h": 0.5}])) == {
        "site-001"
    }
    assert len(churn_sites([{"start_h": 1, "end_h": 2}])) == 6
    drawn = churn_sites([{"fraction": 0.5, "start_h": 1, "end_h": 2}])
    assert len(drawn) == 3 and drawn == churn_sites([{"fraction": 0.5, "start_h": 1, "end_h": 2}])


def test_sites_offline_in_a_window_stop_training() -> None:
    # Every site offline for the second hour of two: the root's model stops there.
    arms = [
        {"name": "always", **STAR},
        {"name": "offline", **STAR, "availability": {"churn": [{"start_h": 1, "end_h": 2}]}},
    ]
    by_name = run(arms)
    always, offline = by_name["always"], by_name["offline"]
    assert offline["extra"]["messages_dropped"] > 0
    assert 0.3 * always["versions"] < offline["versions"] < 0.7 * always["versions"]
    late = [acc for t, acc in offline["accuracy_series"] if t > 1.1 * 3600]
    assert len(set(late)) == 1  # one model, never replaced while everyone was away


@settings(max_examples=80, deadline=None)
@given(
    start=st.floats(0, 100),
    length=st.floats(0.01, 10),
    slack=st.floats(0.01, 10),
    until=st.floats(0, 300),
    periodic=st.booleans(),
)
def test_periodic_windows_repeat_without_overlap_until_the_end(
    start: float, length: float, slack: float, until: float, periodic: bool
) -> None:
    every = length + slack if periodic else None
    windows = periodic_windows(start, start + length, every, until)
    assert all(a < until for a, _ in windows)
    assert all(b - a == pytest.approx(length) for a, b in windows)
    assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(windows))
    if every is None:
        assert len(windows) == (1 if start < until else 0)
    else:  # every period that starts before the end has its window, and no other
        assert len(windows) == max(0, math.ceil((until - start) / every))
    with pytest.raises(ValueError):
        end = start + length
        periodic_windows(start, end, end - start, until)  # not shorter than its period


@pytest.mark.parametrize(
    ("churn", "message"),
    [
        ({"start_h": 2, "end_h": 1}, "churn[0].end_h: must be after start_h"),
        ({"start_h": 1}, "churn[0].end_h: give end_h or duration_h"),
        ({"start_h": 1, "end_h": 2, "duration_h": 1}, "give end_h or duration_h"),
        ({"start_h": 1, "end_h": 3, "every_h": 2}, "churn[0].every_h: a window repeated"),
        ({"start_h": 1, "end_h": 2, "region": "z"}, "churn[0].region: 'z' is not one of"),
        ({"start_h": 1, "end_h": 2, "sites": ["site-9"]}, "churn[0].sites[0]: 'site-9'"),
        ({"start_h": 1, "end_h": 2, "sites": []}, "churn[0].sites: must list"),
        ({"start_h": 1, "end_h": 2, "sites": ["site-000"] * 2}, "listed twice"),
        ({"start_h": 1, "end_h": 2, "fraction": 0}, "churn[0].fraction: expected a number >"),
        ({"start_h": 1, "end_h": 2, "region": "a", "fraction": 0.5}, "churn[0].fraction: give one"),
        ({"start_h": 1, "end_h": 2, "every": 24}, "churn[0].every: unknown field"),
    ],
)
def test_churn_mistakes_name_their_field(churn: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(minimal(availability={"churn": [churn]}))
    # the shared [availability] table's field, not the first arm's
    assert message in str(err.value) and str(err.value).startswith("availability.churn[0]")


def test_churn_spec_is_read() -> None:
    s = parse_scenario(
        minimal(availability={"churn": [{"start_h": 1, "duration_h": 0.5, "every_h": 24}]})
    )
    assert s.arms[0].availability.churn == (ChurnSpec(3600.0, 5400.0, 86400.0),)


# -------------------------------------------------------------------- per-link codecs


def test_a_link_codec_changes_only_that_links_bytes() -> None:
    arms = [
        {"name": "plain", **HIER},
        {"name": "site-int8", **HIER, "codec": {"site-region": {"up": "int8"}}},
        {"name": "root-int8", **HIER, "codec": {"region-root": {"up": "int8"}}},
    ]
    # Constant training times: the three arms send the same messages, only their sizes differ.
    by_name = run(arms, duration_h=1, compute={"distribution": "constant", "mean_s": 60})
    plain, site, root = (by_name[n]["bytes_by_tier"] for n in ("plain", "site-int8", "root-int8"))
    assert site["site->region"] < 0.7 * plain["site->region"]
    assert site["region->root"] == plain["region->root"]
    assert root["region->root"] < 0.7 * plain["region->root"]
    assert root["site->region"] == plain["site->region"]
    assert site["region->site"] == root["region->site"] == plain["region->site"]


def test_link_codecs_are_read_over_the_sections_fields() -> None:
    s = parse_scenario(
        minimal(
            codec={"up": "fp16", "region-root": {"down": "int8"}},
            arms=[{"name": "h", **HIER}, {"name": "s", **STAR}],
        )
    )
    hier, star = s.arms
    assert hier.codec.up == "fp16"
    ((link, codec),) = hier.link_codecs
    assert (link, codec.up, codec.down) == ("region-root", "fp16", "int8")
    assert star.link_codecs == ()  # a star has no region-root link: the shared one is unused


@pytest.mark.parametrize(
    ("arm", "shared", "message"),
    [
        ({**STAR, "codec": {"region-root": {"up": "int8"}}}, {}, "a star arm has no region-root"),
        ({**HIER, "codec": {"site-regoin": {"up": "int8"}}}, {}, "did you mean 'site-region'"),
        ({**HIER, "codec": {"site-region": {"up": "int9"}}}, {}, "codec.site-region.up"),
        ({**HIER}, {"codec": {"site-root": {"down": "topk"}}}, "codec.site-root.down: top-k"),
        (
            {**HIER, "codec": {"site-region": {"up": "int8"}}, "durability": {"signing": True}},
            {},
            "durability.signing",
        ),
    ],
)
def test_link_codec_mistakes_name_their_field(
    arm: dict[str, Any], shared: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(minimal(arms=[{"name": "x", **arm}], **shared))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ({"loss": 0.95}, "network.loss: expected a number <= 0.9"),
        ({"loss": -0.1}, "network.loss: expected a number >= 0"),
        ({"loss_effect": "lose"}, "network.loss_effect: 'lose' is not one of drop, reset"),
        ({"reconnect_s": 0}, "network.reconnect_s: expected a number > 0"),
        ({"site-regon": {"loss": 0.1}}, "network.site-regon: not a link"),
        ({"site-region": {"los": 0.1}}, "network.site-region.los: unknown field"),
        ({"packet_loss": 0.6}, "network.packet_loss: expected a number <= 0.5"),
    ],
)
def test_network_mistakes_name_their_field(network: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_scenario(minimal(network=network))
    assert message in str(err.value)


# ------------------------------------------------------------- [compute] overrides


def compute_of(shared: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    arms = [{"name": "x", **STAR, "compute": own}]
    return dict(parse_scenario(minimal(compute=shared, arms=arms)).arms[0].compute)


def test_an_arm_that_switches_the_distribution_replaces_the_table() -> None:
    gaussian = {"distribution": "gaussian", "mean_s": 60, "sd_s": 20, "min_s": 5}
    assert compute_of(gaussian, {"distribution": "constant", "mean_s": 30}) == {
        "distribution": "constant",
        "mean_s": 30,
    }
    # Same distribution (however spelt): the arm's fields go over the shared ones.
    assert compute_of(gaussian, {"distribution": "Gaussian", "sd_s": 1})["min_s"] == 5
    assert compute_of(gaussian, {"sd_s": 1}) == {**gaussian, "sd_s": 1}


def test_fields_that_clash_with_the_distribution_are_an_error_naming_them() -> None:
    with pytest.raises(ConfigError, match=r"arms\[0\]\.compute: unknown field\(s\) sd_s"):
        compute_of({"distribution": "constant", "mean_s": 60}, {"sd_s": 3})
    with pytest.raises(ConfigError, match=r"arms\[0\]\.compute: distribution 'exponential' needs"):
        compute_of({"mean_s": 60}, {"distribution": "exponential"})
