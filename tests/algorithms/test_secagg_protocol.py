"""The cohort protocol end to end, by hand: sums with dropouts and mixed versions, aborts
in bounded time, malformed and wrong shares, keys missing from the roster, restarts."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.algorithms.protocol import Metric, Send
from fedloom.algorithms.secagg.field import flatten
from fedloom.algorithms.secagg.keys import SecAggKeys
from fedloom.federation.secagg_keys import derived_signing_key
from fedloom.transport import wire
from fedloom.transport.secagg_keys import RosterSecAggKeys
from tests.algorithms.secagg_harness import AGG, Net, metric_count, random_delta, site_ids

PRECISION = 2.0**-16


def setup(net: Net, seed: int = 1, **kw: int) -> None:
    rng = np.random.default_rng(seed)
    for k, s in enumerate(net.sites):
        net.add_update(s, 1, random_delta(rng), n_examples=20 + 7 * k, **kw)
    for s in net.sites:
        net.join(s, 1)


def check_result(net: Net, survivors: list[str]) -> None:
    assert len(net.results) == 1
    result = net.results[0]
    assert [s.site for s in result.survivors] == survivors
    assert result.pairs == tuple((s, 1) for s in survivors)
    want, weight = net.expected_sum(survivors)
    got = flatten(result.total)
    # Stochastic rounding: each member's coordinate is off by less than 2^-f.
    assert np.abs(got - want).max() <= len(survivors) * PRECISION + 1e-6
    assert abs(result.weight_sum - weight) <= len(survivors) * PRECISION


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("phase", ["before_upload", "after_upload"])
@pytest.mark.parametrize("announce", [False, True])
def test_sum_is_the_survivors_sum_with_dropouts(
    fraction: float, phase: str, announce: bool
) -> None:
    net = Net(10, seed=3)
    dropped = net.sites[: round(fraction * 10)]
    getattr(net, phase).update(dropped)
    net.announce = announce
    setup(net)
    end = net.run()
    survivors = net.sites if phase == "after_upload" else net.sites[len(dropped) :]
    check_result(net, survivors)
    # Bounded time: one upload window and one reveal window at most.
    assert end <= 30.0 + 20.0
    if announce or not dropped:
        assert end == 0.0  # nobody waited for a deadline
    # Sites dropped after their upload are in the sum: their masks were all stripped by
    # the survivors' shares (their b_i came from the others).
    effects = net.all_effects()
    assert metric_count(effects, "secagg_cohort_completed") == 1
    assert metric_count(effects, "secagg_cohort_aborted") == 0


def test_larger_cohort_with_drops_in_both_phases_completes_from_exactly_t_answers() -> None:
    # 20 members (t = 11): 6 never upload, 3 upload and vanish; 11 answer the reveal.
    net = Net(20, seed=5, min_cohort=5)
    net.before_upload.update(net.sites[:6])
    net.after_upload.update(net.sites[6:9])
    setup(net)
    net.run()
    check_result(net, net.sites[6:])


def test_mixed_base_versions_in_one_cohort() -> None:
    net = Net(6, seed=7)
    rng = np.random.default_rng(2)
    for k, s in enumerate(net.sites):
        net.add_update(s, 1, random_delta(rng), base_version=k % 3, n_examples=40)
    for s in net.sites:
        net.join(s, 1)
    net.run()
    check_result(net, net.sites)
    assert [s.base_version for s in net.results[0].survivors] == [0, 1, 2, 0, 1, 2]
    assert net.results[0].n_examples == 6 * 40


def test_uniform_weighting_sums_unweighted_deltas() -> None:
    net = Net(5, seed=8, weighting="uniform")
    setup(net)
    net.run()
    check_result(net, net.sites)
    assert net.results[0].weight_sum == pytest.approx(5.0)


@pytest.mark.parametrize("phase", ["before_upload", "after_upload"])
def test_too_few_survivors_abort_within_bounded_time(phase: str) -> None:
    net = Net(10, seed=9)  # t = 6
    getattr(net, phase).update(net.sites[:5])
    setup(net)
    end = net.run()
    assert net.results == []
    effects = net.effects[AGG]
    reason = "too_few_uploads" if phase == "before_upload" else "too_few_signatures"
    assert metric_count(effects, "secagg_cohort_aborted", reason=reason) == 1
    assert end <= 30.0 + 20.0
    assert net.coordinator.open_cohorts() == [] and net.coordinator.next_deadline() is None
    # Members that uploaded hear of the abort and drop their (consumed) update.
    for s in net.sites[5:]:
        outcomes = [o.kind for o in net.members[s].take_outcomes()]
        assert outcomes == ["uploaded", "lost"]
    if phase == "before_upload":
        for s in net.sites[:5]:
            assert net.members[s].take_outcomes() == []  # never sealed: they join again


def test_too_few_survivors_announced_aborts_at_once() -> None:
    net = Net(10, seed=9)
    net.after_upload.update(net.sites[:5])
    net.announce = True
    setup(net)
    assert net.run() == 0.0
    assert metric_count(net.effects[AGG], "secagg_cohort_aborted") == 1


def corrupt_first_share(sender: str, victim: str, msg: wire.Message, value: bytes) -> wire.Message:
    if sender != victim or not isinstance(msg, wire.SecAggShares):
        return msg
    owner, _ = msg.self_shares[0]
    return wire.SecAggShares(
        cohort=msg.cohort,
        self_shares=((owner, value), *msg.self_shares[1:]),
        pair_shares=msg.pair_shares,
    )


def test_malformed_share_from_one_member_is_refused_and_the_flush_completes() -> None:
    net = Net(10, seed=11)
    victim = net.sites[0]
    bad = b"\xff" * 66  # 66 bytes, but not a field element (y >= 2^521 - 1)
    net.tamper = lambda sender, msg: corrupt_first_share(sender, victim, msg, bad)
    setup(net)
    net.run()
    check_result(net, net.sites)
    assert metric_count(net.effects[AGG], "secagg_refused", reason="bad_share") == 1


def test_wrong_but_well_formed_share_is_found_and_excluded() -> None:
    net = Net(10, seed=12)  # t = 6: 10 answers correct up to 2 wrong shares
    victim = net.sites[0]
    # A valid field element that is not the victim's share: shifts the secret.
    wrong = (1).to_bytes(66, "big")
    net.tamper = lambda sender, msg: corrupt_first_share(sender, victim, msg, wrong)
    setup(net)
    net.run()
    check_result(net, net.sites)
    assert metric_count(net.effects[AGG], "secagg_refused", reason="wrong_share") == 1


def test_every_answer_malformed_aborts() -> None:
    net = Net(6, seed=13)
    net.tamper = lambda sender, msg: corrupt_first_share(sender, sender, msg, b"\xff" * 66)
    setup(net)
    net.run()
    assert net.results == []
    assert metric_count(net.effects[AGG], "secagg_cohort_aborted", reason="too_few_shares") == 1


def roster_without(node: str, missing: str, nodes: list[str], seed: int) -> RosterSecAggKeys:
    table = {m: bytes(derived_signing_key(m, seed).verify_key) for m in nodes if m != missing}
    return RosterSecAggKeys(node, derived_signing_key(node, seed), table)


def test_member_whose_roster_lacks_a_peer_refuses_and_the_cohort_completes_without_it() -> None:
    sites = site_ids(8)
    nodes = [*sites, AGG]
    net = Net(8, seed=21)
    assert net.keys is not None
    net.keys[sites[0]] = roster_without(sites[0], sites[5], nodes, seed=21)
    net = Net(8, seed=21, keys=net.keys)
    setup(net)
    net.run()
    refusals = [
        e for e in net.effects[sites[0]] if isinstance(e, Metric) and e.name == "secagg_refused"
    ]
    assert [e.labels for e in refusals] == [{"reason": "unknown_key"}]
    check_result(net, sites[1:])
    # The view (it is in D) tells it the cohort went on without it: its update joins again.
    outcomes = net.members[sites[0]].take_outcomes()
    assert [(o.kind, o.seq) for o in outcomes] == [("refused", 1), ("rejoin", 1)]
    assert metric_count(net.effects[sites[0]], "secagg_ignored") == 1


def test_site_unknown_to_everyone_makes_the_cohort_abort() -> None:
    sites = site_ids(4)
    nodes = [*sites, AGG]
    keys: dict[str, SecAggKeys] = {
        n: roster_without(n, sites[3], nodes, seed=4) for n in nodes if n != sites[3]
    }
    keys[sites[3]] = RosterSecAggKeys(
        sites[3],
        derived_signing_key(sites[3], 4),
        {m: bytes(derived_signing_key(m, 4).verify_key) for m in nodes},
    )
    net = Net(4, seed=4, keys=keys)  # t = 3; three members refuse the seal
    setup(net)
    net.run()
    assert net.results == []
    assert metric_count(net.all_effects(), "secagg_refused", reason="unknown_key") == 3
    assert metric_count(net.effects[AGG], "secagg_cohort_aborted", reason="too_few_uploads") == 1


def test_two_cohorts_in_a_row_and_the_formation_deadline() -> None:
    net = Net(7, seed=15, cohort_size=4)  # t(4) = 3
    setup(net)
    # Four joined first: sealed at once; three wait for form_wait_s, then seal as a
    # cohort of three (t = max(3, 2) = 3).
    end = net.run()
    assert [r.count for r in net.results] == [4, 3]
    assert end == pytest.approx(5.0)
    for r in net.results:
        want, _ = net.expected_sum(s.site for s in r.survivors)
        assert np.abs(flatten(r.total) - want).max() <= r.count * PRECISION + 1e-6


def test_member_restart_keeps_its_records_and_its_signed_view() -> None:
    net = Net(5, seed=16)
    setup(net)
    # Deliver the seals and uploads, then the views; stop before the unmask.
    while net.queue and not isinstance(net.queue[0][1].msg, wire.SecAggUnmask):
        net.deliver(*net.queue.pop(0))
    site = net.sites[2]
    view_sent = next(
        e.msg
        for e in net.effects[AGG]
        if isinstance(e, Send) and isinstance(e.msg, wire.SecAggView) and e.peer == site
    )
    restarted = type(net.members[site])(site, net.members[site]._keys, np.random.default_rng(0))
    restarted.restore(None, [r for r in net.logs[site] if isinstance(r, dict)])
    assert restarted.cohorts() == net.members[site].cohorts()
    other = wire.SecAggView(
        cohort=view_sent.cohort,
        survivors=view_sent.survivors[1:],
        dropped=(view_sent.survivors[0],),
    )
    out = restarted.on_view(AGG, other)
    assert metric_count(out, "secagg_refused", reason="second_view") == 1
    assert not any(isinstance(e, Send) for e in out)
    # Snapshot round trip too.
    again = type(restarted)(site, restarted._keys, np.random.default_rng(0))
    again.restore(restarted.snapshot())
    assert metric_count(again.on_view(AGG, other), "secagg_refused", reason="second_view") == 1
    net.members[site] = again
    net.run()
    check_result(net, net.sites)
