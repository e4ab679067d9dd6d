"""``fedloom local init`` mistakes that once ended in a traceback or a misleading line:
each is one line on stderr, exit status 2, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedloom.cli import main


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err


SYNTHETIC = ["--dataset", "synthetic"]


def test_init_into_a_file_or_under_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("keep")
    refused(capsys, ["local", "init", str(afile), *SYNTHETIC], "exists and is not a directory")
    under = afile / "sub" / "fed"
    refused(capsys, ["local", "init", str(under), *SYNTHETIC], f"{afile} is a file")
    assert afile.read_text() == "keep"


def test_init_where_this_user_may_not_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fedloom.runtime.local.os.access", lambda *a, **k: False)
    fed = tmp_path / "ro" / "fed"
    refused(capsys, ["local", "init", str(fed), *SYNTHETIC], f"{tmp_path} is not writable")
    assert not (tmp_path / "ro").exists()


def test_a_negative_seed_names_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = tmp_path / "fed"
    refused(capsys, ["local", "init", str(fed), "--seed", "-1", *SYNTHETIC], "--seed: expected")
    assert not fed.exists()


def test_more_sites_than_the_data_set_splits_names_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = tmp_path / "fed"
    refused(capsys, ["local", "init", str(fed), "--sites", "150"], "--sites 150: ")
    assert not fed.exists()


@pytest.mark.parametrize("sites", ["0", "201", "100000"])
def test_sites_are_bounded_by_what_one_machine_runs_as_daemons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sites: str
) -> None:
    fed = tmp_path / "fed"
    refused(
        capsys,
        ["local", "init", str(fed), "--sites", sites, *SYNTHETIC],
        "--sites: expected 1 to 200",
    )
    assert not fed.exists()


def test_regions_are_for_a_hierarchy_and_default_to_what_the_sites_allow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    star = ["local", "init", str(tmp_path / "s"), "--shape", "star", "--regions", "3"]
    refused(capsys, [*star, *SYNTHETIC], "--regions: a star has no regions")
    # One site and no --regions: one region, not "--regions: ... got 2" for a flag not given.
    one = tmp_path / "one"
    assert main(["local", "init", str(one), "--sites", "1", *SYNTHETIC]) == 0
    assert (one / "region-0.toml").exists() and not (one / "region-1.toml").exists()


def test_up_on_a_hand_edited_config_names_the_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = tmp_path / "fed"
    assert main(["local", "init", str(fed), "--shape", "star", "--sites", "1", *SYNTHETIC]) == 0
    capsys.readouterr()
    root = fed / "root.toml"
    text = root.read_text()
    port = text.split("[listen]", 1)[1].split("port = ", 1)[1].split("\n", 1)[0]
    root.write_text(text.replace(f"port = {port}\n", 'port = "x"\n', 1))
    # Was a ValueError traceback from int('x'); now refused before any daemon starts.
    refused(capsys, ["local", "up", str(fed)], f"{root}: listen.port: expected a whole number")


@pytest.mark.timeout(120)
def test_up_says_why_a_daemon_exited(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said "site-0 exited ({'site-0': 1}); see DIR/logs": the reason was in the log
    only (here: the federation already runs, the state directory is locked)."""
    import fcntl

    fed = tmp_path / "fed"
    assert main(["local", "init", str(fed), "--shape", "star", "--sites", "1", *SYNTHETIC]) == 0
    capsys.readouterr()
    state = fed / "state" / "site-0"
    state.mkdir(parents=True, exist_ok=True)
    with (state / "lock").open("a+") as held:  # as a daemon of an earlier `local up` holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["local", "up", str(fed)]) == 1
    err = capsys.readouterr().err
    assert "site-0 exited with status 1: " in err, err
    assert "another process has this state directory open" in err, err
    assert err.count("\n") == 1, err


def test_a_bad_port_range_in_the_environment_names_it_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was "DIR: cannot write the federation: FEDLOOM_PORT_RANGE=..." with the keys
    already written."""
    monkeypatch.setenv("FEDLOOM_PORT_RANGE", "40000")
    fed = tmp_path / "fed"
    argv = ["local", "init", str(fed), "--shape", "star", "--sites", "1", *SYNTHETIC]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedloom: error: FEDLOOM_PORT_RANGE='40000': expected LOW-HIGH"), err
    assert err.count("\n") == 1
    assert not fed.exists() or not any(fed.iterdir())


def test_a_second_sigterm_does_not_cut_up_s_stop_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C ignored while every daemon is stopped, SIGTERM was not: a second one (a
    second `kill`, systemd's) cut the stop short and left the rest to PDEATHSIG."""
    import os
    import signal

    from fedloom.runtime import local

    fed = tmp_path / "fed"
    assert main(["local", "init", str(fed), "--shape", "star", "--sites", "1", *SYNTHETIC]) == 0
    stopped: list[bool] = []

    class Interrupted:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def start(self) -> None:
            raise KeyboardInterrupt  # the first Ctrl-C or SIGTERM, while starting

        def stop(self) -> dict[str, int]:
            os.kill(os.getpid(), signal.SIGTERM)
            stopped.append(True)  # what follows the signal: the rest of the stop
            return {}

    monkeypatch.setattr(local, "Cluster", Interrupted)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["local", "up", str(fed)]) == 0
    assert stopped == [True]
    assert signal.getsignal(signal.SIGTERM) == before
