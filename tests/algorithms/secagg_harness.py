"""Drives ``SecAggMember``s and a ``SecAggCoordinator`` by hand (no network, no nodes).

Every message goes through the wire codec (encode, then decode), so the schemas are
exercised too. Each node's ``Persist`` effects are applied to its own durable log, and
the harness checks that a message that depends on a record is never sent before it.
Dropouts are scripted per site: ``before_upload`` (the seal is never answered) or
``after_upload`` (the site uploads, then answers nothing more); ``announce`` makes the
harness tell the coordinator ``PeerDown`` for them (as a driver would) instead of letting
the deadline find out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedloom.algorithms.protocol import Effect, Log, Metric, Persist, Send, Weights
from fedloom.algorithms.secagg.coordinator import CohortResult, SecAggCoordinator
from fedloom.algorithms.secagg.field import flatten
from fedloom.algorithms.secagg.keys import SecAggKeys
from fedloom.algorithms.secagg.member import NoiseFn, PendingUpdate, SecAggMember, seal_seq
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.transport import wire

AGG = "agg"
SHAPES = {"w": (12, 5), "b": (5,)}


def template() -> Weights:
    return {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}


def random_delta(rng: np.random.Generator, norm: float = 0.5) -> Weights:
    """A delta of L2 norm ``norm`` (below the default clip: nothing is clipped)."""
    raw: Weights = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    scale = norm / float(np.linalg.norm(flatten(raw)))
    return {k: (v * scale).astype(np.float32) for k, v in raw.items()}


def site_ids(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


def roundtrip(msg: wire.Message) -> wire.Message:
    return wire.decode(wire.encode(msg))


def metric_count(effects: Iterable[Effect], name: str, **labels: str) -> float:
    return sum(
        e.value
        for e in effects
        if isinstance(e, Metric)
        and e.name == name
        and all((e.labels or {}).get(k) == v for k, v in labels.items())
    )


@dataclass
class Net:
    """One coordinator and ``n`` members over a FIFO of wire messages."""

    n: int
    seed: int = 0
    min_cohort: int = 3
    cohort_size: int | None = None
    weighting: str = "examples"
    weight_cap: int = 100
    clip: float = 1.0
    precision_bits: int = 16
    keys: dict[str, SecAggKeys] | None = None
    noise_fn: NoiseFn | None = None
    coordinator_kwargs: dict[str, Any] = field(default_factory=dict)
    # c of ``cohort.threshold``: 0 keeps the bare majority these mechanics tests count on;
    # the collusion tests (test_secagg_malicious.py) set it as a config would (default 1).
    max_colluders: int = 0

    def __post_init__(self) -> None:
        self.sites = site_ids(self.n)
        keys = self.keys or derived_secagg_keys([*self.sites, AGG], self.seed)
        self.keys = keys
        rng = np.random.default_rng(self.seed)
        self.coordinator = SecAggCoordinator(
            AGG,
            keys[AGG],
            cohort_size=self.cohort_size or self.n,
            min_cohort=self.min_cohort,
            clip=self.clip,
            precision_bits=self.precision_bits,
            # Uniform weighting is a seal cap of 1 (what the factory seals): every member
            # with an example weighs 1, and the coordinator checks Σw against that.
            weight_cap=1 if self.weighting == "uniform" else self.weight_cap,
            form_wait_s=5.0,
            upload_timeout_s=30.0,
            unmask_timeout_s=20.0,
            rng=np.random.default_rng(rng.integers(2**63)),
            max_colluders=self.max_colluders,
            **self.coordinator_kwargs,
        )
        self.coordinator.set_template(template())
        self.members = {
            s: SecAggMember(
                s,
                keys[s],
                np.random.default_rng(rng.integers(2**63)),
                min_cohort=self.min_cohort,
                max_colluders=self.max_colluders,
            )
            for s in self.sites
        }
        self.updates: dict[str, dict[int, PendingUpdate]] = {s: {} for s in self.sites}
        self.queue: list[tuple[str, Send]] = []
        self.effects: dict[str, list[Effect]] = {s: [] for s in [*self.sites, AGG]}
        self.logs: dict[str, list[Any]] = {s: [] for s in [*self.sites, AGG]}
        self.before_upload: set[str] = set()
        self.after_upload: set[str] = set()
        self.announce = False
        self._announced: set[str] = set()
        self.now = 0.0
        self.results: list[CohortResult] = []
        # Optional tap on messages to the aggregator: (sender, msg) -> msg or None (drop).
        self.tamper: Callable[[str, wire.Message], wire.Message | None] | None = None

    # --------------------------------------------------------------- plumbing

    def take(self, node: str, effects: list[Effect]) -> None:
        """Record ``node``'s effects: Persist -> its log; Send -> the queue. A message of a
        kind that depends on a record must follow a Persist in the same list."""
        persisted = False
        for e in effects:
            self.effects[node].append(e)
            if isinstance(e, Persist):
                self.logs[node].append(e.data)
                persisted = True
            elif isinstance(e, Send):
                if isinstance(e.msg, wire.MaskedUpdate):
                    assert persisted, f"{node} sent a masked update before persisting it"
                if isinstance(e.msg, wire.SecAggSeal):
                    opened = [r.get("cohort") for r in self.logs[node] if r.get("op") == "open"]
                    assert e.msg.cohort in opened, "a seal was sent before its cohort was recorded"
                self.queue.append((node, e))
            else:
                assert isinstance(e, Metric | Log)

    def add_update(
        self, site: str, seq: int, delta: Weights, *, base_version: int = 0, n_examples: int = 50
    ) -> None:
        self.updates[site][seq] = PendingUpdate(seq, base_version, delta, n_examples)

    def join(self, site: str, seq: int) -> None:
        up = self.updates[site][seq]
        msg = wire.SecAggJoin(
            src=site, seq=seq, base_version=up.base_version, n_examples=up.n_examples
        )
        self.take(AGG, self.coordinator.on_join(site, msg, self.now))

    def deliver(self, sender: str, send: Send) -> None:
        msg = roundtrip(send.msg)
        peer = send.peer
        if peer == AGG:
            if self.tamper is not None:
                tampered = self.tamper(sender, msg)
                if tampered is None:
                    return
                msg = roundtrip(tampered)
            co = self.coordinator
            if isinstance(msg, wire.MaskedUpdate):
                out = co.on_masked(sender, msg, self.now)
            elif isinstance(msg, wire.SecAggViewSig):
                out = co.on_view_sig(sender, msg, self.now)
            elif isinstance(msg, wire.SecAggShares):
                out = co.on_shares(sender, msg, self.now)
            else:
                raise AssertionError(f"unexpected {msg!r} to the aggregator")
            self.take(AGG, out)
            self.results.extend(co.take_results())
            return
        if peer in self.members:  # a message to a node that does not exist is lost
            self.take(peer, self.member_handles(peer, sender, msg))

    def member_handles(self, site: str, sender: str, msg: wire.Message) -> list[Effect]:
        member = self.members[site]
        if isinstance(msg, wire.SecAggSeal):
            if site in self.before_upload:
                return []
            seq = seal_seq(msg, site)
            if seq not in self.updates[site]:
                return []  # a join this site never sent (a hostile test's): no such update
            return member.on_seal(
                sender, msg, self.updates[site][seq], self.weighting, self.noise_fn
            )
        if site in self.after_upload:
            return []
        if isinstance(msg, wire.SecAggView):
            return member.on_view(sender, msg)
        if isinstance(msg, wire.SecAggUnmask):
            return member.on_unmask(sender, msg)
        if isinstance(msg, wire.SecAggAbort):
            return member.on_abort(sender, msg)
        raise AssertionError(f"unexpected {msg!r} to a member")

    def drain(self) -> None:
        while self.queue:
            sender, send = self.queue.pop(0)
            self.deliver(sender, send)
            if self.announce:
                self.announce_down()

    def announce_down(self) -> None:
        """Tell the coordinator about dropped sites once they are no longer needed."""
        for site in sorted(self.before_upload | self.after_upload):
            if site in self._announced:
                continue
            if site in self.after_upload and (
                not self.members[site].cohorts() or any(src == site for src, _ in self.queue)
            ):
                continue  # its upload is not delivered yet
            self._announced.add(site)
            self.take(AGG, self.coordinator.on_peer_down(site, self.now))

    def run(self, max_steps: int = 100) -> float:
        """Deliver everything, then advance to each deadline, until nothing is left.
        Returns the time the last event happened."""
        self._announced = set()
        for _ in range(max_steps):
            self.drain()
            deadline = self.coordinator.next_deadline()
            if deadline is None:
                return self.now
            self.now = max(self.now, deadline)
            self.take(AGG, self.coordinator.on_deadline(self.now))
            self.results.extend(self.coordinator.take_results())
        raise AssertionError("the cohort protocol did not settle")

    # ---------------------------------------------------------------- checks

    def all_effects(self) -> list[Effect]:
        return [e for effs in self.effects.values() for e in effs]

    def expected_sum(self, sites: Iterable[str], seq: int = 1) -> tuple[np.ndarray, float]:
        total = np.zeros(sum(int(np.prod(s)) for s in SHAPES.values()))
        weights = 0.0
        for s in sites:
            up = self.updates[s][seq]
            w = (
                1.0
                if self.weighting == "uniform"
                else min(up.n_examples, self.weight_cap) / self.weight_cap
            )
            total += w * flatten(up.delta)
            weights += w
        return total, weights
