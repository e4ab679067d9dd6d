"""Test fixtures: connected link pairs (in memory, or loopback WebSockets on 127.0.0.1 only),
identities and a roster, and connected secure channels."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from fedloom.transport import ws
from fedloom.transport.channel import (
    DEFAULT_OPTIONS,
    ChannelOptions,
    SecureChannel,
    client_channel,
    server_channel,
)
from fedloom.transport.identity import Identity
from fedloom.transport.links import Link, LinkClosed, memory_link_pair
from fedloom.transport.roster import Roster, RosterEntry

LINK_KINDS = ("memory", "ws")


@contextlib.asynccontextmanager
async def echo_server(
    *, seen: list[object] | None = None, **options: Any
) -> AsyncIterator[tuple[ws.WsServer, list[BaseException]]]:
    """A loopback server that echoes every frame; the errors its links ended with are
    collected, and ``seen`` (if given) gets each server-side link's aiohttp response
    object and the type of each frame it received."""
    errors: list[BaseException] = []

    async def on_link(link: ws.WebSocketLink) -> None:
        if seen is not None:
            seen.append(link._ws)
        try:
            while True:
                data = await link.recv()
                if seen is not None:
                    seen.append(type(data))
                await link.send(data)
        except LinkClosed:
            pass
        except Exception as exc:
            errors.append(exc)
            raise

    options.setdefault("close_timeout", 0.5)
    options.setdefault("handshake_messages", 0)  # raw frames, no secure channel
    server = await ws.serve("127.0.0.1", 0, on_link, **options)
    try:
        yield server, errors
    finally:
        await server.close()


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

    # Raw frames of any size from the first one (no handshake flights to cap).
    server = await ws.serve("127.0.0.1", 0, on_link, handshake_messages=0, **options)
    client: ws.WebSocketLink | None = None
    try:
        client = await ws.connect(server.url, **options)
        yield client, await accepted.get()
    finally:
        release.set()
        # The client and the server's end at once: each answers the other's close frame.
        await asyncio.gather(*([] if client is None else [client.close()]), server.close())


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


# ------------------------------------------------------------------ identities for channels


@dataclasses.dataclass(frozen=True)
class Pki:
    """An aggregator and two sites, all in one roster; ``stranger`` is in no roster."""

    server: Identity
    client: Identity
    other: Identity
    stranger: Identity
    roster: Roster


def make_pki() -> Pki:
    server = Identity.generate("agg", "root")
    client = Identity.generate("site-1", "site")
    other = Identity.generate("site-2", "site")
    stranger = Identity.generate("site-9", "site")
    roster = Roster(
        1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (server, client, other)]
    )
    return Pki(server, client, other, stranger, roster)


async def channel_pair(
    a: Link,
    b: Link,
    pki: Pki,
    *,
    options: ChannelOptions = DEFAULT_OPTIONS,
    client: Identity | None = None,
) -> tuple[SecureChannel, SecureChannel]:
    """(client channel on ``a``, server channel on ``b``), handshaking concurrently."""
    return await asyncio.gather(
        client_channel(a, client or pki.client, pki.roster, "agg", options=options),
        server_channel(b, pki.server, pki.roster, options=options),
    )
