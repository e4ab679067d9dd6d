"""One step of a sans-I/O node: the part of driving it that both drivers share.

A node (``algorithms.protocol.Node``) does no I/O, reads no clock and starts no task: a
driver hands it an event and the time, and carries out the effects it returns. This is
the sans-I/O pattern of h11 (``Connection.receive_data``/``next_event``), aioquic
(``QuicConnection.receive_datagram``/``get_timer``/``handle_timer``) and python-websockets
(``protocol.py``: ``receive_data``/``events_received``/``data_to_send``): time is an
argument, deadlines are return values, and the caller owns the sockets, the clock and the
threads. fedloom has two such callers, ``sim.driver.SimDriver`` (virtual clock) and
``runtime.driver.AsyncDriver`` (asyncio), and what they must do *identically* lives here,
once:

* the **note wrapper**: an exception out of ``node.handle`` carries a note naming the
  node, the event and the time (``while site-3 handled Received at t=12.5``);
* **effect dispatch** in list order to a small ``EffectSink``: ``send``, ``train``,
  ``persist``, ``metric``, ``log``. Consecutive ``Persist`` effects reach the sink as
  one batch (a store commits a batch as one frame), always before the effect after them,
  so a record is handed over before the ``Send`` of the acknowledgement that follows it.
  An effect of any other type is a bug in the node and raises. A driver may name metrics
  it has no use for (``skip_metrics``: the simulator skips the live gauges a daemon
  shows on its metrics page): those are dropped here, before the observer and the sink,
  and a node with an ``omit_metrics(names)`` method is told, so it can leave them out;
* **training-seed injection**: a ``Train`` whose config has no ``"seed"`` gets
  ``derived_seed(seed, "train", node_id, job)``, so a job trains identically under
  either driver;
* the **stuck-deadline guard**: a node whose deadline keeps firing without moving on
  (after handling ``Deadline`` at ``now`` it asks again for a time ``<= now``: an
  immediate re-fire) more than ``MAX_STUCK_DEADLINES`` times in a row is a bug, not a
  load spike: the step raises instead of spinning for ever. Every such re-fire counts,
  whatever time it asks for (on a real clock a node that asks for ``now`` asks for a new
  time each firing). The count ends when a ``Deadline`` leaves the node wanting a later
  time (or none), or when another event comes at a later time than the last stuck
  firing; one at that same instant does not end it (a node that alternates ``Deadline``
  and, say, ``PeerUp`` at one virtual instant is still stuck). A legitimate node handles
  everything due in one firing, so it never asks for a thousand re-fires in a row.

A driver supplies only what differs between them: its clock (the ``now`` it passes in),
how it schedules the deadline the step returns, and the sink (how it sends, trains and
persists). ``NodeStep`` is one node's step; the simulator keeps one per node and is
itself the sink of all of them (sink calls name the node).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from fedloom.algorithms.protocol import (
    Deadline,
    Effect,
    Event,
    Log,
    Metric,
    Node,
    Persist,
    Send,
    Train,
    Weights,
)
from fedloom.federation.seeds import DerivedSeeds, derived_seed

__all__ = [
    "MAX_STUCK_DEADLINES",
    "EffectObserver",
    "EffectSink",
    "NodeStep",
    "training_config",
]

# A node whose deadline keeps firing without moving on is stuck (a bug, not a load spike).
MAX_STUCK_DEADLINES = 1_000

EffectObserver = Callable[[str, Effect, float], Any]  # (node_id, effect, now), e.g. invariants


class EffectSink(Protocol):
    """Where a driver carries out a node's effects. Every call names the node, so one
    sink may serve many nodes (the simulator's does)."""

    def send(self, node_id: str, effect: Send) -> None:
        """Deliver ``effect.msg`` to ``effect.peer`` (or drop it if it cannot be)."""
        ...

    def train(self, node_id: str, job: int, weights: Weights, config: Mapping[str, Any]) -> None:
        """Start training job ``job``; answer later with ``TrainDone``/``TrainFailed``.
        ``config`` already holds the job's seed."""
        ...

    def persist(self, node_id: str, batch: list[Persist]) -> None:
        """Make ``batch`` durable (in order) before anything sent after it is delivered."""
        ...

    def metric(self, node_id: str, effect: Metric, now: float) -> None: ...

    def log(self, node_id: str, effect: Log, now: float) -> None: ...


def training_config(
    config: Mapping[str, Any], seed: int, node_id: str, job: int
) -> Mapping[str, Any]:
    """``config`` with the job's training seed (unless the node chose one itself)."""
    if "seed" in config:
        return config
    return {**config, "seed": derived_seed(seed, "train", node_id, job)}


class NodeStep:
    """One node's step: ``step(event, now)`` handles ``event``, carries out its effects
    through ``sink`` and returns the node's next deadline (None: none wanted).

    ``seed`` is the run's seed (training seeds derive from it); ``observe`` (optional)
    sees every effect before it is carried out (only those of the types in
    ``observe_kinds``, when given: an observer that ignores the others need not be
    called for them); ``error`` is the exception type raised
    for a node bug the step detects (an unknown effect, a stuck deadline);
    ``skip_metrics`` names metrics dropped unseen (neither observed nor handed to the sink).
    """

    __slots__ = (
        "_last_fired",
        "_seeds",
        "_stuck",
        "error",
        "max_stuck",
        "node",
        "node_id",
        "observe",
        "observe_kinds",
        "seed",
        "sink",
        "skip_metrics",
    )

    def __init__(
        self,
        node: Node,
        sink: EffectSink,
        *,
        seed: int = 0,
        observe: EffectObserver | None = None,
        error: type[Exception] = RuntimeError,
        max_stuck: int = MAX_STUCK_DEADLINES,
        skip_metrics: Collection[str] = frozenset(),
        observe_kinds: Collection[type] | None = None,
    ) -> None:
        self.node = node
        self.node_id = node.node_id
        self.sink = sink
        self.seed = seed
        self.observe = observe
        self.observe_kinds = None if observe_kinds is None else frozenset(observe_kinds)
        self.error = error
        self.max_stuck = max_stuck
        self.skip_metrics = frozenset(skip_metrics)
        if self.skip_metrics:
            # A node that offers it need not build what is dropped here unseen anyway.
            omit = getattr(node, "omit_metrics", None)
            if omit is not None:
                omit(self.skip_metrics)
        self._stuck = 0
        self._last_fired: float | None = None  # the time of the last stuck firing
        self._seeds: DerivedSeeds | None = None  # this node's training seeds, once needed

    def __call__(self, event: Event, now: float) -> float | None:
        node = self.node
        try:
            effects = node.handle(event, now)
        except Exception as exc:
            exc.add_note(f"while {self.node_id} handled {type(event).__name__} at t={now!r}")
            raise
        if effects:
            self.carry_out(effects, now)
        wanted = node.next_deadline()
        if type(event) is Deadline:
            self._after_deadline(now, wanted)
        elif self._stuck and now != self._last_fired:
            self._stuck = 0  # time moved on since the last stuck firing
        return wanted

    # ``step.handle(event, now)`` is ``step(event, now)``: a driver calling it for every
    # event saves the indirection of calling an instance (its __call__ slot).
    handle = __call__

    def carry_out(self, effects: list[Effect], now: float) -> None:
        """Hand ``effects`` to the sink in list order (consecutive Persists as one batch)."""
        sink = self.sink
        node_id = self.node_id
        observe = self.observe
        kinds = self.observe_kinds
        skip = self.skip_metrics
        batch: list[Persist] | None = None
        for effect in effects:
            kind = type(effect)
            if skip and kind is Metric and effect.name in skip:  # type: ignore[union-attr]
                continue
            if observe is not None and (kinds is None or kind in kinds):
                observe(node_id, effect, now)
            if kind is Persist:
                if batch is None:
                    batch = [effect]  # type: ignore[list-item]
                else:
                    batch.append(effect)  # type: ignore[arg-type]
                continue
            if batch is not None:
                sink.persist(node_id, batch)
                batch = None
            if kind is Send:
                sink.send(node_id, effect)  # type: ignore[arg-type]
            elif kind is Metric:
                sink.metric(node_id, effect, now)  # type: ignore[arg-type]
            elif kind is Train:
                job = effect.job  # type: ignore[union-attr]
                config = effect.config  # type: ignore[union-attr]
                if "seed" not in config:  # training_config(config, self.seed, node_id, job)
                    seeds = self._seeds  # _train_seeds()'s check, inline: once per job
                    if seeds is None or seeds.key != (self.seed, "train", node_id):
                        seeds = self._train_seeds()
                    config = {**config, "seed": seeds.seed(job)}
                sink.train(node_id, job, effect.weights, config)  # type: ignore[union-attr]
            elif kind is Log:
                sink.log(node_id, effect, now)  # type: ignore[arg-type]
            else:
                raise self.error(f"{node_id} returned an unknown effect {effect!r}")
        if batch is not None:
            sink.persist(node_id, batch)

    def _train_seeds(self) -> DerivedSeeds:
        """``derived_seed(self.seed, "train", self.node_id, job)`` for each job, as
        ``training_config`` gives it, with the text of the fixed keys written once."""
        seeds = self._seeds
        if seeds is None or seeds.key != (self.seed, "train", self.node_id):
            seeds = self._seeds = DerivedSeeds(self.seed, "train", self.node_id)
        return seeds

    def _after_deadline(self, fired_at: float, wanted: float | None) -> None:
        # Stuck: asked again for a time not after the one it was just handed (an
        # immediate re-fire). Counted whether or not the time it asks for changes.
        if wanted is not None and wanted <= fired_at:
            self._stuck += 1
            self._last_fired = fired_at
            if self._stuck > self.max_stuck:
                raise self.error(
                    f"{self.node_id} keeps asking for a deadline at t={wanted!r} "
                    f"without moving it on ({self._stuck} immediate re-fires in a row, "
                    f"last at t={fired_at!r})"
                )
        else:
            self._stuck = 0
