"""A real site daemon under ``[governance] require_approval = true``: with no approval it
trains nothing and the root learns why (the refusal's code, through ``TrainRefused``),
while the federation goes on with the other site; an approval made with ``fedloom plans
approve`` while everything runs lets it train from its next job on, no restart.

In process (root + 2 sites on loopback, the real transport), bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fedloom.algorithms.site import SiteNode
from fedloom.cli import main
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import Daemon, open_daemon, serve
from fedloom.runtime.federation_files import ROOT_ID, Federation, write_federation
from fedloom.runtime.governance import Approvals, plan_digest

pytestmark = pytest.mark.timeout(90)

SYNTHETIC = {"dataset": "synthetic", "model": "softmax", "alpha": 0.5, "beta": 0.5}
SITES = ["site-1", "site-2"]
GATED = "site-1"


def edit(path: Path, **changes: object) -> None:
    cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    cfg.update(changes)
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")


def star(tmp_path: Path, executor: str) -> Federation:
    """A root and two sites dialling it directly; site-1 requires approval and trains in
    ``executor`` (a process pool: the gate stays in the daemon's process)."""
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": SITES},
        plan=SYNTHETIC,
        root_aggregation={"buffer_size": 1, "concurrency": 2},
    )
    root = fed.nodes[ROOT_ID]
    edit(root.config, children=SITES)
    url = f"ws://127.0.0.1:{root.listen_port}/fedloom"
    for s in SITES:
        edit(fed.nodes[s].config, parent={"id": ROOT_ID, "url": url})
    edit(
        fed.nodes[GATED].config,
        governance={"require_approval": True},
        executor={"kind": executor, "workers": 1},
    )
    del fed.nodes["region-a"]
    return fed


async def until(what: str, check: Callable[[], bool], timeout: float = 45.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def serving(fed: Federation) -> AsyncIterator[dict[str, Daemon]]:
    """Every daemon of ``fed`` served in this process; stopped (bounded) at the end."""
    daemons = {n: open_daemon(load_config(f.config)) for n, f in fed.nodes.items()}
    shutdown = asyncio.Event()
    tasks = [
        asyncio.create_task(serve(d, install_signals=False, shutdown=shutdown))
        for d in daemons.values()
    ]
    try:
        yield daemons
        for t in tasks:
            assert not t.done(), t  # no daemon ended by itself
    finally:
        shutdown.set()
        try:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        finally:
            for d in daemons.values():
                d.close()


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
