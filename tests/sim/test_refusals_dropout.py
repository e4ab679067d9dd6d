"""The simulator's dropout is a dead site for that job: it says nothing (its aggregator
waits out task_timeout_s), while a plan that raises is refused at once (issue 14)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import TrainResult, Weights
from fedloom.algorithms.site import SiteNode
from fedloom.federation.training import TrainingRefusedError
from fedloom.sim.availability import Availability
from fedloom.sim.compute import ComputeModel
from fedloom.sim.driver import SimDriver
from fedloom.sim.network import UniformLinks
from tests.algorithms.alg_helpers import model

SITES = ["s1", "s2", "s3"]


def trained(node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
    if node_id == "s3":
        raise TrainingRefusedError("dataset revoked", "dataset_revoked")
    return TrainResult({k: v + 0.01 for k, v in weights.items()}, 10)


def run(dropout: float) -> tuple[FedBuffAggregator, Any]:
    root = FedBuffAggregator(
        "root",
        dict.fromkeys(SITES, "site"),
        model(0.0),
        buffer_size=1,
        concurrency=3,
        task_timeout_s=30.0,
        clip_norm=None,
    )
    nodes: dict[str, Any] = {"root": root, **{s: SiteNode(s, "root") for s in SITES}}
    roles = {"root": "root", **dict.fromkeys(SITES, "site")}
    driver = SimDriver(
        nodes,
        roles,
        UniformLinks(latency_s=0.05, bandwidth_bps=10e6),
        neighbours=[("root", s) for s in SITES],
        compute=ComputeModel.from_config({"distribution": "constant", "mean_s": 5.0}, seed=1),
        availability=Availability(dropout=dropout, seed=2),
        trainer=trained,
    )
    stats = driver.run(until=600.0)
    return root, stats


def test_dropouts_say_nothing_and_a_refusing_plan_is_booked() -> None:
    root, stats = run(dropout=0.3)
    assert stats.jobs_dropped > 0 and root.timeouts > 0  # dropouts still time out
    view = root.refusals_view()
    assert list(view) == ["s3"] and view["s3"]["code"] == "dataset_revoked"
    # every refusal booked is s3's refused plan, none a dropout
    assert root.refused == view["s3"]["count"]
    assert root.version > 10
