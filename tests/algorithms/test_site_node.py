import warnings
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import (
    Effect,
    Log,
    LogRecords,
    ModelHolder,
    Node,
    PeerDown,
    PeerUp,
    Persist,
    ProtocolMisuseError,
    Send,
    Train,
    TrainDone,
    TrainedDelta,
    TrainFailed,
    TrainResult,
)
from fedloom.algorithms.site import PENDING_KEY, SiteNode, SiteState, trained_delta
from fedloom.transport.wire import Ack, Hello, ModelBroadcast, TrainRequest, Update
from tests.algorithms.alg_helpers import metrics, model, persists, recv, sends


def trains(out: list[Effect]) -> list[Train]:
    return [e for e in out if isinstance(e, Train)]


def updates(out: list[Effect]) -> list[Update]:
    return [e.msg for e in sends(out, Update) if isinstance(e.msg, Update)]


def request(task: int = 1, version: int = 0, value: float = 0.0) -> TrainRequest:
    return TrainRequest(task, version, model(value), {"lr": 0.1})


def done(job: int, value: float, n: int = 7) -> TrainDone:
    return TrainDone(job, TrainResult(model(value), n, {"loss": 0.5}))


def test_a_trained_delta_gives_the_update_its_training_result_gives() -> None:
    # An executor may hand over the site's delta, made and checked where the job trained
    # (trained_delta): the site sends exactly the update it would have made itself.
    sent = []
    for made_there in (False, True):
        site = SiteNode("s1", "agg")
        [train] = trains(site.handle(recv("agg", request(task=9, version=3, value=1.0)), 0.0))
        trained = {
            "w": np.array([[1.5, -2.25], [1e-8, 3.0], [0.0, -1.0]], np.float32),
            "b": np.array([0.5, 7.0], np.float32),
        }
        result = TrainResult(trained, 7, {"loss": 0.5})
        event = TrainDone(train.job, result)
        if made_there:
            checked = trained_delta(result, train.weights)
            assert isinstance(checked, TrainedDelta)
            event = TrainDone(train.job, checked)
        [u] = updates(site.handle(event, 1.0))
        sent.append(u)
        assert site.state == SiteState.IDLE
    mine, theirs = sent
    assert list(mine.delta) == list(theirs.delta) == ["w", "b"]
    for k in mine.delta:
        assert mine.delta[k].tobytes() == theirs.delta[k].tobytes()
        assert mine.delta[k].dtype == theirs.delta[k].dtype == np.float32
    assert (mine.src, mine.seq, mine.base_version, mine.task, mine.n_examples, mine.metrics) == (
        theirs.src,
        theirs.seq,
        theirs.base_version,
        theirs.task,
        theirs.n_examples,
        theirs.metrics,
    )


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ({"w": np.array([np.inf, 0, 0], np.float32)}, "non-finite weights"),
        ({"w": np.zeros(2, np.float32)}, "weights do not match the model"),
        ({"v": np.zeros(3, np.float32)}, "weights do not match the model"),
    ],
)
def test_trained_delta_refuses_what_the_site_would_fail(weights: Any, reason: str) -> None:
    base = {"w": np.ones(3, np.float32)}
    assert trained_delta(TrainResult(weights, 1), base) == reason


def test_protocols() -> None:
    site = SiteNode("s1", "agg")
    assert isinstance(site, Node) and isinstance(site, ModelHolder)
    assert site.current_model() is None and site.next_deadline() is None


def test_hello_on_parent_up() -> None:
    site = SiteNode("s1", "agg", n_examples=42)
    out = site.handle(PeerUp("agg"), 0.0)
    assert [(e.peer, e.msg) for e in out if isinstance(e, Send)] == [
        ("agg", Hello("s1", "site", 42))
    ]
    assert site.handle(PeerUp("someone"), 0.0) == []


def test_train_then_update_with_delta_persisted_before_send() -> None:
    site = SiteNode("s1", "agg")
    out = site.handle(recv("agg", request(task=9, version=3, value=1.0)), 0.0)
    [train] = trains(out)
    assert dict(train.config) == {"lr": 0.1, "server_round": 4}  # version 3 + 1
    assert site.state == SiteState.TRAINING
    out = site.handle(done(train.job, 1.5), 1.0)
    assert isinstance(out[0], Persist) and out[0].key == "site/pending" and out[0].append
    [u] = updates(out)
    assert (u.src, u.seq, u.base_version, u.task, u.n_examples, u.count) == ("s1", 1, 3, 9, 7, 1)
    np.testing.assert_allclose(u.delta["w"], 0.5)
    assert u.delta["w"].dtype == np.float32
    assert dict(u.metrics) == {"loss": 0.5}
    assert site.pending == 1 and str(site.state.value) == SiteState.IDLE.value


def test_request_while_training_keeps_only_the_newest() -> None:
    site = SiteNode("s1", "agg")
    [t1] = trains(site.handle(recv("agg", request(task=1, version=0)), 0.0))
    assert site.handle(recv("agg", request(task=2, version=1)), 0.1) == []
    assert site.handle(recv("agg", request(task=3, version=2)), 0.2) == []
    out = site.handle(done(t1.job, 1.0), 1.0)
    [t2] = trains(out)
    assert t2.job != t1.job
    out = site.handle(done(t2.job, 1.0), 2.0)
    [u] = updates(out)
    assert (u.task, u.base_version) == (3, 2)
    assert trains(out) == []


def test_ack_forgets_and_reconnect_resends_in_seq_order() -> None:
    site = SiteNode("s1", "agg")
    for i in range(3):
        [t] = trains(site.handle(recv("agg", request(task=i, version=i)), float(i)))
        site.handle(done(t.job, 1.0), float(i) + 0.5)
    assert site.pending == 3
    out = site.handle(recv("agg", Ack("s1", 2)), 4.0)
    assert [p.data for p in persists(out)] == [{"op": "ack", "seq": 2}]
    assert site.pending == 2
    assert site.handle(recv("agg", Ack("s1", 2)), 4.0) == []  # already forgotten
    site.handle(PeerDown("agg"), 5.0)
    out = site.handle(PeerUp("agg"), 6.0)
    assert isinstance(sends(out)[0].msg, Hello)
    assert [u.seq for u in updates(out)] == [1, 3]


def test_failure_returns_to_idle_and_starts_parked_request() -> None:
    site = SiteNode("s1", "agg")
    [t] = trains(site.handle(recv("agg", request(task=1)), 0.0))
    site.handle(recv("agg", request(task=2)), 0.5)
    out = site.handle(TrainFailed(t.job, "oom"), 1.0)
    assert metrics(out, "train_failed") and len(trains(out)) == 1
    assert site.pending == 0 and site.jobs_failed == 1


def test_unknown_job_is_local_misuse() -> None:
    site = SiteNode("s1", "agg")
    with pytest.raises(ProtocolMisuseError):
        site.handle(done(5, 1.0), 0.0)


def test_incompatible_training_result_is_a_failure_not_an_update() -> None:
    site = SiteNode("s1", "agg")
    [t] = trains(site.handle(recv("agg", request()), 0.0))
    out = site.handle(TrainDone(t.job, TrainResult({"w": np.zeros(1, np.float32)}, 1)), 1.0)
    assert not updates(out) and metrics(out, "train_failed")


def test_a_delta_that_overflows_is_a_failed_job_without_a_warning() -> None:
    """Finite weights whose difference from the model overflows float32 (a diverged
    client): the job fails as non-finite, no update is made, no RuntimeWarning escapes."""
    site = SiteNode("s1", "agg")
    big = np.float32(3e38)
    req = TrainRequest(1, 0, model(-big), {"lr": 0.1})
    [t] = trains(site.handle(recv("agg", req), 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = site.handle(done(t.job, big), 1.0)
    assert not updates(out) and metrics(out, "train_failed")
    logs = [e for e in out if isinstance(e, Log)]
    assert [(e.fields or {}).get("reason") for e in logs] == ["non-finite weights"]
    assert site.state is SiteState.IDLE


def test_messages_from_strangers_are_ignored_with_a_metric() -> None:
    site = SiteNode("s1", "agg")
    out = site.handle(recv("evil", request()), 0.0)
    assert not trains(out) and metrics(out, "message_rejected")


def test_broadcast_updates_current_model_only_forward() -> None:
    site = SiteNode("s1", "agg")
    site.handle(recv("agg", ModelBroadcast(4, model(4.0))), 0.0)
    site.handle(recv("agg", ModelBroadcast(2, model(2.0))), 0.0)
    cm = site.current_model()
    assert cm is not None and cm[0] == 4


def test_seeded_site_gives_each_job_its_own_seed() -> None:
    site = SiteNode("s1", "agg", seed=7)
    [t1] = trains(site.handle(recv("agg", request(task=1)), 0.0))
    site.handle(done(t1.job, 1.0), 1.0)
    [t2] = trains(site.handle(recv("agg", request(task=2)), 2.0))
    assert t1.config["seed"] != t2.config["seed"]
    assert t1.config["lr"] == 0.1


def test_restore_from_snapshot_and_log() -> None:
    site = SiteNode("s1", "agg")
    log: list[Any] = []
    for i in range(3):
        [t] = trains(site.handle(recv("agg", request(task=i)), 0.0))
        out = site.handle(done(t.job, 1.0), 1.0)
        log += [p.data for p in persists(out)]
        if i == 0:
            snap = site.snapshot()
            log = []
    log += [p.data for p in persists(site.handle(recv("agg", Ack("s1", 2)), 2.0))]
    fresh = SiteNode("s1", "agg")
    fresh.restore(snap, LogRecords({PENDING_KEY: log}))
    assert fresh.pending == 2 and fresh.seq == 3
    assert [u.seq for u in updates(fresh.handle(PeerUp("agg"), 3.0))] == [1, 3]


def test_a_drained_outbox_is_checkpointed_so_the_log_stays_bounded() -> None:
    site = SiteNode("s1", "agg")
    seqs = []
    for i in range(2):  # two updates in flight
        [t] = trains(site.handle(recv("agg", request(task=i, version=i)), float(i)))
        [u] = updates(site.handle(done(t.job, 1.0), float(i)))
        seqs.append(u.seq)
    out = site.handle(recv("agg", Ack("s1", seqs[0])), 5.0)
    assert [p.key for p in persists(out)] == ["site/pending"]  # one still pending: no checkpoint
    out = site.handle(recv("agg", Ack("s1", seqs[1])), 6.0)
    ack, ckpt = persists(out)
    assert (ack.key, ack.append) == ("site/pending", True)
    assert (ckpt.key, ckpt.append) == ("checkpoint", False)  # after the ack record
    assert ckpt.data == {"outbox": {"seq": 2, "pending": []}, "model": None, "newest_version": 1}
    assert persists(site.handle(recv("agg", Ack("s1", seqs[1])), 7.0)) == []  # a repeat: nothing
    fresh = SiteNode("s1", "agg")
    fresh.restore(ckpt.data)
    assert fresh.newest_version == 1
    [t] = trains(fresh.handle(recv("agg", request(task=5, version=5)), 8.0))
    [u] = updates(fresh.handle(done(t.job, 1.0), 9.0))
    assert u.seq == 3  # numbering goes on after a restart from the compacted state
    assert fresh.newest_version == 5  # and the rollback floor with it (1 before request 5)
