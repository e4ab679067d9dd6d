"""Secure aggregation and central DP in scenarios: what report.json says about them.

Small federations (breast cancer, a dozen sites, the numpy model) run through the real
nodes, codec and cryptography; every test is bounded by its virtual duration.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.federation.config_reader import ConfigError
from fedloom.federation.params import AlgorithmConfig
from fedloom.sim.dp_calibration import calibrate_noise, epsilon_after
from fedloom.sim.report import dumps_report, report_to_dict, strip_wall, write_report
from fedloom.sim.runner import churn_windows, run_scenario
from fedloom.sim.scenario import parse_scenario

# max_colluders = 0: t = 3 of 5 (the collusion bound has its own tests).
SECURE = {"enabled": True, "min_cohort": 3, "max_dropout": 0.4, "clip": 5.0, "max_colluders": 0}


def scenario(arms: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "privacy-small",
        "seed": 3,
        "duration_h": 1,
        "eval_interval_s": 600,
        "data": {"dataset": "breast_cancer", "model": "softmax"},
        "sites": {"count": 12, "regions": ["a"]},
        "compute": {"distribution": "halfnormal", "min_s": 30, "sd_s": 60},
        "training": {"lr": 0.1, "local_steps": 5, "batch_size": 16},
        "algorithm": {"concurrency": 10},
        "availability": {"dropout": 0.1},
        "arms": arms,
    }
    base.update(over)
    return base


SECURE_ARMS: list[dict[str, Any]] = [
    {"name": "plain", "algorithm": "fedbuff", "buffer_size": 5},
    {"name": "secure", "algorithm": "fedbuff", "buffer_size": 5, "secure_aggregation": SECURE},
]


@pytest.fixture(scope="module")
def secure_report() -> dict[str, Any]:
    return report_to_dict(run_scenario(parse_scenario(scenario(SECURE_ARMS))))


def test_secure_scenario_is_deterministic_byte_for_byte(secure_report: dict[str, Any]) -> None:
    again = run_scenario(parse_scenario(scenario(SECURE_ARMS)))
    text = json.dumps(strip_wall(json.loads(dumps_report(again))), sort_keys=False)
    assert text == json.dumps(strip_wall(json.loads(json.dumps(secure_report))))


def test_secure_arm_reports_cohorts_and_pays_more_bytes(secure_report: dict[str, Any]) -> None:
    plain, secure = secure_report["arms"]
    extra = secure["extra"]
    assert not any(k.startswith("secagg_") for k in plain["extra"])
    assert extra["secagg_cohorts_sealed"] >= extra["secagg_cohorts_completed"] > 0
    assert (
        extra["secagg_cohorts_completed"] + extra["secagg_cohorts_aborted"]
        <= (extra["secagg_cohorts_sealed"])
    )
    assert 3 <= extra["secagg_mean_cohort_size"] <= 5  # t = 3 .. K = 5 members
    assert 3 <= extra["secagg_mean_survivors"] <= 5
    # Every site update the root applied came out of a completed cohort.
    assert extra["site_updates_applied"] == secure["updates_applied"] > 0
    assert secure["updates_duplicated"] == 0
    # Masked uint32 data, share bundles, views and shares: more bytes per update.
    assert extra["site_bytes_per_update"] > plain["extra"]["site_bytes_per_update"]
    assert extra["secagg_plain_arm"] == "plain"
    ratio = extra["site_bytes_per_update"] / plain["extra"]["site_bytes_per_update"]
    assert extra["secagg_bytes_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert ratio > 1.5
    # Every message of the protocol crossed a link, sized by the wire codec; a masked
    # upload carries at least its (d + 1) uint32 words for each applied update.
    for kind in ("Join", "Seal", "View", "ViewSig", "Unmask", "Shares"):
        assert extra[f"secagg_bytes_SecAgg{kind}"] > 0, kind
    d = 31 * 2  # at least: breast cancer, 30 features + a bias, 2 classes
    assert extra["secagg_bytes_MaskedUpdate"] >= (d + 1) * 4 * secure["updates_applied"]
    assert secure["final_accuracy"] > 0.85


def test_members_going_offline_mid_cohort_are_dropped_and_cohorts_complete() -> None:
    # Frequent offline spells and a slow uplink: members vanish after the seal or after
    # their upload; the survivors' cohorts still complete (double masking recovers).
    churn = {"dropout": 0.1, "offline_per_h": 60.0, "offline_s": 20.0}
    raw = scenario(
        SECURE_ARMS[1:],
        duration_h=2,
        availability=churn,
        sites={"count": 12, "regions": ["a"], "uplink_mbps": 0.02, "access_latency_ms": 100},
    )
    report = report_to_dict(run_scenario(parse_scenario(raw)))
    (arm,) = report["arms"]
    extra = arm["extra"]
    assert extra["secagg_members_dropped"] > 0
    assert extra["secagg_cohorts_completed"] > 0
    # Some completed cohort unmasked without a member: survivors below members on average.
    assert extra["secagg_mean_survivors"] < 5
    assert arm["updates_duplicated"] == 0
    assert arm["final_accuracy"] > 0.85


DP = {"mechanism": "central", "clip": 1.0}
DP_ARMS: list[dict[str, Any]] = [
    {"name": "no-dp", "algorithm": "fedavg", "clients_per_round": 6},
    {
        "name": "eps-3",
        "algorithm": "fedavg",
        "clients_per_round": 6,
        "privacy": {**DP, "target_epsilon": 3.0, "releases": 20},
    },
    {
        "name": "z-1",
        "algorithm": "fedavg",
        "clients_per_round": 6,
        "privacy": {**DP, "noise_multiplier": 1.0},
    },
]


def test_privacy_scenario_reports_epsilon_per_arm_and_plots_it(tmp_path: Path) -> None:
    raw = scenario(
        DP_ARMS,
        sites={"count": 24, "regions": ["a"]},
        algorithm={"concurrency": 10, "weighting": "uniform", "start_quorum": "all"},
    )
    parsed = parse_scenario(raw)
    report = run_scenario(parsed)
    arms = {a.name: a.extra for a in report.arms}
    assert "dp_epsilon" not in arms["no-dp"]
    calibrated = arms["eps-3"]
    assert calibrated["dp_target_epsilon"] == 3.0
    # ceil(1.3 * 6) = 8 of 24 drawn a round: the root's own over-selection (AlgorithmConfig's
    # default, none written here), so the calibration and the root's accountant agree.
    drawn = math.ceil(AlgorithmConfig().over_selection * 6)
    assert drawn == 8
    assert calibrated["dp_sampling_rate"] == pytest.approx(drawn / 24)
    assert 0.0 < float(calibrated["dp_epsilon"]) <= 3.0 + 1e-9  # the budget is the target
    assert int(calibrated["dp_releases"]) > 0
    z = parsed.arms[1].privacy.noise_multiplier
    assert calibrated["dp_noise_multiplier"] == z
    assert epsilon_after(z, 1e-5, 20, drawn / 24) == pytest.approx(3.0, rel=2e-3)
    fixed = arms["z-1"]
    assert fixed["dp_noise_multiplier"] == 1.0 and "dp_target_epsilon" not in fixed
    assert float(fixed["dp_epsilon"]) > 0 and int(fixed["dp_releases"]) > 0
    paths = write_report(report, tmp_path)
    png = paths["epsilon_plot"]
    assert png == tmp_path / "accuracy_vs_epsilon.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert [("dp_epsilon" in a["extra"]) for a in on_disk["arms"]] == [False, True, True]


def test_no_epsilon_plot_without_a_private_arm(tmp_path: Path) -> None:
    raw = scenario(SECURE_ARMS[:1], duration_h=0.25)
    paths = write_report(run_scenario(parse_scenario(raw)), tmp_path)
    assert "epsilon_plot" not in paths
    assert not (tmp_path / "accuracy_vs_epsilon.png").exists()


@pytest.mark.parametrize(
    ("privacy", "match"),
    [
        ({**DP, "target_epsilon": 3.0, "releases": 10, "noise_multiplier": 1.0}, "not both"),
        ({**DP, "target_epsilon": 3.0}, "releases"),
        ({**DP, "target_epsilon": -1.0, "releases": 10}, "target_epsilon"),
        ({**DP, "target_epsilon": 1e-6, "releases": 10**6}, "noise multiplier above"),
    ],
)
def test_calibration_fields_are_checked(privacy: dict[str, Any], match: str) -> None:
    arm = {"name": "a", "algorithm": "fedavg", "clients_per_round": 6, "privacy": privacy}
    raw = scenario([arm], algorithm={"concurrency": 10, "weighting": "uniform"})
    with pytest.raises(ConfigError, match=match):
        parse_scenario(raw)


def test_calibration_hits_the_target_and_sampling_amplifies() -> None:
    for eps in (1.0, 3.0, 8.0):
        z = calibrate_noise(eps, 1e-5, 100, 0.1)
        assert epsilon_after(z, 1e-5, 100, 0.1) <= eps
        assert epsilon_after(z / 1.01, 1e-5, 100, 0.1) > eps  # the smallest such z
    assert calibrate_noise(3.0, 1e-5, 100, 0.1) < calibrate_noise(3.0, 1e-5, 100, None)
    assert calibrate_noise(1.0, 1e-5, 100) > calibrate_noise(8.0, 1e-5, 100)
    with pytest.raises(ValueError):
        calibrate_noise(0.0, 1e-5, 10)
    with pytest.raises(ValueError):
        calibrate_noise(1.0, 1e-5, 0)


@settings(max_examples=40, deadline=None)
@given(
    per_h=st.floats(0.0, 30.0),
    mean_s=st.floats(1.0, 3600.0),
    duration_s=st.floats(1.0, 48 * 3600.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_churn_windows_are_seeded_disjoint_and_inside_the_run(
    per_h: float, mean_s: float, duration_s: float, seed: int
) -> None:
    sites = [f"site-{i}" for i in range(5)]
    windows = churn_windows(sites, per_h, mean_s, duration_s, seed)
    assert windows == churn_windows(sites, per_h, mean_s, duration_s, seed)
    if per_h == 0.0:
        assert windows == []
    for site in sites:
        mine = [w for w in windows if w.node == site]
        for w in mine:
            assert 0.0 <= w.start_s < duration_s and w.end_s > w.start_s
        for a, b in itertools.pairwise(mine):
            assert b.start_s >= a.end_s  # one spell at a time
    # One site's spells do not depend on which other sites are in the run.
    alone = churn_windows(sites[:1], per_h, mean_s, duration_s, seed)
    assert alone == [w for w in windows if w.node == sites[0]]


def test_an_arm_the_factory_refuses_stops_the_scenario_before_any_arm_runs() -> None:
    arms = [
        SECURE_ARMS[0],
        {**SECURE_ARMS[1], "name": "secure-median", "robust": "median"},
    ]
    ran: list[str] = []
    with pytest.raises(ConfigError, match=r"arm 'secure-median'.*robust"):
        run_scenario(parse_scenario(scenario(arms)), progress=lambda label, *_: ran.append(label))
    assert ran == []  # the plain arm before it never ran
