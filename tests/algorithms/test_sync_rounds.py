import numpy as np
import pytest

from fedloom.algorithms.protocol import Deadline, Effect, ModelHolder, Node, PeerDown
from fedloom.algorithms.sync import RoundState, SyncAggregator
from fedloom.transport.wire import TrainRequest
from tests.algorithms.alg_helpers import acks, hello, metrics, model, persists, recv, requests, upd

SITES = {f"s{i}": "site" for i in range(1, 9)}


def make(**kw: object) -> SyncAggregator:
    args: dict[str, object] = {"clients_per_round": 2, "round_timeout_s": 10.0, "clip_norm": None}
    args.update(kw)
    return SyncAggregator("root", SITES, model(0.0), **args)  # type: ignore[arg-type]


def start(agg: SyncAggregator, now: float = 0.0) -> list[tuple[str, TrainRequest]]:
    reqs = []
    for s in SITES:
        reqs += requests(agg.handle(hello(s), now))
    return reqs


def answer(
    agg: SyncAggregator, peer: str, req: TrainRequest, value: float, n: int = 10, seq: int = 1
) -> list[Effect]:
    return agg.handle(
        recv(peer, upd(peer, seq, base=req.version, value=value, n=n, task=req.task)), 1.0
    )


def test_protocols() -> None:
    assert isinstance(make(), Node) and isinstance(make(), ModelHolder)


def test_waits_for_min_available_then_over_selects() -> None:
    agg = make(clients_per_round=3, over_selection=1.3, min_available=3)
    reqs = requests(agg.handle(hello("s1"), 0.0)) + requests(agg.handle(hello("s2"), 0.0))
    assert reqs == [] and agg.state == RoundState.WAITING
    reqs = requests(agg.handle(hello("s3"), 0.0))
    assert len(reqs) == 3 and str(agg.state.value) == RoundState.COLLECTING.value  # only 3 idle up
    agg2 = make(clients_per_round=3, over_selection=1.3, min_available=len(SITES))
    assert len(start(agg2)) == 4  # ceil(1.3 * 3) once all sites are up
    assert agg2.next_deadline() == 10.0


def test_round_closes_on_k_fastest_with_fedavg_weights() -> None:
    agg = make(clients_per_round=2, over_selection=1.5, min_available=len(SITES))
    reqs = start(agg)
    assert len(reqs) == 3
    (p1, r1), (p2, r2), (p3, r3) = reqs
    answer(agg, p1, r1, value=1.0, n=30)
    out = answer(agg, p2, r2, value=5.0, n=10)
    assert agg.version == 1 and agg.rounds_closed == 1
    assert metrics(out, "round_closed")[0].labels == {"reason": "quorum"}
    np.testing.assert_allclose(agg.current_model()[1]["w"], 2.0)  # (30*1 + 10*5) / 40
    assert len(requests(out)) == 3  # next round, all sites idle again
    out = answer(agg, p3, r3, value=100.0)  # the straggler of round 1
    assert metrics(out, "update_late") and acks(out) == [(p3, p3, 1)]
    assert [p.data["outcome"] for p in persists(out)] == ["late"]
    np.testing.assert_allclose(agg.current_model()[1]["w"], 2.0)


def test_deadline_with_min_cohort_aggregates() -> None:
    agg = make(clients_per_round=3, min_cohort=1)
    reqs = start(agg)
    p1, r1 = reqs[0]
    answer(agg, p1, r1, value=3.0)
    out = agg.handle(Deadline(), 10.0)
    assert agg.version == 1 and metrics(out, "round_closed")[0].labels == {"reason": "deadline"}
    np.testing.assert_allclose(agg.current_model()[1]["b"], 3.0)
    assert len(requests(out)) == 3 and agg.next_deadline() == 20.0


def test_deadline_below_min_cohort_abandons_and_restarts() -> None:
    agg = make(clients_per_round=3, min_cohort=2)
    reqs = start(agg)
    p1, r1 = reqs[0]
    answer(agg, p1, r1, value=3.0)
    assert agg.handle(Deadline(), 9.0) == []  # not yet
    out = agg.handle(Deadline(), 10.0)
    assert agg.version == 0 and agg.rounds_abandoned == 1
    assert metrics(out, "round_abandoned") and metrics(out, "update_discarded")
    new = requests(out)
    assert len(new) == 3 and agg.round == 2
    # an answer to the abandoned round is late even though the version did not move
    p2, r2 = reqs[1]
    out = answer(agg, p2, r2, value=1.0)
    assert metrics(out, "update_late") and agg.version == 0


def test_wrong_base_version_is_late() -> None:
    agg = make()
    (p1, r1), _ = start(agg)
    out = agg.handle(recv(p1, upd(p1, 1, base=0, task=r1.task)), 1.0)
    assert metrics(out, "update_applied")
    agg2 = make()
    (q1, s1), _ = start(agg2)
    out = agg2.handle(recv(q1, upd(q1, 1, base=0, task=s1.task + 100)), 1.0)
    assert metrics(out, "update_late")


def test_down_site_does_not_block_the_round() -> None:
    agg = make(clients_per_round=2, over_selection=1.5, min_cohort=2, min_available=8)
    (p1, _r1), (p2, r2), (p3, r3) = start(agg)
    agg.handle(PeerDown(p1), 0.5)
    answer(agg, p2, r2, value=1.0)
    answer(agg, p3, r3, value=1.0)
    assert agg.version == 1


def test_fedprox_mu_travels_in_the_config_and_duplicates_are_reacked() -> None:
    agg = make(train_config={"mu": 1.0, "lr": 0.05})
    (p1, r1), _ = start(agg)
    assert dict(r1.config) == {"mu": 1.0, "lr": 0.05}
    answer(agg, p1, r1, value=1.0)
    out = answer(agg, p1, r1, value=1.0)
    assert metrics(out, "update_duplicate") and acks(out)


def test_every_round_checkpoints_by_default() -> None:
    agg = make()
    (p1, r1), (p2, r2) = start(agg)
    answer(agg, p1, r1, 1.0)
    out = answer(agg, p2, r2, 1.0)
    [cp] = persists(out, "checkpoint")  # the start of round 2, before its tasks leave
    first_request = next(i for i, e in enumerate(out) if requests([e]))
    assert out.index(cp) < first_request
    fresh = make()
    fresh.restore(cp.data)
    assert fresh.version == 1 and fresh.round == 2 and fresh.state is RoundState.COLLECTING
    np.testing.assert_array_equal(fresh.current_model()[1]["w"], agg.current_model()[1]["w"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make(clients_per_round=0)
    with pytest.raises(ValueError):
        make(over_selection=0.5)
    with pytest.raises(ValueError):
        make(min_cohort=5)


def test_region_children_are_refused() -> None:
    with pytest.raises(ValueError, match="site children"):
        SyncAggregator("root", {"r1": "region"}, model(), clients_per_round=1)
