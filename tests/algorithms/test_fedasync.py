import numpy as np
import pytest

from fedloom.algorithms.fedasync import FedAsyncAggregator
from fedloom.algorithms.protocol import ModelHolder, Node
from fedloom.algorithms.staleness import constant, polynomial
from tests.algorithms.alg_helpers import acks, hello, metrics, model, persists, recv, requests, upd

SITES = {"s1": "site", "s2": "site", "s3": "site"}


def make(**kw: object) -> FedAsyncAggregator:
    args: dict[str, object] = {"concurrency": 2, "alpha": 0.5, "clip_norm": None}
    args.update(kw)
    return FedAsyncAggregator("root", SITES, model(0.0), **args)  # type: ignore[arg-type]


def test_protocols() -> None:
    agg = make()
    assert isinstance(agg, Node) and isinstance(agg, ModelHolder)


def test_fresh_update_mixes_exactly() -> None:
    agg = make(alpha=0.6)
    agg.handle(recv("s1", upd("s1", 1, value=1.0)), 0.0)
    # x = 0.4*0 + 0.6*(0 + 1) = 0.6
    assert agg.version == 1
    np.testing.assert_allclose(agg.current_model()[1]["w"], 0.6, rtol=1e-6)


def test_stale_update_mixes_against_its_base_from_history() -> None:
    agg = make(alpha=0.5, staleness=polynomial(0.5))
    agg.handle(recv("s1", upd("s1", 1, base=0, value=2.0)), 0.0)  # x1 = 1.0
    agg.handle(recv("s2", upd("s2", 1, base=1, value=2.0)), 0.0)  # x2 = .5*1 + .5*(1+2) = 2.0
    out = agg.handle(recv("s3", upd("s3", 1, base=0, value=4.0)), 0.0)  # tau = 2
    a = 0.5 / np.sqrt(3.0)
    expected = (1 - a) * 2.0 + a * (0.0 + 4.0)
    np.testing.assert_allclose(agg.current_model()[1]["b"], expected, rtol=1e-6)
    assert metrics(out, "update_applied")[0].value == 2.0
    assert agg.history_misses == 0


def test_base_outside_history_falls_back_and_is_counted() -> None:
    agg = make(alpha=0.5, history=2, staleness=constant())
    for seq in range(1, 4):
        agg.handle(recv("s1", upd("s1", seq, base=seq - 1, value=0.0)), 0.0)
    assert agg.version == 3  # history holds versions 2 and 3
    out = agg.handle(recv("s2", upd("s2", 1, base=0, value=2.0)), 0.0)
    assert metrics(out, "fedasync_history_miss") and agg.history_misses == 1
    np.testing.assert_allclose(agg.current_model()[1]["w"], 1.0)  # x + alpha * delta


def test_max_staleness_duplicates_and_rejects() -> None:
    agg = make(max_staleness=1)
    for seq in range(1, 4):
        agg.handle(recv("s1", upd("s1", seq, base=seq - 1, value=1.0)), 0.0)
    out = agg.handle(recv("s2", upd("s2", 1, base=0)), 0.0)
    assert metrics(out, "update_stale") and acks(out) and agg.version == 3
    out = agg.handle(recv("s1", upd("s1", 2, base=1)), 0.0)
    assert metrics(out, "update_duplicate") and acks(out) and not persists(out)
    bad = upd(
        "s3", 1, delta={"w": np.full((3, 2), np.inf, np.float32), "b": np.zeros(2, np.float32)}
    )
    out = agg.handle(recv("s3", bad), 0.0)
    assert metrics(out, "update_rejected") and agg.version == 3


def test_dispatcher_keeps_concurrency() -> None:
    agg = make(concurrency=2)
    reqs = []
    for s in SITES:
        reqs += requests(agg.handle(hello(s), 0.0))
    assert len(reqs) == 2
    peer, req = reqs[0]
    out = agg.handle(recv(peer, upd(peer, 1, task=req.task)), 1.0)
    [(_, new)] = requests(out)
    assert new.version == 1 and agg.in_flight == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make(alpha=0.0)
    with pytest.raises(ValueError):
        make(history=0)
