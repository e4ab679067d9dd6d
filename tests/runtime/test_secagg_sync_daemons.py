"""Secure aggregation on a FedAvg root with real daemons: a root and 3 sites (``fedloom
run`` processes on loopback, the encrypted channel, end-to-end signing), all with
``[secure_aggregation]``. Every round is one cohort: the root publishes versions from
cohort sums only, and no site update arrives plain. Bounded (``pytest.mark.timeout``);
every process is stopped."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedloom.runtime.federation_files import ROOT_ID, write_federation
from fedloom.runtime.harness import Cluster
from tests.runtime.test_e2e import SYNTHETIC, applied, check_clean_exit, metric, wait_for
from tests.runtime.test_secagg_daemons import SECURE, SITES, edit

pytestmark = pytest.mark.timeout(120)


def test_fedavg_root_and_three_secure_sites_close_rounds_on_cohort_sums(tmp_path: Path) -> None:
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": SITES},
        plan=SYNTHETIC,
        root_aggregation={
            "algorithm": "fedavg",
            "clients_per_round": 3,
            "over_selection": 1.0,
            "round_timeout_s": 30.0,
        },
        site_metrics=True,
    )
    root = fed.nodes[ROOT_ID]
    edit(root.config, children=SITES, secure_aggregation=SECURE)
    for s in SITES:
        edit(
            fed.nodes[s].config,
            parent={"id": ROOT_ID, "url": f"ws://127.0.0.1:{root.listen_port}/fedloom"},
            secure_aggregation=SECURE,
        )
    del fed.nodes["region-a"]
    cfg = tomllib.loads(root.config.read_text(encoding="utf-8"))
    assert cfg["aggregation"]["algorithm"] == "fedavg"
    with Cluster(fed) as cluster:
        cluster.start()
        wait_for(
            "the fedavg root to close 3 rounds on secure cohorts",
            lambda: metric(root, "fedloom_model_version") >= 3,
            timeout=90,
            every=0.25,
        )
        assert not cluster.dead()
        for s in SITES:
            assert applied(root, s) >= 1  # every site's updates entered through a cohort
        check_clean_exit(cluster)
    log = cluster[ROOT_ID].log_text()
    assert log.count("secure cohort applied") >= 3
    assert "plain_update" not in log
    assert "round abandoned" not in log
    for s in SITES:
        text = cluster[s].log_text()
        assert "masked update uploaded" in text
        assert "Traceback" not in text
