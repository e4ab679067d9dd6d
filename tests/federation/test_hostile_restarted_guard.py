"""A restarted node's version guard against a hostile (or stale) parent: a region and a
site restored from their own snapshots get ``snapshot_guard``'s guard, and with it refuse
a genuinely root-signed older model (a rollback) and another model under the version they
held, while the next version still passes. Through the signing core's ``check_now``."""

from __future__ import annotations

import pytest

from fedloom.algorithms.protocol import Node, PeerUp, Received, Restorable
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.federation.signing import EndToEndCore, snapshot_guard
from fedloom.transport.errors import ProtocolError
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import Hello, ModelBroadcast, TrainRequest
from tests.algorithms.alg_helpers import model

ROOT = Identity.generate("root", "root")
REGION = Identity.generate("r", "region")
SITE = Identity.generate("s0", "site")
ROSTER = Roster(1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (ROOT, REGION, SITE)])
FP32 = CodecSpec()
TRAINING = TrainingConfig(lr=0.1, local_steps=1, batch_size=4, mu=0.0)
PARAMS = AlgorithmConfig(buffer_size=2, concurrency=3)


def make(role: str) -> Node:
    if role == "region":
        n = Neighbours(parent="root", parent_role="root", children={"s0": "site"})
        return build_node("region", "r", "fedbuff", PARAMS, TRAINING, n, seed=1)
    return build_node("site", "s0", "fedbuff", PARAMS, TRAINING, Neighbours(parent="r"), seed=1)


def held_at(role: str, version: int, root: EndToEndCore) -> Node:
    """The node after it was sent the root's models 1..version (signed, as delivered)."""
    node = make(role)
    parent = "root" if role == "region" else "r"
    node.handle(PeerUp(parent), 0.0)
    if role == "region":
        node.handle(Received("s0", Hello("s0", "site")), 0.0)
    for v in range(1, version + 1):
        w = model(float(v))
        msg = ModelBroadcast(v, w) if role == "region" else TrainRequest(v, v, w, {})
        node.handle(Received(parent, root.seal_now(msg, parent, FP32)), float(v))
    return node


def refusal(end: EndToEndCore, msg: object, peer: str) -> str:
    with pytest.raises(ProtocolError) as info:
        end.check_now(msg, peer)  # type: ignore[arg-type]
    return str(info.value.reason)


@pytest.mark.parametrize("role", ["region", "site"])
def test_a_restored_node_refuses_a_signed_rollback_and_a_conflicting_model(role: str) -> None:
    root = EndToEndCore(ROOT, ROSTER)
    before = held_at(role, 3, root)
    back = make(role)
    assert isinstance(before, Restorable) and isinstance(back, Restorable)
    back.restore(before.snapshot())
    guard = snapshot_guard(role, back.snapshot())
    assert guard is not None and guard.current == 3
    end = EndToEndCore(REGION if role == "region" else SITE, ROSTER)
    end.guard = guard
    peer = "root" if role == "region" else "r"

    def signed(version: int, value: float, signer: EndToEndCore = root) -> object:
        w = model(value)
        msg = ModelBroadcast(version, w) if role == "region" else TrainRequest(9, version, w, {})
        return signer.seal_now(msg, peer, FP32)

    assert refusal(end, signed(2, 2.0), peer) == "stale_model"  # the root's own, older
    other_root = EndToEndCore(ROOT, ROSTER)  # the root's key signing another model as v3
    assert refusal(end, signed(3, 99.0, other_root), peer) == "model_conflict"
    end.check_now(signed(3, 3.0), peer)  # type: ignore[arg-type]  # the one it held
    end.check_now(signed(4, 4.0), peer)  # type: ignore[arg-type]
    assert end.guard.current == 4
    assert end.rejected == {"stale_model": 1, "model_conflict": 1}
