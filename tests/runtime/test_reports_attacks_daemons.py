"""Lying sites against a real root: a root, a region and three sites served in process
(``open_daemon`` + ``serve``) over real WebSockets on loopback. Two sites report a finite
loss near float max (their mean overflowed to inf, and writing it ended the root's
``serve()``): the root refuses them, keeps serving and publishes the honest site's."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

import fedloom.runtime.reports as reports_mod
from fedloom.runtime.federation_files import ROOT_ID
from tests.runtime.daemon_nets import edit, read_json, region_federation, serving, until

pytestmark = pytest.mark.timeout(90)

SITES = ["site-1", "site-2", "site-3"]


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
    fed = region_federation(tmp_path, SITES)
    root = fed.nodes[ROOT_ID]
    edit(root.config, evaluation={"every": 1000, "min_sites": 1})
    async with serving(fed, eval_interval_s=0, ready_wait_s=0.1):
        evaluation = await until(
            "the honest site's evaluation published",
            lambda: (v := read_json(root.state_dir / "evaluation.json")) and v["published"] and v,
        )
        await until(
            "the two lying reports refused",
            lambda: sum("eval report rejected" in r.getMessage() for r in caplog.records) >= 2,
        )
        await asyncio.sleep(0.5)  # whatever the root does next, it does it still serving
        assert lies[0] >= 3  # (and, as ``serving`` checks on leaving, the root serves)
    (bucket,) = evaluation["published"]
    assert bucket["sites"] == 1 and 0 < bucket["loss"] <= reports_mod.MAX_LOSS
