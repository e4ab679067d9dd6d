"""Root aggregator for fully asynchronous aggregation, one update at a time.

FedAsync, Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", arXiv 1903.03934,
Alg. 1 (updater thread): on an update trained from model version τ_b at version t,

    α_t = α · s(t − τ_b),    x_new = x_{τ_b} + Δ,    x ← (1 − α_t)·x + α_t·x_new,   t += 1.

x_{τ_b} comes from a bounded history of recent versions (``history``). When the base has
fallen out of it the node approximates x_{τ_b} by the current x, i.e. x ← x + α_t·Δ, and
counts it (``history_misses``, metric "fedasync_history_miss"). Deltas older than
``max_staleness`` are dropped (recorded and acked). Same dispatcher, dedup, rejections,
claim bounds, intake quota (an epoch is ``concurrency`` applied updates) and Persist-then-Ack
as ``FedBuffAggregator``; region children get every new version. Deltas are norm-clipped
(``clip_norm="auto"`` by default, see ``robust.NormClip``) and a mix whose result is not
finite is dropped, keeping the previous model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.aggregator_base import (
    APPLIED_KEY,
    CHECKPOINT_KEY,
    AggregatorBase,
    OwnModel,
    checkpoint_interval,
)
from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.protocol import (
    NO_RECORDS,
    Effect,
    Log,
    Metric,
    Persist,
    RecordSource,
    Weights,
)
from fedloom.algorithms.robust import NormClip
from fedloom.algorithms.staleness import StalenessFn, polynomial
from fedloom.algorithms.weights_math import is_finite, l2_norm
from fedloom.transport.wire import Update

__all__ = ["FedAsyncAggregator"]

FEDASYNC_STALENESS: StalenessFn = polynomial(0.5)


class FedAsyncAggregator(OwnModel, AggregatorBase):
    """Sans-I/O FedAsync root: ``handle(event, now) -> effects``; holds the global model."""

    def __init__(
        self,
        node_id: str,
        children: Mapping[str, str],
        weights: Weights,
        *,
        alpha: float = 0.6,
        concurrency: int,
        staleness: StalenessFn = FEDASYNC_STALENESS,
        max_staleness: int | None = None,
        history: int = 16,
        train_config: Mapping[str, Any] | None = None,
        task_timeout_s: float | None = None,
        rng: np.random.Generator | int = 0,
        clip_norm: object = "auto",
        checkpoint_every: int = 100,
        log_deltas: bool = True,
        version: int = 0,
        claim_bounds: ClaimBounds | None = None,
    ) -> None:
        super().__init__(
            node_id,
            children,
            concurrency=concurrency,
            task_timeout_s=task_timeout_s,
            rng=rng,
            train_config=train_config,
            log_deltas=log_deltas,
            claim_bounds=claim_bounds,
        )
        self._init_model(weights, version)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")
        self._clip = NormClip(clip_norm, self._weights)
        self.alpha = float(alpha)
        self.max_staleness = max_staleness
        self._applied_in_epoch = 0
        self.checkpoint_every = checkpoint_interval(checkpoint_every)
        self._staleness = staleness
        self._history_len = history
        # version -> weights; the current model is always the newest entry.
        self._history: OrderedDict[int, Weights] = OrderedDict([(version, self._weights)])
        self.history_misses = 0

    def _accept(
        self,
        peer: str,
        msg: Update,
        reason: str | None,
        version: int,
        now: float,
        out: list[Effect],
    ) -> None:
        tau = self._admit(peer, msg, reason, version, self.max_staleness, out)
        if tau is None:
            return
        alpha_t = self.alpha * self._staleness(tau)
        # The record's weight ``s`` is the mixing weight α_t (what a replay needs).
        self._record_applied(peer, msg, version, tau, alpha_t, out)
        mixed = self._mix(msg.delta, msg.base_version, alpha_t, self._norm, msg.src)
        if mixed is None:
            out.append(Metric("aggregate_nonfinite", 1.0))
            out.append(Log("error", "mix not finite: step dropped, model kept", {"src": msg.src}))
            return
        if not mixed:
            out.append(Metric("fedasync_history_miss", 1.0, {"src": msg.src}))
        out.append(Metric("model_version", float(self._version)))
        self._broadcast(out)
        if self.checkpoint_every and self._version % self.checkpoint_every == 0:
            out.append(Persist(CHECKPOINT_KEY, self.snapshot()))

    @property
    def clip_norm(self) -> float | None:
        """The clip bound the next delta will meet (None: no clip)."""
        return self._clip.bound()

    def _epoch_size(self) -> int:
        return max(1, self._dispatcher.concurrency)

    def _mix(
        self, delta: Weights, base_version: int, alpha_t: float, norm: float, src: str
    ) -> bool | None:
        """x ← (1−α_t)x + α_t(x_base + Δ); return False when x_base was not in the history,
        None when the result was not finite (then nothing changes). ``src`` sent Δ (the
        clip it meets is learnt from the others' norms)."""
        delta, _ = self._clip.apply(delta, norm, src)
        self._applied_in_epoch += 1
        if self._applied_in_epoch >= self._epoch_size():
            self._applied_in_epoch = 0
            self._end_epoch()
        base = self._history.get(base_version)
        x = self._weights
        new: Weights
        with np.errstate(over="ignore", invalid="ignore"):
            if base is None:
                new = {
                    k: (v + alpha_t * delta[k]).astype(v.dtype, copy=False) for k, v in x.items()
                }
            else:
                new = {
                    k: ((1.0 - alpha_t) * v + alpha_t * (base[k] + delta[k])).astype(
                        v.dtype, copy=False
                    )
                    for k, v in x.items()
                }
        if not is_finite(new):
            return None
        if base is None:
            self.history_misses += 1
        self._version += 1
        self._weights = new
        self._history[self._version] = new
        while len(self._history) > self._history_len:
            self._history.popitem(last=False)
        return base is not None

    def _replay(self, record: Mapping[str, Any]) -> None:
        delta = record["delta"]
        self._mix(
            delta,
            int(record["base_version"]),
            float(record["s"]),
            l2_norm(delta),
            str(record["src"]),
        )

    # ---------------------------------------------------------- durability
    def snapshot(self) -> dict[str, Any]:
        """Model, version history and ledger (arrays are immutable: shared, not copied)."""
        return {
            **self._base_snapshot(),
            "kind": "fedasync",
            "version": self._version,
            "history": list(self._history.items()),
            "clip": self._clip.snapshot(),
            "epoch_applied": self._applied_in_epoch,
        }

    def restore(
        self, checkpoint: Mapping[str, Any] | None, records: RecordSource = NO_RECORDS
    ) -> None:
        """Load ``snapshot()`` output (None: this fresh node's own), then replay the
        "applied" records written after it (``algorithms.protocol.Restorable``)."""
        state = self.snapshot() if checkpoint is None else checkpoint
        if state.get("kind") != "fedasync":
            raise ValueError(f"not a FedAsync snapshot: {state.get('kind')!r}")
        self._base_restore(state)
        self._history = OrderedDict((int(v), dict(w)) for v, w in state["history"])
        self._version = int(state["version"])
        self._weights = self._history[self._version]
        self._clip.restore(state.get("clip"))  # older checkpoints: no clip history
        self._applied_in_epoch = int(state.get("epoch_applied", 0))
        self._replay_records(records.records(APPLIED_KEY))
