"""Overlapping cohorts and crashes (bench/secagg.py's shape: ten sites, cohorts of ten,
t = 6, two cohorts open at once). A crash takes a site out of every open cohort that holds
it, so the coordinator seals a site an open cohort A still needs into the next cohort only
while A's slack covers the crashes that cohort can bring (the most members a recent cohort
lost). With one crash per seal (10 %) the next cohort (A's nine live sites: the tenth is
down) is sealed while A signs its view, and a crash of a site in both costs each one
member; with three per seal (30 %) it waits for A (sealed from the same ten sites during
A's view, its three crashes would leave A 4 < 6 live members: both aborted, which is what
the bench hit). Every cohort completes with its survivors' exact sum, each update is
uploaded at most once, and nothing aborts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedloom.algorithms.protocol import Metric, Persist, Send
from fedloom.algorithms.secagg.coordinator import COORDINATOR_LOG_KEY, SecAggCoordinator
from fedloom.transport import wire
from tests.algorithms.secagg_harness import AGG, Net, random_delta


class Crashes:
    """Delivers ``net``'s queue with crashes: a site doomed in a cohort dies on its seal
    (nothing sent, PeerDown at once: it is gone from every open cohort), receives nothing
    while dead, and restarts (PeerUp, re-joins the update it never masked) once its
    cohort's view went out."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.doomed: dict[bytes, set[str]] = {}
        self.dead: dict[str, bytes] = {}  # site -> the cohort it died in
        self.seals: list[wire.SecAggSeal] = []

    def kill(self, site: str, cohort: bytes) -> None:
        self.dead[site] = cohort
        self.net.take(AGG, self.net.coordinator.on_peer_down(site, self.net.now))

    def revive(self, site: str, seq: int) -> None:
        del self.dead[site]
        co = self.net.coordinator
        self.net.take(AGG, co.on_peer_up(site, self.net.now))
        self.net.join(site, seq)

    def step(self) -> None:
        net = self.net
        sender, send = net.queue.pop(0)
        msg, peer = send.msg, send.peer
        if sender in self.dead or peer in self.dead:
            return  # a dead site sends and hears nothing
        if isinstance(msg, wire.SecAggSeal) and msg.cohort not in {s.cohort for s in self.seals}:
            self.seals.append(msg)
        if isinstance(msg, wire.SecAggSeal) and peer in self.doomed.get(msg.cohort, ()):
            self.kill(peer, msg.cohort)
            return
        net.deliver(sender, send)
        if isinstance(msg, wire.SecAggView):  # the upload closed: its dead come back
            for site, cid in list(self.dead.items()):
                if cid == msg.cohort:
                    self.revive(site, seq=1 if cid == self.seals[0].cohort else 2)

    def drain(self, until: object = None) -> None:
        while self.net.queue and not (callable(until) and until()):
            self.step()


def aborted(net: Net) -> float:
    return sum(
        e.value
        for e in net.effects[AGG]
        if isinstance(e, Metric) and e.name == "secagg_cohort_aborted"
    )


def check_sums(net: Net) -> None:
    """Each result is exactly its survivors' sum, and no update is in two results."""
    for r in net.results:
        by_seq: dict[int, list[str]] = {}
        for s in r.survivors:
            by_seq.setdefault(s.seq, []).append(s.site)
        want = sum(net.expected_sum(sites, seq)[0] for seq, sites in by_seq.items())
        got = np.concatenate([np.ravel(v) for v in r.total.values()])
        assert np.allclose(got, want, atol=1e-2)
        assert r.weight_sum == pytest.approx(len(r.survivors))
    applied = Counter(p for r in net.results for p in r.pairs)
    assert set(applied.values()) == {1}
    uploads = Counter(
        (e.msg.src, e.msg.seq)
        for site in net.sites
        for e in net.effects[site]
        if hasattr(e, "msg") and isinstance(e.msg, wire.MaskedUpdate)
    )
    assert set(uploads.values()) == {1}


def start(d: int) -> tuple[Net, Crashes, bytes]:
    """Cohort A of all ten sites, its first ``d`` doomed; the rest join their next update
    while A is open (trained meanwhile, as the bench's depth-2 gate lets them)."""
    net = Net(
        10,
        min_cohort=5,
        max_colluders=1,
        weighting="uniform",
        coordinator_kwargs={"max_inflight": 2},
    )
    rng = np.random.default_rng(7)
    for s in net.sites:
        net.add_update(s, 1, random_delta(rng))
        net.add_update(s, 2, random_delta(rng))
    crashes = Crashes(net)
    for s in net.sites:
        net.join(s, 1)
    (a,) = net.coordinator.open_cohorts()
    assert net.coordinator.threshold == 6
    crashes.doomed[a] = set(net.sites[:d])
    crashes.drain(until=lambda: not any(isinstance(q[1].msg, wire.SecAggSeal) for q in net.queue))
    for s in net.sites[d:]:
        net.join(s, 2)
    assert net.coordinator.open_cohorts() == [a]  # A is uploading: its crashes are unknown
    return net, crashes, a


def test_one_crash_per_seal_the_next_cohort_overlaps_and_a_crash_in_both_costs_each_one() -> None:
    net, crashes, a = start(d=1)
    co = net.coordinator
    # A's nine uploads close it (view): B, A's nine live sites (A still needs them all;
    # its slack is 9 - 6 = 3, one crash per seal seen; the tenth is down, so B does not
    # wait for it), is sealed during A's view.
    crashes.drain(until=lambda: len(co.open_cohorts()) == 2)
    (b,) = set(co.open_cohorts()) - {a}
    assert net.results == []
    seal_b = next(q[1].msg for q in net.queue if isinstance(q[1].msg, wire.SecAggSeal))
    assert isinstance(seal_b, wire.SecAggSeal) and seal_b.members == tuple(net.sites[1:])
    # B's doomed site is one A still needs (it uploaded to A, has not revealed): it dies on
    # B's seal, out of both at once.
    victim = net.sites[5]
    assert co.cohort_of(victim, 1) == a and co.cohort_of(victim, 2) == b
    crashes.doomed[b] = {victim}
    crashes.drain()
    net.run()
    assert [r.cohort for r in net.results] == [a, b]
    assert aborted(net) == 0
    first, second = net.results
    assert victim in {s.site for s in first.survivors}  # uploaded to A: its b_j is rebuilt
    assert len(first.survivors) == 9 and len(second.survivors) == 8
    assert victim not in {s.site for s in second.survivors}
    check_sums(net)


def test_three_crashes_per_seal_the_next_cohort_waits_for_the_one_it_would_sink() -> None:
    net, crashes, a = start(d=3)
    co = net.coordinator
    seen_two = False

    def b_sealed() -> bool:
        nonlocal seen_two
        seen_two = seen_two or len(co.open_cohorts()) == 2
        return any(
            isinstance(q[1].msg, wire.SecAggSeal) and q[1].msg.cohort != a for q in net.queue
        )

    # A's seven uploads close it (slack 7 - 6 = 1, three crashes seen): B could take one
    # site A still needs, never ten, so B is sealed only as A completes.
    crashes.drain(until=b_sealed)
    assert [r.cohort for r in net.results] == [a] and not seen_two
    (b,) = co.open_cohorts()
    seal_b = next(q[1].msg for q in net.queue if isinstance(q[1].msg, wire.SecAggSeal))
    assert isinstance(seal_b, wire.SecAggSeal) and set(seal_b.members) == set(net.sites)
    crashes.doomed[b] = set(net.sites[3:6])  # three that were A's survivors
    crashes.drain()
    net.run()
    assert [r.cohort for r in net.results] == [a, b]
    assert aborted(net) == 0
    assert [len(r.survivors) for r in net.results] == [7, 7]
    check_sums(net)


def test_a_restart_with_two_overlapping_cohorts_aborts_both_and_no_update_joins_again() -> None:
    """The aggregator restarts with A (revealing) and B (uploading) open over the same
    sites: a site that returns hears both aborted; the updates it uploaded are lost
    (consumed: never joined or uploaded again)."""
    net, crashes, a = start(d=1)
    co = net.coordinator
    crashes.drain(until=lambda: len(co.open_cohorts()) == 2)
    (b,) = set(co.open_cohorts()) - {a}
    # B's seal reaches the sites: they upload to B too (held: the aggregator is gone).
    while any(isinstance(q[1].msg, wire.SecAggSeal) for q in net.queue):
        crashes.step()
    site = net.sites[5]
    assert net.members[site].consumed(1) and net.members[site].consumed(2)
    log = [
        e.data for e in net.effects[AGG] if isinstance(e, Persist) and e.key == COORDINATOR_LOG_KEY
    ]
    assert net.keys is not None
    fresh = SecAggCoordinator(
        AGG, net.keys[AGG], cohort_size=10, min_cohort=5, rng=np.random.default_rng(1)
    )
    fresh.restore(co.snapshot(), log)
    out = fresh.on_peer_up(site, 0.0)
    aborts = [e.msg for e in out if isinstance(e, Send)]
    assert sorted(m.cohort for m in aborts) == sorted([a, b])
    member = net.members[site]
    member.take_outcomes()
    for m in aborts:
        member.on_abort(AGG, m)
    lost = {(o.cohort, o.seq) for o in member.take_outcomes() if o.kind == "lost"}
    assert lost == {(a, 1), (b, 2)}
    # Both stay consumed: a seal naming either is refused (update_consumed).
    assert member.consumed(1) and member.consumed(2)


@pytest.mark.parametrize("back", [False, True])
def test_with_no_cohort_open_the_next_does_not_wait_for_a_site_that_is_down(back: bool) -> None:
    """A ended with one member down: once its other five wait, the next cohort is sealed
    at once (no ``form_wait_s``) from them; a site whose link is back is waited for."""
    net = Net(6, min_cohort=3, weighting="uniform")
    co = net.coordinator
    rng = np.random.default_rng(5)
    for s in net.sites:
        net.add_update(s, 1, random_delta(rng))
        net.add_update(s, 2, random_delta(rng))
        net.join(s, 1)
    gone = net.sites[0]
    net.before_upload = {gone}
    net.take(AGG, co.on_peer_down(gone, net.now))
    net.drain()
    assert [len(r.survivors) for r in net.results] == [5] and co.open_cohorts() == []
    if back:
        net.take(AGG, co.on_peer_up(gone, net.now))
    for s in net.sites[1:]:
        net.join(s, 2)
    if back:
        assert co.open_cohorts() == [] and co.waiting() == 5
        net.before_upload = set()
        net.join(gone, 1)  # its update never masked
    (b,) = co.open_cohorts()
    net.drain()
    assert [len(r.survivors) for r in net.results] == [5, 6 if back else 5]
    assert net.results[1].cohort == b and net.now == 0.0
    check_sums(net)


def test_the_formation_deadline_is_the_one_a_seal_answers() -> None:
    """A site an open cohort still holds waits out of turn; its older join must not set the
    formation deadline. Otherwise the deadline lies in the past, ``on_deadline`` seals
    nothing, and a host that sleeps until ``next_deadline()`` fires it again at once
    forever (the step's guard then stops the node)."""
    net = Net(6, seed=1, min_cohort=2, cohort_size=3, coordinator_kwargs={"max_inflight": 2})
    co = net.coordinator
    rng = np.random.default_rng(0)

    def join(site: str, seq: int, at: float) -> None:
        net.now = at
        net.add_update(site, seq, random_delta(rng), n_examples=50)
        net.join(site, seq)

    first, second, third, fourth, fifth, _ = net.sites
    for site in (first, second, third):
        join(site, 1, 0.0)  # a full cohort of 3: sealed, and it holds these sites
    assert len(co.open_cohorts()) == 1
    join(first, 2, 1.0)  # held by the open cohort: waits out of turn
    join(fourth, 1, 2.0)
    join(fifth, 1, 2.0)  # t free sites wait, fewer than a cohort

    deadline = co.next_deadline()
    assert deadline is not None
    assert deadline == 2.0 + co.form_wait_s  # the free sites' oldest join, not 1.0's
    now = deadline
    for _ in range(3):
        net.take(AGG, co.on_deadline(now))
        if len(co.open_cohorts()) > 1:
            break
        following = co.next_deadline()
        assert following is not None and following > now, "a deadline no seal answers"
        now = following
    assert len(co.open_cohorts()) == 2  # the free sites were sealed at their deadline
