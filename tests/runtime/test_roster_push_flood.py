"""A parent that pushes junk rosters as fast as it can (second review, finding 6).

Each push used to cost the child a parse on a worker thread and a warning line. Now one
parent's pushes are parsed at a bounded rate (``PUSH_BURST``, then one per
``PUSH_INTERVAL_S``) and refused rosters log one line per parent and reason a minute;
each refusal is still counted. Real WebSockets and handshakes on loopback.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from fedloom.runtime import roster_updates
from fedloom.runtime.network_peers import DialTarget
from fedloom.runtime.roster_updates import PUSH_BURST, PUSH_INTERVAL_S, RosterKeeper
from fedloom.transport import wire, ws
from fedloom.transport.channel import Gatekeeper, SecureChannel
from fedloom.transport.identity import Identity
from fedloom.transport.links import Link
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.wire import RosterUpdate
from tests.runtime.test_peers import LIMIT, Pki, Sink, peers, pki, until

__all__ = ["pki"]  # the fixture, shared with test_peers

FLOOD = 2_000


def signed(pki: Pki, consortium: Identity, version: int) -> str:
    entries = [RosterEntry(i.node_id, i.role, i.public_key) for i in (pki.agg, pki.site)]
    return Roster.sign(Roster(version, entries).to_toml(), consortium)


async def test_a_parent_pushing_junk_rosters_costs_bounded_parses_and_log_lines(
    pki: Pki, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: the site's parent (a rostered, hostile aggregator) pushes 2,000 junk
    rosters claiming a newer version, over the site's own session. The site parses at
    most ``PUSH_BURST`` of them, logs at most one line per reason, counts all 2,000,
    keeps its session, and installs a genuine newer roster once the parent's rate allows
    it again."""
    caplog.set_level(logging.WARNING)
    consortium = Identity.generate("consortium", "consortium")
    v1 = signed(pki, consortium, 1)
    roster = Roster.loads(v1, consortium.public_key)
    parses = [0]

    class Counting(Roster):
        @classmethod
        def loads(cls, text: str, consortium_key: bytes) -> Roster:
            parses[0] += 1
            return Roster.loads(text, consortium_key)

    monkeypatch.setattr(roster_updates, "Roster", Counting)
    channels: asyncio.Queue[SecureChannel] = asyncio.Queue()
    gate = Gatekeeper(pki.agg, roster)
    held = asyncio.Event()

    async def parent(link: Link) -> None:  # the hostile aggregator
        channel = await gate.accept(link)
        await channels.put(channel)
        await held.wait()

    server = await ws.serve("127.0.0.1", 0, parent)
    site = peers(pki.site, roster, dial=[DialTarget("agg", server.url)])
    keeper = RosterKeeper(pki.site, consortium.public_key, roster, v1, persist=lambda r, t: None)
    keeper.attach(site)
    now = [0.0]
    keeper.clock = lambda: now[0]
    tasks: list[asyncio.Task[Any]] = []
    try:
        async with asyncio.timeout(LIMIT):
            tasks.append(asyncio.create_task(site.run(Sink())))
            channel = await channels.get()
            await until(lambda: "agg" in site.connected())
            junk = "version = 2\n# " + "x" * 10_000 + "\n"
            for _ in range(FLOOD):
                await channel.send_message(wire.encode(RosterUpdate(2, junk)))
            await until(lambda: keeper.refused == FLOOD)
            assert parses[0] == PUSH_BURST
            refusals = [r for r in caplog.records if "refused a roster from agg" in r.getMessage()]
            assert len(refusals) == 2  # one per reason: unparseable, pushed too often
            assert keeper.roster.version == 1 and "agg" in site.connected()

            now[0] += PUSH_INTERVAL_S  # the parent's rate allows one more parse
            await channel.send_message(wire.encode(RosterUpdate(2, signed(pki, consortium, 2))))
            await until(lambda: keeper.roster.version == 2)
            assert parses[0] == PUSH_BURST + 1 and keeper.refused == FLOOD
            assert "agg" in site.connected() and not channel.closed
    finally:
        held.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.close()
