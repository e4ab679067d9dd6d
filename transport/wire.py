"""Wire messages exchanged between fedloom nodes.

Every message is a frozen, slotted dataclass. Tensor payloads are ordered
``name -> numpy array`` dicts; the tensor codec (``transport.tensors``) turns them
into bytes. Conventions:

* ``delta`` is ``trained_weights - base_weights`` (the direction the site moved);
  aggregators *add* a scaled, aggregated delta to the model.
* ``seq`` numbers a source's updates 1, 2, 3, ... and never repeats; receivers apply
  each ``(src, seq)`` at most once and acknowledge it after recording it durably.
* ``version`` numbers the models issued by the root aggregator; it only increases.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy.typing as npt

Tensors: TypeAlias = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True)
class Hello:
    """A child introduces itself to its parent (a site to its aggregator, a region to the root)."""

    src: str
    role: str
    n_examples: int = 0


@dataclass(frozen=True, slots=True)
class ModelBroadcast:
    """A new model version, pushed from the root down the tree (relayed by regions)."""

    version: int
    weights: Tensors


@dataclass(frozen=True, slots=True)
class TrainRequest:
    """An aggregator asks a site to train ``weights`` (model ``version``) with ``config``."""

    task: int
    version: int
    weights: Tensors
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Update:
    """A delta from ``src``, computed on model ``base_version``.

    ``n_examples`` is the number of training examples behind the delta and
    ``count`` the number of site updates folded into it (1 for a site, more for a
    regional aggregator forwarding an aggregate). ``task`` echoes the request that
    caused it (-1 when unsolicited).
    """

    src: str
    seq: int
    base_version: int
    delta: Tensors
    n_examples: int
    count: int = 1
    task: int = -1
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ack:
    """``dst`` has durably recorded update ``(src, seq)``; the sender may forget it."""

    src: str
    seq: int


@dataclass(frozen=True, slots=True)
class GossipShare:
    """A gossip peer's share: model ``x`` and push-sum weight ``w`` at local step ``step``.

    For D-PSGD mixing ``w`` is 1.0 and ``x`` is the sender's model.
    For push-sum ``x`` is already scaled by the mixing weight (so the receiver adds it).
    """

    src: str
    step: int
    x: Tensors
    w: float = 1.0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness beacon between gossip peers (and on idle tree links)."""

    src: str
    step: int = 0


Message: TypeAlias = Hello | ModelBroadcast | TrainRequest | Update | Ack | GossipShare | Heartbeat

MESSAGE_TYPES: tuple[type, ...] = (
    Hello,
    ModelBroadcast,
    TrainRequest,
    Update,
    Ack,
    GossipShare,
    Heartbeat,
)
