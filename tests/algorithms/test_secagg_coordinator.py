"""SecAggCoordinator on its own: what it refuses, counts and bounds, its restarts, and a
Hypothesis property over whole protocol runs with random dropouts and bad answers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloom.algorithms.protocol import Persist, Send
from fedloom.algorithms.secagg.cohort import threshold
from fedloom.algorithms.secagg.coordinator import (
    COORDINATOR_LOG_KEY,
    MAX_JOINS_PER_SITE,
    SecAggCoordinator,
)
from fedloom.algorithms.secagg.field import flatten
from fedloom.transport import wire
from tests.algorithms.secagg_harness import AGG, Net, metric_count, random_delta

PRECISION = 2.0**-16


def setup(net: Net, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for s in net.sites:
        net.add_update(s, 1, random_delta(rng), n_examples=60)
    for s in net.sites:
        net.join(s, 1)


def sum_ok(net: Net, survivors: list[str]) -> bool:
    (result,) = net.results
    want, weight = net.expected_sum(survivors)
    return (
        [s.site for s in result.survivors] == survivors
        and bool(np.abs(flatten(result.total) - want).max() <= len(survivors) * PRECISION + 1e-6)
        and abs(result.weight_sum - weight) <= len(survivors) * PRECISION
    )


def tamper_masked(victim: str, **changes: object):  # type: ignore[no-untyped-def]
    def tap(sender: str, msg: wire.Message) -> wire.Message | None:
        if sender == victim and isinstance(msg, wire.MaskedUpdate):
            return dataclasses.replace(msg, **changes)  # type: ignore[arg-type]
        return msg

    return tap


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"data": bytes(8)}, "bad_length"),
        ({"seq": 7}, "seq_mismatch"),
        ({"base_version": 3}, "metadata_mismatch"),
        ({"n_examples": 1}, "metadata_mismatch"),
        ({"bundles": ()}, "bad_bundles"),
    ],
)
def test_a_refused_upload_leaves_its_member_dropped_and_the_rest_completes(
    change: dict[str, object], reason: str
) -> None:
    net = Net(6, seed=2)
    victim = net.sites[0]
    net.tamper = tamper_masked(victim, **change)
    setup(net)
    net.run()
    assert metric_count(net.effects[AGG], "secagg_refused", reason=reason) == 1
    assert sum_ok(net, net.sites[1:])


def test_garbage_masked_data_aborts_instead_of_applying_garbage() -> None:
    net = Net(6, seed=3)
    victim = net.sites[0]
    size = (sum(int(np.prod(s)) for s in [(12, 5), (5,)]) + 1) * 4
    garbage = np.random.default_rng(0).bytes(size)
    net.tamper = tamper_masked(victim, data=garbage)
    setup(net)
    net.run()
    assert net.results == []
    assert metric_count(net.effects[AGG], "secagg_cohort_aborted", reason="sum_out_of_range") == 1


def test_hostile_and_repeated_messages_are_counted_and_ignored() -> None:
    net = Net(4, seed=4)
    setup(net)
    co = net.coordinator
    seal = next(e.msg for _, e in net.queue if isinstance(e.msg, wire.SecAggSeal))
    assert isinstance(seal, wire.SecAggSeal)
    # Deliver the seals and keep the uploads.
    while net.queue and isinstance(net.queue[0][1].msg, wire.SecAggSeal):
        net.deliver(*net.queue.pop(0))
    uploads = [(src, e.msg) for src, e in net.queue]
    src, first = uploads[0]
    assert isinstance(first, wire.MaskedUpdate)
    assert metric_count(co.on_masked("stranger", first, 0.0), "secagg_refused") == 1  # src
    outsider = dataclasses.replace(first, src="stranger")
    out = co.on_masked("stranger", outsider, 0.0)
    assert metric_count(out, "secagg_refused", reason="not_member") == 1
    net.drain()
    assert net.results and co.open_cohorts() == []
    # Everything again after the cohort closed: late.
    assert metric_count(co.on_masked(src, first, 0.0), "secagg_late") == 1
    sig = wire.SecAggViewSig(cohort=seal.cohort, sig=bytes(64))
    assert metric_count(co.on_view_sig(src, sig, 0.0), "secagg_late") == 1
    shares = wire.SecAggShares(cohort=seal.cohort, self_shares=(), pair_shares=())
    assert metric_count(co.on_shares(src, shares, 0.0), "secagg_late") == 1


def test_duplicate_upload_and_bad_view_signature() -> None:
    net = Net(4, seed=5)
    dup_sent: list[wire.MaskedUpdate] = []

    def tap(sender: str, msg: wire.Message) -> wire.Message | None:
        if isinstance(msg, wire.MaskedUpdate) and sender == net.sites[1] and not dup_sent:
            dup_sent.append(msg)
            net.take(AGG, net.coordinator.on_masked(sender, msg, net.now))  # twice
        if isinstance(msg, wire.SecAggViewSig) and sender == net.sites[0]:
            return dataclasses.replace(msg, sig=bytes(64))
        return msg

    net.tamper = tap
    setup(net)
    net.run()
    assert metric_count(net.effects[AGG], "secagg_duplicate", kind="masked") == 1
    assert metric_count(net.effects[AGG], "secagg_refused", reason="bad_signature") == 1
    assert sum_ok(net, net.sites)  # t = 3 of the 4 signatures were valid


def test_joins_are_bounded_deduplicated_and_dropped_with_their_link() -> None:
    net = Net(4, seed=6, cohort_size=4)
    co = net.coordinator
    site = net.sites[0]
    for seq in range(1, MAX_JOINS_PER_SITE + 2):
        out = co.on_join(site, wire.SecAggJoin(src=site, seq=seq, base_version=0), 0.0)
    assert metric_count(out, "secagg_refused", reason="too_many_joins") == 1
    again = co.on_join(site, wire.SecAggJoin(src=site, seq=1, base_version=0), 0.0)
    assert metric_count(again, "secagg_duplicate", kind="join") == 1
    assert co.waiting() == MAX_JOINS_PER_SITE
    liar = co.on_join(site, wire.SecAggJoin(src=net.sites[1], seq=1, base_version=0), 0.0)
    assert metric_count(liar, "secagg_refused", reason="src_mismatch") == 1
    co.on_peer_down(site, 1.0)
    assert co.waiting() == 0 and co.next_deadline() is None


def test_a_site_that_lost_its_seal_gets_it_again_when_it_rejoins() -> None:
    net = Net(3, seed=7)
    setup(net)
    lost = net.queue.pop(0)  # the first site's seal never arrives
    assert isinstance(lost[1].msg, wire.SecAggSeal)
    site = lost[1].peer
    net.drain()
    assert net.coordinator.open_cohorts()  # waiting for the lost site's upload
    net.join(site, 1)  # it reconnects and joins again with the same update
    assert isinstance(net.queue[-1][1].msg, wire.SecAggSeal) and net.queue[-1][1].peer == site
    assert net.run() == 0.0
    assert sum_ok(net, net.sites)


def test_cohorts_in_flight_are_bounded() -> None:
    net = Net(6, seed=8, cohort_size=3, coordinator_kwargs={"max_inflight": 1})
    setup(net)
    assert len(net.coordinator.open_cohorts()) == 1
    assert net.coordinator.waiting() == 3  # the second cohort waits for the first
    net.run()
    assert [r.count for r in net.results] == [3, 3]


def test_restart_orphans_open_cohorts_and_aborts_them_as_members_come_back() -> None:
    net = Net(4, seed=9)
    setup(net)
    while net.queue and isinstance(net.queue[0][1].msg, wire.SecAggSeal):
        net.deliver(*net.queue.pop(0))
    (cid,) = net.coordinator.open_cohorts()
    log = [
        e.data for e in net.effects[AGG] if isinstance(e, Persist) and e.key == COORDINATOR_LOG_KEY
    ]
    assert net.keys is not None
    for state, records in ((net.coordinator.snapshot(), []), (None, log)):
        fresh = SecAggCoordinator(
            AGG, net.keys[AGG], cohort_size=4, min_cohort=3, rng=np.random.default_rng(1)
        )
        fresh.restore(state, records)
        assert fresh.open_cohorts() == []
        out = []
        for s in net.sites:
            out.extend(fresh.on_peer_up(s, 0.0))
        aborts = [e for e in out if isinstance(e, Send)]
        assert [(e.peer, e.msg) for e in aborts] == [
            (s, wire.SecAggAbort(cohort=cid, reason="restart")) for s in net.sites
        ]
        assert [e.data for e in out if isinstance(e, Persist)] == [{"op": "close", "cohort": cid}]
        assert fresh.snapshot() == {"open": [], "sealed": 1}  # the count survives
    # The members that uploaded hear it and drop their consumed updates.
    for s in net.sites:
        effects = net.members[s].on_abort(AGG, wire.SecAggAbort(cohort=cid, reason="restart"))
        assert metric_count(effects, "secagg_update_lost", reason="aborted") == 1
    with pytest.raises(ValueError, match="malformed"):
        fresh.restore({"open": [[1]]})


def test_configuration_is_checked() -> None:
    keys = Net(3).keys
    assert keys is not None
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="min_cohort"):
        SecAggCoordinator(AGG, keys[AGG], cohort_size=4, min_cohort=1, rng=rng)
    with pytest.raises(ValueError, match="cohort_size"):
        SecAggCoordinator(AGG, keys[AGG], cohort_size=3, min_cohort=4, rng=rng)
    with pytest.raises(ValueError, match="precision_bits"):
        SecAggCoordinator(
            AGG, keys[AGG], cohort_size=1000, min_cohort=5, precision_bits=24, rng=rng
        )
    with pytest.raises(ValueError, match="upload_timeout_s"):
        SecAggCoordinator(AGG, keys[AGG], cohort_size=5, upload_timeout_s=0.0, rng=rng)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    n=st.integers(3, 9),
    data=st.data(),
    announce=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_mix_of_dropouts_and_bad_answers_gives_the_survivors_sum_or_an_abort(
    n: int, data: st.DataObject, announce: bool, seed: int
) -> None:
    net = Net(n, seed=seed, min_cohort=2)
    t = threshold(n, 2, net.max_colluders)
    fates = data.draw(
        st.lists(st.sampled_from(["ok", "before", "after", "bad_share"]), min_size=n, max_size=n)
    )
    for site, fate in zip(net.sites, fates, strict=True):
        if fate == "before":
            net.before_upload.add(site)
        elif fate == "after":
            net.after_upload.add(site)
    bad = {s for s, f in zip(net.sites, fates, strict=True) if f == "bad_share"}

    def tap(sender: str, msg: wire.Message) -> wire.Message | None:
        if sender in bad and isinstance(msg, wire.SecAggShares) and msg.self_shares:
            owner, _ = msg.self_shares[0]
            return dataclasses.replace(msg, self_shares=((owner, b"\xff" * 66),))
        return msg

    net.tamper = tap
    net.announce = announce
    setup(net, seed)
    end = net.run()
    assert end <= 30.0 + 20.0  # one upload window and one reveal window at most
    uploaded = [s for s, f in zip(net.sites, fates, strict=True) if f != "before"]
    answering = [s for s, f in zip(net.sites, fates, strict=True) if f == "ok"]
    co = net.coordinator
    assert co.open_cohorts() == [] and co.next_deadline() is None
    if len(uploaded) >= t and len(answering) >= t:
        assert sum_ok(net, uploaded)
    else:
        assert net.results == []
        assert metric_count(net.effects[AGG], "secagg_cohort_aborted") == 1


def test_a_member_that_comes_back_gets_the_current_request_again() -> None:
    net = Net(5, seed=10)  # t = 3
    setup(net)
    while not any(isinstance(e.msg, wire.SecAggView) for _, e in net.queue):
        net.deliver(*net.queue.pop(0))
    # The views to three members are lost with their links; one of them is seen down.
    lost = {net.sites[0], net.sites[1], net.sites[2]}
    net.queue = [(src, e) for src, e in net.queue if e.peer not in lost]
    net.take(AGG, net.coordinator.on_peer_down(net.sites[0], net.now))
    net.drain()  # two signatures: not enough, and the cohort waits
    assert net.results == [] and net.coordinator.open_cohorts()
    for site in sorted(lost):
        out = net.coordinator.on_peer_up(site, net.now)
        assert [type(e.msg) for e in out if isinstance(e, Send)] == [wire.SecAggView]
        net.take(AGG, out)
    assert net.run() == 0.0  # no deadline was needed
    assert sum_ok(net, net.sites)


def test_a_member_that_comes_back_during_the_reveal_is_asked_again() -> None:
    net = Net(5, seed=11)  # t = 3
    setup(net)
    while not any(isinstance(e.msg, wire.SecAggUnmask) for _, e in net.queue):
        net.deliver(*net.queue.pop(0))
    lost = {net.sites[0], net.sites[1], net.sites[2]}
    net.queue = [(src, e) for src, e in net.queue if e.peer not in lost]
    net.drain()  # two answers of three needed
    assert net.results == []
    out = net.coordinator.on_peer_up(net.sites[1], net.now)
    assert [type(e.msg) for e in out if isinstance(e, Send)] == [wire.SecAggUnmask]
    net.take(AGG, out)
    assert net.run() == 0.0
    assert sum_ok(net, net.sites)


def replace_bundles(victim: str, size: int):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)

    def tap(sender: str, msg: wire.Message) -> wire.Message | None:
        if sender == victim and isinstance(msg, wire.MaskedUpdate):
            junk = tuple((r, rng.bytes(size or len(box))) for r, box in msg.bundles)
            return dataclasses.replace(msg, bundles=junk)
        return msg

    return tap


def test_short_bundles_are_refused_at_upload_and_the_rest_completes() -> None:
    net = Net(6, seed=12)
    net.tamper = replace_bundles(net.sites[0], 100)
    setup(net)
    net.run()
    assert metric_count(net.effects[AGG], "secagg_refused", reason="bad_bundles") == 1
    assert sum_ok(net, net.sites[1:])


def test_garbage_bundles_make_the_cohort_abort_at_once_naming_their_owner() -> None:
    net = Net(6, seed=13)
    culprit = net.sites[2]
    net.tamper = replace_bundles(culprit, 0)  # as long as honest ones, but garbage
    setup(net)
    assert net.run() == 0.0  # every member answered: no deadline needed
    assert net.results == []
    effects = net.effects[AGG]
    assert metric_count(effects, "secagg_cohort_aborted", reason="unrecoverable_bundles") == 1
    assert metric_count(effects, "secagg_unrecoverable_member", site=culprit) == 1
    # Each honest member saw the garbage when it tried to open it, and still revealed.
    for s in net.sites:
        if s != culprit:
            assert metric_count(net.effects[s], "secagg_refused", reason="bad_bundle") == 1
