"""Central DP with real daemons: a FedBuff root with ``[privacy]`` and 3 sites (``fedloom
run`` processes on loopback). The root releases exactly the versions its budget allows,
then stops dispatching; ``fedloom privacy`` reads the ledger from its state directory; a
restarted root stays stopped with the same ε. Bounded; every process is stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedloom.algorithms.dp.ledger import PrivacyEvent, PrivacyLedger
from fedloom.cli import main
from fedloom.runtime.federation_files import ROOT_ID, write_federation
from fedloom.runtime.harness import Cluster
from tests.runtime.test_e2e import SYNTHETIC, check_clean_exit, metric, wait_for
from tests.runtime.test_secagg_daemons import SITES, edit

pytestmark = pytest.mark.timeout(150)
DELTA = 1e-5
RELEASES = 4


def test_root_stops_at_its_budget_and_stays_stopped_after_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = PrivacyLedger()
    event = PrivacyEvent(2.0)
    budget = (
        ledger.epsilon_if(event, DELTA, RELEASES) + ledger.epsilon_if(event, DELTA, RELEASES + 1)
    ) / 2
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": SITES},
        plan=SYNTHETIC,
        root_aggregation={"buffer_size": 2, "concurrency": 3, "weighting": "uniform"},
    )
    root = fed.nodes[ROOT_ID]
    privacy = {
        "mechanism": "central",
        "noise_multiplier": 2.0,
        "clip": 1.0,
        "epsilon_budget": budget,
    }
    edit(root.config, children=SITES, privacy=privacy)
    for s in SITES:
        edit(
            fed.nodes[s].config,
            parent={"id": ROOT_ID, "url": f"ws://127.0.0.1:{root.listen_port}/fedloom"},
        )
    del fed.nodes["region-a"]
    with Cluster(fed) as cluster:
        cluster.start()
        wait_for(
            "the root to spend its budget",
            lambda: metric(root, "fedloom_privacy_budget_exhausted") == 1.0,
            timeout=90,
            every=0.25,
        )
        assert metric(root, "fedloom_model_version") == RELEASES
        eps = metric(root, "fedloom_privacy_epsilon")
        assert 0 < eps <= budget
        assert metric(root, "fedloom_privacy_budget") == pytest.approx(budget)
        time.sleep(2.0)  # the sites stay up: no task, no further version
        assert metric(root, "fedloom_model_version") == RELEASES
        assert not cluster.dead()

        # The root restarted from its state: still stopped, same epsilon.
        check_clean_exit(cluster, [ROOT_ID])
        cluster.start([ROOT_ID])
        wait_for(
            "the restarted root to report its spent budget",
            lambda: metric(root, "fedloom_privacy_budget_exhausted") == 1.0,
            timeout=30,
            every=0.25,
        )
        assert metric(root, "fedloom_privacy_epsilon") == pytest.approx(eps, rel=1e-12)
        time.sleep(2.0)
        assert metric(root, "fedloom_model_version") == RELEASES
        check_clean_exit(cluster)
    text = cluster[ROOT_ID].log_text()
    assert text.count("privacy budget exhausted") == 2  # once per incarnation
    assert "Traceback" not in text

    assert main(["privacy", str(root.state_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["releases"] == RELEASES
    assert report["epsilon"] == pytest.approx(eps, rel=1e-12)
    assert report["releases_left"] == 0


BLOCK = """\
import sys
sys.modules["dp_accounting"] = None  # import raises ModuleNotFoundError: a base install
from fedloom.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_private_root_without_the_privacy_extra_stops_at_start_in_one_line(
    tmp_path: Path,
) -> None:
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": SITES},
        plan=SYNTHETIC,
        root_aggregation={"weighting": "uniform"},
    )
    root = fed.nodes[ROOT_ID]
    edit(
        root.config,
        children=SITES,
        privacy={"mechanism": "central", "noise_multiplier": 1.0, "clip": 1.0},
    )
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK, "run", "--config", str(root.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "pip install 'fedloom[privacy]'" in lines[0]
