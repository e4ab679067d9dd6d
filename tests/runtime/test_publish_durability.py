"""A model never leaves the root before what produced it is durable (issue 13, failure 7).

The root runs under the real ``AsyncDriver`` on a real ``StateStore``; the "process" is
killed at every store write of a run (before the write reaches the disk, and after it did
but before the driver learnt so), which covers every point of every flush: the record of
the K-th update, the checkpoint after the broadcast, and the writes between. Whatever the
region had been delivered before the kill, the root recovered from the directory (the
daemon's own ``restore_node``) holds a version at least as new, and its models under those
numbers are the ones delivered; continuing after the restart, nothing it publishes under
a number already delivered differs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from fedloom.algorithms.fedasync import FedAsyncAggregator
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Metric, Persist, Received, Weights
from fedloom.federation.store import StateStore
from fedloom.runtime.daemon import restore_node
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.peer_table import EventSink
from fedloom.transport.e2e import tensors_digest
from fedloom.transport.wire import Hello, Message, ModelBroadcast, Update

LIMIT = 10.0  # seconds any one run may take: a bound, never a timing assertion
CHILDREN = {"r1": "region", "r2": "region"}


def model(value: float = 0.0) -> Weights:
    return {"w": np.full((64, 32), value, np.float32), "b": np.full((32,), value, np.float32)}


def fedbuff() -> FedBuffAggregator | FedAsyncAggregator:
    return FedBuffAggregator(
        "root", CHILDREN, model(), buffer_size=2, concurrency=1, checkpoint_every=3
    )


def fedasync() -> FedBuffAggregator | FedAsyncAggregator:
    return FedAsyncAggregator("root", CHILDREN, model(), concurrency=1, checkpoint_every=4)


ROOTS = {"fedbuff": fedbuff, "fedasync": fedasync}
root = fedbuff  # set per test run (see the parametrised test)


def updates(n: int) -> list[Update]:
    """Forwards from the two regions, alternating, each on a slightly stale base."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        src = ("r1", "r2")[i % 2]
        delta = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in model().items()}
        out.append(Update(src, i // 2 + 1, max(0, i // 2 - 1), delta, 10, count=1))
    return out


class KilledError(Exception):
    """The process is gone: no further effect of the old root takes place."""


class CrashingStore:
    """A ``StateStore`` whose ``crash_at``-th write kills the process: before the write
    reaches the disk (``after_write`` False) or after it did but before it returns."""

    def __init__(self, store: StateStore, crash_at: int, after_write: bool) -> None:
        self.store = store
        self.crash_at = crash_at
        self.after_write = after_write
        self.calls = 0
        self.dead = threading.Event()

    def apply_many(self, items: Sequence[Persist]) -> None:
        if self.dead.is_set():
            raise KilledError
        self.calls += 1
        if self.calls == self.crash_at:
            if self.after_write:
                self.store.apply_many(items)
            self.dead.set()
            raise KilledError  # the driver never sees it complete: nothing gated on it leaves
        self.store.apply_many(items)


class Region:
    """Both regions' view: the model messages delivered to them, in order. A message
    gated on a write is delivered once the write is done, unless the process died first."""

    def __init__(self, dead: threading.Event) -> None:
        self.dead = dead
        self.delivered: list[tuple[int, bytes]] = []
        self.sink: EventSink | None = None

    async def run(self, sink: EventSink) -> None:
        self.sink = sink
        await asyncio.get_running_loop().create_future()

    def send(self, peer: str, msg: Message, after: asyncio.Future[None] | None = None) -> bool:
        def deliver() -> None:
            if not self.dead.is_set() and isinstance(msg, ModelBroadcast):
                self.delivered.append((msg.version, tensors_digest(msg.weights)))

        if after is None:
            deliver()
        else:
            after.add_done_callback(
                lambda f: deliver() if not f.cancelled() and f.exception() is None else None
            )
        return True

    def connected(self) -> frozenset[str]:
        return frozenset(CHILDREN)


async def run_until_killed(
    directory: Path, crash_at: int, after_write: bool, feed: list[Update]
) -> tuple[list[tuple[int, bytes]], list[float]]:
    store = StateStore(directory)
    recovery = store.load()
    node = root()
    restore_node(node, recovery)
    crashing = CrashingStore(store, crash_at, after_write)
    region = Region(crashing.dead)
    versions: list[float] = []

    def metrics(m: Metric) -> None:
        if m.name == "model_version" and not crashing.dead.is_set():
            versions.append(m.value)

    driver = AsyncDriver(node, peers=region, store=crashing, metrics=metrics)
    try:
        async with asyncio.timeout(LIMIT):
            task = asyncio.ensure_future(driver.run())
            for child in CHILDREN:
                driver.post_nowait(Received(child, Hello(child, "region")))
            for u in feed:
                driver.post_nowait(Received(u.src, u))
            while not crashing.dead.is_set() and not task.done():
                if driver.stats.events >= len(CHILDREN) + len(feed) and driver._gate() is None:
                    break
                await asyncio.sleep(0.001)
            driver.stop()
            try:
                await task
            except BaseExceptionGroup as group:  # the kill, and nothing else
                assert crashing.dead.is_set() and group.subgroup(KilledError) is not None
    finally:
        store.close()
    return region.delivered, versions


def recovered(directory: Path) -> FedBuffAggregator | FedAsyncAggregator:
    with StateStore(directory) as store:
        node = root()
        restore_node(node, store.load())
    return node


def writes_in_a_run(tmp_path: Path, feed: list[Update]) -> int:
    counter = CrashingStore(StateStore(tmp_path / "count"), crash_at=0, after_write=False)
    counter.store.load()
    node = root()
    loop_events = [Received(c, Hello(c, "region")) for c in CHILDREN]
    loop_events += [Received(u.src, u) for u in feed]
    for event in loop_events:
        batch: list[Persist] = []
        for e in node.handle(event, 0.0):
            if isinstance(e, Persist):
                batch.append(e)
            elif batch:
                counter.apply_many(batch)
                batch = []
        if batch:
            counter.apply_many(batch)
    counter.store.close()
    return counter.calls


FEED = updates(10)


def crash_points(tmp: Path) -> Iterator[tuple[int, bool]]:
    n = writes_in_a_run(tmp, FEED)
    for k in range(1, n + 1):
        for after in (False, True):
            yield k, after


@pytest.mark.parametrize("kind", sorted(ROOTS))
async def test_a_killed_root_never_republishes_a_version_under_other_weights(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(globals(), "root", ROOTS[kind])
    total = 0
    for crash_at, after_write in crash_points(tmp_path):
        total += 1
        directory = tmp_path / f"root-{crash_at}-{int(after_write)}"
        delivered, shown = await run_until_killed(directory, crash_at, after_write, FEED)
        back = recovered(directory)
        where = f"kill at write {crash_at} ({'after' if after_write else 'before'} the write)"
        newest = max((v for v, _ in delivered), default=0)
        assert back.version >= newest, (
            f"{where}: v{newest} was delivered, root back at v{back.version}"
        )
        assert back.version >= max(shown, default=0), f"{where}: /metrics showed a lost version"
        held = dict(delivered)
        if back.version in held:
            assert tensors_digest(back.current_model()[1]) == held[back.version], where
        # The restarted root, fed what the regions resend (everything: the acked ones are
        # duplicates), publishes nothing new under a number it already sent.
        again, _ = await run_until_killed(directory, 10**6, False, FEED)
        for version, digest in again:
            if version in held:
                assert digest == held[version], f"{where}: a second model under v{version}"
    assert total >= 20
