"""``fedloom privacy STATE_DIR [--json] [--delta D]``: a root's privacy ledger and ε.

Reads, and never changes, a root's state directory (a running daemon's too): the
checkpoint's ledger (``algorithms.dp.release``: written with the model) plus the releases
appended to the live log since (``PRIVACY_LOG_KEY``, each written before its model left),
and prints the releases (runs of the same mechanism folded into one line), ε at δ (the
δ and accountant the root had configured, or ``--delta``), the budget and what is left.
Exit 0; 2 (one line) when the directory holds no privacy ledger or a damaged one.

A site's state directory with a DP-SGD ledger (``workloads.dp_sgd``, the store's
``site/privacy-ledger`` value, replaced atomically after every job) gives the site's jobs
(steps at each sample rate and noise multiplier) and ε at δ instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from fedloom.algorithms.dp.ledger import ACCOUNTANTS, LedgerError, PrivacyLedger, Release
from fedloom.algorithms.dp.release import PRIVACY_LOG_KEY
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.store import CorruptStateError, StateIOError, _file_name, read_value
from fedloom.runtime.exit_status import EXIT_ENVIRONMENT, EXIT_IN_USE, EXIT_OK
from fedloom.runtime.state_cli import _CHECKPOINT_FILE, _inspect, _inspect_live, _lock_held

__all__ = ["cmd_privacy", "read_ledger"]


def read_ledger(directory: Path) -> tuple[PrivacyLedger, dict[str, Any], bool] | None:
    """``(ledger, the root's privacy settings, in use)`` from ``directory``; None when a
    running daemon checkpointed during every read. ConfigError (one line) when there is no
    privacy ledger or it is damaged."""
    held = _lock_held(directory)
    state = _inspect(directory) if not held else _inspect_live(directory)
    if state is None:
        return None
    if state.checkpoint is None:
        for bad in state.bad_values:
            if bad.path is not None and bad.path.name == _CHECKPOINT_FILE:
                raise ConfigError(
                    f"damaged checkpoint: {bad.path}: {_why(bad)}; see `fedloom state check`"
                )
        raise ConfigError(
            f"{directory}: no checkpoint: not the state directory of a root that has started "
            "with [privacy]"
        )
    try:
        _, data, _ = read_value(state.checkpoint)
    except CorruptStateError as exc:
        raise ConfigError(f"{exc}; see `fedloom state check`") from None
    privacy = data.get("privacy") if isinstance(data, Mapping) else None
    if not isinstance(privacy, Mapping):
        kind = data.get("kind") if isinstance(data, Mapping) else None
        raise ConfigError(
            f"{directory}: no privacy ledger in its checkpoint (a {kind or 'non-aggregator'} "
            'node\'s state without [privacy] mechanism = "central")'
        )
    settings = {
        "delta": privacy.get("delta"),
        "epsilon_budget": privacy.get("epsilon_budget"),
        "accountant": privacy.get("accountant", "rdp"),
        "noise_multiplier": privacy.get("noise_multiplier"),
        "clip": privacy.get("clip"),
        "model_version": data.get("version"),
    }
    accountant = settings["accountant"] if settings["accountant"] in ACCOUNTANTS else "rdp"
    try:
        ledger = PrivacyLedger.from_records(privacy, accountant)
        last = ledger.last_version
        for frame in state.live.frames if state.live is not None else ():
            for key, rec in frame.tree or ():
                if key != PRIVACY_LOG_KEY:
                    continue
                r = Release(rec["version"], rec["z"], rec["q"], rec["count"])
                if last is not None and r.version <= last:
                    continue  # already in the checkpoint (written before it)
                ledger._append(r)
                last = r.version
    except (LedgerError, KeyError, TypeError) as exc:
        raise ConfigError(f"{directory}: damaged privacy ledger: {exc}") from None
    return ledger, settings, held


def _why(exc: CorruptStateError) -> str:
    """The reason of a CorruptStateError, without the path its message may start with."""
    text = str(exc)
    if exc.path is not None and text.startswith(f"{exc.path}: "):
        text = text[len(f"{exc.path}: ") :]
    return text


def _delta(delta: float | None, named: Any) -> float:
    """``--delta`` if given (it must be in (0, 1)), else the δ the state names."""
    if delta is not None:
        if not 0.0 < delta < 1.0:
            raise ConfigError(f"--delta: expected a number in (0, 1), got {delta:g}")
        return delta
    if isinstance(named, bool) or not isinstance(named, float | int) or not 0.0 < named < 1.0:
        raise ConfigError("--delta: the state names no delta in (0, 1); give --delta")
    return float(named)


def _number(value: Any) -> float | None:
    """A budget as the state holds it (an int from a TOML table too), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _runs(releases: tuple[Release, ...]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in releases:
        if out and (out[-1]["z"], out[-1]["q"]) == (r.z, r.q):
            out[-1]["last_version"] = r.version
            out[-1]["releases"] += r.count
        else:
            out.append(
                {
                    "first_version": r.version,
                    "last_version": r.version,
                    "z": r.z,
                    "q": r.q,
                    "releases": r.count,
                }
            )
    return out


def _site_ledger(directory: Path, delta: float | None, as_json: bool, out: TextIO) -> bool:
    """Print a DP-SGD site's ledger if ``directory`` holds one (True), else nothing."""
    from fedloom.workloads.dp_sgd import LEDGER_KEY, PrivacyLedger, _epsilon

    path = directory / _file_name(LEDGER_KEY)
    if not path.is_file():
        return False
    try:
        _, value, _ = read_value(path)
        history = PrivacyLedger.parse(value)
    except (CorruptStateError, ValueError) as exc:
        raise ConfigError(f"{directory}: damaged DP-SGD ledger: {exc}") from None
    d = _delta(delta, value.get("delta"))
    try:
        eps = _epsilon(history, d)
    except ArithmeticError as exc:  # out-of-range numbers in a (hand-edited) ledger
        raise ConfigError(f"{directory}: DP-SGD ledger out of range: {exc!r}") from None
    budget = _number(value.get("epsilon_budget"))
    report: dict[str, Any] = {
        "state_dir": str(directory),
        "mechanism": "dp_sgd",
        "accountant": "rdp",
        "delta": d,
        "epsilon": eps,
        "epsilon_budget": budget,
        "steps": sum(s for _, _, s in history),
        "noise_multiplier": value.get("noise_multiplier"),
        "max_grad_norm": value.get("max_grad_norm"),
        "runs": [{"z": z, "q": q, "steps": s} for z, q, s in history],
    }
    if isinstance(budget, float):
        report["budget_left"] = max(0.0, budget - eps)
    if as_json:
        json.dump(report, out, indent=2)
        out.write("\n")
        return True
    out.write(f"state directory: {directory}\n")
    out.write(
        f"mechanism: record-level DP-SGD at this site, noise multiplier "
        f"{report['noise_multiplier']}, max_grad_norm {report['max_grad_norm']}; accountant rdp\n"
    )
    out.write(f"steps: {report['steps']}\n")
    for z, q, s in history:
        out.write(f"  {s} x Gaussian z = {z:.4g}, Poisson-sampled at q = {q:.4g}\n")
    out.write(f"epsilon: {eps:.4f} at delta = {d:g}\n")
    if isinstance(budget, float):
        out.write(f"budget: {budget:g} ({max(0.0, budget - eps):.4f} left)\n")
    else:
        out.write("budget: none (account only)\n")
    return True


def cmd_privacy(
    directory: Path, *, as_json: bool = False, delta: float | None = None, out: TextIO | None = None
) -> int:
    out = out or sys.stdout
    try:
        if _site_ledger(directory, delta, as_json, out):
            return EXIT_OK
    except StateIOError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    try:
        found = read_ledger(directory)
    except StateIOError as exc:
        print(f"fedloom: error: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    if found is None:
        print(
            f"fedloom: error: {directory}: a running daemon checkpointed during every read; "
            "try again",
            file=sys.stderr,
        )
        return EXIT_IN_USE
    ledger, settings, held = found
    d = _delta(delta, settings["delta"])
    try:
        eps = ledger.epsilon(d)
    except ArithmeticError as exc:  # out-of-range numbers in a (hand-edited) ledger
        raise ConfigError(f"{directory}: privacy ledger out of range: {exc!r}") from None
    budget = _number(settings["epsilon_budget"])
    report: dict[str, Any] = {
        "state_dir": str(directory),
        "in_use": held,
        "accountant": ledger.accountant,
        "delta": d,
        "epsilon": eps,
        "epsilon_budget": budget,
        "releases": len(ledger),
        "last_version": ledger.last_version,
        "noise_multiplier": settings["noise_multiplier"],
        "clip": settings["clip"],
        "runs": _runs(ledger.releases),
    }
    if isinstance(budget, float):
        report["budget_left"] = max(0.0, budget - eps)
        z = settings["noise_multiplier"]
        if _number(z) is not None and ledger.releases:
            nxt = ledger.releases[-1].event
            try:
                report["releases_left"] = ledger.releases_left(nxt, d, budget)
            except ArithmeticError as exc:
                raise ConfigError(f"{directory}: privacy ledger out of range: {exc!r}") from None
    if as_json:
        json.dump(report, out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(f"state directory: {directory}{' (in use)' if held else ''}\n")
    out.write(
        f"mechanism: central Gaussian, noise multiplier {settings['noise_multiplier']}, clip "
        f"{settings['clip']}; accountant {ledger.accountant}\n"
    )
    out.write(f"releases: {len(ledger)}\n")
    for run in report["runs"]:
        q = "no sampling" if run["q"] is None else f"sampled at q = {run['q']:.4g}"
        span = (
            f"version {run['first_version']}"
            if run["releases"] == 1
            else f"versions {run['first_version']}..{run['last_version']}"
        )
        out.write(f"  {span}: {run['releases']} x Gaussian z = {run['z']:.4g}, {q}\n")
    out.write(f"epsilon: {eps:.4f} at delta = {d:g}\n")
    if isinstance(budget, float):
        left = report.get("releases_left")
        more = f", {left} more release(s) of the last kind" if left is not None else ""
        state = "EXHAUSTED" if left == 0 else f"{budget - eps:.4f} left{more}"
        out.write(f"budget: {budget:g} ({state})\n")
    else:
        out.write("budget: none (account only)\n")
    return EXIT_OK
