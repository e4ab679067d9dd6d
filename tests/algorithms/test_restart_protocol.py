"""One restore protocol for every durable node: ``restore(checkpoint | None, records)``,
each node asking the record source for the log keys it owns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.aggregator_base import APPLIED_KEY
from fedloom.algorithms.dp.release import PRIVACY_LOG_KEY
from fedloom.algorithms.gossip import GOSSIP_IN_KEY
from fedloom.algorithms.incorporation import FORWARDS_KEY, HELD_KEY
from fedloom.algorithms.protocol import (
    LogRecords,
    Node,
    Persist,
    Restorable,
    Train,
    TrainDone,
    TrainResult,
)
from fedloom.algorithms.regional import PENDING_KEY as REGION_PENDING
from fedloom.algorithms.site import PENDING_KEY as SITE_PENDING
from fedloom.federation.factory import Neighbours, NodeOptions, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.transport.wire import Ack, TrainRequest
from tests.algorithms.alg_helpers import model, recv

TRAINING = TrainingConfig(lr=0.1, local_steps=1, batch_size=4, mu=0.0)
SITES = {f"s{i}": "site" for i in range(3)}
PARAMS = AlgorithmConfig(buffer_size=2, concurrency=3, clients_per_round=3)


class Asked:
    """A record source that remembers which logs were asked for (and has none)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def records(self, key: str) -> Sequence[Mapping[str, Any]]:
        self.keys.add(key)
        return []


def make(kind: str) -> Node:
    w = model(0.0)
    if kind == "site":
        return build_node("site", "s0", "fedbuff", PARAMS, TRAINING, Neighbours(parent="r"), seed=1)
    if kind == "site+fallback":
        n = Neighbours(parent="r", fallbacks=("r-b",))
        return build_node("site", "s0", "fedbuff", PARAMS, TRAINING, n, seed=1)
    if kind == "region":
        n = Neighbours(parent="root", parent_role="root", children=SITES)
        return build_node("region", "r", "fedbuff", PARAMS, TRAINING, n, seed=1)
    if kind == "peer":
        n = Neighbours(mixing={"b": 0.5}, self_weight=0.5, n_peers=2)
        p = AlgorithmConfig(gossip_mode="pushsum")
        return build_node("peer", "a", "gossip", p, TRAINING, n, seed=1, weights=w)
    return build_node(
        "root", "root", kind, PARAMS, TRAINING, Neighbours(children=SITES), seed=1, weights=w
    )


OWN_KEYS = {
    "site": {SITE_PENDING, HELD_KEY},
    "site+fallback": {SITE_PENDING, HELD_KEY},
    "region": {APPLIED_KEY, REGION_PENDING, FORWARDS_KEY},
    # A FedBuff/FedAvg root reads its privacy log even without [privacy]: a root that
    # released privately must not restart without it (``restore_privacy``).
    "fedbuff": {APPLIED_KEY, PRIVACY_LOG_KEY},
    "fedasync": {APPLIED_KEY},
    "fedavg": {APPLIED_KEY, PRIVACY_LOG_KEY},
    "peer": {GOSSIP_IN_KEY},
}


@pytest.mark.parametrize("kind", sorted(OWN_KEYS))
def test_every_durable_node_restores_the_same_way_from_its_own_logs(kind: str) -> None:
    node = make(kind)
    assert isinstance(node, Restorable)
    asked = Asked()
    node.restore(None, asked)  # no checkpoint yet: the fresh node's own state
    assert asked.keys <= OWN_KEYS[kind] and asked.keys & OWN_KEYS[kind]
    back = make(kind)
    back.restore(node.snapshot(), Asked())
    assert _same(back.snapshot(), node.snapshot())


def test_a_relay_keeps_nothing_to_restore() -> None:
    relay = build_node("relay", "hub", "fedbuff", PARAMS, TRAINING, Neighbours(), seed=1)
    assert not isinstance(relay, Restorable)


def test_a_site_with_no_checkpoint_comes_back_from_its_log_alone() -> None:
    """``restore(None, records)``: what a store that never saw a checkpoint recovers."""
    site = make("site")
    log: list[Persist] = []
    for task in (1, 2, 3):
        out = site.handle(recv("r", TrainRequest(task, 0, model(0.0), {})), float(task))
        [job] = [e.job for e in out if isinstance(e, Train)]
        out = site.handle(TrainDone(job, TrainResult(model(0.1 * task), 5)), float(task))
        log += [e for e in out if isinstance(e, Persist)]
    log += [e for e in site.handle(recv("r", Ack("s0", 1)), 9.0) if isinstance(e, Persist)]
    assert all(p.append and p.key == SITE_PENDING for p in log)
    back = make("site")
    back.restore(None, LogRecords({SITE_PENDING: [p.data for p in log]}))
    assert back.seq == site.seq == 3  # type: ignore[attr-defined]
    assert back.pending == site.pending == 2  # type: ignore[attr-defined]


def test_state_of_another_kind_is_refused() -> None:
    root = make("fedbuff")
    with pytest.raises(ValueError, match="not a FedBuff snapshot"):
        root.restore(make("fedasync").snapshot())  # type: ignore[attr-defined]
    peer = make("peer")
    with pytest.raises(ValueError, match="not a gossip snapshot"):
        peer.restore(make("region").snapshot())  # type: ignore[attr-defined]


def test_a_root_restored_from_nothing_holds_its_initial_model() -> None:
    """A non-durable root (the simulator's default) restores the same way: with no
    checkpoint and no records it is the node it was built as."""
    n = Neighbours(children=SITES)
    w = model(0.0)
    fresh = build_node(
        "root", "root", "fedbuff", PARAMS, TRAINING, n, seed=1, weights=w,
        options=NodeOptions(durable=False),
    )  # fmt: skip
    assert isinstance(fresh, Restorable)
    fresh.restore(None)
    np.testing.assert_array_equal(fresh.current_model()[1]["w"], w["w"])  # type: ignore[attr-defined]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return bool(np.array_equal(a, b))
    return bool(a == b)
