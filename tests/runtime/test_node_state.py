"""State a restarted node keeps: the model digest its signature guard starts from, a
gossip peer's model and mass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from algorithms.gossip import GossipPeer
from algorithms.protocol import Persist, Received
from algorithms.regional import RegionalAggregator
from runtime.config import parse_config
from runtime.daemon import load_node, model_floor, model_floor_digest, open_daemon
from runtime.demo import Federation, write_federation, write_roster
from transport.e2e import ModelConflictError, ModelVersionGuard, tensors_digest
from transport.identity import Identity
from transport.wire import GossipShare, ModelBroadcast


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
