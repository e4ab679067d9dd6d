"""A hostile site inside a running federation: inflated counts, overflowing deltas, floods.

The root and the honest sites are the real nodes under a driver; the hostile site is a real
``SiteNode`` whose outgoing updates are rewritten on the way out (as a modified client
would): every answer claims ``count = 10**15`` or carries a delta near float32's maximum,
and is followed by a burst of copies under fresh sequence numbers. The federation must
keep training a finite model, and the hostile site must get at most one slot per flush.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Effect, Event, Metric, Persist, Send
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.weights_math import is_finite
from fedloom.transport.wire import Update
from tests.conformance.harness import Federation, metrics, version_of
from tests.conformance.toy_nodes import NoisyTrainer

HONEST = ["site-00", "site-01", "site-02"]
EVIL = "evil"
NEAR_MAX = float(np.finfo(np.float32).max) * 0.9
BURST = 20  # unasked copies after each answer, numbered from 10_001 up


class HostileSite:
    """A ``SiteNode`` whose every update is rewritten and followed by fresh-seq copies."""

    def __init__(self, inner: SiteNode, mode: str) -> None:
        self.inner = inner
        self.mode = mode
        self.fresh = 10_000

    @property
    def node_id(self) -> str:
        return self.inner.node_id

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def handle(self, event: Event, now: float) -> list[Effect]:
        out: list[Effect] = []
        for e in self.inner.handle(event, now):
            if not (isinstance(e, Send) and isinstance(e.msg, Update)):
                out.append(e)
                continue
            u = e.msg
            if self.mode == "count":
                u = dataclasses.replace(u, count=10**15, n_examples=10**15)
            else:
                u = dataclasses.replace(
                    u, delta={k: np.full(v.shape, NEAR_MAX, v.dtype) for k, v in u.delta.items()}
                )
            out.append(Send(e.peer, u))
            for _ in range(BURST):  # unsolicited copies with sequence numbers never used
                self.fresh += 1
                out.append(Send(e.peer, dataclasses.replace(u, seq=self.fresh, task=-1)))
        return out


def model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((4, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


@pytest.mark.parametrize("mode", ["count", "overflow"])
def test_hostile_site_neither_takes_over_nor_stalls_the_federation(
    federation: Federation, mode: str
) -> None:
    children = {s: "site" for s in [*HONEST, EVIL]}
    root = FedBuffAggregator(
        "root", children, model(), buffer_size=3, concurrency=4, task_timeout_s=30.0, rng=0
    )
    nodes: dict[str, Any] = {"root": root}
    nodes.update({s: SiteNode(s, "root", n_examples=10) for s in HONEST})
    nodes[EVIL] = HostileSite(SiteNode(EVIL, "root", n_examples=10), mode)
    roles = {"root": "root", **dict.fromkeys(children, "site")}
    federation.start(nodes, roles, [("root", s) for s in children], trainer=NoisyTrainer())

    assert federation.run_until(lambda: version_of(federation, "root") >= 15, timeout_s=600)
    _, weights = root.current_model()
    assert is_finite(weights)
    # Honest sites push every weight up by ~0.1 per update: the model follows them, and
    # nothing of float32-max size got in.
    assert 0.1 < float(np.mean(weights["w"])) < 50.0
    assert float(np.abs(weights["w"]).max()) < 100.0

    # At most one unasked hostile update in each flushed buffer (its task answers are
    # bounded by the tasks the root chose to give it, as for any site).
    per_flush = [0]
    written = 0
    for _, node, e in federation.journal.effects:
        if node != "root":
            continue
        labels = (e.labels or {}) if isinstance(e, Metric) else {}
        if isinstance(e, Metric) and e.name == "update_applied" and labels["src"] == EVIL:
            per_flush[-1] += int(labels["seq"]) > 10_000
        elif isinstance(e, Metric) and e.name == "model_version":
            per_flush.append(0)
        elif isinstance(e, Persist) and e.key == "applied" and e.data["src"] == EVIL:
            written += 1
    assert max(per_flush) <= 1, per_flush
    # The burst cost no durable write beyond one decided update per flush and per task.
    assert written <= 2 * (root.version + 1)
    assert len(metrics(federation, "update_dropped")) > 0
    if mode == "count":
        rejected = metrics(federation, "update_rejected")
        assert rejected and all(m.labels["reason"] == "bad_count" for m in rejected)
    assert federation.journal.checker.updates_duplicated == 0
