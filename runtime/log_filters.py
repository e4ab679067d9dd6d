"""Log hygiene for aiohttp: a client that simply went away is not an error.

aiohttp logs a peer that reset its connection or vanished mid-request (a crashed site, a
scanner, a chaos proxy's reset) at ERROR with a full traceback ("Error handling request",
"Unhandled exception"). ``quiet_client_disconnects`` installs a filter on aiohttp's loggers
that turns each such record into one DEBUG line on the same logger; records about any
other exception, and records without one, pass unchanged.
"""

from __future__ import annotations

import logging

from fedloom.transport.error_text import describe

__all__ = ["AIOHTTP_LOGGERS", "ClientGoneFilter", "quiet_client_disconnects"]

# aiohttp.log's loggers (a filter applies only to records logged on its own logger).
AIOHTTP_LOGGERS = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
)


class ClientGoneFilter(logging.Filter):
    """Drops records whose exception is a ``ConnectionError`` (reset, broken pipe,
    aiohttp's ``ClientConnectionResetError``), re-logging each as one DEBUG line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, ConnectionError):
            return True
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: the client went away (%s)", record.getMessage(), describe(exc))
        return False


def quiet_client_disconnects() -> None:
    """Install ``ClientGoneFilter`` on aiohttp's loggers (once; calling again is a no-op)."""
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ClientGoneFilter) for f in logger.filters):
            logger.addFilter(ClientGoneFilter())
