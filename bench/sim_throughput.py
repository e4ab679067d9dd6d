"""Simulator throughput: client updates per wall-second.

Workload (issue 2, figure 2): 1,000 sites, softmax regression on 60-dimensional Synthetic
data with 10 classes, 50 examples per site, 5 local SGD steps per job, synchronous FedAvg
with 100 sites per round for 5 rounds (500 client updates), messages sized and decoded by
the real wire codec.

Baseline measured in the same run: the same 500 training jobs called in a bare loop (no
simulator, no codec, no protocol). The ratio says how much of the simulator's time is the
training itself. Medians of several repetitions.

    .venv/bin/python bench/sim_throughput.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedloom.sim.runner import build_nodes, build_plan, build_sites, build_workload
from fedloom.sim.scenario import parse_scenario

ROUNDS = 5
PER_ROUND = 100

SCENARIO = {
    "name": "sim-throughput",
    "seed": 1,
    "duration_h": 1000,
    "data": {
        "dataset": "synthetic",
        "alpha": 1.0,
        "beta": 1.0,
        "samples_per_site": 50,
        "model": "softmax",
    },
    "sites": {"count": 1000, "regions": ["r0", "r1", "r2", "r3"]},
    "compute": {"distribution": "halfnormal", "min_s": 30, "sd_s": 60},
    "training": {"lr": 0.05, "local_steps": 5, "batch_size": 10},
    "arms": [
        {
            "name": "fedavg",
            "algorithm": "fedavg",
            "clients_per_round": PER_ROUND,
            "over_selection": 1.0,
            "round_timeout_s": 3600,
        }
    ],
}


def run_sim() -> tuple[int, float]:
    """One simulated run; returns (client updates applied, wall seconds incl. set-up)."""
    from fedloom.federation.training import WorkloadTrainer
    from fedloom.sim.compute import ComputeModel
    from fedloom.sim.driver import SimDriver
    from fedloom.sim.executors import InlineExecutor

    scenario = parse_scenario(SCENARIO)
    arm = scenario.arms[0]
    t0 = time.perf_counter()
    workload = build_workload(scenario, scenario.seed)
    sites = build_sites(scenario, workload, scenario.seed)
    plan = build_plan(scenario, arm, sites, scenario.seed)
    nodes = build_nodes(
        plan,
        arm,
        workload.init_weights(scenario.seed),
        scenario.seed,
        {s.id: s.n_examples for s in sites},
    )
    root = nodes["root"]
    driver = SimDriver.from_plan(
        plan,
        nodes,
        compute=ComputeModel.from_config(arm.compute, seed=scenario.seed),
        executor=InlineExecutor(WorkloadTrainer(workload, [s.id for s in sites])),
        seed=scenario.seed,
    )
    stats = driver.run(stop=lambda: root.current_model()[0] >= ROUNDS)  # type: ignore[attr-defined]
    wall = time.perf_counter() - t0
    if root.current_model()[0] < ROUNDS:  # type: ignore[attr-defined]
        raise SystemExit("the simulation stopped before completing its rounds")
    return stats.updates_applied, wall


def run_bare() -> tuple[int, float]:
    """The same number of training jobs in a bare loop: the ceiling for the simulator."""
    scenario = parse_scenario(SCENARIO)
    workload = build_workload(scenario, scenario.seed)
    weights = workload.init_weights(scenario.seed)
    config = scenario.arms[0].training.as_dict()
    plans = [workload.site_plan(i) for i in range(ROUNDS * PER_ROUND)]
    t0 = time.perf_counter()
    for i, plan in enumerate(plans):
        weights_i = plan.train(weights, {**config, "seed": i}).weights
        assert weights_i
    return len(plans), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sim_rates, bare_rates = [], []
    for r in range(args.repeats):
        updates, wall = run_sim()
        jobs, bare_wall = run_bare()
        sim_rates.append(updates / wall)
        bare_rates.append(jobs / bare_wall)
        print(
            f"run {r + 1}: {updates} updates in {wall:.3f} s -> {updates / wall:,.0f}/s; "
            f"bare training loop {jobs / bare_wall:,.0f} jobs/s"
        )
    sim = statistics.median(sim_rates)
    bare = statistics.median(bare_rates)
    print(f"median bare training loop: {bare:,.0f} jobs/s")
    print(f"simulator efficiency (sim rate / bare training rate): {sim / bare:.2f}")
    print(f"ratio to the issue's 1,200 updates/s target: {sim / 1200:.2f}")
    print(f"sim_throughput: {sim:.0f} updates/s")


if __name__ == "__main__":
    main()
