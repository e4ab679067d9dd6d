"""Ray as the simulator's engine beyond one machine (``executor = "ray"``).

Runs go to a local Ray cluster started for the scenario (``workers`` CPUs, no dashboard,
quiet logs, shut down at the end) or to an existing cluster (``ray_address = "auto"`` on a
cluster node, or ``"HOST:6379"``). One of two levels runs as Ray tasks:

* by default, every training job (``RayExecutor``): the runs (arms × seeds) go one after
  another, and each job is submitted at its start event with its weights snapshot and
  joined at its end event, as with the process pool. For a run whose training dominates.
* with ``parallel_runs = true`` (``fedloom sim --parallel-runs``), every run of an arm on a
  seed (``run_seeds_on_ray``): they are independent, so all start at once, one task and one
  CPU each, training their own jobs inline; the driver gathers them in scenario order. For
  many arms and seeds. (Not both at once: a run waiting on its own job tasks would hold a
  worker process while more start, slower than either.)

Results do not depend on where a job or a run executes: a job is a pure function of
``(node_id, weights, config)`` with its randomness from ``config["seed"]``, and a run is a
pure function of (scenario, arm, seed). report.json is byte-identical to the inline
executor's for the same seeds (``tests/sim/test_ray_executor.py``); only the wall-clock
numbers in timing.json differ. Workers need the same fedloom and extras as the driver (the
code is imported there by name); data and weights travel with the tasks' arguments.

Ray is an extra (``pip install 'fedloom[ray]'``) and is imported only here, inside the
functions that need it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fedloom.algorithms.protocol import TrainResult, Weights
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.training import Trainer
from fedloom.sim.executors import ExecutorError
from fedloom.sim.scenario import Arm, Scenario

if TYPE_CHECKING:
    from fedloom.sim.report import ArmResult
    from fedloom.workloads.workload import Workload

_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_MISSING = "executor = \"ray\" needs the ray package: pip install 'fedloom[ray]'"
ADDRESS_FORMS = '"auto", "HOST:PORT" or "ray://HOST:PORT" (PORT 1 to 65535)'
# How long a cluster's address may take to accept a TCP connection before ray.init is tried
# (an unreachable GCS address makes ray.init retry for minutes).
PROBE_TIMEOUT_S = 5.0


class RayClusterError(ExecutorError):
    """The Ray cluster failed a run (a worker or node died, an object was lost): not a
    mistake in the scenario. ``fedloom sim`` prints it as one line, exit status 1."""


def ray_failure(exc: BaseException) -> RayClusterError:
    """A Ray system error (``ray.exceptions.RayError`` other than a task's own exception) as
    one line."""
    text = " ".join(str(exc).split())[:300]
    return RayClusterError(f"the Ray cluster failed the run: {type(exc).__name__}: {text}")


def import_ray() -> Any:
    """The ``ray`` module, or a ``ConfigError`` naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


def host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of "HOST:PORT" or "ray://HOST:PORT" (an IPv6 host in brackets), or
    None if ``address`` has neither form."""
    rest = address.removeprefix("ray://")
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep or not host or any(c not in "0123456789abcdefABCDEF:." for c in host):
            return None
    else:
        host, sep, port = rest.rpartition(":")
        if not sep or not host or any(c in host for c in ":/@?#[]\\"):
            return None
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return None
    return host, int(port)


def check_ray_address(address: str, where: str) -> str:
    """``address`` if it can name a Ray cluster ("auto", "HOST:PORT", "ray://HOST:PORT"),
    else a ``ConfigError`` at ``where``."""
    if (
        len(address) > 255
        or any(c.isspace() or not c.isprintable() for c in address)
        or (address != "auto" and host_port(address) is None)
    ):
        raise ConfigError(f"{where}: expected {ADDRESS_FORMS}, got {address[:80]!r}")
    return address


def _dial_address(address: str) -> str | None:
    """The address ``ray.init(address=...)`` dials: a Ray Client address as it is; else the
    GCS address Ray makes of it ("auto": RAY_ADDRESS, or the cluster ``ray start`` recorded
    on this node; localhost as this node's IP), a ``ConfigError`` where there is none. None
    for "auto" if this Ray lacks its private helper (ray.init then looks for itself)."""
    if address.startswith("ray://"):
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None if address == "auto" else address
    try:
        found: str | None = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError, OSError) as exc:
        raise ConfigError(f"ray_address {address!r}: {' '.join(str(exc).split())[:300]}") from None
    return found


def probe_address(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """A ``ConfigError`` unless the cluster's ``address`` ("auto" resolved first) accepts a
    TCP connection within ``timeout_s``: one line within seconds, where ``ray.init`` would
    retry for minutes."""
    target = _dial_address(address)
    parsed = host_port(target) if target is not None else None
    if parsed is None:
        return
    host, port = parsed
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        shown = f" ({target})" if target != address else ""
        raise ConfigError(
            f"ray_address {address!r}{shown}: cannot connect to {host}:{port}: {why}"
        ) from None


def with_executor_flags(
    scenario: Scenario,
    executor: str | None = None,
    ray_address: str | None = None,
    parallel_runs: bool = False,
) -> Scenario:
    """The scenario with ``fedloom sim``'s ``--executor``, ``--ray-address`` and
    ``--parallel-runs`` applied. The last two mean Ray: with ``--executor`` naming another
    executor they are an error."""
    wants_ray = ray_address is not None or parallel_runs
    if executor is not None and executor != "ray" and wants_ray:
        flag = "--ray-address" if ray_address is not None else "--parallel-runs"
        raise ConfigError(f"{flag}: only with --executor ray (got --executor {executor})")
    chosen = executor or ("ray" if wants_ray else scenario.executor)
    if chosen != "ray":
        return replace(scenario, executor=chosen, ray_address=None, parallel_runs=False)
    return replace(
        scenario,
        executor="ray",
        ray_address=(
            check_ray_address(ray_address, "--ray-address")
            if ray_address is not None
            else scenario.ray_address
        ),
        parallel_runs=parallel_runs or scenario.parallel_runs,
    )


class RaySession:
    """A connection to a Ray cluster for one run.

    If this process is already connected (a session opened further up, or a Ray worker
    running an arm), it is used and left alone. Otherwise ``address`` None starts a local
    cluster with ``workers`` CPUs, and an address connects to that cluster; ``close`` then
    disconnects (and stops the local cluster it started).
    """

    def __init__(self, address: str | None = None, workers: int = 2) -> None:
        if isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")
        self.ray = import_ray()
        self.owned = False
        self.stops_cluster = False  # close() stops a local cluster this session started
        self._auth_mode = os.environ.get("RAY_AUTH_MODE")
        if self.ray.is_initialized():
            return
        if address is not None:
            probe_address(address)  # seconds, where ray.init retries for minutes
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report
        quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        # A new local cluster keeps Ray's default token authentication, without the
        # warning Ray logs to say so at every start.
        auth_log = logging.getLogger(_AUTH_LOGGER)
        level = auth_log.level
        auth_log.setLevel(logging.ERROR)
        on_term = signal.getsignal(signal.SIGTERM)
        try:
            # Ray Client warns (UserWarning) before it gives up; the error says it all.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if address is None:
                    # "local": a new cluster even where RAY_ADDRESS or a `ray start` head
                    # node on this machine names one (ray.init() would join that).
                    self.ray.init(
                        address="local",
                        num_cpus=workers,
                        num_gpus=0,
                        include_dashboard=False,
                        **quiet,
                    )
                else:
                    self.ray.init(address=address, **quiet)
        except ValueError as exc:  # ray.init refusing the address or the settings
            text = " ".join(str(exc).split())[:300]
            raise ConfigError(f"ray_address {address!r}: {text}") from None
        except ConnectionError as exc:
            hint = (
                ""
                if os.environ.get("RAY_AUTH_MODE") == "token" or address in (None, "auto")
                else " (a cluster with token authentication also needs RAY_AUTH_MODE=token here "
                "and its token in ~/.ray/auth_token)"
            )
            raise ConfigError(f"ray_address {address!r}: cannot connect: {exc}{hint}") from None
        finally:
            auth_log.setLevel(level)
            # ray.init puts its own SIGTERM handler in place (a stack dump, then exit):
            # keep the Python one it replaced (``fedloom sim``'s, which unwinds the run).
            if callable(on_term) and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, on_term)
        self.owned = True
        self.stops_cluster = address is None

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
            # ray.init sets RAY_AUTH_MODE for this process; leave it as it was before.
            if self._auth_mode is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = self._auth_mode
        self.owned = self.stops_cluster = False

    def __enter__(self) -> RaySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The trainers this Ray worker process has unpickled, by object id: a run puts its trainer
# in the object store once, and a worker unpickles it once for all of that run's jobs it
# runs (as the pool's initializer does; unpickling a workload builds its data again).
_TRAINERS: dict[str, Trainer] = {}

# How long a closing executor waits for jobs in flight before cancelling the rest.
CLOSE_GRACE_S = 5.0
_TRAINERS_KEPT = 4


def _run_job(
    trainer_ref: list[Any], node_id: str, weights: Weights, config: Mapping[str, Any]
) -> Any:
    """One training job in a Ray worker. ``trainer_ref`` holds the trainer's object ref
    (in a list, so that Ray passes the ref rather than a fresh copy of the trainer)."""
    import ray

    (ref,) = trainer_ref
    key = ref.hex()
    trainer = _TRAINERS.get(key)
    if trainer is None:
        trainer = ray.get(ref)
        while len(_TRAINERS) >= _TRAINERS_KEPT:  # older runs' trainers
            _TRAINERS.pop(next(iter(_TRAINERS)))
        _TRAINERS[key] = trainer
    try:
        return trainer(node_id, weights, config)
    except BaseException:
        # Failed or interrupted (a discarded job is cancelled with KeyboardInterrupt): its
        # lazy state (a torch plan's module and tensors) may be half-built, so the next job
        # unpickles the trainer afresh.
        _TRAINERS.pop(key, None)
        raise


class RayExecutor:
    """Runs each training job as a Ray task (one CPU each); the trainer is put in the object
    store once, and each worker process unpickles it once (``_run_job``)."""

    def __init__(self, trainer: Trainer, *, address: str | None = None, workers: int = 2) -> None:
        self._session = RaySession(address, workers)
        ray = self._session.ray
        self._ray = ray
        self._trainer = ray.put(trainer)
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_run_job)
        self._open: set[Any] = set()  # submitted, neither joined nor discarded

    def submit(
        self,
        node_id: str,
        weights: Weights,
        config: Mapping[str, Any],
        *,
        due: float | None = None,
    ) -> Any:
        ticket = self._remote.remote([self._trainer], node_id, weights, dict(config))
        self._open.add(ticket)
        return ticket

    def join(self, ticket: Any) -> TrainResult:
        self._open.discard(ticket)
        errors = self._ray.exceptions
        try:
            result: TrainResult = self._ray.get(ticket)
        except errors.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            raise cause from None  # the job's own exception, as inline and the pool give
        except errors.RayError as exc:  # a worker or node died, an object was lost
            raise ray_failure(exc) from None
        return result

    def discard(self, ticket: Any) -> None:
        # Not started yet: it never runs; running or done: its result is dropped. Freeing
        # is best effort, never fatal.
        self._open.discard(ticket)
        with contextlib.suppress(Exception):
            self._ray.cancel(ticket)

    def close(self) -> None:
        # A run that ends (early on an error, or on time) leaves jobs in flight: on a
        # cluster that outlives the run they would go on using its CPUs, so they are
        # cancelled. A local cluster this run started stops with it, its workers and their
        # jobs too: no cancels there, which also keeps clear of Ray's race between a
        # cancel and the job's own reply (Ray 2.60 can abort the driver on it; README).
        # Jobs that finish within CLOSE_GRACE_S are let finish, not cancelled: at a run's
        # end the jobs in flight are usually seconds from done, and a cancel that meets
        # its job's reply is that race (it aborted this project's test run, in-process).
        if self._session.stops_cluster:
            self._open.clear()
        if self._open:
            with contextlib.suppress(Exception):
                open_jobs = list(self._open)
                done, _ = self._ray.wait(  # results stay where they are: never read
                    open_jobs, num_returns=len(open_jobs), timeout=CLOSE_GRACE_S, fetch_local=False
                )
                self._open.difference_update(done)  # finished: nothing to cancel
        while self._open:
            self.discard(next(iter(self._open)))
        self._session.close()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------- arms and seeds


def _run_arm_task(
    scenario: Scenario, arm: Arm, workload: Workload, seed: int
) -> tuple[ArmResult, list[str]]:
    """One arm on one seed in a Ray worker, its training jobs inline. Returns the result and
    the lines the arm logged (a sweep's points), for the driver to print."""
    from fedloom.sim.runner import run_arm

    lines: list[str] = []
    result = run_arm(replace(scenario, executor="inline"), arm, workload, seed, None, lines.append)
    return result, lines


def seeds_in_flight(cpus: float, arms: int) -> int:
    """How many seeds' runs ``run_seeds_on_ray`` keeps submitted at once: enough runs to
    keep every CPU of the cluster busy, and one seed more to wait on, so that the driver
    holds a few seeds' workloads rather than every seed's."""
    return max(1, math.ceil(max(cpus, 1.0) / max(arms, 1))) + 1


def _absolute_state_dirs(arms: Sequence[Arm]) -> list[Arm]:
    """The arms with a relative ``durability.state_dir`` made absolute here, at the driver
    (a Ray worker's working directory is not the driver's)."""
    out = []
    for arm in arms:
        where = arm.durability.state_dir
        if where is not None and not os.path.isabs(where):
            arm = replace(arm, durability=replace(arm.durability, state_dir=os.path.abspath(where)))
        out.append(arm)
    return out


def run_seeds_on_ray(
    scenario: Scenario,
    selected: Sequence[Arm],
    seeds: Sequence[int],
    progress: Callable[[str, float, float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[tuple[list[ArmResult], Workload]]:
    """Every selected arm on every seed as concurrent Ray tasks (``parallel_runs``); yields
    each seed's ``(results, workload)`` in order, as ``runner._run_seed`` gives them.

    Runs are submitted a few seeds ahead (``seeds_in_flight``: enough to fill the cluster's
    CPUs), not all at once, so that the driver holds only those seeds' workloads. Each
    seed's workload is built and its arms preflighted here before its runs start (an arm
    the factory refuses stops the scenario); the first run that fails cancels the others and
    raises its own exception (a ``RayClusterError`` where a worker or node died). Progress
    bars move when a run finishes."""
    from fedloom.sim.runner import against_plain, build_workload, preflight

    with RaySession(scenario.ray_address, scenario.workers) as session:
        ray = session.ray
        task = ray.remote(num_cpus=1, max_retries=0)(_run_arm_task)
        arms = _absolute_state_dirs(selected)
        window = seeds_in_flight(float(ray.cluster_resources().get("CPU", 1)), len(arms))
        todo = iter(seeds)
        pending: deque[tuple[int, Workload, list[Any]]] = deque()
        multi = len(seeds) > 1
        try:
            while True:
                while len(pending) < window and (seed := next(todo, None)) is not None:
                    workload = build_workload(scenario, seed)
                    if len(arms) > 1:
                        preflight(scenario, arms, workload, seed)
                    ref = ray.put(workload)
                    pending.append(
                        (seed, workload, [task.remote(scenario, a, ref, seed) for a in arms])
                    )
                if not pending:
                    return
                seed, workload, refs = pending[0]
                results: list[ArmResult] = []
                for arm, ref in zip(arms, refs, strict=True):
                    try:
                        result, lines = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                        raise cause from None  # one run failed (a ConfigError, say)
                    except ray.exceptions.RayError as exc:  # a worker or node died
                        raise ray_failure(exc) from None
                    if log is not None:
                        for line in lines:
                            log(line)
                    if progress is not None:
                        label = f"{arm.name} · seed {seed}" if multi else arm.name
                        progress(label, scenario.duration_s, scenario.duration_s)
                    results.append(result)
                pending.popleft()
                yield against_plain(selected, results), workload
        finally:
            # Failed, interrupted or abandoned: the runs still in flight are not wanted.
            for _, _, refs in pending:
                for other in refs:
                    with contextlib.suppress(Exception):
                        ray.cancel(other)
