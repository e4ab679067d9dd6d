"""``fedloom privacy`` on odd state directories (DP review of issue 12): a damaged
checkpoint is named as such, ``--delta`` out of (0, 1) says so, a site ledger's budget
written as a whole number is read as a budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedloom.algorithms.dp.release import PrivacyConfig
from fedloom.algorithms.protocol import Persist
from fedloom.cli import main
from fedloom.federation.store import StateStore
from fedloom.workloads.dp_sgd import LEDGER_KEY
from tests.runtime.test_privacy_cli import DELTA, run_root


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
