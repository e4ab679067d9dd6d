"""The aggregator side of cohort-sealed secure aggregation: ``SecAggCoordinator`` (pure).

One per secure aggregator (FedBuff root or region, sync root). Its host feeds it the
secure-aggregation messages and link events and applies what it yields:

1. Formation: ``on_join`` queues ``SecAggJoin``s (at most ``MAX_JOINS_PER_SITE`` per
   site). A cohort is sealed when ``cohort_size`` (N) distinct sites wait, or when
   ``form_wait_s`` passed since the oldest waiting join and at least t(N) sites wait (a
   smaller cohort, its own t = max(min_cohort, (n + c) // 2 + 1)); with ``form_wait_s=None``
   only the host's ``seal_now`` seals fewer (a sync root: at its round's deadline, or once
   no task of the round is outstanding). At most ``max_inflight``
   cohorts are open at once (the host passes ``concurrency // N + 1``). A site an open
   cohort A still needs (its update there is not settled and it has not answered A's
   reveal) is sealed into a new cohort only while A is past its upload and A's slack
   (live survivors, or answers plus answers owed, minus t) covers the crashes the new
   cohort can bring it: min(A's sites in it, the most members any of the last
   ``DROP_HISTORY`` cohorts lost; every member after an abort, and before any history).
   One crash counts against every open cohort that holds the site, so this bound keeps
   the next cohort's crashes from aborting A (two cohorts of the same ten sites, 3 crashes
   on each seal, t = 6, aborted both); with few crashes the next cohort masks while the
   last one signs and unmasks. The new cohort's own slack, N - t - that bound, must also
   cover the crashes an open cohort still uploading may bring it through shared sites.
   A smaller cohort is sealed without ``form_wait_s`` when every live member of the open
   cohorts already waits (the rest are down) and it can lose that bound and keep t. The
   seal is
   recorded (``Persist`` to ``COORDINATOR_LOG_KEY``) before any ``SecAggSeal`` is sent.
2. Upload: each member's ``MaskedUpdate`` is checked (member, the seq it was sealed with,
   the joined metadata, exactly (d + 1) * 4 bytes, one bundle for every other member) and
   added into one running uint32 sum (no per-member vectors are kept). The phase ends when
   every member uploaded or went down, or at ``upload_timeout_s``.
3. View: U = uploaded, D = the rest; fewer than t uploads aborts. ``SecAggView`` goes to
   every member; the first t valid signatures (``SecAggViewSig``) start the reveal.
   t = max(min_cohort, (n + max_colluders) // 2 + 1) (``cohort.threshold``); signatures
   and pair seeds are bound to the seal's digest (``cohort.seal_digest``).
4. Unmask: each survivor gets ``SecAggUnmask`` (the signatures and the bundles addressed
   to it). From ``SecAggShares`` answers the coordinator rebuilds b_j (j ∈ U) and s_ij
   (i ∈ U, j ∈ D) from t shares each; a share set that does not rebuild a 32-byte secret
   (a wrong share almost surely does not) is retried on other t-subsets of the answers.
   As soon as every secret is rebuilt it strips the masks and checks the sum: every
   coordinate in range (``sum_out_of_range``: a mask did not cancel), the weight
   coordinate EQUAL to Σ round(min(n_i, cap)/cap · 2^f) over the survivors' joins
   (``weight_mismatch``), ‖Σ w_i x_i‖ within Σ w_i · clip plus rounding and noise slack
   (``norm_out_of_range``; ``field.check_cohort_sum``). A sum that fails while members
   asked still owe answers is not aborted yet: a wrong share among the first t answers
   rebuilds a wrong seed without any trace in t shares, and the later answers expose and
   name it (``wrong_share``). It then decodes Σ w_i x_i and Σ w_i and yields a
   ``CohortResult`` (``take_results()``). Views and reveals share one deadline,
   ``unmask_timeout_s`` after the view.
5. Fewer than t uploads, signatures or usable answers by a deadline (or as soon as that
   can no longer change) -> ``SecAggAbort`` to the members, metric
   ``secagg_cohort_aborted{reason}``, nothing yielded. So does a sum that still fails its
   checks once nothing more can come, and a survivor whose bundles no member could open
   (``unrecoverable_bundles``, naming it): a member that uploads garbage can make its
   cohort abort, never make a garbage sum come out. Known liveness limit: without range
   proofs nothing names that member; every survivor of a cohort aborted after its view
   is counted in ``secagg_site_in_aborted_cohort{site}``, so an operator finds a saboteur
   as the site common to the aborted cohorts. Within the checks a malicious member can
   still move its cohort's sum by up to |U| · clip in norm (a plain update: clip).

Links: ``on_peer_down`` drops a site's waiting joins and, for an open cohort, stops
waiting for it (a phase ends as soon as every live member has answered, or aborts as
soon as too few can); ``on_peer_up`` sends a returning member the cohort's current
request again (seal, view or unmask; members answer repeats idempotently).

Peer input never raises: malformed, duplicate, late or misaddressed messages are counted
(``secagg_refused{reason}``, ``secagg_duplicate``, ``secagg_late``) and ignored; a member
whose share answer is malformed is treated as not answering.

Durability: nothing of a cohort's data survives a restart. The log records which cohorts
were opened and closed; after ``restore`` every cohort still open is an orphan, and
``on_peer_up(member)`` sends that member ``SecAggAbort(reason="restart")`` (members that
had uploaded drop the update, the others join again). Orphans whose members never return
are kept across restarts up to ``MAX_ORPHANS`` (the newest).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.protocol import Effect, Log, Metric, Persist, Send, Weights
from fedloom.algorithms.secagg.cohort import (
    DEFAULT_MAX_COLLUDERS,
    MIN_COHORT_FLOOR,
    refused,
    seal_digest,
    threshold,
    view_message,
)
from fedloom.algorithms.secagg.field import (
    FieldSpec,
    SumOutOfRangeError,
    check_capacity,
    check_cohort_sum,
    decode_sum,
    template_size,
)
from fedloom.algorithms.secagg.keys import SecAggCryptoError, SecAggKeys
from fedloom.algorithms.secagg.masking import unmask_sum
from fedloom.algorithms.secagg.shamir import (
    SHARE_BYTES,
    Reconstructor,
    ShareError,
    parse_share,
    robust_reconstruct,
)
from fedloom.algorithms.warn_limit import WarnLimiter, quiet_refusals
from fedloom.transport.wire import (
    MAX_COHORT,
    MaskedUpdate,
    SecAggAbort,
    SecAggJoin,
    SecAggSeal,
    SecAggShares,
    SecAggUnmask,
    SecAggView,
    SecAggViewSig,
)

__all__ = [
    "COORDINATOR_LOG_KEY",
    "MAX_JOINS_PER_SITE",
    "CohortResult",
    "SecAggCoordinator",
    "Survivor",
]

COORDINATOR_LOG_KEY = "secagg/cohorts"
MAX_JOINS_PER_SITE = 8
DROP_HISTORY = 8  # cohorts whose losses bound the crashes a new cohort may bring
MAX_ORPHANS = 256  # cohorts orphaned by restarts kept until their members return
COHORT_ID_BYTES = 16
BOX_OVERHEAD = 40  # crypto_box: 24-byte nonce + 16-byte tag

U32 = npt.NDArray[np.uint32]


class Survivor(NamedTuple):
    """A member whose update is in a cohort's sum."""

    site: str
    seq: int
    base_version: int
    n_examples: int


@dataclass(frozen=True, slots=True)
class CohortResult:
    """A completed cohort: ``total`` = Σ_{i∈U} w_i x_i (decoded), ``weight_sum`` = Σ w_i."""

    cohort: bytes
    members: tuple[str, ...]
    survivors: tuple[Survivor, ...]
    total: Weights
    weight_sum: float

    @property
    def count(self) -> int:
        return len(self.survivors)

    @property
    def n_examples(self) -> int:
        return sum(s.n_examples for s in self.survivors)

    @property
    def pairs(self) -> tuple[tuple[str, int], ...]:
        return tuple((s.site, s.seq) for s in self.survivors)


@dataclass(slots=True)
class _Join:
    site: str
    seq: int
    base_version: int
    n_examples: int
    task: int
    at: float


@dataclass(slots=True)
class _Cohort:
    cid: bytes
    members: tuple[str, ...]
    joins: dict[str, _Join]
    t: int
    seal: SecAggSeal
    sealed: bytes  # seal_digest(aggregator, seal): what pair seeds and views are bound to
    deadline: float
    phase: str = "upload"  # upload -> view -> unmask
    acc: U32 | None = None
    uploaded: dict[str, Survivor] = field(default_factory=dict)
    bundles: dict[str, dict[str, bytes]] = field(default_factory=dict)  # recipient -> owner
    down: set[str] = field(default_factory=set)
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    view: bytes = b""
    sigs: dict[str, bytes] = field(default_factory=dict)
    asked: set[str] = field(default_factory=set)
    answers: dict[str, tuple[dict[str, bytes], dict[tuple[str, str], bytes]]] = field(
        default_factory=dict
    )
    bad: set[str] = field(default_factory=set)  # answered with malformed shares
    badsig: set[str] = field(default_factory=set)  # signed with an invalid signature
    # The sum did not pass its checks while answers were still owed: (reason, detail).
    failed: tuple[str, str] | None = None


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class SecAggCoordinator:
    """The aggregator side of secure aggregation (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        keys: SecAggKeys,
        *,
        cohort_size: int,
        min_cohort: int = 5,
        clip: float = 1.0,
        precision_bits: int = 16,
        weight_cap: int = 1,
        noise_sigma: float = 0.0,
        noise_multiplier: tuple[float, int] | None = None,
        form_wait_s: float | None = 30.0,
        upload_timeout_s: float = 300.0,
        unmask_timeout_s: float = 60.0,
        rng: np.random.Generator,
        max_inflight: int = 1,
        max_colluders: int = DEFAULT_MAX_COLLUDERS,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must be non-empty")
        for name, v in (("cohort_size", cohort_size), ("min_cohort", min_cohort)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if min_cohort < MIN_COHORT_FLOOR:
            raise ValueError(f"min_cohort must be >= {MIN_COHORT_FLOOR}, got {min_cohort}")
        if not min_cohort <= cohort_size <= MAX_COHORT:
            raise ValueError(
                f"cohort_size must be from min_cohort ({min_cohort}) to {MAX_COHORT}, "
                f"got {cohort_size}"
            )
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
            raise ValueError(f"max_inflight must be an int >= 1, got {max_inflight!r}")
        if isinstance(max_colluders, bool) or not isinstance(max_colluders, int):
            raise ValueError(f"max_colluders must be an int, got {max_colluders!r}")
        if max_colluders < 0 or threshold(cohort_size, min_cohort, max_colluders) > cohort_size:
            raise ValueError(
                f"max_colluders = {max_colluders} gives a threshold above the cohort's "
                f"{cohort_size} members"
            )
        self.spec = FieldSpec(clip, precision_bits, weight_cap)
        check_capacity(cohort_size, clip, precision_bits, noise_sigma)
        self.node_id = node_id
        self._keys = keys
        self._rng = rng
        self.cohort_size = cohort_size
        self.min_cohort = min_cohort
        self.max_colluders = max_colluders
        self.noise_sigma = float(noise_sigma)
        # Central DP at a node that learns the model's size later (a region): (z, t_min),
        # σ_member = z·(C·2^f + √d)/√t_min set with the template (``set_template``).
        self._noise_multiplier = noise_multiplier
        # None: no formation deadline of its own (the host calls ``seal_now``).
        self.form_wait_s = None if form_wait_s is None else _positive("form_wait_s", form_wait_s)
        self.upload_timeout_s = _positive("upload_timeout_s", upload_timeout_s)
        self.unmask_timeout_s = _positive("unmask_timeout_s", unmask_timeout_s)
        self.max_inflight = max_inflight
        self._template: Weights | None = None
        self._d = 0
        self._waiting: OrderedDict[tuple[str, int], _Join] = OrderedDict()
        self._cohorts: dict[bytes, _Cohort] = {}
        self._in_cohort: dict[tuple[str, int], bytes] = {}
        self._orphans: dict[bytes, set[str]] = {}
        self._sealed = 0  # cohorts ever sealed (durable; part of every cohort id)
        self._results: list[CohortResult] = []
        self._rebuilders: dict[tuple[int, ...], Reconstructor] = {}
        # Members each of the last DROP_HISTORY cohorts lost (``_crash_bound``).
        self._lost: deque[int] = deque(maxlen=DROP_HISTORY)
        self._last_members: tuple[str, ...] = ()  # of the cohort that ended last
        self._down: set[str] = set()  # sites whose link is down now (PeerDown, no PeerUp)
        # Refusals logged: one line per site and reason a minute (``_quiet``).
        self._warn = WarnLimiter()

    # ------------------------------------------------------------------ queries

    @property
    def threshold(self) -> int:
        """t of a full cohort."""
        return threshold(self.cohort_size, self.min_cohort, self.max_colluders)

    def set_template(self, weights: Weights) -> None:
        """The model's tensors (names, shapes, dtypes): what sums decode into."""
        self._template = {k: np.asarray(v) for k, v in weights.items()}
        self._d = template_size(self._template)
        if self._noise_multiplier is not None:
            from fedloom.algorithms.dp.release import member_noise_sigma

            z, t_min = self._noise_multiplier
            sigma = member_noise_sigma(z, self.spec.clip, self.spec.precision_bits, self._d, t_min)
            check_capacity(self.cohort_size, self.spec.clip, self.spec.precision_bits, sigma)
            self.noise_sigma = sigma

    def take_results(self) -> list[CohortResult]:
        """Cohorts completed since the last call (oldest first)."""
        out, self._results = self._results, []
        return out

    def waiting(self) -> int:
        """Joins waiting for a cohort."""
        return len(self._waiting)

    def open_cohorts(self) -> list[bytes]:
        return list(self._cohorts)

    def next_deadline(self) -> float | None:
        times = [c.deadline for c in self._cohorts.values()]
        if (
            self._waiting
            and self.form_wait_s is not None
            and self._template is not None
            and len(self._cohorts) < self.max_inflight
        ):
            # The same joins ``_try_seal`` would seal: a site an open cohort still holds
            # waits out of turn, so its (older) join must not set a deadline that has
            # already passed and that no seal would answer.
            sites = self._waiting_sites()
            if len(sites) >= self.threshold:
                times.append(sites[0].at + self.form_wait_s)
        return min(times, default=None)

    # ---------------------------------------------------------------- formation

    def _waiting_sites(self) -> list[_Join]:
        """The oldest waiting join of each site that may be sealed now, oldest first.

        A site's next update (trained while its last cohort masks, signs and unmasks)
        may wait while an open cohort A still needs the site (``_needs``). A site in two
        cohorts takes itself out of both with one crash, so the crash counts against both
        dropout budgets: bench/secagg.py at 30 % (two cohorts of the same ten sites, 3
        crashes on each seal, t = 6) left 4 live members in each and aborted both. Such a
        site is taken only while A is past its upload (its members' seal-time crashes are
        known) and min(A's sites taken, ``_crash_bound``) stays within A's slack: the
        crashes the new cohort brings cannot take A below t. A site that has answered A's
        reveal costs A nothing when it crashes (its shares are held here)."""
        bound = self._crash_bound()
        holding: dict[str, list[bytes]] = {}
        for (site, _), cid in self._in_cohort.items():
            if self._needs(cid, site):
                holding.setdefault(site, []).append(cid)
        held = {cid for cids in holding.values() for cid in cids}
        slack = {cid: self._slack(self._cohorts[cid]) for cid in held}
        own_left = {cid: self._own_left(self._cohorts[cid]) for cid in held}
        taken: dict[bytes, int] = {}
        # The new cohort's own slack (a full one's): its own crashes plus those the open
        # cohorts still to crash bring it through the sites it shares with them.
        room = max(0, self.cohort_size - self.threshold - bound)
        seen: dict[str, _Join] = {}
        for join in self._waiting.values():
            if join.site in seen:
                continue
            needed_by = holding.get(join.site, ())
            if not needed_by:
                seen[join.site] = join
                continue
            after = {**taken, **{cid: taken.get(cid, 0) + 1 for cid in needed_by}}
            if any(min(after[c], bound) > slack[c] for c in needed_by):
                continue
            if sum(min(k, own_left[c]) for c, k in after.items()) > room:
                continue  # the new cohort could not lose them and keep t
            taken = after
            seen[join.site] = join
        return list(seen.values())

    def _needs(self, cid: bytes, site: str) -> bool:
        """Whether open cohort ``cid`` may still need a message from ``site``."""
        cohort = self._cohorts.get(cid)
        return cohort is not None and not (cohort.phase == "unmask" and site in cohort.answers)

    def _crash_bound(self) -> int:
        """Crashes a new cohort may bring: the most members any recent cohort lost (its
        dropped members, or all of them if it aborted), at least 1 (one crash is always
        possible); with no history, a whole cohort."""
        return max(1, max(self._lost, default=self.cohort_size))

    def _own_left(self, cohort: _Cohort) -> int:
        """Crashes ``cohort`` may still see of its own: in its upload, ``_crash_bound``
        less the members it lost so far; none once its view is out."""
        if cohort.phase != "upload":
            return 0
        lost = len(cohort.down - set(cohort.uploaded))
        return max(0, self._crash_bound() - lost)

    def _slack(self, cohort: _Cohort) -> int:
        """How many more of ``cohort``'s needed members may crash with the cohort still
        able to reach t, beyond the crashes it may still see of its own (``_own_left``)."""
        if cohort.phase == "upload":
            lost = len(cohort.down - set(cohort.uploaded))
            return len(cohort.members) - lost - cohort.t - self._own_left(cohort)
        if cohort.phase == "view":
            live = set(cohort.survivors) - cohort.down - cohort.badsig - cohort.bad
            return len(live) - cohort.t
        return len(cohort.answers) + len(self._owed(cohort)) - cohort.t

    def _quiet(self, peer: str, effects: list[Effect], now: float) -> list[Effect]:
        """``effects`` with each refusal's warning logged once per site and reason a
        minute (``warn_limit.quiet_refusals``): a member repeating a refused message (a
        wrong seq, another's name, a join of n < 0, shares unasked) costs a metric each,
        not a log line each."""
        return quiet_refusals(self._warn, peer, effects, now, "secagg_refused")

    def on_join(self, peer: str, msg: SecAggJoin, now: float) -> list[Effect]:
        return self._quiet(peer, self._on_join(peer, msg, now), now)

    def _on_join(self, peer: str, msg: SecAggJoin, now: float) -> list[Effect]:
        fields = {"site": peer, "seq": msg.seq}
        if msg.src != peer:
            return refused("src_mismatch", "secure aggregation: join under another name", fields)
        if msg.seq < 1 or msg.n_examples < 0:
            return refused("bad_join", "secure aggregation: join with seq < 1 or n < 0", fields)
        key = (peer, msg.seq)
        cid = self._in_cohort.get(key)
        if cid is not None:
            cohort = self._cohorts.get(cid)
            if cohort is not None and cohort.phase == "upload" and peer not in cohort.uploaded:
                # The site lost its seal (a reconnect): send it again.
                cohort.down.discard(peer)
                return [
                    Send(peer, cohort.seal),
                    Metric("secagg_duplicate", 1.0, {"kind": "join_resealed"}),
                ]
            return [Metric("secagg_duplicate", 1.0, {"kind": "join"})]
        if key in self._waiting:
            return [Metric("secagg_duplicate", 1.0, {"kind": "join"})]
        if sum(1 for site, _ in self._waiting if site == peer) >= MAX_JOINS_PER_SITE:
            return refused(
                "too_many_joins",
                f"secure aggregation: {MAX_JOINS_PER_SITE} joins of this site already wait",
                fields,
            )
        self._down.discard(peer)  # a join proves the link is up
        self._waiting[key] = _Join(peer, msg.seq, msg.base_version, msg.n_examples, msg.task, now)
        return [Metric("secagg_joined", 1.0), *self._try_seal(now)]

    def _try_seal(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        while self._template is not None and len(self._cohorts) < self.max_inflight:
            sites = self._waiting_sites()
            if len(sites) >= self.cohort_size:
                out.extend(self._seal(sites[: self.cohort_size], now))
            elif (
                self.form_wait_s is not None
                and len(sites) >= self.threshold
                and now >= sites[0].at + self.form_wait_s
            ) or self._all_live_wait(sites):
                out.extend(self._seal(sites, now))
            else:
                break
        return out

    def _all_live_wait(self, sites: Sequence[_Join]) -> bool:
        """A smaller cohort need not wait for ``form_wait_s`` when every live member of
        the open cohorts (none open: of the cohort that ended last) already waits in
        ``sites`` (the missing ones are down: nothing more is coming soon) and it can lose
        ``_crash_bound`` members and still reach t."""
        if self.form_wait_s is None or not (self._cohorts or self._last_members):
            return False
        live: set[str] = set()
        for cohort in self._cohorts.values():
            live.update(set(cohort.members) - cohort.down)
        if not self._cohorts:  # none open: the last cohort's members that are not down
            live = set(self._last_members) - self._down
        n = len(sites)
        waiting = {j.site for j in sites}
        return (
            live <= waiting
            and n - threshold(n, self.min_cohort, self.max_colluders) >= self._crash_bound()
        )

    def seal_now(self, now: float) -> list[Effect]:
        """Seal the sites waiting now (the oldest ``cohort_size`` of them) if at least the
        threshold of a full cohort wait, whatever the formation deadline: the host's own
        deadline decides (a sync round's). Nothing if too few wait, no template yet or
        ``max_inflight`` cohorts are open; ``open_cohorts`` tells whether it sealed."""
        sites = self._waiting_sites()
        if (
            self._template is None
            or len(self._cohorts) >= self.max_inflight
            or len(sites) < self.threshold
        ):
            return []
        return self._seal(sites[: self.cohort_size], now)

    def drop_waiting(self) -> list[SecAggJoin]:
        """Forget every join waiting for a cohort (nothing of them was masked) and return
        them, oldest first: the host decides what becomes of those updates (a sync root
        whose round ends unsealed records them as late)."""
        joins = [
            SecAggJoin(j.site, j.seq, j.base_version, j.task, j.n_examples)
            for j in self._waiting.values()
        ]
        self._waiting.clear()
        return joins

    def cohort_of(self, site: str, seq: int) -> bytes | None:
        """The open cohort update ``seq`` of ``site`` is sealed in (None: none)."""
        return self._in_cohort.get((site, seq))

    def _seal(self, joins: Sequence[_Join], now: float) -> list[Effect]:
        members = tuple(j.site for j in joins)
        n = len(members)
        t = threshold(n, self.min_cohort, self.max_colluders)
        # Random, and unique across restarts: a restored aggregator's rng may replay the
        # draws of its last incarnation (a seeded one does), so the count of cohorts ever
        # sealed (durable: snapshot + "open" records) fills the last 8 bytes. Members
        # refuse a cohort id they uploaded under, so a repeat would cost a whole cohort.
        self._sealed += 1
        tail = self._sealed.to_bytes(8, "big")
        cid = self._rng.bytes(COHORT_ID_BYTES - 8) + tail
        while cid in self._cohorts or cid in self._orphans:
            cid = self._rng.bytes(COHORT_ID_BYTES - 8) + tail
        seal = SecAggSeal(
            cohort=cid,
            members=members,
            seqs=tuple(j.seq for j in joins),
            threshold=t,
            clip=self.spec.clip,
            precision_bits=self.spec.precision_bits,
            weight_cap=self.spec.weight_cap,
            deadline_s=self.upload_timeout_s,
            noise_sigma=self.noise_sigma,
        )
        cohort = _Cohort(
            cid=cid,
            members=members,
            joins={j.site: j for j in joins},
            t=t,
            seal=seal,
            sealed=seal_digest(self.node_id, seal),
            deadline=now + self.upload_timeout_s,
        )
        self._cohorts[cid] = cohort
        for j in joins:
            del self._waiting[(j.site, j.seq)]
            self._in_cohort[(j.site, j.seq)] = cid
        out: list[Effect] = [
            Persist(
                COORDINATOR_LOG_KEY, {"op": "open", "cohort": cid, "members": members}, append=True
            )
        ]
        out.extend(Send(m, seal) for m in members)
        out.append(Metric("secagg_cohort_sealed", 1.0, {"members": str(n)}))
        out.append(
            Log(
                "info",
                "secure aggregation: cohort sealed",
                {"cohort": cid.hex(), "members": n, "threshold": t},
            )
        )
        return out

    # ------------------------------------------------------------------ upload

    def _cohort(
        self, peer: str, cid: bytes, phase: str, what: str
    ) -> tuple[_Cohort | None, list[Effect]]:
        cohort = self._cohorts.get(cid)
        if cohort is None or cohort.phase != phase:
            return None, [Metric("secagg_late", 1.0, {"kind": what})]
        if peer not in cohort.members:
            return None, refused(
                "not_member",
                f"secure aggregation: {what} from a site outside the cohort",
                {"site": peer, "cohort": cid.hex()},
            )
        return cohort, []

    def on_masked(self, peer: str, msg: MaskedUpdate, now: float) -> list[Effect]:
        # A cohort that ends (or drops members from its view) frees its sites: the
        # joins they made meanwhile may seal the next cohort now.
        return self._quiet(peer, [*self._on_masked(peer, msg, now), *self._try_seal(now)], now)

    def _on_masked(self, peer: str, msg: MaskedUpdate, now: float) -> list[Effect]:
        if msg.src != peer:
            return refused(
                "src_mismatch",
                "secure aggregation: masked update under another name",
                {"site": peer},
            )
        cohort, bad = self._cohort(peer, msg.cohort, "upload", "masked")
        if cohort is None:
            return bad
        fields = {"site": peer, "seq": msg.seq, "cohort": msg.cohort.hex()}
        if peer in cohort.uploaded:
            return [Metric("secagg_duplicate", 1.0, {"kind": "masked"})]
        join = cohort.joins[peer]
        if msg.seq != join.seq:
            return refused(
                "seq_mismatch", "secure aggregation: masked update of another seq", fields
            )
        if msg.base_version != join.base_version or msg.n_examples != join.n_examples:
            return refused(
                "metadata_mismatch",
                "secure aggregation: masked update's base_version/n_examples differ from its join",
                fields,
            )
        want = (self._d + 1) * 4
        if len(msg.data) != want:
            return refused(
                "bad_length",
                f"secure aggregation: masked update of {len(msg.data)} bytes, expected {want}",
                fields,
            )
        recipients = [r for r, _ in msg.bundles]
        others = set(cohort.members) - {peer}
        if len(recipients) != len(others) or set(recipients) != others:
            return refused(
                "bad_bundles",
                "secure aggregation: masked update without exactly one bundle per other member",
                fields,
            )
        # A bundle holds one share per member (the owner's b and s_ij): a shorter box
        # cannot be honest, and would leave this member's masks unrecoverable later.
        shortest = BOX_OVERHEAD + (SHARE_BYTES + 2) * len(cohort.members)
        if any(len(boxed) < shortest for _, boxed in msg.bundles):
            return refused(
                "bad_bundles",
                f"secure aggregation: a share bundle shorter than {shortest} bytes",
                fields,
            )
        vec = np.frombuffer(msg.data, dtype="<u4")
        if cohort.acc is None:
            cohort.acc = vec.astype(np.uint32, copy=True)
        else:
            np.add(cohort.acc, vec, out=cohort.acc)
        for recipient, boxed in msg.bundles:
            cohort.bundles.setdefault(recipient, {})[peer] = boxed
        cohort.uploaded[peer] = Survivor(peer, msg.seq, msg.base_version, msg.n_examples)
        cohort.down.discard(peer)
        out: list[Effect] = [Metric("secagg_masked_received", 1.0)]
        if all(m in cohort.uploaded or m in cohort.down for m in cohort.members):
            out.extend(self._close_upload(cohort, now))
        return out

    def _close_upload(self, cohort: _Cohort, now: float) -> list[Effect]:
        survivors = tuple(m for m in cohort.members if m in cohort.uploaded)
        dropped = tuple(m for m in cohort.members if m not in cohort.uploaded)
        if len(survivors) < cohort.t:
            return self._abort(
                cohort, "too_few_uploads", f"{len(survivors)} uploads, {cohort.t} needed"
            )
        cohort.phase = "view"
        cohort.survivors, cohort.dropped = survivors, dropped
        self._lost.append(len(dropped))
        cohort.view = view_message(self.node_id, cohort.cid, survivors, dropped, cohort.sealed)
        cohort.deadline = now + self.unmask_timeout_s
        for key in [(m, cohort.joins[m].seq) for m in dropped]:
            self._in_cohort.pop(key, None)  # a dropped member's update may join again
        view = SecAggView(cohort=cohort.cid, survivors=survivors, dropped=dropped)
        out: list[Effect] = [Send(m, view) for m in cohort.members if m not in cohort.down]
        out.append(Metric("secagg_dropped", float(len(dropped))))
        return [*out, *self._maybe_stuck(cohort)]

    # -------------------------------------------------------------------- view

    def on_view_sig(self, peer: str, msg: SecAggViewSig, now: float) -> list[Effect]:
        # A cohort that ends (or drops members from its view) frees its sites: the
        # joins they made meanwhile may seal the next cohort now.
        effects = [*self._on_view_sig(peer, msg, now), *self._try_seal(now)]
        return self._quiet(peer, effects, now)

    def _on_view_sig(self, peer: str, msg: SecAggViewSig, now: float) -> list[Effect]:
        cohort, bad = self._cohort(peer, msg.cohort, "view", "view_sig")
        if cohort is None:
            return bad
        if peer in cohort.sigs:
            return [Metric("secagg_duplicate", 1.0, {"kind": "view_sig"})]
        try:
            ok = self._keys.verify(peer, cohort.view, msg.sig)
        except SecAggCryptoError:
            ok = False
        if not ok:
            cohort.badsig.add(peer)
            return [
                *refused(
                    "bad_signature",
                    "secure aggregation: a view signature does not verify",
                    {"site": peer, "cohort": cohort.cid.hex()},
                ),
                *self._maybe_stuck(cohort),
            ]
        cohort.sigs[peer] = msg.sig
        if len(cohort.sigs) < cohort.t:
            return []
        cohort.phase = "unmask"
        out: list[Effect] = []
        for m in cohort.survivors:
            if m not in cohort.down:
                out.append(Send(m, self._unmask_for(cohort, m)))
                cohort.asked.add(m)
        return [*out, *self._maybe_stuck(cohort)]

    @staticmethod
    def _unmask_for(cohort: _Cohort, member: str) -> SecAggUnmask:
        """The reveal request for ``member``: the view, its signatures, and the bundles
        the survivors addressed to ``member``."""
        held = cohort.bundles.get(member, {})
        return SecAggUnmask(
            cohort=cohort.cid,
            survivors=cohort.survivors,
            dropped=cohort.dropped,
            sigs=tuple(cohort.sigs.items()),
            bundles=tuple((o, held[o]) for o in cohort.survivors if o != member and o in held),
        )

    # ------------------------------------------------------------------ shares

    def on_shares(self, peer: str, msg: SecAggShares, now: float) -> list[Effect]:
        # A cohort that ends (or drops members from its view) frees its sites: the
        # joins they made meanwhile may seal the next cohort now.
        return self._quiet(peer, [*self._on_shares(peer, msg, now), *self._try_seal(now)], now)

    def _on_shares(self, peer: str, msg: SecAggShares, now: float) -> list[Effect]:
        cohort, bad = self._cohort(peer, msg.cohort, "unmask", "shares")
        if cohort is None:
            return bad
        fields = {"site": peer, "cohort": cohort.cid.hex()}
        if peer not in cohort.asked:
            return refused("not_asked", "secure aggregation: shares from a site not asked", fields)
        if peer in cohort.answers or peer in cohort.bad:
            return [Metric("secagg_duplicate", 1.0, {"kind": "shares"})]
        survivors, dropped = set(cohort.survivors), set(cohort.dropped)
        own: dict[str, bytes] = {}
        pair: dict[tuple[str, str], bytes] = {}
        problem = None
        try:
            for owner, share in msg.self_shares:
                if owner not in survivors:
                    problem = "a self-mask share of a member outside the survivors"
                    break
                parse_share(share)
                own[owner] = share
            for i, j, share in msg.pair_shares:
                if problem is not None:
                    break
                if i not in survivors or j not in dropped:
                    problem = "a pair share outside survivors x dropped"
                    break
                parse_share(share)
                pair[(i, j)] = share
        except (ShareError, TypeError, ValueError) as exc:
            problem = str(exc)
        if problem is not None:
            cohort.bad.add(peer)
            return [
                *refused("bad_share", f"secure aggregation: shares refused: {problem}", fields),
                *self._maybe_stuck(cohort),
            ]
        cohort.answers[peer] = (own, pair)
        out: list[Effect] = [Metric("secagg_shares_received", 1.0)]
        if len(cohort.answers) >= cohort.t:
            out.extend(self._try_finish(cohort))
        if cohort.cid in self._cohorts:
            out.extend(self._maybe_stuck(cohort))
        return out

    def _recover(self, shares: list[tuple[int, bytes]], t: int) -> tuple[bytes | None, list[int]]:
        """``(secret, wrong x's)`` from ``shares`` ((x, share), x ascending). Every share
        beyond the first t is checked against their polynomial (``Reconstructor``); when
        they disagree, Berlekamp-Welch (``robust_reconstruct``) names the wrong ones if
        there is enough redundancy. ``(None, [])``: not (yet) enough consistent shares."""
        if len(shares) < t:
            return None, []
        xs = tuple(x for x, _ in shares)
        rebuild = self._rebuilders.get(xs)
        if rebuild is None:
            if len(self._rebuilders) > 256:
                self._rebuilders.clear()
            rebuild = self._rebuilders[xs] = Reconstructor(xs, t)
        try:
            return rebuild([s for _, s in shares]), []
        except ShareError:
            pass
        try:
            secret, wrong = robust_reconstruct(dict(shares), t)
        except ShareError:
            return None, []
        return secret, wrong

    def _try_finish(self, cohort: _Cohort) -> list[Effect]:
        """Rebuild every secret from the answers so far and, when all are rebuilt, strip
        the masks and yield the cohort's result. Answerers found with wrong shares are
        dropped from the answers (refused, ``wrong_share``) and the rebuild starts over.

        A sum that fails its checks (``SumOutOfRangeError``: a mask did not cancel, the
        weights or the norm are not what the survivors can produce) is not aborted while
        members asked still owe answers: a wrong share among the first t answers leaves
        no trace in t shares (any t points fit a polynomial, and a small change of one
        share can still give a 32-byte secret), but with more answers the shares
        disagree and ``robust_reconstruct`` names and drops it. The cohort aborts once
        nothing more can come (or at the deadline) with the sum still failing."""
        index = {m: k + 1 for k, m in enumerate(cohort.members)}
        out: list[Effect] = []
        dropped_share = False
        while len(cohort.answers) >= cohort.t:
            by_x = {index[a]: a for a in cohort.answers}
            answerers = [by_x[x] for x in sorted(by_x)]
            needed: list[tuple[str, str | None]] = [(j, None) for j in cohort.survivors]
            needed += [(i, j) for i in cohort.survivors for j in cohort.dropped]
            secrets: list[bytes] = []
            wrong: set[int] = set()
            for owner, other in needed:
                shares = []
                for a in answerers:
                    own, pair = cohort.answers[a]
                    share = own.get(owner) if other is None else pair.get((owner, other))
                    if share is not None:
                        shares.append((index[a], share))
                secret, bad_x = self._recover(shares, cohort.t)
                wrong.update(bad_x)
                if secret is None:
                    break
                secrets.append(secret)
            if wrong:
                dropped_share = True
                for x in sorted(wrong):
                    culprit = by_x[x]
                    del cohort.answers[culprit]
                    cohort.bad.add(culprit)
                    out.extend(
                        refused(
                            "wrong_share",
                            "secure aggregation: a member's shares are not on the polynomial "
                            "of the others' (ignored)",
                            {"site": culprit, "cohort": cohort.cid.hex()},
                        )
                    )
                continue
            if len(secrets) < len(needed):
                return out  # wait for more answers (or the deadline)
            break
        else:
            return out
        owed = bool(self._owed(cohort))
        if cohort.failed is not None and owed and not dropped_share:
            return out  # the same shares failed before: wait for one that disagrees
        n_self = len(cohort.survivors)
        self_seeds = secrets[:n_self]
        pair_seeds = [
            (i, j, secret)
            for (i, j), secret in zip(needed[n_self:], secrets[n_self:], strict=True)
            if j is not None
        ]
        assert cohort.acc is not None and self._template is not None  # t >= 2 uploads
        total = unmask_sum([cohort.acc], self_seeds, pair_seeds)
        survivors = tuple(cohort.uploaded[m] for m in cohort.survivors)
        try:
            weights, weight_sum = decode_sum(
                total,
                self.spec,
                self._template,
                members=len(cohort.survivors),
                noise_sigma=self.noise_sigma,
            )
            check_cohort_sum(
                total,
                self.spec,
                [s.n_examples for s in survivors],
                noise_sigma=self.noise_sigma,
            )
        except SumOutOfRangeError as exc:
            # Some mask did not cancel (a member masked with seeds that are not the ones
            # it shared, or a wrong share rebuilt a wrong seed), or a member encoded more
            # than its clip or weight: never applied.
            if owed:
                first = cohort.failed is None
                cohort.failed = (exc.reason, str(exc))
                if first:
                    out.append(Metric("secagg_unmask_retry", 1.0, {"reason": exc.reason}))
                return out  # more answers may expose a wrong share
            return [*out, *self._abort(cohort, exc.reason, str(exc))]
        self._results.append(
            CohortResult(cohort.cid, cohort.members, survivors, weights, weight_sum)
        )
        self._forget(cohort)
        return [
            *out,
            Persist(COORDINATOR_LOG_KEY, {"op": "close", "cohort": cohort.cid}, append=True),
            Metric("secagg_cohort_completed", 1.0),
            Metric("secagg_cohort_survivors", float(len(survivors))),
            Log(
                "info",
                "secure aggregation: cohort unmasked",
                {
                    "cohort": cohort.cid.hex(),
                    "survivors": len(survivors),
                    "dropped": len(cohort.dropped),
                },
            ),
        ]

    @staticmethod
    def _owed(cohort: _Cohort) -> set[str]:
        """Members asked to reveal, still live, that have not answered."""
        live = set(cohort.members) - cohort.down - cohort.bad
        return (cohort.asked & live) - set(cohort.answers)

    # --------------------------------------------------------- failure and time

    def _maybe_stuck(self, cohort: _Cohort) -> list[Effect]:
        """After the upload: abort at once when no message still possible can complete
        the phase (members down, signatures or answers refused); in the reveal, rebuild
        from what there is once every live member asked has answered."""
        if cohort.phase == "view":
            live = set(cohort.members) - cohort.down - cohort.badsig
            possible = len(cohort.sigs) + len(live - set(cohort.sigs))
            if possible < cohort.t:
                return self._abort(cohort, "too_few_signatures", f"{possible} possible")
        elif cohort.phase == "unmask":
            if self._owed(cohort):
                return []  # answers may still come
            done = self._try_finish(cohort) if len(cohort.answers) >= cohort.t else []
            if cohort.cid not in self._cohorts:
                return done
            return [*done, *self._give_up(cohort, "every member asked has answered")]
        return []

    def _give_up(self, cohort: _Cohort, when: str) -> list[Effect]:
        """Abort a reveal that cannot complete, naming why: too few answers, or survivors
        none of whose shares the answers hold (their bundles did not open at the members:
        a member that uploads garbage bundles makes its cohort abort, never succeed)."""
        if cohort.failed is not None:
            return self._abort(cohort, *cohort.failed)
        if len(cohort.answers) < cohort.t:
            return self._abort(cohort, "too_few_shares", f"{len(cohort.answers)} answers, {when}")
        held: dict[str, int] = dict.fromkeys(cohort.survivors, 0)
        for own, _ in cohort.answers.values():
            for owner in own:
                held[owner] += 1
        culprits = sorted(owner for owner, n in held.items() if n < cohort.t)
        if culprits:
            return [
                *(Metric("secagg_unrecoverable_member", 1.0, {"site": c}) for c in culprits[:16]),
                *self._abort(
                    cohort,
                    "unrecoverable_bundles",
                    f"members could not open the share bundles of {', '.join(culprits[:16])}",
                ),
            ]
        return self._abort(cohort, "shares_inconsistent", f"no t shares rebuild a secret, {when}")

    def on_peer_down(self, peer: str, now: float) -> list[Effect]:
        # A cohort that ends (or drops members from its view) frees its sites: the
        # joins they made meanwhile may seal the next cohort now.
        return [*self._on_peer_down(peer, now), *self._try_seal(now)]

    def _on_peer_down(self, peer: str, now: float) -> list[Effect]:
        if len(self._down) < 4 * MAX_COHORT:
            self._down.add(peer)
        for key in [k for k in self._waiting if k[0] == peer]:
            del self._waiting[key]  # the site joins again when it reconnects
        out: list[Effect] = []
        for cohort in list(self._cohorts.values()):
            if peer not in cohort.members:
                continue
            cohort.down.add(peer)
            if cohort.phase == "upload":
                if all(m in cohort.uploaded or m in cohort.down for m in cohort.members):
                    out.extend(self._close_upload(cohort, now))
            else:
                out.extend(self._maybe_stuck(cohort))
        return out

    def on_peer_up(self, peer: str, now: float) -> list[Effect]:
        """A member of a cohort orphaned by a restart hears that it was aborted; a member
        of a live cohort gets the cohort's current request again."""
        self._down.discard(peer)
        out: list[Effect] = []
        for cid, members in list(self._orphans.items()):
            if peer in members:
                out.append(Send(peer, SecAggAbort(cohort=cid, reason="restart")))
                members.discard(peer)
                if not members:
                    del self._orphans[cid]
                    out.append(
                        Persist(COORDINATOR_LOG_KEY, {"op": "close", "cohort": cid}, append=True)
                    )
        # A member of a live cohort that comes back may have lost what was sent to it
        # while it was away: send it again (members answer repeats idempotently).
        for cohort in self._cohorts.values():
            if peer not in cohort.members:
                continue
            cohort.down.discard(peer)
            if cohort.phase == "upload" and peer not in cohort.uploaded:
                out.append(Send(peer, cohort.seal))
            elif cohort.phase == "view" and peer not in cohort.sigs:
                out.append(
                    Send(
                        peer,
                        SecAggView(
                            cohort=cohort.cid, survivors=cohort.survivors, dropped=cohort.dropped
                        ),
                    )
                )
            elif (
                cohort.phase == "unmask"
                and peer in cohort.survivors
                and peer not in cohort.answers
                and peer not in cohort.bad
            ):
                out.append(Send(peer, self._unmask_for(cohort, peer)))
                cohort.asked.add(peer)
        return out

    def on_deadline(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        for cohort in list(self._cohorts.values()):
            if cohort.deadline > now:
                continue
            if cohort.phase == "upload":
                out.extend(self._close_upload(cohort, now))
            elif cohort.phase == "view":
                out.extend(
                    self._abort(cohort, "too_few_signatures", f"{len(cohort.sigs)} by the deadline")
                )
            else:
                done = self._try_finish(cohort) if len(cohort.answers) >= cohort.t else []
                out.extend(done)
                if cohort.cid in self._cohorts:
                    out.extend(self._give_up(cohort, "by the deadline"))
        out.extend(self._try_seal(now))
        return out

    def _abort(self, cohort: _Cohort, reason: str, detail: str) -> list[Effect]:
        self._forget(cohort)  # members that had not uploaded join again
        self._lost.append(len(cohort.members))  # no overlap until cohorts complete again
        msg = SecAggAbort(cohort=cohort.cid, reason=reason)
        return [
            Persist(COORDINATOR_LOG_KEY, {"op": "close", "cohort": cohort.cid}, append=True),
            *(Send(m, msg) for m in cohort.members if m not in cohort.down),
            Metric("secagg_cohort_aborted", 1.0, {"reason": reason}),
            # Every survivor of a cohort aborted after its view: a member that uploads
            # garbage is in all of them, so an operator finds it by intersection.
            *(Metric("secagg_site_in_aborted_cohort", 1.0, {"site": m}) for m in cohort.survivors),
            Log(
                "warning",
                f"secure aggregation: cohort aborted ({reason}: {detail})",
                {"cohort": cohort.cid.hex(), "reason": reason, "members": len(cohort.members)},
            ),
        ]

    def _forget(self, cohort: _Cohort) -> None:
        self._cohorts.pop(cohort.cid, None)
        self._last_members = cohort.members
        for m in cohort.members:
            key = (m, cohort.joins[m].seq)
            # A dropped member's update may have joined again and be sealed in a newer
            # cohort by now (``_close_upload`` let it go): that one keeps it.
            if self._in_cohort.get(key) == cohort.cid:
                del self._in_cohort[key]

    # ------------------------------------------------------------- durability

    def snapshot(self) -> dict[str, Any]:
        """The cohorts open now or orphaned (none of their data: they cannot resume)."""
        open_ = {cid: set(c.members) for cid, c in self._cohorts.items()}
        for cid, members in self._orphans.items():
            open_.setdefault(cid, set()).update(members)
        return {
            "open": [[cid, sorted(members)] for cid, members in open_.items()],
            "sealed": self._sealed,
        }

    def restore(
        self, state: Mapping[str, Any] | None, log: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        """Every cohort open at the checkpoint or opened in ``log`` and not closed becomes
        an orphan (``on_peer_up`` aborts it with its members). ValueError for bad state."""
        self._cohorts.clear()
        self._waiting.clear()
        self._in_cohort.clear()
        orphans: dict[bytes, set[str]] = {}
        try:
            sealed = int((state or {}).get("sealed", 0))
            for cid, members in (state or {}).get("open", ()):
                orphans[bytes(cid)] = {str(m) for m in members}
            for entry in log:
                if entry["op"] == "open":
                    orphans[bytes(entry["cohort"])] = {str(m) for m in entry["members"]}
                    sealed += 1
                elif entry["op"] == "close":
                    orphans.pop(bytes(entry["cohort"]), None)
                else:
                    raise ValueError(f"unknown secure-aggregation cohort record {entry['op']!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"secure-aggregation coordinator state is malformed: {exc}") from None
        # Orphans whose members never return would pile up over restarts: keep the newest.
        for cid in list(orphans)[: max(0, len(orphans) - MAX_ORPHANS)]:
            del orphans[cid]
        self._orphans = orphans
        self._sealed = sealed
