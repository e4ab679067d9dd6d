"""A stop forced while a write stalls (issue 13 review): the daemon cancels the driver after
its grace period; the write in flight still completes before run() ends (the store's thread
finishes it anyway), the group waiting behind it is never written and none of its messages
is delivered, and run() then ends with the cancellation its caller asked for."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fedloom.algorithms.protocol import Received
from fedloom.runtime.driver import AsyncDriver
from fedloom.transport.wire import Ack, Heartbeat
from tests.runtime.test_driver import (
    LIMIT,
    FakePeers,
    GatedStore,
    ScriptNode,
    persist_then_send,
    until,
)


async def test_a_forced_stop_waits_for_the_write_in_flight_and_drops_the_group() -> None:
    journal: list[Any] = []
    store = GatedStore(journal)
    node = ScriptNode("n", persist_then_send)
    driver = AsyncDriver(node, peers=FakePeers(journal), store=store)
    async with asyncio.timeout(LIMIT):
        task = asyncio.create_task(driver.run())
        driver.post_nowait(Received("p", Heartbeat("p", 0)))
        await until(store.started.is_set)  # the first write is stuck on the disk
        driver.post_nowait(Received("p", Heartbeat("p", 1)))
        await until(lambda: len(node.seen) == 2)  # its group waits behind it
        driver.stop()
        task.cancel()  # the daemon's force_stop, after its grace period
        for _ in range(20):  # the event loop keeps turning; run() must not end yet
            await asyncio.sleep(0)
            task.cancel()  # force_stop repeats itself every second
        assert not task.done() and journal == [("queued", "p", Ack("s", 1))] * 2
        store.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [e[1] for e in journal if e[0] == "commit"] == [["outbox"]]  # the group: never
    assert [e for e in journal if e[0] == "send"] == [("send", "p", Ack("s", 1))]  # one ack
    assert driver.unwritten_at_forced_stop == 1
