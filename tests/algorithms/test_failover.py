"""Regional failover, sans-I/O: sites move to the standby and the root counts every
acknowledged site update exactly once (``algorithms.incorporation``)."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedloom.algorithms.aggregator_base import APPLIED_KEY, CHECKPOINT_KEY
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    Event,
    Log,
    LogRecords,
    Metric,
    Node,
    PeerDown,
    PeerUp,
    Persist,
    Received,
    Send,
    Train,
    TrainDone,
    TrainResult,
)
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import PENDING_KEY as SITE_PENDING
from fedloom.algorithms.site import SiteNode
from fedloom.transport.wire import Ack, Incorporated, ModelBroadcast, Overlap, TrainRequest, Update
from tests.algorithms.alg_helpers import hello, metrics, model, recv, sends, upd

SITES = ("s1", "s2")
SUBTREES = {"r0": SITES, "r0b": SITES}
FAILOVER_S = 60.0
TRAIN_S = 1.0  # virtual seconds a training job takes


@dataclass
class Disk:
    """What a node's Persist effects left behind (a checkpoint and the logs after it)."""

    checkpoint: Any = None
    logs: dict[str, list[Any]] = field(default_factory=dict)

    def apply(self, p: Persist) -> None:
        if p.append:
            self.logs.setdefault(p.key, []).append(p.data)
        elif p.key == CHECKPOINT_KEY:
            self.checkpoint = p.data
            self.logs = {}


def make_root() -> FedBuffAggregator:
    root = FedBuffAggregator(
        "root", {"r0": "region", "r0b": "region"}, model(0.0), buffer_size=1, concurrency=1
    )
    root.set_subtrees(SUBTREES)
    return root


def make_region(name: str) -> RegionalAggregator:
    region = RegionalAggregator(
        name,
        "root",
        {s: "site" for s in SITES},
        buffer_size=2,
        concurrency=2,
        rng=0,
        keep_parts=True,
    )
    region.set_subtrees({})
    return region


def make_site(name: str) -> SiteNode:
    return SiteNode(name, "r0", fallbacks=["r0b"], failover_after_s=FAILOVER_S)


class Net:
    """A tiny driver: nodes, links that are up or cut, one event queue, a virtual clock;
    each site's training adds +1 to every weight."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {
            "root": make_root(),
            "r0": make_region("r0"),
            "r0b": make_region("r0b"),
            **{s: make_site(s) for s in SITES},
        }
        self.disks = {n: Disk() for n in self.nodes}
        self.links: set[frozenset[str]] = set()
        self.queue: deque[tuple[str, Event]] = deque()
        self.now = 0.0
        self.dead: set[str] = set()
        self.metrics: Counter[str] = Counter()
        self.history: dict[tuple[str, str], list[Any]] = {}  # every record, never compacted
        self.training: list[tuple[float, str, Event]] = []  # (when done, site, TrainDone)

    def feed(self, node: str, event: Event) -> None:
        if node in self.dead:
            return
        self.emit(node, self.nodes[node].handle(event, self.now))

    def emit(self, node: str, effects: Iterable[Effect]) -> None:
        for e in effects:
            if isinstance(e, Persist):
                self.disks[node].apply(e)
                if e.append:
                    self.history.setdefault((node, e.key), []).append(e.data)
            elif isinstance(e, Metric):
                self.metrics[e.name] += 1
            elif isinstance(e, Send):
                if frozenset((node, e.peer)) in self.links:
                    self.queue.append((e.peer, Received(node, e.msg)))
            elif isinstance(e, Train):
                trained = {k: v + np.float32(1.0) for k, v in e.weights.items()}
                done = TrainDone(e.job, TrainResult(trained, 10))
                self.training.append((self.now + TRAIN_S, node, done))

    def link(self, a: str, b: str) -> None:
        self.links.add(frozenset((a, b)))
        self.feed(a, PeerUp(b))
        self.feed(b, PeerUp(a))

    def cut(self, a: str, b: str) -> None:
        self.links.discard(frozenset((a, b)))
        # What was in flight on the link is lost.
        self.queue = deque((n, ev) for n, ev in self.queue if not _on_link(n, ev, a, b))
        self.feed(a, PeerDown(b))
        self.feed(b, PeerDown(a))

    def pump(self, max_events: int = 10_000) -> None:
        for _ in range(max_events):
            if not self.queue:
                return
            node, event = self.queue.popleft()
            self.feed(node, event)
        raise AssertionError("the federation did not settle")

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Let virtual time pass, firing every node's deadlines."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            due_jobs = [j for j in self.training if j[0] <= self.now]
            self.training = [j for j in self.training if j[0] > self.now]
            for _, name, event in due_jobs:
                self.feed(name, event)
            for name, node in self.nodes.items():
                due = node.next_deadline()
                if due is not None and due <= self.now:
                    self.feed(name, Deadline())
            self.pump()

    def kill(self, name: str) -> None:
        """The process dies: its links drop, its memory is gone."""
        for link in [link for link in self.links if name in link]:
            (other,) = link - {name}
            self.cut(name, other)
        self.dead.add(name)
        self.training = [j for j in self.training if j[1] != name]  # its jobs die with it

    def restart_region(self, name: str) -> RegionalAggregator:
        """A new process restores the region from what it persisted."""
        disk = self.disks[name]
        region = make_region(name)
        region.restore(disk.checkpoint, LogRecords(disk.logs))
        self.nodes[name] = region
        self.dead.discard(name)
        return region

    def restart_root(self) -> FedBuffAggregator:
        disk = self.disks["root"]
        root = make_root()
        root.restore(disk.checkpoint, LogRecords(disk.logs))
        self.nodes["root"] = root
        return root

    def restart_site(self, name: str) -> SiteNode:
        disk = self.disks[name]
        site = make_site(name)
        site.restore(disk.checkpoint, LogRecords(disk.logs))
        self.nodes[name] = site
        self.dead.discard(name)
        return site

    # ------------------------------------------------------------- views
    def root_pairs(self) -> Counter[tuple[str, int]]:
        """Every site update inside a forward the root applied (from all its records)."""
        counts: Counter[tuple[str, int]] = Counter()
        for rec in self.history.get(("root", APPLIED_KEY), []):
            if rec["outcome"] == "applied":
                counts.update((str(s), int(q)) for s, q in rec.get("pairs", ()))
        return counts

    def site_seqs(self) -> set[tuple[str, int]]:
        """Every update the sites made (seq 1 .. their counter)."""
        return {(s, q) for s in SITES for q in range(1, self.site(s).seq + 1)}

    def site(self, name: str) -> SiteNode:
        node = self.nodes[name]
        assert isinstance(node, SiteNode)
        return node

    def region(self, name: str) -> RegionalAggregator:
        node = self.nodes[name]
        assert isinstance(node, RegionalAggregator)
        return node


def numbered(effects: list[Effect], kind: type) -> list[tuple[str, str, int]]:
    """(peer, src, seq) of each ``kind`` message sent (Update, Ack, Incorporated)."""
    out = []
    for e in sends(effects, kind):
        msg = e.msg
        assert isinstance(msg, Update | Ack | Incorporated)
        out.append((e.peer, msg.src, msg.seq))
    return out


def _on_link(node: str, event: Event, a: str, b: str) -> bool:
    return isinstance(event, Received) and {node, event.peer} == {a, b}


def federation() -> Net:
    net = Net()
    net.link("root", "r0")
    net.link("root", "r0b")
    for s in SITES:
        net.link("r0", s)
        net.link("r0b", s)  # dialled as well, but no Hello: not the parent yet
    net.pump()
    return net


def test_a_healthy_tree_settles_every_update_and_sites_keep_nothing() -> None:
    net = federation()
    net.advance(20.0)
    root = net.nodes["root"]
    assert isinstance(root, FedBuffAggregator) and root.version >= 5
    pairs = net.root_pairs()
    assert pairs and max(pairs.values()) == 1
    # Sites keep at most what is still in a region's buffer (not yet forwarded).
    for s in SITES:
        assert net.site(s).parent == "r0"
        assert net.site(s).held <= 2
    assert not any(net.region("r0b").handle(Deadline(), net.now))  # the standby idles


def test_sites_fail_over_and_a_stale_forward_is_never_counted_twice() -> None:
    net = federation()
    net.advance(10.0)
    # The region loses the root: it acks its sites and forwards into its outbox.
    net.cut("root", "r0")
    net.advance(10.0)
    stale = net.region("r0").pending
    assert stale > 0
    # ... then it dies with those forwards unsent.
    net.kill("r0")
    held = {s: net.site(s).held for s in SITES}
    assert all(held.values())  # acked by r0, not yet settled: kept
    net.advance(FAILOVER_S + 10.0)
    assert all(net.site(s).parent == "r0b" for s in SITES)
    assert all(net.site(s).held <= 2 for s in SITES)  # the standby delivered them
    # The root is restarted from its state meanwhile (its pair ledger is durable).
    net.restart_root()
    net.link("root", "r0b")
    net.pump()
    # The dead region comes back with its old forwards and reaches the root.
    region = net.restart_region("r0")
    assert region.pending == stale
    net.link("root", "r0")
    net.pump()
    net.advance(20.0)
    assert net.region("r0").pending == 0  # refused (Overlap) and dropped: all were taken
    pairs = net.root_pairs()
    assert max(pairs.values()) == 1  # nothing counted twice
    assert_nothing_acked_lost(net, pairs)
    assert metrics_seen(net, "forward_overlap")


def test_a_forward_overlapping_in_part_is_rebuilt_from_the_rest() -> None:
    net = federation()
    net.advance(10.0)
    before = net.root_pairs()
    # r0 loses the root and s1 (not s2): s2 keeps training through r0.
    net.cut("root", "r0")
    net.advance(5.0)
    net.cut("r0", "s1")
    net.advance(FAILOVER_S + 10.0)
    assert net.site("s1").parent == "r0b" and net.site("s2").parent == "r0"
    stale = [u for u in net.region("r0").pending_forwards() if u.pairs]
    mixed = [u for u in stale if {s for s, _ in u.pairs} == set(SITES)]
    assert mixed, "a forward of r0 holds updates of both sites"
    s1_at_r0 = {p for u in stale for p in u.pairs if p[0] == "s1"}
    # s1 resent those to the standby, which delivered them.
    assert s1_at_r0 <= set(net.root_pairs())
    net.link("root", "r0")
    net.pump()
    net.advance(20.0)
    pairs = net.root_pairs()
    assert max(pairs.values()) == 1
    s2_at_r0 = {p for u in stale for p in u.pairs if p[0] == "s2"}
    assert s2_at_r0 <= set(pairs)  # the rebuilt forwards carried s2's updates
    assert metrics_seen(net, "forward_rebuilt")
    assert set(pairs) >= set(before)


def test_every_acked_update_is_applied_once_after_any_restart() -> None:
    net = federation()
    net.advance(10.0)
    net.cut("root", "r0")
    net.advance(10.0)
    net.kill("r0")
    for s in SITES:  # the sites restart too: what they keep is durable
        net.kill(s)
        net.restart_site(s)
        assert net.site(s).held
        net.link("r0b", s)
    net.advance(FAILOVER_S + 10.0)
    net.restart_region("r0")
    net.link("root", "r0")
    for s in SITES:
        net.link("r0", s)
    net.pump()
    net.advance(30.0)
    pairs = net.root_pairs()
    assert max(pairs.values()) == 1
    assert all(net.site(s).parent == "r0b" for s in SITES)  # stays until r0b fails
    assert_nothing_acked_lost(net, pairs)


def assert_nothing_acked_lost(net: Net, pairs: Counter[tuple[str, int]]) -> None:
    """Every update a region acked is in the root's model or still kept by its site
    (waiting in a buffer), never neither."""
    for s in SITES:
        kept = {(s, u.seq) for u in net.site(s).snapshot()["held"]}
        missing = set(_acked(net, s)) - set(pairs) - kept
        assert not missing, missing


def _acked(net: Net, site: str) -> list[tuple[str, int]]:
    """The site's updates some region acknowledged (from its durable log)."""
    recs = net.history.get((site, SITE_PENDING), [])
    return [(site, int(r["seq"])) for r in recs if r["op"] == "ack"]


def metrics_seen(net: Net, name: str) -> bool:
    return net.metrics[name] > 0


# ----------------------------------------------------------------- hostile input


def forward(seq: int, pairs: tuple[tuple[str, int], ...], count: int = 2) -> Update:
    return Update(
        src="r0",
        seq=seq,
        base_version=0,
        delta=model(0.1),
        n_examples=20,
        count=count,
        pairs=pairs,
    )


def fresh_root() -> FedBuffAggregator:
    root = FedBuffAggregator(
        "root",
        {"r0": "region", "r0b": "region", "r9": "region"},
        model(0.0),
        buffer_size=4,
        concurrency=1,
    )
    root.set_subtrees({"r0": SITES, "r0b": SITES, "r9": ("s9",)})
    for r in ("r0", "r0b", "r9"):
        root.handle(hello(r, "region"), 0.0)
    return root


def test_a_region_claiming_foreign_or_too_many_pairs_is_refused() -> None:
    root = fresh_root()
    out = root.handle(recv("r0", forward(1, (("s9", 1),), count=1)), 1.0)
    assert [m.labels for m in metrics(out, "update_rejected")] == [{"reason": "foreign_pairs"}]
    out = root.handle(recv("r0", forward(2, (("s1", 1), ("s2", 1)), count=1)), 1.0)
    assert [m.labels for m in metrics(out, "update_rejected")] == [{"reason": "pairs_exceed_count"}]
    assert root.applied == 0
    # Refused pairs are not taken: the honest region may still deliver them.
    out = root.handle(recv("r9", Update("r9", 1, 0, model(0.1), 10, pairs=(("s9", 1),))), 1.0)
    assert root.applied == 1 and not sends(out, Overlap)


def test_a_second_delivery_of_a_site_update_is_refused_with_the_pairs_named() -> None:
    root = fresh_root()
    root.handle(
        recv("r0b", Update("r0b", 1, 0, model(0.1), 20, count=2, pairs=(("s1", 3), ("s2", 1)))), 1.0
    )
    out = root.handle(recv("r0", forward(7, (("s1", 2), ("s1", 3)))), 2.0)
    [refusal] = sends(out, Overlap)
    assert refusal.peer == "r0" and refusal.msg == Overlap("r0", 7, (("s1", 3),))
    assert not sends(out, Ack) and root.applied == 1  # unrecorded: r0 may rebuild it
    # The rebuilt forward under the same seq is taken.
    out = root.handle(recv("r0", forward(7, (("s1", 2),), count=1)), 3.0)
    assert numbered(out, Ack) == [("r0", "r0", 7)]
    assert root.applied == 2
    # The ledger survives a restart.
    again = fresh_root()
    again.restore(root.snapshot())
    out = again.handle(recv("r0", forward(8, (("s2", 1),), count=1)), 4.0)
    assert sends(out, Overlap)


def test_a_region_tells_its_sites_once_the_root_settled_their_updates() -> None:
    region = make_region("r0")
    region.handle(recv("root", ModelBroadcast(0, model(0.0))), 0.0)
    for s in SITES:
        region.handle(hello(s), 0.0)
    region.handle(recv("s1", upd("s1", 1)), 1.0)
    out = region.handle(recv("s2", upd("s2", 1)), 1.0)
    [fwd] = [e.msg for e in sends(out, Update)]
    assert isinstance(fwd, Update) and set(fwd.pairs) == {("s1", 1), ("s2", 1)}
    assert not sends(out, Incorporated)  # acked, not settled yet
    # A resend before the root answered: re-acked, not settled.
    out = region.handle(recv("s1", upd("s1", 1)), 2.0)
    assert sends(out, Ack) and not sends(out, Incorporated)
    out = region.handle(recv("root", Ack("r0", fwd.seq)), 3.0)
    assert sorted(numbered(out, Incorporated)) == [("s1", "s1", 1), ("s2", "s2", 1)]
    # A resend after that (the notice was lost) is settled again.
    out = region.handle(recv("s1", upd("s1", 1)), 4.0)
    assert [e.peer for e in sends(out, Incorporated)] == ["s1"]


def test_a_site_without_fallbacks_ignores_settlements_and_writes_nothing() -> None:
    site = SiteNode("s1", "r0")
    out = site.handle(recv("r0", Incorporated("s1", 1)), 0.0)
    assert not [e for e in out if isinstance(e, Persist)] and site.held == 0


def test_a_site_keeps_at_most_max_held_then_stops_training() -> None:
    site = SiteNode("s1", "r0", fallbacks=["r0b"], max_held=2)
    site.handle(PeerUp("r0"), 0.0)
    for task in range(3):
        req = TrainRequest(task, task, model(0.0))
        trains = [e for e in site.handle(recv("r0", req), 1.0) if isinstance(e, Train)]
        if task == 2:
            assert not trains and site.paused  # two kept unsettled: no third job
            break
        [job] = trains
        done = TrainDone(job.job, TrainResult(model(1.0), 10))
        [(_, _, seq)] = numbered(site.handle(done, 1.0), Update)
        site.handle(recv("r0", Ack("s1", seq)), 2.0)
    assert site.held == 2
    out = site.handle(recv("r0", Incorporated("s1", 1)), 3.0)
    assert [e for e in out if isinstance(e, Train)]  # room again: the parked task starts
    assert site.held == 1


def test_kept_updates_are_resent_one_at_a_time_after_a_failover() -> None:
    site = SiteNode("s1", "r0", fallbacks=["r0b"], failover_after_s=10.0)
    site.handle(PeerUp("r0"), 0.0)
    site.handle(PeerUp("r0b"), 0.0)
    for task in range(3):
        [job] = [
            e
            for e in site.handle(recv("r0", TrainRequest(task, 0, model())), 1.0)
            if isinstance(e, Train)
        ]
        done = TrainDone(job.job, TrainResult(model(1.0), 10))
        [(_, _, seq)] = numbered(site.handle(done, 1.0), Update)
        site.handle(recv("r0", Ack("s1", seq)), 1.0)
    site.handle(PeerDown("r0"), 5.0)
    assert site.next_deadline() == 15.0
    site.handle(Deadline(), 14.0)
    assert site.parent == "r0"  # not down for failover_after_s yet
    out = site.handle(Deadline(), 15.0)
    assert site.parent == "r0b" and metrics(out, "parent_failover")
    assert [(e.peer, type(e.msg).__name__) for e in sends(out)] == [
        ("r0b", "Hello"),
        ("r0b", "Update"),
    ]
    # Each answer (an ack, or a settlement) lets the next kept update go.
    out = site.handle(recv("r0b", Ack("s1", 1)), 16.0)
    assert numbered(out, Update) == [("r0b", "s1", 2)]
    out = site.handle(recv("r0b", Incorporated("s1", 2)), 16.0)
    assert numbered(out, Update) == [("r0b", "s1", 3)]
    assert site.held == 2


def test_settlement_travels_down_through_a_nested_region() -> None:
    """root <- mid <- leaf <- sites: the leaf keeps its forward after mid's ack, until mid's
    own forward is settled by the root; then the sites are told."""
    leaf = RegionalAggregator(
        "leaf",
        "mid",
        {s: "site" for s in SITES},
        buffer_size=2,
        concurrency=2,
        parent_is_root=False,
    )
    mid = RegionalAggregator("mid", "root", {"leaf": "region"}, buffer_size=1, concurrency=1)
    mid.set_subtrees({"leaf": SITES})
    for node in (leaf, mid):
        node.handle(recv(node.parent, ModelBroadcast(0, model(0.0))), 0.0)
    for s in SITES:
        leaf.handle(hello(s), 0.0)
    leaf.handle(recv("s1", upd("s1", 1)), 1.0)
    [fwd] = [e.msg for e in sends(leaf.handle(recv("s2", upd("s2", 1)), 1.0), Update)]
    assert isinstance(fwd, Update)
    mid.handle(hello("leaf", "region"), 1.0)
    out = mid.handle(recv("leaf", fwd), 2.0)
    [up] = [e.msg for e in sends(out, Update)]
    assert isinstance(up, Update) and set(up.pairs) == {("s1", 1), ("s2", 1)}
    assert numbered(out, Ack) == [("leaf", "leaf", 1)] and not sends(out, Incorporated)
    out = leaf.handle(recv("mid", Ack("leaf", 1)), 2.0)
    assert not sends(out, Incorporated) and leaf.pending == 0  # acked, kept: not settled
    # A resend by the leaf (its notice lost) is only re-acked while mid's forward waits.
    assert not sends(mid.handle(recv("leaf", fwd), 2.5), Incorporated)
    out = mid.handle(recv("root", Ack("mid", up.seq)), 3.0)
    assert numbered(out, Incorporated) == [("leaf", "leaf", 1)]
    out = leaf.handle(recv("mid", Incorporated("leaf", 1)), 3.0)
    assert sorted(numbered(out, Incorporated)) == [("s1", "s1", 1), ("s2", "s2", 1)]
    # Afterwards a resend of the leaf's forward is settled at once.
    assert numbered(mid.handle(recv("leaf", fwd), 4.0), Incorporated) == [("leaf", "leaf", 1)]


def test_a_region_without_parts_drops_a_refused_forward_and_says_what_is_lost() -> None:
    region = RegionalAggregator(
        "r0", "root", {s: "site" for s in SITES}, buffer_size=2, concurrency=2
    )
    region.handle(recv("root", ModelBroadcast(0, model(0.0))), 0.0)
    for s in SITES:
        region.handle(hello(s), 0.0)
    region.handle(recv("s1", upd("s1", 1)), 1.0)
    region.handle(recv("s2", upd("s2", 1)), 1.0)
    assert region.pending == 1
    out = region.handle(recv("root", Overlap("r0", 1, (("s1", 1),))), 2.0)
    assert region.pending == 0 and not sends(out, Update)
    assert [m.value for m in metrics(out, "pairs_lost")] == [1.0]  # s2's update
    assert [e for e in out if isinstance(e, Log) and e.level == "error"]


def test_a_kept_update_the_new_parent_leaves_unanswered_is_sent_again() -> None:
    site = SiteNode("s1", "r0", fallbacks=["r0b"], failover_after_s=10.0)
    site.handle(PeerUp("r0"), 0.0)
    site.handle(PeerUp("r0b"), 0.0)
    [job] = [
        e for e in site.handle(recv("r0", TrainRequest(0, 0, model())), 1.0) if isinstance(e, Train)
    ]
    done = TrainDone(job.job, TrainResult(model(1.0), 10))
    site.handle(done, 1.0)
    site.handle(recv("r0", Ack("s1", 1)), 1.0)
    site.handle(PeerDown("r0"), 2.0)
    out = site.handle(Deadline(), 12.0)
    assert numbered(out, Update) == [("r0b", "s1", 1)]
    # The standby holds it back (its intake quota) and answers nothing: sent again later.
    due = site.next_deadline()
    assert due is not None and due > 12.0
    assert numbered(site.handle(Deadline(), due), Update) == [("r0b", "s1", 1)]
    site.handle(recv("r0b", Incorporated("s1", 1)), due + 1.0)
    assert site.held == 0 and site.next_deadline() is None
