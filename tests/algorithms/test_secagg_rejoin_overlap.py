"""A dropped member's update, re-joined while its first cohort is still in its view or
reveal round, is sealed into a second cohort (``max_inflight`` 2, as a FedBuff root with
concurrency above the cohort size runs). The first cohort's completion must not forget
where that update now is: else a reconnect of the member in the second cohort's upload
phase would not get its seal again but put the update in the waiting list a second time
(another cohort then seals an update the member has masked already, and refuses)."""

from __future__ import annotations

import numpy as np

from fedloom.algorithms.protocol import Send
from fedloom.transport import wire
from tests.algorithms.secagg_harness import AGG, Net, random_delta


def test_a_rejoin_sealed_while_its_dropped_cohort_finishes_stays_in_its_new_cohort() -> None:
    # Nine sites, cohorts of five: A = sites 0-4; the second cohort is the victim and
    # A's four others (sealed while A signs its view: A can spare one of them).
    net = Net(
        9, min_cohort=3, cohort_size=5, weighting="uniform", coordinator_kwargs={"max_inflight": 2}
    )
    co = net.coordinator
    rng = np.random.default_rng(3)
    victim = net.sites[0]
    first_five, rest = net.sites[:5], net.sites[5:]
    for s in net.sites:
        net.add_update(s, 1, random_delta(rng))
    net.before_upload = {victim}  # it dies on the seal: never uploads
    for s in first_five:
        net.join(s, 1)
    (first,) = co.open_cohorts()
    # Everything but the view: the four others upload; then the victim goes down, which
    # closes the upload (the view goes out, held here).
    net.drain()
    net.take(AGG, co.on_peer_down(victim, net.now))
    assert all(isinstance(send.msg, wire.SecAggView) for _, send in net.queue)
    held, net.queue = net.queue, []
    # The victim restarts and re-joins its update, and A's four others join their next
    # ones: a second cohort is sealed while the first is still in its view round. (A, one
    # drop among five, t = 3, has slack 1: a crash of one of its four in the second cohort
    # leaves it 3 of 4, so the coordinator may take them; four more sites wait.)
    net.before_upload = set()
    net.take(AGG, co.on_peer_up(victim, net.now))
    net.queue = [q for q in net.queue if not isinstance(q[1].msg, wire.SecAggView)]
    net.join(victim, 1)
    assert co.open_cohorts() == [first]
    for s in first_five[1:]:
        net.add_update(s, 2, random_delta(rng))
        net.join(s, 2)
    for s in rest:
        net.join(s, 1)
    second = next(c for c in co.open_cohorts() if c != first)
    assert co.cohort_of(victim, 1) == second
    # The first cohort completes (its messages only; the second one's wait).
    later = [q for q in net.queue if getattr(q[1].msg, "cohort", None) == second]
    net.queue = held
    net.drain()
    assert [r.cohort for r in net.results] == [first]
    assert co.cohort_of(victim, 1) == second  # still where it is
    # The victim reconnects in the second cohort's upload phase: it gets that seal again,
    # and its update does not wait for a third cohort.
    again = co.on_join(
        victim, wire.SecAggJoin(src=victim, seq=1, base_version=0, n_examples=50), 0.0
    )
    seals = [e.msg for e in again if isinstance(e, Send) and isinstance(e.msg, wire.SecAggSeal)]
    assert [s.cohort for s in seals] == [second]
    assert co.waiting() == 4  # the four other sites' first updates: the next cohort's
    # And the second cohort completes with all five.
    net.queue = later
    net.drain()
    assert [r.cohort for r in net.results] == [first, second]
    assert len(net.results[1].survivors) == 5
