"""Real daemons (root -> region -> site, in process on loopback, the real transport and
end-to-end signing): the site trains with the root's signed settings whatever the region's
own ``[training]`` says, and when the region starts handing out other settings (a
compromised region, made so while everything runs) the site trains nothing more and the
root learns why: ``TrainRefused(code="unsigned_settings")``, relayed by the region."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.runtime.federation_files import ROOT_ID, write_federation
from tests.runtime.daemon_nets import SYNTHETIC, edit, serving, until

pytestmark = pytest.mark.timeout(90)

ROOT_TRAINING = {"lr": 0.02, "local_steps": 2, "batch_size": 10, "mu": 0.0}
REGION_TRAINING = {"lr": 0.3, "local_steps": 7, "batch_size": 10, "mu": 0.0}


async def test_sites_train_the_roots_settings_and_refuse_a_regions_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": ["site-1"]},
        plan=SYNTHETIC,
        training=ROOT_TRAINING,
        root_aggregation={"buffer_size": 1, "concurrency": 1},
        # The region's backoff after the site's refusal: short, for the second refusal.
        region_aggregation={"buffer_size": 1, "concurrency": 1, "refusal_backoff_s": 0.5},
    )
    edit(fed.nodes["region-a"].config, training=REGION_TRAINING)
    caplog.set_level(logging.INFO)
    async with serving(fed) as daemons:
        root, region_node, site = daemons[ROOT_ID], daemons["region-a"].node, daemons["site-1"].node
        assert isinstance(region_node, RegionalAggregator) and isinstance(site, SiteNode)
        await until("the site to train twice", lambda: site.seq >= 2)
        # The region hands out the root's settings, and said its own are unused.
        assert dict(region_node._task_config()) == ROOT_TRAINING
        assert site.settings_refused == 0
        assert any("differ from the root's" in r.getMessage() for r in caplog.records)

        # The region turns hostile: its tasks now carry another lr (its sealing layer
        # still attaches the root's proof, as a relay does).
        honest = region_node._task_config
        region_node._task_config = lambda: {**honest(), "lr": 5.0}  # type: ignore[method-assign]
        await until("the site to refuse", lambda: site.settings_refused >= 1)
        trained = site.seq
        view: Callable[[], dict[str, dict[str, Any]]] = root.node.refusals_view  # type: ignore[attr-defined]
        await until("the root to learn why", lambda: "site-1" in view())
        assert view()["site-1"]["code"] == "unsigned_settings"
        await until("a second refusal", lambda: site.settings_refused >= 2)
        assert site.seq == trained  # nothing more trained
    warned = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "site-1: refused a training" in r.getMessage()
    ]
    assert len(warned) == 1  # the site's: one line a minute, however many requests
    # The region (once per version) and the root (once per site and code) say so too.
    assert any("region-a: the training config sent" in r.getMessage() for r in caplog.records)
    assert any(
        r.getMessage().startswith("root:") and "unsigned_settings" in r.getMessage()
        for r in caplog.records
    )
