"""Scale: 10,000 sites in 20 regions for 24 virtual hours (issue 2, figure 4).

Runs ``scenarios/hierarchical-10k.toml`` (regional FedBuff under a FedBuff root, 1,000
sites training at any moment, 10-minute mean jobs: about 144,000 local training jobs) and
prints wall time, peak resident memory and jobs simulated per wall-second. Targets: at
most 120 s wall and 4 GB peak RSS on a 2-core machine.

    .venv/bin/python bench/hierarchical_scale.py
"""

from __future__ import annotations

import resource
import time

from _common import run


def main() -> None:
    t0 = time.perf_counter()
    report = run("hierarchical-10k.toml")
    wall = time.perf_counter() - t0
    arm = report.arms[0]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    print(f"training jobs simulated: {arm.jobs_finished:,} of {arm.jobs_started:,} started")
    print(f"updates applied: {arm.updates_applied:,}; duplicated: {arm.updates_duplicated}")
    print(
        f"final accuracy {arm.final_accuracy:.3f} "
        f"after {arm.virtual_seconds / 3600:.0f} virtual hours"
    )
    print(f"wall time (whole scenario, incl. set-up and report): {wall:.1f} s (target <= 120 s)")
    print(f"peak RSS: {peak_gb:.2f} GB (target <= 4 GB)")
    print(f"hierarchical_10k_jobs_per_wall_s: {arm.jobs_finished / wall:.0f} jobs/s")


if __name__ == "__main__":
    main()
