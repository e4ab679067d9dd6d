"""Federated evaluation and statistics end to end: a root, a region and three sites served
in process (``open_daemon`` + ``serve``) over real WebSockets and encrypted channels on
loopback. The root publishes a federated evaluation of its first models and the answer to
one statistics query over the sites' registered CSV files, and nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedloom.runtime.datasets import DatasetRegistry
from fedloom.runtime.federation_files import ROOT_ID
from tests.runtime.daemon_nets import edit, read_json, region_federation, serving, until

pytestmark = pytest.mark.timeout(90)

SITES = ["site-1", "site-2", "site-3"]
QUERY = {
    "name": "vitals",
    "dataset_tag": "cohort",
    "columns": ["age"],
    "bins": {"age": [0, 40, 80]},
    "bounds": {"age": [0, 100]},
    "min_cell": 5,
}


@pytest.mark.timeout(90)
async def test_a_federation_publishes_its_evaluation_and_one_query(tmp_path: Path) -> None:
    fed = region_federation(tmp_path, SITES)
    root = fed.nodes[ROOT_ID]
    # Every site evaluates the first model it gets: all three land in bucket 0.
    edit(root.config, evaluation={"every": 1000, "min_sites": 3}, analytics=[QUERY])
    # Each table has fewer rows than the examples the roster declares for its site (48 at
    # the least): the root bounds a site's n by that declaration.
    ages: dict[str, np.ndarray[Any, Any]] = {}
    for i, site in enumerate(SITES):
        state = fed.nodes[site].state_dir
        state.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        ages[site] = rng.uniform(20, 75, 30 + 5 * i).round(1)
        csv = tmp_path / f"{site}.csv"
        pd.DataFrame({"age": ages[site], "outcome": rng.integers(0, 2, len(ages[site]))}).to_csv(
            csv, index=False
        )
        DatasetRegistry(state).add(csv, name="patients", tags=["cohort"], label="outcome")
        # The plan is not a tabular one over "cohort": the site allows queries over it.
        edit(
            fed.nodes[site].config,
            governance={"require_approval": False, "statistics_tags": ["cohort"]},
        )

    async with serving(fed, eval_interval_s=0, ready_wait_s=0.1):
        evaluation = await until(
            "a published federated evaluation",
            lambda: (v := read_json(root.state_dir / "evaluation.json")) and v["published"] and v,
        )
        stats = await until(
            "the published query", lambda: read_json(root.state_dir / "analytics" / "vitals.json")
        )
    (bucket,) = evaluation["published"]
    assert bucket["version"] == 0 and bucket["sites"] == 3
    assert 0.0 <= bucket["accuracy"] <= 1.0 and bucket["loss"] > 0
    pooled = np.concatenate(list(ages.values()))
    assert stats["sites"] == 3 and stats["n"] == len(pooled)
    age = stats["columns"]["age"]
    assert age["mean"] == pytest.approx(pooled.mean()) and age["std"] == pytest.approx(pooled.std())
    assert age["histogram"]["counts"] == [int((pooled < 40).sum()), int((pooled >= 40).sum())]
    # What is public holds no site's own figures.
    for text in ((root.state_dir / "evaluation.json").read_text(), json.dumps(stats)):
        assert not any(site in text for site in SITES)
