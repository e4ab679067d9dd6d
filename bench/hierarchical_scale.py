"""Scale: 10,000 or 100,000 sites in regions for 24 virtual hours (issue 2, figure 4; issue 15).

Runs ``scenarios/hierarchical-10k.toml`` (regional FedBuff under a FedBuff root, 1,000
sites training at any moment, 10-minute mean jobs: about 144,000 local training jobs), or
with ``--scenario hierarchical-100k`` the same shape at 100,000 sites in 100 regions (5,000
training at any moment: about 720,000 jobs), and prints wall time, peak resident memory,
jobs simulated per wall-second, the CPU time (user + sys: the figure to compare on a
machine other work shares, where wall time is inflated) and the load average. Where the
scenario trains in a process pool (``executor = "process"``), the workers' CPU time and
peak RSS are printed too, and the memory figure is the driver's peak plus every worker's
(the largest worker's peak each: an upper bound on what they held at once). Targets on a
2-core machine: 10k at most 120 s wall and 4 GB peak RSS; 100k at most 300 s and 4 GB.

    .venv/bin/python bench/hierarchical_scale.py
    .venv/bin/python bench/hierarchical_scale.py --scenario hierarchical-100k
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from _common import ROOT, run

from fedloom.sim.scenario import load_scenario

# scenario name -> (wall-time goal in s, peak-RSS goal in GB)
GOALS = {"hierarchical-10k": (120.0, 4.0), "hierarchical-100k": (300.0, 4.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario",
        choices=sorted(GOALS),
        default="hierarchical-10k",
        help="which scale scenario of scenarios/ to run (default: hierarchical-10k)",
    )
    args = parser.parse_args()
    wall_goal, rss_goal = GOALS[args.scenario]
    t0 = time.perf_counter()
    report = run(f"{args.scenario}.toml")
    wall = time.perf_counter() - t0
    arm = report.arms[0]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # A process pool's workers (the scenario's executor) have ended and been waited for:
    # their CPU is summed, their peak RSS is the largest one's (KiB on Linux).
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    scenario = load_scenario(ROOT / "scenarios" / f"{args.scenario}.toml")
    n_workers = scenario.workers if scenario.executor == "process" else 0
    peak_gb = usage.ru_maxrss / 1024**2
    kids_gb = kids.ru_maxrss / 1024**2 if n_workers else 0.0
    total_gb = peak_gb + n_workers * kids_gb  # as if every worker peaked at once
    cpu = usage.ru_utime + usage.ru_stime  # the driver, set-up included
    kids_cpu = kids.ru_utime + kids.ru_stime if n_workers else 0.0
    load1, load5, load15 = os.getloadavg()
    hours = arm.virtual_seconds / 3600
    print(f"training jobs simulated: {arm.jobs_finished:,} of {arm.jobs_started:,} started")
    print(f"updates applied: {arm.updates_applied:,}; duplicated: {arm.updates_duplicated}")
    print(f"final accuracy {arm.final_accuracy:.3f} after {hours:.0f} virtual hours")
    print(f"wall time (whole scenario, incl. set-up and report): {wall:.1f} s")
    print(f"CPU time (user + sys): {cpu:.1f} s ({usage.ru_utime:.1f} + {usage.ru_stime:.1f})")
    if n_workers:
        print(f"training workers ({n_workers}): {kids_cpu:.1f} s CPU, peak RSS {kids_gb:.2f} GB")
    print(
        f"peak RSS: {peak_gb:.2f} GB"
        + (f" (with the workers: {total_gb:.2f} GB)" if n_workers else "")
    )
    print(f"jobs per wall-second: {arm.jobs_finished / wall:.0f}")
    print(f"load average at the end (1/5/15 min): {load1:.2f} {load5:.2f} {load15:.2f}")
    sites = scenario.sites.count
    pool = f" + {kids_cpu:.0f} s in {n_workers} training worker(s)" if n_workers else ""
    print(
        f"{args.scenario}: {sites:,} sites, {hours:.0f} h virtual in "
        f"{wall:.0f} s wall ({cpu:.0f} s CPU{pool}), peak RSS {total_gb:.1f} GB "
        f"[goals <= {wall_goal:.0f} s, <= {rss_goal:.0f} GB]"
    )


if __name__ == "__main__":
    main()
