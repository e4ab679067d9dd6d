"""Mistakes in a chaos scenario file that once slipped past the reader (a traceback, a
misleading message or an impossible value accepted): each is one ``ConfigError`` that
names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedloom.cli import main
from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.chaos.scenario import load_scenario


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_binary_scenario_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scen = tmp_path / "s.toml"
    scen.write_bytes(b"\xff\xfe\x00duration_s = 5\n")
    refused(capsys, ["chaos", str(scen)], f"{scen}: not a text file")


def test_an_unreadable_scenario_file_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scen = tmp_path / "s.toml"
    scen.write_text("duration_s = 5\n")

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ConfigError, match=r"s\.toml: cannot read the scenario file: Permission"):
        load_scenario(scen)
