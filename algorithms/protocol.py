"""The sans-I/O contract every node role implements.

A node is a plain state machine: drivers feed it typed events together with the
current time (``now``, in seconds, from whichever clock the driver owns) and carry
out the effects it returns, in order. A node never reads a clock, performs I/O,
starts a task or draws randomness it was not given at construction.

Ordering rule for drivers: effects are carried out in list order. In particular a
``Persist`` must be durable before any effect that follows it takes effect outside the
node: an acknowledgement (or any message) that follows it is never *delivered* before
the state it depends on has been recorded. A driver may start encoding and streaming
such a message while the write is in flight, as long as the peer cannot act on it
before the write is durable (``runtime.driver`` holds back its last record).

Local misuse (a driver feeding an event the node cannot accept in its state)
raises ``ProtocolMisuseError`` at once. Bad input from a *peer* never raises out of a
node: the node rejects it and reports why through ``Log`` and ``Metric`` effects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.frozen import slot_init
from fedloom.transport.wire import Message

# An ordered mapping from parameter name to array. Arrays handed to or returned by
# a node are treated as immutable: nobody writes into an array they did not create.
Weights: TypeAlias = dict[str, npt.NDArray[np.floating[Any]]]


class ProtocolMisuseError(RuntimeError):
    """A driver used a node in a way its contract forbids (a local bug, not peer input)."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Received:
    """A message arrived from ``peer`` (already authenticated and decoded by the driver)."""

    peer: str
    msg: Message


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What a training plan returns: the trained weights, examples seen, metrics."""

    weights: Weights
    n_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TrainedDelta:
    """A site's training result as its update: the trained weights minus the weights the
    job was given, computed and checked where the job trained (``algorithms.site.
    trained_delta``: the model's names, shapes and dtypes, every value finite), so the
    node does not do it again. A driver delivers one only to a node that says it takes
    them (``accepts_trained_delta``); a simulator's worker process makes them, off the
    driver's core."""

    delta: Weights
    n_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TrainDone:
    """A training job started by a ``Train`` effect finished."""

    job: int
    result: TrainResult | TrainedDelta


@dataclass(frozen=True, slots=True)
class TrainFailed:
    """A training job started by a ``Train`` effect failed or was abandoned. ``code``: why,
    in one word ("failed": the plan raised; "dropout": abandoned, in the simulator; a
    declared refusal's own code, e.g. "plan_not_approved")."""

    job: int
    reason: str
    code: str = "failed"


@dataclass(frozen=True, slots=True)
class PeerUp:
    """A link to ``peer`` is (again) usable."""

    peer: str


@dataclass(frozen=True, slots=True)
class PeerDown:
    """The link to ``peer`` was lost; messages in flight on it may be gone."""

    peer: str


@dataclass(frozen=True, slots=True)
class Deadline:
    """The time the node asked for through ``next_deadline()`` has come."""


Event: TypeAlias = Received | TrainDone | TrainFailed | PeerUp | PeerDown | Deadline


# -------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver ``msg`` to ``peer`` over the (reliable, ordered) link to it."""

    peer: str
    msg: Message


@dataclass(frozen=True, slots=True)
class Train:
    """Start local training job ``job`` on ``weights`` with ``config``.

    The driver answers with exactly one ``TrainDone`` or ``TrainFailed`` for ``job``.
    ``weights`` is a snapshot: the job trains on these, whatever happens meanwhile.
    """

    job: int
    weights: Weights
    config: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Persist:
    """Record ``data`` durably under ``key`` before any later effect is carried out.

    ``append=False`` replaces what is stored under ``key`` (a checkpoint);
    ``append=True`` appends ``data`` as one record to the log named ``key``.
    """

    key: str
    data: Any
    append: bool = False


@dataclass(frozen=True, slots=True)
class Metric:
    """An observation. Counters carry increments, gauges carry the current value.

    Well-known names (the simulator and the runtime both understand these):
    ``update_applied`` (labels ``src``, ``seq``; value = staleness),
    ``update_duplicate`` (labels ``src``, ``seq``), ``update_rejected`` (label ``reason``),
    ``update_late`` (labels ``src``), ``model_version`` (gauge), ``buffer_fill`` (gauge),
    ``peer_pruned`` (label ``peer``), ``job_timeout`` (label ``site``).
    """

    name: str
    value: float = 1.0
    labels: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Log:
    """A structured log line."""

    level: str
    text: str
    fields: Mapping[str, Any] | None = None


# Built on every event a node handles (several per message in a simulation): each sets
# its slots directly (``algorithms.frozen``), the same objects as the generated __init__.
_FAST: tuple[type, ...] = (
    Received,
    TrainResult,
    TrainedDelta,
    TrainDone,
    TrainFailed,
    PeerUp,
    PeerDown,
)
for _cls in (*_FAST, Send, Train, Persist, Metric, Log):
    slot_init(_cls)
del _cls, _FAST


Effect: TypeAlias = Send | Train | Persist | Metric | Log


# ---------------------------------------------------------------------------- nodes


@runtime_checkable
class Node(Protocol):
    """What every role (site, aggregator, regional aggregator, gossip peer) provides."""

    @property
    def node_id(self) -> str: ...

    def handle(self, event: Event, now: float) -> list[Effect]:
        """Advance the state machine by one event at time ``now``; return effects in order."""
        ...

    def next_deadline(self) -> float | None:
        """The earliest time at which the node wants a ``Deadline`` event, if any."""
        ...


@runtime_checkable
class ModelHolder(Protocol):
    """A node whose current model can be observed (for evaluation and reports)."""

    def current_model(self) -> tuple[int, Weights] | None:
        """``(version, weights)`` of the model this node holds now, or ``None``."""
        ...


# ---------------------------------------------------------------------- durability


class RecordSource(Protocol):
    """The log records written after a node's checkpoint, by log key, in append order
    (``federation.store.Recovery`` is one; ``LogRecords`` another)."""

    def records(self, key: str) -> Sequence[Mapping[str, Any]]:
        """The records of log ``key`` (empty when there are none)."""
        ...


@dataclass(frozen=True, slots=True)
class LogRecords:
    """A ``RecordSource`` over a plain mapping of log key to records (tests and tools)."""

    logs: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)

    def records(self, key: str) -> Sequence[Mapping[str, Any]]:
        return self.logs.get(key, ())


NO_RECORDS = LogRecords()


@runtime_checkable
class Restorable(Protocol):
    """A node whose state survives a restart: every durable role (site, region, the root
    aggregators, gossip peers) restores the same way.

    ``snapshot()`` is what a ``Persist(CHECKPOINT_KEY, ...)`` records. ``restore(checkpoint,
    records)`` loads a checkpoint (``None``: none was ever written, so the freshly built
    node's own state) and replays the records written after it, each node asking
    ``records`` for the log keys it owns. ValueError for state this node cannot have written.
    """

    def snapshot(self) -> dict[str, Any]: ...

    def restore(
        self, checkpoint: Mapping[str, Any] | None, records: RecordSource = NO_RECORDS
    ) -> None: ...
