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


def _error(text: str, tmp_path: Path) -> str:
    scen = tmp_path / "s.toml"
    scen.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_scenario(scen)
    return str(info.value)


KILL = '[[fault]]\nat_s = 1\nkind = "kill"\n'


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        # Was "expect.resume_within: unknown field; known fields: none".
        (
            "duration_s = 9\n[expect]\nresume_within = 5\n",
            "expect.resume_within: unknown field (did you mean 'resume_within_s'?); known "
            "fields: allowed_exits,",
        ),
        # Was accepted: no run could check that, and report.json got "Infinity".
        (
            "duration_s = 9\n[expect]\nresume_within_s = inf\n",
            "expect.resume_within_s: expected a number <= 86400",
        ),
        # Was "fault[0].targets: required field is missing", silent about 'target'.
        (
            KILL + 'target = ["root"]\n',
            "fault[0].targets: required field is missing (found 'target': did you mean 'targets'?)",
        ),
        # Was "fault: expected a list, got {...}".
        ("duration_s = 9\n[fault]\nat_s = 1\n", "write each fault as [[fault]]"),
        ("duration_s = 9\n[[federation]]\nsites = 2\n", "write [federation] (one table)"),
        # Were accepted: a run directory and a timeline entry no one can name.
        ('duration_s = 9\nname = "a\\nb"\n', "name: 'a\\nb' cannot name a run directory"),
        (
            'duration_s = 9\n[[fault]]\nat_s = 1\nkind = "kill"\nname = " "\ntargets = ["root"]\n',
            "fault[0].name: ' ' cannot name a fault",
        ),
        # Was accepted and ignored: a corruption is a crash, the damage and a restart at once.
        (
            'duration_s = 9\n[[fault]]\nat_s = 1\nfor_s = 3\nkind = "corrupt"\n'
            'targets = ["site-0"]\n',
            "fault[0].for_s: a corrupt is instantaneous; remove for_s",
        ),
        # Were accepted: a resume that resumes nothing (never paused, or already over).
        (
            'duration_s = 9\n[[fault]]\nat_s = 1\nkind = "resume"\ntargets = ["site-0"]\n',
            "fault[0]: a resume at 1 s, but none of its targets (site-0) is paused then",
        ),
        (
            'duration_s = 9\n[[fault]]\nat_s = 5\nkind = "resume"\ntargets = ["site-0"]\n'
            '[[fault]]\nat_s = 1\nfor_s = 2\nkind = "pause"\ntargets = ["site-0"]\n',
            "fault[0]: a resume at 5 s, but none of its targets (site-0) is paused then",
        ),
    ],
)
def test_mistakes_once_accepted_or_misreported(tmp_path: Path, text: str, needle: str) -> None:
    text = text if text.startswith("duration_s") else "duration_s = 9\n" + text
    err = _error(text, tmp_path)
    assert err.startswith(f"{tmp_path / 's.toml'}: ") and needle in err, err


def test_a_resume_after_its_pause_is_fine(tmp_path: Path) -> None:
    scen = tmp_path / "s.toml"
    scen.write_text(
        'duration_s = 9\n[[fault]]\nat_s = 5\nkind = "resume"\ntargets = ["all"]\n'
        '[[fault]]\nat_s = 1\nkind = "pause"\ntargets = ["region-0/*"]\n'
    )
    assert [f.kind for f in load_scenario(scen).faults] == ["pause", "resume"]


def _fault(at: float, kind: str, target: str | None = "site-0", for_s: float | None = None) -> str:
    text = f'[[fault]]\nat_s = {at:g}\nkind = "{kind}"\n'
    text += f"for_s = {for_s:g}\n" if for_s is not None else ""
    return text + (f'targets = ["{target}"]\n' if target is not None else "")


@pytest.mark.parametrize(
    ("faults", "needle"),
    [
        # A heal with no network fault standing on its links heals nothing: its fault came
        # later (a misplaced at_s), was already over, or was on other links.
        (_fault(1, "heal", None), "fault[0]: a heal at 1 s, but no network fault stands on"),
        (
            _fault(1, "latency", "site-0->region-0", 2).replace("kind", "latency_ms = 5\nkind")
            + _fault(4, "heal", "site-0->region-0"),
            "fault[1]: a heal at 4 s, but no network fault stands on",
        ),
        (
            _fault(5, "blackhole", "site-1") + _fault(6, "heal", "site-0"),
            "fault[1]: a heal at 6 s, but no network fault stands on",
        ),
        # A kill or pause of a process another fault holds down does nothing, and its end
        # restarts (resumes) the process before the other fault's end.
        (
            _fault(1, "kill", for_s=6) + _fault(2, "kill", for_s=1),
            "fault[1]: a kill of site-0 at 2 s, but site-0 is still down then (fault[0], a "
            "kill until 7 s)",
        ),
        (
            _fault(1, "kill") + _fault(3, "kill"),
            "fault[1]: a kill of site-0 at 3 s, but site-0 is still down then (fault[0], a "
            "kill until restarted)",
        ),
        (
            _fault(1, "pause", for_s=6) + _fault(2, "pause", for_s=1),
            "fault[1]: a pause of site-0 at 2 s, but site-0 is still paused then (fault[0], a "
            "pause until 7 s)",
        ),
        (
            _fault(1, "kill", for_s=6) + _fault(2, "pause", for_s=1),
            "fault[1]: a pause of site-0 at 2 s, but site-0 is still down then",
        ),
        # A full disk made read-only (or the reverse): the second fault writes or removes
        # nothing on a read-only tmpfs ("could not lift it: Read-only file system").
        (
            _fault(1, "read_only", "root", 4) + _fault(2, "disk_full", "root", 1),
            "fault[1]: a disk_full of root at 2 s, but root's disk is still read_only then "
            "(fault[0], until 5 s)",
        ),
        (
            _fault(1, "disk_full", "root") + _fault(3, "read_only", "root", 1),
            "fault[1]: a read_only of root at 3 s, but root's disk is still disk_full then "
            "(fault[0], until the end of the run)",
        ),
        # A duplicate of a process that is down is no duplicate (it runs alone); a corrupt
        # restarts it at once, before the kill's end.
        (
            _fault(1, "kill", for_s=5) + _fault(2, "duplicate", for_s=1),
            "fault[1]: a duplicate of site-0 at 2 s, but site-0 is still down then (fault[0], "
            "a kill until 6 s)",
        ),
        (
            _fault(1, "kill") + _fault(2, "corrupt"),
            "fault[1]: a corrupt of site-0 at 2 s, but site-0 is still down then",
        ),
        # A corrupt writes into the state directory: on a read-only (or full) tmpfs it
        # failed after killing the node, which then stayed down.
        (
            _fault(1, "read_only", "root", 5) + _fault(2, "corrupt", "root"),
            "fault[1]: a corrupt of root at 2 s, but root's disk is still read_only then "
            "(fault[0], until 6 s)",
        ),
        # kill_all's end restarts only what it stopped: site-0 stays down after it.
        (
            _fault(1, "kill") + _fault(2, "kill_all", None, 1) + _fault(4, "kill"),
            "fault[2]: a kill of site-0 at 4 s, but site-0 is still down then (fault[0], a "
            "kill until restarted)",
        ),
        (
            _fault(1, "kill_all", None, 3) + _fault(2, "kill_all", None),
            "fault[1]: a kill_all at 2 s, but every daemon is still down then (fault[0], a "
            "kill_all): it would do nothing",
        ),
        # One target of a group held by another fault: the group's end frees it early.
        (
            _fault(1, "kill", for_s=6) + _fault(2, "kill", "region-0/*", 1),
            "fault[1]: a kill of site-0 at 2 s, but site-0 is still down then (fault[0], a "
            "kill until 7 s): its end would restart site-0 early",
        ),
    ],
)
def test_faults_that_do_nothing_or_cut_another_short_are_refused(
    tmp_path: Path, faults: str, needle: str
) -> None:
    err = _error("duration_s = 9\n" + faults, tmp_path)
    assert err.startswith(f"{tmp_path / 's.toml'}: ") and needle in err, err


@pytest.mark.parametrize(
    "faults",
    [
        _fault(1, "partition", "site-0") + _fault(3, "heal", None),  # heals what stands
        _fault(1, "kill", for_s=2) + _fault(3, "kill", for_s=2),  # back at 3 s: killed again
        _fault(1, "kill") + _fault(3, "restart") + _fault(5, "kill"),  # restart brings it back
        _fault(1, "pause") + _fault(2, "kill", for_s=1),  # a paused process can be killed
        _fault(1, "kill", for_s=2) + _fault(2, "kill_all", None, 1),  # kill_all: whoever is up
        _fault(1, "kill") + _fault(2, "pause", "all"),  # a group: whoever is up
        _fault(1, "read_only", "root", 2) + _fault(3, "disk_full", "root", 1),  # one after
    ],
)
def test_process_and_heal_faults_that_act_are_fine(tmp_path: Path, faults: str) -> None:
    scen = tmp_path / "s.toml"
    scen.write_text("duration_s = 9\n" + faults)
    assert load_scenario(scen).faults


def test_a_refusal_expected_of_a_node_no_corrupt_fault_damages_is_refused(
    tmp_path: Path,
) -> None:
    """Was accepted, and failed only after the whole run: "no corrupt fault damaged its
    state"."""
    text = 'duration_s = 9\n[expect]\nrefuses_start = "site-1"\n' + _fault(1, "corrupt")
    err = _error(text, tmp_path)
    assert "expect.refuses_start: no corrupt fault damages 'site-1'" in err, err
    scen = tmp_path / "s.toml"
    scen.write_text(text.replace('"site-1"', '"site-0"'))
    assert load_scenario(scen).expect["refuses_start"] == "site-0"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_scenario_path_that_is_no_regular_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """A named pipe blocked the command for good; /dev/zero read until memory ran out."""
    import os

    path = Path("/dev/zero")
    if kind == "fifo":
        path = tmp_path / "s.toml"
        os.mkfifo(path)
    refused(capsys, ["chaos", str(path)], f"{path}: not a regular file")
