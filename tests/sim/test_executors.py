"""The process pool sends small jobs in batches: every job's result is the one the inline
executor gives, whatever the batching, joining order or discards; a failing job fails only
its own join."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import TrainResult, Weights
from fedloom.sim.executors import InlineExecutor, PoolExecutor
from tests.conformance.toy_nodes import NoisyTrainer


class FailsOnSeven(NoisyTrainer):
    """Raises for the job whose seed is 7 (picklable: a module-level class)."""

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        if config["seed"] == 7:
            raise ValueError("job 7 fails")
        return super().__call__(node_id, weights, config)


def _jobs(n: int) -> list[tuple[str, Weights, dict[str, Any]]]:
    model = {"w": np.zeros((4, 3), np.float32)}
    return [(f"site-{i % 5}", model, {"seed": i}) for i in range(n)]


def _same(a: TrainResult, b: TrainResult) -> bool:
    return (
        a.weights.keys() == b.weights.keys()
        and all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
        and a.n_examples == b.n_examples
        and a.metrics == b.metrics
    )


def test_batched_results_are_the_inline_ones_in_any_join_order() -> None:
    jobs = _jobs(300)
    inline = InlineExecutor(NoisyTrainer())
    expected = [inline.join(inline.submit(*job)) for job in jobs]
    with PoolExecutor(NoisyTrainer(), workers=2, batch_seconds=1.0) as pool:
        first = pool.submit(*jobs[0])
        assert _same(pool.join(first), expected[0])  # teaches the pool a job's cost
        tickets = [pool.submit(*job) for job in jobs[1:]]
        order = np.random.default_rng(0).permutation(len(tickets))
        for i in order:
            assert _same(pool.join(tickets[i]), expected[i + 1])
        # 299 tiny jobs travelled in far fewer messages than jobs
        assert 1 < pool.batches_sent < 50


def test_a_job_that_takes_the_batch_budget_goes_alone() -> None:
    with PoolExecutor(NoisyTrainer(), workers=1, batch_seconds=0.0) as pool:
        tickets = [pool.submit(*job) for job in _jobs(6)]
        for t in tickets:
            pool.join(t)
        assert pool.batches_sent == 6


def test_a_failing_job_fails_its_own_join_only_and_discards_are_skipped() -> None:
    jobs = _jobs(20)
    inline = InlineExecutor(NoisyTrainer())
    with PoolExecutor(FailsOnSeven(), workers=1, batch_seconds=10.0) as pool:
        pool.join(pool.submit(*jobs[0]))  # learn: the next 19 share one batch
        tickets = [pool.submit(*job) for job in jobs[1:]]
        pool.discard(tickets[2])  # job 3: never sent, never run
        for i, t in enumerate(tickets, start=1):
            if i == 3:
                continue
            if i == 7:
                with pytest.raises(ValueError, match="job 7 fails"):
                    pool.join(t)
            else:
                assert _same(pool.join(t), inline.join(inline.submit(*jobs[i])))
        assert pool.batches_sent == 2


@pytest.mark.parametrize("bad", [{"batch_seconds": -1.0}, {"max_batch": 0}, {"workers": 0}])
def test_bad_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PoolExecutor(NoisyTrainer(), **bad)


class FailsUnpicklably(NoisyTrainer):
    """Job 2 raises an exception that holds a lock (it cannot be pickled back)."""

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        if config["seed"] == 2:
            import threading

            raise ValueError("job 2 fails", threading.Lock())
        return super().__call__(node_id, weights, config)


def test_an_unpicklable_exception_fails_only_its_own_job() -> None:
    jobs = _jobs(5)
    with PoolExecutor(FailsUnpicklably(), workers=1, batch_seconds=10.0) as pool:
        pool.join(pool.submit(*jobs[0]))
        tickets = [pool.submit(*job) for job in jobs[1:]]
        for i, t in enumerate(tickets, start=1):
            if i == 2:
                with pytest.raises(RuntimeError, match="cannot be pickled"):
                    pool.join(t)
            else:
                assert pool.join(t).n_examples == 10
