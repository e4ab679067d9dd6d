"""Rate-limited warnings for refused messages (issue 10: no log flood).

A peer that sends N bad messages still costs N metrics (counted per message), but only
one log line per (peer, reason) per ``WARN_INTERVAL_S``; that line carries how many were
left unlogged since the previous one. The table is bounded: a node has few peers and few
reasons, and past ``MAX_KEYS`` the oldest entry goes first.
"""

from __future__ import annotations

from fedloom.algorithms.protocol import Effect, Log, Metric

WARN_INTERVAL_S = 60.0
MAX_KEYS = 1024

__all__ = ["MAX_KEYS", "WARN_INTERVAL_S", "WarnLimiter", "quiet_refusals"]


class WarnLimiter:
    """Decides which refusals get a log line (see the module docstring)."""

    __slots__ = ("_interval", "_last", "_max")

    def __init__(self, interval_s: float = WARN_INTERVAL_S, max_keys: int = MAX_KEYS) -> None:
        self._interval = interval_s
        self._max = max_keys
        # (peer, reason) -> (time of the last line, refusals unlogged since)
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def due(self, peer: str, reason: str, now: float) -> int | None:
        """None: stay quiet; else log now, saying how many refusals went unlogged before."""
        key = (peer, reason)
        entry = self._last.get(key)
        if entry is not None and now < entry[0] + self._interval:
            self._last[key] = (entry[0], entry[1] + 1)
            return None
        if entry is None and len(self._last) >= self._max:
            del self._last[next(iter(self._last))]
        else:
            self._last.pop(key, None)  # re-insert: the dict stays ordered by last line
        self._last[key] = (now, 0)
        return 0 if entry is None else entry[1]


def quiet_refusals(
    limiter: WarnLimiter, peer: str, effects: list[Effect], now: float, metric: str
) -> list[Effect]:
    """``effects`` with the warning each refusal logs (a ``Metric`` named ``metric`` with a
    ``reason`` label, then its ``Log``: ``secagg.cohort.refused``) kept once per peer and
    reason per interval, saying how many went unlogged (``unlogged_before``); the metrics
    all stay. The peer is the Log's ``site`` field where it names one (a coordinator
    refusing a member's shares), else ``peer``."""
    if not any(isinstance(e, Metric) and e.name == metric for e in effects):
        return effects
    out: list[Effect] = []
    reason: str | None = None
    for e in effects:
        if reason is not None and isinstance(e, Log):
            fields = dict(e.fields or {})
            site = fields.get("site")
            unlogged = limiter.due(site if isinstance(site, str) else peer, reason, now)
            if unlogged is not None:
                out.append(Log(e.level, e.text, {**fields, "unlogged_before": unlogged}))
            reason = None
            continue
        reason = None
        if isinstance(e, Metric) and e.name == metric:
            reason = str((e.labels or {}).get("reason", ""))
        out.append(e)
    return out
