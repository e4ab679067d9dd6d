"""The daemon's local observability endpoint: ``GET /metrics`` and ``GET /healthz``.

* ``/metrics`` — the sink's registry in the Prometheus text format (OpenMetrics when the
  scraper asks for it in ``Accept``), with the matching content type.
* ``/healthz`` — 200 ``{"status": "ok", "ready": true, ...}`` once the daemon called
  ``sink.set_ready(True)``; 503 with the same body and ``"status": "starting"`` before that,
  or ``"degraded"`` after a later ``set_ready(False)`` (systemd, load balancers and
  ``curl -f`` read the code, people read the body).
* ``/status.json`` and ``/status`` — only when a ``status`` provider is given (an
  aggregator's ``runtime.status.StatusBoard``): its document as JSON, and the same rendered
  as a self-contained HTML page (``runtime.status_page``) under a Content-Security-Policy
  that lets nothing be loaded. Every route is GET (and HEAD) only: other methods get 405.

DNS rebinding: a web page in the operator's browser can point a name it controls at
127.0.0.1 and read the answers as its own origin. Every route answers only requests
whose ``Host`` header names the bound address, ``localhost``/the loopback addresses, or
the configured host; bound to a wildcard (``0.0.0.0``, ``::``), any IP literal and this
machine's host names too. Other names get 421 (Misdirected Request). A request without
``Host`` (HTTP/1.0; a browser always sends one) is answered.

Binds to 127.0.0.1 by default: the metrics name peers and versions, so exposing them beyond
the host is an explicit choice (``host="0.0.0.0"``). Port 0 picks a free port
(``server.port`` says which). Access logging is off: a scrape every few seconds would
flood the journal.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from fedloom.runtime.metrics import MetricsSink

__all__ = [
    "ObservabilityServer",
    "allowed_hosts",
    "make_app",
    "start_observability",
    "stop_observability",
]

_log = logging.getLogger(__name__)
_SINK_KEY = web.AppKey("sink", MetricsSink)
StatusProvider = Callable[[], dict[str, Any]]
_STATUS_KEY: web.AppKey[StatusProvider] = web.AppKey("status")
_HOSTS_KEY: web.AppKey[tuple[frozenset[str], bool]] = web.AppKey("hosts")
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def _host_name(header: str) -> str:
    """The host of a ``Host`` header: lower case, without port, brackets or final dot."""
    text = header.strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_hosts(host: str) -> tuple[frozenset[str], bool]:
    """The ``Host`` names an endpoint bound to ``host`` answers to, and whether any IP
    literal is fine too (a wildcard bind)."""
    names = {"localhost", "127.0.0.1", "::1", _host_name(host)}
    wildcard = host in _WILDCARDS
    if wildcard:
        for name in (socket.gethostname(), socket.getfqdn()):
            if name:
                names.add(_host_name(name))
    return frozenset(names - {""}), wildcard


@web.middleware
async def _host_check(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """421 for a ``Host`` this endpoint does not answer to (DNS rebinding)."""
    raw = request.headers.get("Host")
    if raw is not None:
        names, any_ip = request.app[_HOSTS_KEY]
        name = _host_name(raw)
        if name not in names and not (any_ip and _is_ip(name)):
            return web.Response(
                status=421,
                text="misdirected request: this endpoint answers to its own address, "
                "localhost and its configured host only\n",
                headers={"Cache-Control": "no-store"},
            )
    return await handler(request)


async def _metrics(request: web.Request) -> web.Response:
    sink = request.app[_SINK_KEY]
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    # The content type carries a charset, which web.Response(content_type=...) refuses.
    return web.Response(body=encode(sink.registry), headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    snap = request.app[_SINK_KEY].health()
    return web.Response(
        text=json.dumps(snap.to_json()),
        status=200 if snap.ready else 503,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def _status_json(request: web.Request) -> web.Response:
    doc = request.app[_STATUS_KEY]()
    return web.Response(
        text=json.dumps(doc, allow_nan=False),
        content_type="application/json",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


async def _status_page(request: web.Request) -> web.Response:
    from fedloom.runtime.status_page import CSP, render

    return web.Response(
        text=render(request.app[_STATUS_KEY]()),
        content_type="text/html",
        headers={
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def make_app(
    sink: MetricsSink, status: StatusProvider | None = None, host: str = "127.0.0.1"
) -> web.Application:
    """The aiohttp application serving ``sink`` (and ``status``'s document, when given)
    to requests whose ``Host`` is one an endpoint bound to ``host`` answers to."""
    app = web.Application(middlewares=[_host_check])
    app[_HOSTS_KEY] = allowed_hosts(host)
    app[_SINK_KEY] = sink
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    if status is not None:
        app[_STATUS_KEY] = status
        app.router.add_get("/status.json", _status_json)
        app.router.add_get("/status", _status_page)
    return app


class ObservabilityServer:
    """A running endpoint; ``await server.stop()`` (or ``async with``) shuts it down."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Close the listener and open connections; safe to call twice."""
        await self.runner.cleanup()

    async def __aenter__(self) -> ObservabilityServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def start_observability(
    sink: MetricsSink,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    status: StatusProvider | None = None,
) -> ObservabilityServer:
    """Serve ``/metrics`` and ``/healthz`` for ``sink`` on ``host:port`` (0 = a free port),
    and ``/status.json`` and ``/status`` when a ``status`` provider is given."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    # A scrape is tiny: a short shutdown grace keeps SIGTERM handling prompt.
    runner = web.AppRunner(
        make_app(sink, status, host), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    routes = "/metrics, /healthz" + (", /status, /status.json" if status is not None else "")
    _log.info("observability endpoint on http://%s:%d (%s)", host, bound, routes)
    return ObservabilityServer(runner, host, int(bound))


async def stop_observability(server: ObservabilityServer) -> None:
    await server.stop()
