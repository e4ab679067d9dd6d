"""The text of an exception for a log line or an error message: never empty.

``str(exc)`` is empty for many of the exceptions a network daemon meets (a bare
``TimeoutError()``, ``ConnectionResetError()``, ``asyncio.IncompleteReadError`` in some
paths, an aiohttp error raised without arguments), which left lines such as
``cannot connect to ws://host:port/fedloom: )``. Every message built from an exception
goes through ``describe``.
"""

from __future__ import annotations

__all__ = ["describe"]


def describe(exc: BaseException) -> str:
    """``str(exc)``, or the exception's type name when that is empty (or blank)."""
    try:
        text = str(exc).strip()
    except Exception:  # a broken __str__ must not turn an error report into another error
        text = ""
    return text or type(exc).__name__
