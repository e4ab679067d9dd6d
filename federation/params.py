"""The parameter types both drivers build nodes from, and their public TOML readers.

A scenario's ``[training]``, ``[codec]`` and algorithm sections and a daemon's config file
are read by the same functions into the same frozen dataclasses, so a simulated federation
and a deployed one are configured by one vocabulary. Reading is strict: unknown fields and
wrong types are reported with the field's path, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedloom.algorithms.refusals import BACKOFF_S, MAX_BACKOFF_S
from fedloom.federation.config_reader import ConfigError, Table

ALGORITHMS = ("fedavg", "fedprox", "fedasync", "fedbuff", "gossip")
TOPOLOGIES = ("star", "hierarchical", "gossip")
GRAPHS = ("ring", "kregular", "exponential", "smallworld")
CODECS = ("fp32", "fp16", "int8", "topk")
STALENESS = ("constant", "polynomial", "hinge")
OPTIMISERS = ("sgd", "adam")
ROBUST = ("mean", "median", "trimmed_mean")
DEFAULT_CLIENTS_PER_ROUND = 10  # a sync round's K when none is written (at most every site)
# A learning rate (the sites' ``lr``, the server's ``server_lr``) at most this: ten times the
# top of the usual tuning grids (10^-3 .. 10^1, Reddi et al., ICLR 2021). Past it a step
# diverges at once (lr = 1e300 ran, every model inf or nan); a value this large is a typo.
MAX_LR = 100.0


@dataclass(frozen=True, slots=True)
class CodecConfig:
    up: str
    down: str
    topk_fraction: float


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    lr: float
    local_steps: int
    batch_size: int
    mu: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "local_steps": self.local_steps,
            "batch_size": self.batch_size,
            "mu": self.mu,
        }


@dataclass(frozen=True, slots=True)
class AlgorithmConfig:
    """Aggregation parameters; each algorithm reads the ones that concern it."""

    buffer_size: int = 10
    concurrency: int = 10
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    staleness: str = "polynomial"
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    max_staleness: int = 100
    alpha: float = 0.6
    # None (not written): DEFAULT_CLIENTS_PER_ROUND, or every site of a root with fewer;
    # a written value above the root's sites is a ConfigError (``round_size``).
    clients_per_round: int | None = None
    over_selection: float = 1.3
    round_timeout_s: float = 600.0
    min_cohort: int = 1
    task_timeout_s: float = 1800.0
    regional_buffer_size: int = 5
    regional_concurrency: int = 10
    root_buffer_size: int = 2
    robust: str = "mean"
    # "auto": a bound that follows the median norm of recent deltas (algorithms.robust);
    # a number: a fixed bound; None ("off" in TOML): no clip.
    clip_norm: float | str | None = "auto"
    weighting: str = "uniform"
    # The largest ``count`` a region child may claim (0: derived from the topology, or the
    # children's ``regional_buffer_size`` in a daemon), and the largest ``n_examples`` a
    # site may claim; larger claims are clamped (algorithms.intake).
    max_region_count: int = 0
    max_examples_per_site: int = 1_000_000
    gossip_mode: str = "dpsgd"
    graph: str = "ring"
    degree: int = 4
    gossip_interval_s: float = 60.0
    # What a gossip neighbour can do (algorithms.gossip): "auto", a number or None ("off").
    # gossip_clip: the ClippedGossip radius τ ("auto" follows recent honest distances).
    # gossip_max_share_weight: the largest push-sum share weight taken, and the most weight
    # a neighbour may push per gossip interval ("auto": the number of gossip peers in the
    # plan or roster, the network's whole mass).
    gossip_clip: float | str | None = "auto"
    gossip_max_share_weight: float | str | None = "auto"
    clustering: str = "region"
    # The start quorum of an aggregator (root or region, ``AggregatorBase.set_start_quorum``):
    # its first tasks and model broadcasts wait until ``start_quorum`` of its rostered
    # children are up (a number, more than it has meaning all of them; "all"; 0: off, the
    # default), or ``start_wait_s`` seconds have passed since its first event, whichever
    # comes first. Every start waits, a restart from the log too.
    start_quorum: int | str = 0
    start_wait_s: float = 10.0
    # An aggregator gives a direct child site that refused a task (``TrainRefused``) no new
    # task for this long, doubled with each refusal in a row up to ``MAX_BACKOFF_S``
    # (``algorithms.refusals``); a site that answers again, or reconnects, starts afresh.
    refusal_backoff_s: float = BACKOFF_S

    def round_size(self, sites: int) -> int:
        """A sync root's K over its ``sites`` site children: the written clients_per_round
        (ConfigError when it is more than ``sites``: no round could select that many), else
        DEFAULT_CLIENTS_PER_ROUND or every site where there are fewer. ``min_cohort`` must
        not exceed it (ConfigError naming both)."""
        k = self.clients_per_round
        if k is not None and k > sites:
            raise ConfigError(
                f"clients_per_round: {k} is more than the {sites} sites of this root; a round "
                f"selects at most every site (write at most {sites}, or leave it out)"
            )
        size = min(DEFAULT_CLIENTS_PER_ROUND, sites) if k is None else k
        if self.min_cohort > size:
            raise ConfigError(
                f"min_cohort: {self.min_cohort} is more than the {size} sites a round selects "
                f"(clients_per_round{'' if k is not None else ', at most every site'}); a "
                f"round never has more answers: write at most {size}"
            )
        return size


ALGORITHM_FIELDS = frozenset(AlgorithmConfig.__dataclass_fields__)


def read_training(t: Table) -> TrainingConfig:
    cfg = TrainingConfig(
        lr=read_lr(t, "lr", 0.05),
        local_steps=t.integer("local_steps", 5, min=1),
        batch_size=t.integer("batch_size", 10, min=1),
        mu=t.number("mu", 0.0, min=0.0),
    )
    t.finish()
    return cfg


def read_lr(t: Table, key: str, default: float) -> float:
    """A learning rate: a finite number > 0 and at most ``MAX_LR``."""
    lr: float = t.number(key, default, min=0.0, exclusive_min=True)
    if lr > MAX_LR:
        raise ConfigError(
            f"{t.where(key)}: expected a learning rate > 0 and <= {MAX_LR:g}, got {lr:g}"
        )
    return lr


def read_codec(t: Table) -> CodecConfig:
    cfg = CodecConfig(
        up=t.text("up", "fp32", choices=CODECS),
        down=t.text("down", "fp32", choices=CODECS),
        topk_fraction=t.number("topk_fraction", 0.01, min=0.0, max=1.0, exclusive_min=True),
    )
    if cfg.down == "topk":
        raise ConfigError(
            f"{t.where('down')}: top-k is for deltas; models go down as fp32, fp16 or int8"
        )
    t.finish()
    return cfg


def read_bound(t: Table, default: float | str | None, key: str = "clip_norm") -> float | str | None:
    """A bound such as ``clip_norm``: "auto", "off" (None) or a number > 0."""
    value = t.raw(key)  # read even when absent: ``finish`` lists it among the known fields
    if not t.has(key):
        return default
    if isinstance(value, str):
        choice = t.text(key, choices=("auto", "off"))
        return None if choice == "off" else "auto"
    clip: float = t.number(key, min=0.0, exclusive_min=True)
    return clip


MAX_START_WAIT_S = 3600.0
# A gossip round at least this often (10^6 h): the peers' liveness times are multiples of
# it (``factory.gossip_liveness``), and 1e308 overflowed them to inf.
MAX_GOSSIP_INTERVAL_S = 3.6e9


def read_start_quorum(t: Table, default: int | str) -> int | str:
    """``start_quorum``: "all" or a whole number of children >= 0 (0: off)."""
    value = t.raw("start_quorum")  # read even when absent (``finish``'s known fields)
    if not t.has("start_quorum"):
        return default
    if isinstance(value, str):
        choice: str = t.text("start_quorum", choices=("all",))
        return choice
    quorum: int = t.integer("start_quorum", min=0)
    return quorum


def read_algorithm(t: Table, algorithm: str | None = None) -> AlgorithmConfig:
    """The aggregation parameters of ``t``. ``algorithm``: the one that reads them (None:
    unknown, any): min_cohort is checked against clients_per_round only where a FedAvg or
    FedProx root reads both (a shared scenario table also serves the arms of others)."""
    d = AlgorithmConfig()
    cfg = AlgorithmConfig(
        buffer_size=t.integer("buffer_size", d.buffer_size, min=1),
        concurrency=t.integer("concurrency", d.concurrency, min=1),
        server_optimizer=t.text("server_optimizer", d.server_optimizer, choices=OPTIMISERS),
        server_lr=read_lr(t, "server_lr", d.server_lr),
        server_momentum=t.number("server_momentum", d.server_momentum, min=0.0, max=0.999),
        staleness=t.text("staleness", d.staleness, choices=STALENESS),
        staleness_a=t.number("staleness_a", d.staleness_a, min=0.0),
        staleness_b=t.number("staleness_b", d.staleness_b, min=0.0),
        max_staleness=t.integer("max_staleness", d.max_staleness, min=0),
        alpha=t.number("alpha", d.alpha, min=0.0, max=1.0, exclusive_min=True),
        clients_per_round=t.integer("clients_per_round", None, min=1),
        over_selection=t.number("over_selection", d.over_selection, min=1.0),
        round_timeout_s=t.number("round_timeout_s", d.round_timeout_s, min=0.0, exclusive_min=True),
        min_cohort=t.integer("min_cohort", d.min_cohort, min=1),
        task_timeout_s=t.number("task_timeout_s", d.task_timeout_s, min=0.0, exclusive_min=True),
        regional_buffer_size=t.integer("regional_buffer_size", d.regional_buffer_size, min=1),
        regional_concurrency=t.integer("regional_concurrency", d.regional_concurrency, min=1),
        root_buffer_size=t.integer("root_buffer_size", d.root_buffer_size, min=1),
        robust=t.text("robust", d.robust, choices=ROBUST),
        clip_norm=read_bound(t, d.clip_norm),
        weighting=t.text("weighting", d.weighting, choices=("uniform", "examples")),
        max_region_count=t.integer("max_region_count", d.max_region_count, min=0),
        max_examples_per_site=t.integer("max_examples_per_site", d.max_examples_per_site, min=0),
        gossip_mode=t.text("gossip_mode", d.gossip_mode, choices=("dpsgd", "pushsum")),
        graph=t.text("graph", d.graph, choices=GRAPHS),
        degree=t.integer("degree", d.degree, min=1),
        gossip_interval_s=t.number(
            "gossip_interval_s",
            d.gossip_interval_s,
            min=0.0,
            max=MAX_GOSSIP_INTERVAL_S,
            exclusive_min=True,
        ),
        gossip_clip=read_bound(t, d.gossip_clip, "gossip_clip"),
        gossip_max_share_weight=read_bound(t, d.gossip_max_share_weight, "gossip_max_share_weight"),
        clustering=t.text("clustering", d.clustering, choices=("region", "rtt")),
        start_quorum=read_start_quorum(t, d.start_quorum),
        # Bounded: a dead or hostile child never holds an aggregator back for longer.
        start_wait_s=t.number(
            "start_wait_s", d.start_wait_s, min=0.0, max=MAX_START_WAIT_S, exclusive_min=True
        ),
        # At most the backoff's cap: past it, doubling would change nothing.
        refusal_backoff_s=t.number(
            "refusal_backoff_s", d.refusal_backoff_s, min=0.0, max=MAX_BACKOFF_S, exclusive_min=True
        ),
    )
    t.finish()
    if algorithm is not None and algorithm not in ("fedavg", "fedprox"):
        return cfg  # no round: min_cohort and clients_per_round do nothing here
    k = DEFAULT_CLIENTS_PER_ROUND if cfg.clients_per_round is None else cfg.clients_per_round
    if cfg.min_cohort > k:  # no round could ever close: an error, never a silent clamp
        written = "" if cfg.clients_per_round is not None else " (its default)"
        raise ConfigError(
            f"{t.where('min_cohort')}: {cfg.min_cohort} is more than clients_per_round{written} "
            f"{k}; a round never has more answers than the sites it selects: write at most {k}"
        )
    return cfg
