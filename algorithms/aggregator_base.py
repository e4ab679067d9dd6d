"""The child-facing half every tree aggregator shares (root FedBuff/FedAsync/Sync, regions).

* Children are given as ``{child_id: role}``, role "site" (gets training tasks through a
  ``TaskDispatcher``) or "region" (gets every new ``ModelBroadcast``). A child counts as up
  from its ``Hello`` until ``PeerDown``; a site's task ends with its answer, ``PeerDown`` or
  a timeout. The runtime reports a new session only after the old one's ``PeerDown``, so a
  further ``Hello`` in a session changes nothing (metric ``hello_repeated``): no task is
  cancelled or re-issued and no model re-sent, and a stream of 46-byte Hellos buys nothing.
  (A child says Hello again when nothing answered its first: the Hello, or the model sent
  for it, may be lost on a lossy link that stays up. A region child then gets the model
  again, at most once per ``HELLO_MODEL_RESEND_S``: a reconnect would buy as much.)
* Intake of an ``Update``: sender must be a child speaking for itself and ``seq`` ≥ 1 (else
  rejected, not acked); an already recorded ``(src, seq)`` is a duplicate: metric + re-ack,
  never applied again; otherwise the subclass decides (applied / stale / late / rejected)
  and ``_record`` writes ``Persist("applied", {...}, append=True)`` *then* ``Send(Ack)``.
  Rejected updates from a child are recorded and acked too, so a poisoned update is not
  resent forever; the ``outcome`` field of the record says what happened.
* One child cannot fill a buffer (or flood the log) while others are active. A child's share
  of an aggregation epoch (a flush, a round, ``concurrency`` FedAsync steps) is
  ``intake.intake_quota``: ⌈K / n⌉, at least one, n being the child itself and the other
  ACTIVE children: up, and an update of theirs entered the aggregation, or (a site) they
  were given the task they hold, within ``quiet_after_s`` (default ``task_timeout_s``, else
  ``QUIET_AFTER_S``; for a region, which takes no tasks, at most ``QUIET_AFTER_S``); a
  site whose last task timed out unanswered is not active. A child
  that is connected but quiet (a region whose hospitals are offline, a hostile one that
  says Hello and nothing else, a site holding its task and never answering) thus holds
  the others back for at most ``quiet_after_s``; one that never sent an update is not
  active at all, and with no other child active the one sending may fill the epoch (the
  norm clip still bounds each update). The node asks for a deadline when an active child
  turns quiet while anything waits, and then takes up what it held. Which children were
  active is checkpointed; after a restart they count as active for ``quiet_after_s`` from
  the first event. Unasked updates (``task`` unknown, finished or someone else's) are
  taken only within the share. Only applied updates use the share (a buffer slot each);
  stale, late and rejected decisions are counted apart, against the same share for
  unasked updates (a flood of them would flood the log), so stale resends of updates kept
  across a failover never hold back the task answers that fill the buffer. What else
  counts depends on what defends the aggregate:

  - Robust aggregation (median, trimmed mean; ``_variety_quota``) needs a variety of
    inputs, so EVERY update counts against the share: task answers and regions' forwards
    too. A site that has used its share gets no new task until the epoch ends (the
    dispatcher benches it), so an honest fast site simply waits for the next flush and has
    nothing held; a site answering faster than asked still gets at most its share.
  - The mean (FedBuff's own rule) takes every answer to a task this node gave a site (one
    per task; the dispatcher, not the site, decides who gets tasks), so a fast honest site
    supplies many slots of a buffer, as FedBuff intends. What bounds one update there is the
    norm clip (``robust.NormClip``), whose "auto" bound for a child is learnt from the
    OTHER children's norms: a fast or hostile site cannot raise the bound it meets. A site
    whose unasked update was taken in an epoch has its task answers counted against its
    share until the epoch ends (else it would get an unasked update plus its task answer
    into every buffer). A region gets no tasks: every forward of it is taken like a task
    answer, each delta clipped, so a flooding region moves the model at most by the clip
    per flush. (A limit of K − 1 slots a flush per region was tried: a region forwarding
    just often enough to count as active then paced its siblings, 66 versions in 2 h
    instead of 3,600. Under the mean liveness wins; robust aggregation waits.)
  An update over the quota is neither recorded nor acked: it is held in memory (at most
  ``MAX_HELD_SITE`` per site, ``MAX_HELD_REGION`` per region) and decided after the epoch
  ends; beyond that it is dropped (metric ``update_dropped``, one warning per child and
  epoch) without any durable write. The child still holds what was not acked and resends it
  after its next reconnect, so nothing acknowledged is lost. After a restart the sites'
  resent, now unsolicited, updates are thus taken one per site and epoch.
* Claims are bounded (``intake.ClaimBounds``): a site's ``count`` must be 1, a region's is
  clamped to what its subtree could produce, ``n_examples`` to the declared examples; a
  delta whose L2 norm overflows is rejected ("norm_overflow").
* Refusals (``TrainRefused``, ``algorithms.refusals``): a site that does not train its task
  says so; believable only from the site for a task it holds (or relayed by a region child
  for a site it can speak for, rate-limited; one it cannot is counted under the region).
  Counted (``site_refusals``, one WARNING per site and code, ``refusals_view()``), the
  task's slot freed as for a site going down, the site given no task for a backoff
  (``set_refusal_backoff``: the first one's length, ``refusals.BACKOFF_S`` unless set); a
  region passes it up. Not durable.
* The "applied" log is also the recovery log: a record carries what is needed to replay it
  (staleness weight, counts and, for applied updates, the delta). ``restore(snapshot,
  records)`` loads a checkpoint and replays the records written after it (``n`` > the
  checkpoint's ``log_n``), reproducing the state the node had acknowledged.

* A start quorum (``set_start_quorum``; off unless set): the first training tasks and model
  broadcasts of each incarnation wait until ``quorum`` distinct rostered children are up
  (said Hello and not gone down since) or ``wait_s`` seconds have passed since the node's
  first event, whichever comes first; children that come up later join as before. Without
  it, the child that connects first gets the model alone and, as the only active child,
  fills the first buffers by itself. Updates are taken as always meanwhile (only what this
  node sends out waits), nothing of it is durable, and a restart waits again: its
  children's links are all new, so the same race repeats, and the wait is bounded. A dead,
  hostile or flapping child therefore delays the start by ``wait_s`` at most. A region
  says ``Hello`` to its parent only when its own wait is over (its forwards are resent at
  once), so a parent's quorum counts the regions that can put their sites to work.

Every handler is O(1) or O(log n) in the number of children, apart from broadcasts, which
are O(regions) per new model version, the share of an update (O(children up): who is
active), and, under robust aggregation, a site coming up, going down or timing out, which
re-benches the sites that used their share (O(children)).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.dispatcher import TaskDispatcher
from fedloom.algorithms.incorporation import PairLedger
from fedloom.algorithms.intake import ClaimBounds, intake_quota
from fedloom.algorithms.ledger import AppliedLedger
from fedloom.algorithms.node_util import as_generator, unexpected
from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    Event,
    Log,
    Metric,
    PeerDown,
    PeerUp,
    Persist,
    ProtocolMisuseError,
    Received,
    Send,
    Weights,
)
from fedloom.algorithms.refusals import (
    RefusalBook,
    clean_code,
    clean_text,
    is_clean_id,
    metric_code,
)
from fedloom.algorithms.server_opt import ServerOptimizer
from fedloom.algorithms.validation import check_update_norm, is_int
from fedloom.algorithms.warn_limit import WarnLimiter
from fedloom.algorithms.weights_math import is_finite
from fedloom.transport.wire import (
    Ack,
    Heartbeat,
    Hello,
    MaskedUpdate,
    Message,
    ModelBroadcast,
    Overlap,
    SecAggJoin,
    SecAggShares,
    SecAggViewSig,
    TrainRefused,
    TrainRequest,
    Update,
)

__all__ = [
    "APPLIED_KEY",
    "CHECKPOINT_KEY",
    "HELLO_MODEL_RESEND_S",
    "HELLO_RETRY_MAX_FACTOR",
    "MAX_HELD_REGION",
    "MAX_HELD_SITE",
    "QUIET_AFTER_S",
    "ROLES",
    "AggregatorBase",
    "Outcome",
]

ROLES = ("site", "region")
APPLIED_KEY = "applied"
SECAGG_FROM_MEMBER = (SecAggJoin, MaskedUpdate, SecAggViewSig, SecAggShares)
CHECKPOINT_KEY = "checkpoint"
# A child whose Hello got no answer says it again after its hello_timeout_s, the wait
# doubling up to this many time-outs (``site``, ``regional``).
HELLO_RETRY_MAX_FACTOR = 8.0
HELLO_MODEL_RESEND_S = 60.0  # a region's repeated Hello gets the model again at most this often
# Updates over a child's quota kept for the next epoch (a region forwards unasked).
MAX_HELD_SITE = 2
MAX_HELD_REGION = 8
# A child that applied nothing (and, a site, was given no task) for this long no longer
# shares epochs, when the aggregator has no task_timeout_s to take instead.
QUIET_AFTER_S = 120.0
# A root behind its children (it lost its state) says so at most this often.
BEHIND_LOG_S = 600.0


class Outcome(enum.Enum):
    """What an aggregator did with a (new, from-a-child) update."""

    APPLIED = "applied"  # entered the aggregation
    STALE = "stale"  # older than max_staleness: dropped
    LATE = "late"  # answered a closed round (synchronous aggregation)
    REJECTED = "rejected"  # malformed


# Enum ``.value`` goes through a descriptor; this runs once per update, so look it up.
_OUTCOME_NAMES = {o: o.value for o in Outcome}


def validate_weights(weights: Weights) -> None:
    """Local misuse check for an initial model."""
    if not weights:
        raise ValueError("the initial model has no tensors")
    for name, arr in weights.items():
        if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
            raise ValueError(f"tensor {name!r} must be a floating-point numpy array")


def checkpoint_interval(checkpoint_every: int) -> int:
    """A validated "checkpoint every N versions (or forwards)" setting; 0 means never."""
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0: never), got {checkpoint_every}")
    return checkpoint_every


class AggregatorBase:
    """Children, dedup ledger, task dispatch and the Persist-then-Ack discipline."""

    _owns_model = False  # a root (``OwnModel``): nobody above it publishes newer models

    def __init__(
        self,
        node_id: str,
        children: Mapping[str, str],
        *,
        concurrency: int,
        task_timeout_s: float | None,
        rng: np.random.Generator | int,
        train_config: Mapping[str, Any] | None,
        log_deltas: bool,
        claim_bounds: ClaimBounds | None = None,
        quiet_after_s: float | None = None,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must be non-empty")
        for child, role in children.items():
            if role not in ROLES:
                raise ValueError(f"child {child!r} has role {role!r}; roles are {ROLES}")
        if node_id in children:
            raise ValueError(f"{node_id!r} cannot be its own child")
        if quiet_after_s is None:
            quiet_after_s = QUIET_AFTER_S if task_timeout_s is None else task_timeout_s
        if not 0.0 < quiet_after_s < math.inf:
            raise ValueError(f"quiet_after_s must be > 0 and finite, got {quiet_after_s}")
        self._id = node_id
        self._children = dict(children)
        roles = set(self._children.values())
        # The role every child has, when they all have one (None: mixed, or no children).
        self._only_role: str | None = roles.pop() if len(roles) == 1 else None
        self.quiet_after_s = quiet_after_s
        self._rng = as_generator(rng)
        self._dispatcher = TaskDispatcher(
            [c for c, r in self._children.items() if r == "site"],
            concurrency=concurrency,
            task_timeout_s=task_timeout_s,
            rng=self._rng,
        )
        # A dict, not a set: broadcast order must not depend on string hashing.
        # Region children up, each with when a model last went to it.
        self._regions_up: dict[str, float] = {}
        self._ledger = AppliedLedger()
        # Per child, how many of its updates ended in each outcome: durable evidence (the
        # log's records are compacted away) that each seq the ledger saw was decided once.
        # Copy on write: a child's counts are replaced, never changed in place, so a
        # snapshot copies only the outer dict (checkpoints may share the inner ones).
        self._outcomes: dict[str, dict[str, int]] = {}
        # Site updates taken inside declared regions' forwards (``algorithms.incorporation``).
        self._pairs = PairLedger()
        self._pairs_logged: dict[str, float] = {}  # region -> when a refusal was logged
        self._log_n = 0
        self._train_config: dict[str, Any] = dict(train_config or {})
        self._log_deltas = log_deltas
        self._bounds = claim_bounds if claim_bounds is not None else ClaimBounds()
        # Intake quota bookkeeping for the current epoch (not durable: a restart starts one).
        # ``_uses`` counts applied updates (buffer slots), ``_free`` the others (stale,
        # late, rejected): each is bounded by the share, so neither can starve the buffer.
        self._uses: dict[str, int] = {}
        self._free: dict[str, int] = {}
        self._held: dict[str, list[Update]] = {}
        self._warned: set[str] = set()
        self._unsolicited: set[str] = set()  # children that had an unasked update taken
        self._unasked = False  # the update being decided answers no task of ours
        self._epoch_changed = False
        # Set by aggregators whose defence is the variety of their inputs (median, trimmed
        # mean): regions and task answers count against the per-epoch share too.
        self._variety_quota = False
        self._silent: set[str] = set()  # up sites whose last task timed out unanswered
        self._last_applied: dict[str, float] = {}  # child -> when its last update entered
        self._restored_active: set[str] = set()  # active at restore: stamped at the next event
        self._now = 0.0  # the time of the event being handled
        self._quota_solicited = True  # see _within_quota (sync rounds: one task per round)
        self._norm = 0.0  # ‖Δ‖₂ of the update being decided (measured once, at intake)
        # Region child -> newest base version it presented above a root's own (while so).
        self._behind: dict[str, int] = {}
        self._behind_logged: float | None = None
        # Start quorum (``set_start_quorum``): off until set; not durable.
        self._quorum = 0
        self._quorum_wait_s = 0.0
        self._quorum_since: float | None = None  # this incarnation's first event
        self._holding = False  # the first tasks and broadcasts wait for the quorum
        # Secure aggregation (``set_secure_aggregation``): the cohort coordinator, or None.
        self._secagg: Any = None
        self.secagg_keys: Any = None  # its SecAggKeys (a driver swaps in newer rosters)
        # Central DP with secure aggregation: (σ_member, clip, precision_bits, d) of the
        # noise the members add (``algorithms.dp.release.member_noise_sigma``), or None.
        self.secagg_noise: tuple[float, float, int, int] | None = None
        # Sites' refusals of tasks (``algorithms.refusals``; in memory only): the book, one
        # WARNING per (site, code) ever, refusals dropped as unbelievable logged rarely.
        self._refusals = RefusalBook()
        self._refusal_warned = WarnLimiter(interval_s=math.inf)
        self._refusal_dropped = WarnLimiter()
        # Messages ignored (of a type or sender the node does not act on): one log line per
        # peer and reason a minute, whatever a peer sends (``node_util.unexpected``).
        self._ignored = WarnLimiter()
        self._refusal_labels: set[str] = set()  # site label values of ``site_refusals``
        self.refused = 0
        # Counters (also visible as metrics); handy for tests and reports.
        self.applied = 0
        self.duplicates = 0
        self.rejected = 0
        self.stale = 0
        self.late = 0
        self.timeouts = 0
        self.dropped = 0
        self._omit: frozenset[str] = frozenset()  # gauges its driver drops (omit_metrics)

    def omit_metrics(self, names: Iterable[str]) -> None:
        """Its driver drops the metrics ``names`` unread (``federation.step``): build none
        of those gauges."""
        self._omit = frozenset(names)

    # --------------------------------------------------------------- hooks
    def _model(self) -> tuple[int, Weights] | None:
        """The model tasks train on and updates are validated against."""
        raise NotImplementedError

    def _model_proof(self) -> dict[str, Any]:
        """Signature fields sent with the model (a region relays the root's; see regional)."""
        return {}

    def _task_config(self) -> Mapping[str, Any]:
        """The training config sent with the model (tasks and broadcasts): a root's own
        ``train_config``, which it signs with the model; a region relays the root's."""
        return self._train_config

    def _accept(
        self,
        peer: str,
        msg: Update,
        reason: str | None,
        version: int,
        now: float,
        out: list[Effect],
    ) -> None:
        """Decide about a new update from a child (``reason``: why it is malformed, or None)."""
        raise NotImplementedError

    def _replay(self, record: Mapping[str, Any]) -> None:
        """Re-apply an "applied" log record during ``restore`` (no effects)."""
        raise NotImplementedError

    def _on_other(self, peer: str, msg: Message, now: float, out: list[Effect]) -> None:
        """A message from a non-child (the parent, for a regional aggregator)."""
        if isinstance(msg, Update):
            self._reject_unacked(peer, msg, "unknown_sender", out)
        else:
            out.extend(unexpected(peer, msg, "unknown_sender", self._ignored, self._now))

    def _on_other_link(self, peer: str, up: bool, now: float, out: list[Effect]) -> None:
        """PeerUp/PeerDown for a non-child."""

    def _on_task_cancelled(self, task: int) -> None:
        """A task of ours ended without an answer (site down or timed out)."""

    def _epoch_size(self) -> int:
        """Updates per aggregation epoch (the buffer size K for buffered aggregators)."""
        return max(1, self._dispatcher.concurrency)

    def _fill(self, now: float, out: list[Effect]) -> None:
        """Start tasks up to the concurrency target (sync rounds override this)."""
        if self._holding:
            return  # the start quorum is not met yet
        d = self._dispatcher
        if d.in_flight >= d.concurrency or d.idle_count == 0:
            return
        model = self._model()
        if model is None:
            return  # nothing to train yet
        version, weights = model
        proof = self._model_proof()
        for task, site in d.start(now):
            req = TrainRequest(task, version, weights, self._task_config(), **proof)
            out.append(Send(site, req))

    # -------------------------------------------------------------- public
    @property
    def node_id(self) -> str:
        return self._id

    @property
    def children(self) -> Mapping[str, str]:
        return self._children

    @property
    def in_flight(self) -> int:
        """Training tasks currently outstanding."""
        return self._dispatcher.in_flight

    @property
    def in_flight_target(self) -> int:
        """Training tasks this node keeps outstanding (its concurrency)."""
        return self._dispatcher.concurrency

    @property
    def claim_bounds(self) -> ClaimBounds:
        return self._bounds

    def set_claim_bounds(self, bounds: ClaimBounds) -> None:
        """Bound later updates' claims by ``bounds`` (a newer roster declares them)."""
        self._bounds = bounds

    def set_subtrees(self, subtrees: Mapping[str, Iterable[str]]) -> None:
        """Declare the sites under region children: their forwards' ``pairs`` are then
        checked against them and counted once (``algorithms.incorporation``)."""
        unknown = sorted(r for r in subtrees if self._children.get(r) != "region")
        if unknown:
            raise ValueError(f"subtrees: {unknown[0]!r} is not a region child of {self._id!r}")
        self._pairs.set_subtrees(subtrees)

    def set_start_quorum(self, quorum: int, wait_s: float) -> None:
        """Hold this node's first training tasks and model broadcasts until ``quorum``
        distinct children are up, or ``wait_s`` seconds after its first event (see the
        module docstring). A quorum above the number of children means all of them;
        ``quorum = 0`` turns it off. Call it before the first event (the factory does, for
        a fresh node and for one about to be restored)."""
        if isinstance(quorum, bool) or not isinstance(quorum, int) or quorum < 0:
            raise ValueError(f"start quorum must be a whole number >= 0, got {quorum!r}")
        if not 0.0 < wait_s < math.inf:
            raise ValueError(f"start wait must be > 0 and finite, got {wait_s!r}")
        self._quorum = min(quorum, len(self._children))
        self._quorum_wait_s = float(wait_s)
        self._quorum_since = None
        self._holding = self._quorum > 0

    @property
    def start_quorum(self) -> tuple[int, float]:
        """``(children, seconds)`` of the start quorum (0 children: none)."""
        return self._quorum, self._quorum_wait_s

    def set_refusal_backoff(self, backoff_s: float) -> None:
        """How long a direct child site that refused a task gets no new one, after its first
        refusal in a row (doubled with each next one, up to ``refusals.MAX_BACKOFF_S``):
        > 0 and at most ``MAX_BACKOFF_S`` seconds (``refusals.BACKOFF_S`` unless set)."""
        self._refusals.set_backoff(backoff_s)

    @property
    def refusal_backoff_s(self) -> float:
        """The backoff after a site's first refusal in a row (``set_refusal_backoff``)."""
        return self._refusals.backoff_s

    @property
    def waiting_for_quorum(self) -> bool:
        """Whether the first tasks and broadcasts still wait for the start quorum."""
        return self._holding

    def children_up(self) -> int:
        """Distinct children up now (said Hello, not down since)."""
        return self._dispatcher.up_count + len(self._regions_up)

    def _quorum_deadline(self) -> float | None:
        if not self._holding or self._quorum_since is None:
            return None
        return self._quorum_since + self._quorum_wait_s

    def next_deadline(self) -> float | None:
        best = self._dispatcher.next_deadline()
        # The earliest of these (each None when it waits for nothing), in this order; the
        # cheap tests first, so the usual event pays for no call that has nothing to say.
        if self._held or (self._variety_quota and self._uses):
            t = self._next_quiet()
            if t is not None and (best is None or t < best):
                best = t
        if self._holding:
            t = self._quorum_deadline()
            if t is not None and (best is None or t < best):
                best = t
        t = self._refusals.next_retry()
        if t is not None and (best is None or t < best):
            best = t
        if self._secagg is not None:
            t = self._secagg.next_deadline()
            if t is not None and (best is None or t < best):
                best = t
        return best

    def handle(self, event: Event, now: float) -> list[Effect]:
        out: list[Effect] = []
        self._now = now
        if self._holding and self._quorum_since is None:
            self._quorum_since = now  # the start wait runs from this incarnation's first event
        if self._restored_active:
            for child in self._restored_active:
                self._last_applied.setdefault(child, now)
            self._restored_active.clear()
        if isinstance(event, Received):
            self._on_received(event.peer, event.msg, now, out)
        elif isinstance(event, Deadline):
            for site in self._refusals.due(now):
                self._dispatcher.resume(site)  # its refusal's backoff is over
            self._on_deadline(now, out)
            if self._secagg is not None:
                out.extend(self._secagg.on_deadline(now))
                self._take_cohorts(out)
            self._on_quiet()
        elif isinstance(event, PeerUp):
            if event.peer in self._children:
                # A child counts as up once it has said Hello; a secure site hears of the
                # cohorts a restart orphaned (aborted: nothing of them can resume).
                if self._secagg is not None and self._children[event.peer] == "site":
                    out.extend(self._secagg.on_peer_up(event.peer, now))
            else:
                self._on_other_link(event.peer, True, now, out)
        elif isinstance(event, PeerDown):
            self._on_peer_down(event.peer, now, out)
        else:
            raise ProtocolMisuseError(f"{self._id}: aggregators start no training; got {event!r}")
        if self._holding:
            self._check_quorum(now, out)
        if self._held:
            self._release_held(now, out)
        else:
            self._epoch_changed = False  # what _release_held does with nothing held
        self._fill(now, out)
        return out

    def _check_quorum(self, now: float, out: list[Effect]) -> None:
        """End the start wait once the quorum is up or the wait is over; then the regions
        that said Hello meanwhile get the model (the sites their tasks, from ``_fill``)."""
        up = self.children_up()
        since = now if self._quorum_since is None else self._quorum_since
        if up >= self._quorum:
            outcome = "met"
        elif now >= since + self._quorum_wait_s:
            outcome = "expired"
        else:
            return
        self._holding = False
        waited = now - since
        fields = {
            "up": up,
            "quorum": self._quorum,
            "children": len(self._children),
            "waited_s": round(waited, 3),
        }
        out.append(Metric("start_quorum", 1.0, {"outcome": outcome}))
        if outcome == "met":
            text = (
                f"start quorum met: {up} of {len(self._children)} children up after "
                f"{waited:.2f} s; dispatching"
            )
            out.append(Log("info", text, fields))
        else:
            text = (
                f"start quorum not met after {waited:.2f} s ({up} of the {self._quorum} "
                f"children waited for are up); dispatching to those up"
            )
            out.append(Log("warning", text, fields))
        self._broadcast(out)
        self._on_quorum_end(out)

    def _on_quorum_end(self, out: list[Effect]) -> None:
        """The start wait just ended (a region then says Hello to its parent)."""

    # ------------------------------------------------------------ handlers
    def _on_received(self, peer: str, msg: Message, now: float, out: list[Effect]) -> None:
        role = self._children.get(peer)
        if role is None:
            self._on_other(peer, msg, now, out)
        elif isinstance(msg, Update):
            if self._secagg is not None and role == "site":
                # No downgrade: a secure aggregator takes a site's update only masked.
                self._reject_unacked(peer, msg, "plain_update", out)
                return
            self._on_update(peer, msg, now, out)
        elif isinstance(msg, SECAGG_FROM_MEMBER):
            self._on_secagg(peer, role, msg, now, out)
        elif isinstance(msg, Hello):
            self._on_hello(peer, role, msg, out)
        elif isinstance(msg, TrainRefused):
            self._on_refused(peer, role, msg, now, out)
        elif not isinstance(msg, Heartbeat):
            out.extend(unexpected(peer, msg, "unexpected_type", self._ignored, self._now))

    def _on_hello(self, peer: str, role: str, msg: Hello, out: list[Effect]) -> None:
        if msg.src != peer:
            out.extend(unexpected(peer, msg, "src_mismatch", self._ignored, self._now))
            return
        if msg.role != role:
            # One line per child a minute (a stream of Hellos is no stream of log lines),
            # its role shortened (the peer chose it).
            unlogged = self._ignored.due(peer, "role_mismatch", self._now)
            if unlogged is not None:
                fields = {"peer": peer, "role": msg.role[:64], "unlogged_before": unlogged}
                out.append(Log("warning", "child announced another role", fields))
        if role == "site":
            if not self._dispatcher.mark_up(peer):
                out.append(Metric("hello_repeated", 1.0, {"peer": peer}))
            elif self._variety_quota:
                self._rebench()  # one more site up: the share may have shrunk
            return
        resend = peer in self._regions_up
        if resend:  # same session: the model was sent, maybe lost
            out.append(Metric("hello_repeated", 1.0, {"peer": peer}))
            if self._now < self._regions_up[peer] + HELLO_MODEL_RESEND_S:
                return
        else:
            self._regions_up[peer] = -math.inf
        model = self._model()
        if model is not None and not self._holding:  # held: sent when the quorum is met
            self._regions_up[peer] = self._now  # when a model last went to it
            if resend:
                out.append(Metric("model_resent", 1.0, {"peer": peer}))
            config = self._task_config()
            model_msg = ModelBroadcast(model[0], model[1], config=config, **self._model_proof())
            out.append(Send(peer, model_msg))

    def _on_peer_down(self, peer: str, now: float, out: list[Effect]) -> None:
        if self._secagg is not None and self._children.get(peer) == "site":
            out.extend(self._secagg.on_peer_down(peer, now))
            self._take_cohorts(out)
        role = self._children.get(peer)
        if role is None:
            self._on_other_link(peer, False, now, out)
        elif role == "site":
            self._refusals.forget_backoff(peer)  # a reconnect starts afresh
            task = self._dispatcher.mark_down(peer)
            if task is not None:
                self._on_task_cancelled(task)
        else:
            self._regions_up.pop(peer, None)
            if self._behind.pop(peer, None) is not None:  # its claim goes with it
                self._report_behind(out)
        if role is not None:
            self._held.pop(peer, None)  # unacked: the child resends them on reconnect
        self._silent.discard(peer)
        self._last_applied.pop(peer, None)
        self._restored_active.discard(peer)
        self._epoch_changed = True  # fewer children up: the others' quota may have grown
        if self._variety_quota:
            self._rebench()

    def _on_deadline(self, now: float, out: list[Effect]) -> None:
        expired = self._dispatcher.expire(now)
        for task, site in expired:
            self.timeouts += 1
            self._on_task_cancelled(task)
            out.append(Metric("job_timeout", 1.0, {"site": site}))
            if self._dispatcher.is_up(site):
                self._silent.add(site)
        if expired and self._variety_quota:
            # A silent site no longer counts among those sharing an epoch, so the others'
            # share grows and a site that takes tasks but never answers cannot stall it.
            self._epoch_changed = True
            self._rebench()

    def _on_update(self, peer: str, msg: Update, now: float, out: list[Effect]) -> None:
        if msg.src != peer:
            self._reject_unacked(peer, msg, "src_mismatch", out)
            return
        seq = msg.seq
        if not (type(seq) is int or is_int(seq)) or seq < 1:  # a plain int: no call
            self._reject_unacked(peer, msg, "bad_seq", out)
            return
        if msg.pairs and self._children[peer] == "site":
            # Only a region's forward stands for other updates; held or deferred, a site's
            # pairs would cost memory no bound counts.
            self._reject_unacked(peer, msg, "site_pairs", out)
            return
        if self._ledger.seen(msg.src, msg.seq):
            self.duplicates += 1
            out.append(Metric("update_duplicate", 1.0, {"src": msg.src, "seq": str(msg.seq)}))
            out.append(Send(peer, Ack(msg.src, msg.seq)))
            self._after_duplicate(peer, msg, out)
            return
        pairs = self._pairs_of(peer, msg) if msg.pairs else ()  # a site's names none
        if pairs and self._pairs_refused(peer, msg, pairs, out):
            return
        taken = self._pairs.overlap(pairs) if pairs else None
        if taken:
            # Delivered already by another region (a standby): refused unrecorded, so the
            # region can rebuild this forward without them (``algorithms.incorporation``).
            out.append(Metric("forward_overlap", float(len(taken)), {"src": peer}))
            # Nothing is written for it, so a region may send it again at once: a line per
            # region a minute, not one per message.
            unlogged = self._ignored.due(peer, "forward_overlap", self._now)
            if unlogged is not None:
                fields = {"src": peer, "seq": msg.seq, "unlogged_before": unlogged}
                out.append(Log("warning", "forward overlaps site updates taken", fields))
            out.append(Send(peer, Overlap(msg.src, msg.seq, tuple(taken))))
            return
        if self._owns_model and self._ahead_of_us(peer, msg, out):
            return  # before the quota: nothing of it may count, it is not recorded
        model = self._model()
        if (
            not self._owns_model
            and model is not None
            and is_int(msg.base_version)
            and msg.base_version > model[0]
        ):
            # This region lags (a site failed over and back brings an update on a newer
            # model): held unacked until that model arrives. Rejecting it would settle it.
            self._defer(peer, msg, out)
            return
        if not self._within_quota(peer, msg, out):
            return
        if model is None:
            self._defer(peer, msg, out)
            return
        version, reference = model
        # The norm comes from the finiteness pass over the delta (one pass, not two).
        reason, self._norm = check_update_norm(msg, version, reference)
        if reason is None:
            msg, reason = self._check_claims(peer, msg, out)
        self._accept(peer, msg, reason, version, now, out)

    def _check_claims(self, peer: str, msg: Update, out: list[Effect]) -> tuple[Update, str | None]:
        """Bound count and n_examples (``ClaimBounds``); refuse a norm that overflows."""
        msg, reason, clamped = self._bounds.check(peer, self._children[peer], msg)
        if reason is not None:
            return msg, reason
        for name in clamped:
            out.append(Metric("update_claim_clamped", 1.0, {"src": peer, "field": name}))
            out.append(
                Log("warning", "claim clamped", {"src": peer, "field": name, "seq": msg.seq})
            )
        if not self._norm < math.inf:  # finite float64 entries can still overflow it
            return msg, "norm_overflow"
        return msg, None

    def _pairs_refused(
        self, peer: str, msg: Update, pairs: tuple[tuple[str, int], ...], out: list[Effect]
    ) -> bool:
        """Refuse, unrecorded and unacked, a forward whose pairs the pair ledger cannot
        take (``PairLedger.problem``): recording it would settle its site updates at the
        region, which tells the sites to forget them. The region resends it, so a
        ``[subtrees]`` fixed and the root restarted takes it; until then an ERROR names the
        fix at most every ``BEHIND_LOG_S`` per region. (Pairs far ahead do not refuse a
        forward: ``_record``.)

        The pairs are bounded by the count this node believes (``ClaimBounds``: what the
        region's subtree can produce in one flush), not by the one the region wrote: the
        written one is clamped to that, and a forward of clamped weight must not settle
        more site updates than it could carry (the standby's forwards of them would be
        refused as overlaps)."""
        count = msg.count
        if is_int(count):
            count = min(int(count), self._bounds.count_bound(peer, self._children[peer]))
        problem = self._pairs.problem(peer, pairs, count)
        if problem is None:
            return False
        self.rejected += 1  # metric only: the ERROR below is the one line, rate limited
        out.append(Metric("update_rejected", 1.0, {"reason": problem}))
        if problem == "foreign_pairs":
            sites = self._pairs.sites(peer)
            foreign = sorted({s for s, _ in pairs if s not in sites})
            text = (
                f"region {peer} forwards updates of site {foreign[0]}, which [subtrees] does "
                f"not list under {peer}: add it to [subtrees] and restart this node (the "
                "forwards are refused unacknowledged until then; the sites keep them)"
            )
        else:
            foreign = []
            text = f"forward from region {peer} refused: {problem}"
            if problem == "pairs_exceed_count" and count != msg.count:
                text += (
                    f" ({len(pairs)} site updates, more than the {count} a forward of it "
                    "may carry: max_region_count, by default the regional_buffer_size)"
                )
        last = self._pairs_logged.get(peer)
        if last is None or self._now >= last + BEHIND_LOG_S:
            self._pairs_logged[peer] = self._now
            out.append(Log("error", text, {"src": peer, "seq": msg.seq, "sites": foreign[:8]}))
        return True

    # ------------------------------------------------------------ refusals
    # A site that does not train its task says so (``TrainRefused``; ``algorithms.refusals``).
    # Believable only from the site itself for a task of ours it still holds, or relayed by
    # a region child (rate-limited) for a site it can speak for: one [subtrees] lists under
    # it, or without [subtrees] one of the roster's sites (``ClaimBounds.roster_sites``)
    # that is not a child of this node's own. A believable one is counted (metric
    # ``site_refusals``, one WARNING per site and code), frees the task's slot as a site
    # going down does, and keeps the site from new tasks for a backoff; a region also
    # relays it to its parent. A relayed one naming another site is counted under the
    # region (its book entry; the metric's site label "other"; one WARNING per region a
    # minute) and goes no further. Anything else is dropped: metric ``refusal_rejected``.

    def refusals_view(self) -> dict[str, dict[str, object]]:
        """Per site that refused: its last code, reason, version, time and the count
        (``RefusalBook.view``; in memory only)."""
        return self._refusals.view()

    def _on_refused(
        self, peer: str, role: str, msg: TrainRefused, now: float, out: list[Effect]
    ) -> None:
        problem = self._refusal_problem(peer, role, msg, now)
        if problem is not None:
            out.append(Metric("refusal_rejected", 1.0, {"reason": problem}))
            if self._refusal_dropped.due(peer, problem, now) is not None:
                out.append(Log("warning", "refusal ignored", {"peer": peer, "reason": problem}))
            return
        src, task = msg.src, int(msg.task)
        if not self._refusals.fresh(src, task, via=peer):
            out.append(Metric("refusal_rejected", 1.0, {"reason": "duplicate"}))
            return
        code, reason = clean_code(msg.code), clean_text(msg.reason)
        version = int(msg.version)
        self.refused += 1
        if role != "site" and not self._speaks_for(peer, src):
            self._unverified_refusal(peer, src, code, reason, version, now, out)
            return
        self._refusals.note(src, code, reason, version, now)
        label = self._refusal_label(src)
        out.append(Metric("site_refusals", 1.0, {"code": metric_code(code), "site": label}))
        if self._refusal_warned.due(src, metric_code(code), now) is not None:
            via = "" if role == "site" else f" (via {peer})"
            out.append(
                Log(
                    "warning",
                    f"site {src}{via} refused training ({code}): {reason}",
                    {"site": src, "code": code, "version": version, "task": task},
                )
            )
        if role == "site":
            # Its slot is free (as if it went down) and it waits out a backoff.
            self._dispatcher.cancel(task)
            self._on_task_cancelled(task)
            self._dispatcher.suspend(src)
            self._refusals.back_off(src, now)
        self._relay_refusal(TrainRefused(src, task, version, code, reason), out)

    def _refusal_problem(self, peer: str, role: str, msg: TrainRefused, now: float) -> str | None:
        """Why ``msg`` is not believable (None: it is)."""
        if not is_int(msg.task) or not is_int(msg.version):
            return "bad_fields"
        if role == "site":
            if msg.src != peer:
                return "src_mismatch"
            if self._refused_task_site(int(msg.task)) != peer:
                return "not_outstanding"  # never ours, someone else's, or over already
            return None
        if not is_clean_id(msg.src):
            return "bad_src"
        if not self._refusals.allow(peer, now):
            return "rate_limited"
        return None

    def _speaks_for(self, region: str, src: str) -> bool:
        """Whether region child ``region`` may relay a refusal in ``src``'s name."""
        if self._pairs.declared(region):
            return src in self._pairs.sites(region)
        sites = self._bounds.roster_sites
        return sites is not None and src in sites and src not in self._children and src != self._id

    def _unverified_refusal(
        self,
        region: str,
        src: str,
        code: str,
        reason: str,
        version: int,
        now: float,
        out: list[Effect],
    ) -> None:
        """A refusal ``region`` relays in the name of a site it cannot speak for: counted
        under the region itself, never under ``src`` (whose entry stays its own)."""
        shown = clean_text(src, 64)
        self._refusals.note(region, code, clean_text(f"for site {shown}: {reason}"), version, now)
        out.append(Metric("site_refusals", 1.0, {"code": metric_code(code), "site": "other"}))
        unlogged = self._refusal_dropped.due(region, "unverified_site", now)
        if unlogged is not None:
            more = f" ({unlogged} more since the last line)" if unlogged else ""
            out.append(
                Log(
                    "warning",
                    f"region {region} relays refusals in the name of sites it cannot speak "
                    f"for (e.g. {shown!r}: not one [subtrees] lists under it, or not a "
                    f"roster site outside this node's own children): counted under "
                    f"{region}{more}",
                    {"region": region, "site": shown, "code": code},
                )
            )

    def _refusal_label(self, site: str) -> str:
        """The ``site`` label of ``site_refusals``: the site's id for as many distinct
        sites as the roster lists (this node's children without one), then "other"."""
        if site in self._refusal_labels:
            return site
        roster = self._bounds.roster_sites
        if roster is not None:
            cap = len(roster)
        else:
            declared = (self._pairs.sites(r) for r in self._children if self._pairs.declared(r))
            cap = len(self._children) + sum(len(d) for d in declared)
        if len(self._refusal_labels) >= max(1, cap):
            return "other"
        self._refusal_labels.add(site)
        return site

    def _refused_task_site(self, task: int) -> str | None:
        """The site holding ``task`` of ours, outstanding (None: no such task)."""
        return self._dispatcher.task_site(task)

    def _relay_refusal(self, msg: TrainRefused, out: list[Effect]) -> None:
        """A believable refusal was counted here (a region passes it up)."""

    # --------------------------------------------------------------- quota
    def _within_quota(self, peer: str, msg: Update, out: list[Effect]) -> bool:
        """May ``msg`` be decided now? Otherwise it is held or dropped, unacked."""
        task = msg.task
        # is_int(task) and task_site(int(task)), without the calls for a plain int
        if type(task) is int:
            solicited = self._dispatcher.task_site(task) == peer
        else:
            solicited = is_int(task) and self._dispatcher.task_site(int(task)) == peer
        self._unasked = not solicited  # for the record: replay rebuilds the quota from it
        answer_free = not self._quota_solicited or peer not in self._unsolicited
        if solicited and answer_free and not self._variety_quota:
            return True  # we chose to give this site the task: one answer per task
        if not self._variety_quota and self._children[peer] == "region":
            # Under the mean a region's forward answers the model it was sent, as a task
            # answer does: taken, each delta clipped. A slot limit here would let a region
            # that forwards just often enough to stay active pace its siblings.
            return True
        used = self._uses.get(peer, 0)
        quota = self._quota(peer)
        # Decisions that take no slot are bounded too (a flood of stale or malformed updates
        # would flood the log), except a task answer under the mean: one per task given.
        exempt = solicited and not self._variety_quota
        if used < quota and (exempt or self._free.get(peer, 0) < quota):
            return True
        held = self._held.setdefault(peer, [])
        if any(h.seq == msg.seq for h in held):
            return False  # a resend of one already held
        room = MAX_HELD_SITE if self._children[peer] == "site" else MAX_HELD_REGION
        # The answer to the site's task is always kept (its task stays in flight, so the
        # site gets no other meanwhile), but only one update may claim that task.
        if len(held) < room or (solicited and all(h.task != msg.task for h in held)):
            held.append(msg)
            out.append(Metric("update_held", 1.0, {"src": peer}))
            return False
        self.dropped += 1
        out.append(Metric("update_dropped", 1.0, {"src": peer, "reason": "quota"}))
        if peer not in self._warned:  # one line per child and epoch, not one per message
            self._warned.add(peer)
            out.append(
                Log(
                    "warning", "update over the intake quota dropped", {"src": peer, "seq": msg.seq}
                )
            )
        return False

    def _active(self) -> set[str]:
        """The children an epoch is shared among now: those whose last update entered the
        aggregation, or (a site) that were given the task they hold, within
        ``quiet_after_s``; sites whose last task timed out unanswered are left out. A child
        that is up but quiet (a region whose sites are offline, a hostile one that says
        Hello and nothing else) thus cannot stall the others for longer than that."""
        active = {c for c in self._recent_senders() if self._is_up(c)}
        horizon = self._now - self.quiet_after_s
        active.update(s for s, t in self._dispatcher.given().items() if t > horizon)
        active.difference_update(self._silent)
        return active

    def _quiet_after(self, child: str) -> float:
        """How long after its last update ``child`` still shares the epochs. A region takes
        no tasks, so the sites' task time-out says nothing about its pace: it is held to
        ``QUIET_AFTER_S`` at most. Counting a slow region as quiet too early costs little
        (its siblings may then fill a flush, each delta clipped); counting a quiet one as
        active holds its siblings back."""
        if self._children.get(child) == "region":
            return min(self.quiet_after_s, QUIET_AFTER_S)
        return self.quiet_after_s

    def _recent_senders(self) -> set[str]:
        """Children an update of which entered the aggregation within their
        ``_quiet_after``."""
        now = self._now
        # _quiet_after per kind of child, computed once (O(children) per call).
        site_since = now - self.quiet_after_s
        region_since = now - min(self.quiet_after_s, QUIET_AFTER_S)
        only = self._only_role
        if only is not None:  # all children of one role: one threshold, no lookup each
            since = region_since if only == "region" else site_since
            recent = {c for c, t in self._last_applied.items() if t > since}
        else:
            kind = self._children.get
            recent = {
                c
                for c, t in self._last_applied.items()
                if t > (region_since if kind(c) == "region" else site_since)
            }
        return recent | self._restored_active

    def _is_up(self, child: str) -> bool:
        return child in self._regions_up or self._dispatcher.is_up(child)

    def _quota(self, peer: str, active: set[str] | None = None) -> int:
        """``peer``'s share of this epoch among itself and the other active children."""
        if active is None:
            active = self._active()
        sharing = len(active) + (peer not in active)
        return intake_quota(self._epoch_size(), sharing)

    def _next_quiet(self) -> float | None:
        """When the next active child turns quiet, if anything waits for that (an update
        held, a site benched): its share then goes to the others. O(children)."""
        if not self._held and not (self._variety_quota and self._uses):
            return None
        q = self.quiet_after_s
        times = [t + self._quiet_after(c) for c, t in self._last_applied.items()]
        times += [t + q for t in self._dispatcher.given().values()]
        later = [t for t in times if t > self._now]
        return min(later, default=None)

    def _on_quiet(self) -> None:
        """A deadline passed: a child may have turned quiet, so the others' share grown."""
        if self._held:
            self._epoch_changed = True
        if self._variety_quota:
            self._rebench()

    def _rebench(self) -> None:
        """Under a variety quota, exactly the sites that used their share get no new task."""
        d = self._dispatcher
        d.unbench()
        active = self._active()
        for child, used in self._uses.items():
            if self._children.get(child) == "site" and used >= self._quota(child, active):
                d.bench(child)

    def _end_epoch(self) -> None:
        """The buffer was flushed (or the round closed): every child's quota starts again."""
        self._uses.clear()
        self._free.clear()
        self._warned.clear()
        self._unsolicited.clear()
        self._epoch_changed = True
        self._dispatcher.unbench()

    def _release_held(self, now: float, out: list[Effect]) -> None:
        """Take up held updates once their child may have room (after an epoch ended)."""
        while self._epoch_changed and self._held:
            self._epoch_changed = False
            held, self._held = self._held, {}
            for peer, updates in held.items():
                for update in updates:
                    self._on_update(peer, update, now, out)
        self._epoch_changed = False

    def _defer(self, peer: str, msg: Update, out: list[Effect]) -> None:
        """An update arrived before this node has any model (only regions can be there)."""
        raise ProtocolMisuseError(f"{self._id} has no model")

    # ---------------------------------------------------- secure aggregation
    # A secure aggregator (``set_secure_aggregation``) takes its sites' updates only as
    # cohorts (``algorithms.secagg.coordinator``): a site's ``SecAggJoin`` answers its task
    # and, unless recorded already or too stale, waits for a cohort; a completed cohort
    # (``CohortResult``: the survivors' sum and their (site, seq, base_version, n)) is ONE
    # aggregation step (``_cohort_step``), recorded durably as one "cohort" record naming
    # every survivor's (site, seq) (so the ledger dedupes resends) BEFORE each survivor is
    # acknowledged. Region children's forwards stay plain: they are sums already.

    def set_secure_aggregation(self, coordinator: Any, keys: Any = None) -> None:
        """Run secure aggregation for the site children through ``coordinator`` (a
        ``SecAggCoordinator``, using ``keys``); plain updates from sites are refused from
        now on."""
        self._secagg = coordinator
        self.secagg_keys = keys
        model = self._model()
        if model is not None:
            coordinator.set_template(model[1])

    @property
    def secure_aggregation(self) -> Any:
        """The cohort coordinator (None: no secure aggregation)."""
        return self._secagg

    def _on_secagg(self, peer: str, role: str, msg: Message, now: float, out: list[Effect]) -> None:
        coord = self._secagg
        if coord is None or role != "site":
            out.extend(unexpected(peer, msg, "secagg_not_expected", self._ignored, self._now))
            return
        if isinstance(msg, SecAggJoin):
            self._on_join(peer, msg, now, out)
        elif isinstance(msg, MaskedUpdate):
            out.extend(coord.on_masked(peer, msg, now))
        elif isinstance(msg, SecAggViewSig):
            out.extend(coord.on_view_sig(peer, msg, now))
        elif isinstance(msg, SecAggShares):
            out.extend(coord.on_shares(peer, msg, now))
        self._take_cohorts(out)

    def _on_join(self, peer: str, msg: SecAggJoin, now: float, out: list[Effect]) -> None:
        if msg.src != peer:
            out.extend(unexpected(peer, msg, "src_mismatch", self._ignored, self._now))
            return
        if not is_int(msg.seq) or msg.seq < 1:
            out.extend(unexpected(peer, msg, "bad_seq", self._ignored, self._now))
            return
        if self._ledger.seen(msg.src, msg.seq):  # applied (or dropped) already: re-ack
            self.duplicates += 1
            out.append(Metric("update_duplicate", 1.0, {"src": msg.src, "seq": str(msg.seq)}))
            out.append(Send(peer, Ack(msg.src, msg.seq)))
            return
        solicited = is_int(msg.task) and self._dispatcher.task_site(int(msg.task)) == peer
        if is_int(msg.task):
            self._dispatcher.complete(int(msg.task), peer)  # the site finished its task
        model = self._model()
        bad_base = is_int(msg.base_version) and msg.base_version < 0  # as a plain update's
        if bad_base or model is None or not is_int(msg.base_version) or msg.base_version > model[0]:
            reason = "bad_base_version" if bad_base else "secagg_no_model"
            out.append(Metric("update_rejected", 1.0, {"reason": reason}))
            if solicited:  # its task ended in a join that cannot be: as a refusal
                self._dispatcher.suspend(peer)
                self._refusals.back_off(peer, now)
            return  # unacked: the site joins again on its next session
        limit = getattr(self, "max_staleness", None)
        tau = model[0] - int(msg.base_version)
        if limit is not None and tau > limit:
            # Too stale to enter any cohort: recorded and acked like a plain stale update
            # (nothing of it was revealed); unasked ones within the site's share, as plain
            # ones, so a flood of them cannot flood the log.
            if not solicited and self._free.get(peer, 0) >= self._quota(peer):
                self.dropped += 1
                out.append(Metric("update_dropped", 1.0, {"src": peer, "reason": "quota"}))
                return
            self.stale += 1
            out.append(Metric("update_stale", float(tau), {"src": msg.src}))
            stand_in = Update(msg.src, msg.seq, msg.base_version, {}, msg.n_examples, 1, msg.task)
            self._record(peer, stand_in, Outcome.STALE, model[0], out, tau=tau)
            return
        if not self._join_admitted(peer, msg, model[0], out):
            return
        out.extend(self._secagg.on_join(peer, msg, now))

    def _join_admitted(self, peer: str, msg: SecAggJoin, version: int, out: list[Effect]) -> bool:
        """May this (new, current enough) join wait for a cohort? A sync root admits only
        answers to its open round's tasks and records the rest as late."""
        return True

    def _take_cohorts(self, out: list[Effect]) -> None:
        coord = self._secagg
        if coord is None:
            return
        for result in coord.take_results():
            self._apply_cohort(result, out)

    def _apply_cohort(self, result: Any, out: list[Effect]) -> None:
        """One completed cohort: Δ̄ = s̄ · Σ w_i x_i / Σ w_i, recorded, stepped, acked.

        s̄ is the MEAN staleness factor of the survivors: the aggregator cannot scale one
        masked update, only the sum; with every τ_i equal it is FedBuff's own discount
        (the cost of mixing τs is measured in the simulator). The coordinator has checked
        the sum (``secagg.field.check_cohort_sum``): Σ w_i is exactly what the survivors'
        joins give, and ‖Σ w_i x_i‖ ≤ Σ w_i · clip plus rounding and noise slack, so
        ‖Δ̄‖ ≤ s̄ · clip (+ slack / Σ w_i) as for a FedBuff flush. That bounds the cohort,
        not each member: without range proofs one malicious member can spend the whole
        cohort's norm budget (|U| · clip on the sum, vs clip for a plain update). A sum
        of weight 0 (every survivor declared 0 examples: the sum is 0 too) is a zero
        step, never a division by zero; its updates are acked as applied."""
        model = self._model()
        assert model is not None  # a cohort needs a model (its template)
        version = model[0]
        b = self._bounds
        # Each member's examples claim bounded as a plain update's is (the member's own
        # weight is bounded by the seal's cap already).
        survivors = [
            (str(s), int(q), int(bv), min(int(n), b.site_examples.get(s, b.max_examples_per_site)))
            for s, q, bv, n in result.survivors
        ]
        taus = [max(0, version - bv) for _, _, bv, _ in survivors]
        fn = getattr(self, "_staleness", None)
        factors = [float(fn(t)) if fn is not None else 1.0 for t in taus]
        s_bar = sum(factors) / len(factors)
        weight_sum = float(result.weight_sum)
        scale = s_bar / weight_sum if weight_sum > 0.0 else 0.0
        delta = {
            k: (np.asarray(v, dtype=np.float64) * scale).astype(model[1][k].dtype, copy=False)
            for k, v in result.total.items()
        }
        n_examples = sum(n for *_, n in survivors)
        pairs = [(s, q) for s, q, _, _ in survivors]
        for (src, seq, _, _), tau in zip(survivors, taus, strict=True):
            self.applied += 1
            self._ledger.record(src, seq)
            self._count_outcome(src, _OUTCOME_NAMES[Outcome.APPLIED])
            self._last_applied[src] = self._now
            out.append(Metric("update_applied", float(tau), {"src": src, "seq": str(seq)}))
        self._log_n += 1
        record = {
            "n": self._log_n,
            "op": "cohort",
            "cohort": bytes(result.cohort),
            "pairs": [list(p) for p in pairs],
            "version": version,
            "taus": taus,
            "s": s_bar,
            "n_examples": n_examples,
            "count": len(pairs),
            "delta": delta,
            **self._cohort_record_extra(),
        }
        out.append(Persist(APPLIED_KEY, record, append=True))
        out.append(Metric("secagg_cohort_applied", float(len(pairs)), {"node": self._id}))
        out.append(
            Log(
                "info",
                "secure cohort applied",
                {"members": len(result.members), "survivors": len(pairs), "version": version},
            )
        )
        self._cohort_step(delta, n_examples, pairs, s_bar, version, out)
        # Acks only now: the cohort's record (and its step) came first.
        out.extend(Send(src, Ack(src, seq)) for src, seq in pairs)
        self._end_epoch()

    def _cohort_step(
        self,
        delta: Weights,
        n_examples: int,
        pairs: list[tuple[str, int]],
        s: float,
        version: int,
        out: list[Effect],
    ) -> None:
        """Apply one cohort's aggregate (a root: a model step; a region: a forward)."""
        raise NotImplementedError

    def _cohort_record_extra(self) -> dict[str, Any]:
        """More fields for a cohort's durable record (a sync root: its round)."""
        return {}

    def _secagg_snapshot(self) -> dict[str, Any]:
        return {} if self._secagg is None else {"secagg": self._secagg.snapshot()}

    def _restore_secagg(self, state: Mapping[str, Any], records: Any) -> None:
        """The coordinator's open cohorts (orphans now: aborted as their members return)."""
        if self._secagg is not None:
            from fedloom.algorithms.secagg.coordinator import COORDINATOR_LOG_KEY

            self._secagg.restore(state.get("secagg"), records.records(COORDINATOR_LOG_KEY))

    def _replay_cohort_record(self, rec: Mapping[str, Any]) -> None:
        pairs = [(str(p[0]), int(p[1])) for p in rec["pairs"]]
        for src, seq in pairs:
            self._ledger.record(src, seq)
            self._count_outcome(src, _OUTCOME_NAMES[Outcome.APPLIED])
            self._restored_active.add(src)
        self._log_n = int(rec["n"])
        self._cohort_step(
            rec["delta"], int(rec["n_examples"]), pairs, float(rec["s"]), int(rec["version"]), []
        )
        self._end_epoch()

    # ------------------------------------------------------------- helpers
    def _complete_task(self, peer: str, msg: Update) -> bool:
        """Free the dispatcher slot of the task this update answers, if still in flight."""
        return is_int(msg.task) and self._dispatcher.complete(int(msg.task), peer)

    def _record(
        self,
        peer: str,
        msg: Update,
        outcome: Outcome,
        version: int,
        out: list[Effect],
        *,
        tau: int | None = None,
        s: float = 0.0,
        **extra: Any,
    ) -> None:
        """Ledger it, Persist the record, then Ack: the Ack never precedes its Persist."""
        src = msg.src
        self._ledger.record(src, msg.seq)
        outcome_name = _OUTCOME_NAMES[outcome]  # once: hashing an Enum runs Python code
        # _count_outcome(src, outcome_name), inline: once per update
        old = self._outcomes.get(src)
        counts = {} if old is None else old.copy()  # copy on write (see __init__)
        counts[outcome_name] = counts.get(outcome_name, 0) + 1
        self._outcomes[src] = counts
        self._silent.discard(src)  # it answers after all
        if outcome is Outcome.REJECTED and not self._unasked and self._children[peer] == "site":
            # A task of ours answered by a malformed update is a failed task: the site
            # waits out a refusal's backoff (else a 60-byte update that cannot be applied
            # buys a new task, the whole model, and a durable record, as fast as the link).
            self._dispatcher.suspend(src)
            self._refusals.back_off(src, self._now)
        else:
            self._refusals.answered(src)
        applied = outcome is Outcome.APPLIED
        if applied:
            # Only a buffer slot counts against the share: stale resends of updates kept
            # across a failover must not hold back the answers that fill the buffer.
            used = self._uses[src] = self._uses.get(src, 0) + 1
            self._last_applied[peer] = self._now  # it shares the epochs (again)
            site = self._children[peer] == "site"
            if self._unasked and site:
                self._unsolicited.add(peer)
            if self._variety_quota and site and used >= self._quota(peer):
                self._dispatcher.bench(peer)  # an honest fast site waits for the next epoch
        else:
            self._free[msg.src] = self._free.get(msg.src, 0) + 1
        self._log_n += 1
        data: dict[str, Any] = {
            "n": self._log_n,
            "src": msg.src,
            "seq": msg.seq,
            "outcome": outcome_name,
            "version": version,
            "base_version": msg.base_version,
            "tau": tau,
            "s": s,
            "n_examples": msg.n_examples,
            "count": msg.count,
            **extra,
        }
        if self._unasked:
            data["unasked"] = True
        if applied and self._log_deltas:
            data["delta"] = msg.delta
        pairs = self._pairs_of(peer, msg) if msg.pairs else ()  # a site's names none
        if pairs:
            # Decided, applied or not (a stale forward's site updates are settled too):
            # recorded, so a site whose updates went stale for a while (a region cut off
            # from its root) is not left far behind its next ones (``PairLedger``).
            near, far = self._pairs.take(pairs)
            data["pairs"] = [list(p) for p in near]
            if far:
                self._far_pairs(peer, msg, far, data, out)
            if applied:
                out.append(Metric("pairs_applied", float(len(pairs)), {"src": peer}))
        out.append(Persist(APPLIED_KEY, data, append=True))
        out.append(Send(peer, Ack(msg.src, msg.seq)))
        self._after_ack(peer, msg, outcome, out)

    def _far_pairs(
        self,
        peer: str,
        msg: Update,
        far: list[tuple[str, int]],
        data: dict[str, Any],
        out: list[Effect],
    ) -> None:
        """Site updates numbered far ahead of what this node took from their sites, in a
        forward it took: kept apart from the watermark (``PairLedger.take``: a region
        could erase a site's future updates), written as ``far_pairs``, counted, and said
        in a line per region a minute."""
        data["far_pairs"] = [list(p) for p in far]
        out.append(Metric("pairs_far_ahead", float(len(far)), {"src": peer}))
        unlogged = self._ignored.due(peer, "pairs_far_ahead", self._now)
        if unlogged is not None:
            sites = sorted({s for s, _ in far})[:8]
            fields = {"src": peer, "seq": msg.seq, "sites": sites, "unlogged_before": unlogged}
            out.append(Log("warning", "forward carries site updates numbered far ahead", fields))

    def _count_outcome(self, src: str, outcome: str) -> None:
        old = self._outcomes.get(src)
        counts = {} if old is None else old.copy()  # copy on write (see __init__)
        counts[outcome] = counts.get(outcome, 0) + 1
        self._outcomes[src] = counts

    def _pairs_of(self, peer: str, msg: Update) -> tuple[tuple[str, int], ...]:
        """The site updates a declared region child's forward carries (else none)."""
        if msg.pairs and self._children.get(peer) == "region" and self._pairs.declared(peer):
            return msg.pairs
        return ()

    def _after_ack(self, peer: str, msg: Update, outcome: Outcome, out: list[Effect]) -> None:
        """Settle what was just recorded. A root's record is final, so its ``Ack`` says
        it all; a region tells its children once its own forward is settled."""

    def _after_duplicate(self, peer: str, msg: Update, out: list[Effect]) -> None:
        """A resend of something recorded (re-acked): a region may settle it again."""

    def _admit(
        self,
        peer: str,
        msg: Update,
        reason: str | None,
        version: int,
        max_staleness: int | None,
        out: list[Effect],
    ) -> int | None:
        """The common first steps of an asynchronous aggregator taking an update: free its
        task slot, reject it if malformed, drop it if too stale. Returns its staleness when
        it is to be applied, None when it has been dealt with here."""
        task = msg.task  # _complete_task(peer, msg), inline: once per update
        if type(task) is int:
            self._dispatcher.complete(task, peer)
        elif is_int(task):
            self._dispatcher.complete(int(task), peer)
        if reason is not None:
            self._reject(peer, msg, reason, version, out)
            return None
        tau = version - msg.base_version
        if max_staleness is not None and tau > max_staleness:
            self.stale += 1
            out.append(Metric("update_stale", float(tau), {"src": msg.src}))
            self._record(peer, msg, Outcome.STALE, version, out, tau=tau)
            return None
        return tau

    def _record_applied(
        self,
        peer: str,
        msg: Update,
        version: int,
        tau: int,
        s: float,
        out: list[Effect],
        **extra: Any,
    ) -> None:
        """Count an update as applied: the metric, then its durable record and ack."""
        self.applied += 1
        out.append(Metric("update_applied", float(tau), {"src": msg.src, "seq": str(msg.seq)}))
        self._record(peer, msg, Outcome.APPLIED, version, out, tau=tau, s=s, **extra)

    def _reject(self, peer: str, msg: Update, reason: str, version: int, out: list[Effect]) -> None:
        """A malformed update from a child: reported, recorded and acked, never applied."""
        self.rejected += 1
        out.append(Metric("update_rejected", 1.0, {"reason": reason}))
        out.append(
            Log("warning", "update rejected", {"src": msg.src, "seq": msg.seq, "reason": reason})
        )
        self._record(peer, msg, Outcome.REJECTED, version, out, reason=reason)

    def _ahead_of_us(self, peer: str, msg: Update, out: list[Effect]) -> bool:
        """Whether ``msg`` (to a root) is based on a model newer than any this root holds:
        then this root lost (or was rolled back from) the state that published it, and
        would refuse every forward and its children every model, for good. Neither
        recorded nor acked (the child keeps it for the root once reseeded); one ERROR that
        names the fix every ``BEHIND_LOG_S``, and the gauge ``root_behind_children``.

        Only a region child's forward is taken as that evidence: a region relays models
        it was sent, so it can hold a newer one only if this root published it. A site
        directly under the root is answered with models only through tasks, so its future
        base version is a malformed update, rejected and recorded like any other (one
        site cannot make a healthy root claim it lost its state). A region's claim lasts
        while it holds: until it sends a forward this root can place, or goes down."""
        model = self._model()
        if model is None or self._children.get(peer) != "region" or not is_int(msg.base_version):
            return False
        if msg.base_version <= model[0]:
            if self._behind.pop(peer, None) is not None:  # no longer ahead of us
                self._report_behind(out)
            return False
        self._from_the_future(peer, msg, model[0], out)
        return True

    def _report_behind(self, out: list[Effect]) -> int:
        """The gauge ``root_behind_children`` (0 once no region claims to be ahead); returns
        the newest version claimed (-1: none)."""
        newest = max(self._behind.values(), default=-1)
        model = self._model()
        ahead = newest - model[0] if model is not None and newest >= 0 else 0
        out.append(Metric("root_behind_children", float(max(0, ahead))))
        return newest

    def _from_the_future(self, peer: str, msg: Update, version: int, out: list[Effect]) -> None:
        self.rejected += 1
        self._behind[peer] = max(self._behind.get(peer, -1), int(msg.base_version))
        out.append(Metric("update_rejected", 1.0, {"reason": "future_version"}))
        newest = self._report_behind(out)
        if self._behind_logged is not None and self._now < self._behind_logged + BEHIND_LOG_S:
            return
        self._behind_logged = self._now
        out.append(
            Log(
                "error",
                f"this root holds model version {version} but region {peer} sends forwards "
                f"based on version {self._behind[peer]}: the root's state was lost or rolled "
                "back, and training is stuck until it is reseeded. Stop this root and run "
                "`fedloom state reseed --config ROOT.toml --from STATE_DIR --above "
                f"{newest}` with the state directory of a region (or --backup with a backup "
                "of the root's), then start it again",
                {"peer": peer, "version": version, "child_version": newest},
            )
        )

    def _reject_unacked(self, peer: str, msg: Update, reason: str, out: list[Effect]) -> None:
        """Rejected without an ack: not from a child we answer for, or unnumbered. Nothing
        is written; the warning is logged once per peer, reason and epoch (no log flood)."""
        self.rejected += 1
        out.append(Metric("update_rejected", 1.0, {"reason": reason}))
        key = f"{peer}\x00{reason}"
        if key not in self._warned:
            self._warned.add(key)
            out.append(Log("warning", "update rejected", {"peer": peer, "reason": reason}))

    def _broadcast(self, out: list[Effect]) -> None:
        """Push the current model to every region child that is up."""
        if not self._regions_up or self._holding:
            return
        model = self._model()
        if model is None:
            return
        config = self._task_config()
        msg = ModelBroadcast(model[0], model[1], config=config, **self._model_proof())
        regions = self._regions_up
        now, append = self._now, out.append  # hoisted: a root has many regions
        for r in regions:
            regions[r] = now  # a repeated Hello soon after gets no copy (_on_hello)
            append(Send(r, msg))

    # ---------------------------------------------------------- durability
    def _base_snapshot(self) -> dict[str, Any]:
        return {
            "node_id": self._id,
            "ledger": self._ledger.snapshot(),
            "outcomes": dict(self._outcomes),  # its inner dicts are never changed
            "pairs": self._pairs.snapshot(),
            "log_n": self._log_n,
            "next_task": self._dispatcher.next_task,
            # The intake quota of the epoch in progress (O(children); rebuilt by replay).
            "uses": dict(self._uses),
            "free": dict(self._free),
            "unasked": sorted(self._unsolicited),
            # Who shares the epochs: after a restart they count as active for another
            # quiet_after_s from the first event (the clock itself is not durable).
            "active": sorted(self._recent_senders()),
            **self._secagg_snapshot(),
        }

    def relearn_site_pairs(self) -> None:
        """This node's record of the site updates it took is gone or old (a reseeded
        root): each site's next pair taken sets where its numbers stand
        (``PairLedger.relearn``), so sites far past that record are not refused as far
        ahead for ever. Persisted with the next checkpoint."""
        self._pairs.relearn()

    def _base_restore(self, state: Mapping[str, Any]) -> None:
        if state.get("node_id") != self._id:
            raise ValueError(f"snapshot of {state.get('node_id')!r}, not {self._id!r}")
        self._ledger = AppliedLedger.from_snapshot(state["ledger"])
        self._outcomes = {  # older checkpoints: none
            str(src): {str(k): int(v) for k, v in c.items()}
            for src, c in (state.get("outcomes") or {}).items()
        }
        self._pairs.restore(state.get("pairs"))  # older checkpoints: none
        self._log_n = int(state["log_n"])
        self._dispatcher.next_task = max(self._dispatcher.next_task, int(state["next_task"]))
        self._uses = {str(k): int(v) for k, v in state.get("uses", {}).items()}
        self._free = {str(k): int(v) for k, v in state.get("free", {}).items()}
        self._unsolicited = {str(c) for c in state.get("unasked", ())}
        self._last_applied = {}
        self._restored_active = {str(c) for c in state.get("active", ()) if c in self._children}

    def _replay_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replay "applied" records written after the loaded snapshot, in order."""
        for rec in records:
            n = int(rec["n"])
            if n <= self._log_n:
                continue
            if rec.get("op") == "cohort":
                self._replay_cohort_record(rec)
                continue
            src = str(rec["src"])
            self._ledger.record(src, int(rec["seq"]))
            self._count_outcome(src, str(rec["outcome"]))
            if "pairs" in rec:
                self._pairs.record((str(p[0]), int(p[1])) for p in rec["pairs"])
            if "far_pairs" in rec:  # after its pairs, as live (``PairLedger.take``)
                self._pairs.keep_far((str(p[0]), int(p[1])) for p in rec["far_pairs"])
            self._log_n = n
            # The decision counted against the child's quota, as it did live.
            if rec["outcome"] != Outcome.APPLIED.value:
                self._free[src] = self._free.get(src, 0) + 1
            else:
                self._uses[src] = self._uses.get(src, 0) + 1
                if rec.get("unasked") and self._children.get(src) == "site":
                    self._unsolicited.add(src)
                self._restored_active.add(src)
                if "delta" not in rec:
                    raise ValueError("an applied record without its delta cannot be replayed")
                self._replay(rec)
        if self._variety_quota:
            self._rebench()


class OwnModel:
    """The model a root aggregator owns: its version and weights."""

    _owns_model = True

    _version: int
    _weights: Weights

    def _init_model(self, weights: Weights, version: int) -> None:
        validate_weights(weights)
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        self._weights = dict(weights)
        self._version = version

    @property
    def version(self) -> int:
        return self._version

    def current_model(self) -> tuple[int, Weights]:
        return self._version, self._weights

    def _model(self) -> tuple[int, Weights]:
        return self._version, self._weights

    def _apply_step(self, opt: ServerOptimizer, delta: Weights, out: list[Effect]) -> bool:
        """weights ← opt.step(weights, delta), unless ``delta`` or the result is not finite:
        then the step is dropped (loudly) and the previous model and optimiser state stay."""
        if is_finite(delta):
            saved = opt.snapshot()
            with np.errstate(over="ignore", invalid="ignore"):
                new = opt.step(self._weights, delta)
            if is_finite(new):
                self._weights = new
                return True
            opt.restore(saved)
        out.append(Metric("aggregate_nonfinite", 1.0))
        out.append(
            Log(
                "error",
                "aggregate not finite: step dropped, model kept",
                {"version": self._version},
            )
        )
        return False
