"""Pre-masking at join (``SecAggMember.premask``): a finished update is encoded and
carries PRG(b_i) before its seal, so the seal adds only the pair masks. The cohort's sum
is the same; a seal with other parameters masks from scratch; b_i serves one seal at
most and is never drawn for an uploaded update; memory stays bounded."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.protocol import Send
from fedloom.algorithms.secagg import masking
from fedloom.algorithms.secagg.member import MAX_PREMASKED, EncodeParams, PendingUpdate
from fedloom.algorithms.secure_site import SiteSecAgg
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.transport import wire
from fedloom.transport.wire import Update
from tests.algorithms.secagg_harness import Net, random_delta
from tests.algorithms.test_secagg_protocol import check_result, setup


def _params(net: Net, **change: float) -> EncodeParams:
    base = {
        "clip": net.clip,
        "precision_bits": net.precision_bits,
        "weight_cap": net.weight_cap,
        "noise_sigma": 0.0,
    }
    return EncodeParams(**{**base, **change})  # type: ignore[arg-type]


def _rng_state(net: Net, site: str) -> object:
    return net.members[site]._rng.bit_generator.state


def test_seal_after_premask_adds_only_pair_masks_and_the_sum_is_right() -> None:
    net = Net(6, seed=5)
    setup(net)  # updates + joins; the seal is queued, not yet delivered
    for s in net.sites:
        assert net.members[s].premask(net.updates[s][1], _params(net))
        assert net.members[s].premasked() == [1]
    before = {s: _rng_state(net, s) for s in net.sites}
    net.run()
    check_result(net, net.sites)
    for s in net.sites:
        assert net.members[s].premasked() == []  # taken by the seal
        # No encoding at the seal: the stochastic rounding drew from the rng at join only.
        assert _rng_state(net, s) == before[s]


@settings(max_examples=15, deadline=None)
@given(
    premasked=st.sets(st.integers(0, 5)),
    other_cap=st.sets(st.integers(0, 5)),
    dropped=st.sets(st.integers(0, 5), max_size=2),
)
def test_any_mix_of_premasked_stale_and_fresh_members_sums_right(
    premasked: set[int], other_cap: set[int], dropped: set[int]
) -> None:
    net = Net(6, seed=9)
    net.before_upload.update(net.sites[k] for k in dropped)
    setup(net)
    for k in premasked:
        s = net.sites[k]
        # Pre-masked for another cap than the seal's: must be redone at the seal.
        cap = net.weight_cap + 7 if k in other_cap else net.weight_cap
        assert net.members[s].premask(net.updates[s][1], _params(net, weight_cap=cap))
    net.run()
    check_result(net, [s for k, s in enumerate(net.sites) if k not in dropped])
    for k in premasked - dropped:
        assert net.members[net.sites[k]].premasked() == []


def test_b_is_fresh_per_premask_and_never_drawn_for_an_uploaded_update() -> None:
    net = Net(4, seed=2)
    setup(net)
    site = net.sites[0]
    member, update = net.members[site], net.updates[site][1]
    assert member.premask(update, _params(net))
    first = member._premasked[1].self_seed
    assert member.premask(update, _params(net))  # same update, same params: kept as is
    assert member._premasked[1].self_seed == first
    assert member.premask(update, _params(net, weight_cap=3))  # other params: redrawn
    assert member._premasked[1].self_seed != first
    net.run()
    check_result(net, net.sites)
    assert member.consumed(1)
    assert not member.premask(update, _params(net))  # uploaded: nothing is drawn again
    assert member.premasked() == []


def test_a_premasked_vector_is_only_used_for_the_same_arrays() -> None:
    net = Net(4, seed=4)
    setup(net)
    site = net.sites[1]
    up = net.updates[site][1]
    copy = PendingUpdate(up.seq, up.base_version, {k: v.copy() for k, v in up.delta.items()}, 50)
    net.members[site].premask(copy, _params(net))  # other arrays, other count
    before = _rng_state(net, site)
    net.run()
    check_result(net, net.sites)
    assert _rng_state(net, site) != before  # encoded afresh at the seal
    assert net.members[site].premasked() == []


def test_premasked_vectors_are_bounded() -> None:
    net = Net(3, seed=1)
    member = net.members[net.sites[0]]
    rng = np.random.default_rng(0)
    for seq in range(1, MAX_PREMASKED + 4):
        assert member.premask(PendingUpdate(seq, 0, random_delta(rng), 10), _params(net))
    assert member.premasked() == list(range(4, MAX_PREMASKED + 4))
    member.forget_premasked(lambda q: q % 2 == 0)
    assert all(q % 2 == 0 for q in member.premasked())


def test_add_pair_masks_is_the_second_half_of_mask() -> None:
    rng = np.random.default_rng(3)
    v = rng.integers(0, 2**32, 1000, dtype=np.uint32)
    b, pairs = rng.bytes(32), {"a": rng.bytes(32), "z": rng.bytes(32)}
    np.testing.assert_array_equal(
        masking.add_pair_masks(masking.mask(v, b, {}, "m"), pairs, "m"),
        masking.mask(v, b, pairs, "m"),
    )


def test_site_premasks_on_join_after_a_first_seal_and_forgets_on_ack() -> None:
    keys = derived_secagg_keys(["s1", "agg"], 0)
    site = SiteSecAgg("s1", keys["s1"], rng=np.random.default_rng(0), min_cohort=3)
    delta = random_delta(np.random.default_rng(1))
    update = Update(src="s1", seq=1, base_version=0, delta=delta, n_examples=5)
    out = site.uplink([Send("agg", update)])
    assert isinstance(out[0], Send) and isinstance(out[0].msg, wire.SecAggJoin)
    assert site.member.premasked() == []  # no seal seen yet: nothing to expect
    seal = wire.SecAggSeal(
        cohort=bytes(16),
        members=("s1", "x2", "x3"),
        seqs=(9, 1, 1),
        threshold=3,
        clip=1.0,
        precision_bits=16,
        weight_cap=1,
        deadline_s=30.0,
    )
    site.on_message("agg", seal, [update], 0.0)  # not sealed for seq 1: no upload
    site.touch(2.0)
    site.uplink([Send("agg", update)])
    assert site.member.premasked() == []  # not while the join is being sent
    assert site.next_deadline() == 2.0  # asks for a step right after this one
    assert site.expired(2.0) == ([], [])
    assert site.member.premasked() == [1]
    assert site.next_deadline() is None
    assert site.member._premasked[1].params == EncodeParams.of(seal)
    site.acked(1)
    assert site.member.premasked() == []
