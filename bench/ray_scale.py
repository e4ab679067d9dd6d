"""Ray scale: client updates per wall-second with the inline, process-pool and Ray executors.

Workload: the torch CNN on the digits images (8×8, 10 classes) split across 40 sites with
Dirichlet label skew, FedBuff on a star with 16 jobs in flight, 40 local SGD steps of 32
images per job, so that training dominates the simulator's own work. One scenario, run
three times in this one process: ``executor = "inline"``, ``"process"`` (a pool of
``--workers`` processes) and ``"ray"`` (a local Ray cluster of ``--workers`` CPUs, every
training job a Ray task). The three report.json texts must be identical (checked).

An update is a finished training job. Each figure is jobs / wall seconds of the whole run,
start-up included (the pool's spawn and the workers' imports of torch; Ray's workers start
in the run too), except the Ray cluster's own start, which is timed and printed apart (a
cluster outlives one run). Also printed: the CPU seconds each run took, of this process,
the pool's workers and the Ray cluster's processes (raylet, GCS and the workers under them:
they are not this process's waited-for children, so ``RUSAGE_CHILDREN`` misses them), and the
load average, since the machine may be shared.

    .venv/bin/python bench/ray_scale.py [--workers 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedloom.sim.report import report_to_dict, strip_wall
from fedloom.sim.runner import run_scenario
from fedloom.sim.scenario import Scenario, parse_scenario


def scenario(hours: float) -> Scenario:
    return parse_scenario(
        {
            "name": "ray-scale",
            "seed": 1,
            "duration_h": hours,
            "eval_interval_s": min(3600.0, hours * 3600.0),  # at most the run (--quick: 0.5 h)
            "data": {"dataset": "digits", "model": "cnn", "dirichlet_alpha": 1.0},
            "sites": {"count": 40},
            "compute": {"distribution": "halfnormal", "min_s": 60, "sd_s": 60},
            "training": {"lr": 0.05, "local_steps": 40, "batch_size": 32},
            "algorithm": {"concurrency": 16},
            "arms": [{"name": "fedbuff", "algorithm": "fedbuff", "buffer_size": 4}],
        }
    )


def cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (the pool's workers, once
    the pool has ended)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def live_cpu() -> dict[int, float]:
    """CPU seconds so far of each live descendant of this process (a local Ray cluster's
    raylet, GCS server and worker processes), with the children each has waited for."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            t = proc.cpu_times()
        except psutil.Error:  # ended while we looked
            continue
        found[proc.pid] = t.user + t.system + t.children_user + t.children_system
    return found


def timed(s: Scenario) -> tuple[int, float, float, str]:
    """(jobs finished, wall seconds, CPU seconds, report.json content) of one run. The CPU
    seconds are this process's, its ended children's and what its live descendants used
    during the run (a Ray cluster started before it: the part of the run)."""
    cpu0, live0, wall0 = cpu_s(), live_cpu(), time.perf_counter()
    report = run_scenario(s)
    wall = time.perf_counter() - wall0
    cpu = cpu_s() - cpu0 + sum(t - live0.get(pid, 0.0) for pid, t in live_cpu().items())
    text = json.dumps(strip_wall(report_to_dict(report)), sort_keys=True)  # report.json's
    return report.arms[0].jobs_finished, wall, cpu, text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--workers", type=int, default=os.cpu_count() or 2, help="pool processes and Ray CPUs"
    )
    ap.add_argument("--quick", action="store_true", help="a shorter run (a quarter of the jobs)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    from fedloom.sim.ray_executor import RaySession

    base = scenario(hours=0.5 if args.quick else 2.0)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rates: dict[str, float] = {}
    texts: dict[str, str] = {}
    jobs = 0

    def record(name: str, result: tuple[int, float, float, str]) -> None:
        nonlocal jobs
        jobs, wall, cpu, texts[name] = result
        rates[name] = jobs / wall
        print(
            f"{name:>7}: {jobs} jobs in {wall:.1f} s wall ({rates[name]:.1f}/s), "
            f"{cpu:.1f} s CPU (this process, the pool's or Ray's processes)"
        )

    record("inline", timed(base))
    record("pool", timed(replace(base, executor="process", workers=args.workers)))
    t0 = time.perf_counter()
    session = RaySession(None, workers=args.workers)
    print(
        f"    ray: local cluster of {args.workers} CPUs started in {time.perf_counter() - t0:.1f} s"
    )
    try:
        record("ray", timed(replace(base, executor="ray", workers=args.workers)))
    finally:
        session.close()
    same = texts["inline"] == texts["pool"] == texts["ray"]
    print(f"report.json identical across executors: {'yes' if same else 'NO'}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"ray_scale: inline {rates['inline']:.1f}/s, pool {rates['pool']:.1f}/s, "
        f"ray {rates['ray']:.1f}/s ({jobs} jobs, {args.workers} workers)"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
