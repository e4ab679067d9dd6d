"""Training plans in the runtime and the Flower-shaped NumPyClient adapter."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.config import PlanConfig
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.memory_network import MemoryNetwork
from fedloom.runtime.trainer import (
    GlobalPlan,
    NumPyClientPlan,
    PlanTrainer,
    SitePlan,
    as_plan,
    load_factory,
    make_executor,
    plan_from_config,
)
from fedloom.workloads.workload import from_config

LIMIT = 15.0


class FakeClient:
    """Flower NumPyClient shape: a weight matrix, a bias and an int64 step counter.

    ``fit`` moves every float parameter by ``lr`` (in place, as real clients do) and
    counts steps; it records the dtypes and config it was given.
    """

    def __init__(self, n_examples: int = 12, bad: str | None = None) -> None:
        self.w = np.zeros((2, 3), dtype=np.float32)
        self.b = np.zeros(3, dtype=np.float64)
        self.steps = np.array(0, dtype=np.int64)
        self.n_examples = n_examples
        self.bad = bad
        self.configs: list[dict[str, Any]] = []
        self.dtypes_seen: list[list[np.dtype[Any]]] = []

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [self.w, self.b, self.steps]

    def set_parameters(self, parameters: list[np.ndarray]) -> None:
        self.dtypes_seen.append([p.dtype for p in parameters])
        self.w, self.b, self.steps = parameters

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        self.configs.append(config)
        self.set_parameters(parameters)
        lr = float(config.get("lr", 0.1))
        self.w += lr  # in place: the adapter must have handed over copies
        self.b += lr
        self.steps += 1
        out: list[np.ndarray] = [self.w, self.b, self.steps]
        if self.bad == "count":
            out = out[:2]
        elif self.bad == "shape":
            out = [np.zeros(4, dtype=np.float32), self.b, self.steps]
        return out, self.n_examples, {"loss": 0.3, "note": "text is dropped", "ok": True}

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        self.set_parameters(parameters)
        return 0.25, 5, {"accuracy": float(np.mean(self.w) > 0)}


def make_fake_client(n_examples: int = 12) -> FakeClient:
    """A factory for ``plan.factory = "tests.runtime.test_trainer:make_fake_client"``."""
    return FakeClient(n_examples)


def test_parameters_are_named_in_order_and_integers_travel_as_floats() -> None:
    plan = NumPyClientPlan(FakeClient())
    weights = plan.init(0)
    assert list(weights) == ["p0", "p1", "p2"]
    assert weights["p0"].dtype == np.float32 and weights["p0"].shape == (2, 3)
    assert weights["p1"].dtype == np.float64
    assert weights["p2"].dtype == np.float32 and weights["p2"].shape == (1,)  # 0-d travels as (1,)


def test_fit_round_trip_keeps_our_arrays_untouched() -> None:
    client = FakeClient()
    plan = NumPyClientPlan(client)
    weights = plan.init(0)
    frozen = {k: v.copy() for k, v in weights.items()}
    result = plan.train(weights, {"lr": 0.5, "local_steps": 3, "seed": 7})
    for k in weights:  # the client trained in place on copies
        np.testing.assert_array_equal(weights[k], frozen[k])
    np.testing.assert_allclose(result.weights["p0"], np.full((2, 3), 0.5))
    np.testing.assert_allclose(result.weights["p1"], np.full(3, 0.5))
    assert float(result.weights["p2"][0]) == 1.0
    assert result.n_examples == 12
    assert dict(result.metrics) == {"loss": 0.3, "ok": 1.0}
    # and the keys Flower clients read (runtime.flower.fit_config)
    flower = {"learning_rate": 0.5, "local_epochs": 1, "server_round": 1}
    assert client.configs == [{"lr": 0.5, "local_steps": 3, "seed": 7, **flower}]
    assert client.dtypes_seen[-1] == [np.float32, np.float64, np.int64]  # its own dtypes
    client.w += 100.0  # the client keeps training its own buffers ...
    assert float(result.weights["p0"][0, 0]) == 0.5  # ... our result does not move


def test_train_works_without_init_in_this_process() -> None:
    # A site daemon gets its first weights from the aggregator, never calls init().
    weights = NumPyClientPlan(FakeClient()).init(0)
    fresh = NumPyClientPlan(FakeClient())
    result = fresh.train(weights, {"lr": 1.0})
    assert float(result.weights["p1"][0]) == 1.0


def test_evaluate_reports_loss_accuracy_and_examples() -> None:
    plan = NumPyClientPlan(FakeClient())
    trained = plan.train(plan.init(0), {"lr": 1.0}).weights
    metrics = plan.evaluate(trained)
    assert metrics == {"loss": 0.25, "accuracy": 1.0, "n_examples": 5.0}


@pytest.mark.parametrize(
    ("bad", "message"), [("count", "returned 2 arrays"), ("shape", "has shape")]
)
def test_a_client_returning_the_wrong_arrays_fails_clearly(bad: str, message: str) -> None:
    plan = NumPyClientPlan(FakeClient(bad=bad))
    with pytest.raises(ValueError, match=message):
        plan.train(plan.init(0), {})


def test_a_client_without_parameters_is_refused_naming_get_parameters() -> None:
    """Flower's NumPyClient.get_parameters returns [] unless the client defines it: a
    model of no tensors would train nothing, each job failing on an unclear count."""

    class NoParameters(FakeClient):
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return []

    plan = NumPyClientPlan(NoParameters())
    with pytest.raises(ConfigError, match=r"get_parameters\(\) returned no parameters"):
        plan.init(0)
    with pytest.raises(ConfigError, match=r"get_parameters\(\) returned no parameters"):
        plan.train({"p0": np.zeros(1, np.float32)}, {})


def test_a_num_examples_the_wire_cannot_carry_fails_the_job() -> None:
    """An int beyond 64 bits is no count of examples: the update carrying it could not be
    encoded (OverflowError where the site sends it); the job fails with the reason."""
    plan = NumPyClientPlan(FakeClient(n_examples=10**30))
    with pytest.raises(ValueError, match="num_examples must be an int >= 0"):
        plan.train(plan.init(0), {})
    assert NumPyClientPlan(FakeClient(n_examples=2**62)).train(plan.init(0), {}).n_examples


def test_weights_that_do_not_match_the_client_are_refused() -> None:
    plan = NumPyClientPlan(FakeClient())
    weights = plan.init(0)
    with pytest.raises(ValueError, match="missing"):
        plan.train({"p0": weights["p0"]}, {})
    with pytest.raises(ValueError, match="shape"):
        plan.train({**weights, "p0": np.zeros(6, dtype=np.float32)}, {})


def test_objects_without_the_client_shape_are_refused() -> None:
    with pytest.raises(TypeError, match="NumPyClient shape"):
        NumPyClientPlan(object())
    with pytest.raises(ConfigError, match="neither"):
        as_plan(object())


def test_config_values_that_flower_cannot_carry_are_left_out() -> None:
    client = FakeClient()
    plan = NumPyClientPlan(client)
    plan.train(plan.init(0), {"lr": 0.1, "nested": {"a": 1}, "items": [1, 2]})
    flower = {"learning_rate": 0.1, "local_epochs": 1, "server_round": 1}
    assert client.configs[-1] == {"lr": 0.1, **flower}


async def test_a_numpy_client_drives_fedbuff_unchanged() -> None:
    """Two sites whose trainers are NumPyClient objects feed a FedBuff root."""
    initial = NumPyClientPlan(FakeClient()).init(0)
    sites = ["site-0", "site-1"]
    root = FedBuffAggregator(
        "root",
        {s: "site" for s in sites},
        initial,
        buffer_size=2,
        concurrency=2,
        train_config={"lr": 0.1},
        task_timeout_s=30.0,
        rng=0,
    )
    net = MemoryNetwork()
    drivers = [AsyncDriver(root, peers=net.peers("root"))]
    for s in sites:
        net.link("root", s)
        trainer = PlanTrainer(NumPyClientPlan(FakeClient()))
        drivers.append(AsyncDriver(SiteNode(s, "root"), peers=net.peers(s), trainer=trainer))
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        for d in drivers:
            tg.create_task(d.run())
        while (root.current_model() or (0, {}))[0] < 3:
            await asyncio.sleep(0.01)
        for d in drivers:
            d.stop()
    version, weights = root.current_model()
    assert version >= 3
    assert float(np.mean(weights["p0"])) > 0  # every applied delta pushed it up


# ---------------------------------------------------------------- built-in workloads


WORKLOAD = {"dataset": "breast_cancer", "model": "softmax", "n_sites": 3, "seed": 1}


def test_site_plan_trains_and_pickles_to_its_specs() -> None:
    plan = SitePlan(from_config(WORKLOAD), 1)
    weights = plan.init(0)
    result = PlanTrainer(plan)("site-1", weights, {"lr": 0.1, "local_steps": 2, "seed": 3})
    assert set(result.weights) == set(weights) and result.n_examples > 0
    blob = pickle.dumps(PlanTrainer(plan))
    assert len(blob) < 4096  # specs only, no data
    again = pickle.loads(blob)
    replay = again("site-1", weights, {"lr": 0.1, "local_steps": 2, "seed": 3})
    for k in weights:  # same data, same seed: same result after unpickling
        np.testing.assert_array_equal(replay.weights[k], result.weights[k])
    with pytest.raises(ValueError, match="out of range"):
        SitePlan(from_config(WORKLOAD), 3)


def test_plans_from_config() -> None:
    site = plan_from_config(PlanConfig(workload=WORKLOAD, site_index=0))
    assert isinstance(site, SitePlan)
    root = plan_from_config(PlanConfig(workload=WORKLOAD))
    assert isinstance(root, GlobalPlan)
    assert 0.0 <= root.evaluate(root.init(0))["accuracy"] <= 1.0
    with pytest.raises(RuntimeError, match="no local data"):
        root.train(root.init(0), {})
    flower = plan_from_config(
        PlanConfig(factory="tests.runtime.test_trainer:make_fake_client", args={"n_examples": 4})
    )
    assert isinstance(flower, NumPyClientPlan)
    assert flower.train(flower.init(0), {}).n_examples == 4


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_colon", "module:callable"),
        ("surely_not_a_module_xyz:f", "cannot import"),
        ("tests.runtime.test_trainer:nothing_here", "no attribute"),
        ("tests.runtime.test_trainer:WORKLOAD", "not callable"),
    ],
)
def test_bad_factories_are_config_errors(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_factory(path)


def test_factory_arguments_that_do_not_fit_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"plan\.args"):
        plan_from_config(
            PlanConfig(factory="tests.runtime.test_trainer:make_fake_client", args={"x": 1})
        )


def _train_in_pool(kind: str) -> Mapping[str, Any]:
    plan = SitePlan(from_config(WORKLOAD), 0)
    weights = plan.init(0)
    executor = make_executor(kind, 1)
    try:
        future = executor.submit(PlanTrainer(plan), "site-0", weights, {"seed": 1})
        return future.result(timeout=60).weights
    finally:
        executor.shutdown()


def test_jobs_run_in_thread_and_process_pools_alike() -> None:
    threaded = _train_in_pool("thread")
    forked = _train_in_pool("process")
    for k in threaded:
        np.testing.assert_array_equal(threaded[k], forked[k])
    with pytest.raises(ValueError):
        make_executor("gpu", 1)
