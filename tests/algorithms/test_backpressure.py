"""Backpressure (issue 13, known failure 3): a region whose parent stays unreachable for a
long (virtual) time holds a bounded outbox and stops dispatching; once the parent is back
it drains and resumes; its gauges say so throughout. A site stops training likewise."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from fedloom.algorithms.outbox import DEFAULT_OUTBOX_UPDATES, Outbox
from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    Event,
    Metric,
    PeerDown,
    PeerUp,
    Received,
    Send,
    Train,
    TrainDone,
    TrainResult,
)
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.transport.wire import Ack, Hello, ModelBroadcast, TrainRequest, Update

N = 1000
MODEL = {"w": np.zeros(N, dtype=np.float32)}
SITES = ("s1", "s2", "s3")
TRAIN_S = 2.0  # a site answers its task this long after it was sent
K = 2


def gauges(effects: list[Effect]) -> dict[str, float]:
    return {e.name: float(e.value) for e in effects if isinstance(e, Metric)}


@dataclass
class Loop:
    """Drives a region in virtual time: its sites answer every task after ``TRAIN_S``; a
    parent, while up, acks every forward it gets."""

    region: RegionalAggregator
    now: float = 0.0
    parent_up: bool = False
    timers: list[tuple[float, int, Event]] = field(default_factory=list)
    tasks: list[float] = field(default_factory=list)  # when each task was dispatched
    forwards: list[int] = field(default_factory=list)  # seqs the parent got
    metrics: dict[str, float] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SITES, 0))
    _n: int = 0

    def feed(self, event: Event) -> None:
        todo = [event]
        while todo:
            out = self.region.handle(todo.pop(0), self.now)
            self.metrics.update(gauges(out))
            for e in out:
                if not isinstance(e, Send):
                    continue
                if isinstance(e.msg, TrainRequest):
                    self.tasks.append(self.now)
                    self.seqs[e.peer] += 1
                    answer = Update(
                        e.peer, self.seqs[e.peer], e.msg.version,
                        {"w": np.full(N, 0.01, np.float32)}, 10, task=e.msg.task,
                    )  # fmt: skip
                    self._at(self.now + TRAIN_S, Received(e.peer, answer))
                elif isinstance(e.msg, Update) and e.peer == "root" and self.parent_up:
                    self.forwards.append(e.msg.seq)
                    todo.append(Received("root", Ack("r1", e.msg.seq)))

    def _at(self, when: float, event: Event) -> None:
        self._n += 1
        heapq.heappush(self.timers, (when, self._n, event))

    def run_until(self, end: float) -> None:
        while True:
            due = self.region.next_deadline()
            nxt = self.timers[0][0] if self.timers else None
            if due is not None and (nxt is None or due < nxt) and due <= end:
                self.now = max(self.now, due)
                self.feed(Deadline())
            elif nxt is not None and nxt <= end:
                when, _, event = heapq.heappop(self.timers)
                self.now = max(self.now, when)
                self.feed(event)
            else:
                self.now = end
                return


def started_region() -> Loop:
    region = RegionalAggregator(
        "r1", "root", dict.fromkeys(SITES, "site"), buffer_size=K, concurrency=3
    )
    loop = Loop(region)
    loop.feed(PeerUp("root"))
    loop.feed(Received("root", ModelBroadcast(0, MODEL)))
    loop.feed(PeerDown("root"))  # the root goes away for good ...
    for s in SITES:
        loop.feed(Received(s, Hello(s, "site", 10)))
    return loop


def test_a_region_cut_off_from_its_parent_stops_dispatching_and_resumes_after() -> None:
    loop = started_region()
    region = loop.region
    loop.run_until(3600.0)  # ... for an hour of virtual time
    forward = region._outbox.pending()[0]
    size = sum(a.nbytes for a in forward.delta.values())
    limit = DEFAULT_OUTBOX_UPDATES * size
    assert region.paused
    # Bounded: the pause stops new tasks; the answers to tasks already out still come in,
    # are acked and flushed (at most concurrency / K forwards more).
    assert limit <= region._outbox.bytes <= limit + (3 // K + 1) * size
    assert region.pending <= DEFAULT_OUTBOX_UPDATES + 3 // K + 1
    paused_at = max(loop.tasks)
    assert paused_at < 120.0  # dispatch stopped early and nothing since, in an hour
    assert region.in_flight == 0  # every task handed out was answered
    assert loop.metrics["dispatch_paused"] == 1.0
    assert loop.metrics["parent_up"] == 0.0
    assert loop.metrics["outbox_updates"] == region.pending
    assert loop.metrics["outbox_bytes"] == region._outbox.bytes
    assert loop.metrics["parent_ack_age_seconds"] > 3000.0  # refreshed while it waits
    backlog = region.pending

    # The parent returns: the backlog drains, ack-paced, and dispatching resumes.
    loop.parent_up = True
    loop.feed(PeerUp("root"))
    loop.run_until(3600.0 + 60.0)
    assert loop.forwards[:backlog] == list(range(1, backlog + 1))
    assert len(set(loop.forwards)) == len(loop.forwards)  # each forward sent once
    assert not region.paused and max(loop.tasks) > 3600.0
    assert region.pending <= 1  # forwards of the resumed work are acked as they go
    assert loop.metrics["dispatch_paused"] == 0.0
    assert loop.metrics["parent_up"] == 1.0
    assert loop.metrics["outbox_window"] >= 1.0


def test_a_configured_bound_in_bytes_is_what_the_region_holds() -> None:
    region = RegionalAggregator(
        "r1", "root", dict.fromkeys(SITES, "site"), buffer_size=K, concurrency=3,
        max_outbox_bytes=3 * N * 4,
    )  # fmt: skip
    loop = Loop(region)
    loop.feed(Received("root", ModelBroadcast(0, MODEL)))
    loop.feed(PeerDown("root"))
    for s in SITES:
        loop.feed(Received(s, Hello(s, "site", 10)))
    loop.run_until(600.0)
    assert region.paused and 3 <= region.pending <= 3 + 3 // K + 1


def test_a_site_with_a_full_outbox_starts_no_training_until_acks_drain_it() -> None:
    site = SiteNode("s1", "r1", max_outbox_bytes=2 * N * 4)
    site.handle(PeerDown("r1"), 0.0)
    task = 0

    def request() -> list[Effect]:
        nonlocal task
        task += 1
        return site.handle(Received("r1", TrainRequest(task, 0, MODEL, {})), float(task))

    for _ in range(2):
        (train,) = [e for e in request() if isinstance(e, Train)]
        trained = {"w": train.weights["w"] + 0.01}
        site.handle(TrainDone(train.job, TrainResult(trained, 10)), float(task))
    assert site.paused and site.pending == 2
    assert not [e for e in request() if isinstance(e, Train)]  # parked, not started
    out = site.handle(PeerUp("r1"), 10.0)
    assert gauges(out)["dispatch_paused"] == 1.0
    out = site.handle(Received("r1", Ack("s1", 1)), 11.0)
    started = [e for e in out if isinstance(e, Train)]
    assert len(started) == 1  # the parked (newest) request starts once there is room
    assert gauges(out)["dispatch_paused"] == 0.0


# ------------------------------------------------------------------ nested regions
@dataclass
class Tree:
    """root <- mid <- leaf <- sites in virtual time. The root (a stub) acks each forward
    of mid's while it is up, which settles it; mid then settles the leaf's."""

    mid: RegionalAggregator
    leaf: RegionalAggregator
    now: float = 0.0
    root_up: bool = False
    timers: list[tuple[float, int, str, Event]] = field(default_factory=list)
    tasks: list[float] = field(default_factory=list)
    seqs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SITES, 0))
    to_root: list[int] = field(default_factory=list)
    _n: int = 0

    def node(self, name: str) -> RegionalAggregator:
        return self.mid if name == "mid" else self.leaf

    def feed(self, name: str, event: Event) -> None:
        todo = [(name, event)]
        while todo:
            at, ev = todo.pop(0)
            for e in self.node(at).handle(ev, self.now):
                if not isinstance(e, Send):
                    continue
                if isinstance(e.msg, TrainRequest):
                    self.tasks.append(self.now)
                    self.seqs[e.peer] += 1
                    answer = Update(
                        e.peer, self.seqs[e.peer], e.msg.version,
                        {"w": np.full(N, 0.01, np.float32)}, 10, task=e.msg.task,
                    )  # fmt: skip
                    self._at(self.now + TRAIN_S, "leaf", Received(e.peer, answer))
                elif e.peer == "root":
                    if self.root_up and isinstance(e.msg, Update):
                        self.to_root.append(e.msg.seq)
                        todo.append(("mid", Received("root", Ack("mid", e.msg.seq))))
                elif e.peer in ("mid", "leaf"):
                    todo.append((e.peer, Received(at, e.msg)))

    def _at(self, when: float, name: str, event: Event) -> None:
        self._n += 1
        heapq.heappush(self.timers, (when, self._n, name, event))

    def run_until(self, end: float) -> None:
        while True:
            dues = [(n.next_deadline(), k) for k, n in (("mid", self.mid), ("leaf", self.leaf))]
            due = min(((t, k) for t, k in dues if t is not None), default=None)
            nxt = self.timers[0][0] if self.timers else None
            if due is not None and (nxt is None or due[0] < nxt) and due[0] <= end:
                self.now = max(self.now, due[0])
                self.feed(due[1], Deadline())
            elif nxt is not None and nxt <= end:
                when, _, name, event = heapq.heappop(self.timers)
                self.now = max(self.now, when)
                self.feed(name, event)
            else:
                self.now = end
                return


def held_bytes(region: RegionalAggregator) -> int:
    """Bytes of the forwards a region holds for its parent: pending or kept unsettled."""
    seqs = {u.seq: u for u in region._outbox.pending()}
    seqs.update({u.seq: u for u in region._forwards.updates()})
    return sum(a.nbytes for u in seqs.values() for a in u.delta.values())


def test_backpressure_reaches_the_leaves_of_nested_regions_and_drains_after() -> None:
    leaf = RegionalAggregator(
        "leaf", "mid", dict.fromkeys(SITES, "site"), buffer_size=K, concurrency=3,
        parent_is_root=False,
    )  # fmt: skip
    mid = RegionalAggregator("mid", "root", {"leaf": "region"}, buffer_size=1, concurrency=1)
    mid.set_subtrees({"leaf": SITES})
    tree = Tree(mid, leaf)
    tree.feed("leaf", PeerUp("mid"))
    tree.feed("mid", Received("root", ModelBroadcast(0, MODEL)))
    tree.feed("mid", PeerDown("root"))  # the root goes away for an hour
    tree.feed("mid", Received("leaf", Hello("leaf", "region")))
    for s in SITES:
        tree.feed("leaf", Received(s, Hello(s, "site", 10)))
    tree.run_until(3600.0)

    unit = N * 4
    limit = DEFAULT_OUTBOX_UPDATES * unit
    # mid took forwards until paused, then held the leaf's new ones unacked ...
    assert mid.paused and limit <= mid._outbox.bytes <= limit + 2 * unit
    # ... so the leaf's outbox and kept forwards together stay bounded and it pauses too.
    assert leaf.paused and held_bytes(leaf) <= limit + 3 * unit
    assert max(tree.tasks) < 300.0  # the sites got no task since, in an hour
    assert len(leaf.snapshot()["forwards"]["forwards"]) <= DEFAULT_OUTBOX_UPDATES + 3
    made = sum(tree.seqs.values())

    # The root returns: mid drains, settles the leaf's forwards, takes the held ones,
    # and the sites train again; every forward reaches the root once.
    tree.root_up = True
    tree.feed("mid", PeerUp("root"))
    tree.run_until(3600.0 + 300.0)
    assert not mid.paused and not leaf.paused
    assert max(tree.tasks) > 3600.0 and sum(tree.seqs.values()) > made
    assert len(tree.to_root) == len(set(tree.to_root))
    assert mid.pending <= 1 and len(leaf._forwards) <= 2


def test_a_leaf_resends_its_kept_forwards_under_the_outbox_window() -> None:
    leaf = RegionalAggregator(
        "leaf", "mid", {"s1": "site"}, buffer_size=1, concurrency=1, parent_is_root=False,
        max_outbox_bytes=10_000 * N * 4,
    )  # fmt: skip
    leaf.handle(PeerUp("mid"), 0.0)
    leaf.handle(Received("mid", ModelBroadcast(0, MODEL)), 0.0)
    leaf.handle(Received("s1", Hello("s1", "site", 10)), 0.0)
    kept = 150
    for seq in range(1, kept + 1):  # mid acks each forward, settles none
        delta = {"w": np.full(N, 0.01, np.float32)}
        for e in leaf.handle(Received("s1", Update("s1", seq, 0, delta, 10)), float(seq)):
            if isinstance(e, Send) and e.peer == "mid" and isinstance(e.msg, Update):
                leaf.handle(Received("mid", Ack("leaf", e.msg.seq)), float(seq))
    assert len(leaf._forwards) == kept and leaf.pending == 0

    leaf.handle(PeerDown("mid"), 200.0)
    out = leaf.handle(PeerUp("mid"), 201.0)
    window = leaf._outbox.effective_window()
    sent = [e.msg.seq for e in out if isinstance(e, Send) and isinstance(e.msg, Update)]
    assert 1 <= len(sent) <= window < kept  # a window's worth, not all 150 at once
    resent, now = list(sent), 202.0
    while sent:  # mid re-acks each duplicate: the next one goes, never more than the window
        out = leaf.handle(Received("mid", Ack("leaf", sent.pop(0))), now)
        more = [e.msg.seq for e in out if isinstance(e, Send) and isinstance(e.msg, Update)]
        sent += more
        resent += more
        assert leaf._outbox.in_flight <= window
        now += 0.01
    assert resent == list(range(1, kept + 1))  # each kept forward once, oldest first


def test_the_ack_age_keeps_growing_through_reconnects_without_an_ack() -> None:
    outbox = Outbox("k")
    update = Update("s1", outbox.next_seq(), 0, {"w": np.zeros(N, np.float32)}, 1)
    outbox.push("r1", update, now=0.0)
    for t in range(10, 101, 10):  # a flapping parent: up and down, never an ack
        outbox.link_down()
        outbox.resend("r1", now=float(t))
    age = gauges(outbox.metrics(100.0))["parent_ack_age_seconds"]
    assert age == 100.0
    outbox.ack(1, now=105.0)
    outbox.push("r1", Update("s1", outbox.next_seq(), 0, update.delta, 1), now=110.0)
    assert gauges(outbox.metrics(120.0))["parent_ack_age_seconds"] == 10.0  # since it waits
