"""Where training jobs run: inline, or in a pool of worker processes.

Start-snapshot / end-delivery: the driver ``submit``s a job when the ``Train`` effect is
carried out (with the weights snapshot of that moment) and ``join``s it when the job's end
event fires on the virtual clock. Between the two the kernel goes on with other events,
so a pool trains many jobs at once. Results do not depend on the executor: a job is a pure
function of ``(node_id, weights, config)`` and its randomness comes only from
``config["seed"]``, which the driver derives from (run seed, node id, job).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import pickle
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from fedloom.algorithms.protocol import TrainResult, Weights
from fedloom.federation.training import Trainer


class Executor(Protocol):
    def submit(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> Any:
        """Start a job; return a ticket for ``join``."""
        ...

    def join(self, ticket: Any) -> TrainResult:
        """Wait for the job and return its result (re-raising its exception)."""
        ...

    def discard(self, ticket: Any) -> None:
        """The result will never be joined (its node died): free what it holds."""
        ...

    def close(self) -> None: ...


class InlineExecutor:
    """Runs each job in this process when it is joined (nothing to overlap with)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def submit(
        self, node_id: str, weights: Weights, config: Mapping[str, Any]
    ) -> tuple[str, Weights, Mapping[str, Any]]:
        return (node_id, weights, config)

    def join(self, ticket: tuple[str, Weights, Mapping[str, Any]]) -> TrainResult:
        return self.trainer(*ticket)

    def discard(self, ticket: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The trainer of this worker process, installed once by the pool's initializer.
_WORKER_TRAINER: Trainer | None = None


def _install_trainer(trainer: Trainer) -> None:
    global _WORKER_TRAINER
    _WORKER_TRAINER = trainer


def _run_job(node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
    if _WORKER_TRAINER is None:  # pragma: no cover - the initializer always ran
        raise RuntimeError("worker has no trainer installed")
    return _WORKER_TRAINER(node_id, weights, config)


def _run_batch(
    jobs: Sequence[tuple[str, Weights, Mapping[str, Any]] | None],
) -> tuple[list[tuple[bool, Any]], float]:
    """Run a batch of jobs in order: ``(ok, result or exception)`` for each (None for a job
    discarded before the batch left), and the CPU seconds the batch took."""
    started = time.process_time()
    out: list[tuple[bool, Any]] = []
    for job in jobs:
        if job is None:
            out.append((True, None))
            continue
        try:
            out.append((True, _run_job(*job)))
        except Exception as exc:  # re-raised by join, for this job only
            out.append((False, _picklable(exc)))
    return out, time.process_time() - started


def _picklable(exc: Exception) -> Exception:
    """``exc``, or a RuntimeError naming it where it cannot travel back (one job's
    unpicklable exception must not fail the other jobs of its batch)."""
    try:
        pickle.dumps(exc)
    except Exception:
        return RuntimeError(f"training job failed: {exc!r} (its exception cannot be pickled)")
    return exc


class _Batch:
    """Jobs sent to a worker together: one pickle, one hop and one result message for all
    of them, where a job per message costs the driver more than a small job's training."""

    __slots__ = ("future", "jobs", "learned", "left", "results")

    def __init__(self) -> None:
        self.jobs: list[tuple[str, Weights, Mapping[str, Any]] | None] = []
        self.future: cf.Future[Any] | None = None
        self.results: list[tuple[bool, Any]] | None = None
        self.left = 0  # tickets not yet joined or discarded
        self.learned = False  # its CPU time is in the running mean


class PoolExecutor:
    """Runs jobs in worker processes; the trainer is pickled once per worker.

    Jobs go to the workers in batches: a submitted job waits in the open batch until the
    batch holds about ``batch_seconds`` of training (estimated from the CPU time the
    workers report per job) or until the driver joins one of its jobs. Small jobs (a
    softmax step, ~0.1 ms) then cost the driver a list append each instead of a pickle,
    a pipe write and a future; a job that takes ``batch_seconds`` or more goes alone, at
    once, as before. Batching changes only when a job runs, never its result (a job is a
    pure function of its arguments).

    ``mp_context`` defaults to "spawn": forking a process that has started torch or BLAS
    threads can deadlock.
    """

    def __init__(
        self,
        trainer: Trainer,
        workers: int | None = None,
        *,
        mp_context: str = "spawn",
        batch_seconds: float = 0.02,
        max_batch: int = 256,
    ) -> None:
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        if not batch_seconds >= 0:
            raise ValueError(f"batch_seconds must be >= 0, got {batch_seconds!r}")
        if isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        self._pool = cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context(mp_context),
            initializer=_install_trainer,
            initargs=(trainer,),
        )
        self._batch_seconds = batch_seconds
        self._max_batch = max_batch
        self._job_seconds: float | None = None  # running mean of a job's CPU time
        self._open = _Batch()
        self.batches_sent = 0  # how many messages carried the jobs (tests, diagnostics)

    def _batch_size(self) -> int:
        """Jobs per batch: 1 until a batch has reported, then ~``batch_seconds`` of work."""
        if self._job_seconds is None:
            return 1
        if self._job_seconds <= 0:
            return self._max_batch
        return max(1, min(self._max_batch, int(self._batch_seconds / self._job_seconds)))

    def submit(
        self, node_id: str, weights: Weights, config: Mapping[str, Any]
    ) -> tuple[_Batch, int]:
        batch = self._open
        batch.jobs.append((node_id, weights, dict(config)))
        batch.left += 1
        ticket = (batch, len(batch.jobs) - 1)
        if len(batch.jobs) >= self._batch_size():
            self._send()
        return ticket

    def _send(self) -> None:
        batch, self._open = self._open, _Batch()
        jobs = sum(job is not None for job in batch.jobs)
        if jobs:
            batch.future = self._pool.submit(_run_batch, batch.jobs)
            self.batches_sent += 1
            batch.future.add_done_callback(lambda done: self._learn(batch, done, jobs))
        else:  # every job was discarded before it left
            batch.results = [(True, None)] * len(batch.jobs)

    def _results(self, batch: _Batch) -> list[tuple[bool, Any]]:
        if batch.results is None:
            if batch is self._open:
                self._send()
            assert batch.future is not None
            batch.results, _ = batch.future.result()
            self._learn(batch, batch.future, sum(job is not None for job in batch.jobs))
            batch.future, batch.jobs = None, []
        return batch.results

    def _learn(self, batch: _Batch, done: cf.Future[Any], jobs: int) -> None:
        """Fold a finished batch's CPU time per job into the running mean: in the pool's
        result thread as the batch ends, or by ``join`` if that comes first (a float
        store is atomic under the GIL; a batch counted twice only nudges the mean)."""
        if batch.learned or done.cancelled() or done.exception() is not None:
            return
        batch.learned = True
        per_job = done.result()[1] / jobs
        mean = self._job_seconds
        self._job_seconds = per_job if mean is None else 0.8 * mean + 0.2 * per_job

    def join(self, ticket: tuple[_Batch, int]) -> TrainResult:
        batch, index = ticket
        ok, value = self._results(batch)[index]
        self._forget(batch, index)
        if not ok:
            raise value
        result: TrainResult = value
        return result

    def discard(self, ticket: tuple[_Batch, int]) -> None:
        batch, index = ticket
        if batch is self._open:
            batch.jobs[index] = None  # never sent
        self._forget(batch, index)  # a sent job runs with its batch; its result is dropped

    @staticmethod
    def _forget(batch: _Batch, index: int) -> None:
        batch.left -= 1
        if batch.results is not None:
            batch.results[index] = (True, None)  # let the result go
            if batch.left == 0:
                batch.results = []

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PoolExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
