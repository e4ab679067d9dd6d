"""Durable relay sequence numbers (``runtime.relay_seq``): written before delivery, one
write for envelopes that wait together, and a sender reservation that outlives its clock."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import Persist
from fedloom.federation.store import StateStore
from fedloom.runtime.relay_seq import RELAY_SEQ_KEY, RESERVE_NS, RelaySeqState
from fedloom.runtime.signing import EndToEnd
from fedloom.transport.e2e import ReplayedUpdateError
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import GossipShare, Heartbeat

A = Identity.generate("peer-a", "peer")
B = Identity.generate("peer-b", "peer")
ROSTER = Roster(1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (A, B)])
FP32 = CodecSpec()


class SlowStore:
    """Records every value written; each write waits for ``go``."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.go = threading.Event()

    def apply(self, persist: Persist) -> None:
        assert persist.key == RELAY_SEQ_KEY and not persist.append
        self.go.wait(5.0)
        self.values.append(persist.data)


def durable(identity: Identity, store: StateStore) -> EndToEnd:
    e2e = EndToEnd(identity, ROSTER)
    e2e.keep_relay_seq(RelaySeqState(store, store.load().values.get(RELAY_SEQ_KEY)))
    return e2e


async def test_waiters_share_a_write_that_holds_their_floors() -> None:
    store = SlowStore()
    floors: dict[str, int] = {}
    state = RelaySeqState(store)
    state.bind(lambda: floors)
    floors["peer-a"] = 1
    first = asyncio.ensure_future(state.persist())
    await asyncio.sleep(0.01)  # its write is in flight, with floor 1
    waiting = []
    for n in range(2, 6):
        floors["peer-a"] = n
        waiting.append(asyncio.ensure_future(state.persist()))
    await asyncio.sleep(0.01)
    assert not first.done() and not any(w.done() for w in waiting)
    store.go.set()
    await asyncio.gather(first, *waiting)
    # One write for the first, ONE more for the four that came while it was in flight,
    # and that one holds the last floor raised before any of them returned.
    assert [v["seen"] for v in store.values] == [{"peer-a": 1}, {"peer-a": 5}]


async def test_a_failed_write_is_not_a_delivery(tmp_path: Path) -> None:
    class Broken:
        def apply(self, persist: Persist) -> None:
            raise OSError("disk full")

    sender = EndToEnd(A, ROSTER)
    env = await sender.seal_relayed("peer-b", Heartbeat("peer-a", 1), FP32)
    receiver = EndToEnd(B, ROSTER)
    receiver.keep_relay_seq(RelaySeqState(Broken()))  # type: ignore[arg-type]
    with pytest.raises(OSError, match="disk full"):
        await receiver.open_relayed(env)


async def test_the_receiving_floor_survives_a_restart(tmp_path: Path) -> None:
    sender = EndToEnd(A, ROSTER)
    envs = [await sender.seal_relayed("peer-b", Heartbeat("peer-a", i), FP32) for i in range(3)]
    with StateStore(tmp_path) as store:
        receiver = durable(B, store)
        for i, env in enumerate(envs):
            assert await receiver.open_relayed(env) == Heartbeat("peer-a", i)
        assert receiver.relay_seq.writes == 3  # each delivered after its own write
    with StateStore(tmp_path) as store:
        again = durable(B, store)
        for env in envs:
            with pytest.raises(ReplayedUpdateError):
                await again.open_relayed(env)
        assert again.rejected["replay"] == 3


async def test_a_restarted_sender_numbers_above_what_it_used_whatever_its_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = EndToEnd(B, ROSTER)
    share = GossipShare("peer-a", 1, {"w": np.ones(8, np.float32)}, 0.5)
    with StateStore(tmp_path) as store:
        sender = durable(A, store)
        sent = [await sender.seal_relayed("peer-b", share, FP32) for _ in range(5)]
        assert sender.relay_seq.writes == 1  # one reservation covers many envelopes
        assert sender.relay_seq.sent >= sent[-1].seq + RESERVE_NS - 10**9
        for env in sent:
            await receiver.open_relayed(env)
    monkeypatch.setattr(time, "time_ns", lambda: 1)  # the clock stepped back to 1970
    with StateStore(tmp_path) as store:
        restarted = durable(A, store)
        env = await restarted.seal_relayed("peer-b", share, FP32)
    assert env.seq > sent[-1].seq
    assert isinstance(await receiver.open_relayed(env), GossipShare)


def test_a_damaged_value_is_not_taken_for_an_empty_floor() -> None:
    for bad in ({"sent": "1", "seen": {}}, {"sent": 1, "seen": {"a": 1.5}}, [1, 2]):
        with pytest.raises(ValueError, match=RELAY_SEQ_KEY):
            RelaySeqState(None, bad)
