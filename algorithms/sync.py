"""Root aggregator for synchronous rounds with deadlines.

FedAvg (McMahan et al., AISTATS 2017, Alg. 1) with FedProx clients (Li et al., MLSys 2020:
the proximal μ travels to the sites in ``train_config["mu"]``), plus FedScale-style
over-selection (Lai et al., ICML 2022): a round selects ⌈over_selection·K⌉ idle sites at
random and closes as soon as the fastest K have answered,

    Δ̄ = Σ_i n_i Δ_i / Σ_i n_i  (``weighting="examples"``),   w ← server_opt.step(w, Δ̄).

At ``round_timeout_s`` a round with ≥ ``min_cohort`` answers is aggregated anyway; one with
fewer is abandoned (its answers discarded, ``rounds_abandoned`` += 1) and a new round starts.
An update that answers no task of the open round (a closed or abandoned round, or from an
unselected site) is "late": recorded and acked, never applied (metric "update_late").
Each round is an intake epoch (``AggregatorBase``): beyond its own round task a site gets
one decided update per round, so late floods cost no more than one log write per round.
Claims are bounded and deltas clipped as for FedBuff (``intake``, ``robust.NormClip``), and
a round whose aggregate or new model is not finite is closed without a step.

States (``RoundState``): WAITING — fewer than ``min_available`` sites are up and idle; a
round starts as soon as enough are (checked on every event, including Hello and deadlines);
COLLECTING — a round is open.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from algorithms.aggregator_base import (
    CHECKPOINT_KEY,
    AggregatorBase,
    Outcome,
    OwnModel,
    checkpoint_interval,
)
from algorithms.intake import ClaimBounds
from algorithms.protocol import Effect, Log, Metric, Persist, Send, Weights
from algorithms.server_opt import ServerOptimizer, ServerSGD
from algorithms.update_buffer import UpdateBuffer
from algorithms.validation import is_int
from transport.wire import TrainRequest, Update

__all__ = ["RoundState", "SyncAggregator"]


class RoundState(enum.Enum):
    WAITING = "waiting"
    COLLECTING = "collecting"


class SyncAggregator(OwnModel, AggregatorBase):
    """Sans-I/O FedAvg/FedProx root: ``handle(event, now) -> effects``; holds the model."""

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
        log_deltas: bool = False,  # an open round does not survive a restart: no replay
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
        self._buffer = UpdateBuffer(
            self._weights,
            weighting=weighting,
            robust=robust,
            trim_fraction=trim_fraction,
            clip_norm=clip_norm,
        )
        self._quota_solicited = False  # one task per site and round
        self.state = RoundState.WAITING
        self.round = 0
        self._round_tasks: set[int] = set()
        self._round_members: list[tuple[str, int]] = []  # (src, seq) applied this round
        self._deadline: float | None = None
        self.rounds_closed = 0
        self.rounds_abandoned = 0

    def next_deadline(self) -> float | None:
        return self._deadline

    # -------------------------------------------------------------- rounds
    def _fill(self, now: float, out: list[Effect]) -> None:
        """Start a round when none is open and enough sites are up and idle."""
        if self.state is RoundState.COLLECTING:
            return
        d = self._dispatcher
        if d.idle_count < self.min_available or d.in_flight > 0:
            return
        self.round += 1
        self.state = RoundState.COLLECTING
        self._deadline = None if self.round_timeout_s is None else now + self.round_timeout_s
        started = d.start(now, limit=self.selected_per_round)
        self._round_tasks = {task for task, _ in started}
        for task, site in started:
            out.append(
                Send(site, TrainRequest(task, self._version, self._weights, self._train_config))
            )
        out.append(Metric("round_started", float(self.round), {"selected": str(len(started))}))

    def _on_task_cancelled(self, task: int) -> None:
        self._round_tasks.discard(task)

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
        in_round = (
            self.state is RoundState.COLLECTING
            and is_int(msg.task)
            and msg.task in self._round_tasks
            and self._dispatcher.task_site(msg.task) == peer
        )
        if in_round:
            self._round_tasks.discard(msg.task)
            self._complete_task(peer, msg)
        if reason is not None:
            self._reject(peer, msg, reason, version, out)
            return
        if not in_round or msg.base_version != version:
            self.late += 1
            out.append(Metric("update_late", 1.0, {"src": msg.src}))
            self._record(peer, msg, Outcome.LATE, version, out, tau=version - msg.base_version)
            return
        if self._buffer.add(msg.delta, 1.0, msg.n_examples, msg.count, self._norm, msg.src):
            out.append(Metric("update_clipped", 1.0, {"src": msg.src}))
        self._round_members.append((msg.src, msg.seq))
        self._record_applied(peer, msg, version, 0, 1.0, out, round=self.round)
        out.append(Metric("buffer_fill", float(len(self._buffer))))
        if len(self._buffer) >= self.clients_per_round:
            self._close_round("quorum", out)

    def _on_deadline(self, now: float, out: list[Effect]) -> None:
        if self._deadline is None or now < self._deadline:
            return
        if len(self._buffer) >= self.min_cohort:
            self._close_round("deadline", out)
            return
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
        agg = self._buffer.flush()
        if not self._apply_step(self._opt, agg.delta, out):
            self.rounds_abandoned += 1
            self._end_round()
            return
        self._version += 1
        self.rounds_closed += 1
        out.append(Metric("round_closed", float(agg.n_updates), {"reason": why}))
        out.append(Metric("model_version", float(self._version)))
        self._end_round()
        self._broadcast(out)
        if self.checkpoint_every and self._version % self.checkpoint_every == 0:
            out.append(Persist(CHECKPOINT_KEY, self.snapshot()))

    def _end_round(self) -> None:
        # Stragglers of this round are released: their answers will be late.
        for task in self._dispatcher.tasks():
            self._dispatcher.cancel(task)
        self._round_tasks = set()
        self._round_members = []
        self._deadline = None
        self.state = RoundState.WAITING
        self._end_epoch()

    # ---------------------------------------------------------- durability
    def snapshot(self) -> dict[str, Any]:
        """Model, optimiser, ledger and round counter at a round boundary.

        Answers buffered in an open round are not part of it: after ``restore`` a new round
        starts, and updates acked in the interrupted round count as discarded. Rounds closed
        after the checkpoint are not replayed either, hence ``checkpoint_every=1`` by default
        (one checkpoint per round is cheap next to a round).
        """
        return {
            **self._base_snapshot(),
            "kind": "sync",
            "version": self._version,
            "round": self.round,
            "weights": self._weights,
            "opt": self._opt.snapshot(),
        }

    def restore(self, state: Mapping[str, Any], records: Iterable[Mapping[str, Any]] = ()) -> None:
        """Load ``snapshot()`` output; records after it are only entered in the ledger."""
        if state.get("kind") != "sync":
            raise ValueError(f"not a sync snapshot: {state.get('kind')!r}")
        self._base_restore(state)
        self._version = int(state["version"])
        self.round = int(state["round"])
        self._weights = dict(state["weights"])
        self._opt.restore(state["opt"])
        self._replay_records(records)
        self._end_epoch()  # a new round starts: so does every child's quota

    def _replay(self, record: Mapping[str, Any]) -> None:
        """An open round does not survive a restart (see ``snapshot``): nothing to redo."""
