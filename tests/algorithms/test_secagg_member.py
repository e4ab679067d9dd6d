"""SecAggMember on its own: what it records before it speaks, what it refuses, noise,
repeats, bounded records and restarts."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
import pytest

from fedloom.algorithms.protocol import Effect, Metric, Persist, Send
from fedloom.algorithms.secagg.field import flatten
from fedloom.algorithms.secagg.member import MEMBER_LOG_KEY, PendingUpdate, SecAggMember
from fedloom.transport import wire
from tests.algorithms.secagg_harness import AGG, Net, metric_count, random_delta


def setup(net: Net, seq: int = 1, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for s in net.sites:
        net.add_update(s, seq, random_delta(rng), n_examples=60)
    for s in net.sites:
        net.join(s, seq)


def kinds(effects: list[Effect]) -> list[str]:
    out = []
    for e in effects:
        if isinstance(e, Send):
            out.append(type(e.msg).__name__)
        elif isinstance(e, Persist):
            out.append(f"Persist:{e.data['op']}")
    return out


def test_each_record_is_persisted_before_the_message_that_depends_on_it() -> None:
    net = Net(4, seed=1)
    setup(net)
    net.run()
    assert net.results
    site = net.effects[net.sites[1]]
    assert kinds(site) == [
        "Persist:upload",
        "MaskedUpdate",
        "Persist:sign",
        "SecAggViewSig",
        "SecAggShares",  # the view was recorded when it was signed: nothing new to record
    ]
    assert all(e.key == MEMBER_LOG_KEY for e in site if isinstance(e, Persist))


def test_a_repeated_view_gets_the_same_signature_and_no_new_record() -> None:
    net = Net(4, seed=2)
    setup(net)
    while not any(isinstance(e.msg, wire.SecAggView) for _, e in net.queue):
        net.deliver(*net.queue.pop(0))
    site = net.sites[0]
    view = next(e.msg for _, e in net.queue if e.peer == site)
    assert isinstance(view, wire.SecAggView)
    member = net.members[site]
    first, again = member.on_view(AGG, view), member.on_view(AGG, view)
    assert kinds(first) == ["Persist:sign", "SecAggViewSig"]
    assert kinds(again) == ["SecAggViewSig"]
    assert metric_count(again, "secagg_duplicate", kind="view") == 1
    sigs = [e.msg for e in (*first, *again) if isinstance(e, Send)]
    assert sigs[0] == sigs[1]


def seal_for(members: tuple[str, ...], **changes: object) -> wire.SecAggSeal:
    seal = wire.SecAggSeal(
        cohort=bytes(range(16)),
        members=members,
        seqs=tuple(1 for _ in members),
        threshold=len(members) // 2 + 1,
        clip=1.0,
        precision_bits=16,
        weight_cap=100,
        deadline_s=30.0,
    )
    return dataclasses.replace(seal, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"seqs": (1, 1)}, "seal_shape"),
        ({"seqs": (2, 1, 1, 1)}, "seq_mismatch"),
        ({"threshold": 5}, "threshold"),
        ({"threshold": 2}, "threshold"),
        ({"precision_bits": 30}, "capacity"),
        ({"clip": 1e9}, "capacity"),
        ({"precision_bits": 0}, "capacity"),
        ({"weight_cap": 0}, "capacity"),
        ({"noise_sigma": 1.0}, "no_noise"),
        ({"noise_sigma": float(2**40)}, "capacity"),
    ],
)
def test_seal_refusals(changes: dict[str, object], reason: str) -> None:
    net = Net(4, seed=3)
    site = net.sites[0]
    member = net.members[site]
    update = PendingUpdate(1, 0, random_delta(np.random.default_rng(0)), 10)
    out = member.on_seal(AGG, seal_for(tuple(net.sites), **changes), update, "examples")
    assert [e.labels for e in out if isinstance(e, Metric)] == [{"reason": reason}]
    assert not any(isinstance(e, Send | Persist) for e in out)
    assert [o.kind for o in member.take_outcomes()] == ["refused"]
    assert not member.consumed(1)


def test_a_cohort_of_one_is_refused() -> None:
    net = Net(3, seed=3)
    site = net.sites[0]
    update = PendingUpdate(1, 0, random_delta(np.random.default_rng(0)), 10)
    out = net.members[site].on_seal(AGG, seal_for((site,), threshold=1), update, "uniform")
    assert metric_count(out, "secagg_refused", reason="cohort_size") == 1


def test_a_member_may_insist_on_noise() -> None:
    net = Net(3, seed=4)
    site = net.sites[0]
    strict = SecAggMember(
        site,
        net.members[site]._keys,
        np.random.default_rng(0),
        min_noise_sigma=2.0,
        max_colluders=0,
    )
    update = PendingUpdate(1, 0, random_delta(np.random.default_rng(0)), 10)
    out = strict.on_seal(AGG, seal_for(tuple(net.sites), noise_sigma=1.0), update, "uniform")
    assert metric_count(out, "secagg_refused", reason="noise_too_low") == 1


def test_noise_is_added_to_every_coordinate_but_the_weight() -> None:
    def noise(sigma: float, n: int) -> npt.NDArray[np.int64]:
        assert sigma == 3.0
        return np.full(n, 5, dtype=np.int64)  # a known "noise" to check where it lands

    net = Net(
        4, seed=5, weighting="uniform", noise_fn=noise, coordinator_kwargs={"noise_sigma": 3.0}
    )
    setup(net)
    net.run()
    (result,) = net.results
    want, weight = net.expected_sum(net.sites)
    got = flatten(result.total)
    noise_sum = 4 * 5 * 2.0**-16
    assert np.abs(got - want - noise_sum).max() <= 4 * 2.0**-16 + 1e-6
    assert result.weight_sum == pytest.approx(weight)


def test_messages_for_unknown_cohorts_or_from_another_aggregator_are_refused() -> None:
    net = Net(4, seed=6)
    setup(net)
    net.run()
    member = net.members[net.sites[0]]
    (cid,) = member.cohorts()
    view = wire.SecAggView(cohort=bytes(16), survivors=tuple(net.sites), dropped=())
    assert metric_count(member.on_view(AGG, view), "secagg_refused", reason="unknown_cohort") == 1
    mine = dataclasses.replace(view, cohort=cid)
    out = member.on_view("other-agg", mine)
    assert metric_count(out, "secagg_refused", reason="wrong_aggregator") == 1
    abort = wire.SecAggAbort(cohort=cid, reason="x")
    assert metric_count(member.on_abort("other-agg", abort), "secagg_refused") == 1


def test_an_abort_after_upload_loses_the_update_once() -> None:
    net = Net(4, seed=7)
    setup(net)
    while any(isinstance(e.msg, wire.SecAggSeal) for _, e in net.queue):
        net.deliver(*net.queue.pop(0))
    member = net.members[net.sites[0]]
    (cid,) = member.cohorts()
    abort = wire.SecAggAbort(cohort=cid, reason="timeout")
    first, again = member.on_abort(AGG, abort), member.on_abort(AGG, abort)
    assert kinds(first) == ["Persist:lost"]
    assert metric_count(first, "secagg_update_lost", reason="aborted") == 1
    assert metric_count(again, "secagg_duplicate", kind="abort") == 1
    assert [o.kind for o in member.take_outcomes()] == ["uploaded", "lost"]
    assert member.consumed(1)


def test_records_are_bounded_and_a_forgotten_cohort_is_unknown() -> None:
    net = Net(3, seed=8)
    for s in net.sites:
        net.members[s].max_records = 2
    for seq in (1, 2, 3):
        setup(net, seq=seq, seed=seq)
        net.run()
    assert len(net.results) == 3
    member = net.members[net.sites[0]]
    first = net.results[0].cohort
    assert len(member.cohorts()) == 2 and first not in member.cohorts()
    view = wire.SecAggView(cohort=first, survivors=tuple(net.sites), dropped=())
    assert metric_count(member.on_view(AGG, view), "secagg_refused", reason="unknown_cohort") == 1
    # The same bound holds through a restart from the snapshot.
    again = SecAggMember(net.sites[0], member._keys, np.random.default_rng(0), max_records=2)
    again.restore(member.snapshot())
    assert again.cohorts() == member.cohorts()


def test_bad_state_and_bad_configuration_are_value_errors() -> None:
    net = Net(3, seed=9)
    member = net.members[net.sites[0]]
    for bad in ({"records": [{"cohort": b"x"}]}, {"records": 5}):
        with pytest.raises(ValueError, match="malformed"):
            member.restore(bad)
    with pytest.raises(ValueError, match="malformed"):
        member.restore(None, [{"op": "sign"}])
    with pytest.raises(ValueError, match="min_cohort"):
        SecAggMember("s", member._keys, np.random.default_rng(0), min_cohort=1)
