"""Lying sites against a real root: a root, a region and three sites served in process
(``open_daemon`` + ``serve``) over real WebSockets on loopback. Two sites report a finite
loss near float max (their mean overflowed to inf, and writing it ended the root's
``serve()``): the root refuses them, keeps serving and publishes the honest site's."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import fedloom.runtime.reports as reports_mod
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import open_daemon, serve
from fedloom.runtime.federation_files import ROOT_ID, write_federation

pytestmark = pytest.mark.timeout(90)

SITES = ["site-1", "site-2", "site-3"]
FAST = {"keepalive_s": 1.0, "down_after_s": 5.0, "backoff_base_s": 0.05, "backoff_cap_s": 0.3}


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
async def test_lying_sites_do_not_end_the_root(
    tmp_path: Path, monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    honest = reports_mod.clean_metrics
    lies = [0]
    lock = threading.Lock()

    def lying_first_two(result: Any) -> dict[str, float]:
        with lock:  # the sites evaluate in threads
            lies[0] += 1
            if lies[0] <= 2:
                return {"loss": 1.7e308, "accuracy": 0.5}  # finite, but no model's loss
        return honest(result)

    monkeypatch.setattr(reports_mod, "clean_metrics", lying_first_two)
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": SITES},
        plan={"dataset": "synthetic", "model": "softmax"},
        root_aggregation={"buffer_size": 1},
        region_aggregation={"buffer_size": 1, "concurrency": 4},
        connection=FAST,
    )
    root = fed.nodes[ROOT_ID]
    edit_toml(root.config, evaluation={"every": 1000, "min_sites": 1})
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
            "the honest site's evaluation published",
            lambda: (v := read(root.state_dir / "evaluation.json")) and v["published"] and v,
        )
        await until(
            "the two lying reports refused",
            lambda: sum("eval report rejected" in r.getMessage() for r in caplog.records) >= 2,
        )
        await asyncio.sleep(0.5)  # whatever the root does next, it does it still serving
        assert lies[0] >= 3 and not tasks[0].done()
    finally:
        shutdown.set()
        await asyncio.wait(tasks, timeout=20)
        for d in daemons:
            d.close()
    (bucket,) = evaluation["published"]
    assert bucket["sites"] == 1 and 0 < bucket["loss"] <= reports_mod.MAX_LOSS
    for t in tasks:
        assert t.done() and t.exception() is None
