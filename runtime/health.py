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

Binds to 127.0.0.1 by default: the metrics name peers and versions, so exposing them beyond
the host is an explicit choice (``host="0.0.0.0"``). Port 0 picks a free port
(``server.port`` says which). Access logging is off: a scrape every few seconds would
flood the journal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from fedloom.runtime.metrics import MetricsSink

__all__ = ["ObservabilityServer", "make_app", "start_observability", "stop_observability"]

_log = logging.getLogger(__name__)
_SINK_KEY = web.AppKey("sink", MetricsSink)
StatusProvider = Callable[[], dict[str, Any]]
_STATUS_KEY: web.AppKey[StatusProvider] = web.AppKey("status")


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


def make_app(sink: MetricsSink, status: StatusProvider | None = None) -> web.Application:
    """The aiohttp application serving ``sink`` (and ``status``'s document, when given)."""
    app = web.Application()
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
        make_app(sink, status), access_log=None, handle_signals=False, shutdown_timeout=1.0
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
