"""The contract between nodes and local training: ``TrainingPlan`` and its config.

A node never trains by itself. It emits a ``Train(job, weights, config)`` effect and
the driver hands ``weights`` and ``config`` to the site's ``TrainingPlan``. This module
holds only the protocol and the config parsing, so ``algorithms/`` stays free of torch.

Config keys (all optional; defaults in ``DEFAULT_TRAIN_CONFIG``):

``lr``
    SGD learning rate (> 0).
``local_steps``
    number of minibatch SGD steps (>= 1).
``batch_size``
    examples per minibatch (>= 1).
``mu``
    FedProx proximal coefficient (Li et al., arXiv 1812.06127): the local objective gets
    ``(mu / 2) * ||w - w_global||^2`` where ``w_global`` are the weights passed to
    ``train``. ``mu = 0`` is plain FedAvg local SGD.
``seed``
    non-negative integer that fixes the minibatch order; same weights, config and data
    give the same result.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from fedloom.algorithms.protocol import TrainResult, Weights

DEFAULT_TRAIN_CONFIG: Final[Mapping[str, Any]] = {
    "lr": 0.05,
    "local_steps": 5,
    "batch_size": 10,
    "mu": 0.0,
    "seed": 0,
}


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """A validated training config (see the module docstring for the meaning of each field)."""

    lr: float = 0.05
    local_steps: int = 5
    batch_size: int = 10
    mu: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"training config: lr must be a finite number > 0, got {self.lr!r}")
        if self.local_steps < 1:
            raise ValueError(f"training config: local_steps must be >= 1, got {self.local_steps}")
        if self.batch_size < 1:
            raise ValueError(f"training config: batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"training config: mu must be a finite number >= 0, got {self.mu!r}")
        if self.seed < 0:
            raise ValueError(f"training config: seed must be >= 0, got {self.seed}")

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> TrainConfig:
        """Parse ``config``; unknown keys are ignored (drivers may add their own)."""
        get = config.get
        return cls(
            lr=_number("lr", get("lr", 0.05)),
            local_steps=_integer("local_steps", get("local_steps", 5)),
            batch_size=_integer("batch_size", get("batch_size", 10)),
            mu=_number("mu", get("mu", 0.0)),
            seed=_integer("seed", get("seed", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "local_steps": self.local_steps,
            "batch_size": self.batch_size,
            "mu": self.mu,
            "seed": self.seed,
        }


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"training config: {key} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"training config: {key} must be a number, got {value!r}") from None


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"training config: {key} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"training config: {key} must be an integer, got {value!r}") from None


@runtime_checkable
class TrainingPlan(Protocol):
    """Local training for one site (or evaluation on a held-out set).

    Implementations never mutate the arrays they are given and always return new arrays.
    """

    def init(self, seed: int) -> Weights:
        """Fresh model weights, a deterministic function of ``seed``."""
        ...

    def train(self, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        """Run ``config["local_steps"]`` minibatch SGD steps starting from ``weights``."""
        ...

    def evaluate(self, weights: Weights) -> dict[str, float]:
        """Metrics on this plan's evaluation data; always has ``"accuracy"`` and ``"loss"``."""
        ...
