"""A root that lost its state says so, and `fedloom state reseed` gets training going again
(issue 13, failure 6): real configs, keys, state directories and the CLI; nodes sans-I/O."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Effect, Log, Metric, Persist, Received, Send
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.cli import main
from fedloom.federation.store import StateStore
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import load_identity, load_node, model_floor_digest, open_daemon
from fedloom.runtime.federation_files import ROOT_ID, Federation, write_federation
from fedloom.transport.e2e import ModelVersionGuard, sign_model, tensors_digest
from fedloom.transport.wire import Ack, Hello, ModelBroadcast, Update

REGION = "region-a"


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return write_federation(
        tmp_path / "fed",
        {REGION: ["site-1", "site-2"]},
        plan={"dataset": "synthetic", "model": "softmax"},
    )


def signed_model(fed: Federation, version: int, shift: float) -> ModelBroadcast:
    """Model ``version`` as the root published it before it lost its state."""
    root = load_node(load_config(fed.nodes[ROOT_ID].config))
    assert isinstance(root, FedBuffAggregator)
    weights = {k: (v + shift).astype(v.dtype) for k, v in root.current_model()[1].items()}
    identity = load_identity(load_config(fed.nodes[ROOT_ID].config))
    sig = sign_model(identity, version, version - 1, tensors_digest(weights))
    return ModelBroadcast(version, weights, ROOT_ID, version - 1, sig)


def region_holds(fed: Federation, model: ModelBroadcast) -> None:
    """The region received ``model`` and made it durable (its first model: checkpointed)."""
    d = open_daemon(load_config(fed.nodes[REGION].config))
    try:
        out = d.node.handle(Received(ROOT_ID, model), 0.0)
        d.store.apply_many([e for e in out if isinstance(e, Persist)])
    finally:
        d.close()


def forward(root: FedBuffAggregator, base: int) -> Update:
    delta = {k: np.full_like(v, 0.01) for k, v in root.current_model()[1].items()}
    return Update(REGION, 1, base, delta, 20, count=1)


def offer(root: FedBuffAggregator, update: Update) -> list[Effect]:
    root.handle(Received(REGION, Hello(REGION, "region")), 1.0)
    return root.handle(Received(REGION, update), 2.0)


def test_a_root_that_lost_its_state_says_so_and_is_reseeded_from_a_region(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    model = signed_model(fed, 40, shift=0.25)
    region_holds(fed, model)
    root_cfg = load_config(fed.nodes[ROOT_ID].config)
    # The root's state directory was lost: it starts at v0 and meets a forward on v40.
    root = load_node(root_cfg)
    assert isinstance(root, FedBuffAggregator) and root.version == 0
    out = offer(root, forward(root, 40))
    assert not [e for e in out if isinstance(e, Send) and isinstance(e.msg, Ack)]  # kept
    assert not [e for e in out if isinstance(e, Persist)]
    [error] = [e for e in out if isinstance(e, Log) and e.level == "error"]
    assert "fedloom state reseed" in error.text and "--above 40" in error.text
    gauge = [e for e in out if isinstance(e, Metric) and e.name == "root_behind_children"]
    assert gauge and gauge[0].value == 40.0
    again = root.handle(Received(REGION, forward(root, 40)), 3.0)
    assert not [e for e in again if isinstance(e, Log) and e.level == "error"]  # said once

    region_dir = fed.nodes[REGION].state_dir
    argv = ["state", "reseed", "--config", str(fed.nodes[ROOT_ID].config), "--from"]
    assert main([*argv, str(region_dir)]) == 0
    assert "at model version 40" in capsys.readouterr().out
    back = load_node(root_cfg)
    assert isinstance(back, FedBuffAggregator) and back.version == 40
    for k, v in model.weights.items():
        np.testing.assert_array_equal(back.current_model()[1][k], v)
    out = offer(back, forward(back, 40))
    assert [e.msg for e in out if isinstance(e, Send) and isinstance(e.msg, Ack)]
    assert back.applied == 1
    # It lost its record of the site updates it took: it relearns where each site stands
    # (tests/algorithms/test_failover_review.py), and the reseed wrote that down.
    assert back.snapshot()["pairs"]["relearned"] == []
    # The region accepts the reseeded root's model under v40: the very model it holds.
    region = load_node(load_config(fed.nodes[REGION].config))
    assert isinstance(region, RegionalAggregator)
    guard = ModelVersionGuard(40, model_floor_digest(region, 40))
    guard.check(40, tensors_digest(back.current_model()[1]))
    # Reseeding a root that holds that version already is refused.
    assert main([*argv, str(region_dir)]) == 2
    assert "nothing to reseed" in capsys.readouterr().err


def test_a_model_the_root_did_not_sign_is_refused(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    good = signed_model(fed, 12, shift=0.5)
    forged = dataclasses.replace(good, weights={k: v * 2 for k, v in good.weights.items()})
    region_holds(fed, forged)
    argv = ["state", "reseed", "--config", str(fed.nodes[ROOT_ID].config), "--from"]
    assert main([*argv, str(fed.nodes[REGION].state_dir)]) == 2
    err = capsys.readouterr().err
    assert "does not carry" in err and "signature" in err and len(err.splitlines()) == 1
    assert load_node(load_config(fed.nodes[ROOT_ID].config)).current_model()[0] == 0  # type: ignore[attr-defined]


def test_a_backup_of_the_root_restores_it_whole_and_resumes_above_its_children(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root_cfg = load_config(fed.nodes[ROOT_ID].config)
    d = open_daemon(root_cfg)
    try:
        assert isinstance(d.node, FedBuffAggregator)
        d.node.handle(Received(REGION, Hello(REGION, "region")), 0.0)
        for seq in range(1, 4):  # buffer_size forwards: a few versions
            u = Update(REGION, seq, d.node.version, forward(d.node, 0).delta, 20, count=1)
            out = d.node.handle(Received(REGION, u), float(seq))
            d.store.apply_many([e for e in out if isinstance(e, Persist)])
        held = d.node.version
        weights = d.node.current_model()[1]
    finally:
        d.close()
    assert held >= 1
    backup = tmp_path / "backup"
    backup.mkdir()
    for f in root_cfg.state_dir.iterdir():
        if f.is_file() and f.name != "lock":
            (backup / f.name).write_bytes(f.read_bytes())
    for f in root_cfg.state_dir.iterdir():  # the disk is lost
        f.unlink()
    argv = ["state", "reseed", "--config", str(fed.nodes[ROOT_ID].config)]
    assert main([*argv, "--from", str(backup)]) == 2  # --from takes regions only
    assert "--backup" in capsys.readouterr().err
    assert main([*argv, "--backup", str(backup), "--above", str(held + 4)]) == 0
    back = load_node(root_cfg)
    assert isinstance(back, FedBuffAggregator) and back.version == held + 5
    for k, v in weights.items():
        np.testing.assert_array_equal(back.current_model()[1][k], v)
    dup = back.handle(Received(REGION, Update(REGION, 1, 0, forward(back, 0).delta, 20)), 9.0)
    assert back.duplicates == 1 and not [e for e in dup if isinstance(e, Persist)]
    assert back.snapshot()["pairs"]["relearned"] == []  # the backup's record is old
    with StateStore(backup) as store:  # the backup itself is left as it was
        assert store.load(repair=False).checkpoint is not None


def healthy_root(fed: Federation, forwards: int) -> int:
    """The root applies ``forwards`` forwards of the region, durably; its version."""
    d = open_daemon(load_config(fed.nodes[ROOT_ID].config))
    try:
        assert isinstance(d.node, FedBuffAggregator)
        d.node.handle(Received(REGION, Hello(REGION, "region")), 0.0)
        for seq in range(1, forwards + 1):
            u = Update(REGION, seq, d.node.version, forward(d.node, 0).delta, 20, count=1)
            out = d.node.handle(Received(REGION, u), float(seq))
            d.store.apply_many([e for e in out if isinstance(e, Persist)])
        return d.node.version
    finally:
        d.close()


def test_a_root_state_planted_in_a_region_directory_is_refused(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    root_cfg = load_config(fed.nodes[ROOT_ID].config)
    fake = load_node(root_cfg)  # a region's operator writes a "root backup" there
    snap = dict(fake.snapshot())  # type: ignore[attr-defined]
    snap["version"] = 500
    snap["weights"] = {k: np.full_like(v, 1e6) for k, v in snap["weights"].items()}
    region_dir = fed.nodes[REGION].state_dir
    region_dir.mkdir(parents=True, exist_ok=True)
    with StateStore(region_dir) as store:
        store.load()
        store.apply(Persist("checkpoint", snap))
    argv = ["state", "reseed", "--config", str(fed.nodes[ROOT_ID].config)]
    assert main([*argv, "--from", str(region_dir)]) == 2
    err = capsys.readouterr().err
    assert "holds a root's state" in err and len(err.splitlines()) == 1
    assert load_node(root_cfg).current_model()[0] == 0  # type: ignore[attr-defined]


def test_a_healthy_root_is_not_reseeded_far_above_its_signed_models_without_force(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    held = healthy_root(fed, 5)
    region_holds(fed, signed_model(fed, held + 1, shift=0.25))
    argv = ["state", "reseed", "--config", str(fed.nodes[ROOT_ID].config)]
    argv += ["--from", str(fed.nodes[REGION].state_dir), "--above", str(10**15)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "intact" in err and len(err.splitlines()) == 1
    back = load_node(load_config(fed.nodes[ROOT_ID].config))
    assert isinstance(back, FedBuffAggregator) and back.version == held
    assert back._ledger.seen(REGION, 5)  # its ledger is still there
    assert main([*argv, "--force"]) == 0  # the operator insists
    back = load_node(load_config(fed.nodes[ROOT_ID].config))
    assert back.current_model()[0] == 10**15 + 1  # type: ignore[attr-defined]


def test_a_damaged_root_state_is_refused_in_one_line_naming_the_file(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    region_holds(fed, signed_model(fed, 40, shift=0.25))
    root_cfg = load_config(fed.nodes[ROOT_ID].config)
    healthy_root(fed, 1)
    ckpt = root_cfg.state_dir / "checkpoint.ckpt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xff" * 16
    ckpt.write_bytes(bytes(data))
    argv = ["state", "reseed", "--config", str(fed.nodes[ROOT_ID].config)]
    assert main([*argv, "--from", str(fed.nodes[REGION].state_dir)]) == 65
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(ckpt) in err and "offset" in err and "aside" in err
