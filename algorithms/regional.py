"""A regional (edge) aggregator: a FedBuff buffer for its children that forwards one
aggregated delta upward, and a relay of global models downward.

HierFAVG (Liu et al., "Client-Edge-Cloud Hierarchical Federated Learning", ICC 2020,
arXiv 1905.06641) generalised to asynchronous buffers at every tier: instead of κ₂ synchronous
edge rounds per cloud round, the region buffers its children's deltas FedBuff-style
(Nguyen et al. 2022, Alg. 1), with staleness τ relative to the newest global version it
knows, and after K of them sends its parent ONE

    Update(src=region, seq=own seq, base_version=newest known version,
           delta=Σ s(τ_i)·w_i·Δ_i / Σ w_i, n_examples=Σ n_i, count=Σ count_i).

Its children's ``count`` and ``n_examples`` claims are bounded, their deltas norm-clipped
and their updates taken at most a fair share per flush (``aggregator_base``, ``intake``),
and an aggregate that is not finite is dropped (metric ``aggregate_nonfinite``), never
forwarded. It holds no model of its own: it relays every ``ModelBroadcast`` from the parent
to its region children and hands the newest global (version, weights) to its sites as tasks,
with the root's training config that came with it (``ModelBroadcast.config``, signed by the
root with the model) and the root's proof: its own ``train_config`` (a daemon's
``[training]``) does not decide what its sites train with (logged once when it differs).
The same model broadcast again (same version and weights: a root restarted with another
``[training]``) brings its proof and config too; a region restored from a checkpoint that
kept no root config hands out no tasks until it has one (logged once).
Towards its parent it behaves like a site (``Hello(role="region")`` on ``PeerUp``, its
forwards kept in an ``Outbox`` until acked, sent and resent in seq order under its
acknowledgement-paced window, never all at once after an outage); towards
its children like the root (dedup ledger, Persist-then-Ack, rejections). Regions nest: the
parent may itself be a region. With ``hello_timeout_s`` set, a region whose ``Hello`` no
``ModelBroadcast`` has answered that long (the Hello or the model may be lost on a link
that stays up) says ``Hello`` again (metric ``hello_resent``), waiting twice as long each
time up to ``HELLO_RETRY_MAX_FACTOR`` time-outs; its parent answers a repeated Hello
from a region with the model again, at most once per ``HELLO_MODEL_RESEND_S``
(``aggregator_base``).

Failover (``algorithms.incorporation``): each forward names the site updates it carries
(``Update.pairs``) and is kept until it is settled (the root's ``Ack``; a parent region's
``Incorporated``); the region then sends ``Incorporated`` to each contributing child, which
may forget its update. A parent that already took some of the pairs (through this region's
standby, or this region before a failover) answers ``Overlap``: with ``keep_parts`` (a
region with a standby) the forward is rebuilt without them under the same seq, else it is
dropped and what it held besides is counted lost (``pairs_lost``).

Accounting (``conservation``, read by the chaos checker): per child, the updates applied
here that left the buffer in a forward or in a dropped non-finite aggregate are counted in
the checkpoint (and by the replay after it) and named in a "flushed" record; a forward
rebuilt after an ``Overlap`` takes nothing from the buffer and is not counted again.

States (``RegionState``): NO_MODEL — nothing to hand out yet: no tasks are dispatched and
children's updates are held until the first model arrives; ACTIVE.

Updates held without a model cannot be checked against one, so what they may hold is
bounded: ``max_deferred`` updates and ``max_deferred_bytes`` of decoded deltas in all,
``MAX_DEFERRED_PER_CHILD`` updates per child (its outbox window: one child cannot take the
others' room), and a child's held updates are dropped when it goes down (``PeerDown``:
they were never acked, so it resends them on its next session, and a revoked child leaves
none behind). Beyond that an update is refused without an ack; the site keeps it in its
outbox and resends it after its next reconnect, so nothing acknowledged is lost. (Honest
sites only send updates for tasks, which need a model: holding is for the rare region that
lost its state while its sites still had updates pending, or lags a site that failed over
and back, so the bound is small.)

Backpressure: while the parent does not acknowledge (or, a parent region, does not
settle), forwards pile up: in the outbox (in memory and in the "region/pending" log) and,
acked by a parent region but not yet settled, among the kept forwards (in memory and in
every checkpoint). Once both together hold ``max_outbox_bytes`` (None:
``outbox.DEFAULT_OUTBOX_UPDATES`` forwards' worth) the region is ``paused`` (metric
``dispatch_paused``) until acks and settlements drain it below that:

* it dispatches no new tasks. Site children's updates that arrive meanwhile are still
  taken, acked and flushed: they answer tasks handed out before the pause (or are resends
  the sites hold), so at most ``concurrency`` task answers plus what the sites already held
  arrive, a bounded overshoot of a few forwards;
* a region child gets no tasks, so the pause alone would not stop it: its new forwards are
  held unacked (at most ``MAX_HELD_PAUSED`` per child, its outbox window's worth) and
  taken once the pause ends. Its outbox then fills and it pauses in turn, so backpressure
  reaches the leaves of a nested tree. (Duplicates are still re-acked.)

After a reconnect the kept forwards are resent through the outbox's window, ahead of the
pending ones, never all at once.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.aggregator_base import (
    APPLIED_KEY,
    CHECKPOINT_KEY,
    HELLO_RETRY_MAX_FACTOR,
    Outcome,
    checkpoint_interval,
)
from fedloom.algorithms.buffered import FEDBUFF_STALENESS, BufferedAggregator
from fedloom.algorithms.incorporation import FORWARDS_KEY, Contribution, RegionForwards
from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.node_util import unexpected
from fedloom.algorithms.outbox import WINDOW, Outbox
from fedloom.algorithms.protocol import (
    NO_RECORDS,
    Effect,
    Event,
    Log,
    Metric,
    Persist,
    RecordSource,
    Send,
    Weights,
)
from fedloom.algorithms.staleness import StalenessFn
from fedloom.algorithms.update_buffer import UpdateBuffer
from fedloom.algorithms.validation import is_int
from fedloom.algorithms.weights_math import check_compatible
from fedloom.transport.wire import (
    Ack,
    Heartbeat,
    Hello,
    Incorporated,
    Message,
    ModelBroadcast,
    Overlap,
    TrainRefused,
    Update,
)

__all__ = ["DEFAULT_MAX_DEFERRED_BYTES", "PENDING_KEY", "RegionState", "RegionalAggregator"]

PENDING_KEY = "region/pending"
# Forwards of one region child held unacked while paused: its outbox window's worth (an
# honest child has no more in flight); beyond that they are dropped unacked.
MAX_HELD_PAUSED = WINDOW
# Updates of one child deferred until a model arrives: its outbox window's worth (an
# honest child has no more in flight on its link), so one child cannot take the room the
# others' deferrals need (``max_deferred``, ``max_deferred_bytes``).
MAX_DEFERRED_PER_CHILD = WINDOW
DEFAULT_MAX_DEFERRED_BYTES = 64 << 20  # decoded delta bytes held before the first model


class RegionState(enum.Enum):
    NO_MODEL = "no_model"
    ACTIVE = "active"


class RegionalAggregator(BufferedAggregator):
    """Sans-I/O regional aggregator: ``handle(event, now) -> effects``.

    The methods run for every event or update call the base class's by name
    (``BufferedAggregator.handle(self, ...)``), not through ``super()``: the same method
    (single inheritance), without a ``super`` object built per call.
    """

    def __init__(
        self,
        node_id: str,
        parent: str,
        children: Mapping[str, str],
        *,
        buffer_size: int,
        concurrency: int,
        staleness: StalenessFn = FEDBUFF_STALENESS,
        max_staleness: int | None = None,
        train_config: Mapping[str, Any] | None = None,
        task_timeout_s: float | None = None,
        rng: np.random.Generator | int = 0,
        weighting: str = "uniform",
        clip_norm: object = "auto",
        robust: str = "mean",
        trim_fraction: float = 0.1,
        checkpoint_every: int = 10,
        log_deltas: bool = True,
        max_deferred: int = 10_000,
        max_deferred_bytes: int = DEFAULT_MAX_DEFERRED_BYTES,
        claim_bounds: ClaimBounds | None = None,
        max_outbox_bytes: int | None = None,
        parent_is_root: bool = True,
        keep_parts: bool = False,
        hello_timeout_s: float | None = None,
    ) -> None:
        super().__init__(
            node_id,
            children,
            buffer_size=buffer_size,
            concurrency=concurrency,
            staleness=staleness,
            max_staleness=max_staleness,
            train_config=train_config,
            task_timeout_s=task_timeout_s,
            rng=rng,
            weighting=weighting,
            clip_norm=clip_norm,
            robust=robust,
            trim_fraction=trim_fraction,
            log_deltas=log_deltas,
            claim_bounds=claim_bounds,
        )
        if not parent or parent == node_id:
            raise ValueError(f"bad parent {parent!r} for region {node_id!r}")
        if parent in children:
            raise ValueError(f"{parent!r} cannot be both parent and child of {node_id!r}")
        if max_deferred < 0:
            raise ValueError(f"max_deferred must be >= 0, got {max_deferred}")
        if hello_timeout_s is not None and not 0.0 < hello_timeout_s < float("inf"):
            raise ValueError(f"hello_timeout_s must be > 0 and finite, got {hello_timeout_s}")
        self.hello_timeout_s = hello_timeout_s
        self._hello_at: float | None = None  # a Hello no model has answered yet
        self._hello_wait = 0.0
        if max_deferred_bytes < 0:
            raise ValueError(f"max_deferred_bytes must be >= 0, got {max_deferred_bytes}")
        self.parent = parent
        self.checkpoint_every = checkpoint_interval(checkpoint_every)
        self.max_deferred = max_deferred
        self.max_deferred_bytes = max_deferred_bytes
        self.state = RegionState.NO_MODEL
        self._global: tuple[int, Weights] | None = None
        self._proof: tuple[str, int, bytes] = ("", 0, b"")  # root's (signer, parent, sig)
        # The root's training config for the global model, and the digest it signed
        # (``transport.settings``; empty when unsigned): what the sites train with.
        self._root_config: dict[str, Any] | None = None
        self._settings = b""
        self._config_wait_logged = False  # said why no tasks go out without a root config
        self._outbox = Outbox(PENDING_KEY, max_bytes=max_outbox_bytes)
        self._hello_deferred = False  # the parent's link is up; Hello waits for the quorum
        self._deferred: list[tuple[str, Update]] = []
        # (child, seq) of each update in ``_deferred``: a resend is found in O(1) (a scan
        # of the list per update made a flood of deferrals, and each model taking them up
        # again, quadratic: 10,000 cost seconds of the event loop per model version).
        self._deferred_keys: set[tuple[str, int]] = set()
        self._deferred_per: dict[str, int] = {}  # child -> its updates in ``_deferred``
        self.deferred_bytes = 0  # decoded delta bytes in ``_deferred``
        self._replay_version: int | None = None
        self._forwards = RegionForwards()  # forwards kept until settled, with their parts
        # A root's Ack settles a forward; a parent region settles it with Incorporated.
        self.parent_is_root = parent_is_root
        # Keep each unsettled forward's deltas to rebuild it after an Overlap: needed by a
        # region with a standby (and the standby); costs up to K deltas per forward kept.
        self.keep_parts = keep_parts
        self.forwarded = 0
        # Per child, its applied updates that left the buffer: in a forward ("forwarded")
        # or in a dropped aggregate ("nonfinite"). Durable (checkpoint, then replay), so the
        # chaos checker can prove applied == forwarded + nonfinite + still buffered.
        # Copy on write, like ``_outcomes``: a snapshot copies only the outer dict.
        self._flushed: dict[str, dict[str, int]] = {}

    @property
    def pending(self) -> int:
        """Forwarded aggregates not yet acknowledged by the parent."""
        return len(self._outbox)

    @property
    def seq(self) -> int:
        return self._outbox.seq

    def pending_forwards(self) -> list[Update]:
        """The forwards not yet acknowledged, in seq order."""
        return self._outbox.pending()

    @property
    def paused(self) -> bool:
        """Backpressure: the forwards pending in the outbox and those kept until a parent
        region settles them reach the outbox's limit: no new tasks are dispatched and
        region children's new forwards are held."""
        if self._outbox.full:
            return True
        if self.parent_is_root or not len(self._forwards):
            return False  # a root's ack settles: every kept forward is pending
        waiting = {u.seq for u in self._outbox.pending()}
        return self._outbox.full_with(u for u in self._forwards.updates() if u.seq not in waiting)

    def _within_quota(self, peer: str, msg: Update, out: list[Effect]) -> bool:
        if self._children.get(peer) != "region" or not self.paused:
            return BufferedAggregator._within_quota(self, peer, msg, out)
        held = self._held.setdefault(peer, [])
        if any(h.seq == msg.seq for h in held):
            return False  # a resend of one already held
        if len(held) < MAX_HELD_PAUSED:
            held.append(msg)  # taken once the pause ends (``_release_paused``)
            out.append(Metric("update_held", 1.0, {"src": peer, "reason": "paused"}))
            return False
        self.dropped += 1
        out.append(Metric("update_dropped", 1.0, {"src": peer, "reason": "paused"}))
        return False

    def _release_paused(self, was_paused: bool) -> None:
        """The pause just ended: held forwards may be taken now (``_release_held``)."""
        if was_paused and self._held and not self.paused:
            self._epoch_changed = True

    def handle(self, event: Event, now: float) -> list[Effect]:
        out = BufferedAggregator.handle(self, event, now)
        outbox = self._outbox
        if outbox.metrics_due(now):
            gauges = {"forwards_kept": float(len(self._forwards))}
            if outbox.wants("dispatch_paused"):
                gauges = {"dispatch_paused": float(self.paused), **gauges}
            out.extend(outbox.metrics(now, **gauges))
        return out

    def omit_metrics(self, names: Iterable[str]) -> None:
        super().omit_metrics(names)
        self._outbox.omit_gauges(self._omit)

    def next_deadline(self) -> float | None:
        own, outbox = BufferedAggregator.next_deadline(self), self._outbox.next_deadline()
        if own is None or (outbox is not None and outbox < own):
            own = outbox
        if self._hello_at is not None:
            again = self._hello_at + self._hello_wait
            if own is None or again < own:
                return again
        return own

    def _on_deadline(self, now: float, out: list[Effect]) -> None:
        super()._on_deadline(now, out)
        out.extend(self._outbox.on_deadline(now))
        at, timeout = self._hello_at, self.hello_timeout_s
        if at is not None and timeout is not None and now >= at + self._hello_wait:
            # No model since the Hello: it, or the model, may be lost. Ask again.
            self._hello_at = now
            self._hello_wait = min(2.0 * self._hello_wait, HELLO_RETRY_MAX_FACTOR * timeout)
            out.append(Send(self.parent, Hello(self._id, "region")))
            out.append(Metric("hello_resent", 1.0, {"parent": self.parent}))

    def _say_hello(self, out: list[Effect]) -> None:
        out.append(Send(self.parent, Hello(self._id, "region")))
        if self.hello_timeout_s is not None:
            self._hello_at, self._hello_wait = self._now, self.hello_timeout_s

    def _broadcast(self, out: list[Effect]) -> None:
        # No region child up (a region of sites): nothing to send, no call made.
        if self._regions_up and (self._global is None or self._root_config is not None):
            BufferedAggregator._broadcast(self, out)  # not _awaiting_config: as for tasks

    @property
    def _awaiting_config(self) -> bool:
        return self._global is not None and self._root_config is None

    def _fill(self, now: float, out: list[Effect]) -> None:
        if self._global is not None and self._root_config is None:  # _awaiting_config
            # Restored from a checkpoint that kept no root config: a task would carry this
            # region's own (which the root did not sign; its sites refuse it).
            if not self._config_wait_logged:
                self._config_wait_logged = True
                out.append(
                    Log(
                        "warning",
                        "no tasks until the parent sends the model again with the root's "
                        "signed training config (the restored checkpoint kept none)",
                        {"region": self._id, "version": self._global[0]},
                    )
                )
            return
        d = self._dispatcher
        if d.in_flight >= d.concurrency or d.idle_count == 0 or self._holding:
            return  # nothing to start (AggregatorBase._fill's own checks, before paused's)
        if not self.paused:  # backpressure: no new tasks while the outbox is full
            BufferedAggregator._fill(self, now, out)

    def current_model(self) -> tuple[int, Weights] | None:
        """The newest global model relayed through this region (not a model of its own)."""
        return self._global

    def _model(self) -> tuple[int, Weights] | None:
        return self._global

    def _model_proof(self) -> dict[str, Any]:
        """The root's signature of the global model, relayed with it unchanged (and kept
        in the checkpoint with the model, so a restarted region can still prove it)."""
        signer, parent, sig = self._proof
        if not sig:
            return {}
        return {"signer": signer, "parent": parent, "sig": sig, "settings": self._settings}

    def _task_config(self) -> Mapping[str, Any]:
        """The root's config sent with the global model (this region's own only while it
        holds no model: no task goes out then, nor while ``_awaiting_config``)."""
        return self._train_config if self._root_config is None else self._root_config

    # -------------------------------------------------------------- parent
    def _on_other_link(self, peer: str, up: bool, now: float, out: list[Effect]) -> None:
        if peer != self.parent:
            return
        if not up:
            self._outbox.link_down()  # while the parent is away forwards stay in the outbox
            self._hello_deferred = False
            self._hello_at = None
            return
        if self._holding:
            # The parent counts this region up (its own start quorum, and it sends the
            # model) once the region can put its sites to work: after its start wait.
            self._hello_deferred = True
        else:
            self._say_hello(out)
        # Acked by a parent region but not settled (its notice lost): a resend gets it,
        # paced by the outbox's window like the pending ones.
        waiting = {u.seq for u in self._outbox.pending()}
        kept = [u for u in self._forwards.updates() if u.seq not in waiting]
        out.extend(self._outbox.resend(self.parent, now=now, kept=kept))

    def _relay_refusal(self, msg: TrainRefused, out: list[Effect]) -> None:
        """A site's refusal goes up unchanged (cleaned), so the root sees every site's;
        best effort, not durable (a refusal lost with the link is not resent)."""
        out.append(Send(self.parent, msg))

    def _on_quorum_end(self, out: list[Effect]) -> None:
        if self._hello_deferred:
            self._hello_deferred = False
            self._say_hello(out)

    def _on_other(self, peer: str, msg: Message, now: float, out: list[Effect]) -> None:
        if peer != self.parent:
            super()._on_other(peer, msg, now, out)
        elif isinstance(msg, ModelBroadcast):
            self._hello_at = None  # the parent knows this region: its Hello got through
            self._on_model(msg, now, out)
        elif isinstance(msg, Ack):
            if msg.src == self._id and is_int(msg.seq):
                was_paused = self.paused
                out.extend(self._outbox.ack(int(msg.seq), now=now))
                if self.parent_is_root:  # the root's record is final: settled
                    self._on_settled(Incorporated(msg.src, msg.seq), now, out)
                self._release_paused(was_paused)
            else:
                out.extend(unexpected(peer, msg, "ack_for_other", self._ignored, now))
        elif isinstance(msg, Incorporated | Overlap):
            if msg.src == self._id and is_int(msg.seq):
                was_paused = self.paused
                self._on_settled(msg, now, out)
                self._release_paused(was_paused)
            else:
                out.extend(unexpected(peer, msg, "notice_for_other", self._ignored, now))
        elif not isinstance(msg, Heartbeat):
            out.extend(unexpected(peer, msg, "unexpected_type", self._ignored, now))

    def _on_settled(self, msg: Incorporated | Overlap, now: float, out: list[Effect]) -> None:
        """The parent settled forward ``msg.seq`` (``Incorporated``) or refused it for
        pairs it already took (``Overlap``): tell the children whose updates are settled."""
        seq = int(msg.seq)
        if isinstance(msg, Incorporated):
            out.extend(self._outbox.ack(seq, now=now))  # settled implies recorded
            settled = self._forwards.settle(seq)
            if settled is None:
                return
            out.append(Persist(FORWARDS_KEY, {"op": "settle", "seq": seq}, append=True))
        else:
            # Not logged: a restart restores the forward as it was, and the parent
            # refuses it again (or dropping it wrote an ack record).
            result = self._rebuild(seq, msg.pairs)
            if result is None:
                return
            new, settled, lost = result
            out.append(Metric("forward_rebuilt", 1.0, {"region": self._id}))
            if lost:
                out.append(Metric("pairs_lost", float(len(lost)), {"region": self._id}))
                why = "a nested aggregate" if self.keep_parts else "no parts kept (keep_parts)"
                out.append(
                    Log(
                        "error", f"site updates lost: {why}", {"pairs": [list(p) for p in lost[:8]]}
                    )
                )
            if new is None:
                out.extend(self._outbox.ack(seq, now=now))  # nothing left to forward
            else:
                out.extend(self._outbox.replace(new, now=now))
        out.extend(Send(src, Incorporated(src, s)) for src, s in settled)

    def _rebuild(
        self, seq: int, taken: Iterable[tuple[str, int]]
    ) -> tuple[Update | None, list[tuple[str, int]], list[tuple[str, int]]] | None:
        """Forward ``seq`` without the contributions that carry ``taken`` pairs."""
        return self._forwards.rebuild(seq, taken, self._aggregate_parts)

    def _aggregate_parts(self, parts: list[Contribution]) -> tuple[Weights, int, int] | None:
        """The aggregate of kept contributions (already clipped and discounted once)."""
        assert self._global is not None
        buf = UpdateBuffer(self._global[1], **{**self._buffer_args, "clip_norm": None})
        for c in parts:
            if c.delta is not None:
                buf.add(c.delta, c.s, c.n_examples, c.count)
        if not len(buf):
            return None
        agg = buf.flush()
        return (agg.delta, agg.n_examples, agg.count) if agg.finite else None

    # ------------------------------------------------------------ settling
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
        if self._children.get(peer) == "site":  # _parts_pairs(peer, msg), inline
            pairs: tuple[tuple[str, int], ...] = ((msg.src, msg.seq),)
        else:
            pairs = self._pairs_of(peer, msg)
        self._forwards.note(msg.src, msg.seq, pairs, msg.n_examples, msg.count)
        BufferedAggregator._record_applied(self, peer, msg, version, tau, s, out, **extra)

    def _parts_pairs(self, peer: str, msg: Update) -> tuple[tuple[str, int], ...]:
        if self._children.get(peer) == "site":
            return ((msg.src, msg.seq),)
        return self._pairs_of(peer, msg)

    def _after_ack(self, peer: str, msg: Update, outcome: Outcome, out: list[Effect]) -> None:
        # Applied: settled once the forward carrying it is; otherwise settled now.
        if outcome is not Outcome.APPLIED:
            out.append(Send(peer, Incorporated(msg.src, msg.seq)))

    def _after_duplicate(self, peer: str, msg: Update, out: list[Effect]) -> None:
        if not self._forwards.unsettled(msg.src, msg.seq):
            out.append(Send(peer, Incorporated(msg.src, msg.seq)))

    def _model_problem(self, msg: ModelBroadcast) -> str | None:
        if not is_int(msg.version) or msg.version < 0:
            return "bad_version"
        config = msg.config
        if type(config) is not dict and not isinstance(config, Mapping):  # dict: no ABC
            return "bad_config"
        if self._global is not None:
            return check_compatible(self._global[1], msg.weights)
        if not isinstance(msg.weights, Mapping) or not msg.weights:
            return "no_tensors"
        for arr in msg.weights.values():
            if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
                return "dtype"
        return None

    def _on_model(self, msg: ModelBroadcast, now: float, out: list[Effect]) -> None:
        problem = self._model_problem(msg)
        if problem is not None:
            out.extend(unexpected(self.parent, msg, f"model_{problem}", self._ignored, now))
            return
        if self._global is not None and msg.version <= self._global[0]:
            if msg.version == self._global[0] and _same_weights(self._global[1], msg.weights):
                self._on_same_model(msg, out)
            return  # an old broadcast, or the same model again (e.g. after a reconnect)
        first = self._global is None
        self._global = (int(msg.version), msg.weights)
        self._proof = (msg.signer, msg.parent, msg.sig)
        self._take_root_config(msg, out)
        out.append(Metric("model_version", float(msg.version)))  # the newest global it holds
        if first:
            self._make_buffer(msg.weights)
            self.state = RegionState.ACTIVE
            # "applied" records replay against a model: checkpoint the first one, so a
            # restart never meets a record it cannot replay.
            out.append(Persist(CHECKPOINT_KEY, self.snapshot()))
        self._broadcast(out)
        if self._deferred:
            held, self._deferred = self._deferred, []
            self._deferred_keys = set()
            self._deferred_per = {}
            self.deferred_bytes = 0
            for peer, update in held:
                self._on_update(peer, update, now, out)

    def _on_same_model(self, msg: ModelBroadcast, out: list[Effect]) -> None:
        """The model this region holds, broadcast again: by a root restarted with another
        ``[training]`` (same version, new config and proof), or to a region restored from
        a checkpoint that kept no config. Its proof and config replace the ones held, and
        region children get them too; the same proof and config again change nothing."""
        proof = (msg.signer, msg.parent, msg.sig)
        if proof == self._proof and dict(msg.config) == self._root_config:
            return
        self._proof = proof
        self._take_root_config(msg, out)
        self._broadcast(out)

    def _take_root_config(self, msg: ModelBroadcast, out: list[Effect]) -> None:
        """Keep the root's training config (and the digest it signed) for the tasks; say
        once per config when this region's own ``train_config`` differs from it."""
        config = dict(msg.config)
        changed = config != self._root_config
        self._root_config, self._settings = config, bytes(msg.settings)
        self._config_wait_logged = False
        if changed and self._train_config and config != self._train_config:
            out.append(
                Log(
                    "info",
                    "this region's training settings differ from the root's: its sites "
                    "train with the root's (signed with the model); its own are unused",
                    {"region": self._id, "root": _capped(config)},
                )
            )

    def _on_peer_down(self, peer: str, now: float, out: list[Effect]) -> None:
        super()._on_peer_down(peer, now, out)
        if peer in self._children and self._deferred:
            # Never acked, so the child resends them if it comes back; a child that does
            # not (revoked, gone) leaves nothing behind to be applied in its name.
            kept = [(p, u) for p, u in self._deferred if p != peer]
            if len(kept) != len(self._deferred):
                self._deferred = kept
                self._deferred_keys = {(p, u.seq) for p, u in kept}
                self._deferred_per.pop(peer, None)
                self.deferred_bytes = sum(_delta_bytes(u) for _, u in kept)

    def _defer(self, peer: str, msg: Update, out: list[Effect]) -> None:
        """Hold ``msg`` unacked until a (newer) model arrives: none yet, or it is based on
        a newer one than this region holds (it lags its parent, e.g. after a failover)."""
        key = (peer, msg.seq)
        if key in self._deferred_keys:
            return  # a resend of one already held
        size = _delta_bytes(msg)
        mine = self._deferred_per.get(peer, 0)
        if (
            len(self._deferred) >= self.max_deferred
            or self.deferred_bytes + size > self.max_deferred_bytes
            or mine >= MAX_DEFERRED_PER_CHILD
        ):
            reason = "no_model" if self._global is None else "model_behind"
            self._reject_unacked(peer, msg, reason, out)
            return
        self._deferred.append((peer, msg))
        self._deferred_keys.add(key)
        self._deferred_per[peer] = mine + 1
        self.deferred_bytes += size
        out.append(Metric("update_deferred", 1.0, {"src": msg.src}))

    # ------------------------------------------------------------- forward
    def _flush_full(self, out: list[Effect]) -> None:
        assert self._global is not None
        version = self._global[0] if self._replay_version is None else self._replay_version
        parts = self._forwards.flushed(self._buffer.entries(), keep_deltas=self.keep_parts)
        agg = self._buffer.flush()
        self._end_epoch()
        finite = agg.finite  # a pass over the aggregate: once
        left = "forwarded" if finite else "nonfinite"
        children = self._count_flushed(parts, left)
        if not finite:
            out.append(Persist(FORWARDS_KEY, {"op": "flushed", left: children}, append=True))
            out.append(Metric("aggregate_nonfinite", 1.0, {"region": self._id}))
            out.append(Log("error", "aggregate not finite: not forwarded", {"region": self._id}))
            settled = self._forwards.settled_now(parts)  # never forwarded: settled for good
            out.extend(Send(src, Incorporated(src, s)) for src, s in settled)
            return
        update = Update(
            src=self._id,
            seq=self._outbox.next_seq(),
            base_version=version,
            delta=agg.delta,
            n_examples=agg.n_examples,
            count=agg.count,
            pairs=tuple(p for c in parts for p in c.pairs),
        )
        self._forwards.add(update, parts)
        self.forwarded += 1
        # Evidence for the checker (records after the checkpoint); a rebuild after an
        # Overlap reuses the seq and takes nothing from the buffer: never counted again.
        flushed = {"op": "flushed", "seq": update.seq, left: children}
        out.append(Persist(FORWARDS_KEY, flushed, append=True))
        out.extend(self._outbox.push(self.parent, update, now=self._now))
        out.append(Metric("region_forward", float(agg.count), {"region": self._id}))
        if self.checkpoint_every and update.seq % self.checkpoint_every == 0:
            out.append(Persist(CHECKPOINT_KEY, self.snapshot()))
            out.append(Log("debug", "region checkpoint", {"seq": update.seq}))

    def _cohort_step(
        self,
        delta: Weights,
        n_examples: int,
        pairs: list[tuple[str, int]],
        s: float,
        version: int,
        out: list[Effect],
    ) -> None:
        """A secure cohort's Δ̄ (``AggregatorBase._apply_cohort``) leaves as ONE forward,
        exactly like a flush: count = survivors, n_examples = their sum, pairs = their
        (site, seq). Its parts carry no deltas (none is known here), so an ``Overlap`` for
        it cannot be rebuilt: what it held besides is counted lost."""
        parts = [Contribution(src, seq, ((src, seq),), None, s, 0, 1) for src, seq in pairs]
        children = self._count_flushed(parts, "forwarded")
        update = Update(
            src=self._id,
            seq=self._outbox.next_seq(),
            base_version=version,
            delta=delta,
            n_examples=n_examples,
            count=len(pairs),
            pairs=tuple(pairs),
        )
        self._forwards.add(update, parts)
        self.forwarded += 1
        flushed = {"op": "flushed", "seq": update.seq, "forwarded": children}
        out.append(Persist(FORWARDS_KEY, flushed, append=True))
        out.extend(self._outbox.push(self.parent, update, now=self._now))
        out.append(Metric("region_forward", float(len(pairs)), {"region": self._id}))
        if self.checkpoint_every and update.seq % self.checkpoint_every == 0:
            out.append(Persist(CHECKPOINT_KEY, self.snapshot()))

    def _count_flushed(self, parts: Iterable[Contribution], left: str) -> dict[str, int]:
        """Count each child's updates that just left the buffer as ``left``."""
        children: dict[str, int] = {}
        for c in parts:
            if c.src:  # a restored buffer from an older checkpoint: entries unnamed
                children[c.src] = children.get(c.src, 0) + 1
        flushed = self._flushed
        for src, n in children.items():
            old = flushed.get(src)
            counts = {} if old is None else old.copy()  # copy on write (see __init__)
            counts[left] = counts.get(left, 0) + n
            flushed[src] = counts
        return children

    def conservation(self) -> dict[str, dict[str, int]]:
        """Per child: its updates applied here, and where they are now (forwarded, dropped
        as a non-finite aggregate, still buffered): the first is the sum of the others."""
        buffered: dict[str, int] = {}
        for c in self._forwards.buffered(len(self._buffer)):
            buffered[c.src] = buffered.get(c.src, 0) + 1
        out = {}
        for src in sorted(set(self._outcomes) | set(self._flushed) | set(buffered)):
            flushed = self._flushed.get(src, {})
            out[src] = {
                "applied": self._outcomes.get(src, {}).get(Outcome.APPLIED.value, 0),
                "forwarded": flushed.get("forwarded", 0),
                "nonfinite": flushed.get("nonfinite", 0),
                "buffered": buffered.get(src, 0),
            }
        return out

    # ---------------------------------------------------------- durability
    def snapshot(self) -> dict[str, Any]:
        """Newest global, buffer, outbox and ledger; pair with later "applied" records."""
        return {
            **self._base_snapshot(),
            "kind": "regional",
            "global": self._global,
            "proof": self._proof,
            "settings": (self._root_config, self._settings),
            "buffer": self._buffer.snapshot() if self._global is not None else None,
            "outbox": self._outbox.snapshot(),
            "forwards": self._forwards.snapshot(),
            "flushed": dict(self._flushed),  # its inner dicts are never changed
            "buffer_size": self.buffer_size,  # a fuller buffer is flushed: the checker's bound
        }

    def restore(
        self, checkpoint: Mapping[str, Any] | None, records: RecordSource = NO_RECORDS
    ) -> None:
        """Load ``snapshot()`` output (None: this fresh node's own), then replay the
        "applied", "region/pending" and "region/forwards" records written after it
        (``algorithms.protocol.Restorable``; forwards rebuilt by the replay are resent; the
        parent dedups)."""
        state = self.snapshot() if checkpoint is None else checkpoint
        if state.get("kind") != "regional":
            raise ValueError(f"not a regional snapshot: {state.get('kind')!r}")
        self._base_restore(state)
        glob = state["global"]
        self._global = None if glob is None else (int(glob[0]), dict(glob[1]))
        signer, parent, sig = state.get("proof", ("", 0, b""))  # older checkpoints: none
        self._proof = (str(signer), int(parent), bytes(sig))
        config, settings = state.get("settings") or (None, b"")  # older checkpoints: none
        self._root_config = None if config is None else dict(config)
        self._settings = bytes(settings)
        if self._global is not None:
            self.state = RegionState.ACTIVE
            self._make_buffer(self._global[1])
            self._buffer.restore(state["buffer"])
        self._outbox.restore(state["outbox"])
        self._forwards.restore(state.get("forwards"))  # older checkpoints: none
        self._flushed = {  # older checkpoints: none; the replay below counts its flushes
            str(src): {str(k): int(v) for k, v in c.items()}
            for src, c in (state.get("flushed") or {}).items()
        }
        if self._global is not None:
            self._flush_restored()  # needs the outbox and forwards restored above
        # Forwards rebuilt from "applied" first (same seqs as before), then the acks, then
        # the parent's settlements.
        self._replay_records(records.records(APPLIED_KEY))
        self._outbox.replay(records.records(PENDING_KEY))
        self._restore_secagg(state, records)
        for rec in records.records(FORWARDS_KEY):
            if rec["op"] == "settle":
                self._forwards.settle(int(rec["seq"]))
        if self.parent_is_root:  # the root's ack settled them (its record is in the log)
            waiting = {u.seq for u in self._outbox.pending()}
            for update in self._forwards.updates():
                if update.seq not in waiting:
                    self._forwards.settle(update.seq)

    def _replay(self, record: Mapping[str, Any]) -> None:
        if self._global is None:
            raise ValueError("an applied record before any model cannot be replayed")
        self._replay_version = int(record["version"])
        src, seq = str(record["src"]), int(record["seq"])
        if self._children.get(src) == "site":
            pairs: tuple[tuple[str, int], ...] = ((src, seq),)
        else:
            pairs = tuple((str(p[0]), int(p[1])) for p in record.get("pairs", ()))
        self._forwards.note(src, seq, pairs, int(record["n_examples"]), int(record["count"]))
        try:
            super()._replay(record)
        finally:
            self._replay_version = None


def _capped(config: Mapping[str, Any]) -> dict[str, Any]:
    """A log-sized view of a config from the parent: 16 keys, 32 characters each."""
    out: dict[str, Any] = {}
    for key, value in sorted(config.items(), key=lambda kv: str(kv[0]))[:16]:
        out[str(key)[:32]] = value[:32] if isinstance(value, str) else value
    return out


def _same_weights(held: Weights, other: Mapping[str, Any]) -> bool:
    """Whether ``other`` is the model ``held`` (same dtypes and values; ``_model_problem``
    checked the names and shapes)."""
    return all(
        isinstance(arr := other.get(name), np.ndarray)
        and arr.dtype == ref.dtype
        and np.array_equal(arr, ref, equal_nan=True)
        for name, ref in held.items()
    )


def _delta_bytes(msg: Update) -> int:
    """Bytes the update's delta holds (what holding it costs)."""
    delta = msg.delta
    if not isinstance(delta, Mapping):
        return 0
    return sum(int(getattr(arr, "nbytes", 0)) for arr in delta.values())
