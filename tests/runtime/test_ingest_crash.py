"""SIGKILL of an aggregator in the middle of a busy ingest loses no acknowledged update.

A FedBuff root with its durable store runs in its own process behind ``NetworkPeers``;
twelve sites in this process answer every task at once (fp16 deltas, encrypted
WebSockets), so updates arrive while the write before them is still on its way to disk and
the driver commits them as groups. The root's disk is slow (each WAL frame reaches the OS
a few milliseconds late), and once the driver has grouped writes it stalls for good: the
next write never reaches the OS, and the updates handled meanwhile wait in a group behind
it. The root is killed only once such a group exists (or a bound has passed), so every
run has acknowledgeable updates that exist only in memory: an ack that did not wait for
its write is lost with the process, deterministically, not by the luck of the kill's
moment. After the kill, every update a site holds an ``Ack`` for must be in the state the
root recovers, and none of the stalled write's updates may have been acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np
import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Effect, Event, PeerUp, Received, Send, Weights
from fedloom.federation.store import StateStore
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.network_peers import DialTarget, NetworkPeers
from fedloom.transport.codec_policy import CodecPolicy
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import Ack, Hello, TrainRequest, Update

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SITES = [f"site-{i:02d}" for i in range(12)]
SLOW_DISK_S = 0.005
STALL_AFTER_GROUPS = 5  # the root's disk stalls once the driver has grouped this many
GROUP_WAIT_S = 10.0  # bound on waiting for a group behind the stalled write (not asserted)


def pki() -> tuple[dict[str, Identity], Roster]:
    """Identities from fixed seeds, so both processes derive the same keys."""
    roles = {"agg": "root", **dict.fromkeys(SITES, "site")}
    ids = {
        n: Identity(n, role, nacl.signing.SigningKey(n.encode().ljust(32, b"\0")))
        for n, role in roles.items()
    }
    return ids, Roster(1, [RosterEntry(i.node_id, i.role, i.public_key) for i in ids.values()])


def model() -> Weights:
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((500, 100), dtype=np.float32), "b": np.zeros(100, np.float32)}


def make_root() -> FedBuffAggregator:
    return FedBuffAggregator(
        "agg", dict.fromkeys(SITES, "site"), model(), buffer_size=4, concurrency=len(SITES)
    )


def serve(state: str, out: str) -> None:
    """The aggregator process: serves until killed; writes its URL, then its driver's
    counters, the updates of the write that stalled and whether a group waits behind the
    write in flight, every 20 ms, to ``out`` (replaced atomically)."""
    real_append = StateStore._append
    stall = threading.Event()  # set: the next write never reaches the OS
    stalled: list[list[Any]] = []  # (src, seq) of the "applied" records it held

    def slow_append(self: StateStore, batch: list[list[Any]]) -> None:
        time.sleep(SLOW_DISK_S)  # a slow disk: the frame reaches the OS late
        if stall.is_set():
            stalled.extend([r["src"], r["seq"]] for key, r in batch if key == "applied")
            threading.Event().wait()  # a disk that stopped answering: never returns
        real_append(self, batch)

    StateStore._append = slow_append  # type: ignore[method-assign]

    async def main() -> None:
        ids, roster = pki()
        store = StateStore(state)
        store.load()
        peers = NetworkPeers(ids["agg"], roster, listen=("127.0.0.1", 0), accept_from=SITES)
        driver = AsyncDriver(make_root(), peers=peers, store=store)
        run = asyncio.ensure_future(driver.run())
        while not run.done():
            if driver.stats.grouped >= STALL_AFTER_GROUPS:
                stall.set()
            if peers.listen_url is not None:
                tmp = out + ".tmp"
                status = {
                    "url": peers.listen_url,
                    "grouped": driver.stats.grouped,
                    "stalled": stalled or None,
                    "behind": driver._group_done is not None,  # a group waits for a write
                }
                with open(tmp, "w") as f:
                    json.dump(status, f)
                os.replace(tmp, out)
            await asyncio.sleep(0.02)
        await run

    asyncio.run(main())


class EchoSite:
    """Answers each TrainRequest at once with a fixed delta; remembers what was acked."""

    def __init__(self, site_id: str, delta: Weights, acked: set[tuple[str, int]]) -> None:
        self._id = site_id
        self.delta = delta
        self.acked = acked
        self.seq = 0

    @property
    def node_id(self) -> str:
        return self._id

    def next_deadline(self) -> float | None:
        return None

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp):
            return [Send("agg", Hello(self._id, "site", 10))]
        if isinstance(event, Received) and isinstance(event.msg, TrainRequest):
            self.seq += 1
            req = event.msg
            return [
                Send("agg", Update(self._id, self.seq, req.version, self.delta, 10, task=req.task))
            ]
        if isinstance(event, Received) and isinstance(event.msg, Ack):
            self.acked.add((event.msg.src, event.msg.seq))
        return []


def read_status(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return {}


async def load_until_killed(
    proc: subprocess.Popen[bytes], status: Path, acked: set[tuple[str, int]], log: Path
) -> tuple[int, set[tuple[str, int]]]:
    """Run the sites until the root's disk stalled with a group waiting behind the stalled
    write, then SIGKILL it; returns (groups reported, the stalled write's updates)."""
    deadline = time.monotonic() + 30
    while "url" not in read_status(status):
        assert proc.poll() is None, f"the aggregator exited: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "the aggregator never listened"
        await asyncio.sleep(0.05)
    url = read_status(status)["url"]
    ids, roster = pki()
    rng = np.random.default_rng(1)
    delta = {
        k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in model().items()
    }
    drivers = [
        AsyncDriver(
            EchoSite(s, delta, acked),
            peers=NetworkPeers(
                ids[s],
                roster,
                dial=[DialTarget("agg", url)],
                codecs=CodecPolicy(up=CodecSpec(kind="fp16")),
            ),
        )
        for s in SITES
    ]
    tasks = [asyncio.ensure_future(d.run()) for d in drivers]
    try:
        while not read_status(status).get("stalled"):
            assert proc.poll() is None, f"the aggregator exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no stall after {len(acked)} acks"
            await asyncio.sleep(0.01)
        # Once the write stalled, the write in flight is the stalled one: a group behind
        # it holds updates handled (and to be acknowledged) only in memory.
        bound = time.monotonic() + GROUP_WAIT_S  # updates in flight arrive and are grouped
        while not read_status(status)["behind"] and time.monotonic() < bound:
            assert proc.poll() is None, f"the aggregator exited: {log.read_text()[-2000:]}"
            await asyncio.sleep(0.01)
        last = read_status(status)
        proc.send_signal(signal.SIGKILL)  # a write stuck before the OS, a group behind it
        proc.wait(10)
        await asyncio.sleep(0.2)  # acks already on the wire still arrive
        return int(last["grouped"]), {(str(s), int(q)) for s, q in last["stalled"]}
    finally:
        for d in drivers:
            d.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_sigkill_mid_ingest_loses_no_acknowledged_update(tmp_path: Path) -> None:
    state, status, log = tmp_path / "agg", tmp_path / "status.json", tmp_path / "agg.log"
    code = "import sys; from tests.runtime import test_ingest_crash as t; t.serve(*sys.argv[1:])"
    with log.open("wb") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(state), str(status)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    acked: set[tuple[str, int]] = set()
    try:
        grouped, stalled = asyncio.run(
            asyncio.wait_for(load_until_killed(proc, status, acked, log), 45)
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert grouped >= STALL_AFTER_GROUPS  # the group-commit path carried the load
    # The stalled write never reached the OS: an ack for any of its updates left too early.
    early = sorted(acked & stalled)
    assert stalled and not early, f"acked before their write was durable: {early}"

    store = StateStore(state)
    rec = store.load()
    store.close()
    root = make_root()
    root.restore(rec.checkpoint, rec)
    lost = sorted(a for a in acked if not root._ledger.seen(*a))
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged updates lost: {lost[:5]}"
    assert root._log_n >= len(acked)  # one durable record per acknowledged update, at least
