"""Record-level DP-SGD with real daemons: a FedBuff root and 2 sites with ``[dp_sgd]``
(``fedloom run`` processes on loopback). Each site trains until its next job would pass
its budget, then refuses (TrainFailed "privacy budget exhausted", no traceback), shows ε on
/metrics, restores the same ε from its state dir after a restart, and ``fedloom privacy``
reads its ledger. Bounded; every process is stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedloom.cli import main
from fedloom.runtime.federation_files import ROOT_ID, write_federation
from fedloom.runtime.harness import Cluster
from tests.runtime.test_e2e import check_clean_exit, metric, wait_for
from tests.runtime.test_secagg_daemons import edit

pytest.importorskip("opacus")
pytestmark = pytest.mark.timeout(150)

SITES = ["site-1", "site-2"]
PLAN = {"dataset": "synthetic", "model": "mlp", "hidden": 4, "samples_per_site": 60}
# 5 steps at q ≈ 1/12 a job, z = 1: ε ≈ 2.6, 3.0, 3.4, ... a budget of 3.2 allows 2 jobs.
TRAINING = {"lr": 0.05, "local_steps": 5, "batch_size": 4, "mu": 0.0}
DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "epsilon_budget": 3.2}


def test_sites_stop_at_their_budget_and_stay_stopped_after_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": SITES},
        plan=PLAN,
        training=TRAINING,
        root_aggregation={"buffer_size": 1, "concurrency": 2},
        site_metrics=True,
    )
    root = fed.nodes[ROOT_ID]
    edit(root.config, children=SITES)
    for s in SITES:
        edit(
            fed.nodes[s].config,
            parent={"id": ROOT_ID, "url": f"ws://127.0.0.1:{root.listen_port}/fedloom"},
            dp_sgd=DP,
        )
    del fed.nodes["region-a"]
    with Cluster(fed) as cluster:
        cluster.start()
        for s in SITES:
            wait_for(
                f"{s} to refuse a job over its budget",
                lambda s=s: metric(fed.nodes[s], "fedloom_privacy_budget_refusals_total") >= 1,
                timeout=90,
                every=0.25,
            )
        spent = {s: metric(fed.nodes[s], "fedloom_site_privacy_epsilon") for s in SITES}
        assert all(0 < e <= DP["epsilon_budget"] for e in spent.values())
        versions = metric(root, "fedloom_model_version")
        assert versions >= 2  # the sites' jobs within the budget were applied
        assert not cluster.dead()

        # A restarted site restores its ledger from its state dir: same ε, still refusing.
        check_clean_exit(cluster, ["site-1"])
        cluster.start(["site-1"])
        site = fed.nodes["site-1"]
        wait_for(
            "the restarted site to report its ledger",
            lambda: metric(site, "fedloom_site_privacy_epsilon") > 0,
            timeout=30,
            every=0.25,
        )
        assert metric(site, "fedloom_site_privacy_epsilon") == pytest.approx(spent["site-1"])
        # The root hands the reconnected site a task at once: it refuses it (a counter of
        # the new process) and its ε stays where it was.
        wait_for(
            "the restarted site to refuse a job",
            lambda: metric(site, "fedloom_privacy_budget_refusals_total") >= 1,
            timeout=30,
            every=0.1,
        )
        assert metric(site, "fedloom_site_privacy_epsilon") == pytest.approx(spent["site-1"])
        check_clean_exit(cluster)
    for s in SITES:
        text = cluster[s].log_text()
        assert "privacy budget exhausted" in text
        assert "Traceback" not in text
    assert main(["privacy", str(fed.nodes["site-1"].state_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mechanism"] == "dp_sgd"
    assert report["epsilon"] == pytest.approx(spent["site-1"], rel=1e-9)
    assert report["epsilon_budget"] == DP["epsilon_budget"]
