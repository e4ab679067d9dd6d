"""A plan that fails on every job is an error the root sees (issue 14), with real daemons:
a root and 4 sites (``fedloom run`` processes on loopback, the encrypted channel), every
one running a Flower client through ``[plan] factory = "...:client_fn"`` exactly as Flower's
quickstart writes it (tests/runtime/test_flower.py). site-3's client reads a config key no
server sends, and site-4's returns NaN weights, so every job of each fails: the root logs
ONE warning naming each of them, /metrics counts ``site_refusals`` for each, and the
federation keeps training with the two others. Bounded (``pytest.mark.timeout``); every
process is stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedloom.runtime.federation_files import ROOT_ID
from fedloom.runtime.harness import Cluster
from tests.runtime.daemon_nets import edit, flower_plan, star
from tests.runtime.test_e2e import applied, check_clean_exit, metric, wait_for

pytestmark = pytest.mark.timeout(120)

SITES = ["site-1", "site-2", "site-3", "site-4"]
QUICKSTART = "tests.runtime.test_flower:client_fn"
BROKEN = "tests.runtime.test_flower:broken_client_fn"
DIVERGING = "tests.runtime.test_flower_failures:diverging_client_fn"
# The failing sites: their plan, and what their refusals say. Both fail in one federation
# (each refusal is followed by a backoff: one run waits it out once).
BAD = {"site-3": (BROKEN, "num_local_epochs"), "site-4": (DIVERGING, "non-finite weights")}
# The root's backoff after a refusal (``[aggregation] refusal_backoff_s``, 5 s unless
# written): short, so that each failing site is handed a task again within the test.
BACKOFF_S = 0.5


def refusal_warnings(log: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [
        rec for rec in lines if rec.get("level") == "warning" and "refused training" in rec["msg"]
    ]


def test_sites_whose_plan_always_fails_are_seen_by_the_root_which_trains_on(
    tmp_path: Path,
) -> None:
    """site-3's client raises; site-4's ``fit`` returns NaN weights: the site sends no
    update of them (which the root would refuse, closing the connection, on every resend),
    a refusal instead."""
    fed = star(
        tmp_path,
        SITES,
        root_aggregation={
            "buffer_size": 2,
            "concurrency": len(SITES),
            "refusal_backoff_s": BACKOFF_S,
        },
        declare_examples=False,
    )
    root = fed.nodes[ROOT_ID]
    edit(root.config, plan=flower_plan(QUICKSTART, 0))
    for i, s in enumerate(SITES):
        edit(fed.nodes[s].config, plan=flower_plan(BAD.get(s, (QUICKSTART, ""))[0], i))
    name = "fedloom_node_site_refusals_total"
    with Cluster(fed) as cluster:
        cluster.start()
        wait_for(
            f"{name} >= 2 for site-3 and site-4 and model version 5 at the root",
            lambda: (
                all(metric(root, name, code="failed", site=s) >= 2 for s in BAD)
                and metric(root, "fedloom_model_version") >= 5
            ),
            timeout=90,
            every=0.25,
        )
        assert not cluster.dead()
        assert applied(root, "site-1") >= 1 and applied(root, "site-2") >= 1
        assert all(applied(root, s) == 0 for s in BAD)
        check_clean_exit(cluster)
    root_log = cluster[ROOT_ID].log_text()
    warnings = refusal_warnings(root_log)
    for site, (bad, why) in BAD.items():
        # once per site, however many refusals
        [warning] = [w for w in warnings if site in str(w["msg"])]
        assert why in str(warning["msg"])
        site_log = cluster[site].log_text()
        assert why in site_log
        if bad == BROKEN:
            assert "KeyError" in site_log
        assert f"closing the connection to {site}" not in root_log  # no update refused
    assert len(warnings) == len(BAD)
