"""Safety invariants checked on every effect a node emits during a run.

* exactly-once application: an aggregator reports each applied update with
  ``Metric("update_applied", labels={"src": ..., "seq": ...})``; the same
  ``(aggregator, src, seq)`` applied twice is a violation.
* monotone versions: ``Metric("model_version", v)`` at a node never goes down.

A violation raises ``InvariantViolation`` out of the driver, so the run fails loudly
(``strict=False`` only counts, for post-mortems).
"""

from __future__ import annotations

from typing import Any

from fedloom.algorithms.protocol import Metric


class InvariantViolation(AssertionError):  # noqa: N818 - the name the project uses
    """A run broke a safety invariant (a bug in a node or in the driver)."""


class InvariantChecker:
    def __init__(self, *, strict: bool = True) -> None:
        self.strict = strict
        self.updates_applied = 0
        self.updates_duplicated = 0  # duplicates APPLIED: must stay 0
        self.version_regressions = 0
        self._applied: set[tuple[str, str, str]] = set()
        self._versions: dict[str, float] = {}
        self.violations: list[str] = []

    def observe(self, node_id: str, effect: Any, now: float) -> None:
        """Feed one effect emitted by ``node_id`` at time ``now``."""
        if type(effect) is not Metric:
            return
        name = effect.name
        if name == "update_applied":
            self._applied_update(node_id, effect, now)
        elif name == "model_version":
            self._version(node_id, effect, now)

    def _applied_update(self, node_id: str, metric: Metric, now: float) -> None:
        labels = metric.labels or {}
        src, seq = labels.get("src"), labels.get("seq")
        if src is None or seq is None:
            self._fail(
                f"t={now:.6f} {node_id}: update_applied without src/seq labels ({labels!r}); "
                "exactly-once cannot be checked"
            )
            return
        key = (node_id, str(src), str(seq))
        self.updates_applied += 1
        if key in self._applied:
            self.updates_duplicated += 1
            self._fail(f"t={now:.6f} {node_id}: update (src={src}, seq={seq}) applied twice")
        else:
            self._applied.add(key)

    def _version(self, node_id: str, metric: Metric, now: float) -> None:
        version = metric.value
        last = self._versions.get(node_id)
        if last is not None and version < last:
            self.version_regressions += 1
            self._fail(
                f"t={now:.6f} {node_id}: model version went backwards from {last:g} to {version:g}"
            )
        if last is None or version > last:
            self._versions[node_id] = version

    def _fail(self, message: str) -> None:
        self.violations.append(message)
        if self.strict:
            raise InvariantViolation(message)

    def summary(self) -> dict[str, int]:
        return {
            "updates_applied": self.updates_applied,
            "updates_duplicated": self.updates_duplicated,
            "version_regressions": self.version_regressions,
        }
