"""The secure-aggregation review's attacks (issue 12), each through the real code.

* per-member seals: the aggregator alone sends every member but the victim a seal whose
  weight_cap, clip, precision_bits, noise, threshold or member list makes its contribution
  vanish; the seal's digest in the pair seeds makes the masks fail to cancel (abort), and
  views signed under different seals never combine;
* the aggregator's own identity (or any non-site) sealed as a member is refused;
* view splitting with one colluding member: a bare-majority threshold (c = 0) lets the
  aggregator and ONE colluder split the honest members into two views and unmask a
  victim (the control, documented); with max_colluders = 1 the members refuse such a seal,
  and with the seal's proper threshold two views cannot both gather t signatures;
* poisoning through the sum: a member that shrinks Σw or inflates the norm is caught
  (``weight_mismatch``, ``norm_out_of_range``); honest cohorts always pass (Hypothesis);
* a wrong share among the first t answers is named and dropped, the cohort completes;
  a garbage upload aborts and every survivor is counted in ``secagg_site_in_aborted_cohort``;
* a member refuses a seal bigger than its ``max_cohort`` before any cryptography; a
  coordinator keeps at most ``MAX_ORPHANS`` orphans across restarts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.dp.discrete_gaussian import sample as discrete_gaussian
from fedloom.algorithms.protocol import Effect, Metric, Send
from fedloom.algorithms.secagg.bundle import unpack_bundle
from fedloom.algorithms.secagg.cohort import (
    member_pair_context,
    seal_digest,
    threshold,
    view_message,
)
from fedloom.algorithms.secagg.coordinator import MAX_ORPHANS, SecAggCoordinator
from fedloom.algorithms.secagg.field import (
    FieldSpec,
    NormOutOfRangeError,
    WeightMismatchError,
    capacity_bound,
    check_cohort_sum,
    encode,
    flatten,
    member_weight,
)
from fedloom.algorithms.secagg.masking import pair_sign
from fedloom.algorithms.secagg.member import PendingUpdate, SecAggMember
from fedloom.algorithms.secagg.prg import expand
from fedloom.algorithms.secagg.shamir import ShareError, reconstruct
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.transport import wire
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.secagg_keys import RosterSecAggKeys
from tests.algorithms.secagg_harness import AGG, Net, metric_count, random_delta, roundtrip


def aborts(net: Net) -> dict[str, float]:
    out: dict[str, float] = {}
    for e in net.effects[AGG]:
        if isinstance(e, Metric) and e.name == "secagg_cohort_aborted":
            reason = (e.labels or {})["reason"]
            out[reason] = out.get(reason, 0.0) + e.value
    return out


def sent(effects: list[Effect], kind: type) -> list[Any]:
    return [e.msg for e in effects if isinstance(e, Send) and isinstance(e.msg, kind)]


# ------------------------------------------------------------ 1. per-member seals


def zero_noise(sigma: float, n: int) -> npt.NDArray[np.int64]:
    return np.zeros(n, dtype=np.int64)


@pytest.mark.parametrize(
    "knob",
    ["weight_cap", "clip", "precision_bits", "noise_sigma", "threshold", "members"],
)
def test_a_seal_of_its_own_for_each_member_never_isolates_the_victim(knob: str) -> None:
    """per_member_seal.py: 7 members, min_cohort 5; the six non-victims get a doctored
    seal. Before the fix the cohort completed and its sum WAS the victim's update."""
    net = Net(n=7, min_cohort=5, max_colluders=1, noise_fn=zero_noise)
    rng = np.random.default_rng(9)
    for s in net.sites:
        net.add_update(s, 1, random_delta(rng))
        net.join(s, 1)
    victim = net.sites[3]
    changed = 0
    for k, (sender, send) in enumerate(net.queue):
        msg = send.msg
        if not isinstance(msg, wire.SecAggSeal) or send.peer == victim:
            continue
        evil: dict[str, Any] = {
            "weight_cap": {"weight_cap": 2**40},
            "clip": {"clip": 1e-12},
            "precision_bits": {"precision_bits": 1},
            "noise_sigma": {"noise_sigma": 1.0},
            "threshold": {"threshold": 7},
            "members": {"members": msg.members[::-1], "seqs": msg.seqs[::-1]},
        }[knob]
        net.queue[k] = (sender, dataclasses.replace(send, msg=dataclasses.replace(msg, **evil)))
        changed += 1
    assert changed == 6
    net.run()
    assert net.results == []  # nothing is ever applied
    # Every member uploaded (each seal was acceptable on its own), but the six signed
    # the view under their seal's digest: only the victim's signature verifies under the
    # aggregator's, and the cohort cannot even reach its reveal.
    assert metric_count(net.all_effects(), "secagg_uploaded") == 7
    # (it aborts once 3 bad signatures leave fewer than t = 5 possible).
    assert metric_count(net.effects[AGG], "secagg_refused", reason="bad_signature") >= 3
    assert aborts(net) == {"too_few_signatures": 1.0}


def test_view_signatures_are_bound_to_the_seal_each_member_accepted() -> None:
    """Two members holding different seals of one cohort sign the same (U, D): neither
    signature verifies under the other's seal, so split seals never pool signatures."""
    sites = ["s1", "s2", "s3"]
    keys = derived_secagg_keys([*sites, AGG], seed=1)
    rng = np.random.default_rng(0)
    base = wire.SecAggSeal(
        cohort=b"\x05" * 16,
        members=tuple(sites),
        seqs=(1, 1, 1),
        threshold=3,
        clip=1.0,
        precision_bits=16,
        weight_cap=10,
        deadline_s=30.0,
    )
    seals = {"s1": base, "s2": dataclasses.replace(base, weight_cap=11)}
    sigs: dict[str, bytes] = {}
    for site, seal in seals.items():
        m = SecAggMember(site, keys[site], rng, min_cohort=2, max_colluders=0)
        assert sent(
            m.on_seal(AGG, seal, PendingUpdate(1, 0, random_delta(rng), 5), "examples"), object
        )
        out = m.on_view(AGG, wire.SecAggView(base.cohort, tuple(sites), ()))
        (sig,) = sent(out, wire.SecAggViewSig)
        sigs[site] = sig.sig
    digests = {site: seal_digest(AGG, seal) for site, seal in seals.items()}
    assert digests["s1"] != digests["s2"]
    for site, sig in sigs.items():
        for under, d in digests.items():
            vm = view_message(AGG, base.cohort, sites, [], d)
            assert keys[AGG].verify(site, vm, sig) is (site == under)


# ------------------------------------------------------- 2. who may be a member


def seal_naming(members: Sequence[str], t: int) -> wire.SecAggSeal:
    return wire.SecAggSeal(
        cohort=b"\x07" * 16,
        members=tuple(members),
        seqs=tuple(1 for _ in members),
        threshold=t,
        clip=1.0,
        precision_bits=16,
        weight_cap=1,
        deadline_s=30.0,
    )


def test_a_seal_naming_its_sender_or_a_non_site_is_refused() -> None:
    sites = [f"h{i}" for i in range(6)]
    roles = {**dict.fromkeys(sites, "site"), AGG: "region", "root": "root"}
    keys = derived_secagg_keys([*sites, AGG, "root"], seed=2, roles=roles)
    member = SecAggMember(sites[0], keys[sites[0]], np.random.default_rng(0), min_cohort=3)
    update = PendingUpdate(1, 0, random_delta(np.random.default_rng(1)), 5)
    out = member.on_seal(AGG, seal_naming([*sites, AGG], 5), update, "examples")
    assert metric_count(out, "secagg_refused", reason="aggregator_member") == 1
    out = member.on_seal(AGG, seal_naming([*sites, "root"], 5), update, "examples")
    assert metric_count(out, "secagg_refused", reason="member_role") == 1
    assert not member.consumed(1) and not sent(out, wire.MaskedUpdate)
    out = member.on_seal(AGG, seal_naming(sites, 5), update, "examples")
    assert sent(out, wire.MaskedUpdate)  # the same seal with sites only is fine


def test_roster_keys_carry_the_rosters_roles() -> None:
    idents = {n: Identity.generate(n) for n in ("a", "b", "r")}
    roster = Roster(
        1,
        [
            RosterEntry("a", "site", idents["a"].public_key),
            RosterEntry("b", "site", idents["b"].public_key),
            RosterEntry("r", "region", idents["r"].public_key),
        ],
    )
    keys = RosterSecAggKeys("a", idents["a"], roster)
    assert (keys.role("b"), keys.role("r")) == ("site", "region")
    plain = RosterSecAggKeys("a", idents["a"], {n: i.public_key for n, i in idents.items()})
    assert plain.role("r") is None  # a bare key table knows no roles


# ---------------------------------------------------------- 3. view splitting


def two_view_attack(
    n: int, min_cohort: int, colluder: str, member_c: int, seal_c: int
) -> tuple[bool, list[str]]:
    """two_views_general.py through the real members: the aggregator (with ``colluder``,
    a site, or its own id ``AGG``) seals ``n`` members at threshold t(seal_c) and splits
    the honest ones into two views to unmask victim h00. Returns (victim recovered,
    the members' refusal reasons)."""
    honest = [f"h{i:02d}" for i in range(n - 1)]
    members = (*honest, colluder)
    keys = derived_secagg_keys([*honest, "colluder", AGG], seed=3)
    rng = np.random.default_rng(2)
    truth = {h: (rng.standard_normal(30) * 0.02).astype(np.float32) for h in honest}
    nodes = {
        h: SecAggMember(
            h, keys[h], np.random.default_rng(i), min_cohort=min_cohort, max_colluders=member_c
        )
        for i, h in enumerate(honest)
    }
    ek = keys[colluder]
    reasons: list[str] = []

    def take(effects: list[Effect]) -> list[Any]:
        reasons.extend(
            (e.labels or {})["reason"]
            for e in effects
            if isinstance(e, Metric) and e.name == "secagg_refused"
        )
        return [roundtrip(m) for m in sent(effects, object)]

    t = threshold(n, min_cohort, seal_c)
    cohort = b"\x01" * 16
    seqs = tuple(range(1, n + 1))
    seal = roundtrip(wire.SecAggSeal(cohort, members, seqs, t, 1.0, 16, 1, 60.0))
    assert isinstance(seal, wire.SecAggSeal)
    digest = seal_digest(AGG, seal)
    ups: dict[str, wire.MaskedUpdate] = {}
    for k, h in enumerate(honest):
        update = PendingUpdate(seqs[k], 0, {"w": truth[h]}, 1)
        for m in take(nodes[h].on_seal(AGG, seal, update, "examples")):
            if isinstance(m, wire.MaskedUpdate):
                ups[h] = m
    if len(ups) < len(honest):
        return False, reasons
    x_e = members.index(colluder) + 1

    def colluder_bundle(owner: str) -> Any:
        boxed = dict(ups[owner].bundles)[colluder]
        return unpack_bundle(
            ek.open_from(owner, boxed),
            cohort=cohort,
            owner=owner,
            recipient=colluder,
            x=x_e,
            members=members,
        )

    def run(u: tuple[str, ...], d: tuple[str, ...], signers: list[str]) -> dict[int, Any]:
        vm = view_message(AGG, cohort, u, d, digest)
        sigs = [(colluder, ek.sign(vm))]
        for h in signers:
            for m in take(nodes[h].on_view(AGG, wire.SecAggView(cohort, u, d))):
                if isinstance(m, wire.SecAggViewSig):
                    sigs.append((h, m.sig))
        answers: dict[int, Any] = {}
        for h in signers:
            bundles = tuple((o, dict(up.bundles)[h]) for o, up in ups.items() if o != h)
            unmask = wire.SecAggUnmask(cohort, u, d, tuple(sigs), bundles)
            for m in take(nodes[h].on_unmask(AGG, unmask)):
                if isinstance(m, wire.SecAggShares):
                    answers[members.index(h) + 1] = m
        return answers

    victim = honest[0]
    s2 = honest[1 : t - 1]  # sign V2 with the victim and the colluder
    rest = honest[t - 1 :]  # sign V1 (the victim dropped) with the colluder
    # With too few "rest" members the aggregator must ask V2's signers to sign V1 too.
    v1_signers = (list(rest) + list(s2))[: t - 1]
    sh2 = run((victim, *s2, colluder), tuple(rest), [victim, *s2])
    sh1 = run((*s2, *rest, colluder), (victim,), v1_signers)
    try:
        pts = {x: dict(s.self_shares)[victim] for x, s in sh2.items()}
        pts[x_e] = colluder_bundle(victim).self_share
        b_victim = reconstruct(pts, t)
        y = np.frombuffer(ups[victim].data, dtype="<u4").astype(np.uint32)
        v = y - expand(b_victim, y.size)
        for j in members[1:]:
            if j == colluder:
                ctx = member_pair_context(AGG, cohort, colluder, seqs[-1], victim, seqs[0], digest)
                seed = ek.pair_seed(victim, ctx)
            else:
                pts = {
                    x: {(o, q): sh for o, q, sh in s.pair_shares}[(j, victim)]
                    for x, s in sh1.items()
                }
                pts[x_e] = colluder_bundle(j).pair_shares[victim]
                seed = reconstruct(pts, t)
            mask = expand(seed, y.size)
            v = v - mask if pair_sign(victim, j) > 0 else v + mask
    except (KeyError, ShareError):
        return False, reasons
    err = float(np.max(np.abs(v.view(np.int32)[:-1] / 2**16 - truth[victim])))
    return err < 1e-3, reasons


@pytest.mark.parametrize(("n", "min_cohort"), [(5, 3), (9, 5), (11, 5)])
def test_one_colluding_site_cannot_split_the_views_with_max_colluders_one(
    n: int, min_cohort: int
) -> None:
    # Control (documented): with a bare majority (c = 0 on the members too) ONE colluding
    # site suffices, as the review showed.
    recovered, _ = two_view_attack(n, min_cohort, "colluder", member_c=0, seal_c=0)
    assert recovered
    # c = 1: the members refuse the bare-majority seal outright...
    recovered, reasons = two_view_attack(n, min_cohort, "colluder", member_c=1, seal_c=0)
    assert not recovered and set(reasons) == {"threshold"}
    # ... and under the seal's proper threshold no two views both gather t signatures.
    recovered, reasons = two_view_attack(n, min_cohort, "colluder", member_c=1, seal_c=1)
    assert not recovered
    assert "second_view" in reasons and "too_few_signatures" in reasons


@pytest.mark.parametrize(("n", "min_cohort"), [(5, 3), (9, 5), (21, 11)])
def test_the_aggregator_sealed_as_a_member_is_refused(n: int, min_cohort: int) -> None:
    for member_c in (0, 1):
        recovered, reasons = two_view_attack(n, min_cohort, AGG, member_c, seal_c=member_c)
        assert not recovered and set(reasons) == {"aggregator_member"}


# ---------------------------------------------------------------- 4. poisoning


def poisoned(mode: str) -> Net:
    """poison.py: site-00 adds a vector to its masked upload (masks cancel whatever it
    adds): ``weight`` leaves Σw at one unit, ``coords`` fills every coordinate up to the
    per-coordinate range bound."""
    net = Net(n=7, min_cohort=5, max_colluders=1)
    rng = np.random.default_rng(4)
    for s in net.sites:
        net.add_update(s, 1, random_delta(rng))
        net.join(s, 1)
    bad = net.sites[0]

    def tamper(sender: str, msg: wire.Message) -> wire.Message:
        if mode == "none" or sender != bad or not isinstance(msg, wire.MaskedUpdate):
            return msg
        y = np.frombuffer(msg.data, dtype="<u4").astype(np.int64)
        e = np.zeros_like(y)
        if mode == "weight":
            e[-1] = -(7 * 2**15) + 1
        else:
            bound = int(capacity_bound(7, net.clip, net.precision_bits)) - 7 * 2**15
            e[:-1] = bound * np.where(np.arange(y.size - 1) % 2 == 0, 1, -1)
        data = ((y + e) % 2**32).astype("<u4").tobytes()
        return dataclasses.replace(msg, data=data)

    net.tamper = tamper
    net.run()
    return net


@pytest.mark.parametrize(
    ("mode", "reason"), [("weight", "weight_mismatch"), ("coords", "norm_out_of_range")]
)
def test_a_member_cannot_blow_up_the_cohort_step(mode: str, reason: str) -> None:
    net = poisoned(mode)
    assert net.results == []
    assert aborts(net) == {reason: 1.0}
    assert metric_count(net.effects[AGG], "secagg_site_in_aborted_cohort") == 7


def test_an_honest_poison_run_completes() -> None:
    net = poisoned("none")
    (result,) = net.results
    want, weight = net.expected_sum(net.sites)
    assert result.weight_sum == pytest.approx(weight)
    assert np.abs(flatten(result.total) - want).max() <= 7 * 2.0**-16 + 1e-9


@settings(max_examples=40, deadline=None)
@given(
    n_examples=st.lists(st.integers(0, 300), min_size=2, max_size=8),
    cap=st.integers(1, 200),
    norms=st.lists(st.floats(0.0, 5.0), min_size=8, max_size=8),
    bits=st.integers(8, 20),
    sigma=st.sampled_from([0.0, 3.0, 200.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_honest_cohort_sums_always_pass_and_tampered_weights_never_do(
    n_examples: list[int], cap: int, norms: list[float], bits: int, sigma: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    spec = FieldSpec(1.0, bits, cap)
    total = np.zeros(33, dtype=np.uint32)
    for n, norm in zip(n_examples, norms, strict=False):
        raw = rng.standard_normal(32)
        delta = {"w": raw / np.linalg.norm(raw) * norm}
        noise = discrete_gaussian(rng, sigma, 32) if sigma else None
        total += encode(delta, member_weight(n, "examples", cap), spec, rng, noise)
    check_cohort_sum(total, spec, n_examples, noise_sigma=sigma)
    off = total.copy()
    off[-1] += np.uint32(1)
    with pytest.raises(WeightMismatchError):
        check_cohort_sum(off, spec, n_examples, noise_sigma=sigma)
    # A coordinate pushed past every honest member's clip (and the slack) is caught.
    weights = sum(member_weight(n, "examples", cap) for n in n_examples)
    slack = len(n_examples) * math.sqrt(32) + sigma * math.sqrt(len(n_examples)) * (
        math.sqrt(32) + 10
    )
    push = int(2 * (weights * 2.0**bits + slack)) + 1
    long = total.copy()
    long[:1] += np.uint32(push)  # array arithmetic: wraps mod 2^32 like the ring
    with pytest.raises(NormOutOfRangeError):
        check_cohort_sum(long, spec, n_examples, noise_sigma=sigma)


# ------------------------------------------------ 5. one member against liveness


def test_a_wrong_share_among_the_first_t_answers_is_named_and_the_cohort_completes() -> None:
    """one_member_aborts.py (b): a small change of one share still rebuilds a 32-byte
    secret from t shares; the coordinator waits for the answers still owed, finds the
    wrong share (Berlekamp-Welch) and completes with the right sum."""
    net = Net(n=7, min_cohort=3)
    rng = np.random.default_rng(5)
    for s in net.sites:
        net.add_update(s, 1, random_delta(rng))
        net.join(s, 1)
    bad = net.sites[0]

    def tamper(sender: str, msg: wire.Message) -> wire.Message:
        if sender == bad and isinstance(msg, wire.SecAggShares):
            (o, sh), *rest = msg.self_shares
            return dataclasses.replace(msg, self_shares=((o, sh[:-1] + bytes([sh[-1] ^ 1])), *rest))
        return msg

    net.tamper = tamper
    net.run()
    (result,) = net.results
    want, _ = net.expected_sum(net.sites)
    assert np.abs(flatten(result.total) - want).max() <= 7 * 2.0**-16 + 1e-9
    assert metric_count(net.effects[AGG], "secagg_refused", reason="wrong_share") == 1
    named = [
        e.labels
        for e in net.effects[AGG]
        if isinstance(e, Metric) and e.labels and e.labels.get("reason") == "wrong_share"
    ]
    assert named == [{"reason": "wrong_share"}]
    assert metric_count(net.effects[AGG], "secagg_unmask_retry") == 1


def test_a_garbage_upload_aborts_and_counts_every_survivor() -> None:
    """one_member_aborts.py (a): inherent without range proofs; the saboteur is in every
    aborted cohort's count, so cohorts of changing membership single it out."""
    counts: dict[str, float] = {}
    for r, (members, bad) in enumerate([((0, 1, 2, 3), 0), ((0, 4, 5, 6), 0)]):
        net = Net(n=7, min_cohort=3, cohort_size=4, seed=r)
        rng = np.random.default_rng(r)
        sites = [net.sites[k] for k in members]
        for s in sites:
            net.add_update(s, 1, random_delta(rng))
            net.join(s, 1)
        saboteur = net.sites[bad]

        def tamper(sender: str, msg: wire.Message, saboteur: str = saboteur) -> wire.Message:
            if sender == saboteur and isinstance(msg, wire.MaskedUpdate):
                return dataclasses.replace(msg, data=np.random.default_rng(1).bytes(len(msg.data)))
            return msg

        net.tamper = tamper
        net.run()
        assert net.results == [] and aborts(net) == {"sum_out_of_range": 1.0}
        for e in net.effects[AGG]:
            if isinstance(e, Metric) and e.name == "secagg_site_in_aborted_cohort":
                site = (e.labels or {})["site"]
                counts[site] = counts.get(site, 0.0) + e.value
    assert max(counts, key=lambda s: counts[s]) == "site-00" and counts["site-00"] == 2
    assert all(v == 1 for s, v in counts.items() if s != "site-00")


# ------------------------------------------------------------- 6. and 7. bounds


def test_a_seal_bigger_than_max_cohort_is_refused_before_any_crypto() -> None:
    keys = derived_secagg_keys(["s0000", AGG], seed=1)  # the other 64 have no keys at all
    member = SecAggMember("s0000", keys["s0000"], np.random.default_rng(0), min_cohort=5)
    assert member.max_cohort == 64
    ids = [f"s{i:04d}" for i in range(65)]
    update = PendingUpdate(1, 0, {"w": np.zeros(10, np.float32)}, 1)
    out = member.on_seal(AGG, seal_naming(ids, threshold(65, 5)), update, "examples")
    assert metric_count(out, "secagg_refused", reason="cohort_size") == 1
    out = member.on_seal(AGG, seal_naming(ids[:64], threshold(64, 5)), update, "examples")
    assert metric_count(out, "secagg_refused", reason="unknown_key") == 1  # got that far


def test_orphans_kept_across_restarts_are_bounded() -> None:
    keys = derived_secagg_keys([AGG, "a", "b"], seed=1)
    coord = SecAggCoordinator(
        AGG, keys[AGG], cohort_size=4, min_cohort=2, rng=np.random.default_rng(0)
    )
    state = {"open": [[bytes([i % 256, i // 256]) * 8, ["a", "b"]] for i in range(300)]}
    coord.restore(state)
    assert len(coord.snapshot()["open"]) == MAX_ORPHANS
    # The newest are kept: the last one's members still hear of it.
    out = coord.on_peer_up("a", 0.0)
    aborted = {m.cohort for m in sent(out, wire.SecAggAbort)}
    assert bytes([299 % 256, 299 // 256]) * 8 in aborted and len(aborted) == MAX_ORPHANS


def test_coordinator_threshold_counts_colluders() -> None:
    keys = derived_secagg_keys([AGG], seed=1)
    rng = np.random.default_rng(0)
    assert SecAggCoordinator(AGG, keys[AGG], cohort_size=9, rng=rng).threshold == 6
    bare = SecAggCoordinator(AGG, keys[AGG], cohort_size=9, rng=rng, max_colluders=0)
    assert bare.threshold == 5
    with pytest.raises(ValueError, match="max_colluders"):
        SecAggCoordinator(AGG, keys[AGG], cohort_size=5, min_cohort=2, rng=rng, max_colluders=5)
