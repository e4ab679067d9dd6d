"""Federated evaluation and statistics end to end: a root, a region and three sites served
in process (``open_daemon`` + ``serve``) over real WebSockets and encrypted channels on
loopback. The root publishes a federated evaluation of its first models and the answer to
one statistics query over the sites' registered CSV files, and nothing else."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tomli_w

from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import open_daemon, serve
from fedloom.runtime.datasets import DatasetRegistry
from fedloom.runtime.federation_files import ROOT_ID, write_federation

pytestmark = pytest.mark.timeout(90)

SITES = ["site-1", "site-2", "site-3"]
FAST = {"keepalive_s": 1.0, "down_after_s": 5.0, "backoff_base_s": 0.05, "backoff_cap_s": 0.3}
QUERY = {
    "name": "vitals",
    "dataset_tag": "cohort",
    "columns": ["age"],
    "bins": {"age": [0, 40, 80]},
    "bounds": {"age": [0, 100]},
    "min_cell": 5,
}


def edit_toml(path: Path, **tables: Any) -> None:
    raw = tomllib.loads(path.read_text())
    raw.update(tables)
    path.write_text(tomli_w.dumps(raw))


async def until(what: str, check: Any, timeout: float = 45.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := check()):
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)
    return value


def read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.timeout(90)
async def test_a_federation_publishes_its_evaluation_and_one_query(tmp_path: Path) -> None:
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": SITES},
        plan={"dataset": "synthetic", "model": "softmax"},
        root_aggregation={"buffer_size": 1},
        region_aggregation={"buffer_size": 1, "concurrency": 4},
        connection=FAST,
    )
    root = fed.nodes[ROOT_ID]
    # Every site evaluates the first model it gets: all three land in bucket 0.
    edit_toml(root.config, evaluation={"every": 1000, "min_sites": 3}, analytics=[QUERY])
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
        edit_toml(
            fed.nodes[site].config,
            governance={"require_approval": False, "statistics_tags": ["cohort"]},
        )

    daemons = [open_daemon(load_config(fed.nodes[n].config)) for n in [ROOT_ID, "region-a", *SITES]]
    shutdown = asyncio.Event()
    tasks = [
        asyncio.create_task(
            serve(d, eval_interval_s=0, ready_wait_s=0.1, install_signals=False, shutdown=shutdown)
        )
        for d in daemons
    ]
    try:
        evaluation = await until(
            "a published federated evaluation",
            lambda: (v := read(root.state_dir / "evaluation.json")) and v["published"] and v,
        )
        stats = await until(
            "the published query", lambda: read(root.state_dir / "analytics" / "vitals.json")
        )
        assert not any(t.done() for t in tasks)
    finally:
        shutdown.set()
        await asyncio.wait(tasks, timeout=20)
        for d in daemons:
            d.close()
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
    for t in tasks:
        assert t.done() and t.exception() is None
