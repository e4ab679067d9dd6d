"""The demo's parts below the process harness: the baselines it compares with and its report."""

from __future__ import annotations

import re

from rich.console import Console

from fedloom.runtime.baselines import Score, baselines
from fedloom.runtime.demo_report import print_report
from fedloom.runtime.federation_files import DEMO_PLAN, site_examples
from fedloom.workloads.workload import from_config

PLAN = {**DEMO_PLAN, "n_sites": 6, "seed": 1}


def test_baselines_train_on_the_pooled_data_and_on_each_site_alone() -> None:
    central, local = baselines(PLAN, epochs=5)
    examples = site_examples(PLAN, [f"hospital-{i + 1}" for i in range(6)])
    assert examples is not None
    assert central.detail == f"pooled data, {sum(examples.values())} examples"
    assert [s.name for s in local] == [f"hospital-{i + 1} alone" for i in range(6)]
    for score, n in zip(local, examples.values(), strict=True):
        assert score.detail.startswith(f"{n} examples (labels ")
    # Scored on the global test split: the untrained model's accuracy is the majority's
    # share or its complement, a trained one does better.
    workload = from_config(PLAN)
    untrained = workload.evaluate(workload.init_weights(1))["accuracy"]
    assert central.accuracy > untrained
    assert central.accuracy >= min(s.accuracy for s in local)
    again_central, again_local = baselines(PLAN, epochs=5)
    assert (again_central, again_local) == (central, local)  # seeded: the same figures


def test_the_report_puts_the_federated_model_beside_the_baselines() -> None:
    console = Console(record=True, width=120)
    central = Score("central baseline", "pooled data, 455 examples", 0.95, 0.11)
    local = [
        Score("hospital-1 alone", "225 examples", 0.93, 0.12),
        Score("hospital-2 alone", "33 examples", 0.91, 0.24),
    ]
    final = {"accuracy": 0.947, "loss": 0.118, "n_test": 114.0}
    print_report(console, 61, final, central, local, {"hospital-1": 30, "hospital-2": 31})
    text = console.export_text()
    assert "held-out test set (114 patients)" in text
    assert re.search(r"federated \(FedBuff x2\).*global v61, 61 site updates.*0\.947", text)
    assert (
        "federated 0.947 vs central 0.950 (-0.003); best hospital alone 0.930 (hospital-1)" in text
    )
