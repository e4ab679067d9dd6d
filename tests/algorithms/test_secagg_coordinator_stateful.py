"""Hypothesis stateful test of SecAggCoordinator with honest members and hostile noise.

Rules interleave honest joins, deliveries, lost messages, links going down and up,
deadlines, and hostile messages from members and strangers (garbage uploads, forged
signatures, random shares, bogus joins). Invariants: nothing raises; cohorts in flight
stay within ``max_inflight``; every cohort result is exactly the plain sum of its
survivors' updates (garbage never comes out as a sum); no update is in two results; the
coordinator always has a deadline while a cohort is open.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fedloom.algorithms.secagg.field import flatten
from fedloom.transport import wire
from tests.algorithms.secagg_harness import AGG, SHAPES, Net, random_delta

N_SITES = 5
SITES = [f"site-{i:02d}" for i in range(N_SITES)]
PRECISION = 2.0**-16


class CoordinatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net(
            N_SITES, seed=3, min_cohort=2, cohort_size=4, coordinator_kwargs={"max_inflight": 2}
        )
        self.rng = np.random.default_rng(0)
        self.next_seq = dict.fromkeys(SITES, 1)
        self.counted: set[tuple[str, int]] = set()
        self.checked = 0

    def _step(self) -> None:
        self.net.results.extend(self.net.coordinator.take_results())

    @rule(site=st.sampled_from(SITES))
    def join(self, site: str) -> None:
        seq = self.next_seq[site]
        self.next_seq[site] += 1
        self.net.add_update(
            site, seq, random_delta(self.rng), n_examples=int(self.rng.integers(1, 200))
        )
        self.net.join(site, seq)

    @rule()
    def join_all(self) -> None:
        for site in SITES:
            self.join(site)

    @precondition(lambda self: bool(self.net.queue))
    @rule(k=st.integers(0, 20))
    def deliver(self, k: int) -> None:
        sender, send = self.net.queue.pop(k % len(self.net.queue))
        self.net.deliver(sender, send)

    @rule()
    def settle(self) -> None:
        """A quiet spell: everything in flight is delivered."""
        self.net.drain()

    @precondition(lambda self: bool(self.net.queue))
    @rule(k=st.integers(0, 20))
    def lose(self, k: int) -> None:
        self.net.queue.pop(k % len(self.net.queue))

    @rule(site=st.sampled_from(SITES), up=st.booleans())
    def link(self, site: str, up: bool) -> None:
        co = self.net.coordinator
        out = co.on_peer_up(site, self.net.now) if up else co.on_peer_down(site, self.net.now)
        self.net.take(AGG, out)
        self._step()

    @rule()
    def deadline(self) -> None:
        co = self.net.coordinator
        when = co.next_deadline()
        if when is not None:
            self.net.now = max(self.net.now, when)
        self.net.take(AGG, co.on_deadline(self.net.now))
        # A deadline that was just answered never comes back unmoved: a host sleeping
        # until next_deadline() would otherwise fire it again at once, forever.
        after = co.next_deadline()
        assert after is None or after > self.net.now, f"stale deadline {after} <= {self.net.now}"
        self._step()

    @rule(
        sender=st.sampled_from([*SITES, "stranger"]),
        kind=st.sampled_from(["masked", "masked_len", "sig", "shares", "join"]),
        pick=st.integers(0, 10),
        seed=st.integers(0, 2**32 - 1),
    )
    def hostile(self, sender: str, kind: str, pick: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        co = self.net.coordinator
        cohorts = co.open_cohorts() or [rng.bytes(16)]
        cid = cohorts[pick % len(cohorts)]
        d1 = sum(int(np.prod(shape)) for shape in SHAPES.values()) + 1
        now = self.net.now
        if kind in ("masked", "masked_len"):
            words = d1 if kind == "masked" else max(1, d1 - 1)
            others = [s for s in SITES if s != sender]
            msg = wire.MaskedUpdate(
                src=sender,
                seq=1 + pick,
                cohort=cid,
                base_version=0,
                n_examples=1,
                data=rng.bytes(4 * words),
                bundles=tuple((o, rng.bytes(40)) for o in others[: pick % N_SITES]),
            )
            out = co.on_masked(sender, msg, now)
        elif kind == "sig":
            out = co.on_view_sig(sender, wire.SecAggViewSig(cohort=cid, sig=rng.bytes(64)), now)
        elif kind == "shares":
            share = bytes(1) + rng.bytes(65)  # a valid field element, just not a real share
            shares = wire.SecAggShares(
                cohort=cid,
                self_shares=tuple((s, share) for s in SITES[: pick % N_SITES]),
                pair_shares=(),
            )
            out = co.on_shares(sender, shares, now)
        else:
            out = co.on_join(
                sender, wire.SecAggJoin(src=sender, seq=10_000 + pick, base_version=0), now
            )
        self.net.take(AGG, out)
        self._step()

    @invariant()
    def bounded_in_flight(self) -> None:
        co = self.net.coordinator
        assert len(co.open_cohorts()) <= co.max_inflight
        if co.open_cohorts():
            assert co.next_deadline() is not None

    @invariant()
    def results_are_exact_sums(self) -> None:
        for result in self.net.results[self.checked :]:
            want = np.zeros_like(flatten(result.total))
            weight = 0.0
            for s in result.survivors:
                key = (s.site, s.seq)
                assert key not in self.counted, f"{key} in two results"
                self.counted.add(key)
                up = self.net.updates[s.site][s.seq]
                w = min(up.n_examples, 100) / 100
                want += w * flatten(up.delta)
                weight += w
            assert np.abs(flatten(result.total) - want).max() <= result.count * PRECISION + 1e-6
            assert abs(result.weight_sum - weight) <= result.count * PRECISION
        self.checked = len(self.net.results)


TestCoordinatorMachine = CoordinatorMachine.TestCase
TestCoordinatorMachine.settings = settings(
    max_examples=20,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
