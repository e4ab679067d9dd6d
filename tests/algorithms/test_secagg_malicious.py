"""A malicious aggregator against honest members: it can never unmask one update.

``MaliciousAggregator`` plays the aggregator with full control. It holds every message
it is sent (masked vectors, signatures, shares), sends members any seals and views it
likes, replays seals and cohort ids, sends different views to different members and
claims live sites dropped. After each attack it runs the best unmasking it can: strip
from the target's masked vector every mask whose seed it has rebuilt from the shares it
was given. The tests assert that what is left is not any member's update and that the
members' refusals fired (metric ``secagg_refused{reason}``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedloom.algorithms.protocol import Effect, Metric, Send
from fedloom.algorithms.secagg.bundle import unpack_bundle
from fedloom.algorithms.secagg.cohort import threshold
from fedloom.algorithms.secagg.field import flatten, member_weight
from fedloom.algorithms.secagg.masking import pair_sign
from fedloom.algorithms.secagg.member import PendingUpdate, SecAggMember
from fedloom.algorithms.secagg.prg import expand
from fedloom.algorithms.secagg.shamir import ShareError, reconstruct
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.transport import wire
from tests.algorithms.secagg_harness import AGG, random_delta, roundtrip, site_ids

PRECISION_BITS = 16
WEIGHT_CAP = 100


class MaliciousAggregator:
    """The aggregator's seat, with honest members behind it and no rules of its own."""

    def __init__(self, n: int, seed: int = 0, max_records: int = 64) -> None:
        self.sites = site_ids(n)
        self.keys = derived_secagg_keys([*self.sites, AGG], seed)
        rng = np.random.default_rng(seed)
        self.members = {
            s: SecAggMember(
                s, self.keys[s], np.random.default_rng(k), min_cohort=2, max_records=max_records
            )
            for k, s in enumerate(self.sites)
        }
        self.updates: dict[tuple[str, int], PendingUpdate] = {}
        for s in self.sites:
            for seq in (1, 2, 3):
                self.updates[(s, seq)] = PendingUpdate(seq, 0, random_delta(rng), 30 + seq)
        self.rng = rng
        # Everything the members ever sent it.
        self.masked: dict[tuple[bytes, str], wire.MaskedUpdate] = {}
        self.sigs: dict[tuple[bytes, tuple[str, ...], tuple[str, ...]], dict[str, bytes]] = {}
        self.shares: dict[bytes, list[tuple[str, wire.SecAggShares]]] = {}
        self.members_of: dict[bytes, tuple[str, ...]] = {}
        self.effects: dict[str, list[Effect]] = {s: [] for s in self.sites}
        self._last_sig: tuple[str, wire.SecAggViewSig] | None = None

    # -------------------------------------------------------------- sending

    def _collect(self, site: str, effects: list[Effect]) -> None:
        self.effects[site].extend(effects)
        for e in effects:
            if not isinstance(e, Send):
                continue
            assert e.peer == AGG
            msg = roundtrip(e.msg)
            if isinstance(msg, wire.MaskedUpdate):
                self.masked[(msg.cohort, site)] = msg
            elif isinstance(msg, wire.SecAggShares):
                self.shares.setdefault(msg.cohort, []).append((site, msg))
            elif isinstance(msg, wire.SecAggViewSig):
                self._last_sig = (site, msg)

    def seal(
        self,
        to: Iterable[str],
        members: Sequence[str],
        seqs: Sequence[int],
        *,
        cohort: bytes | None = None,
        t: int | None = None,
    ) -> bytes:
        cid = cohort if cohort is not None else self.rng.bytes(16)
        self.members_of[cid] = tuple(members)
        msg = wire.SecAggSeal(
            cohort=cid,
            members=tuple(members),
            seqs=tuple(seqs),
            threshold=t if t is not None else threshold(len(members), 2),
            clip=1.0,
            precision_bits=PRECISION_BITS,
            weight_cap=WEIGHT_CAP,
            deadline_s=30.0,
        )
        seq_of = dict(zip(members, seqs, strict=True))
        for site in to:
            sealed = roundtrip(msg)
            assert isinstance(sealed, wire.SecAggSeal)
            update = self.updates[(site, seq_of.get(site, 2))]
            self._collect(site, self.members[site].on_seal(AGG, sealed, update, "examples"))
        return cid

    def view(self, to: Iterable[str], cid: bytes, u: Sequence[str], d: Sequence[str]) -> int:
        """Send view (u, d) to ``to``; returns how many signed it."""
        key = (cid, tuple(sorted(u)), tuple(sorted(d)))
        got = self.sigs.setdefault(key, {})
        for site in to:
            self._last_sig = None
            msg = roundtrip(wire.SecAggView(cohort=cid, survivors=tuple(u), dropped=tuple(d)))
            assert isinstance(msg, wire.SecAggView)
            self._collect(site, self.members[site].on_view(AGG, msg))
            if self._last_sig is not None:
                got[site] = self._last_sig[1].sig
        return len(got)

    def unmask(
        self,
        to: Iterable[str],
        cid: bytes,
        u: Sequence[str],
        d: Sequence[str],
        sigs: Iterable[tuple[str, bytes]] | None = None,
        bundle_owners: Iterable[str] | None = None,
    ) -> int:
        """Ask ``to`` to reveal for view (u, d) with ``sigs`` (default: every signature it
        holds for that view) and the bundles of ``bundle_owners`` (default: every
        member). Returns how many answered."""
        if sigs is None:
            sigs = self.sigs.get((cid, tuple(sorted(u)), tuple(sorted(d))), {}).items()
        sig_list = tuple(sigs)
        owners = list(bundle_owners) if bundle_owners is not None else list(self.members_of[cid])
        before = len(self.shares.get(cid, []))
        for site in to:
            bundles = tuple(
                (o, dict(self.masked[(cid, o)].bundles)[site])
                for o in owners
                if (cid, o) in self.masked and o != site
            )
            msg = roundtrip(
                wire.SecAggUnmask(
                    cohort=cid,
                    survivors=tuple(u),
                    dropped=tuple(d),
                    sigs=sig_list,
                    bundles=bundles,
                )
            )
            assert isinstance(msg, wire.SecAggUnmask)
            self._collect(site, self.members[site].on_unmask(AGG, msg))
        return len(self.shares.get(cid, [])) - before

    # -------------------------------------------------------------- the attack

    def rebuilt(self, cid: bytes) -> tuple[dict[str, bytes], dict[tuple[str, str], bytes]]:
        """Every self seed and pair seed of ``cid`` that t of the held shares rebuild."""
        members = self.members_of[cid]
        t = threshold(len(members), 2)
        index = {m: k + 1 for k, m in enumerate(members)}
        own: dict[str, dict[int, bytes]] = {}
        pair: dict[tuple[str, str], dict[int, bytes]] = {}
        for site, answer in self.shares.get(cid, []):
            for owner, share in answer.self_shares:
                own.setdefault(owner, {})[index[site]] = share
            for i, j, share in answer.pair_shares:
                pair.setdefault((i, j), {})[index[site]] = share
        b: dict[str, bytes] = {}
        s: dict[tuple[str, str], bytes] = {}
        for owner, got in own.items():
            with contextlib.suppress(ShareError):
                b[owner] = reconstruct(got, t)
        for key, got in pair.items():
            with contextlib.suppress(ShareError):
                s[key] = reconstruct(got, t)
        return b, s

    def best_estimate(
        self, cid: bytes, target: str, colluded: dict[str, bytes] | None = None
    ) -> np.ndarray:
        """The target's masked vector with every mask the aggregator can strip removed,
        decoded as the update times its weight would be (``colluded``: self seeds it got
        from outside the protocol, for the control experiment)."""
        y = np.frombuffer(self.masked[(cid, target)].data, dtype="<u4").astype(np.uint32)
        b, s = self.rebuilt(cid)
        b.update(colluded or {})
        if target in b:
            y = y - expand(b[target], y.size)
        for (i, j), seed in s.items():
            if target == i:
                y = y - np.uint32(1) * expand(seed, y.size) * np.uint32(pair_sign(i, j) % 2**32)
            elif target == j:
                y = y - expand(seed, y.size) * np.uint32(pair_sign(j, i) % 2**32)
        centred = y.view(np.int32).astype(np.float64) / 2.0**PRECISION_BITS
        return centred[:-1]

    def true_update(self, site: str, seq: int) -> np.ndarray:
        up = self.updates[(site, seq)]
        return member_weight(up.n_examples, "examples", WEIGHT_CAP) * flatten(up.delta)

    def assert_no_update_recovered(self, estimate: np.ndarray) -> None:
        """``estimate`` is none of the members' (weighted) updates, of any seq, nor a
        difference of two of one member's: it is still uniformly masked."""
        candidates = [self.true_update(s, q) for s in self.sites for q in (1, 2, 3)]
        candidates += [
            self.true_update(s, a) - self.true_update(s, b)
            for s in self.sites
            for a in (1, 2, 3)
            for b in (1, 2, 3)
            if a != b
        ]
        for c in candidates:
            # An unmasked update would match within 2^-f per coordinate; a masked one is
            # off by about 2^31 / 2^f = 32768 on average.
            assert np.abs(estimate - c).mean() > 100.0

    def refusals(self, reason: str) -> int:
        return sum(
            1
            for effs in self.effects.values()
            for e in effs
            if isinstance(e, Metric)
            and e.name == "secagg_refused"
            and e.labels == {"reason": reason}
        )


def honest_sum(agg: MaliciousAggregator, cid: bytes, u: Sequence[str]) -> np.ndarray:
    """What the aggregator is allowed to learn: Σ_{i∈U} v_i, rebuilt from the reveal."""
    members = agg.members_of[cid]
    total = np.zeros(len(agg.masked[(cid, u[0])].data) // 4, dtype=np.uint32)
    for i in u:
        total += np.frombuffer(agg.masked[(cid, i)].data, dtype="<u4")
    b, s = agg.rebuilt(cid)
    for i in u:
        total -= expand(b[i], total.size)
    for i in u:
        for j in members:
            if j not in u:
                total -= expand(s[(i, j)], total.size) * np.uint32(pair_sign(i, j) % 2**32)
    return total.view(np.int32).astype(np.float64)[:-1] / 2.0**PRECISION_BITS


def run_upload(agg: MaliciousAggregator, members: Sequence[str], seq: int = 1) -> bytes:
    cid = agg.seal(members, members, [seq] * len(members))
    assert all((cid, m) in agg.masked for m in members)
    return cid


def test_claiming_a_live_site_dropped_strips_its_pair_masks_but_never_its_self_mask() -> None:
    agg = MaliciousAggregator(6)
    sites, target = agg.sites, agg.sites[0]
    cid = run_upload(agg, sites)
    others = sites[1:]
    # The lie: the target uploaded, the view says it dropped. Everyone signs (it is a
    # valid view); the aggregator also slips the target's own bundles into the unmask.
    assert agg.view(sites, cid, others, [target]) == 6
    assert agg.unmask(sites, cid, others, [target]) == 6
    for _, answer in agg.shares[cid]:
        assert target not in [owner for owner, _ in answer.self_shares]  # no share of b_target
    b, s = agg.rebuilt(cid)
    assert target not in b
    assert all((i, target) in s for i in others)  # every pair mask of the target is stripped
    # The attack can now only try to get b_target: a second view with the target alive.
    assert agg.view(sites, cid, sites, []) == 0
    assert agg.refusals("second_view") == 6
    # ... and an unmask of that view with the first view's signatures.
    first = list(agg.sigs[(cid, tuple(sorted(others)), (target,))].items())
    assert agg.unmask(sites, cid, sites, [], sigs=first) == 0
    assert agg.refusals("second_view") == 12
    agg.assert_no_update_recovered(agg.best_estimate(cid, target))
    # Control (outside the threat model: t members collude and open the target's bundles):
    # the same attack code then recovers the target's update, so the check above is real.
    shares = {}
    for k, m in enumerate(sites[1:5], start=2):
        box = dict(agg.masked[(cid, target)].bundles)[m]
        plain = agg.keys[m].open_from(target, box)
        bundle = unpack_bundle(plain, cohort=cid, owner=target, recipient=m, x=k, members=sites)
        shares[k] = bundle.self_share
    stolen = {target: reconstruct(shares, 4)}
    recovered = agg.best_estimate(cid, target, colluded=stolen)
    assert np.abs(recovered - agg.true_update(target, 1)).max() <= 2.0**-PRECISION_BITS
    # What it may learn, it learns: the sum over the view's survivors.
    want = sum(agg.true_update(s, 1) for s in others)
    assert np.abs(honest_sum(agg, cid, others) - want).max() <= 5 * 2.0**-PRECISION_BITS
    # The target's update is consumed: it will not be masked again.
    assert [o.kind for o in agg.members[target].take_outcomes()] == ["uploaded", "lost"]


def test_different_views_to_different_members_never_reach_the_threshold() -> None:
    agg = MaliciousAggregator(6)  # t = 4
    sites, target = agg.sites, agg.sites[0]
    cid = run_upload(agg, sites)
    group_a, group_b = sites[:3], sites[3:]
    # Group A hears the target dropped; group B hears everyone survived.
    assert agg.view(group_a, cid, sites[1:], [target]) == 3
    assert agg.view(group_b, cid, sites, []) == 3
    # Neither view has t signatures: nobody reveals for either.
    assert agg.unmask(sites, cid, sites[1:], [target]) == 0
    assert agg.unmask(sites, cid, sites, []) == 0
    # Padding with a forged signature or with the other view's signatures does not help.
    sigs_a = list(agg.sigs[(cid, tuple(sorted(sites[1:])), (target,))].items())
    sigs_b = dict(agg.sigs[(cid, tuple(sorted(sites)), ())])
    forged = [*sigs_a, (sites[4], agg.keys[AGG].sign(b"anything")), (sites[5], sigs_b[sites[5]])]
    assert agg.unmask(sites, cid, sites[1:], [target], sigs=forged) == 0
    # The wire refuses a signer named twice; in memory a member counts each signer once.
    repeated = wire.SecAggUnmask(
        cohort=cid,
        survivors=tuple(sites[1:]),
        dropped=(target,),
        sigs=(*sigs_a, *sigs_a),
        bundles=(),
    )
    for site in group_a:
        out = agg.members[site].on_unmask(AGG, repeated)
        assert not any(isinstance(e, Send) for e in out)
    assert agg.refusals("too_few_signatures") >= 6
    assert agg.refusals("second_view") >= 6  # members of the other group refuse outright
    assert agg.rebuilt(cid) == ({}, {})
    for site in sites:
        agg.assert_no_update_recovered(agg.best_estimate(cid, site))


def test_views_that_break_the_rules_are_refused() -> None:
    agg = MaliciousAggregator(6)  # t = 4
    sites = agg.sites
    cid = run_upload(agg, sites)
    assert agg.view(sites, cid, sites[:3], sites[3:]) == 0  # |U| = 3 < t
    assert agg.refusals("view_too_few") == 6
    assert agg.view(sites, cid, sites, sites[:1]) == 0  # U ∩ D
    assert agg.refusals("view_overlap") == 6
    assert agg.view(sites, cid, sites[1:5], []) == 0  # a member in neither
    assert agg.refusals("view_members") == 6
    assert agg.view(sites, cid, [*sites, "stranger"], []) == 0
    assert agg.refusals("view_members") == 12
    # The same checks guard the unmask, whatever signatures come with it.
    assert agg.unmask(sites, cid, sites[:3], sites[3:]) == 0
    assert agg.refusals("view_too_few") == 12
    assert agg.rebuilt(cid) == ({}, {})


def test_replayed_seals_and_reused_cohort_ids_never_mask_twice() -> None:
    agg = MaliciousAggregator(4)  # t = 3
    sites, target = agg.sites, agg.sites[0]
    cid = run_upload(agg, sites)
    first = agg.masked[(cid, target)]
    # The same seal again: nothing is uploaded twice.
    agg.masked.clear()
    agg.seal([target], sites, [1] * 4, cohort=cid)
    assert (cid, target) not in agg.masked
    # The same cohort id for the target's next update: refused.
    agg.seal([target], sites, [2, 1, 1, 1], cohort=cid)
    assert (cid, target) not in agg.masked
    assert agg.refusals("cohort_reused") == 1
    # A fresh cohort for an update already uploaded: refused.
    agg.seal([target], sites, [1] * 4)
    assert agg.refusals("update_consumed") == 1
    agg.masked[(cid, target)] = first
    # A seal with a threshold below a majority, or one that does not name the member.
    agg.seal([target], sites, [2] * 4, t=2)
    agg.seal([target], [*sites[1:], "x"], [2] * 4)
    assert agg.refusals("threshold") == 1
    assert agg.refusals("not_member") == 1
    # A cohort of two with t = 2 passes the majority rule but not the member's floor.
    strict = SecAggMember(target, agg.keys[target], np.random.default_rng(0), min_cohort=3)
    seal = wire.SecAggSeal(
        cohort=bytes(16),
        members=tuple(sites[:2]),
        seqs=(2, 2),
        threshold=2,
        clip=1.0,
        precision_bits=PRECISION_BITS,
        weight_cap=WEIGHT_CAP,
        deadline_s=1.0,
    )
    out = strict.on_seal(AGG, seal, agg.updates[(target, 2)], "examples")
    assert [e.labels for e in out if isinstance(e, Metric)] == [{"reason": "threshold"}]
    assert (cid, target) in agg.masked and len(agg.masked) == 1  # nothing else was uploaded


def test_a_forgotten_cohort_id_replayed_gives_unrelated_masks() -> None:
    # Members remember one cohort only. The aggregator runs cohort c1 honestly (the target
    # survives, so b_target is rebuilt), lets an intermediate cohort evict c1 from every
    # member's records, then replays c1 with their next updates and reveals again. With
    # both self masks stripped, the two masked vectors would differ by exactly the
    # difference of the two updates if the pair masks repeated; they are bound to the
    # sealed seqs, so they do not.
    agg = MaliciousAggregator(4, max_records=1)
    sites, target = agg.sites, agg.sites[0]
    c1 = run_upload(agg, sites, seq=1)
    assert agg.view(sites, c1, sites, []) == 4
    assert agg.unmask(sites, c1, sites, []) == 4
    y1 = np.frombuffer(agg.masked[(c1, target)].data, dtype="<u4").astype(np.uint32)
    z1 = y1 - expand(agg.rebuilt(c1)[0][target], y1.size)
    run_upload(agg, sites, seq=2)  # evicts c1 from every member's records
    agg.shares.pop(c1)
    agg.seal(sites, sites, [3] * 4, cohort=c1)  # accepted: c1 is forgotten, seq 3 fresh
    assert agg.view(sites, c1, sites, []) == 4
    assert agg.unmask(sites, c1, sites, []) == 4
    y3 = np.frombuffer(agg.masked[(c1, target)].data, dtype="<u4").astype(np.uint32)
    z3 = y3 - expand(agg.rebuilt(c1)[0][target], y3.size)
    diff = (z1 - z3).view(np.int32).astype(np.float64)[:-1] / 2.0**PRECISION_BITS
    agg.assert_no_update_recovered(diff)
    # The sum of each run is still exactly what the aggregator may learn.
    want = sum(agg.true_update(s, 3) for s in sites)
    assert np.abs(honest_sum(agg, c1, sites) - want).max() <= 4 * 2.0**-PRECISION_BITS


# Views the aggregator picks from: everyone alive, one or two live sites claimed dropped,
# and one with too few survivors (t = 3 of 5).
DROPS = [(), (0,), (1,), (0, 1), (2, 3, 4)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(actions=[("view", 5, 1), ("unmask", 5, 1), ("view", 5, 0), ("unmask", 5, 0)])
@example(actions=[("view", 5, 3), ("unmask", 5, 3), ("unmask", 5, 1), ("unmask", 5, 0)])
@example(
    actions=[
        ("view", 0, 1),
        ("view", 1, 1),
        ("view", 2, 0),
        ("view", 3, 0),
        ("view", 4, 2),
        ("unmask", 5, 0),
        ("unmask", 5, 1),
        ("unmask", 5, 2),
    ]
)
@given(
    actions=st.lists(
        st.tuples(
            st.sampled_from(["view", "unmask"]),
            st.sampled_from([5, 5, 5, 0, 1, 2, 3, 4]),  # 5: every member
            st.integers(0, len(DROPS) - 1),
        ),
        min_size=4,
        max_size=30,
    )
)
def test_no_sequence_of_views_and_unmasks_strips_every_mask_of_one_member(
    actions: list[tuple[str, int, int]],
) -> None:
    """Whatever views and unmasks (with every signature it has collected) the aggregator
    sends to whichever members, in any order: all shares honest members reveal fit ONE
    view, and no member has both its self mask and all its pair masks rebuildable."""
    agg = MaliciousAggregator(5)
    sites = agg.sites
    cid = run_upload(agg, sites)
    for action, k, which in actions:
        d = [sites[i] for i in DROPS[which]]
        u = [x for x in sites if x not in d]
        to = sites if k == 5 else [sites[k]]
        if action == "view":
            agg.view(to, cid, u, d)
        else:
            agg.unmask(to, cid, u, d)
    revealed_self: set[str] = set()
    revealed_pairs: set[tuple[str, str]] = set()
    for _, answer in agg.shares.get(cid, []):
        revealed_self.update(owner for owner, _ in answer.self_shares)
        revealed_pairs.update((i, j) for i, j, _ in answer.pair_shares)
    if revealed_self or revealed_pairs:
        # One view (U, D) explains every share revealed: U ⊇ self owners, pairs in U × D.
        survivors = revealed_self | {i for i, _ in revealed_pairs}
        dropped = {j for _, j in revealed_pairs}
        assert not survivors & dropped
    b, s = agg.rebuilt(cid)
    for member in sites:
        pairs = {frozenset(key) for key in s if member in key}
        assert not (member in b and len(pairs) == len(sites) - 1), member
        if member in b or pairs:
            agg.assert_no_update_recovered(agg.best_estimate(cid, member))
