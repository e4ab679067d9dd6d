"""Structured logs for daemons, and the one import for all of a daemon's observability.

``configure_logging(json=True)`` makes every record one JSON object on one line:
``{"ts", "level", "logger", "msg", ...}`` followed by the record's extras — the ``fields``
passed as ``extra={"fields": {...}}`` (the driver's ``Log`` effects), and plain extras such
as ``node``, ``peer`` and ``job`` — plus ``exc`` with the traceback when there is one.
A field whose name clashes with a base key is kept as ``field_<name>``.

Under systemd (``$JOURNAL_STREAM`` names the stream we write to) each line starts with a
``<N>`` syslog priority, which journald strips into ``PRIORITY=`` (so ``journalctl -p err``
works) and text lines drop their timestamp (journald stamps them).

Metrics (``MetricsSink``) live in ``runtime.metrics``; the HTTP endpoint
(``start_observability``) in ``runtime.health``; both are re-exported here.
"""

from __future__ import annotations

import datetime as dt
import json as _json
import logging
import math
import os
import sys
import traceback
from collections.abc import Mapping
from typing import Any, TextIO

from fedloom.runtime.health import (
    ObservabilityServer,
    make_app,
    start_observability,
    stop_observability,
)
from fedloom.runtime.log_filters import quiet_client_disconnects
from fedloom.runtime.metrics import HealthSnapshot, MetricsSink

__all__ = [
    "HealthSnapshot",
    "JsonFormatter",
    "MetricsSink",
    "ObservabilityServer",
    "configure_logging",
    "make_app",
    "start_observability",
    "stop_observability",
]

_BASE_KEYS = ("ts", "level", "logger", "msg", "exc", "stack")
# Attributes every LogRecord has; anything else on a record came in through ``extra=``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_SYSLOG = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_MARK = "_fedloom_handler"  # marks the handler configure_logging installed, to replace it


def _syslog_priority(levelno: int) -> int:
    for threshold, priority in _SYSLOG:
        if levelno >= threshold:
            return priority
    return 7


def _plain(value: Any) -> Any:
    """Something ``json.dumps`` writes as valid JSON (no NaN, no numpy scalars)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str | int | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _plain(item())
        except (TypeError, ValueError):
            pass
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, *, syslog_prefix: bool = False) -> None:
        super().__init__()
        self.syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extras: dict[str, Any] = {}
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key != "fields":
                extras[key] = value
        fields = record.__dict__.get("fields")
        if isinstance(fields, Mapping):
            extras.update({str(k): v for k, v in fields.items()})
        for key, value in extras.items():
            out[f"field_{key}" if key in _BASE_KEYS else key] = _plain(value)
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        line = _json.dumps(out, ensure_ascii=False, separators=(",", ":"))
        return f"<{_syslog_priority(record.levelno)}>{line}" if self.syslog_prefix else line


class _TextFormatter(logging.Formatter):
    def __init__(self, *, syslog_prefix: bool) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        super().__init__(fmt if syslog_prefix else "%(asctime)s " + fmt)
        self.syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.syslog_prefix:
            return text
        prio = _syslog_priority(record.levelno)
        # journald takes the prefix per line: continuation lines (tracebacks) need it too.
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def _under_journald(stream: TextIO) -> bool:
    """True when ``stream`` is the journal stream systemd connected us to (systemd.exec(5))."""
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # StringIO and friends have no fd
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def _level(level: int | str) -> int:
    if isinstance(level, int):
        return level
    found = logging.getLevelName(level.strip().upper())
    if not isinstance(found, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    return found


def configure_logging(
    json: bool = False,
    level: int | str = "INFO",
    *,
    stream: TextIO | None = None,
    journald: bool | None = None,
) -> logging.Handler:
    """Send all logging to ``stream`` (stderr), as JSON lines when ``json``.

    ``journald=None`` detects systemd's journal stream; True/False forces the ``<N>`` priority
    prefix on or off. Calling again replaces the handler installed before (idempotent).
    Returns the installed handler.
    """
    threshold = _level(level)  # before touching any handler: a bad level changes nothing
    target = stream if stream is not None else sys.stderr
    prefix = _under_journald(target) if journald is None else journald
    handler = logging.StreamHandler(target)
    handler.setFormatter(
        JsonFormatter(syslog_prefix=prefix) if json else _TextFormatter(syslog_prefix=prefix)
    )
    setattr(handler, _MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(threshold)
    quiet_client_disconnects()  # a client that went away: one DEBUG line, no traceback
    return handler
