"""Staleness weighting functions s(τ) for asynchronous aggregation.

τ is how many model versions an update is behind (``version - base_version``).
The three families are those of FedAsync (Xie, Koyejo, Gupta, arXiv 1903.03934, §5.2):

* constant:      s(τ) = 1
* polynomial:    s_a(τ) = (1 + τ)^(-a)           (FedBuff uses a = 0.5: 1/√(1+τ))
* hinge:         s_{a,b}(τ) = 1 if τ ≤ b else 1 / (a(τ - b) + 1)

Note NVFlare's edge FedBuff uses 1/(1+√τ), a different function; it is not offered here.
Each function is a small frozen dataclass, so it pickles, compares and prints its parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Constant",
    "Hinge",
    "Polynomial",
    "StalenessFn",
    "constant",
    "hinge",
    "make_staleness",
    "polynomial",
]


class StalenessFn(Protocol):
    """A staleness discount: maps τ ≥ 0 to a weight in (0, 1]."""

    def __call__(self, tau: int) -> float: ...


def _check_tau(tau: int) -> None:
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")


@dataclass(frozen=True, slots=True)
class Constant:
    """s(τ) = 1: every update counts fully, however stale."""

    def __call__(self, tau: int) -> float:
        _check_tau(tau)
        return 1.0


@dataclass(frozen=True, slots=True)
class Polynomial:
    """s_a(τ) = (1 + τ)^(-a)."""

    a: float = 0.5

    def __post_init__(self) -> None:
        if not self.a >= 0.0:
            raise ValueError(f"polynomial staleness needs a >= 0, got {self.a}")

    def __call__(self, tau: int) -> float:
        _check_tau(tau)
        return float((1.0 + tau) ** (-self.a))


@dataclass(frozen=True, slots=True)
class Hinge:
    """s_{a,b}(τ) = 1 if τ ≤ b else 1 / (a(τ − b) + 1)."""

    a: float
    b: float

    def __post_init__(self) -> None:
        if not self.a >= 0.0:
            raise ValueError(f"hinge staleness needs a >= 0, got {self.a}")
        if not self.b >= 0.0:
            raise ValueError(f"hinge staleness needs b >= 0, got {self.b}")

    def __call__(self, tau: int) -> float:
        _check_tau(tau)
        if tau <= self.b:
            return 1.0
        return 1.0 / (self.a * (tau - self.b) + 1.0)


def constant() -> Constant:
    """s(τ) = 1."""
    return Constant()


def polynomial(a: float = 0.5) -> Polynomial:
    """s(τ) = (1 + τ)^(-a); the default a = 0.5 is FedBuff's 1/√(1+τ)."""
    return Polynomial(float(a))


def hinge(a: float, b: float) -> Hinge:
    """s(τ) = 1 for τ ≤ b, then 1 / (a(τ − b) + 1)."""
    return Hinge(float(a), float(b))


_FACTORIES: dict[str, Any] = {"constant": constant, "polynomial": polynomial, "hinge": hinge}


def make_staleness(name: str, params: Mapping[str, Any] | None = None) -> StalenessFn:
    """Build a staleness function from a config name and parameters.

    ``make_staleness("polynomial", {"a": 0.5})``; names: constant, polynomial, hinge.
    Raises ``ValueError`` for an unknown name or parameters the function does not take.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        known = ", ".join(sorted(_FACTORIES))
        raise ValueError(f"unknown staleness function {name!r} (known: {known})")
    try:
        fn: StalenessFn = factory(**dict(params or {}))
    except TypeError as exc:
        raise ValueError(f"bad parameters for staleness {name!r}: {exc}") from None
    return fn
