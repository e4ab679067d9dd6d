"""What federation is measured against: a centrally trained model and each site alone.

``baselines(plan)`` trains the plan's model on the pooled training data of every site (what
a single hospital holding everyone's records would get) and on each site's own data, with
the demo's training settings for ``epochs`` passes, and scores each on the global test set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.runtime.federation_files import DEMO_TRAINING

__all__ = ["Score", "baselines"]


@dataclass(frozen=True, slots=True)
class Score:
    name: str
    detail: str
    accuracy: float
    loss: float


def _train_epochs(plan: Any, weights: Any, n: int, epochs: int, seed: int) -> Any:
    cfg = dict(DEMO_TRAINING)
    steps = max(1, epochs * math.ceil(n / int(cfg["batch_size"])))
    cfg.update(local_steps=steps, seed=seed)
    return plan.train(weights, cfg).weights


def baselines(plan_table: Mapping[str, Any], epochs: int = 30) -> tuple[Score, list[Score]]:
    """The centrally trained model (pooled training data) and each site's local-only model,
    scored on the global test set: what federation is measured against."""
    from fedloom.workloads.datasets import Split
    from fedloom.workloads.models import make_model
    from fedloom.workloads.workload import from_config

    workload = from_config(plan_table)
    data = workload.dataset
    parts = [data.site(i).train for i in range(workload.n_sites)]
    pooled = Split.concat(parts, workload.n_features)
    model = workload.model_spec
    central_plan = make_model(
        model.name, workload.n_features, workload.n_classes, train=pooled, **model.kwargs()
    )
    init = workload.init_weights(int(plan_table.get("seed", 0)))
    w = _train_epochs(central_plan, init, len(pooled), epochs, seed=1)
    m = workload.evaluate(w)
    central = Score(
        "central baseline", f"pooled data, {len(pooled)} examples", m["accuracy"], m["loss"]
    )
    local: list[Score] = []
    for i, part in enumerate(parts):
        w = _train_epochs(workload.site_plan(i), init, len(part), epochs, seed=1 + i)
        m = workload.evaluate(w)
        counts = np.bincount(part.y, minlength=workload.n_classes)
        mix = "/".join(str(int(c)) for c in counts)
        local.append(
            Score(
                f"hospital-{i + 1} alone",
                f"{len(part)} examples (labels {mix})",
                m["accuracy"],
                m["loss"],
            )
        )
    return central, local
