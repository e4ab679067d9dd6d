"""Plots of a run report: accuracy over virtual time, update staleness, bytes per tier.

matplotlib is imported inside the functions, so the simulator pays for it only when it writes
plots, and it is used through `matplotlib.figure.Figure` directly: that renders with the Agg
canvas and never touches pyplot's global figure state or the user's chosen backend. Each arm keeps
one colour (Okabe-Ito, colour-blind safe) across all plots. Files are written atomically, as
PNG and, with ``formats``, SVG and PDF beside it (vector, for papers; no creation date in
them, so the same report draws the same bytes). A report over several seeds draws each
arm's mean accuracy in a band of its 95% confidence interval (``sim.stats``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedloom.sim.report import (
    Report,
    atomic_write_bytes,
    byte_unit,
    human_bytes,
    tier_bytes,
    time_axis_unit,
)
from fedloom.sim.stats import band

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120
# Okabe-Ito without its yellow (unreadable on white), then a few tab10 colours for big sweeps.
PALETTE = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#8c564b",
    "#7f7f7f",
    "#bcbd22",
)
# Tiers get their own colours so a tier bar is never mistaken for an arm: cool for traffic
# towards the root, warm for traffic away from it, greys for peer-to-peer and anything else.
_UP_COLORS = ("#4C72B0", "#55A868", "#64B5CD", "#8172B3")
_DOWN_COLORS = ("#DD8452", "#C44E52", "#DA8BC3", "#CCB974")
_SIDE_COLORS = ("#8C8C8C", "#937860", "#5F5F5F", "#B0B0B0")
_ROLE_RANK = {"site": 0, "peer": 0, "region": 1, "root": 2}
_MAX_BARS = 60  # wider staleness ranges are binned so every bar stays visible
_STYLE: dict[Any, Any] = {  # Any keys: matplotlib types rc names as Literals
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "font.size": 9.5,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "figure.titlesize": 12,
    "figure.titleweight": "bold",
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "svg.hashsalt": "fedloom",  # stable element ids in SVG files
    # Scenario and arm names are drawn as written: "$...$" in one was read as mathtext (a
    # ParseFatalException for "$\undefinedcmd$", math for "$x$").
    "text.parse_math": False,
}


def arm_color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        yield


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


# No creation dates in vector files: the same report draws the same bytes.
_NO_DATE: dict[str, dict[str, Any]] = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}


def _save(fig: Figure, path: Path | str, formats: Sequence[str] = ("png",)) -> Path:
    """Write ``path`` (its format from ``formats[0]``) and, for each other format, the file
    beside it with that suffix (``accuracy.svg``, ``accuracy.pdf``); returns ``path``."""
    path = Path(path)
    for i, fmt in enumerate(formats):
        target = path if i == 0 else path.with_suffix(f".{fmt}")
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI, facecolor="white", metadata=_NO_DATE.get(fmt))
        atomic_write_bytes(target, buf.getvalue())
    return path


def _no_data(fig: Figure, text: str) -> None:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", color="0.4", transform=ax.transAxes)


# ---------------------------------------------------------------------------------------------
# Accuracy


def accuracy_figure(report: Report) -> Figure:
    """Accuracy against virtual time, one line per arm; dashed target line(s); a hollow marker
    where each arm reached its target (the sustained crossing). Over several seeds each line
    is the seeds' mean, in a band of its 95% confidence interval."""
    with _style():
        fig = _new_figure(8.0, 4.8)
        series = [
            [(t, a) for t, a in arm.accuracy_series if math.isfinite(t) and math.isfinite(a)]
            for arm in report.arms
        ]
        if not any(series):
            _no_data(fig, "no accuracy measured")
            fig.suptitle(f"{report.scenario}: accuracy vs virtual time")
            return fig
        t_max = max(t for pts in series for t, _ in pts)
        unit, scale = time_axis_unit(t_max)
        ax = fig.add_subplot()
        for i, (arm, pts) in enumerate(zip(report.arms, series, strict=True)):
            if not pts:
                continue
            color = arm_color(i)
            runs = report.runs.get(arm.name, [])
            label = arm.name
            if len(runs) > 1:
                spread = [
                    (t / scale, s.ci_low, s.ci_high)
                    for t, s in band([r.accuracy_series for r in runs])
                    if s.ci_low is not None and s.ci_high is not None
                ]
                if spread:
                    ax.fill_between(
                        [t for t, _, _ in spread],
                        [lo for _, lo, _ in spread],
                        [hi for _, _, hi in spread],
                        color=color,
                        alpha=0.18,
                        lw=0,
                        label="_band",
                        gid=f"band-{arm.name}",
                    )
                label = f"{arm.name} (mean of {len(runs)} seeds)"
            ax.plot(
                [t / scale for t, _ in pts],
                [a for _, a in pts],
                color=color,
                lw=1.8,
                marker="o" if len(pts) <= 30 else None,
                ms=3,
                label=label,
            )
            if arm.time_to_target_s is not None and arm.target_accuracy is not None:
                ax.plot(
                    arm.time_to_target_s / scale,
                    arm.target_accuracy,
                    marker="o",
                    ms=8,
                    mfc="white",
                    mec=color,
                    mew=1.8,
                    zorder=5,
                )
        targets = sorted({a.target_accuracy for a in report.arms if a.target_accuracy is not None})
        for target in targets:
            ax.axhline(target, ls="--", lw=1.1, color="0.35", label=f"target {target:g}", zorder=1)
        if any(a.time_to_target_s is not None for a in report.arms):
            # Legend-only proxy explaining the hollow markers.
            ax.plot(
                [],
                [],
                ls="none",
                marker="o",
                ms=8,
                mfc="white",
                mec="0.35",
                mew=1.8,
                label="target reached",
            )
        ax.set_xlim(left=0)
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, 0.0), min(hi, 1.01))
        ax.set_xlabel(f"virtual time ({unit})")
        ax.set_ylabel("test accuracy")
        title = f"{report.scenario}: accuracy vs virtual time"
        if report.runs:
            title += f" (bands: 95% CI over {len(report.seeds)} seeds)"
        ax.set_title(title)
        if len(report.arms) + len(targets) <= 8:
            ax.legend(loc="lower right")
        else:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return fig


def plot_accuracy(report: Report, path: Path | str, *, formats: Sequence[str] = ("png",)) -> Path:
    with _style():
        return _save(accuracy_figure(report), path, formats)


# ---------------------------------------------------------------------------------------------
# Accuracy against epsilon


def epsilon_figure(report: Report) -> Figure:
    """Final accuracy against ε at δ (log axis), one point per private arm (``extra``'s
    ``dp_epsilon``: the root's central ledger, else the DP-SGD sites' largest ε); every arm
    without DP is a dashed horizontal line at its accuracy. A square marks a private arm
    whose noise the secure-aggregation members added."""
    with _style():
        fig = _new_figure(7.0, 4.6)
        private = [
            (i, arm, float(eps))
            for i, arm in enumerate(report.arms)
            if (eps := epsilon_of(arm)) is not None and math.isfinite(arm.final_accuracy)
        ]
        plain = [
            (i, arm)
            for i, arm in enumerate(report.arms)
            if epsilon_of(arm) is None and math.isfinite(arm.final_accuracy)
        ]
        if not private:
            _no_data(fig, "no arm with differential privacy")
            fig.suptitle(f"{report.scenario}: accuracy vs epsilon")
            return fig
        ax = fig.add_subplot()
        for i, arm, eps in private:
            secure = bool(arm.extra.get("secagg_cohorts_sealed") is not None)
            ax.plot(
                [max(eps, 1e-3)],
                [arm.final_accuracy],
                ls="none",
                marker="s" if secure else "o",
                ms=8,
                color=arm_color(i),
                label=f"{arm.name} (ε = {eps:.3g})",
                zorder=5,
            )
        # Arms of one algorithm and mechanism joined by a thin line, in ε order (the trend).
        groups: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        for _, arm, eps in private:
            key = (arm.algorithm, arm.extra.get("secagg_cohorts_sealed") is not None)
            groups.setdefault(key, []).append((max(eps, 1e-3), arm.final_accuracy))
        for points in groups.values():
            if len(points) > 1:
                points.sort()
                ax.plot([e for e, _ in points], [a for _, a in points], color="0.6", lw=1)
        for i, arm in plain:
            ax.axhline(
                arm.final_accuracy,
                ls="--",
                lw=1.4,
                color=arm_color(i),
                label=f"{arm.name} (no DP)",
                zorder=1,
            )
        ax.set_xscale("log")
        epsilons = [max(e, 1e-3) for _, _, e in private]
        ax.set_xlim(min(epsilons) / 2.0, max(epsilons) * 2.0)
        ticks = sorted({float(f"{e:.2g}") for e in epsilons})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xticks([], minor=True)
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, 0.0), min(hi, 1.01))
        delta = next((a.extra.get("dp_delta") for _, a, _ in private), None)
        at = f" at δ = {float(delta):g}" if isinstance(delta, int | float) else ""
        ax.set_xlabel(f"ε{at} (log scale)")
        ax.set_ylabel("final test accuracy")
        ax.set_title(f"{report.scenario}: accuracy vs privacy")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return fig


def epsilon_of(arm: Any) -> float | None:
    """An arm's ε: the central ledger's (``dp_epsilon``), else the DP-SGD sites' largest
    (``dp_sgd_epsilon_max``); None for an arm without differential privacy."""
    for key in ("dp_epsilon", "dp_sgd_epsilon_max"):
        value = arm.extra.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def arms_differ_in_epsilon(report: Report) -> bool:
    """Whether an accuracy-vs-ε plot says anything: a private arm and another ε (or none)."""
    values = {epsilon_of(a) for a in report.arms}
    return len(values) > 1 and any(v is not None for v in values)


def plot_epsilon(report: Report, path: Path | str, *, formats: Sequence[str] = ("png",)) -> Path:
    with _style():
        return _save(epsilon_figure(report), path, formats)


# ---------------------------------------------------------------------------------------------
# Staleness


def _binned(hist: dict[int, int], width: int) -> tuple[list[int], list[int]]:
    bins: dict[int, int] = {}
    for staleness, count in hist.items():
        start = (staleness // width) * width
        bins[start] = bins.get(start, 0) + count
    starts = sorted(bins)
    return starts, [bins[s] for s in starts]


def staleness_figure(report: Report) -> Figure:
    """One small histogram per arm, shared x axis, with count/mean/max in the corner."""
    with _style():
        n = max(len(report.arms), 1)
        ncols = min(3, n)
        nrows = math.ceil(n / ncols)
        fig = _new_figure(3.4 * ncols + 0.5, 2.5 * nrows + 0.7)
        title = f"{report.scenario}: staleness of updates"
        if not report.arms:
            _no_data(fig, "no arms")
            fig.suptitle(title)
            return fig
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        top = max((s for a in report.arms for s in a.staleness_histogram), default=0)
        width = max(1, math.ceil((top + 1) / _MAX_BARS))
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
        for i, ax in enumerate(axes.flat):
            if i >= len(report.arms):
                ax.set_visible(False)
                continue
            arm = report.arms[i]
            ax.set_title(arm.name, fontsize=9.5)
            hist = {s: c for s, c in arm.staleness_histogram.items() if c > 0}
            total = sum(hist.values())
            if not total:
                ax.set_yticks([])
                ax.text(
                    0.5,
                    0.5,
                    "no staleness recorded",
                    ha="center",
                    va="center",
                    color="0.4",
                    transform=ax.transAxes,
                )
                continue
            starts, counts = _binned(hist, width)
            align = "edge" if width > 1 else "center"
            ax.bar(starts, counts, width=0.85 * width, align=align, color=arm_color(i), alpha=0.9)
            mean = sum(s * c for s, c in hist.items()) / total
            ax.text(
                0.97,
                0.95,
                f"n = {total:,}\nmean {mean:.1f} · max {max(hist)}",
                ha="right",
                va="top",
                fontsize=8,
                transform=ax.transAxes,
                bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.8", "alpha": 0.9},
            )
            ax.grid(axis="x", visible=False)
        for ax in axes.flat:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            # sharex hides labels above other panels; a last row with gaps would lose them.
            ax.tick_params(labelbottom=True)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.set_xlim(-0.7 if width == 1 else 0, max(top, 1) + (0.7 if width == 1 else width))
        xlabel = "staleness (model versions behind)"
        if width > 1:
            xlabel += f", bins of {width}"
        fig.supxlabel(xlabel, fontsize=9.5)
        fig.supylabel("updates", fontsize=9.5)
        fig.suptitle(title)
        return fig


def plot_staleness(report: Report, path: Path | str, *, formats: Sequence[str] = ("png",)) -> Path:
    with _style():
        return _save(staleness_figure(report), path, formats)


# ---------------------------------------------------------------------------------------------
# Bytes


def _tier_key(tier: str) -> tuple[int, int, str]:
    """Canonical tier order: upward tiers leaf first, then sideways, then downward root first."""
    if tier == "up":
        return (0, 0, tier)
    if tier == "down":
        return (2, 0, tier)
    src, sep, dst = tier.partition("->")
    a, b = _ROLE_RANK.get(src.strip()), _ROLE_RANK.get(dst.strip())
    if not sep or a is None or b is None:
        return (3, 0, tier)
    if a < b:
        return (0, a, tier)
    if a > b:
        return (2, -a, tier)
    return (1, a, tier)


def tier_colors(tiers: list[str]) -> dict[str, str]:
    """A colour per tier, from the family of its direction, in canonical order."""
    families = {0: _UP_COLORS, 2: _DOWN_COLORS}
    used = {0: 0, 1: 0, 2: 0, 3: 0}
    colors = {}
    for tier in sorted(tiers, key=_tier_key):
        direction = _tier_key(tier)[0]
        family = families.get(direction, _SIDE_COLORS)
        colors[tier] = family[used[direction] % len(family)]
        used[direction] += 1
    return colors


def bytes_figure(report: Report) -> Figure:
    """Grouped bars: one group per arm, one bar per tier that arm used; tiers keep one colour."""
    with _style():
        per_arm = [tier_bytes(arm) for arm in report.arms]
        tiers = sorted({t for tb in per_arm for t in tb}, key=_tier_key)
        colors = tier_colors(tiers)
        n_arms = len(report.arms)
        fig_w = min(max(7.0, 1.6 + 1.5 * n_arms), 16.0)
        fig = _new_figure(fig_w, 4.8)
        title = f"{report.scenario}: bytes on the wire per tier"
        if not tiers:
            _no_data(fig, "no bytes recorded")
            fig.suptitle(title)
            return fig
        peak = max(n for tb in per_arm for n in tb.values())
        unit, size = byte_unit(peak)
        ax = fig.add_subplot()
        widest = max(len(tb) for tb in per_arm)
        bar_w = 0.8 / widest
        n_bars = sum(len(tb) for tb in per_arm)
        for x, tb in enumerate(per_arm):
            # Centre this arm's own tiers on its tick: no gaps for tiers it never used.
            own = sorted(tb, key=_tier_key)
            offsets = [(j - (len(own) - 1) / 2) * bar_w for j in range(len(own))]
            for off, tier in zip(offsets, own, strict=True):
                bars = ax.bar(x + off, tb[tier] / size, bar_w * 0.92, color=colors[tier])
                if n_bars <= 24:
                    label = _bar_text(tb[tier], size)
                    # Labels carrying their own unit are longer: stand them up so they
                    # cannot run into the next bar's.
                    turn = 90 if " " in label else 0
                    ax.bar_label(bars, labels=[label], padding=2, fontsize=7.5, rotation=turn)
        from matplotlib.patches import Patch

        names = [arm.name for arm in report.arms]
        # Rotate names that would not fit under their group (about 11 characters an inch).
        rotate = max(len(s) for s in names) > (fig_w - 2.6) / n_arms * 11
        ax.set_xticks(
            range(n_arms), names, rotation=20 if rotate else 0, ha="right" if rotate else "center"
        )
        ax.grid(axis="x", visible=False)
        ax.margins(y=0.12)
        ax.set_ylabel(f"bytes ({unit})")
        ax.set_title(title)
        handles = [Patch(color=colors[t], label=t.replace("->", " → ")) for t in tiers]
        ax.legend(handles=handles, title="tier", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return fig


def _bar_text(n: int, size: float) -> str:
    """The bar's value in the axis unit, or in its own unit when it would read as zero."""
    v = n / size
    if v < 0.01 and n > 0:
        return human_bytes(n)
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def plot_bytes(report: Report, path: Path | str, *, formats: Sequence[str] = ("png",)) -> Path:
    with _style():
        return _save(bytes_figure(report), path, formats)


__all__ = [
    "DPI",
    "PALETTE",
    "accuracy_figure",
    "arm_color",
    "bytes_figure",
    "plot_accuracy",
    "plot_bytes",
    "plot_staleness",
    "staleness_figure",
]
