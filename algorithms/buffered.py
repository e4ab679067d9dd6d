"""FedBuff-style intake shared by the root FedBuff aggregator and regional aggregators.

Server side of FedBuff (Nguyen et al., AISTATS 2022, Alg. 1): each arriving delta with
staleness τ = version − base_version is discounted by s(τ) and buffered; after K of them the
buffer is flushed (see ``update_buffer`` for the averaging convention). Deltas older than
``max_staleness`` are dropped — recorded and acked, but not applied. Each flush ends an
intake epoch (``AggregatorBase``: a child's quota of updates starts again).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.aggregator_base import AggregatorBase
from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.protocol import Effect, Metric, Weights
from fedloom.algorithms.staleness import StalenessFn, polynomial
from fedloom.algorithms.update_buffer import UpdateBuffer
from fedloom.transport.wire import Update

__all__ = ["FEDBUFF_STALENESS", "BufferedAggregator"]

FEDBUFF_STALENESS: StalenessFn = polynomial(0.5)


class BufferedAggregator(AggregatorBase):
    """Adds the buffer, staleness discount and max-staleness drop to ``AggregatorBase``."""

    def __init__(
        self,
        node_id: str,
        children: Mapping[str, str],
        *,
        buffer_size: int,
        concurrency: int,
        staleness: StalenessFn,
        max_staleness: int | None,
        train_config: Mapping[str, Any] | None,
        task_timeout_s: float | None,
        rng: np.random.Generator | int,
        weighting: str,
        clip_norm: object,
        robust: str,
        trim_fraction: float,
        log_deltas: bool,
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
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")
        if not callable(staleness):
            raise ValueError("staleness must be a staleness function (see algorithms.staleness)")
        self.buffer_size = buffer_size
        self._variety_quota = robust != "mean"
        self.max_staleness = max_staleness
        self._staleness = staleness
        self._buffer_args: dict[str, Any] = {
            "weighting": weighting,
            "robust": robust,
            "trim_fraction": trim_fraction,
            "clip_norm": clip_norm,
        }
        # Checks the options now; regions rebuild it once they know the model's shapes.
        self._buffer = UpdateBuffer({}, **self._buffer_args)

    def _make_buffer(self, template: Weights) -> None:
        self._buffer = UpdateBuffer(template, **self._buffer_args)
        if self._secagg is not None:  # cohorts decode against the model's shapes
            self._secagg.set_template(template)

    @property
    def buffer_fill(self) -> int:
        return len(self._buffer)

    def _epoch_size(self) -> int:
        return self.buffer_size

    def _flush_full(self, out: list[Effect]) -> None:
        """The buffer holds K updates: turn them into a model step or an upward update
        (never one that is not finite); call ``_end_epoch``."""
        raise NotImplementedError

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
        s = self._staleness(tau)
        if self._buffer.add(msg.delta, s, msg.n_examples, msg.count, self._norm, msg.src):
            out.append(Metric("update_clipped", 1.0, {"src": msg.src}))
        self._record_applied(peer, msg, version, tau, s, out)
        fill = self._buffer.n_updates  # len(self._buffer), without __len__'s call
        if "buffer_fill" not in self._omit:
            out.append(Metric("buffer_fill", float(fill)))
        if fill >= self.buffer_size:
            self._flush_full(out)

    def _flush_restored(self) -> None:
        """A checkpoint's buffer holding ``buffer_size`` updates or more (it was written
        under a larger ``buffer_size``) is flushed as the restore loads it, before the
        records after it are replayed: as ``_replay`` flushes the buffer a record fills,
        and with its effects dropped the same way (a region's forward is in its outbox,
        resent once the parent is up). Otherwise it stayed over-full until the next update
        came, however long that took."""
        if len(self._buffer) >= self.buffer_size:
            self._flush_full([])

    def _replay(self, record: Mapping[str, Any]) -> None:
        self._buffer.add(
            record["delta"],
            float(record["s"]),
            int(record["n_examples"]),
            int(record["count"]),
            src=str(record["src"]),
        )
        if len(self._buffer) >= self.buffer_size:
            self._flush_full([])
