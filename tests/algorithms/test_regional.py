from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Effect, ModelHolder, Node, PeerDown, PeerUp, Persist, Send
from fedloom.algorithms.regional import RegionalAggregator, RegionState
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.staleness import constant
from fedloom.transport.wire import Ack, Hello, ModelBroadcast, Update
from tests.algorithms.alg_helpers import (
    MiniNet,
    acks,
    hello,
    metrics,
    model,
    persists,
    recv,
    requests,
    sends,
    upd,
)

CHILDREN = {"s1": "site", "s2": "site", "s3": "site", "sub": "region"}


def make(**kw: object) -> RegionalAggregator:
    args: dict[str, object] = {"buffer_size": 2, "concurrency": 2, "clip_norm": None}
    args.update(kw)
    return RegionalAggregator("r1", "root", CHILDREN, **args)  # type: ignore[arg-type]


def forwards(out: list[Effect]) -> list[Update]:
    return [e.msg for e in sends(out, Update) if e.peer == "root" and isinstance(e.msg, Update)]


def test_protocols_and_no_model_dispatches_nothing() -> None:
    r = make()
    assert isinstance(r, Node) and isinstance(r, ModelHolder)
    for s in ("s1", "s2", "s3"):
        assert requests(r.handle(hello(s), 0.0)) == []
    assert r.state is RegionState.NO_MODEL and r.current_model() is None


def test_model_is_relayed_and_used_for_tasks() -> None:
    r = make()
    for s in ("s1", "s2"):
        r.handle(hello(s), 0.0)
    r.handle(hello("sub", "region"), 0.0)
    out = r.handle(recv("root", ModelBroadcast(7, model(1.0))), 1.0)
    [b] = sends(out, ModelBroadcast)
    assert b.peer == "sub" and b.msg.version == 7  # type: ignore[union-attr]
    reqs = requests(out)
    assert len(reqs) == 2 and all(req.version == 7 for _, req in reqs)
    assert r.state is RegionState.ACTIVE
    # an older broadcast is ignored, a newer one relayed
    assert sends(r.handle(recv("root", ModelBroadcast(6, model(0.0))), 1.0), ModelBroadcast) == []
    assert sends(r.handle(recv("root", ModelBroadcast(8, model(0.0))), 1.0), ModelBroadcast)
    # a region child saying Hello again in the same session gets nothing more; after a
    # reconnect (PeerDown first, as the runtime reports it) it gets the newest model
    assert sends(r.handle(hello("sub", "region"), 2.0), ModelBroadcast) == []
    r.handle(PeerDown("sub"), 2.0)
    [b] = sends(r.handle(hello("sub", "region"), 2.0), ModelBroadcast)
    assert b.msg.version == 8  # type: ignore[union-attr]


def test_the_model_version_gauge_follows_the_newest_global() -> None:
    r = make()
    versions = []
    for v in (7, 6, 9):
        out = r.handle(recv("root", ModelBroadcast(v, model())), 1.0)
        versions.append([m.value for m in metrics(out, "model_version")])
    assert versions == [[7.0], [], [9.0]]  # an older broadcast changes nothing


def test_the_roots_signature_travels_with_the_model_and_survives_a_restart() -> None:
    r = make()
    r.handle(hello("sub", "region"), 0.0)
    signed = ModelBroadcast(7, model(1.0), signer="root", parent=6, sig=b"s" * 64)
    out = r.handle(recv("root", signed), 1.0)
    [b] = sends(out, ModelBroadcast)
    assert (b.msg.signer, b.msg.parent, b.msg.sig) == ("root", 6, b"s" * 64)  # type: ignore[union-attr]
    [ckpt] = [p for p in persists(out) if p.key == "checkpoint"]
    again = make()
    again.restore(ckpt.data)
    reqs = requests(again.handle(hello("s1"), 2.0))
    assert [(q.version, q.signer, q.parent, q.sig) for _, q in reqs] == [(7, "root", 6, b"s" * 64)]


def test_forwards_one_aggregate_after_k_with_staleness_vs_latest_global() -> None:
    r = make(weighting="uniform")
    r.handle(recv("root", ModelBroadcast(3, model(0.0))), 0.0)
    out1 = r.handle(recv("s1", upd("s1", 1, base=3, value=2.0, n=5)), 1.0)
    assert forwards(out1) == [] and acks(out1) == [("s1", "s1", 1)]
    r.handle(recv("root", ModelBroadcast(5, model(0.0))), 1.5)
    out = r.handle(recv("sub", upd("sub", 1, base=3, value=4.0, n=20, count=3)), 2.0)  # tau = 2
    [f] = forwards(out)
    assert (f.src, f.seq, f.base_version, f.n_examples, f.count) == ("r1", 1, 5, 25, 4)
    expected = (1 * 2.0 + 3 * 4.0 / np.sqrt(3.0)) / 4
    np.testing.assert_allclose(f.delta["w"], expected, rtol=1e-6)
    # the forward is persisted before it is sent, and after the child's ack
    kinds = [
        ("persist", e.key) if isinstance(e, Persist) else ("send", type(e.msg).__name__)
        for e in out
        if isinstance(e, Persist | Send)
    ]
    assert kinds == [
        ("persist", "applied"),
        ("send", "Ack"),
        ("persist", "region/forwards"),  # what left the buffer, per child (chaos checker)
        ("persist", "region/pending"),
        ("send", "Update"),
    ]
    assert r.pending == 1


def test_resends_unacked_after_parent_reconnect_and_forgets_acked() -> None:
    r = make(buffer_size=1)
    r.handle(recv("root", ModelBroadcast(0, model(0.0))), 0.0)
    for i in (1, 2, 3):
        r.handle(recv("s1", upd("s1", i)), float(i))
    assert r.pending == 3
    out = r.handle(recv("root", Ack("r1", 2)), 4.0)
    assert persists(out, "region/pending")[0].data == {"op": "ack", "seq": 2}
    r.handle(PeerDown("root"), 5.0)
    out = r.handle(PeerUp("root"), 6.0)
    msgs = [e.msg for e in sends(out)]
    assert msgs[0] == Hello("r1", "region")
    assert [m.seq for m in msgs[1:]] == [1, 3]  # type: ignore[union-attr]


def test_updates_before_any_model_are_held_then_applied() -> None:
    r = make(buffer_size=1)
    out = r.handle(recv("s1", upd("s1", 1, base=0, value=1.0)), 0.0)
    assert metrics(out, "update_deferred") and not acks(out)
    out = r.handle(recv("root", ModelBroadcast(0, model(0.0))), 1.0)
    assert acks(out) == [("s1", "s1", 1)] and len(forwards(out)) == 1


def test_dedup_and_rejections_towards_children() -> None:
    r = make(buffer_size=5)
    r.handle(recv("root", ModelBroadcast(0, model(0.0))), 0.0)
    r.handle(recv("s1", upd("s1", 1)), 0.0)
    out = r.handle(recv("s1", upd("s1", 1)), 0.0)
    assert metrics(out, "update_duplicate") and acks(out)
    # Newer than anything this region knows: it lags its parent (the site came back from
    # a standby), so the update is held unacked until that model arrives, never rejected.
    out = r.handle(recv("s2", upd("s2", 1, base=1)), 0.0)
    assert metrics(out, "update_deferred") and not acks(out) and not metrics(out, "update_rejected")
    out = r.handle(recv("root", upd("root", 1)), 0.0)  # the parent is not a child
    assert metrics(out, "message_rejected") and not acks(out)
    out = r.handle(recv("x9", upd("x9", 1)), 0.0)  # nor is a stranger
    assert metrics(out, "update_rejected")[0].labels == {"reason": "unknown_sender"}
    out = r.handle(recv("root", ModelBroadcast(1, {"w": np.zeros(2, np.float32)})), 0.0)
    assert metrics(out, "message_rejected") and r.current_model()[0] == 0  # type: ignore[index]


def test_three_tier_tree_end_to_end() -> None:
    """root <- mid (region) <- low (region) <- sites; and a site directly under mid."""
    nodes: dict[str, Any] = {
        "root": FedBuffAggregator(
            "root",
            {"mid": "region"},
            model(0.0),
            buffer_size=1,
            concurrency=0,
            staleness=constant(),
        ),
        "mid": RegionalAggregator(
            "mid", "root", {"low": "region", "a": "site"}, buffer_size=2, concurrency=1
        ),
        "low": RegionalAggregator(
            "low", "mid", {"b": "site", "c": "site"}, buffer_size=2, concurrency=2
        ),
        "a": SiteNode("a", "mid"),
        "b": SiteNode("b", "low"),
        "c": SiteNode("c", "low"),
    }
    net = MiniNet(nodes)
    for child, parent in (
        ("mid", "root"),
        ("low", "mid"),
        ("a", "mid"),
        ("b", "low"),
        ("c", "low"),
    ):
        net.link(child, parent, up=True)
    net.drain()
    assert len(net.jobs) == 3  # every site got a task with the global model
    root, mid, low = nodes["root"], nodes["mid"], nodes["low"]
    for _ in range(4):
        net.finish_jobs(bump=1.0)
        net.drain()
    assert root.version >= 2
    assert all(n.pending == 0 for k, n in nodes.items() if k != "root")
    assert (
        len(metrics([e for n, e in net.effects if n == "root"], "update_applied")) == root.version
    )
    # conservation: every site update is counted once, at the root or still in a buffer
    site_updates = sum(
        1
        for n, e in net.effects
        if n in ("a", "b", "c") and isinstance(e, Send) and isinstance(e.msg, Update)
    )
    at_root = {
        e.msg.seq: e.msg.count
        for n, e in net.effects
        if n == "mid" and isinstance(e, Send) and isinstance(e.msg, Update)
    }
    assert site_updates == sum(at_root.values()) + mid._buffer.count + low._buffer.count
    assert mid.current_model() is not None and mid.current_model()[0] == root.version


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        RegionalAggregator("r", "r", {}, buffer_size=1, concurrency=1)
    with pytest.raises(ValueError):
        RegionalAggregator("r", "p", {"p": "site"}, buffer_size=1, concurrency=1)


def test_a_checkpoint_keeps_the_counts_it_was_taken_with() -> None:
    """Checkpoints share the per-child counts they were taken with (copy on write): later
    updates and flushes change the node's counts, never an earlier checkpoint's."""
    r = make(buffer_size=2)
    r.handle(recv("root", ModelBroadcast(0, model(0.0))), 0.0)
    r.handle(recv("s1", upd("s1", 1)), 1.0)
    r.handle(recv("s1", upd("s1", 2)), 2.0)  # a full buffer: flushed, forwarded
    before = r.snapshot()
    assert before["outcomes"] == {"s1": {"applied": 2}}
    assert before["flushed"] == {"s1": {"forwarded": 2}}
    for seq in (3, 4):
        r.handle(recv("s1", upd("s1", seq)), float(seq))
    r.handle(recv("s2", upd("s2", 1)), 5.0)
    assert before["outcomes"] == {"s1": {"applied": 2}}
    assert before["flushed"] == {"s1": {"forwarded": 2}}
    after = r.snapshot()
    assert after["outcomes"] == {"s1": {"applied": 4}, "s2": {"applied": 1}}
    assert after["flushed"] == {"s1": {"forwarded": 4}}
    restored = make(buffer_size=2)
    restored.restore(before)
    assert restored.snapshot()["outcomes"] == before["outcomes"]
