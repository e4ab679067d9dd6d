"""Checks on an ``Update`` from a peer before anything is done with it.

Each check returns a short reason string (used as the ``update_rejected`` metric label) or
None. Nothing here raises on malformed input: peers are not trusted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedloom.algorithms.protocol import Weights
from fedloom.algorithms.weights_math import check_delta, checked_norm
from fedloom.transport.wire import Update

__all__ = ["check_update", "check_update_norm", "is_int"]


def is_int(x: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    t = type(x)
    if t is int:  # the common case, checked first: this runs several times per update
        return True
    return t is not bool and isinstance(x, int | np.integer)


def check_update(msg: Update, version: int, reference: Weights) -> str | None:
    """Why ``msg`` cannot be aggregated into a model at ``version`` shaped like ``reference``.

    ``seq`` and the sender are checked by the caller (they decide dedup and who gets an ack).
    """
    return _check_fields(msg, version) or check_delta(reference, msg.delta)


def check_update_norm(msg: Update, version: int, reference: Weights) -> tuple[str | None, float]:
    """``check_update``'s reason and the delta's L2 norm, measured in the same pass over the
    data (``weights_math.checked_norm``; inf when refused, or when the norm overflows)."""
    reason = _check_fields(msg, version)
    if reason is not None:
        return reason, math.inf
    return checked_norm(reference, msg.delta)


def _check_fields(msg: Update, version: int) -> str | None:
    base, n, count = msg.base_version, msg.n_examples, msg.count
    if type(base) is int and type(n) is int and type(count) is int:
        # The common case, without is_int's calls: the same checks, in the same order.
        if base < 0:
            return "bad_base_version"
        if base > version:
            return "future_version"
        if n < 0:
            return "bad_n_examples"
        if count < 1:
            return "bad_count"
        return None
    if not is_int(msg.base_version) or msg.base_version < 0:
        return "bad_base_version"
    if msg.base_version > version:
        return "future_version"
    if not is_int(msg.n_examples) or msg.n_examples < 0:
        return "bad_n_examples"
    if not is_int(msg.count) or msg.count < 1:
        return "bad_count"
    return None
