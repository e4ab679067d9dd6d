"""Small helpers shared by the node state machines."""

from __future__ import annotations

import numpy as np

from fedloom.algorithms.protocol import Effect, Log, Metric
from fedloom.algorithms.warn_limit import WarnLimiter
from fedloom.transport.wire import Message

__all__ = ["as_generator", "unexpected"]


def unexpected(
    peer: str,
    msg: Message,
    reason: str,
    warn: WarnLimiter | None = None,
    now: float = 0.0,
) -> list[Effect]:
    """Effects for a message a node will not act on (peer input: reported, never raised).

    Each one is counted (metric ``message_rejected``); with ``warn`` (the node's
    ``WarnLimiter``) only one line per peer and reason is logged per interval, carrying how
    many went unlogged before it: an ignored message costs the node nothing else, so a
    stream of them must not become a stream of log lines."""
    metric = Metric("message_rejected", 1.0, {"reason": reason})
    fields: dict[str, object] = {"peer": peer, "type": type(msg).__name__, "reason": reason}
    if warn is not None:
        unlogged = warn.due(peer, reason, now)
        if unlogged is None:
            return [metric]
        fields["unlogged_before"] = unlogged
    return [metric, Log("warning", "ignored message", fields)]


def as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    """A node's private generator: given, or seeded from an int (never global randomness)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return np.random.default_rng(rng)
    raise ValueError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")
