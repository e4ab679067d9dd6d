"""Run reports: the numbers, series and plots a researcher keeps from one scenario run.

The scenario runner produces one `ArmResult` per arm (one algorithm/topology configuration) and
wraps them in a `Report`. `write_report` turns it into a run directory:

    report.json     every number; stable key order and fixed rounding, so the same run gives the
                    same bytes
    accuracy.csv    arm,time_s,accuracy
    staleness.csv   arm,staleness,count
    bytes.csv       arm,tier,bytes
    summary.txt     the plain-text summary table (`format_summary`)
    accuracy.png, staleness.png, bytes.png   (`sim.plots`)
    accuracy_vs_epsilon.png   when arms differ in ε (``extra["dp_epsilon"]``, the central
                    ledger's, or ``dp_sgd_epsilon_max``, the DP-SGD sites' largest)

Wall-clock numbers are the only thing that may differ between two runs with the same seed. They
live in keys whose name has the word "wall" in it (`wall_seconds`, `meta["wall_total_s"]`, ...);
`strip_wall` drops them so tests can compare runs. Anything else that is not deterministic must
not go into `meta` or `extra`.
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

    def __post_init__(self) -> None:
        names = [arm.name for arm in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Report: arm names must be unique, repeated: {', '.join(dupes)}")
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


def speedup(report: Report, arm: ArmResult) -> float | None:
    """Baseline time-to-target over this arm's; None when either never reached the target."""
    base = report.baseline
    if base is None or base.time_to_target_s is None or arm.time_to_target_s is None:
        return None
    if arm.name == base.name:
        return 1.0
    if arm.time_to_target_s <= 0.0:
        return None  # reached at t=0: the ratio means nothing
    return base.time_to_target_s / arm.time_to_target_s


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


def _arm_to_dict(report: Report, arm: ArmResult) -> dict[str, Any]:
    # Field order is the reading order: identity, headline numbers, counters, then long series.
    ratio = speedup(report, arm)
    hist = {str(s): int(arm.staleness_histogram[s]) for s in sorted(arm.staleness_histogram)}
    return {
        "name": arm.name,
        "algorithm": arm.algorithm,
        "topology": arm.topology,
        "target_accuracy": _round(arm.target_accuracy, ACCURACY_DECIMALS),
        "final_accuracy": _round(arm.final_accuracy, ACCURACY_DECIMALS),
        "time_to_target_s": _round(arm.time_to_target_s, SECONDS_DECIMALS),
        "speedup_vs_baseline": _round(ratio, SPEEDUP_DECIMALS),
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


def report_to_dict(report: Report) -> dict[str, Any]:
    """The report as plain JSON data, in the key order report.json uses."""
    base = report.baseline
    return {
        "format": FORMAT,
        "scenario": report.scenario,
        "seed": int(report.seed),
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
    )


def report_from_dict(d: Mapping[str, Any]) -> Report:
    """Inverse of `report_to_dict` (derived fields such as speed-ups are recomputed)."""
    fmt = d.get("format")
    if not isinstance(fmt, str) or not fmt.startswith("fedloom.report/"):
        raise ValueError(f"not a fedloom report (format = {fmt!r}, expected {FORMAT!r})")
    try:
        return Report(
            scenario=str(d["scenario"]),
            seed=int(d["seed"]),
            description=str(d.get("description", "")),
            arms=[_arm_from_dict(a) for a in d["arms"]],
            meta=dict(d.get("meta", {})),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed fedloom report: {exc!r}") from exc


def load_report(path: Path | str) -> Report:
    """Read a report from report.json or from the run directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    return report_from_dict(json.loads(path.read_text(encoding="utf-8")))


def _is_wall_key(key: str) -> bool:
    return any(t in ("wall", "wallclock", "walltime") for t in re.split(r"[^a-z0-9]+", key.lower()))


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
    rows = [
        [arm.name, _round(t, SECONDS_DECIMALS), _round(a, ACCURACY_DECIMALS)]
        for arm in report.arms
        for t, a in arm.accuracy_series
    ]
    return _csv_text(["arm", "time_s", "accuracy"], rows)


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
    failure never costs the numbers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = {
        "report": ("report.json", dumps_report(report)),
        "accuracy_csv": ("accuracy.csv", accuracy_csv(report)),
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

        written["accuracy_plot"] = plotting.plot_accuracy(report, out / "accuracy.png")
        written["staleness_plot"] = plotting.plot_staleness(report, out / "staleness.png")
        written["bytes_plot"] = plotting.plot_bytes(report, out / "bytes.png")
        if plotting.arms_differ_in_epsilon(report):
            written["epsilon_plot"] = plotting.plot_epsilon(report, out / "accuracy_vs_epsilon.png")
    return written


# ---------------------------------------------------------------------------------------------
# Summary table

SUMMARY_COLUMNS = (
    "arm",
    "final acc",
    "time to target",
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
    rows = []
    for arm in report.arms:
        ratio = speedup(report, arm)
        acc = arm.final_accuracy
        rows.append(
            [
                arm.name,
                f"{acc:.3f}" if math.isfinite(acc) else "—",
                human_duration(arm.time_to_target_s),
                f"{ratio:.2f}×" if ratio is not None else "—",
                human_bytes(arm.bytes_up),
                human_bytes(arm.bytes_down),
                f"{arm.updates_applied:,}",
                f"{arm.updates_duplicated:,}",
                f"{arm.max_staleness:,}",
                f"{arm.wall_seconds:,.1f}",
            ]
        )
    return rows


def _summary_caption(report: Report) -> str:
    targets = sorted({a.target_accuracy for a in report.arms if a.target_accuracy is not None})
    parts = [f"seed {report.seed}"]
    if targets:
        parts.append("target accuracy " + ", ".join(f"{t:g}" for t in targets))
    base = report.baseline
    if base is not None:
        parts.append(f"speed-up vs {base.name}")
    return " · ".join(parts)


def summary_table(report: Report) -> Table:
    """The summary as a rich Table (for the CLI)."""
    from rich.table import Table

    table = Table(title=f"{report.scenario}", caption=_summary_caption(report))
    for i, col in enumerate(SUMMARY_COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in summary_rows(report):
        table.add_row(*row)
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
