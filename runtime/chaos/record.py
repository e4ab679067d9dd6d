"""What a chaos run writes while it runs: ``timeline.jsonl`` and ``samples.jsonl``.

The format is the run-directory contract the checker (``runtime.chaos.checker``) reads:
one JSON object per line, ``t`` in seconds since the run started (monotonic clock). Every
line is flushed as written, so a run killed half-way still leaves a readable prefix.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["JsonLines", "Timeline", "flat_metrics", "probe_healthz", "scrape_metrics"]

EVENTS = (
    "fault_start",
    "fault_end",
    "process_kill",
    "process_pause",
    "process_resume",
    "process_start",
    "process_exit",
)


class JsonLines:
    """An append-only JSON-lines file, safe to write from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, obj: Mapping[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str)
        with self._lock:
            if self._fh.closed:
                return
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class Timeline(JsonLines):
    """``timeline.jsonl``: faults and process events, ``t`` from ``t0`` (monotonic)."""

    def __init__(self, path: Path, t0: float) -> None:
        super().__init__(path)
        self.t0 = t0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(
        self,
        event: str,
        fault: str,
        targets: Iterable[str],
        detail: Mapping[str, Any] | None = None,
        *,
        intended: bool = True,
    ) -> None:
        assert event in EVENTS, event
        self.write(
            {
                "t": round(self.now(), 3),
                "event": event,
                "fault": fault,
                "targets": list(targets),
                "detail": dict(detail or {}),
                "intended": intended,
            }
        )


def _series_name(name: str, labels: Mapping[str, str]) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def flat_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``{'name{k="v",...}': value}``: only ``fedloom_*`` series, labels
    sorted, non-finite values left out (JSON has no NaN)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError):  # a half-written page; the next scrape will do
        return out
    for family in families:
        for s in family.samples:
            if not s.name.startswith("fedloom_"):
                continue
            value = float(s.value)
            if math.isfinite(value):
                out[_series_name(s.name, s.labels)] = value
    return out


def scrape_metrics(base_url: str, timeout: float) -> dict[str, float] | None:
    """``/metrics`` flattened, or None when the daemon does not answer."""
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, TimeoutError, ValueError):
        return None
    return flat_metrics(text)


def probe_healthz(base_url: str, timeout: float) -> str:
    """``ok`` (200), ``fail`` (any other answer), ``timeout`` or ``down`` (refused)."""
    try:
        with urllib.request.urlopen(f"{base_url}/healthz", timeout=timeout) as resp:
            return "ok" if resp.status == 200 else "fail"
    except urllib.error.HTTPError:
        return "fail"
    except TimeoutError:
        return "timeout"
    except urllib.error.URLError as exc:
        return "timeout" if isinstance(exc.reason, TimeoutError) else "down"
    except OSError:
        return "down"
