"""Token buckets per key: what a peer may send at once (``burst``) and then per second.

The receiver's bound on how fast a neighbour may make it do work (relayed refusals,
relayed reports): a key spends one token per message and earns ``per_s`` a second, up
to ``burst``. Memory: one entry per key the caller lets in, so callers key only by
neighbours they know (a child, or a (child, site) pair). Pure: the caller passes ``now``.
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["TokenBuckets"]


class TokenBuckets:
    """``burst`` messages at once per key, then ``per_s`` a second."""

    __slots__ = ("_tokens", "burst", "per_s")

    def __init__(self, burst: float, per_s: float) -> None:
        if burst < 1.0 or per_s < 0.0:
            raise ValueError(f"need burst >= 1 and per_s >= 0, got {burst}, {per_s}")
        self.burst = float(burst)
        self.per_s = float(per_s)
        self._tokens: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: Hashable, now: float) -> bool:
        """Spend one of ``key``'s tokens now; False (nothing spent) when it has none."""
        tokens, at = self._tokens.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.per_s)
        if tokens < 1.0:
            self._tokens[key] = (tokens, now)
            return False
        self._tokens[key] = (tokens - 1.0, now)
        return True
