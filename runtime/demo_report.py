"""The demo's closing report: the federated model beside the baselines, as a table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedloom.runtime.baselines import Score

__all__ = ["print_report"]


def print_report(
    console: Any,
    version: int,
    final: Mapping[str, float],
    central: Score,
    local: Sequence[Score],
    site_updates: Mapping[str, int],
) -> None:
    from rich.table import Table

    table = Table(
        title=f"Accuracy on the held-out test set ({int(final.get('n_test', 0))} patients)"
    )
    table.add_column("model")
    table.add_column("trained on")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    total = sum(site_updates.values())
    table.add_row(
        "[bold]federated (FedBuff x2)[/]",
        f"6 hospitals, global v{version}, {total} site updates",
        f"[bold]{final['accuracy']:.3f}[/]",
        f"{final['loss']:.3f}",
    )
    table.add_row(central.name, central.detail, f"{central.accuracy:.3f}", f"{central.loss:.3f}")
    for s in local:
        table.add_row(s.name, s.detail, f"{s.accuracy:.3f}", f"{s.loss:.3f}")
    console.print(table)
    best = max(local, key=lambda s: s.accuracy)
    console.print(
        f"federated {final['accuracy']:.3f} vs central {central.accuracy:.3f} "
        f"({final['accuracy'] - central.accuracy:+.3f}); best hospital alone "
        f"{best.accuracy:.3f} ({best.name.removesuffix(' alone')})"
    )
