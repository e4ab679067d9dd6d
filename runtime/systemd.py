"""systemd service notifications (``Type=notify``) without libsystemd.

The protocol (sd_notify(3)): newline-separated ``KEY=VALUE`` assignments in one datagram to
the AF_UNIX socket named by ``$NOTIFY_SOCKET``; a leading ``@`` names an abstract socket
(replaced by a NUL byte). With ``$NOTIFY_SOCKET`` unset (not run by systemd) every call is a
no-op that returns False, so daemons call these unconditionally.

* ``ready()`` once recovery is done and the links are up; ``stopping()`` on SIGTERM;
  ``status(text)`` for ``systemctl status``; ``extend_timeout(s)`` during a long recovery.
* ``watchdog_loop(stop)`` runs on the event loop itself and sends ``WATCHDOG=1`` every half
  ``$WATCHDOG_USEC``: a blocked loop stops the pings and systemd restarts the daemon (which is
  the point, so the pings must never come from another thread).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

from fedloom.transport.error_text import describe

__all__ = [
    "extend_timeout",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_loop",
    "watchdog_ping",
]

_log = logging.getLogger(__name__)
_SEND_TIMEOUT_S = 1.0  # systemd drains its queue at once; never hang the loop on it


def _address(env: Mapping[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    _log.warning("NOTIFY_SOCKET=%r is not a path or an abstract socket; ignored", addr)
    return None


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; True if it was sent.

    Never raises for a socket problem: a failed notification is logged, and systemd's own
    timeouts (start, watchdog) deal with a daemon whose notifications do not arrive.
    """
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.connect(addr)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        _log.warning("systemd notification %r failed: %s", state, describe(exc))
        return False
    return True


def ready(status_text: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """``READY=1`` (with an optional ``STATUS=``): recovery is done, the service is up."""
    lines = ["READY=1"] + ([f"STATUS={status_text}"] if status_text else [])
    return notify("\n".join(lines), env=env)


def stopping(*, env: Mapping[str, str] | None = None) -> bool:
    """``STOPPING=1``: a clean shutdown has begun."""
    return notify("STOPPING=1", env=env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """``STATUS=text``: one line shown by ``systemctl status``."""
    return notify("STATUS=" + text.replace("\n", " "), env=env)


def extend_timeout(seconds: float, *, env: Mapping[str, str] | None = None) -> bool:
    """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more before a start/stop timeout fires."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1e6))}", env=env)


def watchdog_ping(*, env: Mapping[str, str] | None = None) -> bool:
    return notify("WATCHDOG=1", env=env)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds, or None when no watchdog is armed for this process
    (``$WATCHDOG_USEC`` unset or invalid, or ``$WATCHDOG_PID`` naming another process)."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return value / 1e6


async def watchdog_loop(
    stop: asyncio.Event,
    *,
    interval: float | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Send ``WATCHDOG=1`` every half watchdog interval until ``stop`` is set.

    ``interval`` overrides ``$WATCHDOG_USEC`` (seconds). Returns at once when no watchdog is
    armed. Meant for a ``TaskGroup``: ``tg.create_task(watchdog_loop(stop))``.
    """
    timeout = watchdog_interval(env) if interval is None else interval
    if timeout is None:
        return
    if not timeout > 0:
        raise ValueError(f"watchdog interval must be > 0, got {timeout}")
    period = timeout / 2
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        # The send is a non-blocking-in-practice datagram; it happens on the loop thread
        # on purpose: a stuck loop must stop the pings.
        watchdog_ping(env=env)
        deadline = loop.time() + period
        try:
            async with asyncio.timeout_at(deadline):
                await stop.wait()
        except TimeoutError:
            pass
