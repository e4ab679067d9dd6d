"""The chaos checker's output: ``report.json``, ``timeline.png`` and one line per verdict.

The plot has three panels sharing the run's time axis: faults as shaded spans, one row per
target (kills and unintended exits as markers on their node's row); each aggregator's
model version; and the accuracy or evaluation metrics the root exports (``fedloom_*``
series whose name says accuracy or eval), when there are any. matplotlib is an optional
extra: without it the report says so and the verdicts stand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedloom.runtime.reports import write_bytes_atomic
from fedloom.transport.error_text import describe

if TYPE_CHECKING:
    from fedloom.runtime.chaos.checker import Report, RunData

__all__ = ["plot_timeline", "write_report"]

_MARKERS = {
    "process_kill": ("x", "tab:red"),
    "process_exit": ("v", "black"),
    "process_start": ("^", "tab:green"),
    "process_pause": ("|", "tab:orange"),
    "process_resume": ("|", "tab:green"),
}


def write_report(run_dir: Path, report: Report, *, echo: bool = True) -> None:
    """Write ``report.json`` and ``timeline.png`` into ``run_dir``; print the verdicts."""
    from fedloom.runtime.chaos.checker import load_run

    out = report.to_json()
    try:
        data = load_run(run_dir)
    except ValueError as exc:
        out["plot"] = f"not drawn: {exc}"
    else:
        try:
            plot_timeline(data, run_dir / "timeline.png")
            out["plot"] = "timeline.png"
        except ImportError as exc:
            out["plot"] = f"not drawn: matplotlib is not installed ({describe(exc)})"
        except Exception as exc:  # the plot is a courtesy: never lose the verdicts over it
            out["plot"] = f"not drawn: {type(exc).__name__}: {describe(exc)}"
    try:
        # Whole or not at all: a crash mid-write must not leave half a report behind.
        text = json.dumps(out, indent=2, default=_plain, allow_nan=False) + "\n"
        write_bytes_atomic(run_dir / "report.json", text.encode("utf-8"), mode=0o644)
    except (OSError, ValueError) as exc:
        print(f"cannot write {run_dir / 'report.json'}: {describe(exc)}")
    if echo:
        for v in report.verdicts:
            print(v.line())


def _plain(obj: Any) -> Any:
    if isinstance(obj, set | frozenset | tuple):
        return sorted(obj) if isinstance(obj, set | frozenset) else list(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def _spans(data: RunData) -> list[tuple[str, float, float, str]]:
    """(target, start, end, fault) of every fault (open ones end with the run)."""
    open_: dict[tuple[str, str], float] = {}
    out = []
    for e in data.timeline:
        fault = str(e.get("fault"))
        for target in e.get("targets") or []:
            key = (str(target), fault)
            if e.get("event") == "fault_start":
                open_.setdefault(key, float(e["t"]))
            elif e.get("event") == "fault_end" and key in open_:
                out.append((key[0], open_.pop(key), float(e["t"]), fault))
    out.extend((t, s, data.end_t, f) for (t, f), s in open_.items())
    return out


def _row(data: RunData, target: str) -> str:
    """The plot row of a node or link: a load site's is its load generator's (a hundred
    rows would hide the rest)."""
    child, sep, parent = target.partition("->")
    if data.nodes.get(child, {}).get("process") == "loadgen":
        return f"loadgen->{parent}" if sep else "loadgen"
    return target


def _down(data: RunData) -> list[tuple[str, float, float]]:
    """(node, from, to) of each intended kill or pause until the restart or resume."""
    since: dict[str, float] = {}
    out = []
    for e in data.timeline:
        kind, t = e.get("event"), float(e["t"])
        detail = e.get("detail")
        if isinstance(detail, dict) and detail.get("end"):
            continue
        for node in e.get("targets") or []:
            if kind in ("process_kill", "process_pause"):
                since.setdefault(str(node), t)
            elif kind in ("process_start", "process_resume") and node in since:
                out.append((str(node), since.pop(str(node)), t))
    out.extend((n, t, data.end_t) for n, t in since.items())
    return out


def _accuracy_series(data: RunData) -> dict[str, list[tuple[float, float]]]:
    """Accuracy series (``*accuracy*``); without any, the other ``*eval*`` scores (not the
    version an evaluation ran on, which the version panel shows)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for s in data.samples:
        metrics = s.get("metrics")
        if not isinstance(metrics, dict):
            continue
        for name, value in metrics.items():
            wanted = ("accuracy" in name or "eval" in name) and "version" not in name
            if wanted and isinstance(value, int | float):
                series.setdefault(f"{s.get('node')} {name}", []).append((float(s["t"]), value))
    accuracy = {k: v for k, v in series.items() if "accuracy" in k}
    return accuracy or series


def plot_timeline(data: RunData, path: Path) -> None:
    """Draw the run (see the module docstring) into ``path``; ImportError without
    matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = _accuracy_series(data)
    panels = 3 if accuracy else 2
    fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(11, 2.6 * panels + 1))
    ax_f, ax_v = axes[0], axes[1]
    spans = [(_row(data, t), start, end, f) for t, start, end, f in _spans(data)]
    rows = sorted({t for t, *_ in spans} | {_row(data, n) for n in data.nodes})
    index = {r: i for i, r in enumerate(rows)}
    colours = plt.get_cmap("tab10")
    faults = sorted({f for *_, f in spans})
    for target, start, end, fault in spans:
        i = index[target]
        ax_f.fill_betweenx(
            [i - 0.4, i + 0.4],
            start,
            end,
            color=colours(faults.index(fault) % 10),
            alpha=0.4,
            label=fault,
        )
    for node, start, end in _down(data):  # killed or paused on purpose: grey
        if node in index:
            i = index[node]
            ax_f.fill_betweenx([i - 0.3, i + 0.3], start, end, color="grey", alpha=0.3)
    for e in data.timeline:
        marker = _MARKERS.get(str(e.get("event")))
        detail = e.get("detail")
        final = isinstance(detail, dict) and detail.get("end")
        if (
            marker is None
            or final
            or (e.get("event") == "process_start" and e.get("fault") == "start")
        ):
            continue
        colour = "black" if e.get("event") == "process_exit" else marker[1]
        for target in e.get("targets") or []:
            if target in index:
                ax_f.plot(float(e["t"]), index[target], marker[0], color=colour, markersize=8)
    ax_f.set_yticks(range(len(rows)), rows, fontsize=7)
    handles, labels = ax_f.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    if unique:
        ax_f.legend(unique.values(), unique.keys(), fontsize=7, loc="upper right")
    title = data.run.get("scenario", data.run_dir.name)
    ax_f.set_title(f"{title}: faults, kills (x, down in grey), starts (^), exits (v)")
    for node in sorted(data.nodes):
        if data.role(node) in ("root", "region"):
            series = data.versions(node)
            if series:
                ax_v.step(*zip(*series, strict=True), where="post", label=node)
    ax_v.set_ylabel("model version")
    if ax_v.get_legend_handles_labels()[0]:
        ax_v.legend(fontsize=7, loc="upper left")
    if accuracy:
        ax_a = axes[2]
        for label, series in sorted(accuracy.items()):
            ax_a.plot(*zip(*series, strict=True), label=label)
        ax_a.set_ylabel("accuracy / eval")
        ax_a.legend(fontsize=7, loc="lower right")
    axes[-1].set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
