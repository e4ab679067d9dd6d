"""``fedloom local init --plan FILE`` (the consortium's plan written into every node's
config: a tabular plan, with no built-in data set) and ``fedloom local up
--until-version``'s argument checks."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedloom.cli import main
from fedloom.runtime.config import load_config

ROOT = Path(__file__).resolve().parents[2]
HEART = ROOT / "deploy" / "examples" / "walkthrough" / "heart-plan.toml"


def test_the_plan_file_goes_into_every_config_by_role(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    assert (
        main(["local", "init", str(fed), "--shape", "star", "--sites", "2", "--plan", str(HEART)])
        == 0
    )
    plan_file = tomllib.loads(HEART.read_text())
    for node in ("root", "site-0", "site-1"):
        raw = tomllib.loads((fed / f"{node}.toml").read_text())
        assert raw["plan"] == plan_file["plan"]
        assert raw["training"] == plan_file["training"]
        cfg = load_config(fed / f"{node}.toml")  # as `fedloom run` reads it
        assert cfg.plan is not None and cfg.plan.tabular is not None
    root = tomllib.loads((fed / "root.toml").read_text())
    assert root["evaluation"] == plan_file["evaluation"]
    assert root["aggregation"]["buffer_size"] == plan_file["aggregation"]["buffer_size"]
    site = tomllib.loads((fed / "site-0.toml").read_text())
    assert "evaluation" not in site and "aggregation" not in site
    # A site's own table: the roster declares no examples for it.
    assert "examples" not in (fed / "roster.toml").read_text()


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err


def test_plan_file_mistakes_are_one_line_and_leave_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = tmp_path / "fed"
    init = ["local", "init", str(fed), "--shape", "star", "--sites", "2"]
    refused(capsys, [*init, "--plan", str(tmp_path / "none.toml")], "no such file")
    bad = tmp_path / "bad.toml"
    bad.write_text('[plan]\nkind = "tabular"\n[secrets]\nx = 1\n')
    refused(capsys, [*init, "--plan", str(bad)], "unknown table or field 'secrets'")
    bad.write_text("[training]\nlr = 0.1\n")
    refused(capsys, [*init, "--plan", str(bad)], "no [plan] table")
    refused(capsys, [*init, "--plan", str(HEART), "--dataset", "synthetic"], "give one")
    # A plan the daemons would refuse is refused now, and no half-made federation stays.
    bad.write_text('[plan]\nkind = "tabular"\ndataset_tag = "heart"\nfeatures = ["a"]\n')
    refused(capsys, [*init, "--plan", str(bad)], "plan.label")
    assert not fed.exists() or not any(fed.iterdir())


def test_up_argument_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fed = tmp_path / "fed"
    assert (
        main(["local", "init", str(fed), "--shape", "star", "--sites", "1", "--plan", str(HEART)])
        == 0
    )
    capsys.readouterr()
    refused(capsys, ["local", "up", str(fed), "--until-version", "0"], "at least 1")
    refused(capsys, ["local", "up", str(fed), "--timeout", "5"], "--timeout goes with")
    refused(capsys, ["local", "up", str(fed), "--until-version", "3", "--timeout", "0"], "> 0")


@pytest.mark.timeout(20)
def test_a_plan_path_that_is_no_regular_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A named pipe blocked `local init` for good; /dev/zero read until memory ran out."""
    import os

    fifo = tmp_path / "plan.toml"
    os.mkfifo(fifo)
    init = ["local", "init", str(tmp_path / "fed"), "--shape", "star", "--sites", "2"]
    for path in (fifo, Path("/dev/zero")):
        refused(capsys, [*init, "--plan", str(path)], f"--plan {path}: not a regular file")
