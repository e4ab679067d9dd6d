"""A researcher's mistakes in a scenario or on ``fedloom sim``/``fedloom plan``'s command
line: each is an error naming the field (and the arm) and what is allowed, exit status 2,
no traceback, never a silent clamp."""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import pytest

from fedloom.cli import main
from fedloom.federation.config_reader import ConfigError
from fedloom.sim.scenario import parse_scenario
from tests.sim.test_scenario import minimal

INF = float("inf")


def refused(message: str, **change: Any) -> str:
    with pytest.raises(ConfigError) as err:
        parse_scenario(minimal(**change))
    assert message in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sites": {"count": 4, "uplink_mbps": INF}}, "sites.uplink_mbps: expected a finite"),
        ({"sites": {"count": 4, "access_latency_ms": INF}}, "sites.access_latency_ms: expected"),
        ({"network": {"intra_region_rtt_ms": INF}}, "network.intra_region_rtt_ms: expected a fin"),
        ({"network": {"region_rtt_ms": {"a--b": INF}}}, "network.region_rtt_ms.a--b: expected"),
        ({"target_window_s": INF}, "target_window_s: expected a finite number, got inf"),
        ({"availability": {"offline_per_h": 1, "offline_s": INF}}, ".offline_s: expected a fin"),
        ({"training": {"lr": INF}}, "training.lr: expected a finite number, got inf"),
        ({"training": {"mu": INF}}, "training.mu: expected a finite number, got inf"),
        ({"algorithm": {"server_lr": INF}}, ".server_lr: expected a finite number, got inf"),
        ({"algorithm": {"round_timeout_s": INF}}, ".round_timeout_s: expected a finite"),
        (
            {"durability": {"log": True, "restarts": [{"node": "root", "at_s": INF}]}},
            "durability.restarts[0].at_s: expected a finite number, got inf",
        ),
    ],
)
def test_an_infinite_number_is_an_error_naming_its_field(
    change: dict[str, Any], message: str
) -> None:
    # Each was a traceback from the simulator (or a run with a diverged model) before.
    refused(message, **change)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"sites": {"count": 4, "speed_spread": 1e6}},
            "sites.speed_spread: expected a number <= 10",
        ),
        (
            {"compute": {"distribution": "lognormal", "mean_s": 3, "sigma": 1e6}},
            "compute: sigma must be at most 10",
        ),
        (
            {"compute": {"distribution": "halfnormal", "min_s": 1.7e308, "sd_s": 1.0}},
            "compute: min_s must be at most 3.6e+09 s",
        ),
    ],
)
def test_a_spread_or_duration_that_overflows_is_an_error(
    change: dict[str, Any], message: str
) -> None:
    # Each overflowed to inf: a traceback (OverflowError, "cannot schedule an event at t=inf").
    refused(message, **change)


def test_a_region_pair_given_two_rtts_is_an_error_naming_the_key() -> None:
    # It was a traceback from topology.wan (ValueError: ... two different RTTs).
    rtts = {"a--b": 5, "b--a": 7}
    refused(
        "network.region_rtt_ms.b--a: 7 ms, but a--b gives this pair 5 ms",
        network={"region_rtt_ms": rtts},
    )
    same = parse_scenario(minimal(network={"region_rtt_ms": {"a--b": 5, "b--a": 5}}))
    assert len(same.network.region_rtt_ms) == 2
    own = {"network": {"region_rtt_ms": rtts}}
    refused("arms[0].network.region_rtt_ms.b--a: 7 ms", arms=[{"algorithm": "fedbuff", **own}])


TINY = """
name = "tiny"
duration_min = 5
[data]
dataset = "breast_cancer"
model = "softmax"
[sites]
count = 4
regions = ["a", "b"]
[compute]
distribution = "constant"
mean_s = 30
[[arms]]
name = "fb"
algorithm = "fedbuff"
"""


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``fedloom ARGV``'s exit status and its last line on stderr (no traceback: a crash
    would raise here)."""
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err.splitlines()[-1] if err else ""


def test_square_brackets_in_names_are_printed_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Rich read them as markup: an arm "[/]fb" was a MarkupError traceback (after the run,
    # or in the middle of a multi-seed one), "[red]b" was printed as "b".
    text = TINY.replace('name = "fb"', 'name = "[/]fb"').replace(
        'name = "tiny"', 'name = "tiny"\ndescription = "[bold]x[/] [/]"'
    )
    text += '[[arms]]\nname = "[red]b"\nalgorithm = "fedbuff"\n'
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(text)
    out = tmp_path / "[/]o"
    assert main(["sim", str(scenario), "--out", str(out), "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "[bold]x[/] [/]" in printed and "[red]b" in printed
    assert "seed 0 (1/2) [/]fb: final accuracy" in printed  # a run's line
    assert "│ [/]fb " in printed and f"{out / 'report.json'}" in printed


def test_ctrl_c_while_the_run_is_written_says_the_directory_is_incomplete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # It said "fedloom: interrupted" of a directory with the numbers and some of the plots,
    # nothing telling it from a finished run.
    from fedloom.sim import plots

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_staleness", interrupted)
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_:
        main(["sim", str(scenario), "--out", str(out), "--quiet"])
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedloom: interrupted while writing {out}: it is incomplete"]


@pytest.mark.parametrize("command", ["sim", "plan"])
def test_an_empty_out_is_an_error_not_the_current_directory(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    # --out "$OUT" with OUT unset wrote the run into the current directory.
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([command, str(scenario), "--out", ""])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"fedloom {command}: error: argument --out: an empty path; give a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


@pytest.mark.parametrize("command", ["sim", "plan"])
def test_out_at_a_file_is_an_error_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # Both were a FileExistsError traceback (sim's only after the whole run).
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    a_file = tmp_path / "report"
    a_file.write_text("")
    rc, err = cli(capsys, command, str(scenario), "--out", str(a_file))
    assert rc == 2 and err == f"fedloom: error: --out: {a_file} is a file, not a directory"
    rc, err = cli(capsys, command, str(scenario), "--out", str(a_file / "sub"))
    assert rc == 2 and err.startswith(
        f"fedloom: error: --out: cannot make the directory {a_file / 'sub'}: {a_file} is a file"
    )


@pytest.mark.parametrize("command", ["sim", "plan"])
def test_an_out_name_too_long_for_the_file_system_is_an_error_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # A 300-character scenario name (runs/NAME) or --out ran the whole study, then failed
    # to make the directory (ENAMETOOLONG).
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    long = tmp_path / ("x" * 300) / "sub"
    rc, err = cli(capsys, command, str(scenario), "--out", str(long))
    assert rc == 2 and err == (
        f"fedloom: error: --out: cannot make the directory {long}: the name {'x' * 300!r} "
        "is longer than the file system allows (255 bytes)"
    )
    assert capsys.readouterr().out == ""  # nothing ran


def test_a_directory_for_the_scenario_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, err = cli(capsys, "plan", str(tmp_path))  # was IsADirectoryError
    assert rc == 2 and err == f"fedloom: error: {tmp_path}: is a directory, not a scenario file"


def test_a_state_dir_at_a_file_is_an_error_naming_the_field(tmp_path: Path) -> None:
    a_file = tmp_path / "state"
    a_file.write_text("")
    durability = {"log": True, "state_dir": str(a_file)}  # was FileExistsError mid-run
    refused(f"durability.state_dir: {a_file} is a file, not a directory", durability=durability)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # was "data: seed: expected an integer >= 0" (a field the user never wrote)
        (["--seed", "-1"], "--seed: expected a seed >= 0, got -1"),
        # was a hang building a list of 10^11 seeds
        (["--seeds", "100000000000"], "--seeds: the number of seeds must be 1 to 10,000, got"),
        (["--seeds", "0"], "--seeds: the number of seeds must be 1 to 10,000, got 0"),
    ],
)
def test_bad_seed_flags_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    rc, err = cli(capsys, "sim", str(scenario), "--out", str(tmp_path / "o"), "--quiet", *flags)
    assert rc == 2 and err.startswith(f"fedloom: error: {message}")


def test_a_target_of_zero_or_a_window_longer_than_the_run_is_an_error() -> None:
    # Both ran: 0 was "reached" at the first evaluation, the window was never held.
    refused("target_accuracy: expected a number > 0.0, got 0.0", target_accuracy=0)
    assert parse_scenario(minimal(target_accuracy=1)).target_accuracy == 1.0
    refused(
        "target_window_s: a window of 3601 s is longer than the run (3600 s)",
        target_window_s=3601,
    )
    assert parse_scenario(minimal(target_window_s=3600)).target_window_s == 3600


def test_more_regions_than_sites_is_an_error_not_empty_regions() -> None:
    # The last two regions silently got no site (and no regional aggregator).
    sites = {"count": 4, "regions": ["a", "b", "c", "d", "e", "f"]}
    refused("sites.regions: 6 regions for 4 sites leaves e, f without a site", sites=sites)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # Each was reported as the first arm's (arms[0].training.lr, ...), a table the
        # researcher never wrote.
        ({"training": {"lr": -1}}, "training.lr: expected a number > 0.0, got -1.0"),
        ({"algorithm": {"server_lr": 0}}, "algorithm.server_lr: expected a number > 0.0"),
        ({"codec": {"up": "int9"}}, "codec.up: 'int9' is not one of"),
        ({"availability": {"dropuot": 0.1}}, "availability.dropuot: unknown field"),
        ({"compute": {"distribution": "gausian"}}, "compute: distribution: unknown 'gausian'"),
        # an arm's own table over a shared one: each field where it was written
        (
            {
                "training": {"lr": -1},
                "arms": [{"name": "x", "algorithm": "fedbuff", "training": {"local_steps": 2}}],
            },
            "training.lr: expected a number > 0.0",
        ),
        (
            {
                "training": {"lr": 0.1},
                "arms": [{"name": "x", "algorithm": "fedbuff", "training": {"lr": -1}}],
            },
            "arms[0].training.lr: expected a number > 0.0",
        ),
        (
            {
                "arms": [
                    {"name": "x", "algorithm": "fedbuff"},
                    {"algorithm": "fedasync", "alpha": 2},
                ]
            },
            "arms[1].alpha: expected a number <= 1.0",
        ),
    ],
)
def test_a_mistake_in_a_shared_table_names_that_table_not_an_arm(
    change: dict[str, Any], message: str
) -> None:
    assert refused(message, **change).startswith(message)


def test_a_report_that_cannot_be_written_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedloom.sim.report as report

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_report", full)
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    rc, err = cli(capsys, "sim", str(scenario), "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 2
    assert (
        err == f"fedloom: error: --out: cannot write to {tmp_path / 'o'}: No space left on device"
    )


def test_an_infinite_data_parameter_says_finite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It read "dirichlet_alpha: expected a number > 0.0, got inf" (inf is > 0).
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        TINY.replace('model = "softmax"', 'model = "softmax"\ndirichlet_alpha = inf')
    )
    rc, err = cli(capsys, "sim", str(scenario), "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 2
    assert err == "fedloom: error: data: dirichlet_alpha: expected a finite number > 0.0, got inf"


def test_a_pool_of_a_hundred_thousand_workers_is_an_error() -> None:
    # executor = "process" with workers = 100000 hung starting processes.
    refused("workers: expected a number <= 1024, got 100000", executor="process", workers=100_000)
    assert parse_scenario(minimal(executor="process", workers=1024)).workers == 1024


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        # inf ran (a diverged model); a repeat ran the point twice; [] was no sweep at all
        ([0.1, INF], "arms[0].lr_sweep[1]: expected a finite number > 0, got inf"),
        ([0.1, 0.1], "arms[0].lr_sweep[1]: 0.1 is listed twice"),
        ([], "arms[0].lr_sweep: must list at least one value (or leave it out)"),
        ([0.1, -1], "arms[0].lr_sweep[1]: expected a finite number > 0, got -1"),
        ([0.1, 1e300], "arms[0].lr_sweep[1]: expected a learning rate > 0 and <= 100, got 1e+300"),
    ],
)
def test_a_bad_lr_sweep_names_the_entry(sweep: list[float], message: str) -> None:
    refused(message, arms=[{"name": "x", "algorithm": "fedbuff", "lr_sweep": sweep}])
    server = [{"name": "x", "algorithm": "fedbuff", "server_lr_sweep": sweep}]
    refused(message.replace("lr_sweep", "server_lr_sweep"), arms=server)


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        (
            {"lr_sweep": [0.1, 0.3], "training": {"lr": 0.2}},
            "arms[0].training.lr: the arm's lr_sweep sets its learning rates (0.2 would not "
            "run); give one of them",
        ),
        (
            {"server_lr_sweep": [0.5, 1.0], "server_lr": 0.7},
            "arms[0].server_lr: the arm's server_lr_sweep sets its learning rates (0.7 would "
            "not run); give one of them",
        ),
    ],
)
def test_an_arms_own_lr_beside_its_sweep_is_an_error(arm: dict[str, Any], message: str) -> None:
    # The sweep won: the arm's own lr was silently not run.
    assert refused(message, arms=[{"name": "x", "algorithm": "fedbuff", **arm}]).endswith(message)
    # a shared one is the default the sweep replaces: no mistake
    sweep = {k: v for k, v in arm.items() if k.endswith("_sweep")}
    shared = {"training": {"lr": 0.2}, "algorithm": {"server_lr": 0.7}}
    parse_scenario(minimal(**shared, arms=[{"name": "x", "algorithm": "fedbuff", **sweep}]))


def test_a_link_given_a_value_instead_of_a_table_says_so() -> None:
    # It read "codec.site-region: unknown field; known fields: down, topk_fraction, up".
    refused(
        "codec.site-region: expected a table ([codec.site-region]), got 'int8'",
        codec={"site-region": "int8"},
    )
    refused(
        "network.region-root: expected a table ([network.region-root]), got 0.1",
        network={"region-root": 0.1},
    )


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"delta": "x"}, "privacy.delta: expected a number, got 'x'"),  # was a traceback
        ({"delta": 1}, "privacy.delta: expected a number <= "),  # was "target_epsilon: delta"
        ({"accountant": "rdpp"}, "privacy.accountant: 'rdpp' is not one of rdp, pld"),
    ],
)
def test_a_calibrated_privacy_table_names_its_delta_and_accountant(
    field: dict[str, Any], message: str
) -> None:
    privacy = {"mechanism": "central", "target_epsilon": 1, "releases": 10, **field}
    refused(message, privacy=privacy)


@pytest.mark.parametrize(
    ("key", "value", "section"),
    [
        ("lr", 0.1, "training"),
        ("up", "int8", "codec"),
        ("loss", 0.1, "network"),
        ("dropout", 0.1, "availability"),
        ("mean_s", 3, "compute"),
    ],
)
def test_a_section_field_written_in_the_arm_says_where_it_goes(
    key: str, value: Any, section: str
) -> None:
    # It read "arms[0].lr: unknown field; known fields: algorithm, alpha, ..." (no lr).
    message = f"arms[0].{key}: {key} is a [{section}] field, not an arm's: give the arm its own"
    refused(message, arms=[{"name": "x", "algorithm": "fedbuff", key: value}])


def test_an_empty_arm_name_is_an_error() -> None:
    # It ran, as an empty column in the report that no --arm could select.
    refused(
        "arms[0].name: expected an arm name, got ''", arms=[{"name": "", "algorithm": "fedbuff"}]
    )


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        # was "arm 'g': cannot build the gossip topology: gossip(kregular): need 1 <= k < n ..."
        ({"graph": "kregular", "degree": 10}, "arms[0].degree: a kregular graph's degree must be"),
        ({"graph": "kregular", "degree": 3}, "sites * degree even, got 3"),  # 5 sites
        ({"graph": "smallworld", "degree": 1}, "arms[0].degree: a smallworld graph's degree"),
    ],
)
def test_a_gossip_degree_that_cannot_fit_the_sites_names_the_field(
    arm: dict[str, Any], message: str
) -> None:
    arms = [{"name": "g", "algorithm": "gossip", **arm}]
    refused(message, sites={"count": 5, "regions": ["a"]}, arms=arms)
    shared = {"graph": arm["graph"], "degree": arm["degree"]}
    refused(
        message.replace("arms[0].", "algorithm."),
        sites={"count": 5, "regions": ["a"]},
        algorithm=shared,
        arms=[{"name": "g", "algorithm": "gossip"}],
    )
    ok = {**arm, "degree": 2}
    parse_scenario(
        minimal(
            sites={"count": 5, "regions": ["a"]}, arms=[{"name": "g", "algorithm": "gossip", **ok}]
        )
    )


def test_a_misspelled_duration_is_named() -> None:
    # It read only "duration_h: required field is missing (or duration_s / duration_min)".
    raw = minimal()
    del raw["duration_h"]
    raw["duration_hours"] = 1
    with pytest.raises(ConfigError, match="found 'duration_hours', not one of these"):
        parse_scenario(raw)
    raw["durration_h"] = raw.pop("duration_hours")
    with pytest.raises(ConfigError, match="found 'durration_h', not one of these"):
        parse_scenario(raw)


def test_faults_after_the_run_ends_are_notes() -> None:
    # Each did nothing, silently (a churn window after the end was already a note).
    s = parse_scenario(
        minimal(
            availability={
                "partitions": [{"region": "a", "start_h": 2, "end_h": 3}],
                "death_fraction": 0.5,
                "death_at_h": 1,
            },
            durability={"log": True, "restarts": [{"node": "root", "at_s": 7200}]},
        )
    )
    assert s.notes == (
        "availability.partitions[0]: starts at 2 h, when the run (1 h) is over; it cuts "
        "nothing off",
        "availability.death_at_h: 1 h, when the run (1 h) is over; no site dies",
        "durability.restarts[0]: at 7200 s, when the run (3600 s) is over; root is not restarted",
    )
    own = {
        "name": "x",
        "algorithm": "fedbuff",
        "availability": {"death_fraction": 0.5, "death_at_h": 5},
    }
    assert parse_scenario(minimal(arms=[own])).notes == (
        "arms[0].availability.death_at_h: 5 h, when the run (1 h) is over; no site dies",
    )
    assert (
        parse_scenario(minimal(availability={"death_at_h": 0.5, "death_fraction": 0.5})).notes == ()
    )


def test_a_billion_sites_is_an_error_naming_the_limit() -> None:
    # It hung (building a billion site ids) instead of saying what the simulator takes.
    refused("sites.count: expected a number <= 1000000, got 1000000000", sites={"count": 10**9})


def test_a_gossip_interval_that_overflows_the_liveness_times_is_an_error() -> None:
    # 1e308 was a traceback: "suspect_after_s must be finite and > 0, not inf".
    arms = [{"name": "g", "algorithm": "gossip", "gossip_interval_s": 1e308}]
    refused("arms[0].gossip_interval_s: expected a number <= 3600000000.0, got 1e+308", arms=arms)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # Each read "... required ... is missing" alone, for a field the researcher wrote.
        (
            {"privacy": {"mechanism": "central", "noise_multplier": 1.0, "clip": 1.0}},
            'privacy.noise_multiplier: required with mechanism = "central" (no privacy '
            "parameter has a silent default) (found 'noise_multplier': did you mean "
            "'noise_multiplier'?)",
        ),
        (
            {"arms": [{"name": "x", "algorthm": "fedbuff"}]},
            "arms[0].algorithm: required field is missing (found 'algorthm': did you mean "
            "'algorithm'?)",
        ),
        (
            {"data": {"datset": "digits"}},
            "data.dataset: required field is missing (found 'datset'",
        ),
    ],
)
def test_a_misspelled_required_field_is_named(change: dict[str, Any], message: str) -> None:
    refused(message, **change)


@pytest.mark.parametrize("name", ["", "/abs", "../escape", "a/b", ".."])
def test_a_scenario_name_that_is_not_a_directory_name_is_an_error(name: str) -> None:
    # The default output is runs/NAME (runs/NAME-plan): "/abs" wrote /abs-plan, "../x"
    # escaped runs/, "" wrote runs/-plan.
    refused("name: expected a scenario name without '/'", name=name)


def test_a_parameter_whose_switch_is_off_is_a_note() -> None:
    # Each was silently ignored.
    s = parse_scenario(
        minimal(availability={"death_at_h": 0.5, "offline_s": 60}, codec={"topk_fraction": 0.1})
    )
    assert s.notes == (
        "availability.death_at_h: no site dies (death_fraction is 0); it applies to none",
        "availability.offline_s: no site goes offline (offline_per_h is 0); it applies to none",
        'codec.topk_fraction: no arm sends top-k updates (up = "topk"); it applies to none',
    )
    arms = [
        {"name": "a", "algorithm": "fedbuff", "codec": {"up": "topk"}},
        {"name": "b", "algorithm": "fedbuff", "codec": {"up": "int8", "topk_fraction": 0.2}},
    ]
    assert parse_scenario(minimal(codec={"topk_fraction": 0.1}, arms=arms)).notes == (
        "arms[1].codec.topk_fraction: the arm sends no top-k updates (up = 'int8'); it applies "
        "to none",
    )
    on = {"death_at_h": 0.5, "death_fraction": 0.2, "offline_s": 60, "offline_per_h": 1}
    assert parse_scenario(minimal(availability=on)).notes == ()


def test_an_mlp_too_wide_for_memory_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # hidden = 100000000 was killed for memory (exit -9), no message at all.
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY.replace('model = "softmax"', 'model = "mlp"\nhidden = 100000000'))
    rc, err = cli(capsys, "sim", str(scenario), "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 2
    assert err == "fedloom: error: data: hidden: expected an integer <= 65536, got 100000000"


def test_a_synthetic_site_too_large_for_memory_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # samples_per_site = 10^9 was a MemoryError traceback (224 GiB for one site).
    data = '[data]\ndataset = "synthetic"\nsamples_per_site = 1000000000\n'
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        TINY.replace('[data]\ndataset = "breast_cancer"\nmodel = "softmax"\n', data)
    )
    rc, err = cli(capsys, "sim", str(scenario), "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 2
    assert err == (
        "fedloom: error: data: samples_per_site: expected an integer <= 1000000, got 1000000000"
    )


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        # Each ran, the field silently unused.
        (
            {"algorithm": "fedbuff", "clients_per_round": 100},
            "arms[0].clients_per_round: a fedbuff arm does not use clients_per_round (only "
            "fedavg/fedprox arms do)",
        ),
        ({"algorithm": "fedbuff", "min_cohort": 5}, "arms[0].min_cohort: a fedbuff arm"),
        ({"algorithm": "fedavg", "alpha": 0.5}, "arms[0].alpha: a fedavg arm does not use alpha"),
        ({"algorithm": "fedbuff", "degree": 3}, "arms[0].degree: a fedbuff arm does not use"),
    ],
)
def test_an_arm_parameter_of_another_algorithm_is_an_error(
    arm: dict[str, Any], message: str
) -> None:
    refused(message, arms=[{"name": "x", **arm}])
    # the shared [algorithm] table serves every arm: there it is no mistake
    key = next(k for k in arm if k != "algorithm")
    parse_scenario(minimal(algorithm={key: arm[key]}, arms=[{"name": "x", "algorithm": "fedbuff"}]))


@pytest.mark.parametrize(
    "key", ["root_buffer_size", "regional_buffer_size", "regional_concurrency"]
)
def test_an_arm_parameter_of_regions_on_a_star_arm_is_an_error(key: str) -> None:
    # Each ran, the field silently unused: a star root has no regions under it.
    message = (
        f"arms[0].{key}: a star arm has no regions (only hierarchical arms use {key}); "
        "remove it (the shared [algorithm] table may hold it for the arms that do)"
    )
    assert refused(message, arms=[{"name": "x", "algorithm": "fedbuff", key: 3}]).endswith(message)
    hier = {"name": "x", "algorithm": "fedbuff", "topology": "hierarchical", key: 3}
    parse_scenario(minimal(arms=[hier]))
    # shared, with no hierarchical arm: a note, as a parameter no arm's algorithm reads
    star = [{"name": "x", "algorithm": "fedbuff"}]
    assert parse_scenario(minimal(algorithm={key: 3}, arms=star)).notes == (
        f"algorithm.{key}: only hierarchical arms use it (the arms are star); it applies to none",
    )


@pytest.mark.parametrize(
    ("arm", "key"),
    [
        ({"algorithm": "fedbuff"}, "task_timeout_s"),
        ({"algorithm": "fedavg", "clients_per_round": 2}, "round_timeout_s"),
        ({"algorithm": "gossip"}, "gossip_interval_s"),
    ],
)
def test_a_period_that_comes_round_without_end_is_an_error(arm: dict[str, Any], key: str) -> None:
    # 1e-9 s ran and never ended (a task timing out, a round closing or a peer gossiping
    # every nanosecond: 3.6e12 times an hour).
    message = (
        f"{key}: 1e-09 s comes round 3,600,000,000,000 times in the run (3600 s); at most "
        "100,000: give at least 0.036"
    )
    assert refused(message, arms=[{"name": "x", **arm, key: 1e-9}]) == f"arms[0].{message}"
    shared = refused(message, algorithm={key: 1e-9}, arms=[{"name": "x", **arm}])
    assert shared == f"algorithm.{message}"
    parse_scenario(minimal(arms=[{"name": "x", **arm, key: 0.036}]))


def test_a_default_degree_too_large_for_the_sites_says_it_is_the_default() -> None:
    arms = [{"name": "g", "algorithm": "gossip", "graph": "kregular"}]
    refused(
        "arms[0].degree: a kregular graph's degree must be less than the 4 sites, and sites * "
        "degree even, got 4 (the default: write one)",
        sites={"count": 4, "regions": ["a"]},
        arms=arms,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # Each ran: every model inf or nan from the first step on.
        ({"training": {"lr": 1e300}}, "training.lr: expected a learning rate > 0 and <= 100, "),
        (
            {"arms": [{"name": "x", "algorithm": "fedbuff", "training": {"lr": 101}}]},
            "arms[0].training.lr: expected a learning rate > 0 and <= 100, got 101",
        ),
        ({"algorithm": {"server_lr": 1e300}}, "algorithm.server_lr: expected a learning rate > 0"),
        (
            {"arms": [{"name": "x", "algorithm": "fedbuff", "server_lr": 1e3}]},
            "arms[0].server_lr: expected a learning rate > 0 and <= 100, got 1000",
        ),
    ],
)
def test_an_absurd_learning_rate_is_an_error_saying_the_range(
    change: dict[str, Any], message: str
) -> None:
    assert refused(message, **change).startswith(message)


def test_a_learning_rate_at_the_cap_is_accepted() -> None:
    s = parse_scenario(minimal(training={"lr": 100}, algorithm={"server_lr": 100}))
    assert s.arms[0].training.lr == 100 and s.arms[0].params.server_lr == 100
    arms = [{"name": "x", "algorithm": "fedbuff", "lr_sweep": [0.01, 100]}]
    assert parse_scenario(minimal(arms=arms)).arms[0].lr_sweep == (0.01, 100)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # Each ran, the root drawing every site: the over-selection asked for never happened.
        (
            {
                "arms": [
                    {
                        "name": "x",
                        "algorithm": "fedavg",
                        "clients_per_round": 3,
                        "over_selection": 1.5,
                    }
                ]
            },
            "arms[0].over_selection: a round draws ceil(1.5 * 3) = 5 sites (3: "
            "clients_per_round), more than the 4 sites of this scenario; write at most 1.333 "
            "or lower clients_per_round",
        ),
        (
            {
                "algorithm": {"over_selection": 2},
                "arms": [{"name": "x", "algorithm": "fedprox", "training": {"mu": 0.1}}],
            },
            "algorithm.over_selection: a round draws ceil(2 * 4) = 8 sites (4: "
            "clients_per_round, its default), more than the 4 sites of this scenario; write 1 "
            "(a round of every site draws them all) or lower clients_per_round",
        ),
        (
            {
                "algorithm": {"clients_per_round": 2},
                "arms": [{"name": "x", "algorithm": "fedavg", "over_selection": 1e6}],
            },
            "arms[0].over_selection: a round draws ceil(1e+06 * 2) = 2000000 sites",
        ),
    ],
)
def test_an_over_selection_drawing_more_than_the_sites_is_an_error(
    change: dict[str, Any], message: str
) -> None:
    assert refused(message, **change).startswith(message)


def test_an_over_selection_that_fits_the_sites_is_accepted() -> None:
    fits = [{"name": "x", "algorithm": "fedavg", "clients_per_round": 3, "over_selection": 4 / 3}]
    assert parse_scenario(minimal(arms=fits)).arms[0].params.over_selection == 4 / 3
    # the default (1.3, not written) draws at most every site: no mistake of the researcher's
    assert parse_scenario(minimal(arms=[{"name": "x", "algorithm": "fedavg"}])).arms
    # a shared over_selection only FedBuff arms do not read is not checked against the sites
    fedbuff = [{"name": "x", "algorithm": "fedbuff"}]
    assert parse_scenario(minimal(algorithm={"over_selection": 2}, arms=fedbuff)).notes == (
        "algorithm.over_selection: only fedavg/fedprox arms read it (the arms are fedbuff); it "
        "applies to none",
    )


def test_an_eval_interval_longer_than_the_run_is_an_error() -> None:
    # It ran with no evaluation inside the run: a curve of two points (start and end) and a
    # time to target that could only be the run's end.
    message = (
        "eval_interval_s: 7200 s is longer than the run (3600 s), so no evaluation would fall "
        "inside it (only the one at the start and the one at the end); give at most 3600"
    )
    assert refused(message, eval_interval_s=7200) == message
    assert parse_scenario(minimal(eval_interval_s=3600)).eval_interval_s == 3600
    assert parse_scenario(minimal(eval_interval_s=60)).eval_interval_s == 60
    # the default for a run under a second (1 s) is no mistake of the researcher's
    short = minimal(duration_s=0.5)
    del short["duration_h"]
    assert parse_scenario(short).eval_interval_s == 1.0


def test_an_eval_interval_giving_more_evaluations_than_a_curve_can_use_is_an_error() -> None:
    # eval_interval_s = 1e-9 was accepted: 3.6e12 evaluations of the model, a run that never
    # ended (each evaluation a pass over the test set, each a point of report.json).
    message = (
        "eval_interval_s: 1e-09 s evaluates the model 3,600,000,000,000 times in the run (3600 "
        "s); at most 10,000 evaluations: give at least 0.36"
    )
    assert refused(message, eval_interval_s=1e-9) == message
    assert parse_scenario(minimal(eval_interval_s=0.36)).eval_interval_s == 0.36


@pytest.mark.parametrize(
    ("training", "message"),
    [
        (
            {"local_steps": 10**11},
            "training.local_steps: 100000000000 steps of batch_size 10 are "
            "1,000,000,000,000 examples a job; at most 1,000,000",
        ),
        (
            {"batch_size": 10**11, "local_steps": 5},
            "training.batch_size: 5 steps of batch_size 100000000000 are 500,000,000,000 "
            "examples a job; at most 1,000,000",
        ),
    ],
)
def test_a_job_too_large_for_memory_is_an_error_naming_the_field(
    training: dict[str, int], message: str
) -> None:
    # Each was a MemoryError traceback after the run had started (a job's minibatches are
    # drawn at once: 7.28 TiB); 10^6 examples a job already take about 1 GB.
    assert refused(message, training=training).endswith(message)
    arm = [{"name": "x", "algorithm": "fedbuff", "training": {"local_steps": 10**6}}]
    refused("arms[0].training.local_steps: 1000000 steps of batch_size 10", arms=arm)
    fits = parse_scenario(minimal(training={"local_steps": 1000, "batch_size": 1000}))
    assert fits.arms[0].training.local_steps == 1000


def test_a_meta_value_report_json_cannot_store_is_an_error_naming_it() -> None:
    # [meta] goes into report.json: a TOML date there would fail only once the run ended.
    when = datetime.date(2026, 12, 7)
    message = "meta.labels.when: a date cannot be stored in report.json"
    assert refused(message, meta={"labels": {"when": when}}) == message
    # nor a nan, which would have become null
    message = "meta.runs[1]: nan cannot be stored in report.json (strict JSON)"
    assert refused(message, meta={"runs": [1.0, math.nan]}) == message


def test_a_shared_min_cohort_no_arm_reads_is_a_note_not_the_round_check() -> None:
    # With FedBuff arms only it read "algorithm.min_cohort: 20 is more than
    # clients_per_round (its default) 10": a check of a round no arm has.
    sites = {"count": 40, "regions": ["a"]}
    fedbuff = [{"name": "b", "algorithm": "fedbuff"}, {"name": "a", "algorithm": "fedasync"}]
    for value in (20, 3):
        s = parse_scenario(minimal(algorithm={"min_cohort": value}, sites=sites, arms=fedbuff))
        assert s.notes == (
            "algorithm.min_cohort: only fedavg/fedprox arms read it (the arms are fedasync, "
            "fedbuff); it applies to none",
        )
    # the other shared parameters of one algorithm likewise (notes for settings that do nothing)
    s = parse_scenario(minimal(algorithm={"alpha": 0.5, "degree": 2}, sites=sites, arms=fedbuff))
    assert s.notes == (
        "algorithm.degree: only gossip arms read it (the arms are fedasync, fedbuff); it "
        "applies to none",
    )
    # a FedAvg arm reads it: the round check stands, and nothing is a note
    mixed = [*fedbuff, {"name": "s", "algorithm": "fedavg"}]
    refused(
        "algorithm.min_cohort: 20 is more than clients_per_round (its default) 10",
        algorithm={"min_cohort": 20},
        sites=sites,
        arms=mixed,
    )
    assert parse_scenario(minimal(algorithm={"min_cohort": 3}, sites=sites, arms=mixed)).notes == ()
