"""An unapproved Flower plan's code never runs at a site that requires approval (issue 14).

A real site daemon (in process, the real transport; a root and another site beside it)
whose ``[plan] factory`` names a module that records being imported and its
``client_fn(context)`` being called (which in Flower's quickstart loads the site's data).
At start and while every job is refused ``plan_not_approved`` neither happens; once the
operator approves the plan, the first job the gate lets through imports and calls it,
once, and trains. Bounded in time; every daemon is stopped.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest

from fedloom.algorithms.site import SiteNode
from fedloom.cli import main
from fedloom.runtime.config import PlanConfig, load_config
from fedloom.runtime.federation_files import ROOT_ID
from fedloom.runtime.nodes import build_plan
from fedloom.runtime.trainer import DeferredPlan
from tests.runtime.daemon_nets import edit, flower_plan, serving, star, until
from tests.runtime.test_governance_daemons import refusals

pytestmark = pytest.mark.timeout(90)

SITES = ["site-1", "site-2"]
GATED = "site-1"
MODULE = "fedloom_test_gated_plan"
QUICKSTART = "tests.runtime.test_flower:client_fn"

PLAN_CODE = """
import os
from pathlib import Path

MARK = Path(os.environ["FEDLOOM_TEST_MARK"])
with MARK.open("a") as f:
    f.write("imported\\n")


def client_fn(context):
    from tests.runtime.test_flower import client_fn as quickstart

    with MARK.open("a") as f:
        f.write("client_fn\\n")
    return quickstart(context)
"""


def marks(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_an_unapproved_factory_plan_is_not_imported_until_approved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{MODULE}.py").write_text(PLAN_CODE)
    mark = tmp_path / "mark.txt"
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setenv("FEDLOOM_TEST_MARK", str(mark))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)

    fed = star(
        tmp_path,
        SITES,
        # A short backoff after each refusal: the approved site gets its next job soon.
        root_aggregation={"buffer_size": 1, "concurrency": 2, "refusal_backoff_s": 0.5},
        declare_examples=False,
    )
    edit(fed.nodes[ROOT_ID].config, plan=flower_plan(QUICKSTART, 0))
    for i, s in enumerate(SITES):
        factory = f"{MODULE}:client_fn" if s == GATED else QUICKSTART
        edit(fed.nodes[s].config, plan=flower_plan(factory, i))
    edit(fed.nodes[GATED].config, governance={"require_approval": True})

    # What the daemon builds at start: a plan deferred until a job is let through.
    assert isinstance(build_plan(load_config(fed.nodes[GATED].config)), DeferredPlan)
    assert marks(mark) == [] and MODULE not in sys.modules

    async with serving(fed) as daemons:
        root, gated, free = daemons[ROOT_ID], daemons[GATED], daemons["site-2"]
        assert isinstance(gated.node, SiteNode) and isinstance(gated.plan, DeferredPlan)
        await until("the root to learn the gated site's refusal", lambda: GATED in refusals(root))
        assert refusals(root)[GATED]["code"] == "plan_not_approved"
        await until("the federation to go on with site-2", lambda: free.node.seq >= 2)
        # Refused jobs, and not one line of the plan's code has run.
        assert gated.node.jobs_failed >= 1 and gated.node.seq == 0
        assert marks(mark) == [] and MODULE not in sys.modules
        assert not gated.plan.built

        bounds = ["lr=0.001:1", "local_steps=1:50", "batch_size=8:64", "mu=0:1"]
        args = ["plans", "approve", "--config", str(fed.nodes[GATED].config)]
        assert main([*args, *(x for b in bounds for x in ("--bound", b))]) == 0
        await until("the gated site to train once approved", lambda: gated.node.seq >= 2)
        assert gated.plan.built
    assert marks(mark) == ["imported", "client_fn"]  # once, at the first job let through


def test_a_deferred_plan_travels_as_its_config_and_each_worker_builds_it_once() -> None:
    """A process pool gets the plan with every job (pickled): unbuilt, built there once."""
    config = PlanConfig(factory=QUICKSTART, args=flower_plan(QUICKSTART, 1)["args"])
    plan = DeferredPlan(config, node_id="site-9")
    first = pickle.loads(pickle.dumps(plan))
    assert not first.built and not plan.built
    weights = first.init(0)
    second = pickle.loads(pickle.dumps(plan))
    assert second.plan() is first.plan()  # the worker's own, built once
    assert sorted(second.train(weights, {"lr": 0.1}).weights) == sorted(weights)
    assert not plan.built  # the daemon's own copy still ran nothing
