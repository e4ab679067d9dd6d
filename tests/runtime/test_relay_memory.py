"""A relay's memory per destination is bounded in bytes (review finding 5 of issue 10).

The attack: rostered peer-a sends large relayed envelopes to rostered peer-b, which
authenticated to the relay and then reads nothing. The relay checks only src and dst, so
it forwards them all onto peer-b's send queue; capped by message count alone, that queue
held 256 envelopes of up to the envelope cap each (gigabytes). The queue is capped in
bytes too (a few envelopes of the relay's size cap), and a peer that lets more pile up is
disconnected, as for the count cap.
"""

from __future__ import annotations

import asyncio

import numpy as np

from fedloom.algorithms.protocol import Received
from fedloom.algorithms.relay import RelayNode
from fedloom.runtime.connection import QUEUE_MESSAGES_OF_CAP, Connection, ProgressLink, WirePipe
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.network_peers import DialTarget
from fedloom.transport.channel import SecureChannel, client_channel
from fedloom.transport.identity import Identity
from fedloom.transport.limits import Limits
from fedloom.transport.links import memory_link_pair
from fedloom.transport.wire import Heartbeat, Relayed
from tests.runtime.test_relaying import RELAY, ROSTER, A, B, C, make_peers, share
from tests.runtime.test_signatures import LIMIT, Hub, Sink, until

ENVELOPE_CAP = 256 * 1024  # the relay's [connection] max_message_mib, small for the test
QUEUE_CAP = QUEUE_MESSAGES_OF_CAP * ENVELOPE_CAP  # 1 MiB per destination
PAYLOAD = 128 * 1024


async def dial(hub: Hub, url: str, identity: Identity) -> SecureChannel:
    """A hand-driven channel to the relay: sends whatever the test crafts."""
    return await client_channel(ProgressLink(await hub.connect(url)), identity, ROSTER, "relay")


async def test_a_peer_that_reads_nothing_cannot_make_the_relay_hold_more_than_its_cap() -> None:
    hub = Hub()
    relay = make_peers(hub, RELAY, listen=("relay", 0), allowed_roles=("peer",))
    relay.limits = Limits(max_message_bytes=ENVELOPE_CAP, max_decoded_bytes=ENVELOPE_CAP)
    driver = AsyncDriver(RelayNode("relay"), peers=relay)
    node = driver.node
    assert isinstance(node, RelayNode)
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(driver.run())]
    try:
        async with asyncio.timeout(LIMIT):
            await until(lambda: relay.listen_url is not None)
            assert relay.listen_url is not None
            url = relay.listen_url
            silent = await dial(hub, url, B)  # authenticates, then reads nothing
            attacker = await dial(hub, url, A)
            await until(lambda: {"peer-a", "peer-b"} <= node.connected())
            to_b = relay.table.get("peer-b")
            assert to_b is not None and to_b.max_queue_bytes == QUEUE_CAP
            most = 0
            garbage = np.zeros(PAYLOAD, np.uint8)  # the relay cannot check a payload
            for seq in range(1, 201):  # 25 MiB, 200 envelopes: under the count cap
                envelope = Relayed("peer-a", "peer-b", seq, {"payload": garbage}, bytes(64))
                await attacker.send_tensors(envelope)
                most = max(most, to_b.queued_bytes)
                if not to_b.is_open():
                    break
            await until(lambda: not to_b.is_open())
            assert to_b.reason is not None and "bytes waiting" in to_b.reason
            assert most <= QUEUE_CAP
            await until(lambda: "peer-b" not in node.connected())
            assert node.forwarded * PAYLOAD < 16 * QUEUE_CAP  # the rest was dropped

            # The relay is alive and still relays honest traffic, peer-b's included.
            assert not tasks[0].done()
            sinks = {"peer-b": Sink(), "peer-c": Sink()}
            b = make_peers(hub, B, dial=[DialTarget("relay", url)], routes={"peer-c": "relay"})
            c = make_peers(hub, C, dial=[DialTarget("relay", url)], routes={"peer-b": "relay"})
            tasks += [asyncio.create_task(p.run(sinks[p.node_id])) for p in (b, c)]
            await until(lambda: {"peer-b", "peer-c"} <= node.connected())
            assert c.send("peer-b", share("peer-c", 1, n=PAYLOAD // 8))
            await until(
                lambda: any(
                    isinstance(e, Received) and e.peer == "peer-c" for e in sinks["peer-b"].posted
                )
            )
            await silent.close()
            await attacker.close()
    finally:
        driver.stop()
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        hub.close()


async def test_send_queue_byte_cap_counts_tensor_bytes_and_frees_them_as_sent() -> None:
    a, b = memory_link_pair()
    conn = Connection("peer-b", WirePipe(a), local_id="me", max_queue_bytes=3000)
    big = share("me", 1, n=1000)  # 4000 bytes: more than the cap, alone in the queue
    assert conn.send(big) and conn.queued_bytes == 4000
    peer = asyncio.create_task(conn.run(lambda c, m: asyncio.sleep(0)))
    try:
        async with asyncio.timeout(LIMIT):
            await b.recv()  # the peer reads it: what is sent is no longer counted
            await until(lambda: conn.queued_bytes == 0)
            small = share("me", 2, n=500)  # 2000 bytes
            # Queued faster than read: the second would make 4000 bytes wait.
            assert conn.send(Heartbeat("me", 1)) and conn.send(small)
            assert not conn.send(small) and not conn.is_open()
            assert conn.reason is not None and "bytes waiting, limit 3000" in conn.reason
            await peer
    finally:
        peer.cancel()
        await b.close()
