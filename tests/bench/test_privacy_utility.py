"""bench/privacy_utility.py's parts that need no full run: the noise calibration (the
ledger spends the target ε over the planned jobs at the calibration site's rate), and the
figure line."""

from __future__ import annotations

from types import ModuleType

import pytest

from fedloom.workloads.dp_sgd import DpJob, DpSgdConfig, PrivacyBudgetExhaustedError, PrivacyLedger
from tests.bench.loader import load_bench

pytest.importorskip("opacus")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("privacy_utility")


@pytest.mark.parametrize("eps", [1.0, 8.0])
def test_the_calibrated_noise_spends_the_target_over_the_planned_jobs(
    bench: ModuleType, eps: float
) -> None:
    raw = bench._demo_raw()
    z, q = bench.calibrate(eps, raw)
    assert q == 1 / 5  # the demo's third-largest hospital: 66 examples, batch 16
    steps = raw["training"]["local_steps"]
    ledger = PrivacyLedger(DpSgdConfig(z, 1.0, bench.DELTA, eps))
    for _ in range(bench.PLANNED_JOBS):
        ledger.admit(DpJob(z, q, steps))  # never refused within the plan
        ledger.record(DpJob(z, q, steps))
    assert eps * 0.98 <= ledger.epsilon <= eps
    with pytest.raises(PrivacyBudgetExhaustedError, match="privacy budget exhausted"):
        ledger.admit(DpJob(z, q, steps))


def test_the_figure_line_reports_the_gap_at_eps_8(bench: ModuleType) -> None:
    rows = [
        bench.Row("none", None, None, (0.95, 0.96, 0.97), None, 100, 1.0),
        bench.Row("record-level DP-SGD", 8.0, 2.0, (0.90, 0.93, 0.94), 8.0, 50, 1.0),
        bench.Row("record-level DP-SGD", 1.0, 9.0, (0.80, 0.81, 0.82), 1.0, 50, 1.0),
    ]
    assert bench.figure_line(rows) == (
        "privacy_utility: record-level eps=8 accuracy 0.930 vs non-private 0.960: "
        "gap 3.0 points [goal <= 3]"
    )
