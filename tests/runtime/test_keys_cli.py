"""``fedloom keygen`` and ``fedloom roster sign|verify``: files, output and exit codes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedloom.cli import main
from fedloom.transport.identity import Identity, parse_public_line
from fedloom.transport.roster import Roster


def keygen(tmp_path: Path, node_id: str, role: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["keygen", "--id", node_id, "--role", role, "--out", str(tmp_path / "keys")]) == 0
    line: str = capsys.readouterr().out.strip()
    return line


def make_unsigned(tmp_path: Path, lines: list[str], version: int = 2) -> Path:
    text = f"version = {version}\n"
    for line in lines:
        ident = parse_public_line(line)
        key = line.split()[2]
        text += (
            f'\n[[nodes]]\nid = "{ident.node_id}"\nrole = "{ident.role}"\n'
            f'public_key = "{key}"\nendpoints = ["wss://agg:8443/fl"]\n'
        )
    path = tmp_path / "unsigned.toml"
    path.write_text(text)
    return path


def test_keygen_writes_a_private_identity_and_prints_its_public_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = keygen(tmp_path, "site-a", "site", capsys)
    private = tmp_path / "keys" / "site-a.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert Identity.load(private).public_line() == line
    assert (tmp_path / "keys" / "site-a.pub").read_text().strip() == line
    assert line.startswith("site-a site ")


def test_keygen_refuses_to_overwrite_and_bad_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keygen(tmp_path, "site-a", "site", capsys)
    out = str(tmp_path / "keys")
    assert main(["keygen", "--id", "site-a", "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keygen", "--id", "site-a", "--out", out, "--force"]) == 0
    assert main(["keygen", "--id", "../evil", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "invalid node id" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["keygen", "--id", "a", "--role", "king", "--out", out])
    assert exc.value.code == 2


def test_roster_sign_then_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    consortium = keygen(tmp_path, "consortium", "consortium", capsys)
    nodes = [keygen(tmp_path, n, r, capsys) for n, r in [("root", "root"), ("site-a", "site")]]
    signed = tmp_path / "roster.toml"
    key = str(tmp_path / "keys" / "consortium.key")
    unsigned = make_unsigned(tmp_path, nodes)
    assert main(["roster", "sign", str(unsigned), "--key", key, "--out", str(signed)]) == 0
    assert "version 2 (2 nodes)" in capsys.readouterr().out
    roster = Roster.load(signed, parse_public_line(consortium).public_key)
    assert roster.lookup("site-a") is not None
    for consortium_arg in [
        str(tmp_path / "keys" / "consortium.pub"),  # the public line file
        consortium.split()[2],  # the bare base64 key
        key,  # the private identity itself
    ]:
        assert main(["roster", "verify", str(signed), "--consortium", consortium_arg]) == 0
        assert "valid, version 2, 2 nodes (1 root, 1 site)" in capsys.readouterr().out


def test_roster_verify_reports_tampering_and_the_wrong_consortium(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keygen(tmp_path, "consortium", "consortium", capsys)
    rogue = keygen(tmp_path, "rogue", "consortium", capsys)
    nodes = [keygen(tmp_path, "site-a", "site", capsys)]
    signed = tmp_path / "roster.toml"
    key = str(tmp_path / "keys" / "consortium.key")
    pub = str(tmp_path / "keys" / "consortium.pub")
    main(
        ["roster", "sign", str(make_unsigned(tmp_path, nodes)), "--key", key, "--out", str(signed)]
    )
    capsys.readouterr()
    assert main(["roster", "verify", str(signed), "--consortium", rogue.split()[2]]) == 1
    assert "INVALID" in capsys.readouterr().err
    signed.write_text(signed.read_text().replace("version = 2", "version = 9"))
    assert main(["roster", "verify", str(signed), "--consortium", pub]) == 1
    assert "signature does not verify" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["roster", "verify", "missing.toml", "--consortium", "AAAA"], "neither a file"),
        (["roster", "sign", "missing.toml", "--key", "k", "--out", "o"], "file not found"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_roster_sign_reports_a_bad_roster_and_a_bad_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keygen(tmp_path, "consortium", "consortium", capsys)
    key = str(tmp_path / "keys" / "consortium.key")
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 1\n[[nodes]]\nid = 'a'\nrole = 'site'\n")
    assert main(["roster", "sign", str(bad), "--key", key, "--out", str(tmp_path / "o")]) == 2
    assert "missing field 'public_key'" in capsys.readouterr().err
    assert main(["roster", "sign", str(bad), "--key", str(bad), "--out", "o"]) == 2
    assert "--key" in capsys.readouterr().err


def test_roster_without_action_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["roster"])
    assert exc.value.code == 2
    assert "sign or verify" in capsys.readouterr().err
