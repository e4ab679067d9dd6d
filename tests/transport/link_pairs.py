"""Connected link pairs for tests: in memory, or over loopback WebSockets (127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from transport import ws
from transport.links import Link, memory_link_pair

LINK_KINDS = ("memory", "ws")


@contextlib.asynccontextmanager
async def ws_pair(**options: Any) -> AsyncIterator[tuple[ws.WebSocketLink, ws.WebSocketLink]]:
    """(client link, server link) over a fresh loopback server; ``options`` go to both ends.

    The close time-out is short by default: a test often leaves one end unread, and then
    nobody answers the other end's close frame.
    """
    options.setdefault("close_timeout", 0.3)
    accepted: asyncio.Queue[ws.WebSocketLink] = asyncio.Queue()
    release = asyncio.Event()

    async def on_link(link: ws.WebSocketLink) -> None:
        await accepted.put(link)
        await release.wait()

    server = await ws.serve("127.0.0.1", 0, on_link, **options)
    client: ws.WebSocketLink | None = None
    try:
        client = await ws.connect(server.url, **options)
        yield client, await accepted.get()
    finally:
        release.set()
        if client is not None:
            await client.close()
        await server.close()


@contextlib.asynccontextmanager
async def link_pair(kind: str, **options: Any) -> AsyncIterator[tuple[Link, Link]]:
    """A connected pair of the given kind (see ``LINK_KINDS``)."""
    if kind == "memory":
        a, b = memory_link_pair(**options)
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()
    elif kind == "ws":
        async with ws_pair(**options) as pair:
            yield pair
    else:
        raise ValueError(kind)
