"""Pipelined cohorts through the real nodes (the factory both drivers use): a secure FedBuff
root gives a site its next task at the site's ``SecAggJoin`` (the join answers the task),
not at the cohort's ack, so the next update trains while the cohort masks, signs its view
and unmasks, and the next cohort is sealed while the first is still open (``max_inflight``
= concurrency // cohort size + 1). bench/secagg.py measures exactly this (its gate lets a
site hold two unacked updates). The secure-aggregation properties hold across the
overlap: every update is masked and uploaded at most once, each applied exactly once in
one cohort, an update whose cohort dropped it is never joined again, the tasks out never
exceed the concurrency, and each cohort's sum is its survivors' own."""

from __future__ import annotations

from collections import Counter

from fedloom.algorithms.aggregator_base import APPLIED_KEY
from fedloom.algorithms.protocol import Persist
from fedloom.transport.wire import Ack, MaskedUpdate, SecAggJoin, SecAggSeal, TrainRequest
from tests.algorithms.alg_helpers import model
from tests.algorithms.test_secagg_nodes import (
    Fed,
    applied_step,
    close,
    no_plain_updates_from_sites,
    secagg,
)


def cohort_records(fed: Fed) -> list[dict[str, object]]:
    return [
        e.data
        for n, e in fed.effects
        if n == "root"
        and isinstance(e, Persist)
        and e.key == APPLIED_KEY
        and e.data.get("op") == "cohort"
    ]


def expected_model(fed: Fed) -> dict[str, object]:
    """The sum of every applied cohort's step (the model starts at zero)."""
    total = {k: 0.0 * v.astype(float) for k, v in model().items()}
    for r in cohort_records(fed):
        pairs = [(str(p[0]), int(p[1])) for p in r["pairs"]]  # type: ignore[attr-defined]
        step = applied_step(fed, pairs, int(r["version"]))  # type: ignore[call-overload]
        for k in total:
            total[k] = total[k] + step[k]
    return total


def test_the_next_task_goes_out_at_the_join_and_trains_while_the_cohort_is_open() -> None:
    """One cohort's worth of sites: the next updates train and join while A is open."""
    fed = Fed(6, buffer_size=6, cfg=secagg(min_cohort=3))
    root = fed.nodes["root"]
    fed.train()  # every site's first update
    for s in fed.sites:
        fed.deliver_one(s, "root")  # the joins: the sixth seals cohort A
    (seal_a,) = {m.cohort for m in fed.sent_by("root", SecAggSeal)}
    # Each join answered its task: the next six tasks are out before anything was acked.
    assert len(fed.sent_by("root", TrainRequest)) == 12
    assert fed.sent_by("root", Ack) == []
    assert root.in_flight == 6  # never above the concurrency
    # The sites get A's seal (they upload) and their next task (they train on it).
    for s in fed.sites:
        fed.flush_link("root", s)
    assert len(fed.jobs) == 6
    fed.train()  # the second updates are done while A has not even seen its uploads
    for s in fed.sites:
        fed.flush_link(s, "root")  # A's uploads, then the sites' second joins
    # A's upload closed with no drop (t = 4 of 6: slack 2, and at most one crash seen
    # per cohort): B is sealed from the same six sites while A signs its view.
    coordinator = root.secure_aggregation
    assert len(coordinator.open_cohorts()) == 2 and coordinator.waiting() == 0
    (seal_b,) = {m.cohort for m in fed.sent_by("root", SecAggSeal)} - {seal_a}
    assert {m.members for m in fed.sent_by("root", SecAggSeal) if m.cohort == seal_b} == {
        tuple(fed.sites)
    }
    assert root.version == 0
    fed.drain()  # both complete, A first
    assert root.version == 2
    records = cohort_records(fed)
    assert [sorted(int(p[1]) for p in r["pairs"]) for r in records] == [[1] * 6, [2] * 6]
    # B's updates trained on version 0 and were applied at version 1 (staleness 1).
    assert records[1]["taus"] == [1] * 6
    assert close(root.current_model()[1], expected_model(fed))
    uploads = Counter((m.src, m.seq) for s in fed.sites for m in fed.sent_by(s, MaskedUpdate))
    assert set(uploads.values()) == {1} and len(uploads) == 12
    no_plain_updates_from_sites(fed)


def test_a_member_lost_in_the_first_cohort_joins_the_next_with_that_update_only() -> None:
    """A member that dies on A's seal (before uploading) comes back while A is still
    open: it joins the update it never masked into B; an update A did take (uploaded) is
    never joined again, and nothing is uploaded twice even with two cohorts open."""
    fed = Fed(6, buffer_size=6, cfg=secagg(min_cohort=3, max_dropout=0.2))
    root = fed.nodes["root"]
    victim = fed.sites[0]
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # A sealed
    fed.drop(victim)  # its seal and its next task are lost with the link
    for s in fed.sites[1:]:
        fed.flush_link("root", s)  # the others upload to A and start their next job
    fed.train(fed.sites[1:])
    for s in fed.sites[1:]:
        fed.flush_link(s, "root")  # A's five uploads (A closes: view), their next joins
    fed.link(victim, "root", True)  # back: it joins its un-masked first update again
    fed.drain()
    fed.train()  # whatever jobs are out now (the victim's next task among them)
    fed.drain()
    assert root.version >= 2
    records = cohort_records(fed)
    applied = Counter((str(p[0]), int(p[1])) for r in records for p in r["pairs"])
    assert set(applied.values()) == {1}  # each update in one cohort only
    assert (victim, 1) in applied  # its first update made it, in a later cohort
    assert not any(str(p[0]) == victim for p in records[0]["pairs"])  # not in A
    uploads = Counter((m.src, m.seq) for s in fed.sites for m in fed.sent_by(s, MaskedUpdate))
    assert set(uploads.values()) == {1}
    # Every update the victim joined was trained by it, and each one it uploaded is applied.
    joined = {m.seq for m in fed.sent_by(victim, SecAggJoin)}
    assert {q for (src, q) in uploads if src == victim} <= joined
    assert {q for (src, q) in applied if src == victim} == {
        q for (src, q) in uploads if src == victim
    }
    assert close(root.current_model()[1], expected_model(fed))
    no_plain_updates_from_sites(fed)


def test_two_cohorts_of_distinct_sites_are_open_at_once() -> None:
    """Twice a cohort's worth of sites (concurrency 12, cohorts of 6: max_inflight 3): the
    second cohort seals while the first is open, from the other six sites (the first is
    still uploading: nothing of its crashes is known, so none of its sites is taken)."""
    fed = Fed(12, buffer_size=6, cfg=secagg(min_cohort=3), concurrency=12)
    root = fed.nodes["root"]
    coordinator = root.secure_aggregation
    fed.train()
    for s in fed.sites:
        fed.deliver_one(s, "root")  # 12 joins: two cohorts sealed
    seals = {m.cohort: set(m.members) for m in fed.sent_by("root", SecAggSeal)}
    assert len(seals) == 2 and len(coordinator.open_cohorts()) == 2
    first, second = seals.values()
    assert not first & second and first | second == set(fed.sites)
    for _ in range(4):  # sites train whatever they hold, the root seals as it can
        fed.train()
        fed.drain()
    records = cohort_records(fed)
    assert root.version == len(records) >= 4
    for r in records:  # each cohort: six distinct sites, one update each
        assert len({str(p[0]) for p in r["pairs"]}) == len(r["pairs"]) == 6  # type: ignore[attr-defined]
    applied = Counter((str(p[0]), int(p[1])) for r in records for p in r["pairs"])  # type: ignore[attr-defined]
    assert set(applied.values()) == {1}
    uploads = Counter((m.src, m.seq) for s in fed.sites for m in fed.sent_by(s, MaskedUpdate))
    assert set(uploads.values()) == {1}
    assert close(root.current_model()[1], expected_model(fed))
    no_plain_updates_from_sites(fed)
