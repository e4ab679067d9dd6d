"""``fedloom dataset add|list|show|revoke`` end to end through ``fedloom.cli.main``: real
files, a real registry, one clear line (exit 2) for every mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedloom.cli import main
from fedloom.federation.training import TrainingRefusedError
from fedloom.runtime.datasets import DatasetRegistry, DatasetWatch

CSV = "age,sex,chol,outcome\n50,F,200.5,sick\n61,M,240,well\n45,F,180,well\n"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def site_config(tmp_path: Path, key: str = "site.key") -> Path:
    """``tmp_path/site.toml``: site-a, its state in ``state``, its identity key in ``key``,
    a tabular plan over the datasets tagged "heart"."""
    cfg = tmp_path / "site.toml"
    cfg.write_text(
        'role = "site"\nnode_id = "site-a"\nstate_dir = "state"\n'
        f'[identity]\nkey = "{key}"\n'
        f'[roster]\npath = "roster.toml"\nconsortium_key = "{"A" * 43}="\n'
        '[parent]\nid = "root"\nurl = "ws://127.0.0.1:7443/fedloom"\n'
        '[plan]\nkind = "tabular"\ndataset_tag = "heart"\nfeatures = ["age", "chol"]\n'
        'label = "outcome"\nclasses = ["well", "sick"]\n'
    )
    return cfg


@pytest.fixture
def data(tmp_path: Path) -> Path:
    file = tmp_path / "cohort.csv"
    file.write_text(CSV)
    return file


def test_add_list_show_revoke(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = str(tmp_path / "state")
    rc, out, _ = run(
        capsys,
        "dataset", "add", str(data), "--state-dir", state, "--name", "cohort-2026",
        "--tag", "heart", "--tag", "2026", "--label", "outcome", "--type", "sex=category",
        "--features", "age,sex,chol",
    )  # fmt: skip
    assert rc == 0 and "registered cohort-2026: 3 rows, 3 features" in out
    rc, out, _ = run(capsys, "dataset", "list", "--state-dir", state)
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "TAGS", "ROWS", "SHA256", "STATUS"]
    assert lines[1].split()[:3] == ["cohort-2026", "heart,2026", "3"]
    assert lines[1].split()[-1] == "active"
    rc, out, _ = run(capsys, "dataset", "show", "cohort-2026", "--state-dir", state, "--json")
    shown = json.loads(out)
    assert shown["schema"]["features"] == [
        {"name": "age", "type": "int"},
        {"name": "sex", "type": "category"},
        {"name": "chol", "type": "float"},
    ]
    assert shown["schema"]["classes"] == ["sick", "well"] and shown["revoked_at"] is None
    rc, out, _ = run(capsys, "dataset", "show", "cohort-2026", "--state-dir", state)
    assert "sha256:    " + shown["sha256"] in out
    watch = DatasetWatch(state)
    assert watch.current("heart").name == "cohort-2026"
    rc, out, _ = run(capsys, "dataset", "revoke", "cohort-2026", "--state-dir", state)
    assert rc == 0 and "revoked cohort-2026" in out
    with pytest.raises(TrainingRefusedError) as info:
        watch.current("heart")
    assert info.value.code == "dataset_revoked"
    rc, out, _ = run(capsys, "dataset", "list", "--state-dir", state, "--json")
    assert json.loads(out)[0]["revoked_at"] is not None
    assert data.read_text() == CSV  # the file itself is never touched


def test_config_names_the_state_dir(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = site_config(tmp_path)
    rc, _, err = run(
        capsys, "dataset", "add", str(data), "--config", str(cfg), "--name", "c", "--tag", "heart",
        "--label", "outcome",
    )  # fmt: skip
    assert rc == 0, err
    assert DatasetRegistry(tmp_path / "state").get("c") is not None


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--name", "c", "--tag", "t", "--label", "outcome", "--type", "sex=int"],
         "column 'sex', row 1 (line 2): 'F' is not a whole number"),
        (["--name", "c", "--tag", "t", "--label", "outcome", "--type", "sex"],
         "--type 'sex': expected COL=TYPE"),
        (["--name", "c", "--tag", "t", "--label", "outcome", "--type", "sex=text"],
         "--type sex=text: the type must be one of int, float, category, bool"),
        (["--name", "c", "--tag", "t", "--label", "died"], "no label column 'died'"),
        (["--name", "bad name", "--tag", "t", "--label", "outcome"], "dataset name 'bad name'"),
    ],
)  # fmt: skip
def test_add_mistakes_are_one_line(
    tmp_path: Path,
    data: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    expected: str,
) -> None:
    rc, _, err = run(
        capsys, "dataset", "add", str(data), "--state-dir", str(tmp_path / "s"), *extra
    )
    assert rc == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_file_duplicate_and_unknown_names(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = str(tmp_path / "s")
    base = ["--state-dir", state, "--tag", "t", "--label", "outcome"]
    rc, _, err = run(capsys, "dataset", "add", str(tmp_path / "nope.csv"), "--name", "c", *base)
    assert rc == 2 and "nope.csv: file not found" in err
    assert run(capsys, "dataset", "add", str(data), "--name", "c", *base)[0] == 0
    rc, _, err = run(capsys, "dataset", "add", str(data), "--name", "c", *base)
    assert rc == 2 and "a dataset named 'c' is already registered" in err
    for action in ("show", "revoke"):
        rc, _, err = run(capsys, "dataset", action, "ghost", "--state-dir", state)
        assert rc == 2 and "no dataset named 'ghost' (registered: c;" in err
    with pytest.raises(SystemExit) as info:  # argparse: --state-dir or --config is required
        main(["dataset", "list"])
    assert info.value.code == 2 and "--state-dir" in capsys.readouterr().err


def test_help_explains_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["dataset", "add", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "fedloom dataset add /srv/data/cohort.csv --config" in out
    assert 'kind = "tabular"' in out


def test_the_readme_commands_run_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    start = text.index("## Bringing your own data")
    section = text[start : text.index("\n## ", start + 10)]
    commands = [
        " ".join(block.split("```", 1)[0].replace("\\\n", " ").split())
        for block in section.split("```sh\n")[1:]
    ]
    lines = [c for block in commands for c in block.split(" fedloom ") if c]
    data = tmp_path / "cohort.csv"
    data.write_text(CSV)
    state = tmp_path / "state"
    for line in lines:
        words = line.removeprefix("fedloom ").split()
        words = [str(data) if w == "/srv/data/cohort.csv" else w for w in words]
        i = words.index("--config")
        words[i : i + 2] = ["--state-dir", str(state)]
        rc, _, err = run(capsys, *words)
        assert rc == 0, (words, err)
    rec = DatasetRegistry(state).get("cohort-2026")
    assert rec is not None and rec.revoked_at is not None
