"""A real site daemon under ``[governance] require_approval = true``: with no approval it
trains nothing and the root learns why (the refusal's code, through ``TrainRefused``),
while the federation goes on with the other site; an approval made with ``fedloom plans
approve`` while everything runs lets it train from its next job on, no restart.

In process (root + 2 sites on loopback, the real transport), bounded in time."""

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

SITES = ["site-1", "site-2"]
GATED = "site-1"


def star(tmp_path: Path, executor: str) -> Federation:
    """A root and two sites dialling it directly; site-1 requires approval and trains in
    ``executor`` (a process pool: the gate stays in the daemon's process)."""
    fed = daemon_nets.star(tmp_path, SITES, root_aggregation={"buffer_size": 1, "concurrency": 2})
    edit(
        fed.nodes[GATED].config,
        governance={"require_approval": True},
        executor={"kind": executor, "workers": 1},
    )
    return fed


def refusals(root: Daemon) -> dict[str, dict[str, Any]]:
    view: dict[str, dict[str, Any]] = root.node.refusals_view()  # type: ignore[attr-defined]
    return view


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_an_unapproved_plan_trains_nothing_and_the_root_sees_why(
    tmp_path: Path, executor: str
) -> None:
    fed = star(tmp_path, executor)
    gated_cfg = load_config(fed.nodes[GATED].config)
    digest = plan_digest(gated_cfg)
    async with serving(fed) as daemons:
        root, gated, free = daemons[ROOT_ID], daemons[GATED], daemons["site-2"]
        assert isinstance(gated.node, SiteNode) and isinstance(free.node, SiteNode)
        await until("the root to learn the gated site's refusal", lambda: GATED in refusals(root))
        seen = refusals(root)[GATED]
        assert seen["code"] == "plan_not_approved"
        assert digest[:19] in str(seen["reason"])
        await until("the federation to go on with site-2", lambda: free.node.seq >= 2)
        assert gated.node.seq == 0 and gated.node.jobs_failed >= 1  # nothing trained

        # The operator approves while everything runs: the next job trains.
        bounds = ["lr=0.001:0.1", "local_steps=1:50", "batch_size=8:64", "mu=0:1"]
        args = ["plans", "approve", "--config", str(fed.nodes[GATED].config)]
        assert main([*args, *(x for b in bounds for x in ("--bound", b))]) == 0
        await until("the gated site to train once approved", lambda: gated.node.seq >= 1)

        # A revocation stops it at its next job: nothing more leaves the site.
        Approvals(gated_cfg.state_dir).revoke(digest)
        failed = gated.node.jobs_failed
        await until("the next job to be refused", lambda: gated.node.jobs_failed > failed)
        sent = gated.node.seq
        await until("the root to see the new refusal", lambda: refusals(root)[GATED]["count"] >= 2)
        assert gated.node.seq == sent
