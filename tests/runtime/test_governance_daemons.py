"""Real site daemons under ``[governance] require_approval = true``: with no approval they
train nothing and the root learns why (the refusal's code, through ``TrainRefused``),
while the federation goes on with the other site; an approval made with ``fedloom plans
approve`` while everything runs lets each train from its next job on, no restart.

In process (root + 3 sites on loopback, the real transport), bounded in time. One gated
site trains in a thread pool, the other in a process pool (where the gate stays in the
daemon's process): both in one federation, since each waits out the root's refusal
backoff once (shortened here: ``[aggregation] refusal_backoff_s``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedloom.algorithms.site import SiteNode
from fedloom.cli import main
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import Daemon
from fedloom.runtime.federation_files import ROOT_ID, Federation
from fedloom.runtime.governance import Approvals, plan_digest
from tests.runtime import daemon_nets
from tests.runtime.daemon_nets import edit, serving, until

pytestmark = pytest.mark.timeout(90)

SITES = ["site-1", "site-2", "site-3"]
FREE = "site-2"
GATED = {"site-1": "thread", "site-3": "process"}  # gated site -> the pool it trains in


def star(tmp_path: Path) -> Federation:
    """A root and three sites dialling it directly; site-1 and site-3 require approval and
    train in the executor ``GATED`` names (a process pool: the gate stays in the daemon's
    process)."""
    fed = daemon_nets.star(
        tmp_path,
        SITES,
        root_aggregation={"buffer_size": 1, "concurrency": len(SITES), "refusal_backoff_s": 0.5},
    )
    for site, executor in GATED.items():
        edit(
            fed.nodes[site].config,
            governance={"require_approval": True},
            executor={"kind": executor, "workers": 1},
        )
    return fed


def refusals(root: Daemon) -> dict[str, dict[str, Any]]:
    view: dict[str, dict[str, Any]] = root.node.refusals_view()  # type: ignore[attr-defined]
    return view


async def test_an_unapproved_plan_trains_nothing_and_the_root_sees_why(tmp_path: Path) -> None:
    fed = star(tmp_path)
    configs = {site: load_config(fed.nodes[site].config) for site in GATED}
    digests = {site: plan_digest(cfg) for site, cfg in configs.items()}
    async with serving(fed) as daemons:
        root, free = daemons[ROOT_ID], daemons[FREE].node
        assert isinstance(free, SiteNode)
        gated: dict[str, SiteNode] = {}
        for site in GATED:
            node = daemons[site].node
            assert isinstance(node, SiteNode)
            gated[site] = node
        await until(
            "the root to learn the gated sites' refusals",
            lambda: all(site in refusals(root) for site in GATED),
        )
        for site in GATED:
            seen = refusals(root)[site]
            assert seen["code"] == "plan_not_approved", site
            assert digests[site][:19] in str(seen["reason"]), site
        await until("the federation to go on with site-2", lambda: free.seq >= 2)
        for site, node in gated.items():
            assert node.seq == 0 and node.jobs_failed >= 1, site  # nothing trained

        # The operator approves while everything runs: the next job trains.
        bounds = ["lr=0.001:0.1", "local_steps=1:50", "batch_size=8:64", "mu=0:1"]
        for site in GATED:
            args = ["plans", "approve", "--config", str(fed.nodes[site].config)]
            assert main([*args, *(x for b in bounds for x in ("--bound", b))]) == 0
        await until(
            "the gated sites to train once approved",
            lambda: all(node.seq >= 1 for node in gated.values()),
        )

        # A revocation stops each at its next job: nothing more leaves the site.
        failed, counted = {}, {}
        for site, cfg in configs.items():
            failed[site] = gated[site].jobs_failed
            counted[site] = refusals(root)[site]["count"]  # refusals from before approval
            Approvals(cfg.state_dir).revoke(digests[site])
        await until(
            "the next jobs to be refused",
            lambda: all(gated[s].jobs_failed > failed[s] for s in GATED),
        )
        sent = {site: node.seq for site, node in gated.items()}
        await until(
            "the root to see the new refusals",
            lambda: all(
                refusals(root)[s]["count"] >= 2 and refusals(root)[s]["count"] > counted[s]
                for s in GATED
            ),
        )
        for site, node in gated.items():
            assert node.seq == sent[site], site
