"""A connection's maximum lifetime: it ends between two messages, or after a grace."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime import connection as connection_mod
from fedloom.runtime.config import parse_config
from fedloom.runtime.connection import Connection, Outgoing, ProgressLink
from fedloom.transport.links import memory_link_pair
from fedloom.transport.wire import Ack, Message
from tests.runtime.test_config import site_raw

pytestmark = pytest.mark.timeout(10)


class SlowPipe:
    """A pipe whose every send takes ``send_s`` (a large message on a slow link), or
    never ends (``send_s`` None: a peer that stopped reading)."""

    def __init__(self, send_s: float | None) -> None:
        self.send_s = send_s
        self.started: list[Outgoing] = []
        self.finished: list[Outgoing] = []
        self.closed = False
        self._progress = ProgressLink(memory_link_pair()[0])

    @property
    def progress(self) -> ProgressLink:
        return self._progress

    async def send(self, msg: Outgoing, after: Any = None) -> None:
        self.started.append(msg)
        if self.send_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.send_s or 0.0)
        self.finished.append(msg)

    async def recv(self) -> Message:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self.closed = True


async def nothing(conn: Connection, msg: Any) -> None:
    return None


async def test_the_message_in_flight_is_finished_before_the_session_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection_mod, "LIFETIME_GRACE", 10.0)
    pipe = SlowPipe(send_s=0.3)
    conn = Connection("peer", pipe, local_id="me", max_session_s=0.2)
    conn.send(Ack("me", 1))  # starts at once, still streaming when the lifetime is up
    conn.send(Ack("me", 2))  # queued before the end: sent too

    async def late() -> None:
        await asyncio.sleep(0.25)
        conn.send(Ack("me", 3))  # after the end was queued: left for the next session

    async with asyncio.TaskGroup() as tg:
        tg.create_task(late())
        reason = await asyncio.wait_for(conn.run(nothing), 5)
    assert "maximum lifetime" in reason
    assert pipe.finished == [Ack("me", 1), Ack("me", 2)] == pipe.started
    assert pipe.closed and not conn.is_open()


async def test_a_peer_that_stops_reading_cannot_hold_a_session_open() -> None:
    pipe = SlowPipe(send_s=None)
    conn = Connection("peer", pipe, local_id="me", max_session_s=0.2)
    conn.send(Ack("me", 1))
    reason = await asyncio.wait_for(conn.run(nothing), 5)
    assert "held it open" in reason and pipe.finished == []


def test_max_session_s_is_validated() -> None:
    base = site_raw()
    del base["connection"]
    assert parse_config(base).connection.max_session_s == 3600.0
    for good in (0.5, 86400):
        raw = {**base, "connection": {"max_session_s": good}}
        assert parse_config(raw).connection.max_session_s == good
    for bad in (0, -1.0, 10**9, "1h", float("nan")):
        with pytest.raises(ConfigError, match="max_session_s"):
            parse_config({**base, "connection": {"max_session_s": bad}})
    with pytest.raises(ValueError, match="max_session_s"):
        Connection("peer", SlowPipe(0.0), local_id="me", max_session_s=0.0)
