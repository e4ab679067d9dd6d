"""The daemon's local observability endpoint: ``GET /metrics`` and ``GET /healthz``.

* ``/metrics`` — the sink's registry in the Prometheus text format (OpenMetrics when the
  scraper asks for it in ``Accept``), with the matching content type.
* ``/healthz`` — 200 ``{"status": "ok", "ready": true, ...}`` once the daemon called
  ``sink.set_ready(True)``; 503 with the same body and ``"status": "starting"`` before that,
  or ``"degraded"`` after a later ``set_ready(False)`` (systemd, load balancers and
  ``curl -f`` read the code, people read the body).

Binds to 127.0.0.1 by default: the metrics name peers and versions, so exposing them beyond
the host is an explicit choice (``host="0.0.0.0"``). Port 0 picks a free port
(``server.port`` says which). Access logging is off: a scrape every few seconds would
flood the journal.
"""

from __future__ import annotations

import json
import logging
from types import TracebackType

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from fedloom.runtime.metrics import MetricsSink

__all__ = ["ObservabilityServer", "make_app", "start_observability", "stop_observability"]

_log = logging.getLogger(__name__)
_SINK_KEY = web.AppKey("sink", MetricsSink)


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


def make_app(sink: MetricsSink) -> web.Application:
    """The aiohttp application serving ``sink`` (mountable into a larger app)."""
    app = web.Application()
    app[_SINK_KEY] = sink
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
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
    sink: MetricsSink, host: str = "127.0.0.1", port: int = 0
) -> ObservabilityServer:
    """Serve ``/metrics`` and ``/healthz`` for ``sink`` on ``host:port`` (0 = a free port)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    # A scrape is tiny: a short shutdown grace keeps SIGTERM handling prompt.
    runner = web.AppRunner(
        make_app(sink), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    _log.info("observability endpoint on http://%s:%d (/metrics, /healthz)", host, bound)
    return ObservabilityServer(runner, host, int(bound))


async def stop_observability(server: ObservabilityServer) -> None:
    await server.stop()
