"""``fedloom run-report``: the RO-Crate of a federation, read back through the rocrate
library: roster, plan, the datasets the sites registered (hashes, never data or paths),
the model, the privacy budget spent and the audit heads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fedloom.cli import main
from fedloom.runtime.config import load_config
from fedloom.runtime.export import read_root_model
from fedloom.runtime.federation_files import ROOT_ID, Federation
from fedloom.runtime.run_report import TERMS
from fedloom.transport.roster import Roster
from tests.runtime.test_export import federation, run_root

PRIVACY = {
    "mechanism": "central",
    "noise_multiplier": 1.1,
    "clip": 10.0,
    "delta": 1e-5,
    "epsilon_budget": 50.0,
}
CSV = "age,bp,outcome\n61,130.5,yes\n47,121.0,no\n55,140.2,yes\n38,118.9,no\n"


def site_with_dataset(fed: Federation, site: str, tmp_path: Path) -> Path:
    """A site's state directory where its operator registered one CSV (the audit log
    records it: ``runtime.datasets`` writes through ``runtime.audit``)."""
    from fedloom.runtime.datasets import DatasetRegistry

    csv = tmp_path / f"{site}-patients.csv"
    csv.write_text(CSV)
    state = fed.nodes[site].state_dir
    state.mkdir(parents=True, exist_ok=True)
    DatasetRegistry(state).add(csv, name="cohort", tags=["heart"], label="outcome")
    return state


def entity(crate: Any, ident: str) -> dict[str, Any]:
    found = crate.get(ident)
    assert found is not None, f"{ident} missing from the crate"
    props: dict[str, Any] = found.properties()
    return props


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    fed = federation(tmp_path, privacy=PRIVACY)
    run_root(fed, updates=5)
    return fed


def test_the_crate_round_trips_and_describes_the_federation(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rocrate.rocrate import ROCrate

    from fedloom.runtime.governance import plan_digest

    s1 = site_with_dataset(fed, "site-1", tmp_path)
    s2 = site_with_dataset(fed, "site-2", tmp_path)
    digest = plan_digest(load_config(fed.nodes[ROOT_ID].config))  # the consortium's plan
    for state in (s1, s2):
        approve = ["plans", "approve", "--state-dir", str(state), "--digest", digest]
        approve += ["--bound", "lr=0.01:0.1", "--bound", "local_steps=1:20", "--note", "study 42"]
        assert main(approve) == 0
    export = tmp_path / "site-2-audit.jsonl"
    shutil.copy(s2 / "audit" / "audit.jsonl", export)  # what `fedloom audit export` writes
    config = fed.nodes[ROOT_ID].config
    (fed.nodes[ROOT_ID].state_dir / "evaluation.json").write_text(
        json.dumps({"buckets": [{"version": 5, "accuracy": 0.8, "sites": 3}]})
    )
    model_file = tmp_path / "model.safetensors"
    assert main(["model", "export", "--config", str(config), "--out", str(model_file)]) == 0
    out = tmp_path / "report"
    argv = ["run-report", "--config", str(config), "--out", str(out)]
    # site-1's directory is named after it; site-2's export is named on the command line.
    argv += ["--site-state", str(s1), "--site-audit", f"site-2={export}"]
    argv += ["--model", str(model_file)]
    assert main(argv) == 0
    assert "ro-crate-metadata.json" in capsys.readouterr().out

    crate = ROCrate(out)
    cfg = load_config(config)
    roster = Roster.loads(Path(cfg.roster_path).read_text(), cfg.read_consortium_key())
    r = entity(crate, "#roster")
    assert r["version"] == str(roster.version)
    assert r["identifier"] == "sha256:" + roster.digest.hex()
    members = {ref["@id"] for ref in r["hasPart"]}
    assert members == {f"#node-{e.node_id}" for e in roster.entries}
    assert entity(crate, "#node-site-1")["roleName"] == "site"
    assert entity(crate, "#node-root")["roleName"] == "root"

    plan = entity(crate, "#plan")
    assert plan["identifier"] == digest == plan_digest(cfg)
    # Each site's approval of that plan: from site-1's approvals file, site-2's audit export.
    for site in ("site-1", "site-2"):
        a = entity(crate, f"#approval-{site}-{digest[7:19]}")
        assert a["@type"] == "AuthorizeAction" and a["object"] == {"@id": "#plan"}
        assert a["agent"] == {"@id": f"#node-{site}"} and a["description"] == "study 42"
        assert json.loads(a["bounds"])["lr"] == [0.01, 0.1] and a["startTime"]

    model = read_root_model(config=config)
    m = entity(crate, f"#model-v{model.version}")
    assert m["identifier"] == "sha256:" + model.digest.hex() and m["version"] == "5"
    copied = entity(crate, "model.safetensors")
    assert copied["identifier"] == m["identifier"]
    assert (out / "model.safetensors").read_bytes() == model_file.read_bytes()

    # Both sites' datasets: hashes, tags, rows and columns; never the data or its path.
    from fedloom.runtime.datasets import DatasetRegistry

    rec = DatasetRegistry(s1).records()[0]
    d1 = entity(crate, "#dataset-site-1-cohort")
    assert d1["identifier"] == f"sha256:{rec.sha256}" and d1["keywords"] == ["heart"]
    assert d1["rows"] == 4 and d1["status"] == "active"
    assert d1["provider"] == {"@id": "#node-site-1"}
    d2 = entity(crate, "#dataset-site-2-cohort")
    assert d2["identifier"] == f"sha256:{rec.sha256}" and d2["rows"] == 4
    text = (out / "ro-crate-metadata.json").read_text()
    assert str(tmp_path) not in text  # no site's paths
    assert not any(value in text for value in ("130.5", "121.0", "140.2", "118.9"))  # no data

    run = entity(crate, "#run")
    assert run["@type"] == "CreateAction"
    assert {"@id": "#dataset-site-1-cohort"} in run["object"]
    assert {"@id": "model.safetensors"} in run["result"]

    privacy = entity(crate, "#privacy")
    assert privacy["releases"] == 5 and privacy["epsilon_budget"] == 50.0
    assert 0.0 < privacy["epsilon"] < 50.0
    assert json.loads(entity(crate, "#metrics")["value"]) == {
        "evaluation.json": {"buckets": [{"version": 5, "accuracy": 0.8, "sites": 3}]}
    }
    # The sites' audit heads: the last entry of each log read.
    last = json.loads((s2 / "audit" / "audit.jsonl").read_text().splitlines()[-1])
    head = entity(crate, "#audit-site-2")
    assert head["seq"] == last["seq"] and head["hash"] == last["hash"]
    assert "#audit-site-1" in {e.id for e in crate.get_entities()}


def test_every_property_is_a_term_of_the_crates_context(fed: Federation, tmp_path: Path) -> None:
    """JSON-LD processors drop properties their context does not define: every key the
    report writes is in the RO-Crate 1.x context or declared in TERMS."""
    import rocrate

    s1 = site_with_dataset(fed, "site-1", tmp_path)
    out = tmp_path / "report"
    config = fed.nodes[ROOT_ID].config
    assert (
        main(["run-report", "--config", str(config), "--out", str(out), "--site-state", str(s1)])
        == 0
    )
    doc = json.loads((out / "ro-crate-metadata.json").read_text())
    context_file = Path(rocrate.__file__).parent / "data" / "ro-crate.jsonld"
    known = set(json.loads(context_file.read_text())["@context"]) | set(TERMS)
    assert doc["@context"][1] == TERMS
    used = {key for node in doc["@graph"] for key in node if not key.startswith("@")}
    assert used <= known, used - known


def test_mistakes_are_one_line_and_exit_2(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(fed.nodes[ROOT_ID].config)

    def refused(argv: list[str], match: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err

    out = str(tmp_path / "r")
    refused(
        ["run-report", "--config", str(fed.nodes["site-1"].config), "--out", out],
        "not a root's",
    )
    refused(
        ["run-report", "--config", config, "--out", out, "--site-state", str(tmp_path / "x")],
        "no such directory",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"seq": 1}\nnot json\n')
    refused(["run-report", "--config", config, "--out", out, "--site-audit", str(bad)], "line")
    # An edited audit export is refused: its entry no longer matches its hash.
    s1 = site_with_dataset(fed, "site-1", tmp_path)
    lines = (s1 / "audit" / "audit.jsonl").read_text().splitlines()
    entry = json.loads(lines[-1])
    entry["fields"]["rows"] = 4000
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join([*lines[:-1], json.dumps(entry)]) + "\n")
    refused(
        ["run-report", "--config", config, "--out", out, "--site-audit", str(edited)],
        "does not match its hash",
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    refused(
        ["run-report", "--config", config, "--out", str(tmp_path / "full")],
        "not an empty directory",
    )


def test_an_unwritable_out_is_one_line_and_leaves_nothing_half_written(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    from rocrate.rocrate import ROCrate

    config = str(fed.nodes[ROOT_ID].config)
    (tmp_path / "afile").write_text("")
    assert main(["run-report", "--config", config, "--out", str(tmp_path / "afile" / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "Traceback" not in err, err

    def fails(self: Any, base: Any) -> None:  # the disk fills after the first file
        Path(base).mkdir(parents=True, exist_ok=True)
        (Path(base) / "ro-crate-metadata.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ROCrate, "write", fails)
    out = tmp_path / "r"
    assert main(["run-report", "--config", config, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err, err
    assert not out.exists() and list(tmp_path.glob("*r*tmp*")) == []


def test_a_root_with_central_dp_whose_ledger_cannot_be_read_is_refused(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """A crate without ``#privacy`` says no central DP budget was spent: for a root with
    ``[privacy]`` whose ledger is damaged (or was never read: the daemon checkpointed
    during every try), that would be a false account, so the report is refused."""
    import fedloom.runtime.privacy_cli as privacy_cli
    from fedloom.federation.config_reader import ConfigError

    config = str(fed.nodes[ROOT_ID].config)

    def damaged(directory: Path) -> None:
        raise ConfigError(f"{directory}: damaged privacy ledger: bad release")

    for reader, match in ((damaged, "damaged privacy ledger"), (lambda d: None, "try again")):
        monkeypatch.setattr(privacy_cli, "read_ledger", reader)
        out = tmp_path / f"r-{match[:3]}"
        assert main(["run-report", "--config", config, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
        assert not out.exists()


def test_a_site_name_not_in_the_roster_is_named_as_such(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``SITE=PATH`` with a SITE the roster does not list: the line says so, not that a
    directory called ``SITE=PATH`` does not exist."""
    config = str(fed.nodes[ROOT_ID].config)
    site = fed.nodes["site-1"].state_dir
    site.mkdir(parents=True, exist_ok=True)
    for flag in ("--site-state", "--site-audit"):
        argv = ["run-report", "--config", config, "--out", str(tmp_path / "r")]
        assert main([*argv, flag, f"hospital-x={site}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "'hospital-x' is not a member of the roster" in err, err


def test_an_out_that_links_to_an_empty_directory_gets_the_crate_there(
    fed: Federation, tmp_path: Path
) -> None:
    target = tmp_path / "shared" / "study"
    target.mkdir(parents=True)
    link = tmp_path / "report"
    link.symlink_to(target)
    assert main(["run-report", "--config", str(fed.nodes[ROOT_ID].config), "--out", str(link)]) == 0
    assert link.is_symlink() and (target / "ro-crate-metadata.json").is_file()
