"""A backlog of thousands after a long parent outage drains through the real asyncio driver
and encrypted loopback links: each update applied exactly once, no send queue overflow,
no reconnect loop (issue 13, known failure 1: every pending forward used to be resent at
once, the connection dropped itself at 256 queued messages and resent everything again)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import (
    Effect,
    Event,
    PeerDown,
    PeerUp,
    Received,
    Send,
    Train,
    TrainDone,
    TrainResult,
    Weights,
)
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.network_peers import DialTarget, NetworkPeers
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.wire import Hello, ModelBroadcast, TrainRequest, Update
from tests.conformance.async_federation import MemoryStore

from . import test_peers

BACKLOG = 2000  # far above the 256 messages a send queue holds
LIMIT = 60.0  # a bound on the test, not a timing assertion
MODEL: Weights = {"w": np.zeros(64, dtype=np.float32)}


class Pki:
    def __init__(self) -> None:
        self.root = Identity.generate("root", "root")
        self.region = Identity.generate("region-1", "region")
        self.site = Identity.generate("site-1", "site")
        ids = (self.root, self.region, self.site)
        self.roster = Roster(1, [RosterEntry(i.node_id, i.role, i.public_key) for i in ids])


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def peers(identity: Identity, roster: Roster, **kwargs: Any) -> NetworkPeers:
    return test_peers.peers(identity, roster, keepalive_s=1.0, down_after_s=20.0, **kwargs)


class Seen:
    """Wraps a node and records the link events it was given."""

    def __init__(self, node: Any) -> None:
        self.inner = node
        self.node_id = node.node_id
        self.links: list[Event] = []

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, PeerUp | PeerDown):
            self.links.append(event)
        out: list[Effect] = self.inner.handle(event, now)
        return out

    def next_deadline(self) -> float | None:
        due: float | None = self.inner.next_deadline()
        return due

    def current_model(self) -> Any:
        return self.inner.current_model()


def region_with_backlog(n: int) -> RegionalAggregator:
    """A region that forwarded ``n`` aggregates while its parent was unreachable (one site
    update per forward), sans-I/O; its outbox bound is raised so the backlog can grow."""
    region = RegionalAggregator(
        "region-1",
        "root",
        {"site-1": "site"},
        buffer_size=1,
        concurrency=1,
        checkpoint_every=0,
        max_outbox_bytes=1 << 30,
    )
    region.handle(Received("root", ModelBroadcast(0, MODEL)), 0.0)
    region.handle(PeerDown("root"), 0.0)
    out = region.handle(Received("site-1", Hello("site-1", "site", 10)), 0.0)
    delta = {"w": np.full(64, 0.001, dtype=np.float32)}
    for seq in range(1, n + 1):
        (task,) = [e.msg.task for e in out if isinstance(e, Send) and type(e.msg) is TrainRequest]
        out = region.handle(Received("site-1", Update("site-1", seq, 0, delta, 10, task=task)), 0.0)
    assert region.pending == n
    return region


def site_with_backlog(n: int) -> SiteNode:
    """A site that finished ``n`` jobs while its parent was unreachable."""
    site = SiteNode("site-1", "root", n_examples=10, max_outbox_bytes=1 << 30)
    site.handle(PeerDown("root"), 0.0)
    for task in range(1, n + 1):
        (train,) = site.handle(Received("root", TrainRequest(task, 0, MODEL, {})), 0.0)
        assert isinstance(train, Train)
        trained = {"w": train.weights["w"] + 0.001}
        site.handle(TrainDone(train.job, TrainResult(trained, 10)), 0.0)
    assert site.pending == n
    return site


def applied_seqs(store: MemoryStore, src: str) -> list[int]:
    return [
        int(r["seq"])
        for r in store.data.get("applied", [])
        if r["src"] == src and r["outcome"] == "applied"
    ]


def trainer(node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
    return TrainResult({k: v + 0.001 for k, v in weights.items()}, 10)


async def drain(pki: Pki, child: Any, role: str, caplog: pytest.LogCaptureFixture) -> None:
    """Run a root and ``child`` (holding a backlog) on real links until the root applied
    every one of the child's updates; check exactly once, no overflow, one session."""
    caplog.set_level(logging.INFO)
    root = FedBuffAggregator(
        "root", {child.node_id: role}, MODEL, buffer_size=10, concurrency=1, checkpoint_every=0
    )
    store = MemoryStore()
    root_peers = peers(pki.root, pki.roster, listen=("127.0.0.1", 0), accept_from={child.node_id})
    root_driver = AsyncDriver(root, peers=root_peers, store=store)
    seen = Seen(child)
    n = child.pending
    async with asyncio.timeout(LIMIT):
        root_task = asyncio.ensure_future(root_driver.run())
        child_driver: AsyncDriver | None = None
        child_task: asyncio.Future[None] | None = None
        try:
            while root_peers.listen_url is None:
                await asyncio.sleep(0.005)
            child_identity = pki.region if role == "region" else pki.site
            child_peers = peers(
                child_identity, pki.roster, dial=[DialTarget("root", root_peers.listen_url)]
            )
            child_driver = AsyncDriver(
                seen,  # type: ignore[arg-type]
                peers=child_peers,
                trainer=trainer if role == "site" else None,
            )
            child_task = asyncio.ensure_future(child_driver.run())
            while root._ledger.watermark(child.node_id) < n or child.pending:
                assert not root_task.done() and not child_task.done()
                await asyncio.sleep(0.01)
        finally:
            for driver in (child_driver, root_driver):
                if driver is not None:
                    driver.stop()
            for task in (child_task, root_task):
                if task is not None:
                    await task
    seqs = applied_seqs(store, child.node_id)
    backlog = [s for s in seqs if s <= n]
    assert sorted(backlog) == list(range(1, n + 1))  # each applied exactly once
    assert "send queue overflow" not in caplog.text
    assert seen.links.count(PeerUp("root")) == 1  # one session: no reconnect loop
    assert PeerDown("root") not in seen.links


async def test_a_region_drains_thousands_of_forwards_after_an_outage(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    await drain(pki, region_with_backlog(BACKLOG), "region", caplog)


async def test_a_site_drains_thousands_of_updates_after_an_outage(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    await drain(pki, site_with_backlog(BACKLOG), "site", caplog)
