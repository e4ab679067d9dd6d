"""The training protocol both drivers call: one job in, one ``TrainResult`` out.

A trainer is a pure function of ``(node_id, weights, config)``; its randomness comes only
from ``config["seed"]``, which the shared step derives from (run seed, node id, job), so the
simulator and a site daemon train the same job identically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from fedloom.algorithms.protocol import TrainResult, Weights

# Keys of a job's config that the site (its node or driver) adds itself, never the
# aggregator: outside the root's signed settings and the approval gate's bounds.
SITE_CONFIG_KEYS: tuple[str, ...] = ("seed", "server_round")


class TrainingRefusedError(Exception):
    """A trainer's declared refusal to train a job (e.g. ``workloads.dp_sgd``'s privacy
    budget, an unapproved plan, a revoked dataset): both drivers answer ``TrainFailed(job,
    str(exc), code)``, without a traceback. ``code`` is a short machine-readable word
    (``transport.wire.TrainRefused`` lists them) that travels to the aggregator. A site's
    registered datasets (``runtime.datasets``, ``workloads.tabular``) also refuse with
    "dataset_changed" (the file no longer hashes to its registered SHA-256) and
    "dataset_mismatch" (the table does not fit the plan's columns or classes)."""

    code = "refused"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class Trainer(Protocol):
    """Trains one job. Must be deterministic given ``config["seed"]``."""

    def __call__(
        self, node_id: str, weights: Weights, config: Mapping[str, Any]
    ) -> TrainResult: ...


class SitePlanSource(Protocol):
    """Anything with per-site training plans (``fedloom.workloads.workload.Workload``)."""

    def site_plan(self, i: int) -> Any: ...


class WorkloadTrainer:
    """A picklable ``Trainer`` over a workload: node ``sites[i]`` trains ``site_plan(i)``."""

    def __init__(self, workload: SitePlanSource, sites: Sequence[str]) -> None:
        self.workload = workload
        self.index = {site: i for i, site in enumerate(sites)}
        if len(self.index) != len(sites):
            raise ValueError("WorkloadTrainer: site ids must be unique")

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        i = self.index.get(node_id)
        if i is None:
            raise KeyError(f"WorkloadTrainer: {node_id!r} is not a site of this workload")
        result: TrainResult = self.workload.site_plan(i).train(weights, config)
        return result
