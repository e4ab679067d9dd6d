"""Small helpers shared by the node state machines."""

from __future__ import annotations

import numpy as np

from fedloom.algorithms.protocol import Effect, Log, Metric
from fedloom.transport.wire import Message

__all__ = ["as_generator", "unexpected"]


def unexpected(peer: str, msg: Message, reason: str) -> list[Effect]:
    """Effects for a message a node will not act on (peer input: reported, never raised)."""
    return [
        Metric("message_rejected", 1.0, {"reason": reason}),
        Log(
            "warning",
            "ignored message",
            {"peer": peer, "type": type(msg).__name__, "reason": reason},
        ),
    ]


def as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    """A node's private generator: given, or seeded from an int (never global randomness)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return np.random.default_rng(rng)
    raise ValueError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")
