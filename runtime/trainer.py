"""Training plans in the runtime, and an adapter for Flower-shaped clients.

The driver trains through a ``Trainer``: ``trainer(node_id, weights, config) ->
TrainResult`` (the same shape the simulator uses), run in an executor. Here:

* ``PlanTrainer(plan)``: a ``Trainer`` over one ``TrainingPlan`` (picklable when the plan
  is, so it also runs in a process pool);
* ``SitePlan(workload, i)``: site ``i``'s plan of a ``workloads.workload.Workload``, built on
  first use in whichever process trains (it pickles to the workload's specs only);
* ``NumPyClientPlan(client)``: any object shaped like Flower's ``NumPyClient``
  (``get_parameters(config)``, ``fit(parameters, config)``, ``evaluate(parameters,
  config)``) as a ``TrainingPlan``, without importing flwr. Parameters are named
  ``"p0"``, ``"p1"``, ... in the client's order; ``fit`` gets the config keys Flower
  clients read (``server_round``, ``lr``, ``local_epochs``, ...: ``runtime.flower``), and
  ``Client`` objects, ``client_fn(context)`` factories and ``ClientApp``s are dealt with
  there too;
* ``plan_from_config`` / ``load_factory``: a plan from a daemon's ``[plan]`` table;
* ``DeferredPlan``: the same, built on first use (a site under ``[governance]`` approval
  imports and calls its plan's code at the first job the gate lets through, not at start);
* ``make_executor``: the thread or process pool jobs run in.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import inspect
import math
import multiprocessing
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.protocol import TrainResult, Weights
from fedloom.algorithms.training import TrainingPlan
from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.flower import call_factory, fit_config, is_client_app, unwrap_client


class PlanTrainer:
    """A driver ``Trainer`` that runs ``plan.train`` (the node id is not needed)."""

    def __init__(self, plan: TrainingPlan) -> None:
        self.plan = plan

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        return self.plan.train(weights, config)


class SitePlan:
    """Site ``index``'s training plan of ``workload``, built lazily; pickles small."""

    def __init__(self, workload: Any, index: int) -> None:
        if not 0 <= index < workload.n_sites:
            raise ValueError(f"site index {index} out of range 0 .. {workload.n_sites - 1}")
        self.workload = workload
        self.index = index

    def _plan(self) -> TrainingPlan:
        plan: TrainingPlan = self.workload.site_plan(self.index)
        return plan

    def init(self, seed: int) -> Weights:
        weights: Weights = self.workload.init_weights(seed)
        return weights

    def train(self, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        return self._plan().train(weights, config)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        return self._plan().evaluate(weights)


# ---------------------------------------------------------------------- Flower adapter


def param_name(i: int) -> str:
    return f"p{i}"


class NumPyClientPlan:
    """A ``TrainingPlan`` over an object with Flower's ``NumPyClient`` shape.

    The client's parameter list becomes ``{"p0": ..., "p1": ..., ...}``. Floating arrays
    keep their dtype; integer or boolean ones (e.g. a batch-norm counter) travel as
    float32 and are handed back to the client in their own dtype; 0-d ones travel with
    shape (1,) and go back 0-d. Arrays the client
    returns are copied, so it may keep updating its own buffers. A client that returns
    the wrong number or shapes of arrays raises ``ValueError`` (the driver reports the
    job as failed). ``fit`` gets ``runtime.flower.fit_config`` of the job's config (its
    scalars and the keys Flower clients read; ``run_config``: ``[plan.args]``), with
    ``server_round`` counting this plan's jobs when the caller gave none; ``evaluate``
    gets the last job's (``server_round`` 0 before any).
    """

    def __init__(self, client: Any, run_config: Mapping[str, Any] | None = None) -> None:
        for method in ("get_parameters", "fit", "evaluate"):
            if not callable(getattr(client, method, None)):
                raise TypeError(
                    f"NumPyClientPlan: {type(client).__name__} has no {method}() method "
                    "(expected Flower's NumPyClient shape)"
                )
        self.client = client
        self.run_config = dict(run_config or {})
        self._layout: list[tuple[tuple[int, ...], np.dtype[Any]]] | None = None
        self._jobs = 0
        self._last_config: dict[str, Any] | None = None

    # -- TrainingPlan

    def init(self, seed: int) -> Weights:
        """The client's current parameters (``seed`` is the client's business)."""
        params = self._arrays(self.client.get_parameters({}), "get_parameters")
        self._layout = [(a.shape, a.dtype) for a in params]
        return self._to_weights(params)

    def train(self, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        self._jobs += 1
        flower = fit_config(config, self.run_config)
        flower.setdefault("server_round", self._jobs)
        self._last_config = flower
        out = self.client.fit(self._to_params(weights), dict(flower))
        if not isinstance(out, tuple | list) or len(out) != 3:
            raise ValueError(
                f"NumPyClient.fit must return (parameters, num_examples, metrics), got {_show(out)}"
            )
        params, n_examples, metrics = out
        trained = self._to_weights(self._arrays(params, "fit"))
        n = _count(n_examples, "fit")
        return TrainResult(trained, n, _float_metrics(metrics, "fit"))

    def evaluate(self, weights: Weights) -> dict[str, float]:
        config = self._last_config or {**fit_config({}, self.run_config), "server_round": 0}
        out = self.client.evaluate(self._to_params(weights), dict(config))
        if not isinstance(out, tuple | list) or len(out) != 3:
            raise ValueError(
                f"NumPyClient.evaluate must return (loss, num_examples, metrics), got {_show(out)}"
            )
        loss, n_examples, metrics = out
        result = _float_metrics(metrics, "evaluate")
        result["loss"] = _number(loss, "evaluate: loss")
        result.setdefault("accuracy", math.nan)
        result["n_examples"] = float(_count(n_examples, "evaluate"))
        return result

    # -- conversions

    def _expected(self) -> list[tuple[tuple[int, ...], np.dtype[Any]]]:
        if self._layout is None:
            params = self._arrays(self.client.get_parameters({}), "get_parameters")
            self._layout = [(a.shape, a.dtype) for a in params]
        return self._layout

    def _to_params(self, weights: Weights) -> list[npt.NDArray[Any]]:
        layout = self._expected()
        names = [param_name(i) for i in range(len(layout))]
        if set(weights) != set(names):
            missing = [n for n in names if n not in weights]
            extra = sorted(set(weights) - set(names))
            raise ValueError(
                f"weights do not match the client's {len(layout)} parameters "
                f"(missing {missing[:5]}, unexpected {extra[:5]})"
            )
        out: list[npt.NDArray[Any]] = []
        for name, (shape, dtype) in zip(names, layout, strict=True):
            arr = np.asarray(weights[name])
            if shape == () and arr.shape == (1,):
                arr = arr.reshape(())  # a scalar travels as shape (1,) (``_to_weights``)
            if arr.shape != shape:
                raise ValueError(f"{name}: shape {arr.shape}, the client expects {shape}")
            # A copy: the client may train in place, and our arrays are shared.
            out.append(np.array(arr, dtype=dtype, copy=True))
        return out

    def _arrays(self, params: Any, where: str) -> list[npt.NDArray[Any]]:
        if not isinstance(params, Sequence) or isinstance(params, str | bytes):
            raise ValueError(
                f"NumPyClient.{where} must return a list of arrays, got {_show(params)}"
            )
        arrays = [np.array(p, copy=True) for p in params]
        if not arrays and where == "get_parameters":
            # Flower's own NumPyClient.get_parameters returns []: a model of no tensors
            # would train nothing (a ConfigError: one line at the root's start).
            raise ConfigError(
                "NumPyClient.get_parameters() returned no parameters: define it to return "
                "the model's arrays (Flower's default returns [])"
            )
        for i, a in enumerate(arrays):
            if a.dtype.kind not in "fiub":
                raise ValueError(f"NumPyClient.{where}: parameter {i} has dtype {a.dtype}")
        layout = self._layout
        if layout is not None and where == "fit":
            if len(arrays) != len(layout):
                raise ValueError(
                    f"NumPyClient.fit returned {len(arrays)} arrays, expected {len(layout)}"
                )
            for i, (a, (shape, _)) in enumerate(zip(arrays, layout, strict=True)):
                if a.shape != shape:
                    raise ValueError(f"NumPyClient.fit: p{i} has shape {a.shape}, expected {shape}")
        return arrays

    def _to_weights(self, arrays: list[npt.NDArray[Any]]) -> Weights:
        out: Weights = {}
        for i, a in enumerate(arrays):
            # A 0-d parameter (a scalar bias, a batch-norm counter) travels as shape (1,):
            # arithmetic on 0-d arrays gives numpy scalars, which are no tensors to send.
            flat = a.reshape(1) if a.ndim == 0 else a
            out[param_name(i)] = flat if flat.dtype.kind == "f" else flat.astype(np.float32)
        return out


def _float_metrics(metrics: Any, where: str) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ValueError(f"NumPyClient.{where}: metrics must be a dict, got {_show(metrics)}")
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool | int | float | np.integer | np.floating):
            out[str(k)] = float(v)  # strings and bytes are Flower-only extras: dropped
    return out


MAX_EXAMPLES = 2**62  # beyond, the wire's 64-bit ints cannot carry an update's count


def _count(value: Any, where: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or not 0 <= value <= MAX_EXAMPLES
    ):
        raise ValueError(
            f"NumPyClient.{where}: num_examples must be an int >= 0 (at most 2**62), "
            f"got {_show(value)}"
        )
    return int(value)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"NumPyClient.{what} must be a number, got {_show(value)}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"NumPyClient.{what} must be a number, got {_show(value)}") from None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------ from config


def load_factory(path: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:attribute"`` (``ConfigError`` if absent)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f'plan.factory: expected "module:callable", got {path!r}')
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"plan.factory: cannot import {module_name!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"plan.factory: {module_name!r} has no attribute {attr!r}")
    if not callable(obj):
        raise ConfigError(f"plan.factory: {path!r} is not callable")
    fn: Callable[..., Any] = obj
    return fn


def as_plan(
    obj: Any, where: str = "plan", run_config: Mapping[str, Any] | None = None
) -> TrainingPlan:
    """``obj`` itself if it is a ``TrainingPlan``, wrapped if it is a Flower client: a
    ``NumPyClient``, the ``Client`` its ``.to_client()`` makes, or any ``flwr.client.Client``
    (``runtime.flower.unwrap_client``). A ``ClientApp``, or a Client-shaped object that
    flwr cannot drive, is a ``ConfigError`` naming what to write instead."""
    if is_client_app(obj):
        raise ConfigError(
            f"{where} returned a Flower ClientApp: return the client instead "
            "(FlowerClient(...).to_client() or the NumPyClient itself), as client_fn does"
        )
    if all(callable(getattr(obj, m, None)) for m in ("init", "train", "evaluate")):
        plan: TrainingPlan = obj
        return plan
    obj = unwrap_client(obj)
    if all(callable(getattr(obj, m, None)) for m in ("get_parameters", "fit", "evaluate")):
        if _takes_one_argument(obj.fit):
            raise ConfigError(
                f"{where}: {type(obj).__name__}.fit takes one argument, like a Flower Client "
                "(fit(ins: FitIns)), but it is no flwr.client.Client fedloom can drive: "
                "return a NumPyClient (fit(parameters, config)), or install flwr and "
                "subclass flwr.client.Client"
            )
        return NumPyClientPlan(obj, run_config)
    raise ConfigError(
        f"{where}: {type(obj).__name__} is neither a TrainingPlan (init/train/evaluate) nor "
        "a NumPyClient (get_parameters/fit/evaluate)"
    )


def _takes_one_argument(method: Any) -> bool:
    """Whether a bound method takes exactly one required positional argument."""
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]
    return len(required) == 1 and len([p for p in params if p.kind in kinds]) == 1


def plan_from_config(
    plan: Any, *, seed: int = 0, dp_sgd: Any = None, node_id: str = ""
) -> TrainingPlan:
    """The training plan of a daemon's ``runtime.config.PlanConfig``.

    A built-in workload gives ``SitePlan(workload, site_index)`` (or, with no site index,
    e.g. at the root, a plan whose ``init`` and ``evaluate`` use the global test set); a
    factory is called with ``plan.args`` as keyword arguments, or, a Flower
    ``client_fn(context)``, with a ``Context`` for ``node_id`` (``runtime.flower``);
    ``kind = "tabular"`` gives
    ``workloads.tabular.TabularPlan`` over the node's dataset registry (no data at a root
    or region). ``dp_sgd`` (a site's
    ``workloads.dp_sgd.DpSgdConfig``): the site's plan trains with DP-SGD.
    """
    if getattr(plan, "tabular", None) is not None:  # a site's registered table
        from fedloom.runtime.datasets import DatasetWatch
        from fedloom.workloads.tabular import TabularPlan

        source = DatasetWatch(plan.state_dir) if plan.state_dir is not None else None
        return TabularPlan(plan.tabular, source)
    if plan.factory is not None:
        factory = load_factory(plan.factory)
        made = call_factory(factory, plan.factory, plan.args, node_id)
        return as_plan(made, f"plan.factory {plan.factory}", plan.args)
    from fedloom.workloads.workload import from_config

    try:
        workload = from_config(plan.workload, seed=seed, dp_sgd=dp_sgd)
    except ValueError as exc:
        raise ConfigError(f"plan.{exc}") from None
    if plan.site_index is not None:
        return SitePlan(workload, plan.site_index)
    return GlobalPlan(workload)


_DEFERRED: dict[str, TrainingPlan] = {}  # deferred plans a pool's worker built
_DEFERRED_LOCK = threading.Lock()


class DeferredPlan:
    """``plan_from_config(plan, ...)``, built when first used (``train``, ``evaluate``,
    ``init``), once per process; until then no code of the plan is imported or run.

    A site that requires approval trains through this: its gate (``runtime.governance``)
    refuses a job before ``train`` is called, so an unapproved plan's module is never
    imported nor its factory called (which typically loads the site's data). Mistakes a
    start would report (a ``ClientApp`` as the factory, a missing context key) surface at
    the first job that is let through, as that job's failure; a failed build is tried
    again at the next job. Pickles to its configuration (a process pool builds its own).
    """

    def __init__(self, plan: Any, *, seed: int = 0, dp_sgd: Any = None, node_id: str = ""):
        self.config = plan
        self.seed = seed
        self.dp_sgd = dp_sgd
        self.node_id = node_id
        self._plan: TrainingPlan | None = None
        self._lock = threading.Lock()
        self._copy = False  # unpickled (in a pool's worker)

    @property
    def built(self) -> bool:
        """Whether the plan's code has been imported and its plan made (in this process)."""
        return self._plan is not None

    def plan(self) -> TrainingPlan:
        """The plan, built now if it was not (in this process: a worker of a process
        pool, which gets this object afresh with each job, builds it once)."""
        with self._lock:
            if self._plan is None and not self._copy:
                self._plan = self._build()
            elif self._plan is None:  # a copy sent to a worker: one build per worker
                key = repr((self.config, self.seed, self.dp_sgd, self.node_id))
                with _DEFERRED_LOCK:
                    built = _DEFERRED.get(key)
                    if built is None:
                        built = _DEFERRED[key] = self._build()
                self._plan = built
            return self._plan

    def _build(self) -> TrainingPlan:
        return plan_from_config(
            self.config, seed=self.seed, dp_sgd=self.dp_sgd, node_id=self.node_id
        )

    def __getstate__(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "seed": self.seed,
            "dp_sgd": self.dp_sgd,
            "node_id": self.node_id,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._plan = None
        self._lock = threading.Lock()
        self._copy = True

    def init(self, seed: int) -> Weights:
        return self.plan().init(seed)

    def train(self, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        return self.plan().train(weights, config)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        return self.plan().evaluate(weights)


class GlobalPlan:
    """A workload's model without local data: ``init`` and global-test-set ``evaluate``."""

    def __init__(self, workload: Any) -> None:
        self.workload = workload

    def init(self, seed: int) -> Weights:
        weights: Weights = self.workload.init_weights(seed)
        return weights

    def train(self, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        raise RuntimeError("this node has no local data to train on (plan.site_index unset)")

    def evaluate(self, weights: Weights) -> dict[str, float]:
        result: dict[str, float] = self.workload.evaluate(weights)
        return result


def make_executor(kind: str = "thread", workers: int = 1) -> cf.Executor:
    """The pool training jobs run in: threads (numpy and torch release the GIL) or
    processes (isolation; started with ``spawn``, which torch needs)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if kind == "thread":
        return cf.ThreadPoolExecutor(workers, thread_name_prefix="fedloom-train")
    if kind == "process":
        return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    raise ValueError(f"executor kind must be 'thread' or 'process', got {kind!r}")
