"""Admission before authentication, through the peer set a daemon runs (loopback only).

The attack of issue 10 (item 5): more idle WebSocket upgrades than the aggregator's gate
admits at once, from one address, renewed as soon as they are dropped. The per-address
cap only works if the peer set hands the gate each link's source address; this checks
that it does, end to end.
"""

from __future__ import annotations

import asyncio

from runtime.peers import DialTarget
from tests.runtime.test_peers import LIMIT, Pki, Sink, peers, pki, until
from tests.transport.test_channel import FLOOD_FROM, flood
from transport.channel import GateLimits

__all__ = ["pki"]  # the fixture, shared with test_peers


async def test_a_flood_of_idle_upgrades_does_not_keep_a_site_from_its_aggregator(
    pki: Pki,
) -> None:
    agg = peers(pki.agg, pki.roster, listen=("127.0.0.1", 0), accept_from={"site-1"})
    agg.gate.limits = GateLimits(max_pending=16, handshake_timeout=0.5)  # 2 per address
    opened = [0]
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        agg_task = tg.create_task(agg.run(Sink()))
        await until(lambda: agg.listener is not None)
        assert agg.listener is not None and agg.listen_url is not None
        port = int(agg.listen_url.rsplit(":", 1)[1].split("/")[0])
        flooding = tg.create_task(flood(port, 64, opened))  # from 127.0.0.2
        # The flood holds its share of the gate and renews what times out.
        await until(
            lambda: (
                agg.gate.refused["handshake_timeout"] >= 2
                and agg.gate.pending_from(FLOOD_FROM) == 2
            )
        )
        site = peers(pki.site, pki.roster, dial=[DialTarget("agg", agg.listen_url)])
        site_task = tg.create_task(site.run(Sink()))
        await until(lambda: "site-1" in agg.connected())  # from 127.0.0.1
        assert site.dial_failures == 0  # admitted at its first try, mid-flood
        assert agg.gate.refused["busy_address"] > 0
        assert agg.gate.pending_from(FLOOD_FROM) <= 2
        assert not flooding.done()
        for task in (flooding, site_task, agg_task):
            task.cancel()
    assert opened[0] > 64  # the flood renewed itself
