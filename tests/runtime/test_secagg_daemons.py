"""Secure aggregation end to end with real daemons: a root and 3 sites (``fedloom run``
processes on loopback, the encrypted channel, end-to-end signing), all with
``[secure_aggregation]``. The root's model advances on cohort sums only: its log names
the cohorts, each site's update is applied through them, and no site update arrives
plain. Bounded (``pytest.mark.timeout``); every process is stopped."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w

from fedloom.runtime.federation_files import ROOT_ID, write_federation
from fedloom.runtime.harness import Cluster
from tests.runtime.test_e2e import SYNTHETIC, applied, check_clean_exit, metric, wait_for

pytestmark = pytest.mark.timeout(120)

SITES = ["site-1", "site-2", "site-3"]
SECURE = {
    "enabled": True,
    "min_cohort": 2,  # 3 members: t = 2, one may drop
    "max_colluders": 0,  # a bare majority (the collusion bound has its own tests)
    "clip": 2.0,
    "form_wait_s": 2.0,
    "upload_timeout_s": 10.0,
    "unmask_timeout_s": 10.0,
}


def edit(path: Path, **changes: object) -> None:
    cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    cfg.update(changes)
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")


def run_secure_star(
    tmp_path: Path, root_aggregation: dict[str, object], waiting_for: str
) -> tuple[str, dict[str, str]]:
    """Run a root and the 3 sites, all secure, until the root published version 3; every
    site's updates must have entered through a cohort and every process exit cleanly.
    Returns the root's log and each site's."""
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": SITES},
        plan=SYNTHETIC,
        root_aggregation=root_aggregation,
        site_metrics=True,
    )
    # A star: the sites dial the root directly; the region is not run.
    root = fed.nodes[ROOT_ID]
    edit(root.config, children=SITES, secure_aggregation=SECURE)
    for s in SITES:
        edit(
            fed.nodes[s].config,
            parent={"id": ROOT_ID, "url": f"ws://127.0.0.1:{root.listen_port}/fedloom"},
            secure_aggregation=SECURE,
        )
    del fed.nodes["region-a"]
    algorithm = root_aggregation.get("algorithm")
    if algorithm is not None:
        cfg = tomllib.loads(root.config.read_text(encoding="utf-8"))
        assert cfg["aggregation"]["algorithm"] == algorithm
    with Cluster(fed) as cluster:
        cluster.start()
        wait_for(
            waiting_for,
            lambda: metric(root, "fedloom_model_version") >= 3,
            timeout=90,
            every=0.25,
        )
        assert not cluster.dead()
        for s in SITES:
            assert applied(root, s) >= 1  # every site's updates entered through a cohort
        check_clean_exit(cluster)
    return cluster[ROOT_ID].log_text(), {s: cluster[s].log_text() for s in SITES}


def test_root_and_three_secure_sites_train_on_cohort_sums(tmp_path: Path) -> None:
    log, site_logs = run_secure_star(
        tmp_path,
        {"buffer_size": 3, "weighting": "uniform"},
        "the root to publish version 3 from secure cohorts",
    )
    assert log.count("secure cohort applied") >= 3
    assert "plain_update" not in log
    for text in site_logs.values():
        assert "masked update uploaded" in text
        assert "Traceback" not in text
