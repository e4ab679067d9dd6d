"""The chaos checker's exactly_once verdict and site updates a root took outside its pair
ledger (``far_pairs``: numbered more than ``PAIR_AHEAD`` past it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tests.algorithms.test_failover as tf
from fedloom.algorithms.incorporation import PAIR_AHEAD
from fedloom.algorithms.protocol import Persist
from fedloom.runtime.chaos.checker import NodeState, RunData, check_exactly_once
from fedloom.transport.wire import Overlap
from tests.algorithms.alg_helpers import metrics, recv, sends


def test_a_far_site_update_applied_twice_is_refuted() -> None:
    """A region and its standby each deliver the same site update, numbered far ahead of
    the root's pair ledger. The root names the second delivery taken (its far pairs are
    kept apart from the watermark); a root that applied it twice anyway (say one older
    than the far pairs it keeps) says so only in ``far_pairs``, and the checker sees it."""
    root = tf.fresh_root()
    far = ("s1", 10 * PAIR_AHEAD)
    out = root.handle(recv("r0", tf.forward(1, (far,), count=1)), 1.0)
    assert metrics(out, "update_applied")
    [first] = [dict(e.data) for e in out if isinstance(e, Persist) and e.append]
    assert first["far_pairs"] == [list(far)]
    again = dataclasses.replace(tf.forward(1, (far,), count=1), src="r0b")
    out = root.handle(recv("r0b", again), 1.0)
    assert sends(out, Overlap) and not metrics(out, "update_applied")
    second = {**first, "n": first["n"] + 1, "src": "r0b"}  # what applying it again writes
    data = RunData(Path("."), {"nodes": {}}, [], [], [])
    verdict = check_exactly_once(data, {"root": NodeState("root", applied=[first, second])})
    assert not verdict.passed and "applied twice" in verdict.detail
    assert verdict.data["applied_twice"]["root"] == [["pair", *far]]
