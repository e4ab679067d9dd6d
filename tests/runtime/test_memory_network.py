"""MemoryNetwork: a pair whose connection ended on its own is joined again (as daemons
redial); a cut, an isolated node or a stopped peer set is not."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fedloom.algorithms.protocol import Event, PeerDown, PeerUp, Received
from fedloom.runtime.memory_network import MemoryNetwork
from fedloom.runtime.network_peers import Backoff
from fedloom.transport.wire import Ack

LIMIT = 10.0  # seconds any one test may take: a bound, never a timing assertion
FAST = Backoff(base_s=0.01, cap_s=0.05)


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def post_nowait(self, event: Event, valid: Callable[[], bool] | None = None) -> None:
        self.events.append(event)

    async def post(self, event: Event, valid: Callable[[], bool] | None = None) -> None:
        if valid is None or valid():
            self.events.append(event)

    def links(self, peer: str) -> list[str]:
        return [
            "up" if isinstance(e, PeerUp) else "down"
            for e in self.events
            if isinstance(e, PeerUp | PeerDown) and e.peer == peer
        ]


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


async def _bad_bytes(net: MemoryNetwork, src: str, dst: str) -> None:
    """Raw bytes that are no wire message, from ``src`` to ``dst`` on their connection."""
    conn = net.peers(src).table.get(dst)
    assert conn is not None
    await conn.pipe.progress.send(b"\xc1 not a message")


async def _joined_again(sa: Sink, sb: Sink, times: int) -> None:
    want = ["up", "down"] * times + ["up"]
    await until(lambda: sa.links("b") == want and sb.links("a") == want)


async def test_a_pair_whose_connection_ended_on_bad_bytes_is_joined_again() -> None:
    net = MemoryNetwork(backoff=FAST)
    net.link("a", "b")
    sa, sb = Sink(), Sink()
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        ta = tg.create_task(net.peers("a").run(sa))
        tb = tg.create_task(net.peers("b").run(sb))
        await until(lambda: sa.links("b") == ["up"] and sb.links("a") == ["up"])
        for round_ in range(1, 4):  # again and again: each time it comes back
            await _bad_bytes(net, "b", "a")
            await _joined_again(sa, sb, round_)
            assert net.redials == round_
        # The new connection carries messages both ways.
        assert net.peers("a").send("b", Ack("a", 7))
        assert net.peers("b").send("a", Ack("b", 8))
        await until(lambda: Received("a", Ack("a", 7)) in sb.events)
        await until(lambda: Received("b", Ack("b", 8)) in sa.events)
        ta.cancel()
        tb.cancel()


async def test_a_cut_pair_waits_for_its_heal_and_an_isolated_node_stays_alone() -> None:
    net = MemoryNetwork(backoff=FAST)
    net.link("a", "b")
    net.link("a", "c")
    sa, sb, sc = Sink(), Sink(), Sink()
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(net.peers(n).run(s)) for n, s in (("a", sa), ("b", sb), ("c", sc))]
        await until(lambda: sa.links("b") == ["up"] and sa.links("c") == ["up"])
        net.cut("a", "b")
        net.isolate("c")
        await asyncio.sleep(10 * FAST.cap_s)  # many back-offs: nothing may redial them
        assert sa.links("b") == ["up", "down"] and sb.links("a") == ["up", "down"]
        assert sa.links("c") == ["up", "down"] and sc.links("a") == ["up", "down"]
        assert net.redials == 0
        net.restore("a", "b")  # the heal joins the pair at once
        await until(lambda: sa.links("b")[-1:] == ["up"] and sb.links("a")[-1:] == ["up"])
        assert sa.links("c") == ["up", "down"]
        for t in tasks:
            t.cancel()


async def test_a_stopped_peer_set_is_not_redialled_and_joins_again_when_it_runs() -> None:
    net = MemoryNetwork(backoff=FAST)
    net.link("a", "b")
    sa, sb = Sink(), Sink()
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        ta = tg.create_task(net.peers("a").run(sa))
        tb = tg.create_task(net.peers("b").run(sb))
        await until(lambda: sb.links("a") == ["up"])
        ta.cancel()
        await until(lambda: sb.links("a") == ["up", "down"])
        await asyncio.sleep(10 * FAST.cap_s)
        assert net.peers("b").connected() == frozenset() and net.redials == 0
        sa2 = Sink()
        ta = tg.create_task(net.peers("a").run(sa2))
        await until(lambda: sa2.links("b") == ["up"] and sb.links("a") == ["up", "down", "up"])
        ta.cancel()
        tb.cancel()
