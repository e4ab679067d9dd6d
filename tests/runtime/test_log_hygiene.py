"""Log hygiene (issue 13, known failure 8): a client that went away is not an ERROR with
a traceback, and no error text is empty."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
from collections.abc import Iterator

import pytest

from fedloom.runtime.log_filters import AIOHTTP_LOGGERS, ClientGoneFilter, quiet_client_disconnects
from fedloom.runtime.network_peers import Backoff, DialTarget, NetworkPeers
from fedloom.transport import ws
from fedloom.transport.error_text import describe
from fedloom.transport.identity import Identity
from fedloom.transport.links import Link, LinkClosed
from fedloom.transport.roster import Roster, RosterEntry

from .test_peers import Sink, until

LIMIT = 10.0
pytestmark = pytest.mark.timeout(30)

UPGRADE = (
    b"GET /fedloom HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture
def filtered() -> Iterator[None]:
    """The filter installed for one test, then taken off again."""
    before = {name: list(logging.getLogger(name).filters) for name in AIOHTTP_LOGGERS}
    quiet_client_disconnects()
    yield
    for name, filters in before.items():
        logging.getLogger(name).filters[:] = filters


def test_describe_names_the_type_when_the_text_is_empty() -> None:
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ConnectionResetError()) == "ConnectionResetError"
    assert describe(LinkClosed("  ")) == "LinkClosed"
    assert describe(OSError(5, "Input/output error")) == "[Errno 5] Input/output error"

    class BrokenTextError(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    assert describe(BrokenTextError()) == "BrokenTextError"


def test_a_client_reset_becomes_one_debug_line_and_real_errors_stay(
    filtered: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    server_log = logging.getLogger("aiohttp.server")
    for exc in (ConnectionResetError("Connection lost"), BrokenPipeError(), ValueError("bug")):
        try:
            raise exc
        except Exception:
            server_log.exception("Error handling request from %s", "127.0.0.1")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [type(r.exc_info[1]) for r in errors if r.exc_info] == [ValueError]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug == [
        "Error handling request from 127.0.0.1: the client went away (Connection lost)",
        "Error handling request from 127.0.0.1: the client went away (BrokenPipeError)",
    ]
    assert all(r.exc_info is None for r in caplog.records if r.levelno == logging.DEBUG)
    quiet_client_disconnects()  # idempotent: one filter per logger
    assert sum(isinstance(f, ClientGoneFilter) for f in server_log.filters) == 1


async def test_a_client_that_resets_during_the_upgrade_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without the filter: the server itself treats the vanished client as routine."""
    caplog.set_level(logging.DEBUG)
    links: list[Link] = []

    async def on_link(link: Link) -> None:
        links.append(link)
        await link.recv()

    server = await ws.serve("127.0.0.1", 0, on_link, close_timeout=0.5)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(LIMIT):
            for _ in range(3):
                sock = socket.socket()
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", server.port))
                await loop.sock_sendall(sock, UPGRADE)
                # RST at once: the server's 101 meets a closed connection.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                await asyncio.sleep(0.1)
            # The server still serves: a real client gets its link.
            client = await ws.connect(server.url, close_timeout=0.5)
            await until(lambda: bool(links))
            await client.close()
    finally:
        await server.close()
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == [], [r.getMessage() for r in noisy]


async def test_a_dial_failure_without_text_names_the_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fedloom.runtime.peers")
    site = Identity.generate("site-1", "site")
    agg = Identity.generate("agg", "root")
    roster = Roster(1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (site, agg)])

    async def refuse(url: str) -> Link:
        raise ConnectionResetError()  # an OSError whose text is empty

    peers = NetworkPeers(
        site,
        roster,
        dial=[DialTarget("agg", "ws://127.0.0.1:9/fedloom")],
        connect=refuse,
        backoff=Backoff(base_s=0.01, cap_s=0.02),
        rng=random.Random(0),
    )
    async with asyncio.timeout(LIMIT):
        task = asyncio.ensure_future(peers.run(Sink()))
        await until(lambda: peers.dial_failures >= 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    lines = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
    assert lines and "(ConnectionResetError)" in lines[0]
