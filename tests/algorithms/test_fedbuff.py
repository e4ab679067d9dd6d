import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Deadline, Metric, Node, PeerDown, Persist, Send
from fedloom.algorithms.server_opt import ServerSGD
from fedloom.algorithms.staleness import constant
from fedloom.transport.wire import Ack, ModelBroadcast, TrainRequest, Update
from tests.algorithms.alg_helpers import (
    acks,
    hello,
    labels,
    metrics,
    model,
    persists,
    recv,
    requests,
    sends,
    upd,
)

SITES = {f"s{i}": "site" for i in range(1, 7)}


def make(**kw: object) -> FedBuffAggregator:
    args: dict[str, object] = {"buffer_size": 2, "concurrency": 2, "clip_norm": None}
    args.update(kw)
    children = args.pop("children", SITES)
    return FedBuffAggregator("root", children, model(0.0), **args)  # type: ignore[arg-type]


def up_all(agg: FedBuffAggregator, sites: object = SITES) -> None:
    for s in sites:  # type: ignore[attr-defined]
        agg.handle(hello(s), 0.0)


def test_is_a_node_and_model_holder() -> None:
    agg = make()
    assert isinstance(agg, Node)
    assert agg.current_model()[0] == 0


def test_applies_average_after_k_updates() -> None:
    agg = make()
    out = agg.handle(recv("s1", upd("s1", 1, value=1.0)), 1.0)
    assert agg.version == 0
    assert [m.value for m in metrics(out, "buffer_fill")] == [1.0]
    out = agg.handle(recv("s2", upd("s2", 1, value=3.0)), 2.0)
    assert agg.version == 1
    assert [m.value for m in metrics(out, "model_version")] == [1.0]
    np.testing.assert_allclose(agg.current_model()[1]["w"], 2.0)
    assert agg.current_model()[1]["w"].dtype == np.float32


def test_staleness_discounts_and_normalises_by_raw_weights() -> None:
    agg = make()
    agg.handle(recv("s1", upd("s1", 1, value=0.0)), 0.0)
    agg.handle(recv("s2", upd("s2", 1, value=0.0)), 0.0)
    assert agg.version == 1
    out = agg.handle(recv("s3", upd("s3", 1, base=0, value=2.0)), 1.0)  # tau = 1
    [applied] = metrics(out, "update_applied")
    assert applied.value == 1.0
    assert labels(applied) == {"src": "s3", "seq": "1"}
    agg.handle(recv("s4", upd("s4", 1, base=1, value=4.0)), 1.0)  # tau = 0
    expected = (2.0 / np.sqrt(2.0) + 4.0) / 2.0
    np.testing.assert_allclose(agg.current_model()[1]["b"], expected, rtol=1e-6)


def test_update_beyond_max_staleness_is_dropped_but_acked() -> None:
    agg = make(max_staleness=0)
    agg.handle(recv("s1", upd("s1", 1)), 0.0)
    agg.handle(recv("s2", upd("s2", 1)), 0.0)
    out = agg.handle(recv("s3", upd("s3", 1, base=0, value=100.0)), 1.0)
    assert [m.value for m in metrics(out, "update_stale")] == [1.0]
    assert acks(out) == [("s3", "s3", 1)]
    assert [p.data["outcome"] for p in persists(out, "applied")] == ["stale"]
    assert agg.buffer_fill == 0 and agg.stale == 1
    out = agg.handle(recv("s3", upd("s3", 1, base=0, value=100.0)), 2.0)
    assert metrics(out, "update_duplicate") and not persists(out)


def test_duplicate_is_reacked_never_reapplied() -> None:
    agg = make(buffer_size=3)
    agg.handle(recv("s1", upd("s1", 1)), 0.0)
    out = agg.handle(recv("s1", upd("s1", 1)), 1.0)
    [dup] = metrics(out, "update_duplicate")
    assert labels(dup) == {"src": "s1", "seq": "1"}
    assert acks(out) == [("s1", "s1", 1)]
    assert not persists(out) and not metrics(out, "update_applied")
    assert agg.buffer_fill == 1 and agg.duplicates == 1


def test_metric_then_persist_then_ack_for_every_new_update() -> None:
    agg = make()
    out = agg.handle(recv("s1", upd("s1", 1)), 0.0)
    kinds = [
        "metric"
        if isinstance(e, Metric) and e.name == "update_applied"
        else "persist"
        if isinstance(e, Persist)
        else "ack"
        if isinstance(e, Send) and isinstance(e.msg, Ack)
        else "other"
        for e in out
    ]
    assert [k for k in kinds if k != "other"] == ["metric", "persist", "ack"]
    [p] = persists(out)
    assert p.append and p.data["src"] == "s1" and p.data["seq"] == 1
    assert p.data["outcome"] == "applied"


@pytest.mark.parametrize(
    ("peer", "msg_kw", "reason", "acked"),
    [
        (
            "s1",
            {"delta": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}},
            "shape",
            True,
        ),
        (
            "s1",
            {"delta": {"w": np.full((3, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}},
            "non_finite",
            True,
        ),
        (
            "s1",
            {"delta": {"w": np.zeros((3, 2), np.int64), "b": np.zeros(2, np.float32)}},
            "dtype",
            True,
        ),
        ("s1", {"delta": {"w": np.zeros((3, 2), np.float32)}}, "names", True),
        # A site holds only models it was sent as tasks: a future base is malformed.
        ("s1", {"base": 5}, "future_version", True),
        ("s1", {"count": 0}, "bad_count", True),
        ("s1", {"n": -1}, "bad_n_examples", True),
        ("mallory", {}, "unknown_sender", False),
    ],
)
def test_malformed_updates_are_rejected_without_raising(
    peer: str, msg_kw: dict[str, object], reason: str, acked: bool
) -> None:
    agg = make()
    out = agg.handle(recv(peer, upd(peer, 1, **msg_kw)), 0.0)  # type: ignore[arg-type]
    assert [labels(m)["reason"] for m in metrics(out, "update_rejected")] == [reason]
    assert bool(acks(out)) == acked
    assert agg.buffer_fill == 0 and agg.version == 0 and agg.rejected == 1


def test_src_mismatch_and_bad_seq_are_rejected_unacked() -> None:
    agg = make()
    out = agg.handle(recv("s1", upd("s2", 1)), 0.0)
    assert labels(metrics(out, "update_rejected")[0])["reason"] == "src_mismatch"
    out = agg.handle(recv("s1", upd("s1", 0)), 0.0)
    assert labels(metrics(out, "update_rejected")[0])["reason"] == "bad_seq"
    assert not acks(out)


def test_concurrency_is_kept_as_updates_arrive() -> None:
    agg = make(concurrency=3, buffer_size=100)
    reqs: list[tuple[str, TrainRequest]] = []
    for s in SITES:
        reqs += requests(agg.handle(hello(s), 0.0))
    assert len(reqs) == 3 and agg.in_flight == 3
    assert len({peer for peer, _ in reqs}) == 3
    for step in range(20):
        peer, req = reqs.pop(0)
        out = agg.handle(
            recv(peer, upd(peer, step + 1, base=req.version, task=req.task)), 1.0 + step
        )
        new = requests(out)
        assert len(new) == 1
        reqs += new
        assert agg.in_flight == 3
        busy = [p for p, _ in reqs]
        assert len(set(busy)) == 3  # no site holds two tasks


def test_train_requests_carry_model_and_config() -> None:
    agg = make(concurrency=1, train_config={"lr": 0.1, "mu": 0.01})
    [(peer, req)] = requests(agg.handle(hello("s1"), 0.0))
    assert peer == "s1" and req.version == 0 and dict(req.config) == {"lr": 0.1, "mu": 0.01}
    np.testing.assert_array_equal(req.weights["w"], model(0.0)["w"])


def test_task_timeout_frees_slot_and_site_stays_eligible() -> None:
    agg = make(children={"s1": "site"}, concurrency=1, task_timeout_s=5.0)
    [(_, req)] = requests(agg.handle(hello("s1"), 0.0))
    assert agg.next_deadline() == 5.0
    out = agg.handle(Deadline(), 5.0)
    assert [labels(m) for m in metrics(out, "job_timeout")] == [{"site": "s1"}]
    [(peer, req2)] = requests(out)  # re-dispatched: the site stays eligible
    assert peer == "s1" and req2.task != req.task
    assert agg.next_deadline() == 10.0
    # the late answer to the timed-out task is still a valid update
    out = agg.handle(recv("s1", upd("s1", 1, task=req.task)), 6.0)
    assert metrics(out, "update_applied") and agg.in_flight == 1


def test_peer_down_cancels_task_and_refills_elsewhere() -> None:
    agg = make(children={"s1": "site", "s2": "site"}, concurrency=1)
    [(first, _)] = requests(agg.handle(hello("s1"), 0.0))
    agg.handle(hello("s2"), 0.0)
    out = agg.handle(PeerDown(first), 1.0)
    [(second, _)] = requests(out)
    assert second != first and agg.in_flight == 1


def test_regions_get_every_version_and_on_hello() -> None:
    children = {"s1": "site", "s2": "site", "r1": "region"}
    agg = make(children=children, concurrency=0)
    out = agg.handle(hello("r1", "region"), 0.0)
    [b] = sends(out, ModelBroadcast)
    assert b.peer == "r1" and b.msg.version == 0  # type: ignore[union-attr]
    agg.handle(recv("s1", upd("s1", 1)), 1.0)
    out = agg.handle(recv("s2", upd("s2", 1)), 1.0)
    [b] = sends(out, ModelBroadcast)
    assert b.msg.version == 1  # type: ignore[union-attr]
    agg.handle(PeerDown("r1"), 2.0)
    agg.handle(recv("s1", upd("s1", 2, base=1)), 3.0)
    out = agg.handle(recv("s2", upd("s2", 2, base=1)), 3.0)
    assert not sends(out, ModelBroadcast)


def test_region_aggregate_weighs_its_count() -> None:
    agg = make(children={"s1": "site", "r1": "region"}, weighting="uniform")
    agg.handle(recv("s1", upd("s1", 1, value=1.0)), 0.0)
    agg.handle(recv("r1", upd("r1", 1, value=5.0, count=3)), 0.0)
    np.testing.assert_allclose(agg.current_model()[1]["w"], (1.0 + 15.0) / 4.0)


def test_examples_weighting() -> None:
    agg = make(weighting="examples", staleness=constant())
    agg.handle(recv("s1", upd("s1", 1, value=1.0, n=30)), 0.0)
    agg.handle(recv("s2", upd("s2", 1, value=5.0, n=10)), 0.0)
    np.testing.assert_allclose(agg.current_model()[1]["w"], 2.0)


def test_server_optimizer_is_used() -> None:
    agg = make(server_opt=ServerSGD(lr=0.5))
    agg.handle(recv("s1", upd("s1", 1, value=2.0)), 0.0)
    agg.handle(recv("s2", upd("s2", 1, value=2.0)), 0.0)
    np.testing.assert_allclose(agg.current_model()[1]["w"], 1.0)


def test_median_resists_an_outlier_and_clip_bounds_it() -> None:
    agg = make(buffer_size=3, robust="median")
    for i, v in enumerate((1.0, 2.0, 1e6)):
        agg.handle(recv(f"s{i + 1}", upd(f"s{i + 1}", 1, value=v)), 0.0)
    np.testing.assert_allclose(agg.current_model()[1]["w"], 2.0)
    clipped = make(buffer_size=1, clip_norm=1.0)
    out = clipped.handle(recv("s1", upd("s1", 1, value=1e6)), 0.0)
    assert metrics(out, "update_clipped")
    w = clipped.current_model()[1]
    assert np.sqrt(
        sum(float((v.astype(np.float64) ** 2).sum()) for v in w.values())
    ) == pytest.approx(1.0, rel=1e-5)


def test_checkpoint_every_n_versions() -> None:
    agg = make(buffer_size=1, checkpoint_every=2)
    out1 = agg.handle(recv("s1", upd("s1", 1)), 0.0)
    out2 = agg.handle(recv("s1", upd("s1", 2, base=1)), 0.0)
    assert not persists(out1, "checkpoint")
    [cp] = persists(out2, "checkpoint")
    assert cp.data["version"] == 2 and not cp.append


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError):
        make(buffer_size=0)
    with pytest.raises(ValueError):
        make(weighting="by_magic")
    with pytest.raises(ValueError):
        make(robust="krum")
    with pytest.raises(ValueError):
        make(children={"x": "peer"})
    with pytest.raises(ValueError):
        FedBuffAggregator("root", SITES, {}, buffer_size=1, concurrency=1)
    with pytest.raises(ValueError):
        make(rng="seed")


_junk = st.one_of(
    st.none(), st.integers(-3, 3), st.text(max_size=3), st.floats(allow_nan=True), st.booleans()
)
_arrays = st.one_of(
    st.just(np.zeros((3, 2), np.float32)),
    st.just(np.full((3, 2), np.nan, np.float32)),
    st.just(np.zeros((3,), np.float64)),
    st.just(np.array(["x"] * 6).reshape(3, 2)),
    _junk,
)


@settings(max_examples=150, deadline=None)
@given(
    seq=_junk,
    base=_junk,
    n=_junk,
    count=_junk,
    task=_junk,
    delta=st.one_of(_junk, st.dictionaries(st.sampled_from(["w", "b", "z"]), _arrays, max_size=3)),
)
def test_garbage_updates_never_raise(
    seq: object, base: object, n: object, count: object, task: object, delta: object
) -> None:
    agg = make(buffer_size=1)
    msg = Update("s1", seq, base, delta, n, count, task)  # type: ignore[arg-type]
    out = agg.handle(recv("s1", msg), 0.0)
    applied = metrics(out, "update_applied")
    assert applied or metrics(out, "update_rejected") or metrics(out, "update_duplicate")
    assert agg.version == len(applied)


def test_only_a_region_child_can_say_the_root_is_behind_and_only_while_it_holds() -> None:
    agg = make(children={"s1": "site", "ra": "region", "rb": "region"})
    for peer, role in (("s1", "site"), ("ra", "region"), ("rb", "region")):
        agg.handle(hello(peer, role), 0.0)
    # A site's future base version (10**15) is a plain rejection: recorded, acked, no ERROR.
    out = agg.handle(recv("s1", upd("s1", 1, base=10**15)), 1.0)
    assert acks(out) and not metrics(out, "root_behind_children")
    assert not [e for e in out if getattr(e, "level", "") == "error"]
    # A region's forward ahead of the root: kept unacked, gauge and ERROR name it.
    out = agg.handle(recv("ra", upd("ra", 1, base=7)), 2.0)
    assert not acks(out) and metrics(out, "root_behind_children")[0].value == 7.0
    out = agg.handle(recv("rb", upd("rb", 1, base=3)), 3.0)
    assert metrics(out, "root_behind_children")[0].value == 7.0  # the newest claim
    out = agg.handle(PeerDown("ra"), 4.0)  # its claim goes with it
    assert metrics(out, "root_behind_children")[0].value == 3.0
    out = agg.handle(recv("rb", upd("rb", 2, base=0)), 5.0)  # rb no longer ahead
    assert acks(out) and metrics(out, "root_behind_children")[0].value == 0.0
