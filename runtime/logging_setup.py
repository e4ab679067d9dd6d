"""The daemons' logging: to stderr, JSON lines (every ``extra`` field kept) or text."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.log_filters import quiet_client_disconnects

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(levels: list[str] | None = None, fmt: str = "auto") -> None:
    """Log to stderr. ``levels``: ``"info"`` or ``"logger=debug"`` items (the last bare
    level is the root level); ``fmt``: ``json``, ``text``, or ``auto`` (text on a TTY)."""
    root_level = logging.INFO
    per_logger: dict[str, int] = {}
    for item in levels or []:
        name, sep, level = item.rpartition("=")
        value = logging.getLevelName(level.strip().upper())
        if not isinstance(value, int):
            raise ConfigError(f"--log-level {item!r}: unknown level (debug, info, warning, error)")
        if sep:
            per_logger[name.strip()] = value
        else:
            root_level = value
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if use_json
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(root_level)
    # aiohttp logs every refused upgrade and dropped socket at INFO: noise for operators.
    logging.getLogger("aiohttp").setLevel(max(root_level, logging.WARNING))
    quiet_client_disconnects()  # a client that went away: one DEBUG line, no traceback
    for name, value in per_logger.items():
        logging.getLogger(name).setLevel(value)
