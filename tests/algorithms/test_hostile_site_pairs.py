"""A site that numbers its updates far ahead of what it made, so that the forward of its
region carrying one names a pair far ahead of the root's pair ledger (``PairLedger``):
refused, the forward stayed refused for ever, wedging every honest update in it and, once
the region's outbox filled, the whole region. The root takes it, the far pair kept apart
from the ledger's watermark."""

from __future__ import annotations

from dataclasses import replace

import tests.algorithms.test_failover as tf
from fedloom.algorithms.incorporation import PAIR_AHEAD
from fedloom.algorithms.protocol import Effect, Event, Persist, Received, Send
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.transport.wire import Ack, Incorporated, ModelBroadcast, Overlap, Update
from tests.algorithms.alg_helpers import hello, metrics, model, recv, sends, upd

JUMP = 10 * PAIR_AHEAD


class FarAheadSite(SiteNode):
    """An honest site's training, but every update leaves numbered ``JUMP`` ahead (its
    acks and notices are mapped back, so it keeps working and keeps attacking)."""

    def handle(self, event: Event, now: float) -> list[Effect]:
        if isinstance(event, Received) and isinstance(event.msg, Ack | Incorporated):
            msg = event.msg
            if msg.src == self.node_id and msg.seq > JUMP:
                event = Received(event.peer, replace(msg, seq=msg.seq - JUMP))
        out = super().handle(event, now)
        return [
            Send(e.peer, replace(e.msg, seq=e.msg.seq + JUMP))
            if isinstance(e, Send) and isinstance(e.msg, Update)
            else e
            for e in out
        ]


def test_a_site_numbering_far_ahead_cannot_wedge_its_regions_forwards() -> None:
    net = tf.Net()
    net.nodes["s1"] = FarAheadSite("s1", "r0", fallbacks=["r0b"], failover_after_s=tf.FAILOVER_S)
    net.link("root", "r0")
    net.link("root", "r0b")
    for s in tf.SITES:
        net.link("r0", s)
        net.link("r0b", s)
    net.pump()
    net.advance(120.0)
    r0 = net.region("r0")
    honest = net.site("s2")
    pairs = net.root_pairs()
    taken = {q for s, q in pairs if s == "s2"}
    # The honest site's updates reach the root and are settled: it keeps training.
    assert honest.seq >= 50 and len(taken) >= honest.seq - honest.held - honest.pending - 2
    assert honest.held < honest._held.limit  # type: ignore[union-attr]
    assert not r0.paused and r0.pending <= 2
    # The far-ahead numbers were never recorded (no site's future is erased).
    assert all(q < JUMP for s, q in pairs if s == "s1")
    assert tf.metrics_seen(net, "pairs_far_ahead")


def test_the_root_takes_the_forward_and_records_only_the_pairs_in_bound() -> None:
    root = tf.fresh_root()
    fwd = tf.forward(1, (("s2", 1), ("s1", JUMP)), count=2)
    out = root.handle(Received("r0", fwd), 1.0)
    assert [e.msg for e in out if isinstance(e, Send) and isinstance(e.msg, Ack)]
    assert not [e for e in out if isinstance(e, Send) and isinstance(e.msg, Overlap)]
    assert root.applied == 1 and root._pairs.seen("s2", 1)
    assert root._pairs.watermark("s1") == 0 and root._pairs.seen("s1", JUMP)  # kept apart
    [record] = [e.data for e in out if isinstance(e, Persist) and e.append]
    assert record["pairs"] == [["s2", 1]] and record["far_pairs"] == [["s1", JUMP]]
    # A restart replays the same ledger: the far pair is still not in it.
    back = tf.fresh_root()
    back.restore(root.snapshot())
    assert back._pairs.snapshot() == root._pairs.snapshot()


def test_a_region_keeping_no_parts_drops_the_forward_and_counts_the_rest_lost() -> None:
    """A region without ``has_standby`` keeps no parts to rebuild a forward from: one that
    its root answers with an ``Overlap`` (site updates another region delivered) is
    dropped whole, its other site updates counted lost and settled."""
    region = RegionalAggregator(
        "r0", "root", {s: "site" for s in tf.SITES}, buffer_size=2, concurrency=2, rng=0
    )
    region.handle(Received("root", ModelBroadcast(0, model(0.0))), 0.0)
    for s in tf.SITES:
        region.handle(hello(s, "site"), 0.0)
    out = region.handle(recv("s1", upd("s1", JUMP)), 1.0)
    out += region.handle(recv("s2", upd("s2", 1)), 1.0)
    (fwd,) = [e.msg for e in sends(out, Update) if isinstance(e.msg, Update)]
    assert set(fwd.pairs) == {("s1", JUMP), ("s2", 1)}
    out = region.handle(Received("root", Overlap("r0", fwd.seq, (("s1", JUMP),))), 2.0)
    assert region.pending == 0 and not sends(out, Update)  # nothing left to resend
    assert [m.value for m in metrics(out, "pairs_lost")] == [1.0]
    settled = {(e.peer, e.msg.seq) for e in sends(out) if isinstance(e.msg, Incorporated)}
    assert settled == {("s1", JUMP), ("s2", 1)}
