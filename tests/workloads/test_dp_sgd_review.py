"""DP review of issue 12, DP-SGD side: what leaves a DP-SGD site (no un-noised training
loss on the wire), and the bounds on z and δ."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

from fedloom.algorithms.protocol import Send, TrainDone
from fedloom.algorithms.site import SiteNode
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.runtime.trainer import SitePlan
from fedloom.transport import wire
from fedloom.transport.wire import TrainRequest
from fedloom.workloads.dp_sgd import (
    DpSgdConfig,
    LedgerTrainer,
    PrivacyLedger,
    _epsilon,
    read_dp_sgd,
)
from fedloom.workloads.workload import from_config
from tests.algorithms.alg_helpers import recv

SPEC = {"dataset": "synthetic", "model": "mlp", "hidden": 4, "samples_per_site": 60}
# Values that are functions of public quantities only (the record count is public).
PUBLIC = {"dp_sample_rate", "dp_epsilon"}


def test_a_dp_sgd_update_carries_no_unnoised_training_loss() -> None:
    """The review's attack: the site's Update carried the mean loss over its private
    batches, which one record moves arbitrarily. Now only public values leave the site,
    on the wire to its aggregator."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = DpSgdConfig(5.0, 1.0, epsilon_budget=50.0, deterministic=True)
        wl = from_config(SPEC, n_sites=2, seed=0, dp_sgd=dp)
        plan = SitePlan(wl, 0)
        w = plan.init(0)
        cfg = {"lr": 0.05, "local_steps": 5, "batch_size": 4, "mu": 0.0, "seed": 7}
        site = SiteNode("s0", "root", n_examples=54)
        out = site.handle(recv("root", TrainRequest(1, 0, w, cfg)), 0.0)
        (train,) = [e for e in out if type(e).__name__ == "Train"]
        result = plan.train(w, train.config)
        out = site.handle(TrainDone(train.job, result), 1.0)
    (upd,) = [e.msg for e in out if isinstance(e, Send) and isinstance(e.msg, wire.Update)]
    back = wire.decode(wire.encode(upd))
    assert isinstance(back, wire.Update)
    assert set(back.metrics) <= PUBLIC and "dp_sample_rate" in back.metrics
    assert "train_loss" not in result.metrics


def table(**fields: Any) -> Table:
    return Table({"noise_multiplier": 1.0, "max_grad_norm": 1.0, **fields}, "dp_sgd")


@pytest.mark.parametrize("z", [1e-300, 0.05, 2e4, 1e300])
def test_dp_sgd_refuses_a_noise_multiplier_outside_the_bounds(z: float) -> None:
    with pytest.raises(ConfigError, match=r"dp_sgd\.noise_multiplier"):
        read_dp_sgd(table(noise_multiplier=z))


@pytest.mark.parametrize("delta", [0.002, 0.5, 0.99])
def test_dp_sgd_refuses_a_large_delta(delta: float) -> None:
    with pytest.raises(ConfigError, match=r"dp_sgd\.delta"):
        read_dp_sgd(table(delta=delta))
    with pytest.raises(ValueError, match=r"dp_sgd\.delta"):
        DpSgdConfig(1.0, 1.0, delta=delta)


def test_a_site_refuses_a_delta_not_below_one_over_its_records() -> None:
    dp = DpSgdConfig(1.0, 1.0, delta=1e-3)
    with pytest.raises(ConfigError, match="not below 1/n for this site's 1000 records"):
        LedgerTrainer(lambda *a: None, PrivacyLedger(dp), n_train=1000)  # type: ignore[arg-type]
    LedgerTrainer(lambda *a: None, PrivacyLedger(dp), n_train=999)  # type: ignore[arg-type]


def test_a_site_ledger_refuses_z_outside_the_bounds() -> None:
    for z in (1e-300, 1e-9, 1e300):
        with pytest.raises(ValueError, match="a ledger accounts for z in"):
            PrivacyLedger(DpSgdConfig(z, 1.0, epsilon_budget=8.0))


def test_a_persisted_ledger_with_z_out_of_bounds_is_damaged_not_a_crash() -> None:
    good = {"format": 1, "history": [[1.0, 0.05, 100]]}
    assert PrivacyLedger.parse(good) == [(1.0, 0.05, 100)]
    for z in (1e-300, 1e300):
        with pytest.raises(ValueError, match="bad entry"):
            PrivacyLedger.parse({**good, "history": [[z, 1.0, 1]]})


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_epsilon_is_never_negative() -> None:
    assert _epsilon([(1.0, 0.05, 1000)], 0.9) >= 0.0
    assert _epsilon([(1e4, 0.01, 1)], 1e-3) >= 0.0
