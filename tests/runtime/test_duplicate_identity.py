"""Two live daemons with one identity (issue 13, known failure 5): refused, not swapped.

An aggregator keeps the session it has while that one is live and refuses a second
session of the same identity (counted, one WARNING a minute naming both addresses); a
restarted daemon, whose old session ended or went silent, takes over.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import PeerDown, PeerUp, Received
from fedloom.runtime.daemon import report_duplicates
from fedloom.runtime.metrics import MetricsSink
from fedloom.runtime.network_peers import DialTarget, NetworkPeers
from fedloom.transport.channel import client_channel
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster
from fedloom.transport.wire import Update

from . import test_peers
from .test_peers import Pki, Sink, fast_connect, until

LIMIT = 15.0
pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def peers(identity: Identity, roster: Roster, seed: int, **kwargs: Any) -> NetworkPeers:
    # down_after_s longer than any test: only liveness can end a silent session.
    return test_peers.peers(identity, roster, down_after_s=60.0, rng=random.Random(seed), **kwargs)


def update(seq: int) -> Update:
    return Update("site-1", seq, 0, {"w": np.full(4, seq, dtype=np.float32)}, 1)


def received_seqs(sink: Sink) -> set[int]:
    return {e.msg.seq for e in sink.events() if isinstance(e, Received) and type(e.msg) is Update}


async def test_a_second_live_daemon_is_refused_and_the_first_keeps_delivering(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fedloom.runtime.peers")
    agg_sink, first_sink, second_sink = Sink(), Sink(), Sink()
    agg = peers(pki.agg, pki.roster, 0, listen=("127.0.0.1", 0))
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        agg_task = tg.create_task(agg.run(agg_sink))
        await until(lambda: agg.listen_url is not None)
        assert agg.listen_url is not None
        dial = [DialTarget("agg", agg.listen_url)]
        first = peers(pki.site, pki.roster, 1, dial=dial)
        first_task = tg.create_task(first.run(first_sink))
        await until(lambda: "site-1" in agg.connected())
        second = peers(pki.site, pki.roster, 2, dial=dial)
        second_task = tg.create_task(second.run(second_sink))
        await until(lambda: agg.duplicate_identity["site-1"] >= 5)

        # No swap: the aggregator saw one session, the first daemon never lost it.
        assert agg_sink.all().count(PeerUp("site-1")) == 1
        assert first_sink.all() == [PeerUp("agg")]
        assert first.send("agg", update(1))
        await until(lambda: 1 in received_seqs(agg_sink))
        # One WARNING (a minute) naming the peer and both source addresses.
        lines = [r.getMessage() for r in caplog.records if "second session" in r.getMessage()]
        assert len(lines) == 1
        assert "site-1" in lines[0] and lines[0].count("127.0.0.1:") == 2
        # The refused daemon backs off instead of redialling at its base rate.
        assert second_sink.all().count(PeerUp("agg")) <= agg.duplicate_identity["site-1"]

        # The first daemon stops (its TCP connection closes): the second takes over.
        first_task.cancel()
        await until(lambda: agg_sink.all().count(PeerUp("site-1")) == 2)
        await until(lambda: "agg" in second.connected())
        assert second.send("agg", update(2))
        await until(lambda: 2 in received_seqs(agg_sink))
        second_task.cancel()
        agg_task.cancel()


async def test_a_silent_old_session_is_replaced_by_a_restarted_daemon(pki: Pki) -> None:
    """A half-open session (its daemon gone without a FIN) is not a lock-out: once it has
    been silent for a few keep-alive intervals, the restarted daemon replaces it, long
    before the down_after_s watchdog would end it."""
    agg_sink, site_sink = Sink(), Sink()
    agg = peers(pki.agg, pki.roster, 0, listen=("127.0.0.1", 0))
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        agg_task = tg.create_task(agg.run(agg_sink))
        await until(lambda: agg.listen_url is not None)
        assert agg.listen_url is not None
        # The dead daemon's session: handshaken, then nothing more (no keep-alives).
        link = await fast_connect(agg.listen_url)
        channel = await client_channel(link, pki.site, pki.roster, "agg")
        await until(lambda: "site-1" in agg.connected())
        ghost = agg.table.get("site-1")
        restarted = peers(pki.site, pki.roster, 3, dial=[DialTarget("agg", agg.listen_url)])
        site_task = tg.create_task(restarted.run(site_sink))
        await until(lambda: agg.table.get("site-1") not in (None, ghost))
        assert ghost is not None and not ghost.is_open()
        assert agg_sink.all()[:3] == [PeerUp("site-1"), PeerDown("site-1"), PeerUp("site-1")]
        assert restarted.send("agg", update(7))
        await until(lambda: 7 in received_seqs(agg_sink))
        await channel.close()
        site_task.cancel()
        agg_task.cancel()


def test_refused_sessions_are_counted_per_peer_in_the_metrics(pki: Pki) -> None:
    agg = peers(pki.agg, pki.roster, 0, listen=("127.0.0.1", 0))
    sink = MetricsSink()
    agg.duplicate_identity["site-1"] += 3
    seen = report_duplicates(agg, sink, Counter())
    agg.duplicate_identity["site-1"] += 2
    report_duplicates(agg, sink, seen)
    assert sink.value("fedloom_duplicate_identity_total", {"peer": "site-1"}) == 5


async def test_a_child_with_a_longer_keepalive_is_not_swapped_for_its_duplicate(
    pki: Pki,
) -> None:
    """The sites send a keep-alive every 1.5 s, the aggregator every 0.5 s: the first
    session is live by its own pace (the gaps between its frames), so its duplicate is
    refused every time instead of replacing it between two keep-alives."""
    agg_sink, first_sink, second_sink = Sink(), Sink(), Sink()
    agg = peers(pki.agg, pki.roster, 0, listen=("127.0.0.1", 0))
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        agg_task = tg.create_task(agg.run(agg_sink))
        await until(lambda: agg.listen_url is not None)
        assert agg.listen_url is not None
        dial = [DialTarget("agg", agg.listen_url)]
        first = peers(pki.site, pki.roster, 1, dial=dial, keepalive_s=1.5)
        first_task = tg.create_task(first.run(first_sink))
        await until(lambda: "site-1" in agg.connected())
        session = agg.table.get("site-1")
        assert session is not None
        await until(lambda: max(session.pipe.progress.gaps, default=0.0) > 1.0)
        second = peers(pki.site, pki.roster, 2, dial=dial, keepalive_s=1.5)
        second_task = tg.create_task(second.run(second_sink))
        await until(lambda: agg.duplicate_identity["site-1"] >= 1)
        await asyncio.sleep(4.5)  # three of the first's keep-alive intervals
        assert agg.duplicate_identity["site-1"] >= 5
        assert agg_sink.all().count(PeerUp("site-1")) == 1  # never swapped
        assert agg.table.get("site-1") is session and session.is_open()
        second_task.cancel()
        first_task.cancel()
        agg_task.cancel()
