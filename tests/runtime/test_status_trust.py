"""The status view trusts no more than it can check (``runtime.status``,
``runtime.status_cli``, ``runtime.health``): without ``[subtrees]`` a region's forward
cannot move another region's site on the board nor refresh it, and what it claims is
marked as claimed; ``fedloom status`` on a document that is not a board's (or of another
schema) says so in one line; the metrics port answers only to its own Host names (DNS
rebinding)."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from fedloom.algorithms.protocol import Metric, Received
from fedloom.cli import main
from fedloom.runtime.health import make_app, start_observability
from fedloom.runtime.metrics import MetricsSink
from fedloom.runtime.status import StatusBoard
from fedloom.runtime.status_cli import format_status
from fedloom.runtime.status_page import render
from fedloom.transport.wire import Update


class _Entry:
    def __init__(self, role: str) -> None:
        self.role = role


class _Roster:
    version = 1

    def lookup(self, node_id: str) -> _Entry | None:
        return _Entry("site") if node_id.startswith("site") else None


def board(subtrees: dict[str, list[str]] | None = None) -> StatusBoard:
    return StatusBoard(
        "root",
        "root",
        children={"region-a": "region", "region-b": "region"},
        subtrees=subtrees,
        roster=lambda: _Roster(),  # type: ignore[arg-type,return-value]
        started=0.0,
    )


def forward(b: StatusBoard, region: str, pairs: list[tuple[str, int]], now: float) -> None:
    msg = Update(region, int(now), 0, {"w": np.zeros(1, np.float32)}, 10, 1, -1, pairs=tuple(pairs))
    b.observe(Received(region, msg), [Metric("update_applied", 1.0, {"src": region})], now)


def sites(b: StatusBoard, now: float) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in b.document(now)["tiers"][2]}


def test_a_region_cannot_take_over_another_regions_site() -> None:
    b = board()
    forward(b, "region-a", [("site-1", 1)], 1.0)  # site-1 really is under region-a
    forward(b, "region-b", [("site-1", 99), ("site-7", 5)], 500.0)  # region-b claims it
    seen = sites(b, 500.0)
    assert seen["site-1"]["parent"] == "region-a"
    assert seen["site-1"]["last_update_age_s"] == 499.0 and seen["site-1"]["updates"] == 1
    assert seen["site-1"]["disputed_by"] == ["region-b"]
    # What a forward names without [subtrees] is that region's word: marked so.
    assert seen["site-1"]["claimed"] is True and seen["site-7"]["claimed"] is True
    assert seen["site-7"]["parent"] == "region-b"
    doc = b.document(500.0)
    text = "\n".join(format_status(doc))
    assert "site-7 (site)  claimed by region-b" in text
    assert "site-1 (site)  claimed by region-a (ALSO CLAIMED BY region-b)" in text
    page = render(doc)
    assert "claimed by region-b" in page and "also claimed by region-b" in page
    # With [subtrees], the declared sites are not claims, and a region's forward over a
    # site not in its subtree changes nothing.
    b = board({"region-a": ["site-1"], "region-b": ["site-2"]})
    forward(b, "region-b", [("site-1", 3)], 10.0)
    forward(b, "region-a", [("site-1", 4)], 20.0)
    seen = sites(b, 30.0)
    assert seen["site-1"]["parent"] == "region-a" and seen["site-1"]["claimed"] is False
    assert seen["site-1"]["updates"] == 1 and "disputed_by" not in seen["site-1"]


@pytest.fixture
def serve_doc() -> Iterator[Any]:
    servers: list[http.server.HTTPServer] = []

    def start(doc: object) -> str:
        body = json.dumps(doc).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        # A short poll: ``shutdown`` at the end waits for the loop to look (0.5 s by default).
        serve = functools.partial(srv.serve_forever, poll_interval=0.02)
        threading.Thread(target=serve, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_port}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize(
    "doc",
    [
        {"schema": "fedloom.status/1", "tiers": [[1]]},
        {"schema": "fedloom.status/1", "accuracy": [[0, 1]]},
        {"schema": "fedloom.status/1", "node": "x"},
        {"schema": "fedloom.status/1", "versions": [5]},
        {"schema": "fedloom.status/1", "tiers": [[{"id": "r"}], [7]]},
    ],
)
def test_a_malformed_document_is_one_line(
    doc: object, serve_doc: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url = serve_doc(doc)
    assert main(["status", "--url", url]) == 1
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "the status document is malformed" in err
    assert main(["status", "--url", url, "--json"]) == 0  # as it came


def test_another_schema_is_refused(serve_doc: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = serve_doc({"schema": "fedloom.status/2", "tiers": "anything"})
    assert main(["status", "--url", url]) == 1
    _, err = capsys.readouterr()
    assert "schema 'fedloom.status/2'" in err and err.count("\n") == 1
    url = serve_doc({"schema": "prometheus/1", "tiers": []})
    assert main(["status", "--url", url]) == 1
    assert "not a fedloom status document" in capsys.readouterr().err


def _get(url: str, host: str | None) -> int:
    headers = {"Host": host} if host is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_the_metrics_port_answers_only_to_its_own_names() -> None:
    doc = board().document(1.0)

    async def scenario() -> None:
        sink = MetricsSink()
        sink.set_ready(True)
        srv = await start_observability(sink, status=lambda: doc)
        try:
            for route in ("/status", "/status.json", "/metrics", "/healthz"):
                url = srv.url + route
                for evil in ("evil.example", f"evil.example:{srv.port}", "127.0.0.1.nip.io"):
                    assert await asyncio.to_thread(_get, url, evil) == 421, (route, evil)
                for good in (f"127.0.0.1:{srv.port}", f"localhost:{srv.port}", "localhost"):
                    assert await asyncio.to_thread(_get, url, good) == 200, (route, good)
        finally:
            await srv.stop()
        # Bound to a wildcard (here served on loopback): any IP literal is its own address.
        runner = web.AppRunner(make_app(sink, lambda: doc, "0.0.0.0"), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            url = f"http://127.0.0.1:{port}/status.json"
            assert await asyncio.to_thread(_get, url, f"10.1.2.3:{port}") == 200
            assert await asyncio.to_thread(_get, url, f"[::1]:{port}") == 200
            assert await asyncio.to_thread(_get, url, "attacker.example") == 421
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
