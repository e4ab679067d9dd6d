"""The process pool trains jobs ahead of time and the driver takes back what no worker has
started: every job is trained exactly once, by whichever side, and its result is the one the
inline executor gives; workers train in due order; a claimed job is waited for; a failing
job fails only its own join; a dead worker is a clear error."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import TrainedDelta, TrainResult, Weights
from fedloom.algorithms.site import trained_delta
from fedloom.algorithms.weights_math import MeasuredDelta, l2_norm
from fedloom.sim import executors
from fedloom.sim.executors import InlineExecutor, PoolExecutor
from fedloom.transport.tensors import fp32_lz4_payload_size
from tests.conformance.toy_nodes import NoisyTrainer
from tests.sim.test_runner import small


class Marking(NoisyTrainer):
    """Creates ``<dir>/<seed>`` holding its pid when it trains a job (a second training of
    the same job fails: the file exists) and appends the seed to ``<dir>/order``. The job
    whose seed is ``hold`` waits for ``<dir>/go`` first (at most 30 s)."""

    def __init__(self, directory: Path, hold: int = -1) -> None:
        super().__init__()
        self.dir = directory
        self.hold = hold

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        seed = int(config["seed"])
        with open(self.dir / str(seed), "x") as f:
            f.write(str(os.getpid()))
        with open(self.dir / "order", "a") as f:
            f.write(f"{seed}\n")
        if seed == self.hold:
            _wait_for(lambda: (self.dir / "go").exists())
        return super().__call__(node_id, weights, config)


class FailsOnSeven(Marking):
    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        result = super().__call__(node_id, weights, config)
        if config["seed"] == 7:
            raise ValueError("job 7 fails")
        if config["seed"] == 8:  # an exception that holds a lock cannot be pickled back
            raise ValueError("job 8 fails", threading.Lock())
        return result


class ReturnsALambda(Marking):
    """Job 4's result cannot be pickled (a lambda among its metrics)."""

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        result = super().__call__(node_id, weights, config)
        if config["seed"] == 4:
            return TrainResult(result.weights, result.n_examples, {"f": lambda: 0})  # type: ignore[dict-item]
        return result


class UnbuildableError(Exception):
    """Pickles, but cannot be rebuilt (its constructor wants two arguments)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} {b}")


class RaisesUnbuildable(Marking):
    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        result = super().__call__(node_id, weights, config)
        if config["seed"] == 2:
            raise UnbuildableError("job 2", "fails")
        return result


def _explode() -> None:
    raise ValueError("this job cannot be rebuilt")


class Bomb:
    """Pickles, and fails when a worker unpickles it."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_explode, ())


class DiesOnThree(Marking):
    """Job 3 ends a worker process (never the test's own)."""

    def __init__(self, directory: Path, parent: int) -> None:
        super().__init__(directory)
        self.parent = parent

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        result = super().__call__(node_id, weights, config)
        if config["seed"] == 3 and os.getpid() != self.parent:
            os._exit(3)
        return result


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.005)


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


def _trained_by(directory: Path, seed: int) -> int:
    return int((directory / str(seed)).read_text())


def _order(directory: Path) -> list[int]:
    return [int(line) for line in (directory / "order").read_text().split()]


def test_each_job_is_trained_once_by_either_side_with_the_inline_result(tmp_path: Path) -> None:
    jobs = _jobs(300)
    inline = InlineExecutor(NoisyTrainer())
    expected = [inline.join(inline.submit(*job)) for job in jobs]
    dues = np.random.default_rng(0).permutation(len(jobs)).astype(float)
    with PoolExecutor(Marking(tmp_path), workers=2, batch_seconds=0.05) as pool:
        tickets = [pool.submit(*job, due=dues[i]) for i, job in enumerate(jobs[:10])]
        _wait_for(lambda: len(list(tmp_path.iterdir())) > 10)  # each alone until one came back
        for i in range(10):
            assert _same(pool.join(tickets[i]), expected[i])  # teaches the pool a job's cost
        tickets += [pool.submit(*job, due=dues[i]) for i, job in enumerate(jobs) if i >= 10]
        for i in range(50, 300, 50):  # joined at once: mostly trained by the driver
            assert _same(pool.join(tickets[i]), expected[i])
        # Jobs wait in the driver for a full message, or batch_seconds counted at its next
        # submit or join (a batch may be most of them): send them as that would.
        pool._send()
        _wait_for(lambda: len(list(tmp_path.iterdir())) > 250)  # the workers caught up
        discarded = {i for i in range(5, 300, 37)}
        for i in discarded:
            pool.discard(tickets[i])
        for i in np.random.default_rng(1).permutation(len(jobs)):  # any join order
            if i >= 10 and i % 50 and i not in discarded:
                assert _same(pool.join(tickets[i]), expected[i])  # trained once: else raises
        assert 0 < pool.jobs_sent <= 300
        assert pool.batches_sent < pool.jobs_sent  # small jobs share messages
    pids = {_trained_by(tmp_path, i) for i in range(300) if i not in discarded}
    assert os.getpid() in pids and len(pids) >= 2  # the driver and a worker both trained


def test_workers_train_in_due_order_and_a_claimed_job_is_waited_for(tmp_path: Path) -> None:
    jobs = _jobs(6)
    inline = InlineExecutor(NoisyTrainer())
    with PoolExecutor(Marking(tmp_path, hold=0), workers=1) as pool:
        first = pool.submit(*jobs[0], due=0.0)
        _wait_for(lambda: (tmp_path / "0").exists())  # claimed: the worker holds it
        dues = [5.0, 3.0, 1.0, 4.0, 2.0]
        tickets = [pool.submit(*job, due=d) for job, d in zip(jobs[1:], dues, strict=True)]
        threading.Timer(0.2, (tmp_path / "go").touch).start()
        assert _same(pool.join(first), inline.join(inline.submit(*jobs[0])))
        assert pool.waits == 1  # it waited for the worker instead of training it again
        _wait_for(lambda: len(_order(tmp_path)) == 6)
        assert _order(tmp_path) == [0, 3, 5, 2, 4, 1]  # by due time, not by submission
        for job, t in zip(jobs[1:], tickets, strict=True):
            assert _same(pool.join(t), inline.join(inline.submit(*job)))
        assert pool.jobs_taken_back == 0
    assert {_trained_by(tmp_path, i) for i in range(6)} != {os.getpid()}


def test_the_driver_takes_back_what_no_worker_started_and_discards_never_run(
    tmp_path: Path,
) -> None:
    jobs = _jobs(4)
    inline = InlineExecutor(NoisyTrainer())
    with PoolExecutor(Marking(tmp_path, hold=0), workers=1) as pool:
        held = pool.submit(*jobs[0], due=0.0)
        # In the order file, not only begun: else the driver's job 1 may be written first.
        _wait_for(lambda: (tmp_path / "order").exists() and _order(tmp_path) == [0])
        waiting, dropped, last = (pool.submit(*job, due=i + 1.0) for i, job in enumerate(jobs[1:]))
        assert _same(pool.join(waiting), inline.join(inline.submit(*jobs[1])))
        assert pool.jobs_taken_back == 1 and _trained_by(tmp_path, 1) == os.getpid()
        pool.discard(dropped)
        (tmp_path / "go").touch()
        pool.join(held)
        _wait_for(lambda: (tmp_path / "3").exists())  # due after the dropped one
        assert _same(pool.join(last), inline.join(inline.submit(*jobs[3])))
    assert _order(tmp_path) == [0, 1, 3]  # job 2 never ran: job 3, due later, did


@pytest.mark.parametrize("where", ["worker", "driver"])
def test_a_failing_job_fails_its_own_join_only(tmp_path: Path, where: str) -> None:
    jobs = _jobs(10)
    inline = InlineExecutor(NoisyTrainer())
    with PoolExecutor(FailsOnSeven(tmp_path), workers=1) as pool:
        tickets = [pool.submit(*job, due=float(i)) for i, job in enumerate(jobs)]
        if where == "worker":
            _wait_for(
                lambda: len(_order(tmp_path)) == 10 if (tmp_path / "order").exists() else False
            )
        for i, t in enumerate(tickets):
            if i == 7:
                with pytest.raises(ValueError, match="job 7 fails"):
                    pool.join(t)
            elif i == 8:  # from a worker it comes back as a RuntimeError naming it
                with pytest.raises((ValueError, RuntimeError), match="job 8 fails"):
                    pool.join(t)
            else:
                assert _same(pool.join(t), inline.join(inline.submit(*jobs[i])))


def test_a_dead_worker_is_a_clear_error(tmp_path: Path) -> None:
    jobs = _jobs(5)
    with PoolExecutor(DiesOnThree(tmp_path, os.getpid()), workers=1) as pool:
        tickets = [pool.submit(*job, due=float(i)) for i, job in enumerate(jobs)]
        _wait_for(lambda: not pool._workers[0].process.is_alive())
        with pytest.raises(RuntimeError, match=r"fedloom-train-0 died \(exit code 3\)"):
            for t in tickets:  # at the latest at job 3's: its worker never answers
                pool.join(t)


@pytest.mark.parametrize("bad", [{"batch_seconds": -1.0}, {"max_batch": 0}, {"workers": 0}])
def test_bad_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PoolExecutor(NoisyTrainer(), **bad)


def test_close_ends_workers_whose_results_were_never_read(tmp_path: Path) -> None:
    """A run that ends with jobs in flight: more results than a pipe holds are on their
    way, and the workers still end by themselves (exit code 0, not terminated)."""
    with PoolExecutor(Marking(tmp_path), workers=1) as pool:
        for i, job in enumerate(_jobs(1200)):
            pool.submit(*job, due=float(i))
        _wait_for(lambda: len(list(tmp_path.iterdir())) > 1000)
        processes = [w.process for w in pool._workers]
    assert [p.exitcode for p in processes] == [0]


@pytest.mark.timeout(60)
def test_a_slot_is_not_reused_while_its_job_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 4 slots, a job still queued at a busy worker keeps its slot while later jobs
    (seq + 4, seq + 8) come and go: they stay in the driver, and the queued job is then
    trained and joined (an overwritten slot made the worker skip it and the join wait)."""
    monkeypatch.setattr(executors, "_RING", 4)
    jobs = _jobs(12)
    inline = InlineExecutor(NoisyTrainer())
    with PoolExecutor(Marking(tmp_path, hold=0), workers=1) as pool:
        held = pool.submit(*jobs[0], due=0.0)
        _wait_for(lambda: (tmp_path / "0").exists())
        far = pool.submit(*jobs[1], due=1000.0)  # queued behind the held job
        for k in range(2, 12):
            assert _same(
                pool.join(pool.submit(*jobs[k], due=float(k))), inline.join(inline.submit(*jobs[k]))
            )
        (tmp_path / "go").touch()
        pool.join(held)
        assert _same(pool.join(far), inline.join(inline.submit(*jobs[1])))
    assert _trained_by(tmp_path, 1) != os.getpid()  # the worker trained it, once


def test_more_snapshots_than_a_worker_keeps_all_train_from_the_right_one(tmp_path: Path) -> None:
    models = [{"w": np.full((4, 3), float(i), np.float32)} for i in range(100)]
    jobs = [(f"site-{i}", models[i], {"seed": i}) for i in range(100)]
    inline = InlineExecutor(NoisyTrainer())
    with PoolExecutor(Marking(tmp_path), workers=1) as pool:
        tickets = [pool.submit(*job, due=float(i)) for i, job in enumerate(jobs)]
        _wait_for(lambda: len(list(tmp_path.iterdir())) == 101)  # 100 markers and "order"
        assert len(pool._workers[0].kept) == 64  # the worker was told to forget 36
        for job, t in zip(jobs, tickets, strict=True):
            assert _same(pool.join(t), inline.join(inline.submit(*job)))
        assert pool.jobs_taken_back == 0


@pytest.mark.parametrize(
    ("trainer", "bad", "error"),
    [(ReturnsALambda, 4, "result cannot be pickled"), (RaisesUnbuildable, 2, "job 2 fails")],
)
def test_a_result_or_exception_that_cannot_travel_fails_its_own_job(
    tmp_path: Path, trainer: type[Marking], bad: int, error: str
) -> None:
    with PoolExecutor(trainer(tmp_path), workers=1) as pool:
        tickets = [pool.submit(*job, due=float(i)) for i, job in enumerate(_jobs(6))]
        _wait_for(lambda: len(list(tmp_path.iterdir())) == 7)  # all trained by the worker
        for i, t in enumerate(tickets):
            if i == bad:
                with pytest.raises(RuntimeError, match=error):
                    pool.join(t)
            else:
                assert pool.join(t).n_examples == 10


def test_a_job_a_worker_cannot_read_ends_the_worker_and_the_join_says_so() -> None:
    with PoolExecutor(NoisyTrainer(), workers=1) as pool:
        ticket = pool.submit("site-0", {"w": np.zeros(3, np.float32)}, {"seed": 1, "x": Bomb()})
        _wait_for(lambda: not pool._workers[0].process.is_alive())
        with pytest.raises(RuntimeError, match=r"fedloom-train-0 died \(exit code 1\)"):
            pool.join(ticket)


def test_fedloom_sim_prints_a_dead_worker_as_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The error a dead worker raises reaches the user as one line, exit status 1."""
    from fedloom import cli
    from fedloom.sim import commands

    with PoolExecutor(DiesOnThree(tmp_path, os.getpid()), workers=1) as pool:
        ticket = pool.submit(*_jobs(4)[3], due=0.0)
        _wait_for(lambda: not pool._workers[0].process.is_alive())
        with pytest.raises(executors.ExecutorError) as died:
            pool.join(ticket)

    def run_fails(*args: object, **kwargs: object) -> int:
        raise died.value

    monkeypatch.setattr(commands, "cmd_sim", run_fails)
    assert cli.main(["sim", str(tmp_path / "any.toml")]) == 1
    err = capsys.readouterr().err
    assert err == "fedloom: error: training worker fedloom-train-0 died (exit code 3)\n"


def test_a_killed_worker_is_named_with_its_signal() -> None:
    with PoolExecutor(NoisyTrainer(), workers=1, batch_seconds=0.0) as pool:  # each job alone
        ticket = pool.submit(*_jobs(1)[0], due=0.0)
        pool.join(ticket)  # the worker is up
        process = pool._workers[0].process
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)
        with pytest.raises(
            executors.ExecutorError, match=r"fedloom-train-0 died \(killed by SIGKILL\)"
        ):
            for job in _jobs(3):  # a job sent to it, or a read of its pipe, finds it gone
                pool.join(pool.submit(*job, due=1.0))


class NonFiniteOnFive(Marking):
    """Job 5 diverges: its weights hold an infinity."""

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        result = super().__call__(node_id, weights, config)
        if config["seed"] == 5:
            return TrainResult({k: v + np.inf for k, v in result.weights.items()}, 1)
        return result


def test_a_site_job_trained_by_a_worker_comes_back_as_its_checked_delta(tmp_path: Path) -> None:
    # What the site would make of the trainer's result, made on the worker's core instead:
    # the same delta bit for bit; a job whose weights fail the site's checks, and a job
    # not submitted as a site's, come back as the trainer's result.
    base = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)}
    jobs = [(f"site-{i}", base, {"seed": i}) for i in range(8)]
    trainer = NonFiniteOnFive(tmp_path / "inline")
    (tmp_path / "inline").mkdir()
    expected = [trainer(*job) for job in jobs]
    (tmp_path / "pool").mkdir()
    with PoolExecutor(NonFiniteOnFive(tmp_path / "pool"), workers=1) as pool:
        tickets = [pool.submit(*job, due=float(i), delta=i != 6) for i, job in enumerate(jobs)]
        order = tmp_path / "pool" / "order"
        _wait_for(lambda: order.exists() and len(_order(tmp_path / "pool")) == 8)
        results = [pool.join(t) for t in tickets]
        assert pool.jobs_taken_back == 0  # every one trained by the worker
    for i, (result, want) in enumerate(zip(results, expected, strict=True)):
        if i in (5, 6):
            assert type(result) is TrainResult and _same(result, want)
            continue
        assert type(result) is TrainedDelta
        made = trained_delta(want, base)
        assert type(made) is TrainedDelta
        assert result.delta.keys() == made.delta.keys() == {"w"}
        assert result.delta["w"].dtype == np.float32
        assert result.delta["w"].tobytes() == made.delta["w"].tobytes()
        assert (result.n_examples, result.metrics) == (made.n_examples, made.metrics)
        # Measured there too: the norm and wire payload the driver would compute next.
        assert type(result.delta) is MeasuredDelta
        assert math.sqrt(result.delta.sum_squares) == l2_norm(made.delta)
        assert result.delta.lz4_payload == fp32_lz4_payload_size(made.delta["w"].tobytes())
    assert trained_delta(expected[5], base) == "non-finite weights"


class PlusOneMarking(Marking):
    """Adds one to every weight, keeping each tensor an array (a 0-d one too)."""

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        super().__call__(node_id, weights, config)  # marks the job as trained here
        return TrainResult({k: np.asarray(v + 1, dtype=v.dtype) for k, v in weights.items()}, 3)


def test_a_model_with_a_0d_tensor_gives_the_same_delta_from_a_worker(tmp_path: Path) -> None:
    # A 0-d tensor's difference is a numpy scalar: the site keeps it an array (the parent
    # refuses anything else), and the worker measures it as any other.
    base = {"w": np.ones(4, np.float32), "temp": np.array(0.5, np.float32)}
    (tmp_path / "inline").mkdir()
    made = trained_delta(PlusOneMarking(tmp_path / "inline")("s1", base, {"seed": 0}), base)
    assert type(made) is TrainedDelta
    assert type(made.delta["temp"]) is np.ndarray and made.delta["temp"].shape == ()
    (tmp_path / "pool").mkdir()
    with PoolExecutor(PlusOneMarking(tmp_path / "pool"), workers=1) as pool:
        ticket = pool.submit("s1", base, {"seed": 0}, due=0.0, delta=True)
        order = tmp_path / "pool" / "order"
        _wait_for(lambda: order.exists() and len(_order(tmp_path / "pool")) == 1)
        result = pool.join(ticket)
    assert type(result) is TrainedDelta and type(result.delta) is MeasuredDelta
    assert {k: v.tobytes() for k, v in result.delta.items()} == {
        k: v.tobytes() for k, v in made.delta.items()
    }
    assert math.sqrt(result.delta.sum_squares) == l2_norm(made.delta)


class RaisesOnNumpyErrors(Marking):
    """Leaves numpy raising on every floating-point error in the process that trained
    (as a trainer may), and returns float32 weights whose delta underflows in float16."""

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        super().__call__(node_id, weights, config)
        np.seterr(all="raise")
        return TrainResult({"w": np.full(3, 1e-6, np.float32)}, 1)


def test_a_workers_delta_does_not_depend_on_what_its_trainer_did_to_numpy(
    tmp_path: Path,
) -> None:
    base = {"w": np.zeros(3, np.float16)}
    with np.errstate():  # whatever happens, this process's error state is restored
        want = trained_delta(TrainResult({"w": np.full(3, 1e-6, np.float32)}, 1), base)
        assert type(want) is TrainedDelta  # underflow: a subnormal float16, no error
        with PoolExecutor(RaisesOnNumpyErrors(tmp_path), workers=1) as pool:
            tickets = [
                pool.submit(f"s{i}", base, {"seed": i}, due=float(i), delta=True) for i in (1, 2)
            ]
            _wait_for(lambda: (tmp_path / "order").exists() and len(_order(tmp_path)) == 2)
            results = [pool.join(t) for t in tickets]
            assert pool.jobs_taken_back == 0
    for result in results:  # the second job trained under the first's np.seterr
        assert type(result) is TrainedDelta
        assert result.delta["w"].dtype == np.float16
        assert result.delta["w"].tobytes() == want.delta["w"].tobytes()


def test_a_model_in_the_other_byte_order_comes_back_as_the_trainers_result(
    tmp_path: Path,
) -> None:
    # A pickled array may cross in this machine's byte order: a delta made from the
    # worker's copy would differ from the site's in its bytes, so the site makes it.
    base = {"w": np.arange(1, 13, dtype=">f4").reshape(4, 3)}
    with PoolExecutor(Marking(tmp_path), workers=1) as pool:
        ticket = pool.submit("s1", base, {"seed": 1}, due=0.0, delta=True)
        _wait_for(lambda: (tmp_path / "1").exists())
        result = pool.join(ticket)
    assert type(result) is TrainResult


class DeltaInline(InlineExecutor):
    """An inline executor that makes the sites' deltas itself, as a pool's worker does,
    and records which jobs were submitted as a site's."""

    makes_trained_deltas = True

    def __init__(self, trainer: Any) -> None:
        super().__init__(trainer)
        self.flags: list[tuple[str, bool]] = []

    def submit(  # type: ignore[override]
        self,
        node_id: str,
        weights: Weights,
        config: Mapping[str, Any],
        *,
        due: Any = None,
        delta: bool = False,
    ) -> Any:
        self.flags.append((node_id, delta))
        return (node_id, weights, config, delta)

    def join(self, ticket: Any) -> Any:
        node_id, weights, config, delta = ticket
        result = self.trainer(node_id, weights, config)
        made = trained_delta(result, weights) if delta else result
        return made if type(made) is TrainedDelta else result


# 30 sites for half a virtual hour (about 400 jobs), regional FedBuff.
POOLED = small(
    [{"name": "fedbuff", "algorithm": "fedbuff", "buffer_size": 2, "topology": "hierarchical"}],
    duration_h=0.5,
    sites={"count": 30, "regions": ["a", "b"]},
)


def _site_results(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from fedloom.algorithms.site import SiteNode

    kinds: list[str] = []
    on_done = SiteNode._on_done

    def spy(self: SiteNode, event: Any, now: float) -> Any:
        kinds.append(type(event.result).__name__)
        return on_done(self, event, now)

    monkeypatch.setattr(SiteNode, "_on_done", spy)
    return kinds


def test_the_driver_asks_for_the_sites_deltas_and_the_report_is_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedloom.sim import runner
    from fedloom.sim.report import report_to_dict, strip_wall
    from fedloom.sim.scenario import parse_scenario

    kinds = _site_results(monkeypatch)
    inline = strip_wall(report_to_dict(runner.run_scenario(parse_scenario(POOLED))))
    assert set(kinds) == {"TrainResult"} and len(kinds) > 100
    kinds.clear()
    made: list[DeltaInline] = []

    def deltas_made_here(scenario: Any, workload: Any, ids: Any) -> DeltaInline:
        made.append(DeltaInline(runner.WorkloadTrainer(workload, ids)))
        return made[-1]

    monkeypatch.setattr(runner, "_make_executor", deltas_made_here)
    theirs = strip_wall(report_to_dict(runner.run_scenario(parse_scenario(POOLED))))
    assert set(kinds) == {"TrainedDelta"} and len(kinds) > 100  # every site's job
    assert made and all(delta for _, delta in made[0].flags)  # submitted as a site's
    assert {node for node, _ in made[0].flags} <= {f"site-{i:03d}" for i in range(30)}
    assert theirs == inline


def test_a_pooled_run_gives_the_inline_report(monkeypatch: pytest.MonkeyPatch) -> None:
    # How many jobs a worker trains ahead depends on timing (the driver takes back the
    # rest); whichever side made each delta, the report is the inline one.
    from fedloom.sim.report import report_to_dict, strip_wall
    from fedloom.sim.runner import run_scenario
    from fedloom.sim.scenario import parse_scenario

    kinds = _site_results(monkeypatch)
    inline = strip_wall(report_to_dict(run_scenario(parse_scenario(POOLED))))
    pooled = run_scenario(parse_scenario({**POOLED, "executor": "process", "workers": 1}))
    assert strip_wall(report_to_dict(pooled)) == inline
    assert len(kinds) > 200
