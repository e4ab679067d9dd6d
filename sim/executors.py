"""Where training jobs run: inline, or in a pool of worker processes.

Start-snapshot / end-delivery: the driver ``submit``s a job when the ``Train`` effect is
carried out (with the weights snapshot of that moment) and ``join``s it when the job's end
event fires on the virtual clock. Between the two the kernel goes on with other events,
so a pool trains many jobs at once. Results do not depend on the executor: a job is a pure
function of ``(node_id, weights, config)`` and its randomness comes only from
``config["seed"]``, which the driver derives from (run seed, node id, job).
"""

from __future__ import annotations

import contextlib
import heapq
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from collections.abc import Mapping
from multiprocessing.reduction import ForkingPickler
from typing import Any, Protocol

import numpy as np

from fedloom.algorithms.protocol import TrainedDelta, TrainResult, Weights
from fedloom.algorithms.site import trained_delta
from fedloom.algorithms.weights_math import measure_delta
from fedloom.federation.training import Trainer


class ExecutorError(RuntimeError):
    """What trains the jobs failed the run (a pool worker or a Ray node died, a result
    could not be read back): not a mistake in the scenario. ``fedloom sim`` prints it as
    one line, exit status 1."""


class Executor(Protocol):
    def submit(
        self,
        node_id: str,
        weights: Weights,
        config: Mapping[str, Any],
        *,
        due: float | None = None,
    ) -> Any:
        """Start a job; return a ticket for ``join``. ``due``: the virtual time its result
        will be joined at (an executor may train jobs in that order)."""
        ...

    def join(self, ticket: Any) -> TrainResult | TrainedDelta:
        """Wait for the job and return its result (re-raising its exception): the
        trainer's, or a ``TrainedDelta`` where it was submitted with ``delta=True`` to an
        executor whose ``makes_trained_deltas`` is true."""
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
        self,
        node_id: str,
        weights: Weights,
        config: Mapping[str, Any],
        *,
        due: float | None = None,
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


def _round_trip_error(value: object) -> Exception | None:
    """Why ``value`` cannot cross to the driver (pickled, then rebuilt there), or None."""
    try:
        pickle.loads(pickle.dumps(value))
    except Exception as exc:
        return exc
    return None


def _picklable(exc: Exception) -> Exception:
    """``exc``, or a RuntimeError naming it where it cannot travel back (one job's
    exception must not fail the other jobs of its message): it must survive the round
    trip, since one that pickles but cannot be rebuilt would fail the whole message."""
    if _round_trip_error(exc) is None:
        return exc
    return RuntimeError(f"training job failed: {exc!r} (its exception cannot be pickled)")


def _sendable(done: list[_Result]) -> list[_Result]:
    """``done`` with each result that cannot make the round trip replaced by its job's
    failure (a trainer that returns, say, a lambda among its metrics)."""
    out: list[_Result] = []
    for seq, how, value in done:
        error = _round_trip_error(value)
        if error is None:
            out.append((seq, how, value))
        else:
            out.append(
                (seq, _FAILED, RuntimeError(f"training result cannot be pickled: {error!r}"))
            )
    return out


# Job slots the driver and its workers share (a job's sequence number and state, indexed
# by seq mod _RING). A job whose slot still belongs to a live older job stays in the
# driver (it is trained there when joined): a pool never loses a job to a full ring.
_RING = 1 << 16
_QUEUED, _CLAIMED, _STOLEN = 0, 1, 2
# Where a ticket is, on the driver's side.
_BUFFERED, _SENT, _LOCAL, _DONE = 0, 1, 2, 3
# How a result travels back: an exception, a TrainResult's fields, any other object, a
# TrainedDelta's fields.
_FAILED, _FIELDS, _OBJECT, _DELTA = 0, 1, 2, 3
# Model snapshots a worker keeps by token: the jobs of one version share one snapshot,
# which then crosses the pipe once instead of with every job.
_KEPT_SNAPSHOTS = 64
_KEPT_BYTES = 64 << 20  # per worker, counting the arrays of its snapshots

# A job message: (new snapshots [(token, weights)], tokens to forget, jobs), each job
# (due, seq, slot, node_id, token, config, delta).
_Job = tuple[float, int, int, str, int, Mapping[str, Any], bool]
_Message = tuple[list[tuple[int, Weights]], list[int], list[_Job]]
_Result = tuple[int, int, Any]  # (seq, how, value)


def _worker_main(
    jobs_in: Any,
    results_out: Any,
    trainer: Trainer,
    shared: tuple[Any, Any, Any, Any],
    index: int,
    flush_seconds: float,
) -> None:
    """A pool worker: keeps the jobs it was sent in a heap by virtual due time and trains
    the earliest one the driver has not taken back, claiming its slot under the shared
    lock first. Results go back in messages of about ``flush_seconds`` of work, at once
    after a job that long, and at once when the driver waits. Two threads move the
    messages, so that neither pipe ever stays full while this loop trains: the driver
    never blocks writing jobs, and a full result pipe never stops jobs from being read
    (two blocked writers would deadlock)."""
    seqs, states, lock, waiting = shared
    inbox: queue.SimpleQueue[_Message | None] = queue.SimpleQueue()
    outbox: queue.SimpleQueue[tuple[list[_Result], float] | None] = queue.SimpleQueue()

    def read_jobs() -> None:
        try:
            while (message := jobs_in.recv()) is not None:
                inbox.put(message)
        except (EOFError, OSError):  # the driver went away
            pass
        except Exception:  # a message this process cannot rebuild (an import, a __reduce__)
            traceback.print_exc()
            os._exit(1)  # the driver then says which worker died, and how
        inbox.put(None)

    def send_results() -> None:
        while (item := outbox.get()) is not None:
            try:
                results_out.send(item)
            except OSError:  # the driver closed the pool
                return
            except Exception:  # a result that cannot be pickled fails its own job only
                try:
                    results_out.send((_sendable(item[0]), item[1]))
                except OSError:
                    return

    threads = [
        threading.Thread(target=read_jobs, name="pool jobs", daemon=True),
        threading.Thread(target=send_results, name="pool results", daemon=True),
    ]
    for thread in threads:
        thread.start()
    heap: list[tuple[float, int, int, str, Weights, Mapping[str, Any], bool]] = []
    snapshots: dict[int, Weights] = {}
    done: list[_Result] = []
    cpu = 0.0
    last_sent = time.perf_counter()

    def take(message: _Message | None) -> bool:
        if message is None:
            return False
        new, forget, jobs = message
        snapshots.update(new)
        for due, seq, slot, node_id, token, config, delta in jobs:
            heapq.heappush(heap, (due, seq, slot, node_id, snapshots[token], config, delta))
        for token in forget:  # one the worker never got (its message failed) is absent
            snapshots.pop(token, None)
        return True

    try:
        while True:
            if done and (not heap or waiting[index]):
                outbox.put((done, cpu))
                done, cpu, last_sent = [], 0.0, time.perf_counter()
            if not heap and not take(inbox.get()):
                return
            while True:
                try:
                    message = inbox.get_nowait()
                except queue.Empty:
                    break
                if not take(message):
                    return
            _, seq, slot, node_id, weights, config, delta = heapq.heappop(heap)
            with lock:
                if seqs[slot] != seq or states[slot] != _QUEUED:
                    continue  # taken back by the driver, discarded, or its slot reused
                states[slot] = _CLAIMED
            started = time.thread_time()  # this thread's: not the pickling threads'
            try:
                result = trainer(node_id, weights, config)
                if type(result) is TrainResult:  # its fields: cheaper to unpickle
                    checked = None
                    if delta:
                        # Under numpy's default error state, as the site computes it in
                        # the driver (a trainer may have changed this process's).
                        with np.errstate(
                            divide="warn", over="warn", under="ignore", invalid="warn"
                        ):
                            checked = trained_delta(result, weights)
                            if type(checked) is TrainedDelta:
                                # Its norm and wire size too, which the driver's
                                # protocol would measure next (MeasuredDelta), in this
                                # error state: squares may underflow where a trainer left
                                # numpy raising on it.
                                measured = measure_delta(checked.delta)
                    if type(checked) is TrainedDelta:  # the site's work, on this core
                        done.append((seq, _DELTA, (measured, checked.n_examples, checked.metrics)))
                    else:  # the site finds the same fault and fails the job
                        done.append(
                            (seq, _FIELDS, (result.weights, result.n_examples, result.metrics))
                        )
                else:
                    done.append((seq, _OBJECT, result))
            except Exception as exc:  # re-raised by join, for this job only
                done.append((seq, _FAILED, _picklable(exc)))
            took = time.thread_time() - started
            cpu += took
            now = time.perf_counter()
            if (
                not heap
                or waiting[index]
                or took >= flush_seconds
                or (now - last_sent >= flush_seconds)
            ):
                outbox.put((done, cpu))
                done, cpu, last_sent = [], 0.0, now
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the driver stops us
        return
    finally:
        outbox.put(None)
        for thread in threads[1:]:
            thread.join(timeout=5.0)


def _native(weights: Weights) -> bool:
    """Every tensor in this machine's byte order: a pickled array may come back in it
    whatever it was, so a delta made from a worker's copy of another would not be the
    site's bit for bit."""
    return all(getattr(value, "dtype", _NATIVE_F32).isnative for value in weights.values())


_NATIVE_F32 = np.dtype("=f4")


def _nbytes(weights: Weights) -> int:
    return sum(int(getattr(v, "nbytes", 0)) for v in weights.values())


class _Ticket:
    """One submitted job, as the driver tracks it."""

    __slots__ = ("config", "delta", "due", "node_id", "seq", "state", "weights", "worker")

    def __init__(
        self,
        seq: int,
        node_id: str,
        weights: Weights,
        config: Mapping[str, Any],
        due: float,
        delta: bool,
    ) -> None:
        self.seq = seq
        self.node_id = node_id
        self.weights = weights
        self.config = config
        self.due = due
        self.delta = delta  # a worker returns the site's TrainedDelta (see submit)
        self.state = _BUFFERED
        self.worker = -1


class _Worker:
    __slots__ = ("forget", "jobs", "kept", "kept_bytes", "outstanding", "process", "results")

    def __init__(self, process: Any, jobs: Any, results: Any) -> None:
        self.process = process
        self.jobs = jobs  # the driver's end: job messages out
        self.results = results  # the driver's end: result messages in
        self.outstanding = 0  # jobs sent and neither answered nor taken back (balancing)
        # Snapshots this worker keeps: id(weights) -> (token, weights), oldest first. The
        # strong reference keeps the id from being reused while the token stands for it.
        self.kept: dict[int, tuple[int, Weights]] = {}
        self.kept_bytes = 0
        self.forget: list[int] = []


class PoolExecutor:
    """Trains jobs ahead of time in worker processes; the driver never waits for a job a
    worker has not started.

    Each job is sent with its virtual due time (when its end event fires). A worker
    keeps its jobs in a heap and trains the one due first, so the results come back in
    about the order the driver needs them. When the driver joins a job whose result has
    not come back, it takes the job back and trains it itself, unless a worker has
    already claimed it (then it waits for that one job, and the worker sends what it has
    at once): claims and take-backs go through one shared lock per pool, so a job is
    trained by exactly one side. The driver is then one more worker, and a pool of one
    worker on two cores is faster than inline even for sub-millisecond jobs.

    Jobs travel in messages of about ``batch_seconds`` of training (learned from the CPU
    time the workers report), results likewise, and no job waits in the driver longer
    than that; until the first results come back, and for jobs of ``batch_seconds`` or
    more, each job goes alone. A model snapshot crosses to a worker once, whatever the
    number of jobs that train from it. Where a job is trained changes only when, never
    its result: a job is a pure function of its arguments.

    ``mp_context`` defaults to "spawn": forking a process that has started torch or BLAS
    threads can deadlock.
    """

    makes_trained_deltas = True  # submit(..., delta=True): see submit

    def __init__(
        self,
        trainer: Trainer,
        workers: int | None = None,
        *,
        mp_context: str = "spawn",
        batch_seconds: float = 0.01,
        max_batch: int = 256,
    ) -> None:
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        if not batch_seconds >= 0:
            raise ValueError(f"batch_seconds must be >= 0, got {batch_seconds!r}")
        if isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        n = workers if workers is not None else max(1, (os.cpu_count() or 2) - 1)
        ctx: Any = multiprocessing.get_context(mp_context)  # typeshed: BaseContext lacks Process
        self._trainer = trainer  # the driver trains the jobs it takes back
        self._seqs = ctx.RawArray("q", _RING)
        self._states = ctx.RawArray("b", _RING)
        self._waiting = ctx.RawArray("b", n)  # the driver waits on worker i's result
        self._lock = ctx.Lock()
        self._batch_seconds = batch_seconds
        self._max_batch = max_batch
        self._workers: list[_Worker] = []
        shared = (self._seqs, self._states, self._lock, self._waiting)
        try:  # each worker unpickles the trainer once
            for i in range(n):
                jobs_in, jobs_out = ctx.Pipe(duplex=False)
                results_in, results_out = ctx.Pipe(duplex=False)
                process = ctx.Process(
                    target=_worker_main,
                    args=(jobs_in, results_out, trainer, shared, i, batch_seconds),
                    name=f"fedloom-train-{i}",
                    daemon=True,
                )
                process.start()
                jobs_in.close()
                results_out.close()
                self._workers.append(_Worker(process, jobs_out, results_in))
        except BaseException:
            self.close()
            raise
        self._seq = 0
        self._owner = [-1] * _RING  # the seq each slot was last given to
        self._tokens = 0
        self._live: dict[int, _Ticket] = {}  # submitted, neither joined nor discarded
        self._results: dict[int, tuple[int, Any]] = {}
        self._buffer: list[_Ticket] = []
        self._buffer_since = 0.0
        self._job_seconds: float | None = None  # running mean of a job's CPU time
        # Diagnostics (tests, benches): messages and jobs sent, jobs the driver trained
        # itself after sending them, and joins that waited for a worker's claimed job.
        self.batches_sent = 0
        self.jobs_sent = 0
        self.jobs_taken_back = 0
        self.waits = 0

    def _batch_size(self) -> int:
        """Jobs per message: 1 until results have come back, then ~``batch_seconds``."""
        if self._job_seconds is None:
            return 1
        if self._job_seconds <= 0:
            return self._max_batch
        return max(1, min(self._max_batch, int(self._batch_seconds / self._job_seconds)))

    def submit(
        self,
        node_id: str,
        weights: Weights,
        config: Mapping[str, Any],
        *,
        due: float | None = None,
        delta: bool = False,
    ) -> _Ticket:
        """Start a job (see ``Executor.submit``). ``delta``: the job is a site's
        (``accepts_trained_delta``), and a worker that trains it returns the site's
        update, ``trained_delta(result, weights)``, where the checks pass: the same values,
        computed on the worker's core instead of the driver's, under numpy's default
        error state whatever the trainer left, as a ``MeasuredDelta`` (its norm and wire
        size measured there too, for the parent's checks and the link). A job the driver
        trains itself, one whose model is not in this machine's byte order, or one whose
        result fails the checks comes back as the trainer's result (the site then does
        that work itself)."""
        seq = self._seq
        self._seq += 1
        due = float(seq) if due is None else due
        delta = delta and _native(weights)
        ticket = _Ticket(seq, node_id, weights, dict(config), due, delta)
        self._live[seq] = ticket
        slot = seq % _RING
        if self._owner[slot] in self._live:  # its slot is still another job's
            ticket.state = _LOCAL
            return ticket
        self._owner[slot] = seq
        buffer = self._buffer
        buffer.append(ticket)
        if len(buffer) == 1:
            self._buffer_since = time.perf_counter()
        if (
            len(buffer) >= self._batch_size()
            or time.perf_counter() - self._buffer_since >= self._batch_seconds
        ):
            self._send()
        return ticket

    def _send(self) -> None:
        tickets = [t for t in self._buffer if t.state == _BUFFERED]
        self._buffer = []
        if not tickets:
            return
        w = min(range(len(self._workers)), key=lambda i: self._workers[i].outstanding)
        worker = self._workers[w]
        new: list[tuple[int, Weights]] = []
        jobs: list[_Job] = []
        seqs, states = self._seqs, self._states
        with self._lock:  # the slots' new owners, before any worker can see the jobs
            for t in tickets:
                slot = t.seq % _RING
                seqs[slot] = t.seq
                states[slot] = _QUEUED
        for t in tickets:
            t.state, t.worker = _SENT, w
            kept = worker.kept.get(id(t.weights))
            if kept is None:
                self._tokens += 1
                kept = worker.kept[id(t.weights)] = (self._tokens, t.weights)
                new.append(kept)
                worker.kept_bytes += _nbytes(t.weights)
                while len(worker.kept) > 1 and (
                    len(worker.kept) > _KEPT_SNAPSHOTS or worker.kept_bytes > _KEPT_BYTES
                ):
                    token, old = worker.kept.pop(next(iter(worker.kept)))
                    worker.forget.append(token)
                    worker.kept_bytes -= _nbytes(old)
            jobs.append((t.due, t.seq, t.seq % _RING, t.node_id, kept[0], t.config, t.delta))
        try:
            message = ForkingPickler.dumps((new, worker.forget, jobs))
        except Exception:  # something in a job cannot be pickled: the driver trains them
            for _token, weights in new:
                if worker.kept.pop(id(weights), None) is not None:  # not evicted meanwhile
                    worker.kept_bytes -= _nbytes(weights)
            for t in tickets:
                t.state = _LOCAL
            return
        worker.forget = []
        try:
            worker.jobs.send_bytes(message)
        except OSError as exc:  # BrokenPipeError: the worker is gone
            raise self._died(worker) from exc
        worker.outstanding += len(jobs)
        self.batches_sent += 1
        self.jobs_sent += len(jobs)

    @staticmethod
    def _died(worker: _Worker) -> ExecutorError:
        worker.process.join(timeout=1.0)
        code = worker.process.exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:  # a number this platform does not name
                how = f"killed by signal {-code}"
        return ExecutorError(f"training worker {worker.process.name} died ({how})")

    def _receive(self, worker: _Worker) -> None:
        try:
            done, cpu = worker.results.recv()
        except (EOFError, OSError) as exc:
            raise self._died(worker) from exc
        except Exception as exc:  # its jobs' results are lost with it: end the run clearly
            raise ExecutorError(
                f"a result message from training worker {worker.process.name} could not "
                f"be read: {exc!r}"
            ) from exc
        if not done:
            return
        worker.outstanding -= len(done)
        live, results = self._live, self._results
        for seq, how, value in done:
            if seq in live:  # else discarded (or trained by the driver) meanwhile
                results[seq] = (how, value)
        per_job = cpu / len(done)
        mean = self._job_seconds
        self._job_seconds = per_job if mean is None else 0.8 * mean + 0.2 * per_job

    def _take_back(self, t: _Ticket) -> bool:
        """Mark a sent job as the driver's unless a worker claimed it first."""
        slot = t.seq % _RING
        with self._lock:
            if self._seqs[slot] == t.seq and self._states[slot] == _QUEUED:
                self._states[slot] = _STOLEN
                return True
        return False

    def _wait(self, t: _Ticket) -> tuple[int, Any]:
        """Wait for the result of a job a worker claimed (it sends at once)."""
        worker = self._workers[t.worker]
        self.waits += 1
        self._waiting[t.worker] = 1
        try:
            while (result := self._results.pop(t.seq, None)) is None:
                if worker.results.poll(1.0):
                    self._receive(worker)
                elif not worker.process.is_alive():
                    raise self._died(worker)
        finally:
            self._waiting[t.worker] = 0
        return result

    def join(self, ticket: _Ticket) -> TrainResult | TrainedDelta:
        t = ticket
        result = self._results.pop(t.seq, None)
        if result is None and t.state == _SENT:
            worker = self._workers[t.worker]
            while worker.results.poll():
                self._receive(worker)
            result = self._results.pop(t.seq, None)
            if result is None:
                if self._take_back(t):
                    worker.outstanding -= 1
                    self.jobs_taken_back += 1
                else:
                    result = self._wait(t)
        if self._buffer and time.perf_counter() - self._buffer_since >= self._batch_seconds:
            self._send()
        t.state = _DONE
        del self._live[t.seq]
        if result is None:  # in the buffer, beyond the ring, or taken back: train it here
            mine: TrainResult = self._trainer(t.node_id, t.weights, t.config)
            return mine
        how, value = result
        if how == _DELTA:
            return TrainedDelta(*value)
        if how == _FIELDS:
            return TrainResult(*value)
        if how == _FAILED:
            raise value
        theirs: TrainResult = value
        return theirs

    def discard(self, ticket: _Ticket) -> None:
        t = ticket
        if t.state == _SENT and self._take_back(t):  # a claimed one runs; its result is dropped
            self._workers[t.worker].outstanding -= 1
        t.state = _DONE
        self._live.pop(t.seq, None)
        self._results.pop(t.seq, None)

    def close(self) -> None:
        """Stop the workers: each ends after its current job. Results still on their way
        are read and dropped meanwhile (a worker's sender blocked on a full pipe would
        otherwise hold it up), and a worker that does not end in 10 s is terminated."""
        for worker in self._workers:
            with contextlib.suppress(OSError, ValueError):
                worker.jobs.send(None)
        deadline = time.monotonic() + 10.0
        for worker in self._workers:
            while worker.process.is_alive() and time.monotonic() < deadline:
                try:
                    if worker.results.poll(0.05):
                        worker.results.recv()
                except (EOFError, OSError):  # its sender is done: it is exiting
                    worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
                except Exception:  # an unreadable message: dropped like the others
                    continue
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5.0)
            worker.jobs.close()
            worker.results.close()
        self._workers = []

    def __enter__(self) -> PoolExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
