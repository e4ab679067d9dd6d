"""Secure aggregation on a FedAvg root with real daemons: a root and 3 sites (``fedloom
run`` processes on loopback, the encrypted channel, end-to-end signing), all with
``[secure_aggregation]``. Every round is one cohort: the root publishes versions from
cohort sums only, and no site update arrives plain. Bounded (``pytest.mark.timeout``);
every process is stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.test_secagg_daemons import run_secure_star

pytestmark = pytest.mark.timeout(120)


def test_fedavg_root_and_three_secure_sites_close_rounds_on_cohort_sums(tmp_path: Path) -> None:
    log, site_logs = run_secure_star(
        tmp_path,
        {
            "algorithm": "fedavg",
            "clients_per_round": 3,
            "over_selection": 1.0,
            "round_timeout_s": 30.0,
        },
        "the fedavg root to close 3 rounds on secure cohorts",
    )
    assert log.count("secure cohort applied") >= 3
    assert "plain_update" not in log
    assert "round abandoned" not in log
    for text in site_logs.values():
        assert "masked update uploaded" in text
        assert "Traceback" not in text
