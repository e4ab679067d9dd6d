"""FedBuff against the paper (issue 15, item 5): time-to-accuracy speed-ups over FedAvg, with
and without over-selection, and over FedAsync, with 95% confidence intervals.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation" (AISTATS 2022)
report FedBuff 3.3x more efficient than synchronous FL and up to 2.5x more than asynchronous
FL. This bench runs ``scenarios/fedbuff-vs-fedavg.toml`` (Synthetic(1,1) over 1,000 sites,
half-normal job times, 100 sites training at once, 10% of jobs dropped, 12 virtual hours)
and compares five arms:

- ``fedavg-plain``: FedAvg drawing 100 sites a round and waiting for all of them (no
  over-selection); a dropped job keeps the round open until its 20-minute deadline.
- ``fedavg``: the scenario's baseline, over-selection 1.11 (100 drawn, the first 90 kept).
- ``fedavg-os13``: over-selection 1.3 (101 drawn, the first K = 77 answers aggregated; the
  late ones are recorded and discarded, ``late_updates``).
- ``fedasync`` and ``fedbuff`` (K = 10), both with polynomial staleness weights.

Method. Every seed trains on the same data set and initial weights (``--data-seed``,
default 1: ``[data] seed``): drawn anew per seed, Synthetic(1,1) is another task each time,
and the target 0.40 was out of every arm's reach on 2 of 5 draws. The seeds vary the
federation's own randomness: site speeds, job times, dropouts, selection, local sampling.
Each arm's client learning rate is chosen once, on a tuning seed (``--tune-seed``,
default 0) that is not among the evaluation seeds: the point of its ``lr_sweep`` that
reaches the target soonest (then the most accurate). Every arm then runs with that rate
on each evaluation seed (``--seeds N``: the scenario's seed onward, the seeds ``fedloom
sim --seeds N`` uses). Time to target is the sustained crossing (the scenario's 30-minute
window; the first crossing is shown too). FedBuff's speed-up over arm X is the per-seed
ratio t_X / t_FedBuff, summarised as its geometric mean and the Student-t 95% interval of
the log-ratios (``sim.stats.ratio_summary``: the seeds pair the arms, sharing sites, data
and faults). A seed where X never reached the target within the run is right-censored: X's
time is counted as the latest the run could have seen it (the horizon less the target
window for the sustained crossing, the horizon for the first), so the speed-up becomes a
lower bound, shown "≥ ... (k never)". A seed where FedBuff never reached it gives no ratio,
"(k/n)".

Then FedBuff's server optimiser: server learning rate x heavy-ball momentum (``--server-lrs``,
``--momenta``; default {0.5, 1, 2} x {0, 0.9}), each point on the first ``--sweep-seeds``
evaluation seeds (default 3, to bound the run), at FedBuff's tuned client rate, with its
speed-ups paired against the other arms' runs of the same seeds.

The multi-seed report (``report.json``, accuracy with CI bands as PNG/SVG/PDF) goes to
``--out`` (default ``runs/bench/fedbuff-paper``), with ``fedbuff_paper.json`` (tuned rates,
speed-ups, sweep). The last line is the figure.

    nice -n 10 .venv/bin/python bench/fedbuff_paper.py                # ~10 min CPU
    .venv/bin/python bench/fedbuff_paper.py --quick                   # a smoke run, seconds
    .venv/bin/python bench/fedbuff_paper.py --hours 6 --seeds 5       # a shorter horizon
    .venv/bin/python bench/fedbuff_paper.py --from runs/bench/fedbuff-paper   # reprint
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from _common import ROOT

from fedloom.sim.report import (
    ArmResult,
    human_duration,
    load_report,
    multi_seed_report,
    write_report,
)
from fedloom.sim.runner import (
    build_workload,
    first_crossing,
    resolve_seeds,
    run_once,
    sustained_crossing,
)
from fedloom.sim.scenario import Arm, Scenario, parse_scenario
from fedloom.sim.stats import RatioSummary, ratio_summary, summarize

SCENARIO = ROOT / "scenarios" / "fedbuff-vs-fedavg.toml"
FEDBUFF = "fedbuff"
# The arms FedBuff is compared with, in the table's order, and how the table names them.
OTHERS = {
    "fedavg-plain": "FedAvg (no over-selection)",
    "fedavg": "FedAvg, over-selection 1.11",
    "fedavg-os13": "FedAvg, over-selection 1.3",
    "fedasync": "FedAsync",
}
ARMS = (*OTHERS, FEDBUFF)
PAPER_SYNC = 3.3  # FedBuff over synchronous FL (Nguyen et al. 2022, abstract)
PAPER_ASYNC = 2.5  # FedBuff over asynchronous FL ("up to")
SERVER_LRS = (0.5, 1.0, 2.0)
MOMENTA = (0.0, 0.9)
# The data set (and initial weights) every seed trains on: Synthetic(1,1) drawn anew per seed
# is another task each time (0.40 is out of every arm's reach on some draws), and the seeds
# are to vary the federation's randomness (speeds, dropouts, selection, sampling), not it.
DATA_SEED = 1
TARGETS = (0.30, 0.35, 0.40)  # the speed-up-by-target table (0.40: the scenario's target)

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------- scenario


def load(hours: float | None = None, quick: bool = False, data_seed: int | None = None) -> Scenario:
    """The scenario as shipped; ``hours`` cuts its horizon; ``quick`` shrinks it to a smoke
    run (60 sites, 10 training at once, round sizes scaled alike, 2 h, one lr per arm);
    ``data_seed`` pins the data set and initial weights (``[data] seed``) across seeds."""
    raw: dict[str, Any] = tomllib.loads(SCENARIO.read_text(encoding="utf-8"))
    if data_seed is not None:
        raw["data"]["seed"] = data_seed
    if quick:
        scale = 10 / int(raw["algorithm"]["concurrency"])
        raw["sites"]["count"] = 60
        raw["algorithm"]["concurrency"] = 10
        raw["duration_h"] = 2
        raw["target_window_s"] = 600
        for arm in raw["arms"]:
            arm["lr_sweep"] = arm["lr_sweep"][-1:]
            if "clients_per_round" in arm:
                arm["clients_per_round"] = max(2, round(arm["clients_per_round"] * scale))
                arm["min_cohort"] = max(1, round(arm["min_cohort"] * scale))
    if hours is not None:
        raw["duration_h"] = hours
    scenario = parse_scenario(raw, default_name=SCENARIO.stem, source=str(SCENARIO))
    missing = [a for a in ARMS if a not in {arm.name for arm in scenario.arms}]
    if missing:
        raise SystemExit(f"{SCENARIO}: no arm {missing}")
    return scenario


def arm_named(scenario: Scenario, name: str) -> Arm:
    return next(a for a in scenario.arms if a.name == name)


def with_rates(arm: Arm, lr: float, server_lr: float | None = None, momentum: float = 0.0) -> Arm:
    """``arm`` at one client learning rate (no sweep), and optionally one server optimiser."""
    params = arm.params
    if server_lr is not None:
        params = replace(params, server_lr=server_lr, server_momentum=momentum)
    return replace(
        arm, training=replace(arm.training, lr=lr), params=params, lr_sweep=(), server_lr_sweep=()
    )


def sooner(a: ArmResult, b: ArmResult) -> bool:
    """Is ``a`` better than ``b``: sooner to the target (sustained), then more accurate."""
    ta = math.inf if a.time_to_target_s is None else a.time_to_target_s
    tb = math.inf if b.time_to_target_s is None else b.time_to_target_s
    return ta < tb if ta != tb else a.final_accuracy > b.final_accuracy


class Runner:
    """Runs arms on seeds (one workload per seed, built once) and keeps the CPU time."""

    def __init__(self, scenario: Scenario, log: Log) -> None:
        self.scenario = scenario
        self.log = log
        self._workloads: dict[int, Any] = {}
        self.runs = 0

    def run(self, arm: Arm, seed: int, label: str) -> ArmResult:
        workload = self._workloads.get(seed)
        if workload is None:
            workload = self._workloads[seed] = build_workload(self.scenario, seed)
        cpu0 = time.process_time()
        result = run_once(self.scenario, arm, workload, seed, label=label)
        self.runs += 1
        ttt = result.time_to_target_s
        self.log(
            f"  seed {seed} {label}: final {result.final_accuracy:.3f}, target "
            f"{'never' if ttt is None else human_duration(ttt)}, "
            f"{time.process_time() - cpu0:.1f} s CPU"
        )
        return result


def tune(runner: Runner, arm: Arm, seed: int) -> float:
    """The client learning rate of ``arm``'s sweep that does best on ``seed``."""
    lrs = arm.lr_sweep or (arm.training.lr,)
    if len(lrs) == 1:
        return lrs[0]
    best: tuple[float, ArmResult] | None = None
    for lr in lrs:
        result = runner.run(with_rates(arm, lr), seed, f"{arm.name} lr={lr:g} (tuning)")
        if best is None or sooner(result, best[1]):
            best = (lr, result)
    assert best is not None
    return best[0]


# ---------------------------------------------------------------------------------- speed-ups


@dataclass(frozen=True, slots=True)
class Horizon:
    """What a run that never reached the target proves: its first crossing is after
    ``duration_s`` (every evaluation was below), its sustained crossing after
    ``duration_s - window_s`` (a later window would be cut short by the run's end)."""

    duration_s: float
    window_s: float

    def bound(self, first: bool) -> float:
        return self.duration_s if first else max(self.duration_s - self.window_s, 0.0)


def _time(r: ArmResult, first: bool) -> float | None:
    return r.first_crossing_s if first else r.time_to_target_s


def paired(
    fedbuff: Sequence[ArmResult],
    other: Sequence[ArmResult],
    *,
    first: bool = False,
    horizon: Horizon | None = None,
) -> list[float | None]:
    """FedBuff's speed-up over ``other`` on each seed: t_other / t_fedbuff. None where
    FedBuff never reached the target (or at t = 0); where only ``other`` never did, None,
    or with ``horizon`` the lower bound horizon.bound / t_fedbuff (right-censored)."""
    out: list[float | None] = []
    for b, o in zip(fedbuff, other, strict=True):
        tb, to = _time(b, first), _time(o, first)
        if tb is None or tb <= 0:
            out.append(None)
        elif to is None:
            out.append(None if horizon is None else horizon.bound(first) / tb)
        else:
            out.append(to / tb)
    return out


def missed(fedbuff: Sequence[ArmResult], other: Sequence[ArmResult], *, first: bool = False) -> int:
    """Seeds where FedBuff reached the target and ``other`` never did (censored ratios)."""
    pairs = zip(fedbuff, other, strict=True)
    return sum(1 for b, o in pairs if _time(b, first) is not None and _time(o, first) is None)


def show_ratio(r: RatioSummary, n: int) -> str:
    """``2.51× [1.90–3.31]``, with ``(k/n)`` when only k seeds gave a ratio."""
    if r.geomean is None:
        return f"— (0/{n})"
    text = f"{r.geomean:.2f}×"
    if r.ci_low is not None and r.ci_high is not None:
        text += f" [{r.ci_low:.2f}–{r.ci_high:.2f}]"
    return text if r.n == n else f"{text} ({r.n}/{n})"


def speedup_cell(
    fedbuff: Sequence[ArmResult],
    other: Sequence[ArmResult],
    horizon: Horizon,
    *,
    first: bool = False,
) -> str:
    """FedBuff's speed-up over ``other``, seeds where ``other`` never reached the target
    counted at the horizon: then a lower bound, ``≥1.80× [..] (2 never)``."""
    n = len(fedbuff)
    text = show_ratio(ratio_summary(paired(fedbuff, other, first=first, horizon=horizon)), n)
    k = missed(fedbuff, other, first=first)
    return f"≥{text} ({k} never)" if k else text


def show_time(values: Sequence[float | None], n: int) -> str:
    s = summarize(values)
    if s.mean is None:
        return f"never (0/{n})"
    text = human_duration(s.mean)
    if s.ci_high is not None:
        text += f" ± {human_duration(s.ci_high - s.mean)}"
    return text if s.n == n else f"{text} ({s.n}/{n})"


def updates_to_target(r: ArmResult) -> float | None:
    """Site updates applied until the target (≈: the run's applied updates pro rata of
    time, each arm keeping its sites busy at a steady rate) — the paper's unit of
    efficiency is client updates, ours is virtual time."""
    t = r.time_to_target_s
    if t is None or r.virtual_seconds <= 0:
        return None
    return r.updates_applied * t / r.virtual_seconds


# ---------------------------------------------------------------------------------- output


@dataclass(frozen=True, slots=True)
class SweepPoint:
    server_lr: float
    momentum: float
    runs: tuple[ArmResult, ...]


def table(
    runs: Mapping[str, Sequence[ArmResult]], lrs: Mapping[str, float], horizon: Horizon
) -> list[str]:
    n = len(runs[FEDBUFF])
    fb = runs[FEDBUFF]
    head = (
        f"{'arm':<28} {'lr':>5} {'time to target':>18} {'first crossing':>18} "
        f"{'FedBuff speed-up':>32} {'(first crossings)':>32} {'~updates to target':>18} "
        f"{'final acc':>15} {'late':>6}"
    )
    lines = [head, "-" * len(head)]
    for name in ARMS:
        rs = runs[name]
        title = OTHERS.get(name, "FedBuff (K=10)")
        if name == FEDBUFF:
            sp = sp_first = "1"
        else:
            sp = speedup_cell(fb, rs, horizon)
            sp_first = speedup_cell(fb, rs, horizon, first=True)
        upd = summarize([updates_to_target(r) for r in rs])
        acc = summarize([r.final_accuracy for r in rs])
        late = summarize([float(r.extra.get("late_updates", 0)) for r in rs])
        lines.append(
            f"{title:<28} {lrs[name]:>5g} "
            f"{show_time([r.time_to_target_s for r in rs], n):>18} "
            f"{show_time([r.first_crossing_s for r in rs], n):>18} {sp:>32} {sp_first:>32} "
            f"{'—' if upd.mean is None else f'{upd.mean:,.0f}':>18} "
            f"{acc.mean or 0:.3f} ± {(acc.ci_high or acc.mean or 0) - (acc.mean or 0):.3f} "
            f"{late.mean or 0:>6,.0f}"
        )
    hours = horizon.duration_s / 3600
    lines.append(
        f"({n} seeds, {hours:g} virtual hours; times: mean ± 95% CI over the seeds that reached "
        "the target (k/n); speed-up = t_arm / t_FedBuff paired by seed: geometric mean [95% CI "
        "of the log-ratios]; '≥ (k never)': on k seeds the arm never reached the target and "
        f"counts at {human_duration(horizon.bound(False))} (sustained) / "
        f"{human_duration(horizon.bound(True))} (first), a lower bound; late = answers "
        "over-selection discarded per run)"
    )
    return lines


def sweep_table(
    points: Sequence[SweepPoint],
    runs: Mapping[str, Sequence[ArmResult]],
    lr: float,
    horizon: Horizon,
) -> list[str]:
    lines = [
        f"FedBuff server optimiser sweep (client lr {lr:g}; {len(points[0].runs)} seeds each)",
        f"{'server lr':>9} {'momentum':>8} {'time to target':>18} {'final acc':>9} "
        f"{'vs FedAvg':>30} {'vs FedAvg os1.3':>30} {'vs FedAsync':>30}",
    ]
    for p in points:
        n = len(p.runs)
        cells = [
            speedup_cell(p.runs, runs[other][:n], horizon)
            for other in ("fedavg-plain", "fedavg-os13", "fedasync")
        ]
        acc = summarize([r.final_accuracy for r in p.runs])
        lines.append(
            f"{p.server_lr:>9g} {p.momentum:>8g} "
            f"{show_time([r.time_to_target_s for r in p.runs], n):>18} {acc.mean or 0:>9.3f} "
            + " ".join(f"{c:>30}" for c in cells)
        )
    return lines


def retarget(
    runs: Mapping[str, Sequence[ArmResult]], target: float, window_s: float
) -> dict[str, list[ArmResult]]:
    """The same runs judged at another target accuracy (their accuracy series kept)."""
    out: dict[str, list[ArmResult]] = {}
    for name, rs in runs.items():
        out[name] = [
            replace(
                r,
                time_to_target_s=sustained_crossing(r.accuracy_series, target, window_s),
                first_crossing_s=first_crossing(r.accuracy_series, target),
            )
            for r in rs
        ]
    return out


def target_table(
    runs: Mapping[str, Sequence[ArmResult]], targets: Sequence[float], horizon: Horizon
) -> list[str]:
    """FedBuff's speed-ups (sustained crossings) as the target accuracy moves."""
    lines = [
        "FedBuff speed-up by target accuracy (the same runs; sustained crossings)",
        f"{'target':>6} {'FedBuff reaches at':>20} "
        + " ".join(f"{'vs ' + OTHERS[o]:>34}" for o in OTHERS),
    ]
    for target in targets:
        at = retarget(runs, target, horizon.window_s)
        fb = at[FEDBUFF]
        cells = [speedup_cell(fb, at[o], horizon) for o in OTHERS]
        lines.append(
            f"{target:>6g} {show_time([r.time_to_target_s for r in fb], len(fb)):>20} "
            + " ".join(f"{c:>34}" for c in cells)
        )
    return lines


def figure_line(runs: Mapping[str, Sequence[ArmResult]], horizon: Horizon) -> str:
    """The bench's last line: FedBuff's speed-ups over plain FedAvg, FedAvg with 1.3
    over-selection and FedAsync, with their 95% intervals."""
    fb = runs[FEDBUFF]

    def cell(name: str) -> str:
        return speedup_cell(fb, runs[name], horizon)

    return (
        f"fedbuff_paper: FedBuff speed-up over FedAvg {cell('fedavg-plain')}, over "
        f"FedAvg+overselect {cell('fedavg-os13')}, over FedAsync {cell('fedasync')} "
        f"({len(fb)} seeds; paper {PAPER_SYNC}x / {PAPER_ASYNC}x)"
    )


def _ratio_json(values: list[float | None]) -> dict[str, Any]:
    r = ratio_summary(values)
    return {"n": r.n, "geomean": r.geomean, "ci95": [r.ci_low, r.ci_high], "per_seed": values}


def results_doc(
    runs: Mapping[str, Sequence[ArmResult]],
    points: Sequence[SweepPoint],
    lrs: Mapping[str, float],
    horizon: Horizon,
    seeds: Sequence[int],
    tune_seed: int,
) -> dict[str, Any]:
    """``fedbuff_paper.json``: the tuned rates, every speed-up (per seed too), the sweep."""
    fb = runs[FEDBUFF]
    speedups: dict[str, Any] = {}
    for name in OTHERS:
        o = runs[name]
        speedups[name] = {
            "sustained": _ratio_json(paired(fb, o)),
            "first": _ratio_json(paired(fb, o, first=True)),
            "sustained_censored": _ratio_json(paired(fb, o, horizon=horizon)),
            "first_censored": _ratio_json(paired(fb, o, first=True, horizon=horizon)),
            "missed": missed(fb, o),
            "missed_first": missed(fb, o, first=True),
        }
    return {
        "seeds": list(seeds),
        "tune_seed": tune_seed,
        "duration_s": horizon.duration_s,
        "target_window_s": horizon.window_s,
        "tuned_lr": dict(lrs),
        "speedup": speedups,
        "sweep": [
            {
                "server_lr": p.server_lr,
                "momentum": p.momentum,
                "time_to_target_s": [r.time_to_target_s for r in p.runs],
                "first_crossing_s": [r.first_crossing_s for r in p.runs],
                "final_accuracy": [r.final_accuracy for r in p.runs],
            }
            for p in points
        ],
        "paper": {"sync": PAPER_SYNC, "async": PAPER_ASYNC},
    }


def sweep_from_doc(doc: Mapping[str, Any]) -> list[SweepPoint]:
    """The sweep's points as ``fedbuff_paper.json`` keeps them (times and accuracies)."""
    points = []
    for p in doc["sweep"]:
        runs = tuple(
            ArmResult(
                name=FEDBUFF,
                algorithm="fedbuff",
                topology="star",
                final_accuracy=acc,
                time_to_target_s=t,
                first_crossing_s=f,
            )
            for t, f, acc in zip(
                p["time_to_target_s"],
                p.get("first_crossing_s", [None] * len(p["time_to_target_s"])),
                p["final_accuracy"],
                strict=True,
            )
        )
        points.append(SweepPoint(p["server_lr"], p["momentum"], runs))
    return points


def print_results(
    title: str,
    runs: Mapping[str, Sequence[ArmResult]],
    points: Sequence[SweepPoint],
    lrs: Mapping[str, float],
    horizon: Horizon,
    targets: Sequence[float] = (),
) -> str:
    """Print the tables; return the figure line (printed last by the caller)."""
    print()
    print(title)
    for line in table(runs, lrs, horizon):
        print(line)
    if targets:
        print()
        for line in target_table(runs, targets, horizon):
            print(line)
    if points:
        print()
        for line in sweep_table(points, runs, lrs[FEDBUFF], horizon):
            print(line)
    return figure_line(runs, horizon)


# ---------------------------------------------------------------------------------- main


def replay(out: Path, targets: Sequence[float] = ()) -> str:
    """``--from DIR``: print a finished run's tables and figure again (no simulation)."""
    report = load_report(out / "report.json")
    doc = json.loads((out / "fedbuff_paper.json").read_text(encoding="utf-8"))
    horizon = Horizon(float(report.meta["duration_s"]), float(report.meta["target_window_s"]))
    title = f"{report.scenario}: {report.description}"
    points = sweep_from_doc(doc)
    line = print_results(title, report.runs, points, doc["tuned_lr"], horizon, targets)
    print(line)
    return line


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="evaluation seeds (default 5)")
    parser.add_argument("--tune-seed", type=int, default=0, help="seed the lrs are tuned on")
    parser.add_argument("--sweep-seeds", type=int, default=3, help="seeds per sweep point")
    parser.add_argument("--server-lrs", type=float, nargs="+", default=list(SERVER_LRS))
    parser.add_argument("--momenta", type=float, nargs="+", default=list(MOMENTA))
    parser.add_argument("--no-sweep", action="store_true", help="skip the server-lr sweep")
    parser.add_argument("--hours", type=float, default=None, help="a shorter horizon (h)")
    parser.add_argument("--quick", action="store_true", help="60 sites, 2 h: a smoke run")
    parser.add_argument(
        "--data-seed",
        type=int,
        default=DATA_SEED,
        help=f"pin the data set and initial weights (default {DATA_SEED}, the scenario's "
        "seed); -1: a new data set for every seed",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "fedbuff-paper")
    parser.add_argument(
        "--from",
        dest="replay",
        type=Path,
        default=None,
        help="print the tables of a finished run's directory again, without running",
    )
    parser.add_argument(
        "--targets",
        type=float,
        nargs="*",
        default=list(TARGETS),
        help="target accuracies for the speed-up-by-target table (the same runs)",
    )
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args.replay, args.targets)
    scenario = load(args.hours, args.quick, None if args.data_seed < 0 else args.data_seed)
    seeds = resolve_seeds(scenario, n_seeds=args.seeds)
    if args.tune_seed in seeds:
        raise SystemExit(f"--tune-seed {args.tune_seed} is one of the evaluation seeds {seeds}")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    runner = Runner(scenario, print)
    horizon = Horizon(scenario.duration_s, scenario.target_window_s)

    print(f"tuning the client lr of each arm on seed {args.tune_seed}")
    lrs = {name: tune(runner, arm_named(scenario, name), args.tune_seed) for name in ARMS}
    print("tuned lr: " + ", ".join(f"{k} {v:g}" for k, v in lrs.items()))

    runs: dict[str, list[ArmResult]] = {name: [] for name in ARMS}
    for seed in seeds:
        for name in ARMS:
            arm = with_rates(arm_named(scenario, name), lrs[name])
            runs[name].append(runner.run(arm, seed, name))

    points: list[SweepPoint] = []
    fb_arm = arm_named(scenario, FEDBUFF)
    sweep_seeds = seeds[: max(1, min(args.sweep_seeds, len(seeds)))]
    if not args.no_sweep:
        for slr in args.server_lrs:
            for mom in args.momenta:
                if (slr, mom) == (fb_arm.params.server_lr, fb_arm.params.server_momentum):
                    got = tuple(runs[FEDBUFF][: len(sweep_seeds)])  # the evaluation runs
                else:
                    variant = with_rates(fb_arm, lrs[FEDBUFF], slr, mom)
                    label = f"fedbuff slr={slr:g} m={mom:g}"
                    got = tuple(runner.run(variant, s, label) for s in sweep_seeds)
                points.append(SweepPoint(slr, mom, got))

    meta: dict[str, Any] = {
        "duration_s": scenario.duration_s,
        "eval_interval_s": scenario.eval_interval_s,
        "sites": scenario.sites.count,
        "target_window_s": scenario.target_window_s,
        "baseline": "fedavg-plain",
        "data_seed": None if args.data_seed < 0 else args.data_seed,
    }
    report = multi_seed_report(
        scenario.name, seeds[0], scenario.description, seeds, dict(runs), meta
    )
    write_report(report, args.out, plots=not args.no_plots)
    doc = results_doc(runs, points, lrs, horizon, seeds, args.tune_seed)
    (args.out / "fedbuff_paper.json").write_text(json.dumps(doc, indent=1) + "\n")

    title = f"{scenario.name}: {scenario.description}"
    line = print_results(title, runs, points, lrs, horizon, args.targets)
    cpu = time.process_time() - cpu0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    load1, load5, load15 = os.getloadavg()
    print(
        f"\n{runner.runs} runs: {cpu + children.ru_utime + children.ru_stime:.0f} s CPU, "
        f"{time.perf_counter() - wall0:.0f} s wall (load average {load1:.2f} {load5:.2f} "
        f"{load15:.2f}); report and plots in {args.out}"
    )
    print(line)
    return line


if __name__ == "__main__":
    main()
