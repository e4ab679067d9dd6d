"""Shared builders and effect filters for the algorithms tests."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from fedloom.algorithms.protocol import (
    Effect,
    Metric,
    PeerDown,
    PeerUp,
    Persist,
    Received,
    Send,
    Train,
    TrainDone,
    TrainResult,
    Weights,
)
from fedloom.algorithms.site import SiteNode
from fedloom.transport.wire import Ack, Hello, Message, TrainRequest, Update


def model(value: float = 0.0) -> Weights:
    """A tiny two-tensor float32 model filled with ``value``."""
    return {
        "w": np.full((3, 2), value, dtype=np.float32),
        "b": np.full((2,), value, dtype=np.float32),
    }


def upd(
    src: str,
    seq: int,
    base: int = 0,
    value: float = 1.0,
    *,
    n: int = 10,
    task: int = -1,
    count: int = 1,
    delta: Weights | None = None,
) -> Update:
    return Update(
        src=src,
        seq=seq,
        base_version=base,
        delta=model(value) if delta is None else delta,
        n_examples=n,
        count=count,
        task=task,
    )


def recv(peer: str, msg: Message) -> Received:
    return Received(peer, msg)


def hello(peer: str, role: str = "site") -> Received:
    return Received(peer, Hello(peer, role))


def sends(effects: list[Effect], kind: type | None = None) -> list[Send]:
    return [e for e in effects if isinstance(e, Send) and (kind is None or isinstance(e.msg, kind))]


def acks(effects: list[Effect]) -> list[tuple[str, str, int]]:
    """(peer, src, seq) of every Ack sent."""
    return [(e.peer, e.msg.src, e.msg.seq) for e in sends(effects, Ack) if isinstance(e.msg, Ack)]


def requests(effects: list[Effect]) -> list[tuple[str, TrainRequest]]:
    return [
        (e.peer, e.msg) for e in sends(effects, TrainRequest) if isinstance(e.msg, TrainRequest)
    ]


def metrics(effects: list[Effect], name: str) -> list[Metric]:
    return [e for e in effects if isinstance(e, Metric) and e.name == name]


def persists(effects: list[Effect], key: str | None = None) -> list[Persist]:
    return [e for e in effects if isinstance(e, Persist) and (key is None or e.key == key)]


def labels(m: Metric) -> dict[str, Any]:
    return dict(m.labels or {})


class MiniNet:
    """A synchronous in-memory driver: per-link FIFO queues, fake training, manual delivery.

    Tests decide what is delivered, dropped or duplicated; nothing happens on its own.
    """

    def __init__(self, nodes: dict[str, Any]) -> None:
        self.nodes = nodes
        self.queues: dict[tuple[str, str], list[Message]] = {}
        self.jobs: list[tuple[str, Any]] = []  # (node, Train effect)
        self.effects: list[tuple[str, Effect]] = []
        self.now = 0.0

    def feed(self, node: str, event: Any) -> list[Effect]:
        out: list[Effect] = self.nodes[node].handle(event, self.now)
        for e in out:
            self.effects.append((node, e))
            if isinstance(e, Send):
                self.queues.setdefault((node, e.peer), []).append(e.msg)
            elif isinstance(e, Train):
                self.jobs.append((node, e))
        return out

    def deliver_one(self, src: str, dst: str) -> bool:
        q = self.queues.get((src, dst))
        if not q:
            return False
        msg = q.pop(0)
        if dst in self.nodes:
            self.feed(dst, Received(src, msg))
        return True

    def drain(self, limit: int = 100_000) -> None:
        """Deliver everything queued (and whatever that causes), link by link."""
        for _ in range(limit):
            links = [k for k, q in self.queues.items() if q]
            if not links:
                return
            for src, dst in links:
                self.deliver_one(src, dst)
        raise AssertionError("network did not settle")

    def finish_jobs(self, bump: float = 1.0, n_examples: int = 10) -> int:
        """Complete every running job: trained = base + bump."""
        jobs, self.jobs = self.jobs, []
        for node, train in jobs:
            trained = {k: (v + bump).astype(v.dtype) for k, v in train.weights.items()}
            self.feed(node, TrainDone(train.job, TrainResult(trained, n_examples)))
        return len(jobs)

    def finish_jobs_of(
        self,
        chosen: set[str],
        delta_of: Callable[[str, int], Weights],
        examples_of: Callable[[str], int],
        trained: dict[tuple[str, int], Weights],
    ) -> None:
        """Complete the running jobs of the sites in ``chosen`` (the others keep running):
        trained = base + ``delta_of(site, next seq)``, each delta recorded in ``trained``
        under (site, seq) so a test can compare what was applied with what was trained."""
        keep, run = [], []
        for node, job in self.jobs:
            (run if node in chosen else keep).append((node, job))
        self.jobs = keep
        for node, job in run:
            seq = self.nodes[node].seq + 1
            delta = delta_of(node, seq)
            trained[(node, seq)] = delta
            weights = {k: (v + delta[k]).astype(v.dtype) for k, v in job.weights.items()}
            self.feed(node, TrainDone(job.job, TrainResult(weights, examples_of(node))))

    def link(self, a: str, b: str, up: bool) -> None:
        """Link state change seen by both ends; messages in flight are lost on a drop."""
        if not up:
            self.queues.pop((a, b), None)
            self.queues.pop((b, a), None)
        for x, y in ((a, b), (b, a)):
            self.feed(x, PeerUp(y) if up else PeerDown(y))


def star_net(root: Any, sites: Collection[str]) -> MiniNet:
    """``root`` (named "root") and a ``SiteNode`` under it for each of ``sites``, every link
    up and the hellos delivered."""
    net = MiniNet({"root": root, **{s: SiteNode(s, "root") for s in sites}})
    for s in sites:
        net.link("root", s, True)
    net.drain()
    return net
