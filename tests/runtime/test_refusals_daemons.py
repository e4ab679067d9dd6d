"""A plan that fails on every job is an error the root sees (issue 14), with real daemons:
a root and 3 sites (``fedloom run`` processes on loopback, the encrypted channel), every
one running a Flower client through ``[plan] factory = "...:client_fn"`` exactly as Flower's
quickstart writes it (tests/runtime/test_flower.py). site-3's client reads a config key no
server sends, so every job of it fails: the root logs ONE warning naming site-3, /metrics
counts ``site_refusals`` for it, and the federation keeps training with the two others.
Bounded (``pytest.mark.timeout``); every process is stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedloom.runtime.federation_files import ROOT_ID
from fedloom.runtime.harness import Cluster
from tests.runtime.daemon_nets import edit, flower_plan, star
from tests.runtime.test_e2e import applied, check_clean_exit, metric, wait_for

pytestmark = pytest.mark.timeout(120)

SITES = ["site-1", "site-2", "site-3"]
QUICKSTART = "tests.runtime.test_flower:client_fn"
BROKEN = "tests.runtime.test_flower:broken_client_fn"
DIVERGING = "tests.runtime.test_flower_failures:diverging_client_fn"


def refusal_warnings(log: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [
        rec for rec in lines if rec.get("level") == "warning" and "refused training" in rec["msg"]
    ]


@pytest.mark.parametrize(
    ("bad", "why"),
    [(BROKEN, "num_local_epochs"), (DIVERGING, "non-finite weights")],
    ids=["raises", "diverges"],
)
def test_a_site_whose_plan_always_fails_is_seen_by_the_root_which_trains_on(
    tmp_path: Path, bad: str, why: str
) -> None:
    """``diverges``: fit returns NaN weights. The site sends no update of them (which the
    root would refuse, closing the connection, on every resend): a refusal instead."""
    fed = star(
        tmp_path,
        SITES,
        root_aggregation={"buffer_size": 2, "concurrency": 3},
        declare_examples=False,
    )
    root = fed.nodes[ROOT_ID]
    edit(root.config, plan=flower_plan(QUICKSTART, 0))
    for i, s in enumerate(SITES):
        edit(fed.nodes[s].config, plan=flower_plan(bad if s == "site-3" else QUICKSTART, i))
    with Cluster(fed) as cluster:
        cluster.start()
        refusals = 'fedloom_node_site_refusals_total{code="failed",site="site-3"}'
        name, labels = "fedloom_node_site_refusals_total", {"code": "failed", "site": "site-3"}
        wait_for(
            f"{refusals} >= 2 and model version 5 at the root",
            lambda: (
                metric(root, name, **labels) >= 2 and metric(root, "fedloom_model_version") >= 5
            ),
            timeout=90,
            every=0.25,
        )
        assert not cluster.dead()
        assert applied(root, "site-1") >= 1 and applied(root, "site-2") >= 1
        assert applied(root, "site-3") == 0
        check_clean_exit(cluster)
    root_log = cluster[ROOT_ID].log_text()
    [warning] = refusal_warnings(root_log)  # once, however many refusals
    assert "site-3" in str(warning["msg"]) and why in str(warning["msg"])
    site_log = cluster["site-3"].log_text()
    assert why in site_log
    if bad == BROKEN:
        assert "KeyError" in site_log
    assert "closing the connection to site-3" not in root_log  # no update refused
