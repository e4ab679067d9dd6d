"""Aggregator state machines built from an ``AlgorithmConfig``.

One factory for the simulator's scenario arms and the runtime's daemon configs, so a
scenario and a deployment with the same parameters run the same nodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloom.algorithms.fedasync import FedAsyncAggregator
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.intake import ClaimBounds
from fedloom.algorithms.protocol import Node, Weights
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.server_opt import ServerOptimizer, make_server_opt
from fedloom.algorithms.staleness import StalenessFn, make_staleness
from fedloom.algorithms.sync import SyncAggregator
from fedloom.federation.params import AlgorithmConfig

ROOT_ALGORITHMS = ("fedbuff", "fedasync", "fedavg", "fedprox")


def staleness_fn(p: AlgorithmConfig) -> StalenessFn:
    if p.staleness == "constant":
        return make_staleness("constant")
    if p.staleness == "hinge":
        return make_staleness("hinge", {"a": p.staleness_a, "b": p.staleness_b})
    return make_staleness("polynomial", {"a": p.staleness_a})


def server_optimizer(p: AlgorithmConfig) -> ServerOptimizer:
    if p.server_optimizer == "adam":
        return make_server_opt("adam", {"lr": p.server_lr})
    return make_server_opt("sgd", {"lr": p.server_lr, "momentum": p.server_momentum})


def claim_bounds(
    p: AlgorithmConfig,
    *,
    region_counts: Mapping[str, int] | None = None,
    site_examples: Mapping[str, int] | None = None,
    max_examples_per_site: int | None = None,
) -> ClaimBounds:
    """What an aggregator believes of its children's ``count`` and ``n_examples`` claims.

    A region child's count is bounded by ``region_counts`` (derived from the topology) or
    else ``max_region_count`` (0: the children's ``regional_buffer_size``, right for regions
    of sites); a site's examples by ``site_examples`` or else ``max_examples_per_site``.
    """
    default_count = p.max_region_count or p.regional_buffer_size
    examples = p.max_examples_per_site
    if max_examples_per_site is not None:
        examples = min(examples, max_examples_per_site)
    return ClaimBounds(
        max_region_count=max(1, default_count),
        max_examples_per_site=examples,
        region_counts=dict(region_counts or {}),
        site_examples=dict(site_examples or {}),
    )


def build_root(
    algorithm: str,
    node_id: str,
    children: Mapping[str, str],
    weights: Weights,
    p: AlgorithmConfig,
    *,
    buffer_size: int,
    concurrency: int,
    train_config: Mapping[str, Any],
    rng: np.random.Generator,
    log_deltas: bool = True,
    bounds: ClaimBounds | None = None,
) -> Node:
    """The top aggregator for ``algorithm`` (fedbuff, fedasync, fedavg or fedprox)."""
    common: dict[str, Any] = {
        "train_config": train_config,
        "rng": rng,
        "clip_norm": p.clip_norm,
        "log_deltas": log_deltas,
        "claim_bounds": bounds if bounds is not None else claim_bounds(p),
    }
    if algorithm == "fedbuff":
        return FedBuffAggregator(
            node_id,
            children,
            weights,
            buffer_size=buffer_size,
            concurrency=concurrency,
            staleness=staleness_fn(p),
            max_staleness=p.max_staleness,
            server_opt=server_optimizer(p),
            task_timeout_s=p.task_timeout_s,
            weighting=p.weighting,
            robust=p.robust,
            **common,
        )
    if algorithm == "fedasync":
        return FedAsyncAggregator(
            node_id,
            children,
            weights,
            alpha=p.alpha,
            concurrency=concurrency,
            staleness=staleness_fn(p),
            max_staleness=p.max_staleness,
            history=min(p.max_staleness + 1, 256),
            task_timeout_s=p.task_timeout_s,
            **common,
        )
    if algorithm in ("fedavg", "fedprox"):
        k = min(p.clients_per_round, len(children))
        return SyncAggregator(
            node_id,
            children,
            weights,
            clients_per_round=k,
            over_selection=p.over_selection,
            round_timeout_s=p.round_timeout_s,
            min_cohort=min(p.min_cohort, k),
            # Over-select from the first round on: wait until enough sites are idle.
            min_available=min(len(children), math.ceil(p.over_selection * k)),
            server_opt=server_optimizer(p),
            robust=p.robust,
            **common,  # with log_deltas the open round survives a restart
        )
    known = ", ".join(ROOT_ALGORITHMS)
    raise ValueError(f"no root aggregator for algorithm {algorithm!r} ({known})")


def build_region(
    node_id: str,
    parent: str,
    children: Mapping[str, str],
    p: AlgorithmConfig,
    *,
    buffer_size: int,
    concurrency: int,
    train_config: Mapping[str, Any],
    rng: np.random.Generator,
    log_deltas: bool = True,
    bounds: ClaimBounds | None = None,
    max_outbox_bytes: int | None = None,
) -> RegionalAggregator:
    """A regional FedBuff buffer between its sites and ``parent``."""
    return RegionalAggregator(
        node_id,
        parent,
        children,
        buffer_size=buffer_size,
        concurrency=concurrency,
        staleness=staleness_fn(p),
        max_staleness=p.max_staleness,
        task_timeout_s=p.task_timeout_s,
        weighting=p.weighting,
        robust=p.robust,
        train_config=train_config,
        rng=rng,
        clip_norm=p.clip_norm,
        log_deltas=log_deltas,
        claim_bounds=bounds if bounds is not None else claim_bounds(p),
        max_outbox_bytes=max_outbox_bytes,
    )
