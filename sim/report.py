"""Run reports: the numbers, series and plots a researcher keeps from one scenario run.

The scenario runner produces one `ArmResult` per arm (one algorithm/topology configuration) and
wraps them in a `Report`. `write_report` turns it into a run directory:

    report.json     every number; stable key order and fixed rounding and no wall-clock time,
                    so the same scenario and seeds give the same bytes
    timing.json     the wall-clock numbers (``wall_part``), which ``load_report`` puts back
    accuracy.csv    arm,time_s,accuracy (several seeds: their mean, then std,ci95_low,ci95_high,n)
    accuracy_by_seed.csv   arm,seed,time_s,accuracy (several seeds)
    staleness.csv   arm,staleness,count
    bytes.csv       arm,tier,bytes
    summary.txt     the plain-text summary table (`format_summary`)
    accuracy.png, staleness.png, bytes.png   (`sim.plots`), each also as .svg and .pdf
    accuracy_vs_epsilon.png   when arms differ in ε (``extra["dp_epsilon"]``, the central
                    ledger's, or ``dp_sgd_epsilon_max``, the DP-SGD sites' largest)

Wall-clock numbers are the only thing that may differ between two runs with the same seed. They
live in keys whose name has the word "wall" in it (`wall_seconds`, `meta["wall_total_s"]`, ...);
`strip_wall` drops them (report.json is written without them) and `wall_part` keeps only them
(timing.json). Anything else that is not deterministic must not go into `meta` or `extra`.

Several seeds (`Report.runs`): each arm of report.json is the mean over the seeds, plus
``stats`` (every figure's n, mean, sample std and Student-t 95% interval, and the speed-ups
over the baseline paired by seed, ``sim.stats``) and ``seeds`` (each seed's run, as a
single-seed report gives it, with its ``seed``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from fedloom.sim.stats import RatioSummary, Summary, ratio_summary, summarize
from fedloom.sim.stats import band as _band

if TYPE_CHECKING:
    from rich.table import Table

FORMAT = "fedloom.report/1"

# Rounding: accuracy to 1e-6, (virtual and wall) seconds to the millisecond, speed-ups to 1e-4,
# free-form floats in meta/extra to 8 significant digits. Enough for any plot or table, and it
# keeps float noise such as 0.30000000000000004 out of the file.
ACCURACY_DECIMALS = 6
SECONDS_DECIMALS = 3
SPEEDUP_DECIMALS = 4
FREE_FORM_DIGITS = 8

ExtraValue = float | int | str

_COUNT_FIELDS = (
    "bytes_up",
    "bytes_down",
    "updates_applied",
    "updates_duplicated",
    "max_staleness",
    "jobs_started",
    "jobs_finished",
    "jobs_dropped",
    "versions",
)


@dataclass(frozen=True, slots=True)
class ArmResult:
    """What one arm of a scenario measured. Times are virtual seconds unless named `wall_*`."""

    name: str
    algorithm: str
    topology: str
    final_accuracy: float
    time_to_target_s: float | None = None  # None: the target was never reached
    target_accuracy: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_by_tier: dict[str, int] = field(default_factory=dict)  # e.g. "site->region"
    updates_applied: int = 0
    updates_duplicated: int = 0
    max_staleness: int = 0
    staleness_histogram: dict[int, int] = field(default_factory=dict)  # staleness -> count
    accuracy_series: list[tuple[float, float]] = field(default_factory=list)  # (time s, acc)
    wall_seconds: float = 0.0
    virtual_seconds: float = 0.0
    jobs_started: int = 0
    jobs_finished: int = 0
    jobs_dropped: int = 0
    versions: int = 0
    extra: dict[str, ExtraValue] = field(default_factory=dict)
    # The first evaluation at or above the target, and the start of the first window of
    # ``target_window_s`` that stays there (``sim.runner.sustained_crossing``); None: never.
    # ``time_to_target_s`` is the sustained one.
    first_crossing_s: float | None = None
    sustained_crossing_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ArmResult.name must be a non-empty string, got {self.name!r}")
        for name in _COUNT_FIELDS:
            if getattr(self, name) < 0:
                raise ValueError(f"ArmResult {self.name!r}: {name} must be >= 0")
        for tier, n in self.bytes_by_tier.items():
            if n < 0:
                raise ValueError(f"ArmResult {self.name!r}: bytes_by_tier[{tier!r}] must be >= 0")
        for staleness, count in self.staleness_histogram.items():
            if staleness < 0 or count < 0:
                raise ValueError(
                    f"ArmResult {self.name!r}: staleness_histogram entries must be >= 0, "
                    f"got {staleness}: {count}"
                )


@dataclass(frozen=True, slots=True)
class Report:
    """All arms of one scenario run. `meta["baseline"]` names the arm speed-ups are taken
    against (default: the first arm)."""

    scenario: str
    seed: int
    description: str
    arms: list[ArmResult]
    meta: dict[str, Any] = field(default_factory=dict)
    # Several seeds: the seeds run (``seed`` is the one they came from), and each arm's
    # runs in that order; ``arms`` then hold the means over the seeds (``aggregate_arm``).
    # Empty: a single run.
    seeds: tuple[int, ...] = ()
    runs: dict[str, list[ArmResult]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [arm.name for arm in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Report: arm names must be unique, repeated: {', '.join(dupes)}")
        for name, runs in self.runs.items():
            if len(runs) != len(self.seeds) or name not in names:
                raise ValueError(
                    f"Report: runs[{name!r}] needs one run per seed ({len(self.seeds)}) of an arm"
                )
        base = self.meta.get("baseline")
        if base is not None and base not in names:
            raise ValueError(
                f"Report: meta['baseline'] = {base!r} is not an arm name ({', '.join(names)})"
            )

    @property
    def baseline(self) -> ArmResult | None:
        """The arm speed-ups are measured against: meta["baseline"], else the first arm."""
        name = self.meta.get("baseline")
        if name is None:
            return self.arms[0] if self.arms else None
        return self.arm(name)

    def arm(self, name: str) -> ArmResult:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# Derived numbers and human formats (shared by the JSON, the summary and the plots)


def speedup(report: Report, arm: ArmResult, *, first: bool = False) -> float | None:
    """Baseline time-to-target over this arm's (``first``: of the first crossings); None
    when either never reached the target. Over several seeds: the geometric mean of the
    per-seed ratios (``speedup_summary``)."""
    if report.runs:
        return speedup_summary(report, arm.name, first=first).geomean
    base = report.baseline
    if base is None:
        return None
    return _ratio(base, arm, first=first)


def _ratio(base: ArmResult, arm: ArmResult, *, first: bool) -> float | None:
    tb = base.first_crossing_s if first else base.time_to_target_s
    ta = arm.first_crossing_s if first else arm.time_to_target_s
    if tb is None or ta is None:
        return None
    if arm.name == base.name:
        return 1.0
    if ta <= 0.0:
        return None  # reached at t=0: the ratio means nothing
    return tb / ta


def per_seed_speedups(report: Report, name: str, *, first: bool = False) -> list[float | None]:
    """Arm ``name``'s speed-up over the baseline on each seed (paired by seed)."""
    base = report.baseline
    if base is None:
        return []
    pairs = zip(report.runs.get(base.name, []), report.runs.get(name, []), strict=True)
    return [_ratio(b, a, first=first) for b, a in pairs]


def speedup_summary(report: Report, name: str, *, first: bool = False) -> RatioSummary:
    """The speed-up of arm ``name`` over the seeds (``sim.stats.ratio_summary``)."""
    return ratio_summary(per_seed_speedups(report, name, first=first))


def seed_report(report: Report, index: int) -> Report:
    """The single-run report of seed ``report.seeds[index]`` (its runs of every arm)."""
    arms = [runs[index] for runs in report.runs.values()]
    base = report.baseline
    meta = {"baseline": base.name} if base is not None else {}
    return Report(report.scenario, report.seeds[index], report.description, arms, meta)


def best_accuracy(arm: ArmResult) -> float | None:
    """The highest evaluated accuracy of the run (None: no evaluation)."""
    accs = [a for _, a in arm.accuracy_series if math.isfinite(a)]
    return max(accs) if accs else None


# The figures every arm is summarised by over seeds (besides its numeric ``extra`` fields).
STAT_FIELDS = (
    "final_accuracy",
    "best_accuracy",
    "time_to_target_s",
    "first_crossing_s",
    "sustained_crossing_s",
    *_COUNT_FIELDS,
)
# extra fields that are no figure of the run: the legacy -1 sentinel of first_crossing_s.
_NOT_FIGURES = frozenset({"first_crossing_s"})


def figures(arm: ArmResult) -> dict[str, float | None]:
    """The run's figures by name: STAT_FIELDS, then its numeric ``extra`` (sorted), wall-clock
    ones left out (they are no property of the seed). Rounded as report.json stores them, so
    the statistics can be recomputed from the per-seed values in the file."""
    out: dict[str, float | None] = {}
    for name in STAT_FIELDS:
        value = best_accuracy(arm) if name == "best_accuracy" else getattr(arm, name)
        if value is None:
            out[name] = None
        elif name.endswith("accuracy"):
            out[name] = _round(value, ACCURACY_DECIMALS)
        elif name.endswith("_s"):
            out[name] = _round(value, SECONDS_DECIMALS)
        else:
            out[name] = float(value)
    for key in sorted(arm.extra):
        value = arm.extra[key]
        if key in _NOT_FIGURES or _is_wall_key(key) or key in out:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = _significant(float(value))
    return out


def seed_stats(runs: list[ArmResult]) -> dict[str, Summary]:
    """Each figure of an arm over its seeds (a figure some seeds lack: over the others)."""
    per = [figures(r) for r in runs]
    names = list(dict.fromkeys(k for f in per for k in f))
    return {k: summarize([f.get(k) for f in per]) for k in names}


def tier_bytes(arm: ArmResult) -> dict[str, int]:
    """Bytes per tier, sorted by tier name. An arm that recorded no tiers falls back to its
    up/down totals so plots and bytes.csv never silently show nothing."""
    if arm.bytes_by_tier:
        return {tier: int(arm.bytes_by_tier[tier]) for tier in sorted(arm.bytes_by_tier)}
    totals = {"up": int(arm.bytes_up), "down": int(arm.bytes_down)}
    return {tier: n for tier, n in totals.items() if n > 0}


_BYTE_UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


def byte_unit(n: float) -> tuple[str, float]:
    """The decimal unit to show `n` bytes in, and its size in bytes."""
    for size, unit in _BYTE_UNITS:
        if n >= size:
            return unit, size
    return "B", 1.0


def human_bytes(n: float) -> str:
    """1234567 -> "1.23 MB" (decimal units, three significant digits)."""
    unit, size = byte_unit(n)
    if size == 1.0:
        return f"{int(n)} B"
    return f"{_three_digits(n / size)} {unit}"


def human_duration(seconds: float | None) -> str:
    """Virtual time for tables: "1.2 h", "35 min", "42 s"; "—" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds >= 3600.0:
        hours = seconds / 3600.0
        return f"{hours:.1f} h" if hours < 100 else f"{hours:,.0f} h"
    if seconds >= 60.0:
        return f"{seconds / 60.0:.0f} min"
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def time_axis_unit(max_seconds: float) -> tuple[str, float]:
    """Unit for a time axis: hours past 2 h, minutes past 2 min, else seconds."""
    if max_seconds > 2 * 3600.0:
        return "hours", 3600.0
    if max_seconds > 120.0:
        return "minutes", 60.0
    return "seconds", 1.0


def _three_digits(v: float) -> str:
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:.0f}"


def aggregate_arm(runs: list[ArmResult]) -> ArmResult:
    """One arm over its seeds' runs: means of every figure (counters rounded to whole
    numbers; a time to target only when every seed reached it, else None: the mean of the
    seeds that did would flatter the arm), the mean accuracy at each evaluation time, the
    staleness histogram pooled over the seeds, wall-clock time summed. ``extra`` keeps the
    mean of each number and each text all seeds agree on."""
    if not runs:
        raise ValueError("aggregate_arm: no runs")
    first = runs[0]
    n = len(runs)

    def mean(values: list[float]) -> float:
        return math.fsum(values) / len(values)

    def count(name: str) -> int:
        return round(mean([float(getattr(r, name)) for r in runs]))

    def crossing(name: str) -> float | None:
        values = [getattr(r, name) for r in runs]
        return None if any(v is None for v in values) else mean([float(v) for v in values])

    tiers = sorted({t for r in runs for t in r.bytes_by_tier})
    staleness: dict[int, int] = {}
    for r in runs:
        for k, v in r.staleness_histogram.items():
            staleness[k] = staleness.get(k, 0) + v
    series = [
        (t, s.mean if s.mean is not None else math.nan)
        for t, s in _band([r.accuracy_series for r in runs])
    ]
    extra: dict[str, ExtraValue] = {}
    for key in dict.fromkeys(k for r in runs for k in r.extra):
        values = [r.extra[key] for r in runs if key in r.extra]
        if len(values) < n:
            continue
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            avg = mean([float(v) for v in values])
            whole = all(isinstance(v, int) for v in values)
            extra[key] = avg if not whole or avg != int(avg) else int(avg)
        elif all(v == values[0] for v in values):
            extra[key] = values[0]
    return ArmResult(
        name=first.name,
        algorithm=first.algorithm,
        topology=first.topology,
        final_accuracy=mean([r.final_accuracy for r in runs]),
        time_to_target_s=crossing("time_to_target_s"),
        target_accuracy=first.target_accuracy,
        bytes_up=count("bytes_up"),
        bytes_down=count("bytes_down"),
        bytes_by_tier={
            t: round(mean([float(r.bytes_by_tier.get(t, 0)) for r in runs])) for t in tiers
        },
        updates_applied=count("updates_applied"),
        updates_duplicated=count("updates_duplicated"),
        max_staleness=max(r.max_staleness for r in runs),
        staleness_histogram=dict(sorted(staleness.items())),
        accuracy_series=series,
        wall_seconds=math.fsum(r.wall_seconds for r in runs),
        virtual_seconds=max(r.virtual_seconds for r in runs),
        jobs_started=count("jobs_started"),
        jobs_finished=count("jobs_finished"),
        jobs_dropped=count("jobs_dropped"),
        versions=count("versions"),
        extra=extra,
        first_crossing_s=crossing("first_crossing_s"),
        sustained_crossing_s=crossing("sustained_crossing_s"),
    )


def multi_seed_report(
    scenario: str,
    seed: int,
    description: str,
    seeds: list[int],
    runs: dict[str, list[ArmResult]],
    meta: dict[str, Any],
) -> Report:
    """The report of several seeds: ``runs[arm]`` holds the arm's run of each seed, in
    ``seeds``' order; the arms are their aggregates (``aggregate_arm``)."""
    return Report(
        scenario=scenario,
        seed=seed,
        description=description,
        arms=[aggregate_arm(r) for r in runs.values()],
        meta=meta,
        seeds=tuple(seeds),
        runs={name: list(r) for name, r in runs.items()},
    )


# ---------------------------------------------------------------------------------------------
# JSON


def _round(x: float | None, decimals: int) -> float | None:
    """Round for the file; non-finite numbers become null (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return round(x, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0


def _significant(x: float) -> float | None:
    if not math.isfinite(x):
        return None
    return float(f"{x:.{FREE_FORM_DIGITS}g}") + 0.0


def _plain(value: Any, where: str) -> Any:
    """Free-form meta/extra values as plain JSON data with sorted keys; numpy values welcome."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _significant(float(value))
    if isinstance(value, Mapping):
        items = sorted(((str(k), v) for k, v in value.items()), key=lambda kv: kv[0])
        return {k: _plain(v, f"{where}.{k}") for k, v in items}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars (np.bool_ is no bool subclass)
        return _plain(value.tolist(), where)
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in report.json")


def _summary_dict(s: Summary) -> dict[str, Any]:
    ci = None if s.ci_low is None else [_significant(s.ci_low), _significant(s.ci_high or 0.0)]
    return {
        "n": s.n,
        "mean": None if s.mean is None else _significant(s.mean),
        "std": None if s.std is None else _significant(s.std),
        "ci95": ci,
    }


def _ratio_dict(s: RatioSummary, per_seed: list[float | None]) -> dict[str, Any]:
    ci = (
        None
        if s.ci_low is None
        else [_round(s.ci_low, SPEEDUP_DECIMALS), _round(s.ci_high, SPEEDUP_DECIMALS)]
    )
    return {
        "n": s.n,
        "geomean": _round(s.geomean, SPEEDUP_DECIMALS),
        "std": _round(s.std, SPEEDUP_DECIMALS),
        "ci95": ci,
        "per_seed": [_round(r, SPEEDUP_DECIMALS) for r in per_seed],
    }


def _stats_dict(report: Report, arm: ArmResult) -> dict[str, Any]:
    """``stats`` of an arm over several seeds: every figure's n/mean/std/ci95, then the
    speed-ups (paired by seed, ``sim.stats.ratio_summary``)."""
    runs = report.runs[arm.name]
    out = {k: _summary_dict(v) for k, v in seed_stats(runs).items()}
    for key, first in (("speedup_vs_baseline", False), ("speedup_first_vs_baseline", True)):
        per_seed = per_seed_speedups(report, arm.name, first=first)
        out[key] = _ratio_dict(ratio_summary(per_seed), per_seed)
    return out


def _arm_to_dict(report: Report, arm: ArmResult) -> dict[str, Any]:
    # Field order is the reading order: identity, headline numbers, counters, then long series.
    ratio = speedup(report, arm)
    hist = {str(s): int(arm.staleness_histogram[s]) for s in sorted(arm.staleness_histogram)}
    many = arm.name in report.runs
    out: dict[str, Any] = {
        "name": arm.name,
        "algorithm": arm.algorithm,
        "topology": arm.topology,
        "target_accuracy": _round(arm.target_accuracy, ACCURACY_DECIMALS),
        "final_accuracy": _round(arm.final_accuracy, ACCURACY_DECIMALS),
        "best_accuracy": _round(best_accuracy(arm), ACCURACY_DECIMALS),
        "time_to_target_s": _round(arm.time_to_target_s, SECONDS_DECIMALS),
        "first_crossing_s": _round(arm.first_crossing_s, SECONDS_DECIMALS),
        "sustained_crossing_s": _round(arm.sustained_crossing_s, SECONDS_DECIMALS),
        "speedup_vs_baseline": _round(ratio, SPEEDUP_DECIMALS),
        "speedup_first_vs_baseline": _round(speedup(report, arm, first=True), SPEEDUP_DECIMALS),
        "bytes_up": int(arm.bytes_up),
        "bytes_down": int(arm.bytes_down),
        "bytes_by_tier": {t: int(arm.bytes_by_tier[t]) for t in sorted(arm.bytes_by_tier)},
        "updates_applied": int(arm.updates_applied),
        "updates_duplicated": int(arm.updates_duplicated),
        "max_staleness": int(arm.max_staleness),
        "staleness_histogram": hist,
        "jobs_started": int(arm.jobs_started),
        "jobs_finished": int(arm.jobs_finished),
        "jobs_dropped": int(arm.jobs_dropped),
        "versions": int(arm.versions),
        "virtual_seconds": _round(arm.virtual_seconds, SECONDS_DECIMALS),
        "wall_seconds": _round(arm.wall_seconds, SECONDS_DECIMALS),
        "extra": _plain(arm.extra, f"arms[{arm.name}].extra"),
        "accuracy_series": [
            [_round(t, SECONDS_DECIMALS), _round(a, ACCURACY_DECIMALS)]
            for t, a in arm.accuracy_series
        ],
    }
    if many:
        # Over seeds: the figures' statistics, then each seed's own run in full.
        out["stats"] = _stats_dict(report, arm)
        out["seeds"] = [
            {"seed": int(s), **_arm_to_dict(seed_report(report, i), r)}
            for i, (s, r) in enumerate(zip(report.seeds, report.runs[arm.name], strict=True))
        ]
    return out


def report_to_dict(report: Report) -> dict[str, Any]:
    """The report as plain JSON data, in the key order report.json uses."""
    base = report.baseline
    return {
        "format": FORMAT,
        "scenario": report.scenario,
        "seed": int(report.seed),
        **({"seeds": [int(s) for s in report.seeds]} if report.runs else {}),
        "description": report.description,
        "baseline": base.name if base is not None else None,
        "meta": _plain(report.meta, "meta"),
        "arms": [_arm_to_dict(report, arm) for arm in report.arms],
    }


def _dump(value: Any, depth: int = 0) -> str:
    """Indented JSON that keeps short lists (series points) on one line each."""
    if isinstance(value, dict):
        if not value:
            return "{}"
        pad = "  " * (depth + 1)
        items = [f"{pad}{_scalar(k)}: {_dump(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * depth + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        if all(not isinstance(v, dict | list) for v in value):
            return "[" + ", ".join(_scalar(v) for v in value) + "]"
        pad = "  " * (depth + 1)
        items = [pad + _dump(v, depth + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * depth + "]"
    return _scalar(value)


def _scalar(value: Any) -> str:
    return json.dumps(value, allow_nan=False, ensure_ascii=False)


def dumps_report(report: Report) -> str:
    """The exact text of report.json."""
    return _dump(report_to_dict(report)) + "\n"


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _arm_from_dict(d: Mapping[str, Any]) -> ArmResult:
    return ArmResult(
        name=str(d["name"]),
        algorithm=str(d["algorithm"]),
        topology=str(d["topology"]),
        final_accuracy=_float(d["final_accuracy"]),
        time_to_target_s=_opt_float(d.get("time_to_target_s")),
        target_accuracy=_opt_float(d.get("target_accuracy")),
        bytes_up=int(d.get("bytes_up", 0)),
        bytes_down=int(d.get("bytes_down", 0)),
        bytes_by_tier={str(k): int(v) for k, v in d.get("bytes_by_tier", {}).items()},
        updates_applied=int(d.get("updates_applied", 0)),
        updates_duplicated=int(d.get("updates_duplicated", 0)),
        max_staleness=int(d.get("max_staleness", 0)),
        staleness_histogram={int(k): int(v) for k, v in d.get("staleness_histogram", {}).items()},
        accuracy_series=[(_float(t), _float(a)) for t, a in d.get("accuracy_series", [])],
        wall_seconds=_float(d.get("wall_seconds", 0.0)),
        virtual_seconds=_float(d.get("virtual_seconds", 0.0)),
        jobs_started=int(d.get("jobs_started", 0)),
        jobs_finished=int(d.get("jobs_finished", 0)),
        jobs_dropped=int(d.get("jobs_dropped", 0)),
        versions=int(d.get("versions", 0)),
        extra=dict(d.get("extra", {})),
        first_crossing_s=_opt_float(d.get("first_crossing_s")),
        sustained_crossing_s=_opt_float(d.get("sustained_crossing_s")),
    )


def report_from_dict(d: Mapping[str, Any]) -> Report:
    """Inverse of `report_to_dict` (derived fields such as speed-ups are recomputed)."""
    fmt = d.get("format")
    if not isinstance(fmt, str) or not fmt.startswith("fedloom.report/"):
        raise ValueError(f"not a fedloom report (format = {fmt!r}, expected {FORMAT!r})")
    try:
        seeds = tuple(int(s) for s in d.get("seeds", ()))
        runs = {
            str(a["name"]): [_arm_from_dict(r) for r in a["seeds"]]
            for a in d["arms"]
            if "seeds" in a
        }
        return Report(
            scenario=str(d["scenario"]),
            seed=int(d["seed"]),
            description=str(d.get("description", "")),
            arms=[_arm_from_dict(a) for a in d["arms"]],
            meta=dict(d.get("meta", {})),
            seeds=seeds,
            runs=runs,
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed fedloom report: {exc!r}") from exc


def load_report(path: Path | str) -> Report:
    """Read a report from report.json or from the run directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    timing = path.with_name("timing.json")
    if timing.is_file():  # the wall-clock numbers write_report keeps apart
        doc = _merged(doc, json.loads(timing.read_text(encoding="utf-8")))
    return report_from_dict(doc)


def _is_wall_key(key: str) -> bool:
    return any(t in ("wall", "wallclock", "walltime") for t in re.split(r"[^a-z0-9]+", key.lower()))


def wall_part(report_dict: Any) -> Any:
    """What ``strip_wall`` drops: the wall-clock keys at any depth, with the dicts and lists
    of dicts holding them (a list keeps its length, so ``_merged`` puts each back)."""
    if isinstance(report_dict, Mapping):
        out = {}
        for k, v in report_dict.items():
            if isinstance(k, str) and _is_wall_key(k):
                out[k] = v
            elif isinstance(v, Mapping | list):
                inner = wall_part(v)
                if inner:
                    out[k] = inner
        return out
    if isinstance(report_dict, list) and any(isinstance(v, Mapping) for v in report_dict):
        parts = [wall_part(v) for v in report_dict]
        return parts if any(parts) else []
    return {} if isinstance(report_dict, Mapping) else []


def _merged(doc: Any, wall: Any) -> Any:
    """``doc`` with the wall-clock part ``wall`` (``wall_part``) put back."""
    if isinstance(doc, Mapping) and isinstance(wall, Mapping):
        out = dict(doc)
        for k, v in wall.items():
            out[k] = _merged(out[k], v) if k in out else v
        return out
    if isinstance(doc, list) and isinstance(wall, list) and len(doc) == len(wall):
        return [_merged(d, w) for d, w in zip(doc, wall, strict=True)]
    return wall if not isinstance(doc, Mapping | list) else doc


def strip_wall(report_dict: Any) -> Any:
    """A copy of (parsed) report.json without wall-clock keys, at any depth."""
    if isinstance(report_dict, Mapping):
        return {
            k: strip_wall(v)
            for k, v in report_dict.items()
            if not (isinstance(k, str) and _is_wall_key(k))
        }
    if isinstance(report_dict, list):
        return [strip_wall(v) for v in report_dict]
    return report_dict


# ---------------------------------------------------------------------------------------------
# Files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and os.replace: readers see the old
    file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return buf.getvalue()


def accuracy_csv(report: Report) -> str:
    """arm,time_s,accuracy; over several seeds the accuracy is the seeds' mean, followed by
    its std, 95% interval and n (what the accuracy plot's bands draw)."""
    if report.runs:
        acc = ACCURACY_DECIMALS
        rows = [
            [
                arm.name,
                _round(t, SECONDS_DECIMALS),
                _round(b.mean, acc),
                _round(b.std, acc),
                _round(b.ci_low, acc),
                _round(b.ci_high, acc),
                b.n,
            ]
            for arm in report.arms
            for t, b in _band([r.accuracy_series for r in report.runs[arm.name]])
        ]
        header = ["arm", "time_s", "accuracy", "std", "ci95_low", "ci95_high", "n"]
        return _csv_text(header, rows)
    rows = [
        [arm.name, _round(t, SECONDS_DECIMALS), _round(a, ACCURACY_DECIMALS)]
        for arm in report.arms
        for t, a in arm.accuracy_series
    ]
    return _csv_text(["arm", "time_s", "accuracy"], rows)


def accuracy_by_seed_csv(report: Report) -> str:
    """arm,seed,time_s,accuracy: every seed's own series (a report over several seeds)."""
    rows = [
        [name, int(seed), _round(t, SECONDS_DECIMALS), _round(a, ACCURACY_DECIMALS)]
        for name, runs in report.runs.items()
        for seed, run in zip(report.seeds, runs, strict=True)
        for t, a in run.accuracy_series
    ]
    return _csv_text(["arm", "seed", "time_s", "accuracy"], rows)


def staleness_csv(report: Report) -> str:
    rows = [
        [arm.name, int(s), int(arm.staleness_histogram[s])]
        for arm in report.arms
        for s in sorted(arm.staleness_histogram)
    ]
    return _csv_text(["arm", "staleness", "count"], rows)


def bytes_csv(report: Report) -> str:
    rows = [[arm.name, tier, n] for arm in report.arms for tier, n in tier_bytes(arm).items()]
    return _csv_text(["arm", "tier", "bytes"], rows)


def write_report(report: Report, out_dir: Path | str, *, plots: bool = True) -> dict[str, Path]:
    """Write the run directory; returns {kind: path}. Data files go first, so a plotting
    failure never costs the numbers. The files an earlier run wrote there go first of all:
    a one-seed run kept a multi-seed run's accuracy_by_seed.csv beside its report, and a
    run stopped while plotting would have left the earlier run's plots beside its numbers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    doc = report_to_dict(report)
    texts = {
        "report": ("report.json", _dump(strip_wall(doc)) + "\n"),
        "timing": ("timing.json", _dump(wall_part(doc)) + "\n"),
        "accuracy_csv": ("accuracy.csv", accuracy_csv(report)),
        **(
            {"accuracy_by_seed_csv": ("accuracy_by_seed.csv", accuracy_by_seed_csv(report))}
            if report.runs
            else {}
        ),
        "staleness_csv": ("staleness.csv", staleness_csv(report)),
        "bytes_csv": ("bytes.csv", bytes_csv(report)),
        "summary": ("summary.txt", format_summary(report) + "\n"),
    }
    written: dict[str, Path] = {}
    for key, (name, text) in texts.items():
        atomic_write_bytes(out / name, text.encode("utf-8"))
        written[key] = out / name
    if plots:
        from fedloom.sim import plots as plotting  # matplotlib only when plots are wanted

        drawn = [
            ("accuracy_plot", plotting.plot_accuracy, "accuracy"),
            ("staleness_plot", plotting.plot_staleness, "staleness"),
            ("bytes_plot", plotting.plot_bytes, "bytes"),
        ]
        if plotting.arms_differ_in_epsilon(report):
            drawn.append(("epsilon_plot", plotting.plot_epsilon, "accuracy_vs_epsilon"))
        for key, plot, stem in drawn:
            written[key] = plot(report, out / f"{stem}.png", formats=PLOT_FORMATS)
            for fmt in PLOT_FORMATS[1:]:
                written[f"{key}_{fmt}"] = out / f"{stem}.{fmt}"
    return written


# Every plot is written as PNG (to look at), SVG and PDF (vector, for papers).
PLOT_FORMATS = ("png", "svg", "pdf")
# Every file write_report may write (others in the directory are left alone).
RUN_FILES = (
    "report.json",
    "timing.json",
    "accuracy.csv",
    "accuracy_by_seed.csv",
    "staleness.csv",
    "bytes.csv",
    "summary.txt",
    *(
        f"{stem}.{fmt}"
        for stem in ("accuracy", "staleness", "bytes", "accuracy_vs_epsilon")
        for fmt in PLOT_FORMATS
    ),
)


# ---------------------------------------------------------------------------------------------
# Summary table

SUMMARY_COLUMNS = (
    "arm",
    "final acc",
    "time to target",
    "first crossing",
    "speed-up",
    "bytes up",
    "bytes down",
    "applied",
    "duplicated",
    "max staleness",
    "wall s",
)


def summary_rows(report: Report) -> list[list[str]]:
    """One row of display strings per arm, in SUMMARY_COLUMNS order."""
    if report.runs:
        return _seed_rows(report)
    rows = []
    for arm in report.arms:
        ratio = speedup(report, arm)
        acc = arm.final_accuracy
        rows.append(
            [
                arm.name,
                f"{acc:.3f}" if math.isfinite(acc) else "—",
                human_duration(arm.time_to_target_s),
                human_duration(arm.first_crossing_s),
                f"{ratio:.2f}×" if ratio is not None else "—",
                *_traffic_cells(arm),
            ]
        )
    return rows


def _traffic_cells(arm: ArmResult) -> list[str]:
    """The summary's last cells: bytes, updates, staleness and wall-clock seconds."""
    return [
        human_bytes(arm.bytes_up),
        human_bytes(arm.bytes_down),
        f"{arm.updates_applied:,}",
        f"{arm.updates_duplicated:,}",
        f"{arm.max_staleness:,}",
        f"{arm.wall_seconds:,.1f}",
    ]


def _seed_rows(report: Report) -> list[list[str]]:
    """Rows over several seeds: mean ± the 95% interval's half-width; a time to target with
    (k/n) when only k of the n seeds reached it; speed-ups as geometric mean [interval]."""
    n = len(report.seeds)

    def pm(s: Summary, show: Any) -> str:
        if s.mean is None:
            return "—"
        text = show(s.mean)
        if s.ci_high is not None:
            half = s.ci_high - s.mean
            text += f" ± {show(half)}" if half > 0 else " ± 0"
        return text if s.n == n else f"{text} ({s.n}/{n})"

    def ratio(r: RatioSummary) -> str:
        if r.geomean is None:
            return "—"
        text = f"{r.geomean:.2f}×"
        if r.ci_low is not None and r.ci_high is not None:
            text += f" [{r.ci_low:.2f}–{r.ci_high:.2f}]"
        return text if r.n == n else f"{text} ({r.n}/{n})"

    rows = []
    for arm in report.arms:
        st = seed_stats(report.runs[arm.name])
        rows.append(
            [
                arm.name,
                pm(st["final_accuracy"], lambda v: f"{v:.3f}"),
                pm(st["time_to_target_s"], human_duration),
                pm(st["first_crossing_s"], human_duration),
                ratio(speedup_summary(report, arm.name)),
                *_traffic_cells(arm),
            ]
        )
    return rows


def _summary_caption(report: Report) -> str:
    targets = sorted({a.target_accuracy for a in report.arms if a.target_accuracy is not None})
    parts = [f"seed {report.seed} (one seed: no confidence intervals, see --seeds)"]
    if report.runs:
        shown = ", ".join(str(s) for s in report.seeds)
        parts = [f"{len(report.seeds)} seeds ({shown}): mean ± 95% CI"]
    if targets:
        parts.append("target accuracy " + ", ".join(f"{t:g}" for t in targets))
    base = report.baseline
    if base is not None:
        parts.append(f"speed-up vs {base.name}")
    return " · ".join(parts)


def summary_table(report: Report) -> Table:
    """The summary as a rich Table (for the CLI)."""
    from rich.markup import escape
    from rich.table import Table

    # Names are the researcher's text, not markup: "[red]b" lost its brackets, "[/]a" raised.
    table = Table(title=escape(report.scenario), caption=escape(_summary_caption(report)))
    for i, col in enumerate(SUMMARY_COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in summary_rows(report):
        table.add_row(*(escape(cell) for cell in row))
    return table


def format_summary(report: Report) -> str:
    """The summary as aligned plain text (for logs and summary.txt)."""
    header = list(SUMMARY_COLUMNS)
    rows = summary_rows(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    lines = [f"{report.scenario} — {_summary_caption(report)}"]
    if report.description:
        lines.append(report.description)
    lines += [line(header), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in rows]
    return "\n".join(lines)


__all__ = [
    "FORMAT",
    "SUMMARY_COLUMNS",
    "ArmResult",
    "Report",
    "accuracy_csv",
    "atomic_write_bytes",
    "byte_unit",
    "bytes_csv",
    "dumps_report",
    "format_summary",
    "human_bytes",
    "human_duration",
    "load_report",
    "report_from_dict",
    "report_to_dict",
    "speedup",
    "staleness_csv",
    "strip_wall",
    "summary_rows",
    "summary_table",
    "tier_bytes",
    "time_axis_unit",
    "write_report",
]
