"""``fedloom privacy`` on odd state directories (DP review of issue 12): a damaged
checkpoint is named as such, ``--delta`` out of (0, 1) says so, a site ledger's budget
written as a whole number is read as a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.dp.release import PrivacyConfig
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Persist, Received
from fedloom.cli import main
from fedloom.federation.store import StateStore
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import load_node, open_daemon
from fedloom.runtime.federation_files import ROOT_ID, write_federation
from fedloom.transport.wire import Hello, Update
from fedloom.workloads.dp_sgd import LEDGER_KEY
from tests.algorithms.alg_helpers import requests
from tests.runtime.test_e2e import SYNTHETIC
from tests.runtime.test_privacy_cli import DELTA, run_root
from tests.runtime.test_secagg_daemons import SITES, edit


def test_a_damaged_checkpoint_is_named_not_called_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_root(tmp_path, PrivacyConfig("central", 1.0, 1.0, DELTA), updates=4)
    ckpt = tmp_path / "checkpoint.ckpt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    assert main(["privacy", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"damaged checkpoint: {ckpt}: " in err[0] and "no checkpoint" not in err[0]


@pytest.mark.parametrize("delta", ["0", "2", "1", "nan"])
def test_delta_out_of_range_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], delta: str
) -> None:
    run_root(tmp_path, PrivacyConfig("central", 1.0, 1.0, DELTA), updates=4)
    assert main(["privacy", str(tmp_path), "--delta", delta]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--delta: expected a number in (0, 1)" in err[0]


def test_a_site_ledgers_whole_number_budget_is_a_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    value = {
        "format": 1,
        "history": [[1.0, 0.05, 100]],
        "delta": 1e-5,
        "epsilon_budget": 8,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
    }
    with StateStore(tmp_path) as store:
        store.load()
        store.apply(Persist(LEDGER_KEY, value))
    assert main(["privacy", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "budget: 8 (" in out and "none" not in out


def test_reseed_refuses_to_lift_a_private_root_above_its_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedloom state reseed --above` on a root with [privacy] would publish versions no
    ledger accounts for: refused before anything is written; a reseed from the root's own
    backup at its version keeps the ledger whole."""
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": SITES},
        plan=SYNTHETIC,
        root_aggregation={"buffer_size": 1, "concurrency": 3, "weighting": "uniform"},
    )
    root = fed.nodes[ROOT_ID]
    privacy = {"mechanism": "central", "noise_multiplier": 1.0, "clip": 1.0}
    edit(root.config, children=SITES, privacy=privacy)
    cfg = load_config(root.config)
    d = open_daemon(cfg)
    try:
        node = d.node
        assert isinstance(node, FedBuffAggregator)
        out: list[Any] = []
        for s in SITES:
            out += node.handle(Received(s, Hello(s, "site")), 0.0)
        d.store.apply_many([e for e in out if isinstance(e, Persist)])
        for seq, (site, req) in enumerate(requests(out), 1):
            delta = {k: np.full_like(v, 0.01) for k, v in node.current_model()[1].items()}
            upd = Update(site, seq, req.version, delta, 10, 1, req.task)
            got = node.handle(Received(site, upd), float(seq))
            d.store.apply_many([e for e in got if isinstance(e, Persist)])
        held = node.version
        releases = [r.version for r in node._dp.ledger.releases]  # type: ignore[union-attr]
        d.store.apply(Persist("checkpoint", node.snapshot()))
    finally:
        d.close()
    assert held == 3 and releases == [1, 2, 3]
    backup = tmp_path / "backup"
    backup.mkdir()
    for f in cfg.state_dir.iterdir():
        if f.is_file() and f.name != "lock":
            (backup / f.name).write_bytes(f.read_bytes())
    for f in cfg.state_dir.iterdir():  # the disk is lost
        f.unlink()
    argv = ["state", "reseed", "--config", str(root.config), "--backup", str(backup)]
    assert main([*argv, "--above", str(held + 4)]) == 2
    err = capsys.readouterr().err
    assert "runs with [privacy]" in err and "ends at version 3" in err
    assert not any(cfg.state_dir.glob("*.ckpt"))  # nothing written
    assert main(argv) == 0  # its own version: the ledger is whole
    back = load_node(cfg)
    assert isinstance(back, FedBuffAggregator) and back.version == held
    assert [r.version for r in back._dp.ledger.releases] == releases  # type: ignore[union-attr]
