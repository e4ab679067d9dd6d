"""A site that answers each task at once with something its aggregator cannot apply.

A task answered by an update the aggregator rejects (a future base version, a delta of the
wrong shape, ...), or by a secure join on a model that does not exist, frees the task's
slot like any answer. The dispatcher then handed the site a new task at once: the whole
model, and (for a rejected update) a durable record, for every 60-byte message, as fast as
the link. The refusal backoff (``algorithms.refusals``) exists for exactly that loop ("a
site whose plan fails at once would be handed the model again at once"); such an answer
is a failed task and waits it out too. Honest sites keep training meanwhile.
"""

from __future__ import annotations

from typing import Any

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Deadline, Effect, Persist
from fedloom.algorithms.refusals import BACKOFF_S
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.federation.secagg_params import SecureAggregationConfig
from fedloom.transport.wire import Message, SecAggJoin, Update
from tests.algorithms.alg_helpers import acks, hello, metrics, model, recv, requests, upd

FLOOD = 1_000
SITES = ("evil", "s1", "s2")


def tasks_to(effects: list[Effect], site: str) -> list[int]:
    return [r.task for p, r in requests(effects) if p == site]


def start(agg: Any) -> dict[str, int]:
    task: dict[str, int] = {}
    for s in SITES:
        task.update((p, r.task) for p, r in requests(agg.handle(hello(s), 0.0)))
    assert set(task) == set(SITES)
    return task


def churn(agg: Any, task: dict[str, int], answer: Any) -> list[Effect]:
    """``evil`` answers whatever task it holds at once, FLOOD times within one second."""
    out: list[Effect] = []
    for seq in range(1, FLOOD + 1):
        step = agg.handle(recv("evil", answer(seq, task.get("evil", -1))), 1.0 + seq * 0.001)
        task.update((p, r.task) for p, r in requests(step))
        out += step
    return out


def test_a_site_answering_every_task_with_a_rejected_update_waits_out_a_backoff() -> None:
    agg = FedBuffAggregator(
        "root", dict.fromkeys(SITES, "site"), model(0.0), buffer_size=2, concurrency=3
    )
    task = start(agg)

    def future(seq: int, t: int) -> Message:  # no delta needed: refused before it is read
        return Update("evil", seq, 10**9, {}, 1, task=t)

    out = churn(agg, task, future)
    assert len(tasks_to(out, "evil")) <= 1  # it was 1,000 models
    assert sum(isinstance(e, Persist) for e in out) <= 3  # it was 1,000 records
    # The honest sites still train and are applied.
    for s in ("s1", "s2"):
        assert acks(agg.handle(recv(s, upd(s, 1, value=0.1, task=task[s])), 2.0))
    assert agg.version == 1
    # After the backoff evil gets a task again (the model: it may have been fixed).
    later = agg.handle(Deadline(), 1.0 + FLOOD * 0.001 + BACKOFF_S + 0.1)
    assert len(tasks_to(later, "evil")) == 1


def secure_root() -> Any:
    keys = derived_secagg_keys(["root", *SITES], seed=7)
    cfg = SecureAggregationConfig(enabled=True, min_cohort=3, max_colluders=0, max_dropout=0.0)
    return build_node(
        "root",
        "root",
        "fedbuff",
        AlgorithmConfig(buffer_size=3, concurrency=3, clip_norm=None),
        TrainingConfig(lr=0.1, local_steps=1, batch_size=1, mu=0.0),
        Neighbours(children=dict.fromkeys(SITES, "site")),
        seed=0,
        weights=model(0.0),
        secagg=cfg,
        secagg_keys=keys["root"],
    )


def test_a_secure_site_answering_every_task_with_an_impossible_join_waits_too() -> None:
    agg = secure_root()
    task = start(agg)

    def impossible(seq: int, t: int) -> Message:
        return SecAggJoin("evil", seq, 10**9, task=t, n_examples=1)

    out = churn(agg, task, impossible)
    assert len(metrics(out, "update_rejected")) == FLOOD  # each counted
    assert len(tasks_to(out, "evil")) <= 1  # it was 1,000 models
    later = agg.handle(Deadline(), 1.0 + FLOOD * 0.001 + BACKOFF_S + 0.1)
    assert len(tasks_to(later, "evil")) == 1


def test_a_secure_join_on_a_negative_base_version_is_refused_as_a_plain_update_is() -> None:
    """A plain update with base_version < 0 is rejected (bad_base_version); a join with
    one waited for a cohort, and its staleness max(0, v - base) ~ 2**63 would have cut the
    whole cohort's mean discount s̄ by one member's share."""
    agg = secure_root()
    task = start(agg)
    join = SecAggJoin("evil", 1, -(2**63), task=task["evil"], n_examples=1)
    out = agg.handle(recv("evil", join), 1.0)
    assert [m.labels for m in metrics(out, "update_rejected")] == [{"reason": "bad_base_version"}]
    assert agg.secure_aggregation.waiting() == 0 and not acks(out)
