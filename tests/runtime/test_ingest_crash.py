"""SIGKILL of an aggregator in the middle of a busy ingest loses no acknowledged update.

A FedBuff root with its durable store runs in its own process behind ``NetworkPeers``;
twelve sites in this process answer every task at once (fp16 deltas, encrypted
WebSockets), so updates arrive while the write before them is still on its way to disk and
the driver commits them as groups. The root's disk is made slow (each WAL frame reaches
the OS a few milliseconds late), which widens the window in which a group sits only in
memory: an ack sent before its group is written would then be lost with the process (a
process kill keeps what reached the OS). After the kill, every update a site holds an
``Ack`` for must be in the state the root recovers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nacl.signing
import numpy as np
import pytest

from algorithms.fedbuff import FedBuffAggregator
from algorithms.protocol import Effect, Event, PeerUp, Received, Send, Weights
from runtime.driver import AsyncDriver
from runtime.peers import DialTarget, NetworkPeers
from runtime.store import StateStore
from sim.network import CodecPolicy
from transport.identity import Identity
from transport.roster import Roster, RosterEntry
from transport.tensors import CodecSpec
from transport.wire import Ack, Hello, TrainRequest, Update

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SITES = [f"site-{i:02d}" for i in range(12)]
SLOW_DISK_S = 0.005


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
    counters every 20 ms, to ``out`` (replaced atomically)."""
    real_append = StateStore._append

    def slow_append(self: StateStore, batch: list[list[Any]]) -> None:
        time.sleep(SLOW_DISK_S)  # a slow disk: the frame reaches the OS late
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
            if peers.listen_url is not None:
                tmp = out + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"url": peers.listen_url, "grouped": driver.stats.grouped}, f)
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
) -> int:
    """Run the sites until the root has grouped writes and acked a few dozen updates, then
    SIGKILL it mid-ingest; returns the groups it had reported."""
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
        while not (len(acked) >= 60 and read_status(status).get("grouped", 0) >= 5):
            assert proc.poll() is None, f"the aggregator exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"only {len(acked)} acks before the deadline"
            await asyncio.sleep(0.01)
        grouped = int(read_status(status)["grouped"])
        proc.send_signal(signal.SIGKILL)  # mid-ingest: writes in flight, groups waiting
        proc.wait(10)
        await asyncio.sleep(0.2)  # acks already on the wire still arrive
        return grouped
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
        grouped = asyncio.run(asyncio.wait_for(load_until_killed(proc, status, acked, log), 45))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert grouped >= 5  # the group-commit path carried the load

    store = StateStore(state)
    rec = store.load()
    store.close()
    root = make_root()
    root.restore(
        rec.checkpoint if rec.checkpoint is not None else root.snapshot(), rec.records("applied")
    )
    lost = sorted(a for a in acked if not root._ledger.seen(*a))
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged updates lost: {lost[:5]}"
    assert root._log_n >= len(acked)  # one durable record per acknowledged update, at least
