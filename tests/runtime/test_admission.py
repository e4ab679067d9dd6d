"""Admission before authentication, through the peer set a daemon runs (loopback only).

The attack of issue 10 (item 5): more idle WebSocket upgrades than the aggregator's gate
admits at once, from one address, renewed as soon as they are dropped. The per-address
cap only works if the peer set hands the gate each link's source address; this checks
that it does, end to end. Then the same flood from many addresses, which the per-address
cap alone does not stop: the slots kept for addresses that authenticated before do.
"""

from __future__ import annotations

import asyncio

from fedloom.runtime.network_peers import DialTarget, NetworkPeers
from fedloom.transport.channel import ChannelOptions, GateLimits
from fedloom.transport.identity import Identity
from fedloom.transport.links import reserve_share
from fedloom.transport.roster import Roster, RosterEntry
from tests.runtime.test_peers import LIMIT, Pki, Sink, peers, pki, until
from tests.transport.test_channel import FLOOD_FROM, HANDSHAKE_S, flood, flood_from

__all__ = ["pki"]  # the fixture, shared with test_peers


async def test_a_flood_of_idle_upgrades_does_not_keep_a_site_from_its_aggregator(
    pki: Pki,
) -> None:
    agg = peers(pki.agg, pki.roster, listen=("127.0.0.1", 0), accept_from={"site-1"})
    agg.gate.limits = GateLimits(max_pending=16, handshake_timeout=HANDSHAKE_S)  # 2 per address
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


FLOOD_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 10)]  # eight source addresses


async def test_a_flood_from_many_addresses_does_not_keep_a_returning_site_out(pki: Pki) -> None:
    """The attack (review finding 4): idle upgrades from eight addresses, each within its
    per-address cap, renewed as they are dropped: together they hold every slot open to
    unknown addresses. A rostered site that authenticated from 127.0.0.1 before comes
    back during the flood and is admitted at its first try, from the reserve."""
    agg = NetworkPeers(  # the default listener: the TCP caps keep a reserve too
        pki.agg,
        pki.roster,
        listen=("127.0.0.1", 0),
        accept_from={"site-1"},
        keepalive_s=0.5,
        options=ChannelOptions(close_timeout=0.5),
    )
    agg.gate.limits = GateLimits(max_pending=16, handshake_timeout=HANDSHAKE_S)
    limits = agg.gate.limits
    assert (limits.per_address, limits.reserved) == (2, 4)  # 8 x 2 > the 12 unknown slots
    opened = [0]
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        agg_task = tg.create_task(agg.run(Sink()))
        await until(lambda: agg.listen_url is not None)
        assert agg.listen_url is not None
        port = int(agg.listen_url.rsplit(":", 1)[1].split("/")[0])
        # The site has been here before (any earlier session from this address).
        first = peers(pki.site, pki.roster, dial=[DialTarget("agg", agg.listen_url)])
        first_task = tg.create_task(first.run(Sink()))
        await until(lambda: "site-1" in agg.connected())
        first_task.cancel()
        await until(lambda: "site-1" not in agg.connected())
        assert "127.0.0.1" in agg.gate.known

        flooding = tg.create_task(flood_from(FLOOD_ADDRESSES, port, 4, opened))
        unknown = limits.max_pending - limits.reserved
        # The flood has renewed what timed out, and holds every slot open to it again.
        await until(lambda: opened[0] > 8 * 4 and agg.gate.refused["handshake_timeout"] > 0)
        await until(lambda: agg.gate.pending >= unknown and agg.gate.refused["busy"] > 0)
        site = peers(pki.site, pki.roster, dial=[DialTarget("agg", agg.listen_url)])
        site_task = tg.create_task(site.run(Sink()))
        await until(lambda: "site-1" in agg.connected())
        assert site.dial_failures == 0  # admitted at its first try, mid-flood
        assert not flooding.done()
        assert agg.gate.pending - agg.gate.pending_from("127.0.0.1") <= unknown
        assert all(agg.gate.pending_from(a) <= limits.per_address for a in FLOOD_ADDRESSES)
        assert not any(a in agg.gate.known for a in FLOOD_ADDRESSES)
        for task in (flooding, site_task, agg_task):
            task.cancel()


async def test_a_rostered_insider_cannot_keep_a_returning_site_out(pki: Pki) -> None:
    """The attack (second review, finding 4): a rostered site (site-2) whose roster entry
    names two IP literals, which makes both addresses known, holds every idle upgrade
    its per-address cap allows from each of them, and six unknown addresses hold the
    rest. Before, the insider held the whole reserve and a returning site-1 was refused;
    now one peer holds at most an eighth of it, and site-1 is admitted at its first try."""
    insider = Identity.generate("site-2", "site")
    endpoints = ("ws://127.0.0.2:1/fedloom", "ws://127.0.0.3:1/fedloom")
    roster = Roster(
        1, [*pki.roster.entries, RosterEntry("site-2", "site", insider.public_key, endpoints)]
    )
    agg = NetworkPeers(
        pki.agg,
        roster,
        listen=("127.0.0.1", 0),
        accept_from={"site-1", "site-2"},
        keepalive_s=0.5,
        options=ChannelOptions(close_timeout=0.5),
    )
    agg.gate.limits = GateLimits(max_pending=64, handshake_timeout=HANDSHAKE_S)
    limits = agg.gate.limits
    assert (limits.per_address, limits.reserved, reserve_share(limits.reserved)) == (8, 16, 2)
    opened = [0]
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        agg_task = tg.create_task(agg.run(Sink()))
        await until(lambda: agg.listen_url is not None)
        assert agg.listen_url is not None
        port = int(agg.listen_url.rsplit(":", 1)[1].split("/")[0])
        first = peers(pki.site, roster, dial=[DialTarget("agg", agg.listen_url)])
        first_task = tg.create_task(first.run(Sink()))
        await until(lambda: "site-1" in agg.connected())  # site-1 has been here before
        first_task.cancel()
        await until(lambda: "site-1" not in agg.connected())
        assert agg.gate.known.peer_of("127.0.0.2") == "site-2"

        flood = [f"127.0.0.{i}" for i in range(2, 10)]  # the insider's two, six unknown
        flooding = tg.create_task(flood_from(flood, port, limits.per_address, opened))
        outside = limits.max_pending - limits.reserved
        await until(lambda: opened[0] > 8 * 8 and agg.gate.refused["handshake_timeout"] > 0)
        await until(lambda: agg.gate.pending >= outside and agg.gate.refused["busy"] > 0)
        assert agg.gate.reserved_by("site-2") <= reserve_share(limits.reserved)
        site = peers(pki.site, roster, dial=[DialTarget("agg", agg.listen_url)])
        site_task = tg.create_task(site.run(Sink()))
        await until(lambda: "site-1" in agg.connected())
        assert site.dial_failures == 0  # admitted at its first try, mid-flood
        assert not flooding.done()
        for task in (flooding, site_task, agg_task):
            task.cancel()
