"""Root aggregator for buffered asynchronous aggregation.

FedBuff, Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022, Alg. 1 (server side). Sites train whenever they are given a task (the
dispatcher keeps ``concurrency`` tasks in flight, independent of K); each arriving delta is
discounted by s(τ), τ = version − base_version, and buffered; after ``buffer_size`` (K)
updates

    Δ̄ = Σ s(τ_i)·w_i·Δ_i / Σ w_i,      weights ← server_opt.step(weights, Δ̄),   version += 1

(an average normalised by the raw weights, so staleness still discounts; see
``update_buffer``). Children with role "region" (``RegionalAggregator``) get a
``ModelBroadcast`` for every new version and on their ``Hello``; their updates count with
weight ``count`` (uniform weighting) or ``n_examples``, both bounded (``intake.ClaimBounds``).
Deltas are norm-clipped (``clip_norm="auto"`` by default) and a step whose aggregate or
result is not finite is dropped: the model is never published with a NaN or infinity.

There is one state (always accepting), so no state enum: the buffer fill is the state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.aggregator_base import (
    APPLIED_KEY,
    CHECKPOINT_KEY,
    OwnModel,
    checkpoint_interval,
)
from fedloom.algorithms.buffered import FEDBUFF_STALENESS, BufferedAggregator
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
    Metric,
    Persist,
    ProtocolMisuseError,
    RecordSource,
    Weights,
)
from fedloom.algorithms.server_opt import ServerOptimizer, ServerSGD
from fedloom.algorithms.staleness import StalenessFn

__all__ = ["FedBuffAggregator"]


class FedBuffAggregator(OwnModel, BufferedAggregator):
    """Sans-I/O FedBuff root: ``handle(event, now) -> effects``; holds the global model."""

    _dp: DpRelease | None = None  # central DP (``set_privacy``)
    _dp_forwards = False  # the DP release is of secure regions' noised forwards
    _replay_noise: tuple[float, float, int, int] | None = None  # a replayed cohort's noise

    def __init__(
        self,
        node_id: str,
        children: Mapping[str, str],
        weights: Weights,
        *,
        buffer_size: int,
        concurrency: int,
        staleness: StalenessFn = FEDBUFF_STALENESS,
        max_staleness: int | None = None,
        server_opt: ServerOptimizer | None = None,
        train_config: Mapping[str, Any] | None = None,
        task_timeout_s: float | None = None,
        rng: np.random.Generator | int = 0,
        weighting: str = "uniform",
        clip_norm: object = "auto",
        robust: str = "mean",
        trim_fraction: float = 0.1,
        checkpoint_every: int = 10,
        log_deltas: bool = True,
        version: int = 0,
        claim_bounds: ClaimBounds | None = None,
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
        self._init_model(weights, version)
        self._opt: ServerOptimizer = server_opt if server_opt is not None else ServerSGD()
        self.checkpoint_every = checkpoint_interval(checkpoint_every)
        self._make_buffer(self._weights)

    def set_privacy(self, dp: DpRelease, *, forwards: bool = False) -> None:
        """Central DP (``algorithms.dp.release``): every flush releases the noised mean of
        the clipped contributions, the budget stops releases and dispatch. FedBuff claims
        no sampling amplification (q = None). Call it before the first event or restore.

        ``forwards``: the children are secure regions whose forwards are their cohorts'
        sums, already clipped and noised by the sites (``federation.privacy.
        check_regions``): a flush (one forward, buffer_size 1) releases that sum over the
        fixed denominator and adds nothing."""
        self._dp = dp
        self._dp_forwards = forwards

    def _fill(self, now: float, out: list[Effect]) -> None:
        if self._dp is not None and self._dp.stops(out):
            return  # the privacy budget is spent: no more tasks
        super()._fill(now, out)

    def _flush_full(self, out: list[Effect]) -> None:
        dp = self._dp
        if dp is None:
            delta: Weights | None = self._buffer.flush().delta
        elif self._dp_forwards:
            delta = self._release_forward(dp, out)
        else:
            delta = dp.flush(self._buffer, self._weights, self._version + 1, dp.event(), out)
        self._end_epoch()
        if delta is None or not self._apply_step(self._opt, delta, out):
            return
        self._version += 1
        if dp is not None:
            dp.record(self._version, dp.event(), out)
        out.append(Metric("model_version", float(self._version)))
        self._broadcast(out)
        if self.checkpoint_every and self._version % self.checkpoint_every == 0:
            out.append(Persist(CHECKPOINT_KEY, self.snapshot()))

    def _release_forward(self, dp: DpRelease, out: list[Effect]) -> Weights | None:
        """A secure region's forward as one release: it carries s·(Σ_U x_i + noise)/|U|
        with count |U| (uniform weighting), so the buffer's mean times its count is the
        discounted noised sum, released over the fixed denominator (the regions' cohort
        size N). Each cohort's noise is at least z·Δ (its sites refuse seals with less), and
        its members are distinct sites: the release is recorded at the configured z (a
        lower bound of the noise the cohort carried; the root cannot check σ itself). None
        when the budget refuses it."""
        agg = self._buffer.flush()
        if not dp.check(dp.event()):
            dp.refused += 1
            out.append(Metric("privacy_release_refused", float(agg.count)))
            return None
        scale = agg.count / dp.denominator
        return {
            k: (np.asarray(v, dtype=np.float64) * scale).astype(self._weights[k].dtype, copy=False)
            for k, v in agg.delta.items()
        }

    def _cohort_step(
        self,
        delta: Weights,
        n_examples: int,
        pairs: list[tuple[str, int]],
        s: float,
        version: int,
        out: list[Effect],
    ) -> None:
        """A secure cohort's Δ̄ (``AggregatorBase._apply_cohort``) is one server step: a new
        version, exactly as a flush of the buffer. With central DP the members noised the
        sum (σ_member each, ``secagg_noise``): the step divides by the fixed denominator
        K instead of the survivors' count, nothing is added here, and the release is
        recorded with the effective z of the |U| members' noise (or refused by the budget)."""
        dp = self._dp
        event = None
        if dp is not None:
            noise = self._replay_noise or getattr(self, "secagg_noise", None)
            if noise is None:  # a factory bug, not peer input: nothing is released
                raise ProtocolMisuseError("a secure cohort under central DP without its noise")
            sigma, clip, bits, dim = noise
            event = PrivacyEvent(effective_noise_multiplier(sigma, len(pairs), clip, bits, dim))
            if not dp.check(event):
                dp.refused += 1
                out.append(Metric("privacy_release_refused", float(len(pairs))))
                return
            scale = len(pairs) / dp.denominator  # Σw = |U| (uniform): Σx / K
            delta = {k: (v * scale).astype(v.dtype, copy=False) for k, v in delta.items()}
        if not self._apply_step(self._opt, delta, out):
            return
        self._version += 1
        if dp is not None and event is not None:
            dp.record(self._version, event, out)
        out.append(Metric("model_version", float(self._version)))
        self._broadcast(out)
        if self.checkpoint_every and self._version % self.checkpoint_every == 0:
            out.append(Persist(CHECKPOINT_KEY, self.snapshot()))

    def _cohort_record_extra(self) -> dict[str, Any]:
        noise = getattr(self, "secagg_noise", None)
        if self._dp is None or noise is None:
            return {}
        return {"noise": list(noise)}  # the release's noise, on a replay (``recorded_noise``)

    def _replay_cohort_record(self, rec: Mapping[str, Any]) -> None:
        self._replay_noise = recorded_noise(rec)
        try:
            super()._replay_cohort_record(rec)
        finally:
            self._replay_noise = None

    # ---------------------------------------------------------- durability
    def snapshot(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimiser, buffer, ledger (arrays copied or
        immutable). Pair it with the "applied" records written after it for ``restore``."""
        return {
            **self._base_snapshot(),
            "kind": "fedbuff",
            "version": self._version,
            "weights": self._weights,
            "opt": self._opt.snapshot(),
            "buffer": self._buffer.snapshot(),
            **({} if self._dp is None else {"privacy": self._dp.snapshot()}),
        }

    def restore(
        self, checkpoint: Mapping[str, Any] | None, records: RecordSource = NO_RECORDS
    ) -> None:
        """Load ``snapshot()`` output (None: this fresh node's own), then replay the
        "applied" records written after it (``algorithms.protocol.Restorable``).

        Children are all considered down afterwards: they say Hello again on reconnect.
        """
        state = self.snapshot() if checkpoint is None else checkpoint
        if state.get("kind") != "fedbuff":
            raise ValueError(f"not a FedBuff snapshot: {state.get('kind')!r}")
        self._base_restore(state)
        self._version = int(state["version"])
        self._weights = dict(state["weights"])
        self._opt.restore(state["opt"])
        self._make_buffer(self._weights)
        self._buffer.restore(state["buffer"])
        restore_privacy(self._dp, state, self._version, records)  # refuses a lost ledger
        self._flush_restored()
        self._replay_records(records.records(APPLIED_KEY))
        check_privacy_log(self._dp, records)
        self._restore_secagg(state, records)
