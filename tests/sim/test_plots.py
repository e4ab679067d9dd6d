"""PNG plots of a run report."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from fedloom.sim.plots import (
    accuracy_figure,
    bytes_figure,
    plot_accuracy,
    plot_bytes,
    plot_staleness,
    staleness_figure,
    tier_colors,
)
from fedloom.sim.report import ArmResult, Report, tier_bytes, write_report
from tests.sim.test_report import sample_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_write_report_renders_all_plots(tmp_path: Path) -> None:
    paths = write_report(sample_report(), tmp_path)
    for key, name in [
        ("accuracy_plot", "accuracy.png"),
        ("staleness_plot", "staleness.png"),
        ("bytes_plot", "bytes.png"),
    ]:
        assert paths[key] == tmp_path / name
        width, height = png_size(paths[key])
        assert width >= 600 and height >= 300
        assert paths[key].stat().st_size > 10_000  # real content, not an empty canvas
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_accuracy_axis_unit_follows_duration(tmp_path: Path) -> None:
    long_run = sample_report()  # four virtual hours
    ax = accuracy_figure(long_run).axes[0]
    assert ax.get_xlabel() == "virtual time (hours)"
    # The dashed target line and the per-arm lines are all there.
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"fedavg-star", "fedbuff-hier", "dpsgd-ring", "target 0.9"} <= set(labels)
    target = next(line for line in ax.get_lines() if line.get_label() == "target 0.9")
    assert target.get_linestyle() == "--"

    short = Report(
        "short",
        1,
        "",
        [
            dataclasses.replace(arm, accuracy_series=[(t / 10, a) for t, a in arm.accuracy_series])
            for arm in long_run.arms
        ],
    )
    assert accuracy_figure(short).axes[0].get_xlabel() == "virtual time (minutes)"
    plot_accuracy(short, tmp_path / "short.png")
    png_size(tmp_path / "short.png")


def test_plots_survive_empty_and_degenerate_reports(tmp_path: Path) -> None:
    bare = ArmResult(name="bare", algorithm="fedasync", topology="star", final_accuracy=0.5)
    for i, report in enumerate([Report("empty", 0, "", []), Report("bare", 0, "", [bare])]):
        for plot in (plot_accuracy, plot_staleness, plot_bytes):
            path = plot(report, tmp_path / f"{i}-{plot.__name__}.png")
            png_size(path)


def test_wide_staleness_ranges_are_binned(tmp_path: Path) -> None:
    arm = dataclasses.replace(
        sample_report().arms[1], staleness_histogram={s: 1_000 // (s + 1) for s in range(500)}
    )
    fig = staleness_figure(Report("wide", 1, "", [arm]))
    ax = fig.axes[0]
    assert 0 < len(ax.patches) <= 60
    assert "bins of" in fig.get_supxlabel()
    plot_staleness(Report("wide", 1, "", [arm]), tmp_path / "wide.png")
    png_size(tmp_path / "wide.png")


def test_bytes_plot_uses_human_units_and_tier_colours() -> None:
    report = sample_report()
    ax = bytes_figure(report).axes[0]
    assert ax.get_ylabel() == "bytes (GB)"
    n_bars = sum(len(tier_bytes(a)) for a in report.arms)  # the ring arm falls back to up/down
    assert len(ax.patches) == n_bars
    legend_box = ax.get_legend()
    assert legend_box is not None
    legend = [t.get_text() for t in legend_box.get_texts()]
    # Upward tiers first (leaf to root), then downward ones (root first).
    assert legend[:2] == ["site → region", "site → root"]
    assert legend.index("region → root") < legend.index("root → region")
    colors = tier_colors(["site->region", "root->site", "peer->peer"])
    assert len(set(colors.values())) == 3

    small = Report("small", 1, "", [dataclasses.replace(report.arms[2])])
    assert bytes_figure(small).axes[0].get_ylabel() == "bytes (kB)"


@pytest.mark.parametrize("n_arms", [1, 7])
def test_many_arms_still_render(tmp_path: Path, n_arms: int) -> None:
    base = sample_report().arms[1]
    arms = [dataclasses.replace(base, name=f"arm-{i}") for i in range(n_arms)]
    report = Report("many", 1, "", arms)
    for plot in (plot_accuracy, plot_staleness, plot_bytes):
        png_size(plot(report, tmp_path / f"{plot.__name__}.png"))


def test_dollar_signs_in_names_are_drawn_as_written(tmp_path: Path) -> None:
    # Matplotlib read "$...$" as mathtext: an arm named "$\undefinedcmd$" was a
    # ParseFatalException traceback once the run was over (no plots), "$x$" drawn as math.
    base = sample_report().arms[1]
    arms = [dataclasses.replace(base, name=name) for name in ("$\\undefinedcmd$", "$x$")]
    report = Report("cost $\\bad$ study", 1, "", arms)
    for plot in (plot_accuracy, plot_staleness, plot_bytes):
        png_size(plot(report, tmp_path / f"{plot.__name__}.png"))
