"""Root aggregator for synchronous rounds with deadlines.

FedAvg (McMahan et al., AISTATS 2017, Alg. 1) with FedProx clients (Li et al., MLSys 2020:
the proximal μ travels to the sites in ``train_config["mu"]``), plus FedScale-style
over-selection (Lai et al., ICML 2022): a round selects ⌈over_selection·K⌉ idle sites at
random and closes as soon as the fastest K have answered,

    Δ̄ = Σ_i n_i Δ_i / Σ_i n_i  (``weighting="examples"``),   w ← server_opt.step(w, Δ̄).

At ``round_timeout_s`` a round with ≥ ``min_cohort`` answers is aggregated anyway; one with
fewer is abandoned (its answers discarded, ``rounds_abandoned`` += 1) and a new round starts.
A round none of whose outstanding tasks can still be answered (their sites went down, or
answered late) ends at once the same way, with a WARNING: closed with the survivors if they
are ≥ ``min_cohort``, else abandoned and a new round drawn among the live sites.
An update that answers no task of the open round (a closed or abandoned round, or from an
unselected site) is "late": recorded and acked, never applied (metric "update_late").
Each round is an intake epoch (``AggregatorBase``): beyond its own round task a site gets
one decided update per round, so late floods cost no more than one log write per round.
Claims are bounded and deltas clipped as for FedBuff (``intake``, ``robust.NormClip``), and
a round whose aggregate or new model is not finite is closed without a step.

States (``RoundState``): WAITING — fewer than ``min_available`` sites are up and idle; a
round starts as soon as enough are (checked on every event, including Hello and deadlines).
A site that died must not stall the federation for good: once fewer than ``min_available``
have been idle for ``round_timeout_s`` (``QUIET_AFTER_S`` without one) and at least
``min_cohort`` are, rounds start with the idle sites (a WARNING once, metric
``round_degraded`` each time) until ``min_available`` are back. Fewer live sites than
``min_cohort`` (deaths, when a round selects every site) cannot fill a round at all: after
the same wait, rounds are drawn among all the live idle sites and close with as many
answers as they drew (a WARNING once per such spell, metric ``round_unfillable`` each
round) until ``min_cohort`` sites are up again. COLLECTING — a round is open.

Durability: the open round survives a restart. Its start is checkpointed (every
``checkpoint_every``-th round; the model, the round's tasks and the buffer) before any
``TrainRequest`` leaves, and every answer's "applied" record carries its delta, round and
task, so ``restore`` rebuilds the round's buffer exactly and counts each answer once; a
record of a later round closes the one before as the live node did (with ≥ ``min_cohort``
answers it was aggregated, else abandoned). The clock is not durable: a restored round's
deadline is ``round_timeout_s`` after the first event. Answers to the tasks of a round whose
start was not checkpointed are late (only with ``checkpoint_every`` > 1).

Secure aggregation (``set_secure_aggregation``, ``algorithms.secagg``): the sites' answers
are ``SecAggJoin``s and the round is ONE cohort. A join that answers a task of the open
round on its model waits in the coordinator; the cohort is sealed when K sites joined (the
coordinator's ``cohort_size``), or at the round deadline / once no task of the round is
outstanding, with the joins there are if at least t(K) = max(min_cohort, (K + c) // 2 + 1)
(c = ``max_colluders``; else the round is abandoned and its joins recorded late). After the
seal the round waits for the cohort alone (its upload and unmask deadlines bound it), and
its survivors' unmasked sum is the round's step, Δ̄ = Σ w_i x_i / Σ w_i (w_i the members'
own example weights; no staleness: every member trained on the round's model; with central
DP every w_i = 1, the members add the noise and the step is Σ x_i / K, see
``_cohort_step``). Joins of stragglers, of an unselected site or of an older round are late
(recorded, acked, never masked). A cohort that aborts (fewer than t uploads, signatures or
shares) abandons the round and a new one starts. So a round ends within round_timeout_s +
upload_timeout_s + unmask_timeout_s. Restart: the round's start is checkpointed as without
masking, its cohort record (``op = "cohort"``) carries the round; joins are not durable: a
restored open round takes its sites' joins again as they reconnect, while a cohort sealed
before the crash is an orphan, aborted as its members return (those that uploaded drop the
update; the round goes on without them).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.aggregator_base import (
    APPLIED_KEY,
    CHECKPOINT_KEY,
    QUIET_AFTER_S,
    AggregatorBase,
    Outcome,
    OwnModel,
    checkpoint_interval,
)
from fedloom.algorithms.dp.ledger import PrivacyEvent
from fedloom.algorithms.dp.release import (
    DpRelease,
    check_privacy_log,
    effective_noise_multiplier,
    recorded_noise,
    restore_privacy,
)
from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.protocol import (
    NO_RECORDS,
    Effect,
    Event,
    Log,
    Metric,
    Persist,
    ProtocolMisuseError,
    RecordSource,
    Send,
    Weights,
)
from fedloom.algorithms.server_opt import ServerOptimizer, ServerSGD
from fedloom.algorithms.update_buffer import UpdateBuffer
from fedloom.algorithms.validation import is_int
from fedloom.transport.wire import SecAggJoin, TrainRequest, Update

__all__ = ["RoundState", "SyncAggregator"]


class RoundState(enum.Enum):
    WAITING = "waiting"
    COLLECTING = "collecting"


class SyncAggregator(OwnModel, AggregatorBase):
    """Sans-I/O FedAvg/FedProx root: ``handle(event, now) -> effects``; holds the model."""

    _dp: DpRelease | None = None  # central DP (``set_privacy``)
    _replay_noise: tuple[float, float, int, int] | None = None  # a replayed cohort's noise

    def __init__(
        self,
        node_id: str,
        children: Mapping[str, str],
        weights: Weights,
        *,
        clients_per_round: int,
        over_selection: float = 1.0,
        round_timeout_s: float | None = None,
        min_cohort: int | None = None,
        min_available: int | None = None,
        server_opt: ServerOptimizer | None = None,
        train_config: Mapping[str, Any] | None = None,
        rng: np.random.Generator | int = 0,
        weighting: str = "examples",
        clip_norm: object = "auto",
        robust: str = "mean",
        trim_fraction: float = 0.1,
        checkpoint_every: int = 1,
        log_deltas: bool = True,  # the open round is rebuilt from its records on restart
        version: int = 0,
        claim_bounds: ClaimBounds | None = None,
    ) -> None:
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        if not over_selection >= 1.0:
            raise ValueError(f"over_selection must be >= 1, got {over_selection}")
        if round_timeout_s is not None and not round_timeout_s > 0.0:
            raise ValueError(f"round_timeout_s must be > 0 or None, got {round_timeout_s}")
        k = clients_per_round
        cohort = k if min_cohort is None else min_cohort
        if not 1 <= cohort <= k:
            raise ValueError(f"min_cohort must be in [1, {k}], got {min_cohort}")
        available = k if min_available is None else min_available
        if available < 1:
            raise ValueError(f"min_available must be >= 1, got {min_available}")
        regions = [c for c, r in children.items() if r == "region"]
        if regions:
            # A region's aggregate answers no round task: every one of them would be late.
            raise ValueError(
                f"synchronous rounds need site children; {regions[:3]} are regions "
                "(use FedBuff or FedAsync for hierarchical plans)"
            )
        selected = math.ceil(over_selection * k - 1e-9)
        super().__init__(
            node_id,
            children,
            concurrency=selected,
            task_timeout_s=None,  # the round deadline bounds every task
            rng=rng,
            train_config=train_config,
            log_deltas=log_deltas,
            claim_bounds=claim_bounds,
        )
        self._init_model(weights, version)
        self.clients_per_round = k
        self.selected_per_round = selected
        self.round_timeout_s = round_timeout_s
        self.min_cohort = cohort
        self.min_available = available
        self.checkpoint_every = checkpoint_interval(checkpoint_every)
        self._opt: ServerOptimizer = server_opt if server_opt is not None else ServerSGD()
        self._buffer_args: dict[str, Any] = {
            "weighting": weighting,
            "robust": robust,
            "trim_fraction": trim_fraction,
            "clip_norm": clip_norm,
        }
        self._buffer = UpdateBuffer(self._weights, **self._buffer_args)
        self._quota_solicited = False  # one task per site and round
        self.state = RoundState.WAITING
        self.round = 0
        self._round_tasks: dict[int, str] = {}  # task -> site, outstanding in the open round
        self._round_members: list[tuple[str, int]] = []  # (src, seq) applied this round
        self._round_lost = False  # a round task ended unanswered (site down, late answer)
        self._tasks_known = True  # False for a round rebuilt from records alone
        self._deadline: float | None = None
        self._restart_deadline = False  # a restored open round: deadline from the next event
        self._short_since: float | None = None  # since when too few sites were idle
        self._degraded = False  # rounds start below min_available (sites down)
        self._unfillable = False  # rounds start below min_cohort (fewer sites are up)
        self._round_min = cohort  # answers the open round closes with (< cohort: unfillable)
        self.rounds_closed = 0
        self.rounds_abandoned = 0
        # Secure aggregation: the open round's joins passed to the coordinator, and its
        # cohort once sealed.
        self._round_joins: dict[tuple[str, int], None] = {}
        self._round_cohort: bytes | None = None

    def set_privacy(self, dp: DpRelease) -> None:
        """Central DP (``algorithms.dp.release``): each closed round releases the noised
        mean of its clipped answers over the fixed cohort ``clients_per_round``, with the
        sampling rate of its draw (m of the idle sites); the budget stops the rounds. Call
        it before the first event or restore."""
        self._dp = dp

    def next_deadline(self) -> float | None:
        own = self._round_deadline()
        start = self._quorum_deadline()  # no round opens before the start quorum
        secure = self._secagg.next_deadline() if self._secagg is not None else None
        retry = self._refusals.next_retry()  # a refusing site's backoff ends
        times = (own, start, secure, retry)
        return min((t for t in times if t is not None), default=None)

    def _round_deadline(self) -> float | None:
        if self.state is RoundState.WAITING and self._short_since is not None:
            # Only while still ahead: once passed, an event that brings idle sites starts
            # the round (a deadline in the past would fire again and again).
            wait = self._short_since + self._wait_bound()
            return wait if wait > self._now else None
        return self._deadline

    def handle(self, event: Event, now: float) -> list[Effect]:
        if self._restart_deadline:
            self._restart_deadline = False
            if self.round_timeout_s is not None:
                self._deadline = now + self.round_timeout_s
        out = super().handle(event, now)
        if self.state is RoundState.COLLECTING and self._secagg is not None:
            if self._secure_round_over(now, out):
                self._release_held(now, out)
                self._fill(now, out)
        elif self.state is RoundState.COLLECTING and self._tasks_known and not self._round_tasks:
            # No outstanding task can be answered any more: waiting out the deadline
            # would only stall the federation.
            self._end_with_survivors(out)
            self._release_held(now, out)
            self._fill(now, out)
        return out

    # -------------------------------------------------------------- rounds
    def _wait_bound(self) -> float:
        """How long fewer than ``min_available`` idle sites hold back the next round."""
        return self.round_timeout_s if self.round_timeout_s is not None else QUIET_AFTER_S

    def _fill(self, now: float, out: list[Effect]) -> None:
        """Start a round when none is open and enough sites are up and idle (or, after
        ``_wait_bound``, at least ``min_cohort``: sites that died must not stall it)."""
        if self.state is RoundState.COLLECTING or self._holding:
            return
        if self._dp is not None and self._dp.stops(out):
            return  # the privacy budget is spent: no more rounds
        d = self._dispatcher
        if d.in_flight > 0:
            return
        idle = d.idle_count
        if d.up_count >= self.min_cohort:
            self._unfillable = False
        if idle >= self.min_available:
            self._short_since = None
            self._degraded = False
        elif idle < self.min_cohort:
            if not self._unfillable_start(now, idle, out):
                return  # not even a cohort: nothing to run (the wait keeps counting)
        elif self._short_since is None:
            self._short_since = now
            return
        elif not self._degraded and now < self._short_since + self._wait_bound():
            return
        else:
            if not self._degraded:
                self._degraded = True
                out.append(
                    Log(
                        "warning",
                        "starting rounds with fewer sites than min_available: the others are "
                        "down or busy",
                        {"idle": idle, "min_available": self.min_available, "up": d.up_count},
                    )
                )
            out.append(Metric("round_degraded", 1.0, {"idle": str(idle)}))
        if self._dp is not None and not self._dp.open_round(self.selected_per_round, idle):
            self._dp.stops(out)  # this round's release would exceed the budget
            return
        self.round += 1
        self.state = RoundState.COLLECTING
        self._round_lost = False
        self._tasks_known = True
        self._deadline = None if self.round_timeout_s is None else now + self.round_timeout_s
        # With DP the draw comes from the noise secret, not the config's seed (unpredictable).
        rng = None if self._dp is None else self._dp.draw_rng(self.round)
        started = d.start(now, limit=self.selected_per_round, rng=rng)
        self._round_tasks = dict(started)
        # Below min_cohort only when too few sites are up (``_unfillable_start``).
        self._round_min = max(1, min(self.min_cohort, len(started)))
        if self.checkpoint_every and self.round % self.checkpoint_every == 0:
            # Durable before any task leaves: a restart knows the round and its tasks.
            out.append(Persist(CHECKPOINT_KEY, self.snapshot()))
        for task, site in started:
            out.append(
                Send(site, TrainRequest(task, self._version, self._weights, self._task_config()))
            )
        out.append(Metric("round_started", float(self.round), {"selected": str(len(started))}))

    def _unfillable_start(self, now: float, idle: int, out: list[Effect]) -> bool:
        """Fewer than ``min_cohort`` sites are idle: True when a round should start anyway
        among them, because fewer than ``min_cohort`` are up at all (the others died) and
        that has lasted ``_wait_bound``: no round could ever fill, and waiting for the dead
        would stop training for good. Says so once per spell; a metric each round."""
        d = self._dispatcher
        if idle < 1 or d.up_count >= self.min_cohort:
            return False  # busy or backed-off sites will be back: wait for them
        if self._short_since is None:
            self._short_since = now
        if not self._unfillable and now < self._short_since + self._wait_bound():
            return False
        if not self._unfillable:
            self._unfillable = True
            out.append(
                Log(
                    "warning",
                    "fewer live sites than min_cohort: rounds cannot fill, so they run with "
                    "the live sites and close with their answers until enough are back",
                    {"up": d.up_count, "idle": idle, "min_cohort": self.min_cohort},
                )
            )
        out.append(Metric("round_unfillable", 1.0, {"idle": str(idle)}))
        return True

    def _on_task_cancelled(self, task: int) -> None:
        if self._round_tasks.pop(task, None) is not None:
            self._round_lost = True

    def _refused_task_site(self, task: int) -> str | None:
        """A refusal answers a task of the open round like a dropout (the round ends with
        the others, or is drawn again among the live sites); the round's own task list
        counts too, as it survives a restart that the dispatcher's does not."""
        site = super()._refused_task_site(task)
        if site is None and self.state is RoundState.COLLECTING:
            site = self._round_tasks.get(task)
        return site

    def _end_with_survivors(self, out: list[Effect]) -> None:
        """No task of the round is outstanding (all answered, in a round that drew fewer
        than K sites, or lost): close it with the answers it has (≥ ``min_cohort``) or
        abandon it, so that a new round draws among the live sites."""
        answers = len(self._buffer)
        if self._round_lost:
            out.append(
                Log(
                    "warning",
                    "round lost its outstanding tasks (sites down or late): ending it now",
                    {"round": self.round, "answers": answers, "min_cohort": self.min_cohort},
                )
            )
        if answers >= self._round_min:
            self._close_round("survivors" if self._round_lost else "all_answered", out)
        else:
            self._abandon(out)

    def _epoch_size(self) -> int:
        return self.clients_per_round

    def _accept(
        self,
        peer: str,
        msg: Update,
        reason: str | None,
        version: int,
        now: float,
        out: list[Effect],
    ) -> None:
        # The round's own task list, not the dispatcher's: it survives a restart.
        in_round = (
            self.state is RoundState.COLLECTING
            and is_int(msg.task)
            and self._round_tasks.get(msg.task) == peer
        )
        if in_round:
            del self._round_tasks[msg.task]
            self._complete_task(peer, msg)
        if reason is not None:
            self._round_lost = self._round_lost or in_round
            self._reject(peer, msg, reason, version, out)
            return
        if not in_round or msg.base_version != version:
            self._round_lost = self._round_lost or in_round
            self.late += 1
            out.append(Metric("update_late", 1.0, {"src": msg.src}))
            self._record(peer, msg, Outcome.LATE, version, out, tau=version - msg.base_version)
            return
        if self._buffer.add(msg.delta, 1.0, msg.n_examples, msg.count, self._norm, msg.src):
            out.append(Metric("update_clipped", 1.0, {"src": msg.src}))
        self._round_members.append((msg.src, msg.seq))
        # A round drawn below min_cohort records its own minimum: a replay ends it alike.
        short = {} if self._round_min >= self.min_cohort else {"cohort_min": self._round_min}
        self._record_applied(
            peer, msg, version, 0, 1.0, out, round=self.round, task=msg.task, **short
        )
        out.append(Metric("buffer_fill", float(len(self._buffer))))
        if len(self._buffer) >= self.clients_per_round:
            self._close_round("quorum", out)

    def _on_deadline(self, now: float, out: list[Effect]) -> None:
        if self._deadline is None or now < self._deadline:
            return
        if self._secagg is not None:
            self._deadline = None  # from here the cohort's own deadlines bound the round
            self._seal_or_abandon(now, out)
            return
        if len(self._buffer) >= self._round_min:
            self._close_round("deadline", out)
            return
        self._abandon(out)

    def _abandon(self, out: list[Effect]) -> None:
        """Too few answers: discard them (they stay acked and in the ledger)."""
        if self._secagg is not None:
            self._discard_joins(out)
        self.rounds_abandoned += 1
        for src, seq in self._round_members:
            out.append(Metric("update_discarded", 1.0, {"src": src, "seq": str(seq)}))
        out.append(Metric("round_abandoned", float(len(self._buffer))))
        out.append(
            Log("warning", "round abandoned", {"round": self.round, "answers": len(self._buffer)})
        )
        if len(self._buffer):
            self._buffer.flush()
        self._end_round()

    def _close_round(self, why: str, out: list[Effect]) -> None:
        dp = self._dp
        n_updates = len(self._buffer)
        if dp is None:
            delta: Weights | None = self._buffer.flush().delta
        else:  # the noised mean over the round's fixed cohort (``algorithms.dp.release``)
            event = dp.event(dp.pending_q)
            delta = dp.flush(self._buffer, self._weights, self._version + 1, event, out)
        if delta is None or not self._apply_step(self._opt, delta, out):
            self.rounds_abandoned += 1
            self._end_round()
            return
        self._version += 1
        if dp is not None:
            dp.record(self._version, event, out)
        self.rounds_closed += 1
        out.append(Metric("round_closed", float(n_updates), {"reason": why}))
        out.append(Metric("model_version", float(self._version)))
        self._end_round()
        # No Send of the new model here (sync roots have no region children): it leaves
        # with the next round's tasks, after that round's start is checkpointed.

    def _end_round(self) -> None:
        # Stragglers of this round are released: their answers will be late.
        for task in self._dispatcher.tasks():
            self._dispatcher.cancel(task)
        self._round_tasks = {}
        self._round_lost = False
        self._round_members = []
        self._round_joins = {}
        self._round_cohort = None
        self._deadline = None
        self._round_min = self.min_cohort
        self.state = RoundState.WAITING
        self._end_epoch()

    # ------------------------------------------------------ secure aggregation
    def _secure_round_over(self, now: float, out: list[Effect]) -> bool:
        """After an event of an open secure round: note its cohort once sealed, seal (or
        abandon) once no task is outstanding, abandon it when its cohort aborted. True
        when the round ended here (a new one may start)."""
        coord = self._secagg
        if self._round_cohort is None:
            opened = coord.open_cohorts()
            if opened:  # K sites joined: sealed during this event
                self._round_cohort, self._deadline = opened[0], None
                return False
            if self._tasks_known and not self._round_tasks:
                self._seal_or_abandon(now, out)  # every task joined or lost
                return self.state is RoundState.WAITING
            return False
        if self._round_cohort in coord.open_cohorts():
            return False  # in progress: its upload and unmask deadlines bound it
        # It ended without a result (a result closes the round in ``_cohort_step``).
        out.append(Log("warning", "round's secure cohort aborted: round abandoned", {}))
        self._abandon(out)
        return True

    def _seal_or_abandon(self, now: float, out: list[Effect]) -> None:
        """Seal the round's waiting joins now if they are enough, else abandon the round."""
        coord = self._secagg
        if coord.waiting() >= self.min_cohort:
            out.extend(coord.seal_now(now))
        opened = coord.open_cohorts()
        if opened:
            self._round_cohort, self._deadline = opened[0], None
        else:
            self._abandon(out)

    def _join_admitted(self, peer: str, msg: SecAggJoin, version: int, out: list[Effect]) -> bool:
        """A join answering a task of the open round on its model waits for the round's
        cohort (until it is sealed); any other is late: recorded and acked, never masked."""
        key = (peer, int(msg.seq))
        task = int(msg.task) if is_int(msg.task) else None
        collecting = self.state is RoundState.COLLECTING
        if collecting and key in self._round_joins:
            # A resend (reconnect, abort before upload): the coordinator answers it while
            # the cohort is not sealed, or when it is a member of the sealed one.
            cid = self._round_cohort
            if cid is None or self._secagg.cohort_of(peer, key[1]) == cid:
                return True
        elif (
            collecting
            and self._round_cohort is None
            and task is not None
            and self._round_tasks.get(task) == peer
            and msg.base_version == version
        ):
            del self._round_tasks[task]
            self._round_joins[key] = None
            return True
        if collecting and task is not None and self._round_tasks.get(task) == peer:
            del self._round_tasks[task]  # answered, but too late for the round's cohort
            self._round_lost = True
        elif self._free.get(peer, 0) >= self._quota(peer):
            # Answers no task of the round: within the site's share of it, as a plain late
            # update (``_within_quota``), else a flood of joins is a durable write each.
            # Unacked: the site joins again later.
            self.dropped += 1
            out.append(Metric("update_dropped", 1.0, {"src": peer, "reason": "quota"}))
            return False
        self.late += 1
        out.append(Metric("update_late", 1.0, {"src": msg.src}))
        self._record_join(msg, Outcome.LATE, version, out)
        return False

    def _record_join(
        self, msg: SecAggJoin, outcome: Outcome, version: int, out: list[Effect], **extra: Any
    ) -> None:
        """Record (and ack) an update known by its join only: nothing of it was masked."""
        stand_in = Update(msg.src, msg.seq, msg.base_version, {}, msg.n_examples, 1, msg.task)
        self._unasked = False
        tau = version - int(msg.base_version)
        self._record(msg.src, stand_in, outcome, version, out, tau=tau, **extra)

    def _discard_joins(self, out: list[Effect]) -> None:
        """The round ends unsealed: its waiting joins are recorded late (acked: the sites
        drop them, as a plain abandoned round's answers are discarded)."""
        for join in self._secagg.drop_waiting():
            out.append(Metric("update_discarded", 1.0, {"src": join.src, "seq": str(join.seq)}))
            self._record_join(join, Outcome.LATE, self._version, out, reason="round_abandoned")

    def _cohort_step(
        self,
        delta: Weights,
        n_examples: int,
        pairs: list[tuple[str, int]],
        s: float,
        version: int,
        out: list[Effect],
    ) -> None:
        """The round's cohort completed (``AggregatorBase._apply_cohort``, recorded
        first): Δ̄ = Σ w_i x_i / Σ w_i over its survivors is the round's one server step.

        With central DP (as FedBuff's ``_cohort_step``) every member weighed 1 (the seal's
        weight_cap is 1) and added σ_member of discrete Gaussian noise before masking: the
        step is Σ x_i / K (K = ``clients_per_round``, the fixed denominator, not |U|),
        nothing is added here, and the release is checked against the budget first, then
        recorded with the effective z of the |U| members' noise and the sampling rate q of
        the round's draw (durable in the cohort's record, so a replay records the same)."""
        if self._secagg.waiting():
            self._discard_joins(out)  # none in practice: every admitted join was sealed
        dp = self._dp
        event = None
        if dp is not None:
            noise = self._replay_noise or self.secagg_noise
            if noise is None:  # a factory bug, not peer input: nothing is released
                raise ProtocolMisuseError("a secure cohort under central DP without its noise")
            sigma, clip, bits, dim = noise
            z = effective_noise_multiplier(sigma, len(pairs), clip, bits, dim)
            event = PrivacyEvent(z, dp.pending_q)
            if not dp.check(event):
                dp.refused += 1
                out.append(Metric("privacy_release_refused", float(len(pairs))))
                self.rounds_abandoned += 1
                self._end_round()
                return
            scale = len(pairs) / dp.denominator  # Σw = |U| (uniform): Σx / K
            delta = {k: (v * scale).astype(v.dtype, copy=False) for k, v in delta.items()}
        if not self._apply_step(self._opt, delta, out):
            self.rounds_abandoned += 1
            self._end_round()
            return
        self._version += 1
        if dp is not None and event is not None:
            dp.record(self._version, event, out)
        self.rounds_closed += 1
        out.append(Metric("round_closed", float(len(pairs)), {"reason": "cohort"}))
        out.append(Metric("model_version", float(self._version)))
        self._end_round()

    def _cohort_record_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"round": self.round}
        if self._dp is not None:  # the round's sampling rate: its release's, on a replay
            extra["q"] = self._dp.pending_q
            if self.secagg_noise is not None:  # and its noise (``recorded_noise``)
                extra["noise"] = list(self.secagg_noise)
        return extra

    def _replay_cohort_record(self, rec: Mapping[str, Any]) -> None:
        """A cohort record closes its round (``restore``); rounds before it that left no
        record were abandoned (their joins are not durable)."""
        r = int(rec.get("round", self.round))
        skipped = r - self.round - (0 if self.state is RoundState.COLLECTING else 1)
        self.rounds_abandoned += max(0, skipped)
        self.round = r
        self.state = RoundState.COLLECTING
        if self._dp is not None and "q" in rec:
            q = rec["q"]
            self._dp.pending_q = None if q is None else float(q)
        self._replay_noise = recorded_noise(rec)
        try:
            super()._replay_cohort_record(rec)
        finally:
            self._replay_noise = None

    # ---------------------------------------------------------- durability
    def snapshot(self) -> dict[str, Any]:
        """Model, optimiser, ledger, round counter and the open round (its tasks, answers
        and buffer). Pair it with the "applied" records written after it for ``restore``."""
        return {
            **self._base_snapshot(),
            "kind": "sync",
            "version": self._version,
            "round": self.round,
            "weights": self._weights,
            "opt": self._opt.snapshot(),
            "open": self.state is RoundState.COLLECTING,
            "round_tasks": [[task, site] for task, site in self._round_tasks.items()],
            "members": [[src, seq] for src, seq in self._round_members],
            "round_min": self._round_min,
            "buffer": self._buffer.snapshot(),
            "rounds_closed": self.rounds_closed,
            "rounds_abandoned": self.rounds_abandoned,
            **({} if self._dp is None else {"privacy": self._dp.snapshot()}),
        }

    def restore(
        self, checkpoint: Mapping[str, Any] | None, records: RecordSource = NO_RECORDS
    ) -> None:
        """Load ``snapshot()`` output (None: this fresh node's own), then replay the
        "applied" records written after it (``algorithms.protocol.Restorable``): answers of
        the open round go back into its buffer (closing it at quorum), and a record of a
        later round ends the one before as it ended live."""
        state = self.snapshot() if checkpoint is None else checkpoint
        if state.get("kind") != "sync":
            raise ValueError(f"not a sync snapshot: {state.get('kind')!r}")
        self._base_restore(state)
        self._version = int(state["version"])
        self.round = int(state["round"])
        self._weights = dict(state["weights"])
        self._opt.restore(state["opt"])
        restore_privacy(self._dp, state, self._version, records)  # refuses a lost ledger
        self.rounds_closed = int(state.get("rounds_closed", 0))
        self.rounds_abandoned = int(state.get("rounds_abandoned", 0))
        self._buffer = UpdateBuffer(self._weights, **self._buffer_args)
        if "buffer" in state:  # older checkpoints: taken between rounds, none open
            self._buffer.restore(state["buffer"])
        open_round = bool(state.get("open", False))
        self.state = RoundState.COLLECTING if open_round else RoundState.WAITING
        self._round_tasks = {int(t): str(site) for t, site in state.get("round_tasks", ())}
        self._round_members = [(str(src), int(seq)) for src, seq in state.get("members", ())]
        self._round_min = int(state.get("round_min", self.min_cohort))
        self._round_lost = False
        self._tasks_known = True
        self._round_joins = {}
        self._round_cohort = None
        self._replay_records(records.records(APPLIED_KEY))
        check_privacy_log(self._dp, records)
        self._restore_secagg(state, records)  # cohorts open at the crash: orphans
        self._restart_deadline = self.state is RoundState.COLLECTING

    def _replay(self, record: Mapping[str, Any]) -> None:
        """Re-apply an answer (see ``restore``); rounds end here exactly as they did live."""
        r = int(record.get("round", self.round))
        if r != self.round or self.state is RoundState.WAITING:
            if self.state is RoundState.COLLECTING:
                # A later round started, so this one ended: by quorum it would have closed
                # on its own record; otherwise by deadline or losing its tasks, which
                # aggregate iff min_cohort answers are in.
                if len(self._buffer) >= self._round_min:
                    self._close_round("deadline", [])
                else:
                    self._abandon([])
            self.round = r
            self.state = RoundState.COLLECTING
            self._round_tasks = {}  # its start was not checkpointed: its tasks are unknown
            self._tasks_known = False
        if "cohort_min" in record:  # a round drawn below min_cohort (``_unfillable_start``)
            self._round_min = int(record["cohort_min"])
        task = record.get("task")
        if isinstance(task, int):
            self._round_tasks.pop(task, None)
        self._buffer.add(
            record["delta"],
            1.0,
            int(record["n_examples"]),
            int(record["count"]),
            src=str(record["src"]),
        )
        self._round_members.append((str(record["src"]), int(record["seq"])))
        if len(self._buffer) >= self.clients_per_round:
            self._close_round("quorum", [])
