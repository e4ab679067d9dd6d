"""The chaos checker's exactly_once verdict and site updates a root took outside its pair
ledger (``far_pairs``: numbered more than ``PAIR_AHEAD`` past it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import tests.algorithms.test_failover as tf
from fedloom.algorithms.incorporation import PAIR_AHEAD
from fedloom.algorithms.protocol import Persist
from fedloom.runtime.chaos.checker import NodeState, RunData, check_exactly_once
from tests.algorithms.alg_helpers import metrics, recv


def test_a_far_site_update_applied_twice_is_refuted() -> None:
    """A region and its standby each deliver the same site update, numbered far ahead of
    the root's pair ledger: the root applies it twice (no Overlap can name it), and its
    records say so only in ``far_pairs``."""
    root = tf.fresh_root()
    records: list[dict[str, Any]] = []
    for region in ("r0", "r0b"):
        fwd = dataclasses.replace(tf.forward(1, (("s1", 10 * PAIR_AHEAD),), count=1), src=region)
        out = root.handle(recv(region, fwd), 1.0)
        assert metrics(out, "update_applied")
        records += [dict(e.data) for e in out if isinstance(e, Persist) and e.append]
    assert [r["far_pairs"] for r in records] == [[["s1", 10 * PAIR_AHEAD]]] * 2
    data = RunData(Path("."), {"nodes": {}}, [], [], [])
    verdict = check_exactly_once(data, {"root": NodeState("root", applied=records)})
    assert not verdict.passed and "applied twice" in verdict.detail
    assert verdict.data["applied_twice"]["root"] == [["pair", "s1", 10 * PAIR_AHEAD]]
