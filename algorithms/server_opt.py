"""Server optimisers for federated aggregation (FedOpt, Reddi et al., ICLR 2021, Alg. 2).

The aggregated client delta Δ̄ (trained − base, averaged) is treated as a *negative*
pseudo-gradient: g = −Δ̄. ``ServerSGD(lr=1, momentum=0)`` then reduces to plain FedAvg
(w ← w + Δ̄); momentum gives FedAvgM; ``ServerAdam`` is FedAdam.

Optimiser state (momentum buffers) is owned by the optimiser and can be snapshotted for
checkpoints. ``step`` never writes into the weights or the delta it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from fedloom.algorithms.protocol import Weights

__all__ = ["ServerAdam", "ServerOptimizer", "ServerSGD", "make_server_opt"]


class ServerOptimizer(Protocol):
    """w_{t+1} = step(w_t, Δ̄_t)."""

    def step(self, weights: Weights, delta: Weights) -> Weights:
        """Return new weights after applying the aggregated delta ``delta``."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """Optimiser state as plain data (copied arrays)."""
        ...

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a state produced by ``snapshot``."""
        ...


def _copy_state(state: Weights | None) -> Weights | None:
    return None if state is None else {k: v.copy() for k, v in state.items()}


class ServerSGD:
    """SGD with (heavy-ball) momentum on the pseudo-gradient −Δ̄.

    m ← momentum · m + g;  w ← w − lr · m,  with g = −Δ̄.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        if not lr > 0.0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self._m: Weights | None = None

    def step(self, weights: Weights, delta: Weights) -> Weights:
        if self.momentum == 0.0:
            return {
                k: (w + self.lr * delta[k]).astype(w.dtype, copy=False) for k, w in weights.items()
            }
        if self._m is None:
            self._m = {k: np.zeros(w.shape, dtype=np.float64) for k, w in weights.items()}
        out: Weights = {}
        for k, w in weights.items():
            m = self._m[k]
            m *= self.momentum
            m -= delta[k]  # + g, with g = −Δ̄
            out[k] = (w - self.lr * m).astype(w.dtype, copy=False)
        return out

    def snapshot(self) -> dict[str, Any]:
        return {"kind": "sgd", "lr": self.lr, "momentum": self.momentum, "m": _copy_state(self._m)}

    def restore(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "sgd":
            raise ValueError(f"not an SGD optimiser state: {state.get('kind')!r}")
        self.lr = float(state["lr"])
        self.momentum = float(state["momentum"])
        self._m = _copy_state(state["m"])


class ServerAdam:
    """FedAdam (Reddi et al. 2021, Alg. 2) on the pseudo-gradient g = −Δ̄.

    m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  w ← w − lr · m / (√v + ε).
    As in the paper there is no bias correction by default (``bias_correction=True`` adds
    Kingma & Ba's). The paper's ε (its "adaptivity" τ) is often 1e-3; 1e-8 is the default here.
    """

    def __init__(
        self,
        lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        eps: float = 1e-8,
        *,
        bias_correction: bool = False,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"Adam betas must be in [0, 1), got {beta1}, {beta2}")
        if not eps > 0.0:
            raise ValueError(f"Adam eps must be > 0, got {eps}")
        self.lr = float(lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.bias_correction = bias_correction
        self._m: Weights | None = None
        self._v: Weights | None = None
        self._t = 0

    def step(self, weights: Weights, delta: Weights) -> Weights:
        if self._m is None or self._v is None:
            self._m = {k: np.zeros(w.shape, dtype=np.float64) for k, w in weights.items()}
            self._v = {k: np.zeros(w.shape, dtype=np.float64) for k, w in weights.items()}
        self._t += 1
        c1 = 1.0 - self.beta1**self._t if self.bias_correction else 1.0
        c2 = 1.0 - self.beta2**self._t if self.bias_correction else 1.0
        out: Weights = {}
        for k, w in weights.items():
            g = -np.asarray(delta[k], dtype=np.float64)
            m, v = self._m[k], self._v[k]
            m *= self.beta1
            m += (1.0 - self.beta1) * g
            v *= self.beta2
            v += (1.0 - self.beta2) * (g * g)
            upd = (m / c1) / (np.sqrt(v / c2) + self.eps)
            out[k] = (w - self.lr * upd).astype(w.dtype, copy=False)
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "kind": "adam",
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "bias_correction": self.bias_correction,
            "t": self._t,
            "m": _copy_state(self._m),
            "v": _copy_state(self._v),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "adam":
            raise ValueError(f"not an Adam optimiser state: {state.get('kind')!r}")
        self.lr = float(state["lr"])
        self.beta1 = float(state["beta1"])
        self.beta2 = float(state["beta2"])
        self.eps = float(state["eps"])
        self.bias_correction = bool(state["bias_correction"])
        self._t = int(state["t"])
        self._m = _copy_state(state["m"])
        self._v = _copy_state(state["v"])


def make_server_opt(name: str, params: Mapping[str, Any] | None = None) -> ServerOptimizer:
    """Build a server optimiser from a config name ("sgd" or "adam") and its parameters."""
    kwargs = dict(params or {})
    try:
        if name == "sgd":
            return ServerSGD(**kwargs)
        if name == "adam":
            return ServerAdam(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad parameters for server optimiser {name!r}: {exc}") from None
    raise ValueError(f"unknown server optimiser {name!r} (known: adam, sgd)")
