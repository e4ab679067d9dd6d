"""Privacy against utility (issue 12, figure 1): test accuracy at ε ∈ {1, 3, 8} (δ = 1e-5)
and without differential privacy, medians of 3 seeds.

PART 1, record-level DP-SGD at the sites (``workloads.dp_sgd``): the demo's federation as
``scenarios/demo-parity.toml`` has it (root, 2 regions, the 6 hospitals of the breast-cancer
partition pinned by the demo's data seed, FedBuff with the demo's buffers and timeouts), with
the torch MLP (32 hidden units) instead of the numpy model, run through the simulator
(``sim.runner.run_once``, the nodes and factory the daemons run). Each site trains through
Opacus and keeps its privacy ledger; ``epsilon_budget`` = the target ε, so a site stops
training once its next job would spend more.

Calibration, as a practitioner would plan it before the study: every job is the demo's
(20 local steps, batch 16, lr 0.05), the clipping norm is C = 1 (features are standardised;
not tuned), and the noise multiplier z is Opacus's ``get_noise_multiplier`` for the target ε
over ``PLANNED_JOBS`` = 10 jobs at the Poisson rate of the third-largest hospital (66
examples: q = 1/5). One z for the whole federation: the two larger hospitals spend less per
job and train longer under the same budget; the three small ones (≤ 33 examples, q ≥ 1/3)
cannot afford a single job at that z and never train (their ledgers refuse; the aggregators'
60 s task timeout moves on). Their data is 13% of the federation's. Nothing here was tuned
on the test split: these are the demo's settings plus C = 1 and 10 planned jobs, chosen
once. The DP arms run 1,200 s of the simulator's clock (every budget is spent well before);
the non-private arm runs the demo's training for 3 s (about 290 jobs a site: it has
converged by 0.3 s).

The seeds (1, 2, 3) are run seeds: initial weights, the jobs' Poisson samples and noise.
The data partition stays the demo's. The test set is the 114 held-out examples (one
example is 0.88 points).

PART 2, user-level central DP at the root (``user_level_central``): FedAvg with random
selection on scenarios/privacy-synthetic.toml's 1,000 Synthetic sites (65 drawn, 50 kept
per round, 8 h of the simulator's clock) and on 30 hospitals of the same generator (13
drawn, 10 kept): no DP, then ε ∈ {1, 3, 8} with z bisected for the rounds the non-private
arm completes. Its "jobs" column is the rounds (releases) a run made. The last line stays
PART 1's ε = 8 gap.

    .venv/bin/python bench/privacy_utility.py            # ~4 min on one core + PART 2's ~15
    .venv/bin/python bench/privacy_utility.py --quick    # CI-sized: ε = 8 and no DP, 1 seed
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import ROOT

from fedloom.sim.runner import build_workload, run_once
from fedloom.sim.scenario import parse_scenario
from fedloom.workloads.dp_sgd import sample_rate

EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5
SEEDS = (1, 2, 3)
PLANNED_JOBS = 10
CALIBRATION_RANK = 2  # z is calibrated at the third-largest hospital's sample rate
MAX_GRAD_NORM = 1.0
DP_DURATION_S = 1200.0
PLAIN_DURATION_S = 3.0
GOAL_POINTS = 3.0


@dataclass(frozen=True, slots=True)
class Row:
    mechanism: str
    epsilon: float | None  # the target; None: no DP
    noise_multiplier: float | None
    accuracies: tuple[float, ...]
    spent: float | None  # the largest ε any site's ledger reached (max over seeds)
    jobs: int  # jobs trained, median over seeds
    wall_s: float

    @property
    def median(self) -> float:
        return statistics.median(self.accuracies)


# ------------------------------------------------------------------------- PART 1


def _demo_raw() -> dict[str, Any]:
    raw = tomllib.loads((ROOT / "scenarios" / "demo-parity.toml").read_text(encoding="utf-8"))
    raw["data"].update(model="mlp", hidden=32, seed=raw["seed"])  # the demo's partition
    return raw


def calibrate(epsilon: float, raw: dict[str, Any]) -> tuple[float, float]:
    """(z, the calibration site's q) for ``epsilon`` over ``PLANNED_JOBS`` jobs."""
    from opacus.accountants.utils import get_noise_multiplier

    workload = build_workload(parse_scenario(raw), raw["seed"])
    sizes = sorted((workload.n_examples(i) for i in range(workload.n_sites)), reverse=True)
    training = raw["training"]
    q = sample_rate(training["batch_size"], sizes[CALIBRATION_RANK])
    z = get_noise_multiplier(
        target_epsilon=epsilon,
        target_delta=DELTA,
        sample_rate=q,
        steps=PLANNED_JOBS * training["local_steps"],
        accountant="rdp",
    )
    return float(z), q


def _run(raw: dict[str, Any], seed: int) -> tuple[float, float | None, int]:
    raw = {**raw, "seed": seed}
    scenario = parse_scenario(raw)
    workload = build_workload(scenario, seed)
    result = run_once(scenario, scenario.arms[0], workload, seed, label=scenario.name)
    spent = result.extra.get("dp_sgd_epsilon_max")
    return result.final_accuracy, None if spent is None else float(spent), result.jobs_finished


def record_level(seeds: tuple[int, ...], epsilons: tuple[float, ...]) -> list[Row]:
    """PART 1: record-level DP-SGD at the demo's 6 hospitals (see the module docstring)."""
    rows: list[Row] = []
    targets: tuple[float | None, ...] = (None, *epsilons)
    for eps in targets:
        raw = _demo_raw()
        z = None
        if eps is None:
            raw["duration_s"] = PLAIN_DURATION_S
        else:
            z, _ = calibrate(eps, raw)
            raw["duration_s"] = DP_DURATION_S
            raw["dp_sgd"] = {
                "noise_multiplier": z,
                "max_grad_norm": MAX_GRAD_NORM,
                "delta": DELTA,
                "epsilon_budget": eps,
            }
        raw["eval_interval_s"] = raw["duration_s"] / 10
        t0 = time.perf_counter()
        runs = [_run(raw, s) for s in seeds]
        spent = [r[1] for r in runs if r[1] is not None]
        rows.append(
            Row(
                mechanism="record-level DP-SGD" if eps is not None else "none",
                epsilon=eps,
                noise_multiplier=z,
                accuracies=tuple(r[0] for r in runs),
                spent=max(spent) if spent else None,
                jobs=int(statistics.median(r[2] for r in runs)),
                wall_s=time.perf_counter() - t0,
            )
        )
    return rows


# ------------------------------------------------------------------------- PART 2


USER_SCENARIO = "privacy-synthetic.toml"
HOSPITALS = 30  # "a few dozen hospitals"
HOSPITAL_ROUND = {"clients_per_round": 10, "over_selection": 1.3, "min_cohort": 6}
QUICK_DURATION_S = 7200.0


def _user_raw(sites: int, quick: bool) -> dict[str, Any]:
    """scenarios/privacy-synthetic.toml's shared sections (its arms are built here): at
    1,000 sites as written; at ``HOSPITALS`` sites a round draws 13 of them and closes with
    10 (q = 13/30), everything else the same."""
    raw = tomllib.loads((ROOT / "scenarios" / USER_SCENARIO).read_text(encoding="utf-8"))
    raw["sites"]["count"] = sites
    raw.pop("baseline", None)  # one arm a run
    if sites != 1000:
        raw["algorithm"].update(HOSPITAL_ROUND)
    if quick:
        raw["duration_h"] = QUICK_DURATION_S / 3600.0
    return raw


def _user_run(raw: dict[str, Any], arm: dict[str, Any], seed: int) -> tuple[float, Any]:
    raw = {**raw, "seed": seed, "arms": [arm]}
    scenario = parse_scenario(raw)
    workload = build_workload(scenario, seed)
    result = run_once(scenario, scenario.arms[0], workload, seed, label=scenario.name)
    return result.final_accuracy, result


def user_level_central(
    seeds: tuple[int, ...], epsilons: tuple[float, ...], quick: bool
) -> list[Row]:
    """PART 2: user-level central DP at the root (``federation.privacy``), FedAvg with
    random selection, on scenarios/privacy-synthetic.toml's 1,000 Synthetic sites and on
    30 hospitals with the same data generator. For each size the non-private arm runs
    first; the rounds it completes (median over seeds) are the planned releases, and each
    private arm's z is bisected with the ledger's accountant for its target ε over them
    at the round's sampling rate (``sim.dp_calibration``; budget = target, so an arm that
    completes more rounds stops releasing there). Clip C = 0.5 (the scenario's; not tuned
    on the test split)."""
    rows: list[Row] = []
    for sites in (1000, HOSPITALS):
        raw = _user_raw(sites, quick)
        label = f"{sites:,} sites"
        t0 = time.perf_counter()
        plain_arm = {"name": "no-dp", "algorithm": "fedavg", "privacy": {"mechanism": "none"}}
        plain = [_user_run(raw, plain_arm, s) for s in seeds]
        rounds = int(statistics.median(r.versions for _, r in plain))
        rows.append(
            Row(
                mechanism=f"none, {label}",
                epsilon=None,
                noise_multiplier=None,
                accuracies=tuple(a for a, _ in plain),
                spent=None,
                jobs=rounds,
                wall_s=time.perf_counter() - t0,
            )
        )
        for eps in epsilons:
            arm = {
                "name": f"eps-{eps:g}",
                "algorithm": "fedavg",
                "privacy": {"target_epsilon": eps, "releases": rounds},
            }
            t0 = time.perf_counter()
            runs = [_user_run(raw, arm, s) for s in seeds]
            extra = runs[0][1].extra
            rows.append(
                Row(
                    mechanism=f"central, {label}",
                    epsilon=eps,
                    noise_multiplier=float(extra["dp_noise_multiplier"]),
                    accuracies=tuple(a for a, _ in runs),
                    spent=max(float(r.extra["dp_epsilon"]) for _, r in runs),
                    jobs=int(statistics.median(int(r.extra["dp_releases"]) for _, r in runs)),
                    wall_s=time.perf_counter() - t0,
                )
            )
    return rows


# --------------------------------------------------------------------------- output


def _fmt(x: float | None, spec: str, none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(title: str, rows: list[Row]) -> None:
    print(title)
    print(f"{'mechanism':<22}{'target eps':>11}{'z':>9}{'eps spent':>11}{'jobs':>7}"
          f"{'median acc':>12}  per seed")  # fmt: skip
    for r in rows:
        per_seed = " ".join(f"{a:.3f}" for a in r.accuracies)
        target = _fmt(r.epsilon, "g", "no DP")
        z = _fmt(r.noise_multiplier, ".3f")
        print(
            f"{r.mechanism:<22}{target:>11}{z:>9}{_fmt(r.spent, '.3f'):>11}{r.jobs:>7}"
            f"{r.median:>12.3f}  {per_seed}"
        )


def write_results(rows: list[Row], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = [
        {
            "mechanism": r.mechanism,
            "epsilon": r.epsilon,
            "delta": DELTA,
            "noise_multiplier": r.noise_multiplier,
            "epsilon_spent_max": r.spent,
            "accuracies": list(r.accuracies),
            "median_accuracy": r.median,
            "jobs": r.jobs,
            "wall_s": r.wall_s,
        }
        for r in rows
    ]
    (out / "privacy_utility.json").write_text(json.dumps(data, indent=2) + "\n")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for mech in sorted({r.mechanism for r in rows if r.epsilon is not None}):
        pts = sorted((r.epsilon, r.median) for r in rows if r.mechanism == mech and r.epsilon)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=mech)
    for r in rows:
        if r.epsilon is None:
            ax.axhline(r.median, ls="--", color="grey", label=f"no DP: {r.mechanism}")
    ax.set_xscale("log")
    ticks = sorted({r.epsilon for r in rows if r.epsilon is not None})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"ε (δ = {DELTA:g})")
    ax.set_ylabel("test accuracy (median of seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "privacy_utility.png", dpi=120)


def figure_line(rows: list[Row]) -> str:
    plain = next(r for r in rows if r.epsilon is None)
    at8 = next(r for r in rows if r.epsilon == 8.0)
    gap = (plain.median - at8.median) * 100
    return (
        f"privacy_utility: record-level eps=8 accuracy {at8.median:.3f} vs non-private "
        f"{plain.median:.3f}: gap {gap:.1f} points [goal <= {GOAL_POINTS:g}]"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, eps = 8 and no DP only")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "privacy_utility")
    args = ap.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # Opacus: secure_mode off (see dp_sgd)
    logging.getLogger("fedloom.dp_sgd").setLevel(logging.ERROR)  # refusals are expected
    seeds = SEEDS[:1] if args.quick else SEEDS
    epsilons = (8.0,) if args.quick else EPSILONS
    part1 = record_level(seeds, epsilons)
    print_table(
        f"PART 1: record-level DP-SGD, breast cancer, the demo's 6 hospitals, "
        f"delta={DELTA:g}, seeds {list(seeds)}",
        part1,
    )
    part2 = user_level_central(seeds, epsilons, args.quick)
    if part2:
        print_table("PART 2: user-level central DP", part2)
    write_results(part1 + part2, args.out)
    print(f"results in {args.out}")
    print(figure_line(part1))


if __name__ == "__main__":
    main()
