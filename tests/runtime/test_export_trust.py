"""What an export and a run report claim is checked, not copied (``runtime.export``,
``runtime.run_report``, through ``fedloom.cli.main``): a ``model_signed`` audit entry whose
signature does not verify against the root's roster is left out (the file says why), the
state directory alone cannot vouch for one, ``model verify`` without a roster does not
pass a file that carries a signature, ``run-report --model`` refuses a file whose tensors
are not its digest and links only the root's own model, and ``--site-audit`` reads the
datasets a site registered, not the ``dataset_used`` entries of its jobs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fedloom.cli import main
from fedloom.runtime.audit import dataset_of, record
from fedloom.runtime.config import load_config
from fedloom.runtime.export import read_export, verify_export
from fedloom.runtime.federation_files import ROOT_ID, Federation
from fedloom.transport.e2e import sign_model, tensors_digest
from fedloom.transport.identity import Identity

from .test_export import federation, root_model, run_root


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    fed = federation(tmp_path)
    run_root(fed, updates=5)
    return fed


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def crate_of(out: Path) -> dict[str, dict[str, Any]]:
    doc = json.loads((out / "ro-crate-metadata.json").read_text())
    return {e["@id"]: e for e in doc["@graph"]}


def test_a_signature_that_does_not_verify_is_not_exported_as_signed(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(fed.nodes[ROOT_ID].config)
    state = fed.nodes[ROOT_ID].state_dir
    version, weights = root_model(fed)
    digest = tensors_digest(weights)
    # Someone who can append to the root's audit log writes a proof: right digest,
    # garbage signature (or one made with another key).
    other = Identity.generate(ROOT_ID, "root")
    for sig in (b"\x01" * 64, sign_model(other, version, version - 1, digest)):
        record(state, "model_signed", version=version, parent=version - 1, signer=ROOT_ID,
               digest=digest.hex(), settings="", sig=sig.hex())  # fmt: skip
        out = tmp_path / "m.safetensors"
        rc, stdout, err = run(capsys, "model", "export", "--config", str(cfg.source), "--out",
                              str(out))  # fmt: skip
        assert rc == 0 and "unsigned (digest only)" in stdout
        assert "does not verify against the root's roster" in err
        _, meta = read_export(out)
        assert "signature" not in meta and "signer" not in meta
        assert "does not verify against the root's roster" in meta["signature_note"]
    # The state directory alone has no roster: the signature is left out, and said so.
    out = tmp_path / "s.safetensors"
    rc, _, _ = run(capsys, "model", "export", "--state-dir", str(state), "--out", str(out))
    _, meta = read_export(out)  # the checkpoint's model: its own version and digest
    v, d = int(meta["model_version"]), bytes.fromhex(meta["digest"].removeprefix("sha256:"))
    key = Identity.load(cfg.identity_key)
    parent = max(v - 1, 0)
    record(state, "model_signed", version=v, parent=parent, signer=ROOT_ID, digest=d.hex(),
           settings="", sig=sign_model(key, v, parent, d).hex())  # fmt: skip
    rc, _, _ = run(capsys, "model", "export", "--state-dir", str(state), "--out", str(out))
    assert rc == 0
    _, meta = read_export(out)
    assert "signature" not in meta and "no roster to check it" in meta["signature_note"]
    # A genuine proof of the current version is taken with the config (its roster).
    key_sig = sign_model(key, version, version - 1, digest).hex()
    record(state, "model_signed", version=version, parent=version - 1, signer=ROOT_ID,
           digest=digest.hex(), settings="", sig=key_sig)  # fmt: skip
    rc, stdout, _ = run(capsys, "model", "export", "--config", str(cfg.source), "--out", str(out))
    assert rc == 0 and f"signed by {ROOT_ID} (checked against the roster)" in stdout
    assert verify_export(out).signature == "unchecked" and not verify_export(out).ok


def test_verify_without_a_roster_does_not_pass_a_signed_file(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(fed.nodes[ROOT_ID].config)
    out = tmp_path / "m.safetensors"
    assert main(["model", "export", "--config", str(cfg.source), "--out", str(out)]) == 0
    tensors, meta = read_export(out)
    forged = dict(meta, signer=ROOT_ID, signature="01" * 64, signature_parent="0")
    from safetensors.numpy import save_file

    bad = tmp_path / "forged.safetensors"
    save_file(tensors, str(bad), metadata=forged)
    capsys.readouterr()
    rc, stdout, _ = run(capsys, "model", "verify", str(bad))
    assert rc == 1 and "UNCHECKED" in stdout and "--config" in stdout
    assert not verify_export(bad).ok
    rc, stdout, _ = run(capsys, "model", "verify", str(bad), "--config", str(cfg.source))
    assert rc == 1 and "INVALID" in stdout
    rc, stdout, _ = run(capsys, "model", "verify", str(out))  # no signature: digest only
    assert rc == 0 and "signature absent" in stdout


def test_run_report_checks_the_model_file_and_links_only_the_roots_model(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(fed.nodes[ROOT_ID].config)
    good = tmp_path / "m.safetensors"
    assert main(["model", "export", "--config", str(cfg.source), "--out", str(good)]) == 0
    tensors, meta = read_export(good)
    from safetensors.numpy import save_file

    # One weight changed, the metadata (digest) kept.
    t = {k: np.array(a) for k, a in tensors.items()}
    first = next(iter(t))
    t[first].reshape(-1)[0] += 1.0
    tampered = tmp_path / "tampered.safetensors"
    save_file(t, str(tampered), metadata=meta)
    rc, _, err = run(capsys, "run-report", "--config", str(cfg.source), "--out",
                     str(tmp_path / "r1"), "--model", str(tampered))  # fmt: skip
    assert rc == 2 and "does not verify" in err and "do not hash to its digest" in err
    assert not (tmp_path / "r1" / "ro-crate-metadata.json").exists()
    # Another model, consistent in itself: in the crate, not linked to the root's.
    other = tmp_path / "other.safetensors"
    save_file(t, str(other), metadata=dict(meta, digest="sha256:" + tensors_digest(t).hex()))
    rc, _, err = run(capsys, "run-report", "--config", str(cfg.source), "--out",
                     str(tmp_path / "r2"), "--model", str(other))  # fmt: skip
    assert rc == 0, err
    entity = crate_of(tmp_path / "r2")["other.safetensors"]
    assert "exampleOfWork" not in entity
    assert entity["identifier"] == "sha256:" + tensors_digest(t).hex()
    # The root's own model: linked.
    rc, _, err = run(capsys, "run-report", "--config", str(cfg.source), "--out",
                     str(tmp_path / "r3"), "--model", str(good))  # fmt: skip
    assert rc == 0, err
    crate = crate_of(tmp_path / "r3")
    version = meta["model_version"]
    assert crate["m.safetensors"]["exampleOfWork"] == {"@id": f"#model-v{version}"}
    assert crate["m.safetensors"]["identifier"] == crate[f"#model-v{version}"]["identifier"]


def test_site_audit_reads_registered_datasets_not_jobs(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(fed.nodes[ROOT_ID].config)
    site = tmp_path / "site-2-state"
    site.mkdir()
    sha = "ab" * 32
    record(site, "dataset_added", node="site-2", name="heart", path="/srv/data/heart.csv",
           sha256=sha, rows=303, tags=["heart"])  # fmt: skip

    plan = SimpleNamespace(
        dataset_record={"name": "heart", "tags": ["heart"], "sha256": sha, "rows": 303}
    )
    for job in (1, 2):  # as AuditMiddleware writes a job's entry
        record(site, "dataset_used", node="site-2", job=job, version=0, **dataset_of(plan))
    record(site, "dataset_used", node="site-2", job=3, version=0, name="ghost")
    export = tmp_path / "site-2.jsonl"
    assert main(["audit", "export", str(site), "--out", str(export)]) == 0
    out = tmp_path / "report"
    rc, _, err = run(capsys, "run-report", "--config", str(cfg.source), "--out", str(out),
                     "--site-audit", f"site-2={export}")  # fmt: skip
    assert rc == 0, err
    datasets = [e for e in crate_of(out).values() if e.get("@type") == "Dataset" and
                e["@id"] != "./"]  # fmt: skip
    assert [d["name"] for d in datasets] == ["heart at site-2"]
    assert datasets[0]["identifier"] == f"sha256:{sha}" and datasets[0]["rows"] == 303
    assert "/srv/data" not in json.dumps(datasets)
