"""Flower clients run unchanged (issue 14): a client written as Flower's quickstarts write
it (``class FlowerClient(NumPyClient)`` whose ``fit`` reads ``config["server_round"]``,
``client_fn(context: Context) -> Client`` returning ``.to_client()``, ``app =
ClientApp(client_fn=client_fn)``) trains through ``[plan] factory = "...:client_fn"``;
``Client`` objects are unwrapped or adapted; what cannot run is refused at start with a
ConfigError that says what to write. The real-daemon run is in test_refusals_daemons.py."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import (
    Code,
    Context,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Deadline, TrainFailed, TrainResult, Weights
from fedloom.algorithms.site import SiteNode
from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.config import PlanConfig
from fedloom.runtime.flower import ClientAsNumPy, client_fn_kind, fit_config, flower_node_id
from fedloom.runtime.trainer import NumPyClientPlan, PlanTrainer, as_plan, plan_from_config
from tests.algorithms.alg_helpers import MiniNet, star_net

# ------------------------------------------------- the quickstart, as Flower writes it

N_FEATURES = 4


def load_data(partition_id: int, num_partitions: int) -> tuple[Any, Any]:
    """A linearly separable toy set, split by partition (stands in for flwr-datasets)."""
    rng = np.random.default_rng(1000 + partition_id)
    x = rng.normal(size=(60, N_FEATURES)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 1.5], dtype=np.float32) > 0).astype(np.float32)
    cut = 48
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def train(weights: list[Any], data: tuple[Any, Any], epochs: int, lr: float) -> list[Any]:
    w, b = weights
    x, y = data
    for _ in range(epochs):
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        w = w - lr * (x.T @ (p - y)) / len(y)
        b = b - lr * float(np.mean(p - y))
    return [w.astype(np.float32), np.asarray(b, dtype=np.float32)]


def evaluate_weights(weights: list[Any], data: tuple[Any, Any]) -> tuple[float, float]:
    w, b = weights
    x, y = data
    p = np.clip(1.0 / (1.0 + np.exp(-(x @ w + b))), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return loss, float(np.mean((p > 0.5) == y))


class FlowerClient(NumPyClient):
    def __init__(self, trainloader: Any, valloader: Any, local_epochs: int) -> None:
        self.weights = [np.zeros(N_FEATURES, dtype=np.float32), np.zeros((), dtype=np.float32)]
        self.trainloader = trainloader
        self.valloader = valloader
        self.local_epochs = local_epochs
        self.rounds: list[int] = []

    def get_parameters(self, config: dict[str, Any]) -> list[Any]:
        return self.weights

    def fit(
        self, parameters: list[Any], config: dict[str, Any]
    ) -> tuple[list[Any], int, dict[str, Any]]:
        server_round = config["server_round"]  # what fails on every job without it
        self.rounds.append(int(server_round))
        lr = float(config["lr"]) / (1.0 + 0.01 * server_round)
        self.weights = train(parameters, self.trainloader, self.local_epochs, lr)
        return self.weights, len(self.trainloader[1]), {"round": server_round}

    def evaluate(
        self, parameters: list[Any], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        loss, accuracy = evaluate_weights(parameters, self.valloader)
        return loss, len(self.valloader[1]), {"accuracy": accuracy}


def client_fn(context: Context) -> Client:
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainloader, valloader = load_data(int(partition_id), int(num_partitions))
    local_epochs = context.run_config["local-epochs"]
    return FlowerClient(trainloader, valloader, int(local_epochs)).to_client()


app = ClientApp(client_fn=client_fn)


class BrokenClient(FlowerClient):
    """Reads a config key no server sends: fails on every job."""

    def fit(
        self, parameters: list[Any], config: dict[str, Any]
    ) -> tuple[list[Any], int, dict[str, Any]]:
        epochs = config["num_local_epochs"]
        return super().fit(parameters, {**config, "local_epochs": epochs})


def broken_client_fn(context: Context) -> Client:
    trainloader, valloader = load_data(int(context.node_config["partition-id"]), 3)
    return BrokenClient(trainloader, valloader, 1).to_client()


def app_factory() -> ClientApp:
    return app


def legacy_client_fn(cid: str) -> FlowerClient:
    trainloader, valloader = load_data(int(cid), 3)
    return FlowerClient(trainloader, valloader, 1)


ARGS = {"partition-id": 1, "num-partitions": 3, "local-epochs": 2}


def quickstart_plan(args: dict[str, Any] | None = None, node: str = "site-1") -> Any:
    cfg = PlanConfig(factory="tests.runtime.test_flower:client_fn", args=args or ARGS)
    return plan_from_config(cfg, node_id=node)


# ------------------------------------------------------------------------------ tests


def test_the_quickstart_client_fn_gets_a_context_and_its_client_is_unwrapped() -> None:
    plan = quickstart_plan()
    assert isinstance(plan, NumPyClientPlan)
    client = plan.client
    assert isinstance(client, FlowerClient)  # the NumPyClient inside .to_client()
    assert client.local_epochs == 2  # run_config["local-epochs"] from [plan.args]
    assert client.trainloader[0].shape == (48, N_FEATURES)
    weights = plan.init(0)
    assert sorted(weights) == ["p0", "p1"]
    result = plan.train(weights, {"lr": 0.5, "local_steps": 3, "server_round": 7, "seed": 1})
    assert client.rounds == [7]
    assert result.n_examples == 48 and result.metrics == {"round": 7.0}
    assert not np.allclose(result.weights["p0"], weights["p0"])
    metrics = plan.evaluate(result.weights)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_examples"] == 12.0


def test_the_config_keys_flower_clients_read() -> None:
    config = {"lr": 0.1, "local_steps": 5, "batch_size": 10, "mu": 0.01, "server_round": 3}
    flower = fit_config(config, {"local-epochs": 4})
    assert flower == {
        **config,
        "learning_rate": 0.1,
        "proximal_mu": 0.01,
        "local_epochs": 4,
    }
    assert fit_config({"lr": 0.2}, {})["local_epochs"] == 1
    # the caller gave no round (e.g. a gossip peer): the plan counts its own jobs
    plan = quickstart_plan()
    weights = plan.init(0)
    plan.train(weights, {"lr": 0.1})
    plan.train(weights, {"lr": 0.1})
    assert plan.client.rounds == [1, 2]


def test_a_site_gives_the_round_of_the_model_it_trains() -> None:
    """server_round = the version trained + 1, through the site node and PlanTrainer."""
    plan = quickstart_plan()
    root = FedBuffAggregator(
        "root",
        {"site-1": "site"},
        plan.init(0),
        buffer_size=1,
        concurrency=1,
        clip_norm=None,
        train_config={"lr": 0.5},
    )
    net = MiniNet({"root": root, "site-1": SiteNode("site-1", "root")})
    net.link("root", "site-1", True)
    net.drain()
    trainer = PlanTrainer(plan)
    for _ in range(4):
        jobs, net.jobs = net.jobs, []
        for node, job in jobs:
            result = trainer(node, job.weights, job.config)
            net.feed(node, _done(job.job, result))
        net.drain()
    assert plan.client.rounds == [1, 2, 3, 4] and root.version == 4


def flower_root(sites: list[str], weights: Weights) -> FedBuffAggregator:
    """A FedBuff root over ``sites``, starting from ``weights``: a release every two
    updates, three jobs at a time, the Flower clients' lr."""
    return FedBuffAggregator(
        "root",
        dict.fromkeys(sites, "site"),
        weights,
        buffer_size=2,
        concurrency=3,
        clip_norm=None,
        train_config={"lr": 0.5},
    )


def _done(job: int, result: TrainResult) -> Any:
    from fedloom.algorithms.protocol import TrainDone

    return TrainDone(job, result)


def test_a_client_failing_every_job_is_seen_by_the_root_and_the_others_train_on() -> None:
    sites = ["site-1", "site-2", "site-3"]
    plans = {s: quickstart_plan({**ARGS, "partition-id": i}, s) for i, s in enumerate(sites)}
    plans["site-3"] = plan_from_config(
        PlanConfig(factory="tests.runtime.test_flower:broken_client_fn", args=ARGS),
        node_id="site-3",
    )
    root = flower_root(sites, plans["site-1"].init(0))
    net = star_net(root, sites)
    for step in range(30):
        net.now = float(step)
        jobs, net.jobs = net.jobs, []
        for node, job in jobs:
            try:
                result = PlanTrainer(plans[node])(node, job.weights, job.config)
            except KeyError as exc:  # as the driver reports a plan that raised
                net.feed(node, TrainFailed(job.job, f"KeyError: {exc}"))
            else:
                net.feed(node, _done(job.job, result))
        net.drain()
        net.feed("root", Deadline())
        net.drain()
    assert root.version >= 10
    view = root.refusals_view()
    assert list(view) == ["site-3"] and "num_local_epochs" in str(view["site-3"]["reason"])


def test_a_plain_flower_client_is_adapted_through_fitins_and_fitres() -> None:
    class RawClient(Client):
        def __init__(self) -> None:
            self.inner = FlowerClient(*load_data(0, 3), 1)
            self.status = Code.OK

        def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
            params = ndarrays_to_parameters(self.inner.get_parameters(ins.config))
            return GetParametersRes(Status(Code.OK, ""), params)

        def fit(self, ins: FitIns) -> FitRes:
            arrays, n, _ = self.inner.fit(parameters_to_ndarrays(ins.parameters), ins.config)
            return FitRes(Status(self.status, "disk full"), ndarrays_to_parameters(arrays), n, {})

        def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
            loss, n, metrics = self.inner.evaluate(parameters_to_ndarrays(ins.parameters), {})
            return EvaluateRes(Status(Code.OK, ""), loss, n, metrics)

    raw = RawClient()
    plan = as_plan(raw)
    assert isinstance(plan, NumPyClientPlan) and isinstance(plan.client, ClientAsNumPy)
    weights = plan.init(0)
    result = plan.train(weights, {"lr": 0.5, "server_round": 2})
    assert raw.inner.rounds == [2] and result.n_examples == 48
    assert 0.0 <= plan.evaluate(result.weights)["accuracy"] <= 1.0
    raw.status = Code.FIT_NOT_IMPLEMENTED
    with pytest.raises(ValueError, match="disk full"):
        plan.train(weights, {"lr": 0.5, "server_round": 3})


def test_a_client_app_is_refused_at_start_naming_client_fn() -> None:
    with pytest.raises(ConfigError, match=r'"tests\.runtime\.test_flower:client_fn"'):
        plan_from_config(PlanConfig(factory="tests.runtime.test_flower:app", args=ARGS))
    with pytest.raises(ConfigError, match="returned a Flower ClientApp"):
        plan_from_config(PlanConfig(factory="tests.runtime.test_flower:app_factory"))


def test_legacy_cid_factories_and_missing_partitions() -> None:
    assert client_fn_kind(legacy_client_fn) == "cid" and client_fn_kind(client_fn) == "context"
    plan = plan_from_config(
        PlanConfig(factory="tests.runtime.test_flower:legacy_client_fn", args={"partition-id": 2})
    )
    assert isinstance(plan.client, FlowerClient)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="partition-id = N"):
        plan_from_config(PlanConfig(factory="tests.runtime.test_flower:legacy_client_fn"))


def test_a_context_key_not_given_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="'num-partitions'"):
        quickstart_plan({"partition-id": 0, "local-epochs": 1})


def test_client_fn_without_flwr_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flwr.common", None)  # import flwr.common fails
    with pytest.raises(ConfigError, match="flwr is not installed"):
        quickstart_plan()


def test_a_client_shaped_object_flwr_cannot_drive_is_refused() -> None:
    class LooksLikeAClient:
        def get_parameters(self, ins: Any) -> Any: ...
        def fit(self, ins: Any) -> Any: ...
        def evaluate(self, ins: Any) -> Any: ...

    with pytest.raises(ConfigError, match=r"fit\(ins: FitIns\)"):
        as_plan(LooksLikeAClient())


def test_the_context_names_this_site() -> None:
    seen: list[Context] = []

    def fn(context: Context) -> FlowerClient:
        seen.append(context)
        return FlowerClient(*load_data(0, 1), 1)

    from fedloom.runtime.flower import call_factory

    call_factory(fn, "m:fn", {"partition-id": 3, "num_partitions": 5, "lr-decay": 0.9}, "site-7")
    [ctx] = seen
    assert ctx.node_config == {"partition-id": 3, "num-partitions": 5}
    assert ctx.run_config == {"lr-decay": 0.9}
    assert ctx.node_id == flower_node_id("site-7") != flower_node_id("site-8")
    assert 0 < ctx.node_id < 2**63
