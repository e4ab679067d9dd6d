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
from collections.abc import Mapping
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


class PoolExecutor:
    """Runs jobs in worker processes; the trainer is pickled once per worker.

    ``mp_context`` defaults to "spawn": forking a process that has started torch or BLAS
    threads can deadlock.
    """

    def __init__(
        self, trainer: Trainer, workers: int | None = None, *, mp_context: str = "spawn"
    ) -> None:
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self._pool = cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context(mp_context),
            initializer=_install_trainer,
            initargs=(trainer,),
        )

    def submit(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> cf.Future[Any]:
        return self._pool.submit(_run_job, node_id, weights, dict(config))

    def join(self, ticket: cf.Future[Any]) -> TrainResult:
        result: TrainResult = ticket.result()
        return result

    def discard(self, ticket: cf.Future[Any]) -> None:
        ticket.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PoolExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
