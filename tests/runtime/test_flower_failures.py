"""A Flower client whose job cannot give an update is a failed job the root sees (issue 14).

Flower clients as ``[plan] factory`` names them (tests/runtime/test_flower.py's quickstart,
changed in one way each): one diverges (``fit`` returns NaN weights), one calls
``sys.exit()`` inside ``fit``; and a TrainingPlan of its own whose ``train`` returns
tensors of other names. Through the plan adapter
(``plan_from_config``, ``PlanTrainer``), the site node and an aggregator, each job is
answered with ``TrainRefused(code="failed")`` and no update; the ``sys.exit()`` goes
through the daemon's driver (``AsyncDriver``), which lives on and runs the next job.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.client import Client
from flwr.common import Context

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import (
    Deadline,
    PeerUp,
    Received,
    Train,
    TrainDone,
    TrainFailed,
    TrainResult,
    Weights,
)
from fedloom.algorithms.site import SiteNode
from fedloom.runtime.config import PlanConfig
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.trainer import PlanTrainer, plan_from_config
from fedloom.transport.wire import TrainRefused, TrainRequest, Update
from tests.algorithms.alg_helpers import MiniNet, star_net
from tests.runtime.test_driver import FakePeers, ScriptNode, run_driver, until
from tests.runtime.test_flower import ARGS, FlowerClient, flower_root, load_data

HERE = "tests.runtime.test_flower_failures"


class DivergingClient(FlowerClient):
    def fit(
        self, parameters: list[Any], config: dict[str, Any]
    ) -> tuple[list[Any], int, dict[str, Any]]:
        params, n, metrics = super().fit(parameters, config)
        return [p * np.nan for p in params], n, metrics


class RenamingPlan:
    """A TrainingPlan of its own (not adapted from a client): the quickstart's, whose
    ``train`` names its tensors otherwise (a custom plan's bug the adapter cannot see)."""

    def __init__(self, **args: Any) -> None:
        self.inner = plan("tests.runtime.test_flower:client_fn", 2, "site-3")

    def init(self, seed: int) -> Weights:
        weights: Weights = self.inner.init(seed)
        return weights

    def train(self, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        result = self.inner.train(weights, config)
        renamed = {f"{k}_": v for k, v in result.weights.items()}
        return TrainResult(renamed, result.n_examples, result.metrics)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        metrics: dict[str, float] = self.inner.evaluate(weights)
        return metrics


class ExitingClient(FlowerClient):
    """Calls ``sys.exit(3)`` in its first ``fit`` (as a script's error path might)."""

    exited = 0

    def fit(
        self, parameters: list[Any], config: dict[str, Any]
    ) -> tuple[list[Any], int, dict[str, Any]]:
        if not ExitingClient.exited:
            ExitingClient.exited += 1
            sys.exit(3)
        return super().fit(parameters, config)


def _client(cls: type[FlowerClient], context: Context) -> Client:
    trainloader, valloader = load_data(int(context.node_config["partition-id"]), 3)
    return cls(trainloader, valloader, 1).to_client()


def diverging_client_fn(context: Context) -> Client:
    return _client(DivergingClient, context)


def exiting_client_fn(context: Context) -> Client:
    return _client(ExitingClient, context)


def plan(factory: str, partition: int, node: str) -> Any:
    cfg = PlanConfig(factory=factory, args={**ARGS, "partition-id": partition})
    return plan_from_config(cfg, node_id=node)


def run_three_sites(bad_factory: str) -> tuple[FedBuffAggregator, MiniNet]:
    """Root and three quickstart sites, site-3 running ``bad_factory``; 20 steps."""
    sites = ["site-1", "site-2", "site-3"]
    plans = {
        s: plan(bad_factory if s == "site-3" else "tests.runtime.test_flower:client_fn", i, s)
        for i, s in enumerate(sites)
    }
    root = flower_root(sites, plans["site-1"].init(0))
    net = star_net(root, sites)
    for step in range(20):
        net.now = float(step * 10)  # past each refusal's backoff
        jobs, net.jobs = net.jobs, []
        for node, job in jobs:
            result = PlanTrainer(plans[node])(node, job.weights, job.config)
            net.feed(node, TrainDone(job.job, result))
        net.drain()
        net.feed("root", Deadline())
        net.drain()
    return root, net


def sent_by(net: MiniNet, node: str, kind: type) -> list[Any]:
    return [
        e.msg
        for n, e in net.effects
        if n == node and isinstance(getattr(e, "msg", None), kind) and e.peer == "root"
    ]


def test_a_diverging_client_is_a_failed_job_and_sends_no_update() -> None:
    root, net = run_three_sites(f"{HERE}:diverging_client_fn")
    refused = sent_by(net, "site-3", TrainRefused)
    assert len(refused) >= 2 and sent_by(net, "site-3", Update) == []
    assert {(r.code, r.reason) for r in refused} == {("failed", "non-finite weights")}
    view = root.refusals_view()
    assert list(view) == ["site-3"] and view["site-3"]["reason"] == "non-finite weights"
    assert view["site-3"]["count"] == len(refused)
    assert root.version >= 5  # the others train on
    assert net.nodes["site-3"].jobs_failed == len(refused)


def test_weights_that_do_not_fit_the_model_are_a_failed_job() -> None:
    root, net = run_three_sites(f"{HERE}:RenamingPlan")
    refused = sent_by(net, "site-3", TrainRefused)
    assert refused and sent_by(net, "site-3", Update) == []
    assert {(r.code, r.reason) for r in refused} == {("failed", "weights do not match the model")}
    assert root.refusals_view()["site-3"]["code"] == "failed" and root.version >= 5


def test_sys_exit_in_a_plan_fails_the_job_and_the_daemon_lives_on() -> None:
    ExitingClient.exited = 0
    site_plan = plan(f"{HERE}:exiting_client_fn", 0, "site-1")
    weights = site_plan.init(0)
    journal: list[Any] = []
    node = SiteNode("site-1", "p")
    driver = AsyncDriver(node, peers=FakePeers(journal), trainer=PlanTrainer(site_plan))

    def sent(kind: type) -> list[Any]:
        return [m for op, _, m in (j for j in journal if len(j) == 3) if isinstance(m, kind)]

    async def body() -> None:
        driver.post_nowait(PeerUp("p"))
        driver.post_nowait(Received("p", TrainRequest(1, 0, weights, {"lr": 0.1})))
        await until(lambda: bool(sent(TrainRefused)))
        # The driver still runs: the next task trains and its update goes out.
        driver.post_nowait(Received("p", TrainRequest(2, 0, weights, {"lr": 0.1})))
        await until(lambda: bool(sent(Update)))

    asyncio.run(run_driver(driver, body))
    assert ExitingClient.exited == 1
    [refusal] = sent(TrainRefused)
    assert refusal.task == 1 and refusal.code == "failed" and "SystemExit" in refusal.reason
    [update] = sent(Update)
    assert update.task == 2
    assert driver.stats.jobs_failed == 1 and driver.stats.jobs_done == 1
    assert node.jobs_failed == 1


def test_the_driver_reports_sys_exit_as_a_train_failed_event() -> None:
    """What the node is told (the driver's own event), whatever node it drives."""

    def exits(node_id: str, weights: Any, config: Any) -> Any:
        raise SystemExit("bye")

    script = ScriptNode("n", lambda e, now: [Train(1, {}, {})] if isinstance(e, PeerUp) else [])
    driver = AsyncDriver(script, peers=FakePeers([]), trainer=exits)

    async def body() -> None:
        driver.post_nowait(PeerUp("p"))
        await until(lambda: bool(script.events(TrainFailed)))

    asyncio.run(run_driver(driver, body))
    [failed] = script.events(TrainFailed)
    assert failed.code == "failed" and "SystemExit" in failed.reason
