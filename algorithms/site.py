"""A hospital site: trains what its aggregator asks for and delivers each delta at least once.

Client side of FedAvg / FedBuff (McMahan et al. 2017; Nguyen et al. 2022, Alg. 1, client):
receive model w (version v), train locally, return Δ = trained − w with base_version v.

State machine (``SiteState``): IDLE --TrainRequest--> TRAINING --TrainDone/TrainFailed--> IDLE.
A request that arrives while training is parked (only the newest is kept) and started when the
current job ends. A job that fails (``TrainFailed``: the plan raised, or refused the job
with a code) is answered with ``TrainRefused(task, version, code, reason)`` to the parent, so
the aggregator frees the task and counts the refusal (not for the simulator's "dropout").
So is a job whose result does not fit the model or is not finite (code "failed", reason
"weights do not match the model" / "non-finite weights"): no update is sent for it.
The config a job trains with gets ``server_round`` (the request's version + 1, as Flower
clients expect) and, with a site seed, ``seed``. Each finished job becomes ``Update(seq)``
in an ``Outbox``: persisted, sent, kept until the parent's ``Ack``; on ``PeerUp(parent)``
the site says ``Hello`` and resends its unacknowledged updates in seq order (the parent
deduplicates by ``(site, seq)``), under the outbox's acknowledgement-paced window
(``algorithms.outbox``).

Backpressure: while the outbox holds ``max_outbox_bytes`` (None: ``DEFAULT_OUTBOX_UPDATES``
updates' worth) the site starts no training; the newest request is parked and started once
acks drain the outbox below it, so a site whose parent does not acknowledge keeps a bounded
outbox (metric ``dispatch_paused``).

Compaction: each pending update is logged with its delta, so the log grows by a model's
size per update. Whenever an ``Ack`` empties the outbox the site writes a checkpoint of
what must survive a restart (the seq counter; nothing is pending), which supersedes and
deletes the log: a site daemon's disk use stays bounded however long it runs. The model
view is left out of that checkpoint (it would cost a model-sized write per round); after
a restart the site learns the model again from its next request.

Failover (``algorithms.incorporation``; issue 13): a site given ``fallbacks`` (its region's
standby) keeps each update after the ``Ack`` until its parent says it is settled
(``Incorporated``), at most ``max_held`` of them (then it trains no more until some are
settled). When its parent has been down for ``failover_after_s`` and a fallback is up, it
switches: ``Hello`` to the new parent and every update not yet settled is resent there. It
stays with the new parent until that one fails (the parents' ledgers and the root's pair
ledger make any copy count once). Without fallbacks nothing changes: an ack ends it.

Hello retries: a link may lose a message without going down (the simulator's
``loss_effect = "drop"``), and a parent that never heard a site's ``Hello`` never gives it
a task. With ``hello_timeout_s`` set, a site that has heard no ``TrainRequest`` (nor a
model or a secure-aggregation message) from its parent that long after its ``Hello`` says
``Hello`` again (metric ``hello_resent``), waiting twice as long each time, at most
``aggregator_base.HELLO_RETRY_MAX_FACTOR`` times the time-out; the first such message, or
``PeerDown``, ends it. A parent takes a repeated ``Hello`` as the same session's
(``aggregator_base``): harmless, it buys nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedloom.algorithms.aggregator_base import CHECKPOINT_KEY, HELLO_RETRY_MAX_FACTOR
from fedloom.algorithms.incorporation import (
    DEFAULT_FAILOVER_AFTER_S,
    DEFAULT_MAX_HELD,
    HELD_KEY,
    HeldUpdates,
)
from fedloom.algorithms.node_util import unexpected
from fedloom.algorithms.outbox import Outbox
from fedloom.algorithms.protocol import (
    NO_RECORDS,
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
    RecordSource,
    Send,
    Train,
    TrainDone,
    TrainedDelta,
    TrainFailed,
    TrainResult,
    Weights,
)
from fedloom.algorithms.secure_site import MEMBER_LOG_KEY, SECAGG_TO_SITE, SiteSecAgg
from fedloom.algorithms.warn_limit import WarnLimiter, quiet_refusals
from fedloom.algorithms.weights_math import check_compatible, is_finite, quiet_overflow
from fedloom.transport.settings import settings_problem
from fedloom.transport.wire import (
    Ack,
    Hello,
    Incorporated,
    ModelBroadcast,
    TrainRefused,
    TrainRequest,
    Update,
)

__all__ = ["SiteNode", "SiteState", "trained_delta"]

PENDING_KEY = "site/pending"


class SiteState(enum.Enum):
    IDLE = "idle"
    TRAINING = "training"


class SiteNode:
    """Sans-I/O site: ``handle(event, now) -> effects``."""

    # A TrainDone may carry a TrainedDelta (see trained_delta) instead of a TrainResult.
    accepts_trained_delta = True

    def __init__(
        self,
        site_id: str,
        parent: str,
        *,
        n_examples: int = 0,
        seed: int | None = None,
        max_outbox_bytes: int | None = None,
        fallbacks: Sequence[str] = (),
        failover_after_s: float = DEFAULT_FAILOVER_AFTER_S,
        max_held: int = DEFAULT_MAX_HELD,
        secure: SiteSecAgg | None = None,
        hello_timeout_s: float | None = None,
    ) -> None:
        if not site_id or not parent:
            raise ValueError("site_id and parent must be non-empty")
        if site_id == parent:
            raise ValueError("a site cannot be its own parent")
        parents = (parent, *fallbacks)
        if site_id in parents or len(set(parents)) != len(parents) or not all(parents):
            raise ValueError(f"fallbacks must be distinct non-empty ids, got {fallbacks!r}")
        if not failover_after_s > 0.0:
            raise ValueError(f"failover_after_s must be > 0, got {failover_after_s}")
        if hello_timeout_s is not None and not 0.0 < hello_timeout_s < float("inf"):
            raise ValueError(f"hello_timeout_s must be > 0 and finite, got {hello_timeout_s}")
        self.hello_timeout_s = hello_timeout_s
        self._hello_at: float | None = None  # a Hello no task or model has answered yet
        self._hello_wait = 0.0
        if secure is not None and fallbacks:
            # A kept update resent to a standby would be a second masking of it.
            raise ValueError("secure aggregation does not combine with fallbacks (failover)")
        # Secure aggregation (``algorithms.secure_site``): updates leave only masked.
        self._secure = secure
        self._parents = parents
        self.failover_after_s = failover_after_s
        # Updates acked, not yet settled: kept only where there is a standby to resend to.
        self._held = HeldUpdates(max_held) if fallbacks else None
        self._up: set[str] = set()
        self._down_since: float | None = None  # the current parent's, once seen down
        self._id = site_id
        self.parent = parent
        self.n_examples = n_examples
        self._seed = seed
        self.state = SiteState.IDLE
        self._outbox = Outbox(PENDING_KEY, max_bytes=max_outbox_bytes)
        self._job = 0
        self._base: Weights | None = None
        self._base_version = -1
        self._task = -1
        self._parked: TrainRequest | None = None
        self._model: tuple[int, Weights] | None = None
        self._newest_version = -1  # kept through compaction: a floor against rollbacks
        self.jobs_failed = 0
        self.settings_refused = 0  # requests whose config is not what the root signed
        self._settings_warn = WarnLimiter()
        # Messages ignored or refused (secure aggregation): a line per peer and reason a minute.
        self._ignored = WarnLimiter()

    @property
    def node_id(self) -> str:
        return self._id

    @property
    def pending(self) -> int:
        """Updates sent but not yet acknowledged."""
        return len(self._outbox)

    @property
    def seq(self) -> int:
        return self._outbox.seq

    @property
    def newest_version(self) -> int:
        """The newest model version this site has been given (-1: none yet); survives a
        restart, so a runtime can refuse older models after one (``runtime.signing``)."""
        return self._newest_version

    def current_model(self) -> tuple[int, Weights] | None:
        """The newest global model this site has seen (broadcast or training request)."""
        return self._model

    def omit_metrics(self, names: Iterable[str]) -> None:
        """Its driver drops the metrics ``names`` unread (``federation.step``): build none
        of those gauges."""
        self._outbox.omit_gauges(names)

    @property
    def paused(self) -> bool:
        """Backpressure: the outbox is full, so no new training starts."""
        return self._outbox.full or (self._held is not None and self._held.full)

    @property
    def held(self) -> int:
        """Updates acknowledged but not yet settled (kept for a failover)."""
        return 0 if self._held is None else len(self._held)

    @property
    def secure(self) -> SiteSecAgg | None:
        """This site's secure uplink (None: plain updates)."""
        return self._secure

    def next_deadline(self) -> float | None:
        first = self._outbox.next_deadline()
        if self._secure is None and self._held is None and self._hello_at is None:
            return first  # the common case: the outbox's alone
        times = [first]
        if self._secure is not None:
            times.append(self._secure.next_deadline())
        if self._held is not None:
            times.append(self._held.next_deadline())
            if self._down_since is not None:
                times.append(self._down_since + self.failover_after_s)
        if self._hello_at is not None:
            times.append(self._hello_at + self._hello_wait)
        return min((t for t in times if t is not None), default=None)

    # ----------------------------------------------------------------- events
    def handle(self, event: Event, now: float) -> list[Effect]:
        if self._secure is not None:
            self._secure.touch(now)
        out = self._handle(event, now)
        if self._parked is not None and self.state is SiteState.IDLE and not self.paused:
            parked, self._parked = self._parked, None  # acks drained the outbox
            out.extend(self._start(parked))
        if self._secure is not None:
            out = self._secure.uplink(out)  # never a plain update
        outbox = self._outbox
        if outbox.metrics_due(now):
            gauges = {}
            if outbox.wants("dispatch_paused"):
                gauges["dispatch_paused"] = float(self.paused)
            if self._held is not None and outbox.wants("held_updates"):
                gauges["held_updates"] = float(len(self._held))  # kept until settled
            out.extend(outbox.metrics(now, **gauges))
        return out

    def _handle(self, event: Event, now: float) -> list[Effect]:
        if self._held is not None and self._down_since is None and self.parent not in self._up:
            self._down_since = now  # not up since we started: the failover clock runs
        if isinstance(event, Received):
            return self._on_received(event.peer, event, now)
        if isinstance(event, TrainDone):
            return self._on_done(event, now)
        if isinstance(event, TrainFailed):
            self._check_job(event.job)
            return self._failed(event.job, event.reason, event.code, now)
        if isinstance(event, PeerUp):
            self._up.add(event.peer)
            if event.peer != self.parent:
                return self._maybe_failover(now)
            self._down_since = None
            return self._greet(now)
        if isinstance(event, PeerDown):
            self._up.discard(event.peer)
            if event.peer == self.parent:
                self._hello_at = None  # the next PeerUp greets afresh
                self._outbox.link_down()  # pending updates stay until the link is back
                if self._held is not None:
                    self._held.link_down()
                    self._down_since = now
            return []
        if isinstance(event, Deadline):
            held = self._held.on_deadline(now) if self._held is not None else []
            if self._secure is not None:
                lost, seqs = self._secure.expired(now)
                held += lost + self._consume(seqs, now)
            held += self._hello_again(now)
            return self._outbox.on_deadline(now) + held + self._maybe_failover(now)
        raise ProtocolMisuseError(f"site cannot handle {type(event).__name__}")

    def _greet(self, now: float) -> list[Effect]:
        """Hello to the parent, then every update it has not settled, in seq order."""
        hello: list[Effect] = [Send(self.parent, Hello(self._id, "site", self.n_examples))]
        if self.hello_timeout_s is not None:
            self._hello_at, self._hello_wait = now, self.hello_timeout_s
        held = self._held.resend(self.parent, now) if self._held is not None else []
        return hello + held + self._outbox.resend(self.parent, now=now)

    def _hello_again(self, now: float) -> list[Effect]:
        """Say Hello again if the last one is unanswered after its wait (it may be lost)."""
        at, timeout = self._hello_at, self.hello_timeout_s
        if at is None or timeout is None or now < at + self._hello_wait:
            return []
        if self.parent not in self._up:
            self._hello_at = None  # the next PeerUp greets
            return []
        self._hello_at = now
        self._hello_wait = min(2.0 * self._hello_wait, HELLO_RETRY_MAX_FACTOR * timeout)
        return [
            Send(self.parent, Hello(self._id, "site", self.n_examples)),
            Metric("hello_resent", 1.0, {"parent": self.parent}),
        ]

    def _maybe_failover(self, now: float) -> list[Effect]:
        """Switch to the first parent that is up once the current one has been down for
        ``failover_after_s``."""
        since = self._down_since
        if self._held is None or since is None or now < since + self.failover_after_s:
            return []
        candidates = [p for p in self._parents if p in self._up and p != self.parent]
        if not candidates:
            return []
        old, self.parent = self.parent, candidates[0]
        self._down_since = None
        self._outbox.link_down()  # nothing is in flight on the new link yet
        self._held.link_down()
        out: list[Effect] = [
            Log("warning", "parent down: failing over", {"from": old, "to": self.parent}),
            Metric("parent_failover", 1.0, {"to": self.parent}),
        ]
        return out + self._greet(now)

    def _on_settled(self, peer: str, msg: Incorporated, now: float) -> list[Effect]:
        """``msg.seq`` needs no resending any more. From the current parent it also implies
        the ack; another parent (a former one, or a fallback) may only settle what some
        parent acked and this site keeps: it may never have received one still pending."""
        if msg.src != self._id:
            return []
        out = self._outbox.ack(msg.seq, now=now) if peer == self.parent else []
        if self._held is not None:
            out += self._held.settle(msg.seq, now)
        if not any(isinstance(e, Persist) for e in out):
            return out  # nothing was kept for it (a site without fallbacks): no write
        return out + self._maybe_compact()

    def _maybe_compact(self) -> list[Effect]:
        """Checkpoint when the outbox is empty and what is held makes it worth it."""
        if len(self._outbox) or (self._held is not None and not self._held.compaction_due()):
            return []
        if self._held is not None:
            self._held.checkpointed()
        return [Persist(CHECKPOINT_KEY, self._drained_snapshot())]

    def _on_received(self, peer: str, event: Received, now: float) -> list[Effect]:
        msg = event.msg
        if isinstance(msg, Incorporated) and peer in self._parents:
            return self._on_settled(peer, msg, now)  # a former parent may settle kept ones
        if peer != self.parent:
            return unexpected(peer, msg, "not_parent", self._ignored, now)
        if isinstance(msg, TrainRequest | ModelBroadcast) or (
            self._secure is not None and isinstance(msg, SECAGG_TO_SITE)
        ):
            self._hello_at = None  # the parent knows this site: its Hello got through
        if isinstance(msg, TrainRequest):
            refused = self._refuse_unsigned_settings(msg, now)
            return refused if refused else self._on_request(msg)
        if self._secure is not None and isinstance(msg, SECAGG_TO_SITE):
            out, consumed = self._secure.on_message(peer, msg, self._outbox.pending(), now)
            # A parent repeating a message the member refuses (a view for a cohort never
            # uploaded to, a seal it cannot accept) costs a metric each, a line a minute.
            out = quiet_refusals(self._ignored, peer, out, now, "secagg_refused")
            return out + self._consume(consumed, now)
        if isinstance(msg, Ack):
            if msg.src != self._id:
                return unexpected(peer, msg, "ack_for_other", self._ignored, now)
            if self._secure is not None:
                self._secure.acked(msg.seq)
                acked = self._outbox.ack(msg.seq, now=now)
                return acked + (self._maybe_compact() if acked else [])
            update = None
            if self._held is not None:  # kept until settled, for a failover
                update = next((u for u in self._outbox.pending() if u.seq == msg.seq), None)
            acked = self._outbox.ack(msg.seq, now=now)
            if self._held is not None:
                if update is not None:
                    acked += self._held.keep(update)
                acked += self._held.answered(msg.seq, now)  # a resent kept one: the next
            if acked:
                acked += self._maybe_compact()
            return acked
        if isinstance(msg, ModelBroadcast):
            self._remember(msg.version, msg.weights)
            return []
        return unexpected(peer, msg, "unexpected_type", self._ignored, now)

    def _consume(self, seqs: list[int], now: float) -> list[Effect]:
        """Uploaded updates whose cohort ended without them applied: dropped for good."""
        if not seqs:
            return []
        out: list[Effect] = []
        for seq in seqs:
            out += self._outbox.ack(seq, now=now)
        return out + self._maybe_compact()

    def _remember(self, version: int, weights: Weights) -> None:
        if self._model is None or version > self._model[0]:
            self._model = (version, weights)
        self._newest_version = max(self._newest_version, version)

    def _refuse_unsigned_settings(self, req: TrainRequest, now: float) -> list[Effect]:
        """Refuse (train nothing, keep nothing) a request whose config is not the one the
        root signed with its model: ``req.settings`` is that digest, verified with the
        root's signature on receipt (``federation.signing``); a relay that altered lr or
        the steps is caught here. The parent hears ``TrainRefused("unsigned_settings")``;
        a metric per request, a warning per minute. Unsigned requests (no e2e signing:
        in-memory runs) carry no digest and are not checked. The site's own keys (seed,
        server_round) are added after this check, when the job starts."""
        if not req.settings:
            return []
        problem = settings_problem(req.config, req.settings)
        if problem is None:
            return []
        self.settings_refused += 1
        out: list[Effect] = [Metric("message_rejected", 1.0, {"reason": "unsigned_settings"})]
        unlogged = self._settings_warn.due(self.parent, "unsigned_settings", now)
        if unlogged is not None:
            text = f"refused a training request: {problem}; not trained"
            if unlogged:
                text += f" ({unlogged} more refused since the last line)"
            fields = {"peer": self.parent, "task": req.task, "version": req.version}
            out.append(Log("warning", text, {**fields, "reason": "unsigned_settings"}))
        reason = f"{problem}; not trained"[:200]
        refusal = TrainRefused(self._id, req.task, req.version, "unsigned_settings", reason)
        out.append(Send(self.parent, refusal))
        return out

    def _on_request(self, req: TrainRequest) -> list[Effect]:
        self._remember(req.version, req.weights)
        if self.state is SiteState.TRAINING or self.paused:
            # Only the newest request matters: an older one would train a staler model.
            # A full outbox parks it too (backpressure) until acks drain it.
            self._parked = req
            return []
        return self._start(req)

    def _start(self, req: TrainRequest) -> list[Effect]:
        self._job += 1
        self._base = req.weights
        self._base_version = req.version
        self._task = req.task
        self.state = SiteState.TRAINING
        # Flower clients read the round they train in (rounds start at 1); the approval
        # gate ignores the keys a site adds itself (``federation.training.SITE_CONFIG_KEYS``).
        config: Mapping[str, Any] = {**req.config, "server_round": int(req.version) + 1}
        if self._seed is not None:
            # A distinct, reproducible seed per (site, job).
            config = {**config, "seed": (self._seed * 1_000_003 + self._job) % 2**31}
        return [Train(self._job, req.weights, config)]

    def _check_job(self, job: int) -> None:
        if self.state is not SiteState.TRAINING or job != self._job:
            raise ProtocolMisuseError(f"site {self._id}: no training job {job} in progress")

    def _failed(self, job: int, reason: str, code: str, now: float) -> list[Effect]:
        """Job ``job`` failed: the parent hears ``TrainRefused(code, reason)`` (it frees the
        task's slot and counts the refusal, issue 14), no update is sent. A metric per job,
        a line per code a minute: a parent that ignores the refusal's backoff and sends the
        request again at once (a plan this site refuses, a spent budget) gets a refusal
        each time, not a log line each."""
        self.jobs_failed += 1
        out: list[Effect] = [Metric("train_failed")]
        unlogged = self._ignored.due("training", f"failed_{code}", now)
        if unlogged is not None:
            fields = {"job": job, "reason": reason, "code": code, "unlogged_before": unlogged}
            out.insert(0, Log("warning", "training failed", fields))
        if code != "dropout":  # the simulator's dead site says nothing
            refusal = TrainRefused(self._id, self._task, self._base_version, code, reason[:200])
            out.append(Send(self.parent, refusal))
        return out + self._finish_job()

    def _on_done(self, event: TrainDone, now: float) -> list[Effect]:
        self._check_job(event.job)
        base = self._base
        assert base is not None
        result = event.result
        if not isinstance(result, TrainedDelta):  # else computed and checked where it trained
            checked = trained_delta(result, base)
            if isinstance(checked, str):
                return self._failed(event.job, checked, "failed", now)
            result = checked
        update = Update(
            src=self._id,
            seq=self._outbox.next_seq(),
            base_version=self._base_version,
            delta=result.delta,
            n_examples=result.n_examples,
            count=1,
            task=self._task,
            metrics=dict(result.metrics),
        )
        return self._outbox.push(self.parent, update, now=now) + self._finish_job()

    def _finish_job(self) -> list[Effect]:
        self.state = SiteState.IDLE
        self._base = None
        if self.paused:
            return []  # the parked request waits for acks (see ``handle``)
        parked, self._parked = self._parked, None
        return self._start(parked) if parked is not None else []

    # ------------------------------------------------------------- durability
    def snapshot(self) -> dict[str, Any]:
        """Outbox and model view; in-flight training is not durable (it is simply redone)."""
        state: dict[str, Any] = {
            "outbox": self._outbox.snapshot(),
            "model": self._model,
            "newest_version": self._newest_version,
        }
        if self._held is not None:
            state["held"] = self._held.snapshot()
        if self._secure is not None:
            state["secagg"] = self._secure.snapshot()
        return state

    def _drained_snapshot(self) -> dict[str, Any]:
        """The compaction checkpoint: an empty outbox (its seq counter) and no model view."""
        return {**self.snapshot(), "model": None}

    def restore(
        self, checkpoint: Mapping[str, Any] | None, records: RecordSource = NO_RECORDS
    ) -> None:
        """Load ``snapshot()`` output (None: this fresh node's own), then replay the
        "site/pending" and "site/held" records written after it
        (``algorithms.protocol.Restorable``)."""
        state = self.snapshot() if checkpoint is None else checkpoint
        held_records = records.records(HELD_KEY)
        pending = list(records.records(PENDING_KEY))
        self._outbox.restore(state["outbox"], pending)
        if self._held is not None:
            # A "keep" record names a seq; its update is in the outbox's log or snapshot.
            sent = {u.seq: u for u in state["outbox"]["pending"]}
            sent.update((int(r["seq"]), r["update"]) for r in pending if r["op"] == "add")
            self._held.restore(state.get("held", ()), held_records, sent)
        if self._secure is not None:
            pending_seqs = [u.seq for u in self._outbox.pending()]
            self._secure.restore(state.get("secagg"), records.records(MEMBER_LOG_KEY), pending_seqs)
        self._model = state.get("model")
        newest = state.get("newest_version", -1)  # older checkpoints: from the model
        model_version = self._model[0] if self._model is not None else -1
        self._newest_version = max(int(newest), int(model_version))


def trained_delta(result: TrainResult, base: Weights) -> TrainedDelta | str:
    """A job's update: ``result.weights - base``, or why there is none. A result that does
    not fit the model, or is not finite (a diverged client), is a failed job: an update of
    it would be refused by the parent on every resend. ``base`` is the weights the job was
    given. A site calls it on a ``TrainResult``; an executor may call it where the job
    trained and deliver the ``TrainedDelta`` (the same values, bit for bit)."""
    if check_compatible(base, result.weights) is not None:
        return "weights do not match the model"
    delta = _delta(result.weights, base)
    if not is_finite(delta):
        return "non-finite weights"
    return TrainedDelta(delta, int(result.n_examples), result.metrics)


@quiet_overflow  # numpy 2: no errstate object built per job (a few µs each)
def _delta(weights: Weights, base: Weights) -> Weights:
    """``weights - base`` per tensor, in the base's dtype; an overflow shows as inf (the
    caller refuses a non-finite delta), without a warning."""
    out: Weights = {}
    for k, b in base.items():
        d = weights[k] - b
        if type(d) is not np.ndarray:  # a 0-d tensor's difference is a numpy scalar
            d = np.asarray(d)
        kind = b.dtype
        # d.astype(kind, copy=False), which returns d itself when it has that dtype
        out[k] = d if d.dtype is kind else d.astype(kind, copy=False)
    return out
