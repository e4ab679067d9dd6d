"""Regional failover under the faults an adversarial review found (issue 13, item 4):
stale resends after a failover, a region that lags the sites' model, a region claiming
far-future site updates, a root whose ``[subtrees]`` misses a site, and notices from a
standby that never saw the update."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import tests.algorithms.test_failover as tf
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.incorporation import PAIR_AHEAD, PAIR_BEHIND
from fedloom.algorithms.protocol import (
    Effect,
    Log,
    PeerUp,
    Persist,
    Received,
    Train,
    TrainDone,
    TrainResult,
)
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.transport.wire import Ack, Incorporated, ModelBroadcast, Overlap, TrainRequest, Update
from tests.algorithms.alg_helpers import hello, metrics, model, recv, requests, sends, upd

MAX_STALENESS = 5


def lagging_region(name: str) -> RegionalAggregator:
    """The chaos layout's region settings: K=3, concurrency 10, a staleness bound."""
    region = RegionalAggregator(
        name,
        "root",
        {s: "site" for s in tf.SITES},
        buffer_size=3,
        concurrency=10,
        rng=0,
        keep_parts=True,
        max_staleness=MAX_STALENESS,
        task_timeout_s=60.0,
    )
    region.set_subtrees({})
    return region


def test_stale_resends_after_a_failover_do_not_stall_the_standby(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tf, "make_region", lagging_region)
    net = tf.federation()
    net.advance(10.0)
    for s in tf.SITES:
        net.cut("r0", s)
    # The rest of the tree moves the model past the sites' kept updates' staleness bound.
    root = net.nodes["root"]
    assert isinstance(root, FedBuffAggregator)
    v0 = root.version
    for k in range(MAX_STALENESS + 5):
        weights = {n: a + 0 for n, a in model(0.0).items()}
        for r in ("r0", "r0b"):
            net.feed(r, Received("root", ModelBroadcast(v0 + 1 + k, weights)))
    net.pump()
    net.advance(tf.FAILOVER_S + 5)
    assert all(net.site(s).parent == "r0b" for s in tf.SITES)
    standby = net.region("r0b")
    assert standby.stale >= 1  # the kept updates were resent and found stale
    forwarded = standby.forwarded
    # Well inside the 60 s quiet deadline that used to be the only way out of the stall.
    net.advance(20.0)
    assert standby.forwarded >= forwarded + 3
    assert not standby._held


def test_stale_decisions_take_no_slot_but_unasked_ones_stay_bounded() -> None:
    region = lagging_region("r0b")
    region.handle(Received("root", ModelBroadcast(20, model(0.0))), 0.0)
    for s in tf.SITES:
        region.handle(hello(s, "site"), 0.0)
    quota = region._quota("s1")
    stale = [upd("s1", q, base=1) for q in range(1, 2 * quota + 2)]  # unasked resends
    for u in stale:
        region.handle(recv("s1", u), 1.0)
    assert region.stale == quota  # decided (and logged) within the share ...
    assert len(region._held["s1"]) >= 1  # ... the rest waits: a flood stays bounded
    assert "s1" not in region._unsolicited and not region._uses.get("s1")
    # The site's answer to its task is still taken at once.
    d = region._dispatcher
    task = next(t for t in d.tasks() if d.task_site(t) == "s1")
    region.handle(recv("s1", upd("s1", 100, base=20, task=task)), 2.0)
    assert region.applied == 1


def test_a_lagging_region_holds_an_update_on_a_newer_model_instead_of_rejecting_it() -> None:
    net = tf.federation()
    net.advance(10.0)
    net.cut("root", "r0")
    for s in tf.SITES:
        net.cut("r0", s)
    net.advance(tf.FAILOVER_S + 30)  # the sites fail over to r0b and train on newer models
    assert all(net.site(s).parent == "r0b" for s in tf.SITES)
    net.cut("root", "r0b")  # r0b acks and forwards into its outbox only
    net.advance(5.0)
    kept = {s: {u.seq for u in net.site(s).snapshot()["held"]} for s in tf.SITES}
    assert all(kept.values())
    net.kill("r0b")
    for s in tf.SITES:
        net.link("r0", s)  # back to r0, whose model is older than the kept updates'
    net.advance(tf.FAILOVER_S + 10)
    assert not tf.metrics_seen(net, "update_rejected")
    net.link("root", "r0")
    net.pump()
    net.advance(60.0)
    pairs = net.root_pairs()
    for s in tf.SITES:
        still = {u.seq for u in net.site(s).snapshot()["held"]}
        lost = [q for q in kept[s] if (s, q) not in pairs and q not in still]
        assert not lost, (s, lost)
    assert max(pairs.values()) == 1


def refused_unrecorded(out: list[Effect], reason: str) -> bool:
    return (
        [m.labels for m in metrics(out, "update_rejected")] == [{"reason": reason}]
        and not sends(out, Ack)
        and not [e for e in out if isinstance(e, Persist)]
    )


def taken_unrecorded(out: list[Effect], far: int) -> bool:
    """Acked, with ``far`` pairs counted far ahead and written down as such only."""
    [record] = [e.data for e in out if isinstance(e, Persist) and e.append]
    return (
        bool(sends(out, Ack))
        and [m.value for m in metrics(out, "pairs_far_ahead")] == [float(far)]
        and len(record["far_pairs"]) == far
        and not any(tuple(p) in map(tuple, record["far_pairs"]) for p in record["pairs"])
    )


def test_a_region_cannot_claim_a_sites_far_future_updates() -> None:
    root = tf.fresh_root()
    zero = {k: np.zeros_like(a) for k, a in model(0.0).items()}
    for i in range(70):  # the review's attack: one far-future pair per forward
        far = Update("r0", 1 + i, 0, zero, 1, count=1, pairs=(("s1", 10**9 + i),))
        # Taken (a far pair must not hold a forward's honest updates), not recorded.
        assert taken_unrecorded(root.handle(recv("r0", far), 1.0), 1)
    many = tuple(("s1", 2 * 10**9 + i) for i in range(65))  # or many in one forward
    out = root.handle(recv("r0", tf.forward(100, many, count=65)), 1.0)
    assert taken_unrecorded(out, 65)
    assert root._pairs.watermark("s1") == 0 and not root._pairs.snapshot()["above"]
    # Kept apart, a claim delivered again is named taken (a standby's second delivery).
    out = root.handle(recv("r0b", dataclasses.replace(far, src="r0b", seq=1)), 1.0)
    assert sends(out, Overlap) and not sends(out, Ack)
    # The standby's honest forward of the site's next update is taken, not refused.
    honest = Update("r0b", 1, 0, model(0.1), 10, count=1, pairs=(("s1", 1),))
    out = root.handle(recv("r0b", honest), 2.0)
    assert sends(out, Ack) and metrics(out, "pairs_applied") and not sends(out, Overlap)
    assert root._pairs.seen("s1", 1)


def test_a_reseeded_root_relearns_where_its_sites_numbers_stand() -> None:
    """A root reseeded after losing its state (``fedloom state reseed``) has an empty
    record of the site updates it took, while its sites are long past ``PAIR_AHEAD``:
    without relearning, every forward's pairs were far ahead, named back in an
    ``Overlap`` and dropped by the regions, for ever."""
    stale = tf.fresh_root()
    far = tf.forward(1, (("s1", 1000), ("s2", 700)))
    assert taken_unrecorded(stale.handle(recv("r0", far), 1.0), 2)
    assert stale._pairs.watermark("s1") == 0 and stale._pairs.watermark("s2") == 0
    root = tf.fresh_root()
    root.relearn_site_pairs()
    out = root.handle(recv("r0", far), 1.0)
    assert sends(out, Ack) and not sends(out, Overlap) and root.applied == 1
    assert root._pairs.watermark("s1") == 1000 - PAIR_BEHIND
    # From a site's first pair on the bound holds again, across a restart too.
    back = tf.fresh_root()
    back.restore(root.snapshot())
    claim = tf.forward(2, (("s1", 1001 + PAIR_AHEAD),), count=1)
    assert taken_unrecorded(back.handle(recv("r0", claim), 2.0), 1)
    assert back._pairs.watermark("s1") == 1000 - PAIR_BEHIND
    out = back.handle(recv("r0", tf.forward(3, (("s1", 1001), ("s2", 701)))), 2.0)
    assert sends(out, Ack) and back.applied == 2  # counted since the restart
    # A site not heard of since the reseed is still relearned after the restart.
    from_r9 = dataclasses.replace(tf.forward(1, (("s9", 5000),), count=1), src="r9")
    out = back.handle(recv("r9", from_r9), 3.0)
    assert sends(out, Ack) and back._pairs.watermark("s9") == 5000 - PAIR_BEHIND
    # A root never reseeded writes the ledger as before (no "relearned").
    assert "relearned" not in tf.fresh_root().snapshot()["pairs"]


def test_a_sites_updates_decided_stale_at_the_root_do_not_leave_it_far_behind() -> None:
    """A region cut off from its root while the others go on: its backlog of forwards
    arrives stale, more than ``PAIR_AHEAD`` of one site's updates among them. Their pairs
    are recorded as decided, so the site's next update is not refused as far ahead (it
    was, named back in an ``Overlap``, and dropped by the region: every later one too)."""
    root = FedBuffAggregator(
        "root",
        {"r0": "region", "r9": "region"},
        model(0.0),
        buffer_size=1,
        concurrency=1,
        max_staleness=0,
    )
    root.set_subtrees({"r0": tf.SITES, "r9": ("s9",)})
    for r in ("r0", "r9"):
        root.handle(hello(r, "region"), 0.0)
    # r9 moves the root on; every forward of r0 is then on an old model.
    lead = dataclasses.replace(tf.forward(1, (("s9", 1),), count=1), src="r9")
    assert sends(root.handle(recv("r9", lead), 1.0), Ack) and root.version == 1
    backlog = 2 * PAIR_AHEAD
    for q in range(1, backlog + 1):
        out = root.handle(recv("r0", tf.forward(q, (("s1", q),), count=1)), 2.0)
        assert sends(out, Ack) and not metrics(out, "update_applied"), q  # stale
    assert root._pairs.watermark("s1") == backlog
    fresh = dataclasses.replace(tf.forward(backlog + 1, (("s1", backlog + 1),), count=1))
    fresh = dataclasses.replace(fresh, base_version=root.version)
    out = root.handle(recv("r0", fresh), 3.0)
    assert sends(out, Ack) and metrics(out, "update_applied") and not sends(out, Overlap)
    # The stale pairs are in the log too, so a restart replays the same ledger.
    replayed = [e.data for e in out if isinstance(e, Persist) and e.append]
    assert replayed and replayed[0]["pairs"] == [["s1", backlog + 1]]


def test_a_stale_forward_is_held_to_the_same_pair_checks() -> None:
    """The hostile side of recording a stale forward's pairs: a region whose forwards the
    root decides stale claims another region's site, or a site's far future. The foreign
    claim is refused unrecorded, as for a fresh forward; the far one is kept apart and
    moves no watermark, so neither erases a site update another region delivers."""
    root = FedBuffAggregator(
        "root",
        {"r0": "region", "r9": "region"},
        model(0.0),
        buffer_size=1,
        concurrency=1,
        max_staleness=0,
    )
    root.set_subtrees({"r0": tf.SITES, "r9": ("s9",)})
    for r in ("r0", "r9"):
        root.handle(hello(r, "region"), 0.0)
    lead = dataclasses.replace(tf.forward(1, (("s9", 1),), count=1), src="r9")
    assert sends(root.handle(recv("r9", lead), 1.0), Ack) and root.version == 1
    foreign = tf.forward(1, (("s9", 2),), count=1)  # stale (base 0), and s9 is r9's
    assert refused_unrecorded(root.handle(recv("r0", foreign), 2.0), "foreign_pairs")
    far = tf.forward(2, (("s1", 10**9),), count=1)
    out = root.handle(recv("r0", far), 2.0)
    assert sends(out, Ack) and not metrics(out, "update_applied")  # decided stale
    assert root._pairs.watermark("s1") == 0 and not root._pairs.seen("s1", 1)
    honest = dataclasses.replace(tf.forward(2, (("s9", 2),), count=1), src="r9", base_version=1)
    assert metrics(root.handle(recv("r9", honest), 3.0), "update_applied")


def test_far_future_claims_do_not_erase_the_sites_updates_after_a_failover() -> None:
    net = tf.federation()
    net.advance(5.0)
    root = net.nodes["root"]
    assert isinstance(root, FedBuffAggregator)
    zero = {k: np.zeros_like(a) for k, a in model(0.0).items()}
    r0 = net.region("r0")
    for i in range(65):
        forged = Update(
            "r0", r0.seq + 1 + i, root.version, zero, 1, count=1, pairs=(("s1", 10**9 + i),)
        )
        root.handle(Received("r0", forged), net.now)
    net.kill("r0")
    before = set(net.root_pairs())
    net.advance(tf.FAILOVER_S + 40)
    new = {p for p in net.root_pairs() if p[0] == "s1" and p not in before}
    assert len(new) >= 10  # the attack left the root taking none of them
    assert not tf.metrics_seen(net, "forward_overlap")


def test_a_gap_no_region_fills_is_given_up_so_later_pairs_still_flow() -> None:
    root = tf.fresh_root()
    seqs = [q for q in range(1, 3 * PAIR_AHEAD) if q != 3]  # (s1, 3) was stale at a region
    for n, q in enumerate(seqs, start=1):
        out = root.handle(recv("r0", tf.forward(n, (("s1", q),), count=1)), 1.0)
        assert sends(out, Ack), q
    assert root._pairs.watermark("s1") == seqs[-1]
    assert len(root._pairs.snapshot()["above"]) == 0
    # A gap is kept while it may still be filled.
    out = root.handle(recv("r0", tf.forward(len(seqs) + 1, (("s2", 2),), count=1)), 1.0)
    assert root._pairs.watermark("s2") == 0 and not root._pairs.seen("s2", 1)
    assert PAIR_BEHIND < PAIR_AHEAD


def test_a_site_missing_from_subtrees_keeps_its_updates_and_the_root_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tf.fresh_root()
    out = root.handle(recv("r9", Update("r9", 1, 0, model(0.1), 10, pairs=(("s1", 1),))), 1.0)
    assert refused_unrecorded(out, "foreign_pairs")
    errors = [e for e in out if isinstance(e, Log)]
    assert (
        len(errors) == 1
        and errors[0].level == "error"
        and "[subtrees]" in errors[0].text
        and "s1" in errors[0].text
    )
    out = root.handle(recv("r9", Update("r9", 2, 0, model(0.1), 10, pairs=(("s1", 2),))), 2.0)
    assert refused_unrecorded(out, "foreign_pairs")
    assert not [e for e in out if isinstance(e, Log)]  # one line, rate limited
    # The whole tree: the root's [subtrees] lacks s2, so nothing moves, and nothing is lost.
    monkeypatch.setattr(tf, "SUBTREES", {"r0": ("s1",), "r0b": ("s1",)})
    net = tf.federation()
    net.advance(30.0)
    assert not net.root_pairs()
    for s in tf.SITES:
        assert net.site(s).seq >= 2
        assert net.site(s).held + net.site(s).pending == net.site(s).seq  # all still kept


def test_a_notice_from_a_fallback_settles_only_updates_kept_as_acknowledged() -> None:
    w = {"w": np.zeros(4, np.float32)}
    site = SiteNode("s1", "r0", fallbacks=["r0b"], failover_after_s=60)
    site.handle(PeerUp("r0"), 0.0)
    site.handle(PeerUp("r0b"), 0.0)
    out = site.handle(Received("r0", TrainRequest(1, 0, w, {})), 0.0)
    job = next(e for e in out if isinstance(e, Train)).job
    site.handle(TrainDone(job, TrainResult({"w": w["w"] + 1}, 10)), 1.0)
    assert site.pending == 1
    site.handle(Received("r0b", Incorporated("s1", 1)), 2.0)  # r0b never received it
    assert (site.pending, site.held) == (1, 0)
    site.handle(Received("r0", Ack("s1", 1)), 3.0)
    assert (site.pending, site.held) == (0, 1)
    site.handle(Received("r0b", Incorporated("s1", 1)), 4.0)  # kept: any parent settles it
    assert site.held == 0


def test_pairs_are_checked_before_the_overlap_and_a_site_sends_none() -> None:
    root = tf.fresh_root()
    root.handle(recv("r0b", Update("r0b", 1, 0, model(0.1), 10, pairs=(("s1", 1),))), 1.0)
    # A forward naming a taken pair and a foreign one: refused, and no Overlap tells the
    # sender which other region's site updates were taken.
    both = tf.forward(1, (("s1", 1), ("s9", 1)))
    out = root.handle(recv("r0", both), 1.0)
    assert refused_unrecorded(out, "foreign_pairs") and not sends(out, Overlap)
    region = tf.make_region("r0")
    region.handle(Received("root", ModelBroadcast(0, model(0.0))), 0.0)
    region.handle(hello("s1"), 0.0)
    bad = Update("s1", 1, 0, model(0.1), 10, pairs=(("s2", 1),))
    out = region.handle(recv("s1", bad), 1.0)
    assert refused_unrecorded(out, "site_pairs") and region.applied == 0


def test_malformed_task_answers_stay_bounded_per_epoch_under_the_median() -> None:
    sites = {f"s{i}": "site" for i in range(5)} | {"evil": "site"}
    agg = FedBuffAggregator(
        "root", sites, model(0.5), buffer_size=3, concurrency=6, robust="median"
    )
    task: dict[str, int] = {}
    for s in sites:
        task.update((p, r.task) for p, r in requests(agg.handle(hello(s), 0.0)))
    bad = {"w": np.zeros((7, 7), np.float32)}
    out: list[Effect] = []
    for seq in range(1, 41):  # answers every task it gets at once, each one malformed
        t = task.pop("evil", -1)
        step = agg.handle(recv("evil", upd("evil", seq, task=t, delta=bad)), 1.0)
        task.update((p, r.task) for p, r in requests(step))
        out += step
    # Its share (⌈3/6⌉ = 1) of decisions that take no slot; the rest never touch disk.
    assert len([e for e in out if isinstance(e, Persist)]) == 1
