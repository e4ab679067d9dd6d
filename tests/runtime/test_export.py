"""``fedloom model export|verify``: a root's model out of a real state directory (checkpoint
plus log, as a restart restores it), bit for bit, with its provenance; a running root's
directory read without disturbing it; mistakes as one line and exit 2."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w

from fedloom.algorithms.protocol import Persist, Received
from fedloom.cli import main
from fedloom.federation.store import StateStore
from fedloom.runtime.chaos.layout import lay_out
from fedloom.runtime.config import load_config
from fedloom.runtime.export import read_root_model, verify_export, write_export
from fedloom.runtime.federation_files import ROOT_ID, Federation
from fedloom.runtime.recovery import load_node, open_daemon
from fedloom.transport.e2e import sign_model, tensors_digest
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster
from fedloom.transport.wire import Hello, Update

# lay_out starts from the demo's plan: None drops its scikit-learn fields.
SYNTHETIC = {
    "dataset": "synthetic",
    "model": "softmax",
    "dirichlet_alpha": None,
    "min_samples_per_site": None,
    "samples_per_site": 100,
}


def run_root(fed: Federation, updates: int) -> None:
    """The root daemon's node opened from its config (recovery, start-up checkpoint) and
    fed ``updates`` updates from its children in turn; every Persist it asks for is
    written to its state directory, as the daemon's driver does."""
    d = open_daemon(load_config(fed.nodes[ROOT_ID].config))
    try:
        node: Any = d.node
        children = [c for c in fed.config(ROOT_ID)["children"]]
        for child in children:
            node.handle(Received(child, Hello(child, fed.nodes[child].role)), 0.0)
        for seq in range(1, updates + 1):
            child = children[seq % len(children)]
            version, weights = node.current_model()
            delta = {
                k: np.random.default_rng(seq).normal(size=a.shape).astype(a.dtype)
                for k, a in weights.items()
            }
            pairs = ((child, seq),) if fed.nodes[child].role == "region" else ()
            msg = Update(child, seq, version, delta, 50, 1, -1, pairs=pairs)
            out = node.handle(Received(child, msg), 1.0 + seq)
            d.store.apply_many([e for e in out if isinstance(e, Persist)])
    finally:
        d.close()


def federation(
    tmp_path: Path, *, privacy: dict[str, Any] | None = None, star: bool = True
) -> Federation:
    """A root over two sites (``star``; else over a region of two sites) on synthetic
    data, every aggregator stepping on each update."""
    fed = lay_out(
        tmp_path / "fed",
        {"region-a": ["site-1", "site-2"]},
        star=star,
        plan=SYNTHETIC,
        root_aggregation={"buffer_size": 1},
    )
    if privacy is not None:
        path = fed.nodes[ROOT_ID].config
        raw = tomllib.loads(path.read_text())
        raw["privacy"] = privacy
        raw["aggregation"]["weighting"] = "uniform"  # central DP's fixed denominator
        path.write_text(tomli_w.dumps(raw))
    return fed


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    fed = federation(tmp_path)
    run_root(fed, updates=7)
    return fed


def root_model(fed: Federation) -> tuple[int, dict[str, np.ndarray]]:
    node: Any = load_node(load_config(fed.nodes[ROOT_ID].config))
    version, weights = node.current_model()
    return int(version), dict(weights)


def same_bits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def test_safetensors_export_is_the_roots_model_bit_for_bit(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    out = tmp_path / "model.safetensors"
    config = fed.nodes[ROOT_ID].config
    assert main(["model", "export", "--config", str(config), "--out", str(out)]) == 0
    assert "exported model version 7" in capsys.readouterr().out
    version, weights = root_model(fed)
    assert version == 7
    loaded = load_file(str(out))
    with safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
    order = json.loads(meta["tensor_order"])
    assert same_bits({k: loaded[k] for k in order}, weights)
    assert meta["model_version"] == "7" and meta["current_version"] == "7"
    assert meta["digest"] == "sha256:" + tensors_digest(weights).hex()
    assert meta["source"] == "checkpoint+log" and meta["algorithm"] == "fedbuff"
    assert meta["node_id"] == ROOT_ID and meta["fedloom_version"]
    assert json.loads(meta["lineage"])[0] == {"version": 7, "parent": 6}
    # No audit proof of version 7 here: the file says it carries the digest only.
    assert "signature" not in meta and "keeps no model signatures" in meta["signature_note"]
    assert main(["model", "verify", str(out), "--config", str(config)]) == 0
    assert "digest matches, signature absent" in capsys.readouterr().out


def test_torch_export_round_trips(fed: Federation, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / "model.pt"
    config = fed.nodes[ROOT_ID].config
    assert (
        main(["model", "export", "--config", str(config), "--format", "torch", "--out", str(out)])
        == 0
    )
    obj = torch.load(str(out), weights_only=True)
    assert obj["metadata"]["model_version"] == "7"
    _, weights = root_model(fed)
    assert same_bits({k: v.numpy() for k, v in obj["state_dict"].items()}, weights)
    assert verify_export(out).digest_ok


def test_a_running_roots_state_is_read_without_disturbing_it(
    fed: Federation, tmp_path: Path
) -> None:
    """The daemon's flock is held (a StateStore open on the directory, as a running root
    has): the export still reads checkpoint + live log and changes no byte there."""
    state = fed.nodes[ROOT_ID].state_dir
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    with StateStore(state) as held:
        held.load(repair=False)
        model = read_root_model(config=fed.nodes[ROOT_ID].config)
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    version, weights = root_model(fed)
    assert model.version == version == 7 and same_bits(model.weights, weights)


def test_state_dir_alone_gives_the_checkpoints_model_and_says_what_it_leaves_out(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    state = fed.nodes[ROOT_ID].state_dir
    assert main(["model", "export", "--state-dir", str(state), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "7 log records after it are not in it" in err
    found = verify_export(out)
    assert found.version == 0 and found.digest_ok
    assert found.metadata["source"] == "checkpoint"


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


def test_mistakes_are_one_line_and_exit_2(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(fed.nodes[ROOT_ID].config)
    out = str(tmp_path / "x")
    one_line_error(capsys, ["model", "export", "--out", out], "give the root's --config")
    one_line_error(
        capsys,
        ["model", "export", "--state-dir", str(tmp_path / "nothing"), "--out", out],
        "no such state directory",
    )
    one_line_error(
        capsys,
        ["model", "export", "--config", str(fed.nodes["site-1"].config), "--out", out],
        "the config of a site, not a root's",
    )
    one_line_error(
        capsys,
        ["model", "export", "--config", config, "--format", "onnx", "--out", out],
        "'onnx' is not one of safetensors, torch",
    )
    one_line_error(
        capsys,
        ["model", "export", "--config", config, "--version", "3", "--out", out],
        "holds only its current model (version 7) and its last checkpoint's (version 0)",
    )
    one_line_error(
        capsys,
        ["model", "export", "--config", config, "--version", "9", "--out", out],
        "the root is at version 7",
    )
    one_line_error(
        capsys,
        ["model", "export", "--config", config, "--out", str(tmp_path / "no" / "m")],
        "no such directory",
    )
    # A site's and a region's state directories are not a root's.
    tree = federation(tmp_path / "tree", star=False)
    region = load_config(tree.nodes["region-a"].config)
    open_daemon(region).close()
    one_line_error(
        capsys,
        ["model", "export", "--state-dir", str(region.state_dir), "--out", out],
        "the state of a regional node, not a root's",
    )
    site = fed.nodes["site-1"].state_dir
    site.mkdir(parents=True, exist_ok=True)
    with StateStore(site) as store:
        store.load()
        store.apply(Persist("site/pending", {"seq": 0}))
    one_line_error(
        capsys,
        ["model", "export", "--state-dir", str(site), "--out", out],
        "a site's state directory",
    )
    # A root that never ran has no state yet.
    fresh = federation(tmp_path / "fresh")
    one_line_error(
        capsys,
        ["model", "export", "--config", str(fresh.nodes[ROOT_ID].config), "--out", out],
        "no such state directory",
    )
    one_line_error(capsys, ["model", "verify", str(tmp_path / "none")], "no such file")
    (tmp_path / "junk").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    one_line_error(capsys, ["model", "verify", str(tmp_path / "junk")], "not a safetensors file")


def test_verify_detects_altered_tensors_and_checks_the_roots_signature(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.numpy import save_file

    cfg = load_config(fed.nodes[ROOT_ID].config)
    model = read_root_model(config=fed.nodes[ROOT_ID].config)
    roster = Roster.loads(Path(cfg.roster_path).read_text(), cfg.read_consortium_key())
    root_key = Identity.load(cfg.identity_key)
    sig = sign_model(root_key, model.version, 6, model.digest)
    signed = dataclasses.replace(model, signer=ROOT_ID, signature=sig, signature_parent=6)
    out = tmp_path / "signed.safetensors"
    meta = write_export(signed, out, "safetensors")
    found = verify_export(out, roster)
    assert found.ok and found.signature == "valid"
    assert main(["model", "verify", str(out), "--config", str(fed.nodes[ROOT_ID].config)]) == 0
    assert "signature valid" in capsys.readouterr().out

    # One weight changed, the metadata kept: the digest no longer matches.
    tampered = {k: np.array(v) for k, v in model.weights.items()}
    first = next(iter(tampered))
    tampered[first].reshape(-1)[0] += 1.0
    save_file(tampered, str(tmp_path / "t.safetensors"), metadata=meta)
    assert not verify_export(tmp_path / "t.safetensors", roster).ok
    assert main(["model", "verify", str(tmp_path / "t.safetensors")]) == 1
    assert "DOES NOT MATCH" in capsys.readouterr().out

    # Signed by a site's key (a member, not a root): refused.
    site = Identity.load(load_config(fed.nodes["site-1"].config).identity_key)
    forged = site.sign(b"x" * 8)  # any bytes: the signer is checked first
    fake = dataclasses.replace(model, signer="site-1", signature=forged, signature_parent=6)
    write_export(fake, tmp_path / "f.safetensors", "safetensors")
    found = verify_export(tmp_path / "f.safetensors", roster)
    assert (
        not found.ok and found.signature.startswith("INVALID") and "not a root" in found.signature
    )
    # The root's signature over another version does not carry over.
    moved = dataclasses.replace(signed, version=6)
    write_export(moved, tmp_path / "m.safetensors", "safetensors")
    assert verify_export(tmp_path / "m.safetensors", roster).signature.startswith("INVALID")


def test_the_roots_signature_and_lineage_come_from_its_audit_log(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The root's audit log records each model version it released ("model_version") and
    each proof it made ("model_signed", over the settings it sent too), as
    ``runtime.audit``'s middleware writes them: the export carries the proof of the
    exported version over this model's digest (not a proof over another digest), and
    ``model verify`` checks it, settings included."""
    from fedloom.runtime.audit import record
    from fedloom.transport.settings import settings_digest

    cfg = load_config(fed.nodes[ROOT_ID].config)
    state = fed.nodes[ROOT_ID].state_dir
    version, weights = root_model(fed)
    digest = tensors_digest(weights)
    key = Identity.load(cfg.identity_key)
    settings = settings_digest({"lr": 0.05, "local_steps": 20})

    def signed(v: int, d: bytes, **extra: Any) -> None:
        sig = sign_model(key, v, v - 1, d, settings).hex()
        fields: dict[str, Any] = {
            "version": v,
            "parent": v - 1,
            "signer": ROOT_ID,
            "digest": d.hex(),
        }
        record(state, "model_signed", **fields, settings=settings.hex(), sig=sig, **extra)

    for v in range(1, version):  # earlier versions: other digests
        other = bytes([v]) * 32
        record(state, "model_version", version=v, digest=other.hex(), signed_digest=other.hex())
        signed(v, other)
    record(state, "model_version", version=version, digest=digest.hex(), signed_digest=digest.hex())
    signed(version, digest)
    # A later proof of the same version over other tensors (a lossy codec) is not taken.
    signed(version, b"\x00" * 32)
    out = tmp_path / "m.safetensors"
    assert main(["model", "export", "--config", str(cfg.source), "--out", str(out)]) == 0
    assert f"signed by {ROOT_ID}" in capsys.readouterr().out
    roster = Roster.loads(Path(cfg.roster_path).read_text(), cfg.read_consortium_key())
    found = verify_export(out, roster)
    assert found.signature == "valid" and found.metadata["signature_parent"] == str(version - 1)
    assert found.metadata["signature_settings"] == "sha256:" + settings.hex()
    assert found.metadata["lineage_source"] == "audit"
    lineage = json.loads(found.metadata["lineage"])
    assert [e["version"] for e in lineage] == list(range(1, version + 1))
    assert all(e["parent"] == e["version"] - 1 for e in lineage)
    assert lineage[-1]["digest"] == "sha256:" + digest.hex()
    # The settings are part of what was signed: other settings do not verify.
    meta = dict(found.metadata)
    meta["signature_settings"] = "sha256:" + settings_digest({"lr": 9.0}).hex()
    from safetensors.numpy import load_file, save_file

    save_file(load_file(str(out)), str(tmp_path / "s.safetensors"), metadata=meta)
    assert verify_export(tmp_path / "s.safetensors", roster).signature.startswith("INVALID")


def test_a_signature_field_that_cannot_be_read_is_invalid_not_absent(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file whose signature field is garbage, empty, or that names a signer without a
    signature carries a claim nobody checked: verify must not call it absent and say OK."""
    from safetensors.numpy import save_file

    cfg = load_config(fed.nodes[ROOT_ID].config)
    roster = Roster.loads(Path(cfg.roster_path).read_text(), cfg.read_consortium_key())
    model = read_root_model(config=fed.nodes[ROOT_ID].config)
    meta = write_export(model, tmp_path / "base.safetensors", "safetensors")
    for name, extra in (
        ("garbage", {"signer": ROOT_ID, "signature": "zz", "signature_parent": "6"}),
        ("empty", {"signer": ROOT_ID, "signature": "", "signature_parent": "6"}),
        ("signer-only", {"signer": ROOT_ID}),
    ):
        path = tmp_path / f"{name}.safetensors"
        save_file(dict(model.weights), str(path), metadata={**meta, **extra})
        found = verify_export(path, roster)
        assert not found.ok and found.signature.startswith("INVALID"), (name, found.signature)
        assert main(["model", "verify", str(path), "--config", str(cfg.source)]) == 1
        assert "signature absent" not in capsys.readouterr().out


def test_a_torch_file_with_other_values_than_tensors_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip("torch")
    meta = {"format": "fedloom-model/1", "tensor_order": '["a"]', "model_version": "1"}
    for name, value in (("int", 1), ("bf16", torch.zeros(2, dtype=torch.bfloat16))):
        path = tmp_path / f"{name}.pt"
        torch.save({"state_dict": {"a": value}, "metadata": meta}, str(path))
        one_line_error(capsys, ["model", "verify", str(path)], f"{path}: tensor 'a'")


def test_a_safetensors_file_of_a_dtype_numpy_lacks_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bfloat16 (a torch model's usual dtype) loads in safetensors but not in numpy."""
    meta = {"format": "fedloom-model/1", "tensor_order": '["a"]', "model_version": "1"}
    header = json.dumps(
        {"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}, "__metadata__": meta}
    ).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 4)
    one_line_error(capsys, ["model", "verify", str(path)], "a dtype numpy cannot load")


def test_a_torch_file_whose_tensor_order_is_not_text_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip("torch")
    meta = {"format": "fedloom-model/1", "tensor_order": ["a"], "model_version": "1"}
    path = tmp_path / "list.pt"
    torch.save({"state_dict": {"a": torch.zeros(2)}, "metadata": meta}, str(path))
    one_line_error(capsys, ["model", "verify", str(path)], "without a valid tensor_order")
