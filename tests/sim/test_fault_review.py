"""Review findings on the scenario faults (issue 15 item 2): a Hello or first model lost
under loss_effect = "drop" no longer excludes a node for the run, the report names nodes
that never contributed, and impossible churn and window values are errors naming the field.
Tiny scenarios: each run is well under a second."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fedloom.algorithms.site import SiteNode
from fedloom.federation.config_reader import ConfigError
from fedloom.sim.availability import periodic_windows
from fedloom.sim.network import UniformLinks
from fedloom.sim.runner import (
    build_nodes,
    build_plan,
    build_sites,
    build_workload,
    drops_messages,
    network_of,
)
from fedloom.sim.scenario import parse_scenario
from tests.sim.test_network import Blob, make
from tests.sim.test_runner import small
from tests.sim.test_scenario_faults import HIER, STAR, churn_sites, run


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


# ------------------------------------- findings 2, 3, 4, 7: churn and window values


def churn_error(churn: dict[str, Any], **over: Any) -> str:
    scenario = small([{"name": "a", **STAR}], availability={"churn": [churn]}, **over)
    with pytest.raises(ConfigError) as err:
        parse_scenario(scenario)
    return str(err.value)


@pytest.mark.parametrize("value", [math.inf, 1e306, 1e7])
@pytest.mark.parametrize(
    ("churn", "key"),
    [
        ({"duration_h": 1}, "start_h"),
        ({"start_h": 0.5}, "duration_h"),
        ({"start_h": 0.5}, "end_h"),
        ({"start_h": 0, "duration_h": 1}, "every_h"),
    ],
)
def test_window_times_must_be_finite_and_name_the_field(
    churn: dict[str, Any], key: str, value: float
) -> None:
    message = churn_error({**churn, key: value})
    assert message.startswith(f"availability.churn[0].{key}: expected a number <= ")


def test_partition_and_run_times_must_be_finite() -> None:
    part = {"partitions": [{"region": "a", "start_h": 0, "end_h": math.inf}]}
    with pytest.raises(ConfigError, match=r"availability\.partitions\[0\]\.end_h: expected"):
        parse_scenario(small([{"name": "a", **STAR}], availability=part))
    with pytest.raises(ConfigError, match=r"^duration_h: expected a number <="):
        parse_scenario(small([{"name": "a", **STAR}], duration_h=math.inf))


def test_a_churn_period_too_short_for_the_run_is_an_error_naming_every_h() -> None:
    # It hung, building 10 million windows of 8 sites eagerly (2 GB and growing).
    message = churn_error({"start_h": 0, "duration_h": 1e-7, "every_h": 2e-7})
    assert message.startswith(
        "availability.churn[0].every_h: 10,000,000 windows of 8 sites in the run"
    )
    # A region's sites only are counted: 200,000 windows of its 4 sites are allowed.
    ok = {"start_h": 0, "duration_h": 1e-6, "every_h": 1e-5, "region": "a"}
    parse_scenario(small([{"name": "a", **STAR}], availability={"churn": [ok]}))
    assert "every_h: 400,000 windows of 4 sites" in churn_error({**ok, "every_h": 5e-6})


def test_a_long_period_keeps_the_first_window() -> None:
    hour = 3600.0
    assert periodic_windows(0.0, 1.9 * hour, 100 * hour, 2 * hour) == [(0.0, 1.9 * hour)]
    with pytest.raises(ValueError, match="finite period"):
        periodic_windows(0.0, 1.9 * hour, math.inf, 2 * hour)  # 0 * inf was NaN: no window
    windows = churn_sites(
        [{"sites": ["site-001"], "start_h": 0, "duration_h": 1.9, "every_h": 1e5}]
    )
    assert windows == {"site-001": [(0.0, 1.9 * hour)]}


def test_a_fraction_that_picks_no_site_is_an_error() -> None:
    message = churn_error({"start_h": 0, "end_h": 1, "fraction": 0.05})
    assert message.startswith("availability.churn[0].fraction: 0.05 of 8 sites is no site")
    assert "give at least 0.125" in message
    assert (
        len(churn_sites([{"start_h": 0, "end_h": 1, "fraction": 0.1}])) == 1
    )  # 0.6 of a site: one


# ------------------------------------------ finding 5: a reset takes the message's time


def test_a_message_lost_to_a_reset_takes_its_time_on_the_link_before_the_break() -> None:
    # 50 kB at 1000 B/s: 50 s on the link. The connection used to break at once (both ends
    # heard PeerDown at the send, and the link was free again), making resets nearly free.
    for seed in range(40):  # the first seed whose draw loses the message (p = 0.5)
        k, net, rec = make(
            links=UniformLinks(latency_s=0.01, bandwidth_bps=8000.0),
            roles={"s": "site", "r": "root"},
            neighbours=[("s", "r")],
        )
        net.set_message_loss(0.5, seed=seed, effect="reset", reconnect_s=1.0)
        net.start()
        k.run()
        t0 = k.now
        net.send("s", "r", Blob("big", 50_000))
        net.send("s", "r", Blob("behind", 100))  # queued behind it: lost with the break
        k.run()
        if net.stats.connection_resets:
            break
    assert net.stats.connection_resets == 1 and net.stats.messages_dropped_loss == 1
    assert rec.delivered == [] and net.stats.messages_lost == 1  # "behind" went with it
    notices = [(round(t - t0, 6), node, up) for t, node, _, up in rec.notices if t > t0]
    assert notices == [
        (50.0, "s", False),
        (50.0, "r", False),
        (51.01, "s", True),
        (51.01, "r", True),
    ]


# ------------------------------------- finding 6: an arm's link table names a link it has


def test_an_arms_own_network_link_table_must_be_a_link_of_its_topology() -> None:
    arms = [{"name": "x", **STAR, "network": {"peer-peer": {"loss": 0.5}}}]
    with pytest.raises(ConfigError, match=r"^arms\[0\]\.network\.peer-peer: a star arm has no"):
        parse_scenario(small(arms))
    hier = [{"name": "h", **HIER, "network": {"region-root": {"loss": 0.5}}}]
    (arm,) = parse_scenario(small(hier)).arms
    assert arm.network is not None and arm.network.link_loss == (("region-root", 0.5),)
    # A shared table applies to the arms that have the link (none here: accepted).
    parse_scenario(small([{"name": "x", **STAR}], network={"region-root": {"loss": 0.5}}))


# ------------------------------ suspicions: settings no arm uses are noted, not errors


def test_settings_no_arm_uses_are_noted() -> None:
    churn = {"churn": [{"start_h": 30, "end_h": 31}, {"start_h": 1, "end_h": 1.5}]}
    scenario = parse_scenario(
        small(
            [{"name": "x", **STAR}],
            network={"region-root": {"loss": 0.5}},
            codec={"peer-peer": {"up": "fp16"}},
            availability=churn,
        )
    )
    assert scenario.notes == (
        "network.region-root: no arm has a region-root link (the arms are star); it applies "
        "to none",
        "codec.peer-peer: no arm has a peer-peer link (the arms are star); it applies to none",
        "availability.churn[0]: starts at 30 h, when the run (2 h) is over; it takes nothing "
        "offline",
        # small()'s shared [algorithm] table sets the regions' parameters: no region here
        "algorithm.regional_concurrency: only hierarchical arms use it (the arms are star); it "
        "applies to none",
        "algorithm.regional_buffer_size: only hierarchical arms use it (the arms are star); it "
        "applies to none",
    )
    assert (
        parse_scenario(small([{"name": "h", **HIER}], network={"region-root": {"loss": 0.5}})).notes
        == ()
    )


def test_the_cli_prints_the_notes(tmp_path: Any, capsys: Any) -> None:
    from fedloom.sim.commands import cmd_sim

    path = tmp_path / "s.toml"
    path.write_text(
        'name = "n"\nduration_min = 20\neval_interval_s = 600\n'
        '[data]\ndataset = "breast_cancer"\nmodel = "softmax"\n'
        '[sites]\ncount = 3\nregions = ["a"]\n[network.peer-peer]\nloss = 0.1\n'
        '[[arms]]\nname = "x"\nalgorithm = "fedbuff"\n',
        encoding="utf-8",
    )
    assert cmd_sim(path, out=tmp_path / "out", seed=None, arms=None, quiet=False) == 0
    assert "note: network.peer-peer: no arm has a peer-peer link" in capsys.readouterr().out


def test_a_data_seed_over_several_seeds_is_noted(tmp_path: Any, capsys: Any) -> None:
    """``[data] seed`` pins the data split and the initial model across the seeds (as
    ``bench/fedbuff_paper.py --data-seed`` does, on purpose): with several seeds the run
    says that its intervals then leave that randomness out; with one it has nothing to say."""
    from fedloom.sim.commands import cmd_sim

    path = tmp_path / "s.toml"
    path.write_text(
        'name = "n"\nduration_min = 20\neval_interval_s = 600\n'
        '[data]\ndataset = "breast_cancer"\nmodel = "softmax"\nseed = 4\n'
        '[sites]\ncount = 3\n[[arms]]\nname = "x"\nalgorithm = "fedbuff"\n',
        encoding="utf-8",
    )
    args = {"out": tmp_path / "out", "seed": None, "arms": None, "quiet": False}
    assert cmd_sim(path, n_seeds=2, **args) == 0
    assert "note: [data] seed = 4 gives every seed the same data split" in capsys.readouterr().out
    assert cmd_sim(path, **args) == 0
    assert "[data] seed" not in capsys.readouterr().out


def test_hello_retries_only_where_a_link_drops_messages() -> None:
    # Without message loss (or with resets, which re-greet) no Hello can go unanswered:
    # the simulator leaves the retries off there, so lossless runs are as before.
    lossless = parse_scenario(small([{"name": "a", **STAR}]))
    assert not drops_messages(network_of(lossless, lossless.arms[0]))
    for network, expected in [
        ({"loss": 0.1}, True),
        ({"region-root": {"loss": 0.1}}, True),
        ({"loss": 0.1, "loss_effect": "reset"}, False),
    ]:
        s = parse_scenario(small([{"name": "a", **STAR}], network=network))
        assert drops_messages(network_of(s, s.arms[0])) is expected
    workload = build_workload(lossless, 0)
    sites = build_sites(lossless, workload, 0)
    arm = lossless.arms[0]
    plan = build_plan(lossless, arm, sites, 0)
    examples = {s.id: s.n_examples for s in sites}
    init = workload.init_weights(0)
    for retries, timeout in [(True, 600.0), (False, None)]:
        nodes = build_nodes(plan, arm, init, 0, examples, hello_retries=retries)
        site = nodes["site-000"]
        assert isinstance(site, SiteNode) and site.hello_timeout_s == timeout
