"""``fedloom chaos`` mistakes the scenario reader cannot see, refused before any daemon
starts: a run directory that cannot be made, and [federation] overrides (plan, training,
aggregation, connection) that the daemons would refuse. One line, exit status 2, and no
half-made run directory left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedloom.cli import main

STAR = '[federation]\nshape = "star"\nsites = 1\n'


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err


def chaos(tmp_path: Path, text: str, out: Path | None = None) -> list[str]:
    scen = tmp_path / "s.toml"
    scen.write_text(text)
    run = out if out is not None else tmp_path / "out"
    return ["chaos", str(scen), "--out", str(run), "--backend", "proxy"]


def test_an_out_directory_under_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "run"
    argv = chaos(tmp_path, "duration_s = 5\n" + STAR, out)
    refused(capsys, argv, f"--out {out}: cannot make the run directory: Not a directory")


@pytest.mark.parametrize(
    ("tables", "needle"),
    [
        (
            '[federation.training]\nlr = "fast"\n',
            "s.toml: federation.training.lr: expected a number, got 'fast' (in ",
        ),
        # Was "federation: bogus: ...": the table the field is in went unnamed.
        ("[federation.plan]\nbogus = 1\n", "s.toml: federation.plan.bogus: unknown workload"),
        (
            '[federation.plan]\ndirichlet_alpha = "x"\n',
            "s.toml: federation.plan.dirichlet_alpha: ",
        ),
        ("[federation.connection]\nbogus = 1\n", "s.toml: federation.connection.bogus: unknown"),
        (
            '[federation.root_aggregation]\nalgorithm = "nope"\n',
            "s.toml: federation.root_aggregation.algorithm: 'nope' is not one of",
        ),
    ],
)
def test_federation_overrides_the_daemons_refuse_are_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tables: str, needle: str
) -> None:
    refused(capsys, chaos(tmp_path, "duration_s = 5\n" + STAR + tables), needle)
    assert not (tmp_path / "out").exists()  # nothing half-made: the same --out works next


def test_a_region_override_names_the_region_table_not_the_root_s(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        "duration_s = 5\n[federation]\nsites = 2\n"
        "[federation.region_aggregation]\nbuffer_size = -1\n"
    )
    refused(capsys, chaos(tmp_path, text), "federation.region_aggregation.buffer_size:")


def test_more_sites_than_the_data_set_can_split_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = 'duration_s = 5\n[federation]\nshape = "star"\nsites = 100\n'
    refused(capsys, chaos(tmp_path, text), "s.toml: federation: 455 examples cannot give 100")


def test_the_default_run_directory_is_not_called_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without --out the run goes to runs/chaos/NAME; a mistake there said "--out ...",
    # a flag the user never gave.
    monkeypatch.chdir(tmp_path)
    taken = tmp_path / "runs" / "chaos" / "s"
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine")
    scen = tmp_path / "s.toml"
    scen.write_text("duration_s = 5\n" + STAR)
    refused(
        capsys,
        ["chaos", str(scen), "--backend", "proxy"],
        f"run directory {taken} (the default; --out names another): not empty",
    )
    assert (taken / "notes.txt").read_text() == "mine"


def test_a_run_directory_in_use_by_another_run_is_not_wiped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs into one --out: the second wiped the first's federation under its live
    daemons (a restarted site found no roster) and then failed with "Directory not empty"."""
    import fcntl

    live = tmp_path / "out"
    (live / "federation").mkdir(parents=True)
    (live / "run.json").write_text("{}")
    with (live / "chaos.lock").open("a+") as held:  # as the live run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused(
            capsys,
            chaos(tmp_path, "duration_s = 5\n" + STAR, live),
            f"--out {live}: in use by another fedloom chaos run",
        )
    assert sorted(p.name for p in live.iterdir()) == ["chaos.lock", "federation", "run.json"]


def test_a_bad_port_range_in_the_environment_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was an OSError traceback from the layout, and a half-made run directory."""
    monkeypatch.setenv("FEDLOOM_PORT_RANGE", "abc")
    refused(
        capsys,
        chaos(tmp_path, "duration_s = 5\n" + STAR),
        "FEDLOOM_PORT_RANGE='abc': expected LOW-HIGH",
    )
    assert not (tmp_path / "out").exists()


def test_a_run_directory_that_cannot_be_written_midway_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or a quota) while the federation is laid out was an OSError traceback."""
    from fedloom.runtime.chaos import runner

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "lay_out", full)
    assert main(chaos(tmp_path, "duration_s = 5\n" + STAR)) == 1
    err = capsys.readouterr().err
    assert "cannot lay out the federation" in err and "No space left on device" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_run_directory_that_holds_the_scenario_file_is_not_wiped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An earlier run's directory is replaced as a whole: the scenario file kept in it
    (written next to that run's report) was deleted with it."""
    earlier = tmp_path / "runs" / "s"
    earlier.mkdir(parents=True)
    (earlier / "run.json").write_text("{}")
    scen = earlier / "s.toml"
    scen.write_text("duration_s = 5\n" + STAR)
    argv = ["chaos", str(scen), "--out", str(tmp_path / "runs"), "--backend", "proxy"]
    (tmp_path / "runs" / "run.json").write_text("{}")
    refused(capsys, argv, f"--out {tmp_path / 'runs'}: holds the scenario file {scen}")
    refused(capsys, [*argv[:3], str(earlier), *argv[4:]], f"holds the scenario file {scen}")
    assert scen.exists()
