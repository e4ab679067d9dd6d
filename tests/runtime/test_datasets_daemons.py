"""The tabular plan with real daemons: a FedBuff root and 2 sites (``fedloom run``
processes on loopback), each site training on its own registered CSV. Revoking one site's
dataset with ``fedloom dataset revoke`` while it runs stops its training at the next job:
the root counts its ``dataset_revoked`` refusals, and the other site trains on. Bounded;
every process is stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedloom.cli import main
from fedloom.runtime.datasets import DatasetRegistry
from fedloom.runtime.federation_files import ROOT_ID, write_federation
from fedloom.runtime.harness import Cluster
from tests.runtime.test_e2e import SYNTHETIC, applied, check_clean_exit, metric, wait_for
from tests.runtime.test_secagg_daemons import edit

pytestmark = pytest.mark.timeout(120)

SITES = ["site-1", "site-2"]
PLAN = {
    "kind": "tabular",
    "dataset_tag": "heart",
    "features": ["age", "chol", "sex"],
    "label": "outcome",
    "classes": ["well", "sick"],
    "categories": {"sex": ["F", "M"]},
}


def write_table(path: Path, seed: int, age: float) -> Path:
    rng = np.random.default_rng(seed)
    a = rng.normal(age, 10, 120)
    c = rng.normal(200, 40, 120)
    sex = rng.choice(["F", "M"], 120)
    sick = (a - age) / 10 + (c - 200) / 40 + (sex == "M") > 0.5
    pd.DataFrame(
        {
            "age": a.round(1),
            "chol": c.round(1),
            "sex": sex,
            "outcome": np.where(sick, "sick", "well"),
        }
    ).to_csv(path, index=False)
    return path


def refusals(node: object, code: str, site: str) -> float:
    return metric(node, "fedloom_node_site_refusals_total", code=code, site=site)  # type: ignore[arg-type]


def test_revoking_a_dataset_stops_that_site_at_its_next_job(tmp_path: Path) -> None:
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": SITES},
        plan=SYNTHETIC,
        training={"lr": 0.1, "local_steps": 5, "batch_size": 8, "mu": 0.0},
        # The scaler's raw moments must not be clipped (workloads.tabular).
        root_aggregation={"buffer_size": 1, "concurrency": 2, "clip_norm": "off"},
        declare_examples=False,
    )
    root = fed.nodes[ROOT_ID]
    edit(root.config, children=SITES, plan=PLAN)
    for i, s in enumerate(SITES):
        node = fed.nodes[s]
        edit(
            node.config,
            parent={"id": ROOT_ID, "url": f"ws://127.0.0.1:{root.listen_port}/fedloom"},
            plan=PLAN,
            governance={"require_approval": False},
        )
        csv = write_table(tmp_path / f"{s}.csv", seed=i, age=50 + 20 * i)
        DatasetRegistry(node.state_dir).add(
            csv, name=f"cohort-{s}", tags=["heart"], label="outcome"
        )
    del fed.nodes["region-a"]
    with Cluster(fed) as cluster:
        cluster.start()
        for s in SITES:
            wait_for(
                f"the root to apply an update of {s}", lambda s=s: applied(root, s) >= 2, timeout=60
            )
        rc = main(
            [
                "dataset",
                "revoke",
                "cohort-site-1",
                "--state-dir",
                str(fed.nodes["site-1"].state_dir),
            ]
        )
        assert rc == 0
        wait_for(
            "the root to count site-1's dataset_revoked refusal",
            lambda: refusals(root, "dataset_revoked", "site-1") >= 1,
            timeout=60,
        )
        stopped_at = applied(root, "site-1")
        still = applied(root, "site-2")
        wait_for("site-2 to train on", lambda: applied(root, "site-2") >= still + 2, timeout=60)
        # At most the job already running when the revocation landed was applied after it.
        assert applied(root, "site-1") <= stopped_at + 1
        assert refusals(root, "dataset_revoked", "site-2") == 0
        check_clean_exit(cluster)
    log = fed.nodes["site-1"].log.read_text()
    assert "Traceback" not in log


BLOCK = """\
import sys
sys.modules["pandas"] = None  # import raises ModuleNotFoundError, as on a base install
from fedloom.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(60)
def test_a_tabular_site_without_the_extra_stops_at_start_naming_it(tmp_path: Path) -> None:
    fed = write_federation(
        tmp_path / "fed", {"region-a": SITES}, plan=SYNTHETIC, declare_examples=False
    )
    site = fed.nodes["site-1"]
    edit(site.config, plan=PLAN, governance={"require_approval": False})
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK, "run", "--config", str(site.config)],
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "fedloom: error: this command needs 'pandas', which the 'tabular' extra installs: "
        "pip install 'fedloom[tabular]'"
    )
    assert "Traceback" not in proc.stderr
