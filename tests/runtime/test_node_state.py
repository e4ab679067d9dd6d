"""State a restarted node keeps: the model digest its signature guard starts from, a
gossip peer's model and mass, a sync root's open round (through the daemon's restore)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedloom.algorithms.gossip import GossipPeer
from fedloom.algorithms.protocol import Persist, Received, Send
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.sync import RoundState, SyncAggregator
from fedloom.federation.factory import build_root
from fedloom.federation.params import AlgorithmConfig
from fedloom.federation.store import StateStore
from fedloom.runtime.config import parse_config
from fedloom.runtime.daemon import (
    load_node,
    model_floor,
    model_floor_digest,
    open_daemon,
    restore_node,
)
from fedloom.runtime.federation_files import Federation, write_federation, write_roster
from fedloom.transport.e2e import ModelConflictError, ModelVersionGuard, tensors_digest
from fedloom.transport.identity import Identity
from fedloom.transport.wire import GossipShare, Hello, ModelBroadcast, TrainRequest, Update


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return write_federation(
        tmp_path / "fed",
        {"region-a": ["site-1", "site-2"]},
        plan={"dataset": "synthetic", "model": "softmax"},
    )


def weights(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 3), value, np.float32)}


def test_a_restarted_region_notices_a_second_model_under_the_version_it_held() -> None:
    region = RegionalAggregator("r1", "root", {"s1": "site"}, buffer_size=1, concurrency=1)
    region.handle(Received("root", ModelBroadcast(5, weights(1.0))), 0.0)
    back = RegionalAggregator("r1", "root", {"s1": "site"}, buffer_size=1, concurrency=1)
    back.restore(region.snapshot())
    floor = model_floor(back)
    assert floor == 5
    guard = ModelVersionGuard(floor, model_floor_digest(back, floor))
    guard.check(5, tensors_digest(weights(1.0)))  # the same model again: fine
    with pytest.raises(ModelConflictError, match="different model under version 5"):
        guard.check(5, tensors_digest(weights(2.0)))


def test_a_gossip_daemon_restores_its_peer_from_the_state_directory(
    fed: Federation, tmp_path: Path
) -> None:
    cfg = fed.config("site-1")
    cfg.pop("parent")
    peer_ids = [Identity.generate(n, "peer") for n in ("p-1", "p-2", "p-3")]
    consortium = Identity.generate("consortium", "consortium")
    write_roster(tmp_path / "peers.toml", peer_ids, consortium)
    peer_ids[0].save(tmp_path / "keys")
    (tmp_path / "c.pub").write_text(consortium.public_line())
    cfg.update(
        role="peer",
        node_id="p-1",
        peers=[{"id": "p-2"}, {"id": "p-3", "url": "ws://127.0.0.1:9/x"}],
        identity={"key": str(tmp_path / "keys" / "p-1.key")},
        roster={
            "path": str(tmp_path / "peers.toml"),
            "consortium_key_file": str(tmp_path / "c.pub"),
        },
        listen={"port": 0},
        state_dir=str(tmp_path / "state"),
        aggregation={"algorithm": "gossip", "gossip_mode": "pushsum"},
    )
    parsed = parse_config(cfg, check_files=True)
    d = open_daemon(parsed)
    try:
        node = d.node
        assert isinstance(node, GossipPeer) and node.durable
        _, model = node.current_model()
        share = GossipShare("p-2", 1, {k: v * 0.5 for k, v in model.items()}, 0.5)
        effects = node.handle(Received("p-2", share), 0.0)
        d.store.apply_many([e for e in effects if isinstance(e, Persist)])
        w, x = node.mass()
    finally:
        d.close()
    back = load_node(parsed)  # what a restart recovers
    assert isinstance(back, GossipPeer)
    assert back.mass()[0] == w == 1.5
    for k in x:
        np.testing.assert_allclose(back.mass()[1][k], x[k], rtol=0, atol=1e-6)


def test_a_sync_root_restored_by_the_daemon_keeps_its_open_round(tmp_path: Path) -> None:
    """The daemon's sync root (``build_root``) through a real store and ``restore_node``."""
    sites = {f"s{i}": "site" for i in range(1, 4)}
    p = AlgorithmConfig(clients_per_round=3, over_selection=1.0, round_timeout_s=60.0)

    def make() -> SyncAggregator:
        node = build_root(
            "fedavg", "root", sites, weights(0.0), p, buffer_size=1, concurrency=3,
            train_config={}, rng=np.random.default_rng(0),
        )  # fmt: skip
        assert isinstance(node, SyncAggregator)
        return node

    live = make()
    by_site: dict[str, TrainRequest] = {}
    with StateStore(tmp_path / "root") as store:
        store.load()
        for s in sites:
            out = live.handle(Received(s, Hello(s, "site")), 0.0)
            store.apply_many([e for e in out if isinstance(e, Persist)])
            for e in out:
                if isinstance(e, Send) and isinstance(e.msg, TrainRequest):
                    by_site[e.peer] = e.msg
        answered = sorted(by_site)[:2]
        for s in answered:
            req = by_site[s]
            u = Update(
                s, 1, req.version, {"w": np.full((4, 3), 0.1, np.float32)}, 10, task=req.task
            )
            out = live.handle(Received(s, u), 1.0)
            store.apply_many([e for e in out if isinstance(e, Persist)])
    with StateStore(tmp_path / "root") as store:
        back = make()
        restore_node(back, store.load())
    assert back.state is RoundState.COLLECTING and back.round == 1 and back.applied == 0
    for s in sites:
        back.handle(Received(s, Hello(s, "site")), 5.0)
    last = sorted(by_site)[2]
    req = by_site[last]
    u = Update(last, 1, req.version, {"w": np.full((4, 3), 0.4, np.float32)}, 10, task=req.task)
    back.handle(Received(last, u), 6.0)
    assert back.version == 1 and back.rounds_closed == 1
    np.testing.assert_allclose(back.current_model()[1]["w"], 0.2, rtol=1e-6)  # (.1+.1+.4)/3
