"""A FedAvg round that selects every site cannot fill once a site dies (fewer live sites
than min_cohort): the root says so and runs its rounds with the live sites instead of
waiting for the dead one for good (issue 15)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedloom.algorithms.protocol import Deadline, Effect, Log, PeerDown
from fedloom.algorithms.sync import RoundState, SyncAggregator
from fedloom.transport.wire import TrainRequest
from tests.algorithms.alg_helpers import hello, metrics, model, recv, requests, upd
from tests.algorithms.test_sync_restart import Disk

SITES = {f"s{i}": "site" for i in range(1, 5)}
ALL = len(SITES)


def make(**kw: Any) -> SyncAggregator:
    args: dict[str, Any] = {
        "clients_per_round": ALL,
        "min_cohort": ALL,
        "min_available": ALL,
        "round_timeout_s": 10.0,
        "clip_norm": None,
    }
    args.update(kw)
    return SyncAggregator("root", SITES, model(0.0), **args)


def warnings(out: list[Effect]) -> list[Log]:
    return [e for e in out if isinstance(e, Log) and e.level == "warning"]


def answer_all(
    agg: SyncAggregator, reqs: list[tuple[str, TrainRequest]], now: float, seq: int
) -> list[Effect]:
    out: list[Effect] = []
    for peer, req in reqs:
        msg = upd(peer, seq, base=req.version, value=1.0, n=10, task=req.task)
        out += agg.handle(recv(peer, msg), now)
    return out


def test_a_dead_site_no_longer_stops_rounds_that_select_every_site() -> None:
    agg = make()
    reqs = [r for s in SITES for r in requests(agg.handle(hello(s), 0.0))]
    assert len(reqs) == ALL
    reqs = requests(answer_all(agg, reqs, 1.0, seq=1))
    assert agg.version == 1 and len(reqs) == ALL
    # s4 dies during round 2: the other three answer, but the round cannot reach min_cohort.
    out = agg.handle(PeerDown("s4"), 2.0)
    out += answer_all(agg, [r for r in reqs if r[0] != "s4"], 3.0, seq=2)
    assert agg.rounds_abandoned == 1 and agg.state is RoundState.WAITING
    assert requests(out) == []
    # Nothing else will happen (a dead site sends nothing): the root asks to be woken.
    wake = agg.next_deadline()
    assert wake == 3.0 + 10.0
    out = agg.handle(Deadline(), wake)
    said = warnings(out)
    assert len(said) == 1 and "min_cohort" in said[0].text
    assert (
        said[0].fields is not None
        and said[0].fields["up"] == 3
        and said[0].fields["min_cohort"] == ALL
    )
    assert len(metrics(out, "round_unfillable")) == 1
    reqs = requests(out)
    assert sorted(p for p, _ in reqs) == ["s1", "s2", "s3"]
    # The live sites' answers close the round; the next one is drawn among them again,
    # with a metric but no second warning.
    out = answer_all(agg, reqs, wake + 1.0, seq=3)
    assert agg.version == 2
    assert metrics(out, "round_closed")[0].labels == {"reason": "all_answered"}
    assert warnings(out) == [] and len(metrics(out, "round_unfillable")) == 1
    reqs = requests(out)
    for seq in range(4, 8):  # versions keep growing
        assert len(reqs) == 3
        reqs = requests(answer_all(agg, reqs, wake + seq, seq=seq))
    assert agg.version == 6
    np.testing.assert_allclose(agg.current_model()[1]["w"], 6.0)  # every step a mean of 1.0
    # s4 comes back while a short round runs: the next round is a full one again.
    agg.handle(hello("s4"), wake + 8.0)
    out = answer_all(agg, reqs, wake + 9.0, seq=8)
    assert agg.version == 7 and metrics(out, "round_unfillable") == []
    assert sorted(p for p, _ in requests(out)) == sorted(SITES)


def test_a_short_round_missing_an_answer_is_abandoned_at_its_deadline() -> None:
    agg = make()
    for s in ("s1", "s2", "s3"):
        agg.handle(hello(s), 0.0)  # s4 never comes up
    out = agg.handle(Deadline(), 10.0)
    reqs = requests(out)
    assert len(reqs) == 3 and len(warnings(out)) == 1
    # Only two of the three answer: below the round's own minimum (3), so it is abandoned
    # at the deadline and drawn again.
    answer_all(agg, reqs[:2], 11.0, seq=1)
    out = agg.handle(Deadline(), 20.0)
    assert agg.version == 0 and agg.rounds_abandoned == 1
    assert len(requests(out)) == 3  # the straggler's task is released with the round
    assert metrics(out, "round_unfillable") and len(warnings(out)) == 1  # no second spell
    assert warnings(out)[0].text == "round abandoned"


def test_enough_live_sites_for_min_cohort_are_a_degraded_round_not_an_unfillable_one() -> None:
    agg = make(min_cohort=3)
    for s in ("s1", "s2", "s3"):
        agg.handle(hello(s), 0.0)  # s4 never comes up: min_available is short, min_cohort not
    out = agg.handle(Deadline(), 10.0)
    assert len(requests(out)) == 3 and metrics(out, "round_degraded")
    assert metrics(out, "round_unfillable") == []
    reqs = requests(out)
    answer_all(agg, reqs[:2], 11.0, seq=1)
    agg.handle(Deadline(), 20.0)
    assert agg.rounds_abandoned == 1  # min_cohort (3) still holds for such rounds


def test_a_restart_ends_a_short_round_as_the_live_root_did() -> None:
    disk = Disk()
    agg = make(checkpoint_every=5)  # no round checkpointed: the records alone decide
    reqs = [r for s in SITES for r in requests(disk.take(agg.handle(hello(s), 0.0)))]
    reqs = requests(disk.take(answer_all(agg, reqs, 1.0, seq=1)))
    disk.take(agg.handle(PeerDown("s4"), 2.0))
    disk.take(answer_all(agg, [r for r in reqs if r[0] != "s4"], 3.0, seq=2))
    reqs = requests(disk.take(agg.handle(Deadline(), 13.0)))
    assert agg.round == 3 and len(reqs) == 3
    disk.take(answer_all(agg, reqs[:2], 14.0, seq=3))  # 2 of 3 answers in round 3
    reqs4 = requests(disk.take(answer_all(agg, reqs[2:], 15.0, seq=3)))
    assert agg.version == 2 and agg.round == 4
    disk.take(answer_all(agg, reqs4[:1], 16.0, seq=4))  # one answer in round 4
    again = disk.restore(make(checkpoint_every=5))
    assert (again.version, again.round) == (agg.version, agg.round)
    np.testing.assert_array_equal(again.current_model()[1]["w"], agg.current_model()[1]["w"])


def test_a_checkpointed_short_round_keeps_its_minimum_across_a_restart() -> None:
    disk = Disk()
    agg = make()
    for s in ("s1", "s2", "s3"):
        disk.take(agg.handle(hello(s), 0.0))  # s4 is dead
    reqs = requests(disk.take(agg.handle(Deadline(), 10.0)))
    assert len(reqs) == 3
    # the restart comes before any answer: only the checkpoint knows the round's minimum
    again = disk.restore(make())
    out = answer_all(again, reqs, 11.0, seq=1)
    assert again.version == 1 and metrics(out, "round_closed")
