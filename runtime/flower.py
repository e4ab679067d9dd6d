"""Flower clients in a fedloom site, unchanged (issue 14).

A Flower user has a ``NumPyClient`` (``get_parameters``, ``fit``, ``evaluate``) and usually
a ``client_fn(context)`` that builds it and returns ``FlowerClient(...).to_client()``. A
site runs it with ``[plan] factory = "mymod:client_fn"``; ``runtime.trainer`` wraps what the
factory returns as a ``TrainingPlan`` (``NumPyClientPlan``). This module holds what that
needs from Flower, imported lazily so that a site without flwr installed still starts:

* ``fit_config``: the config a client's ``fit`` and ``evaluate`` see. Every scalar key of
  the aggregator's training config, plus the keys Flower's own examples read:

  =====================  ===================================================================
  ``server_round``       the model version being trained + 1 (Flower's rounds start at 1;
                         the site adds it, ``federation.training.SITE_CONFIG_KEYS``)
  ``lr``                 ``[training] lr``; also as ``learning_rate``
  ``local_steps``        ``[training] local_steps`` (minibatch steps, fedloom's unit)
  ``batch_size``         ``[training] batch_size``
  ``mu``                 ``[training] mu``; also as ``proximal_mu`` (Flower's FedProx)
  ``local_epochs``       ``[plan.args] local-epochs`` (or ``local_epochs``), else 1
  ``seed``               the job's seed
  =====================  ===================================================================

* ``client_fn`` factories: a factory whose one parameter is ``context`` (or is annotated
  ``Context``) is called with a real ``flwr.common.Context``: ``node_id`` from the site's
  id, ``node_config`` with ``partition-id`` / ``num-partitions`` when ``[plan.args]`` gives
  them, ``run_config`` = ``[plan.args]``. One whose one parameter is ``cid`` (older Flower)
  gets ``str(partition-id)``. Any other factory is called with ``[plan.args]`` as keyword
  arguments, as before.
* what a factory returns: a ``NumPyClient``; a ``Client`` made by ``.to_client()`` (the
  ``NumPyClient`` inside it is used); any other ``flwr.client.Client`` (adapted through
  ``FitIns``/``FitRes`` and ``ndarrays_to_parameters``). A ``ClientApp`` is refused at start:
  Flower offers no public way to get the ``client_fn`` it was built from, so ``factory``
  must name that function.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

from fedloom.federation.config_reader import ConfigError

__all__ = [
    "ClientAsNumPy",
    "call_factory",
    "client_fn_kind",
    "fit_config",
    "flower_node_id",
    "is_client_app",
    "unwrap_client",
]

_SCALARS = (bool, int, float, str, bytes)
# [plan.args] keys that are Flower's node_config (per node), not its run_config.
_NODE_KEYS = {"partition-id": "partition-id", "partition_id": "partition-id"}
_NODE_KEYS.update({"num-partitions": "num-partitions", "num_partitions": "num-partitions"})


def fit_config(config: Mapping[str, Any], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config a Flower client's ``fit``/``evaluate`` get for a job trained with
    ``config`` (see the module docstring); ``run_config`` is ``[plan.args]``."""
    out: dict[str, Any] = {str(k): v for k, v in config.items() if isinstance(v, _SCALARS)}
    if "lr" in out:
        out.setdefault("learning_rate", out["lr"])
    if "mu" in out:
        out.setdefault("proximal_mu", out["mu"])
    epochs = run_config.get("local-epochs", run_config.get("local_epochs", 1))
    out.setdefault("local_epochs", epochs if isinstance(epochs, int) else 1)
    return out


def flower_node_id(node_id: str) -> int:
    """A stable positive 63-bit id for Flower's ``Context.node_id`` from the site's id."""
    digest = hashlib.blake2b(node_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _flwr_loaded() -> bool:
    """Whether flwr is imported already (an object of its classes can exist only then)."""
    return "flwr" in sys.modules


def is_client_app(obj: Any) -> bool:
    if _flwr_loaded():
        from flwr.client import ClientApp

        if isinstance(obj, ClientApp):
            return True
    return type(obj).__name__ == "ClientApp"


def client_fn_kind(factory: Callable[..., Any]) -> str | None:
    """ "context" (``client_fn(context)``), "cid" (``client_fn(cid)``) or None: a factory
    called with keyword arguments."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in sig.parameters.values() if p.default is inspect.Parameter.empty]
    required = [p for p in required if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    required = [p for p in required if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if len(required) != 1 or required[0].kind not in positional:
        return None
    param = required[0]
    ann = param.annotation
    ann_name = ann if isinstance(ann, str) else getattr(ann, "__name__", "")
    if param.name == "context" or str(ann_name).rsplit(".", 1)[-1] == "Context":
        return "context"
    if param.name == "cid":
        return "cid"
    return None


def call_factory(factory: Callable[..., Any], path: str, args: Mapping[str, Any], node: str) -> Any:
    """Call a ``[plan] factory`` the way its signature asks (see the module docstring);
    ``ConfigError`` when it cannot be called (a ``ClientApp``, flwr missing, arguments that
    do not fit)."""
    if is_client_app(factory):
        module = path.partition(":")[0]
        raise ConfigError(
            f"plan.factory: {path} is a Flower ClientApp; fedloom calls the function it is "
            f'built from: write factory = "{module}:client_fn" (the function you pass to '
            "ClientApp(client_fn=...))"
        )
    kind = client_fn_kind(factory)
    if kind is None:
        try:
            return factory(**dict(args))
        except TypeError as exc:
            raise ConfigError(f"plan.args: calling {path} failed: {exc}") from None
    node_config: dict[str, Any] = {}
    run_config: dict[str, Any] = {}
    for key, value in args.items():
        if key in _NODE_KEYS:
            node_config[_NODE_KEYS[key]] = value
        else:
            run_config[key] = value
    if kind == "cid":
        if "partition-id" not in node_config:
            raise ConfigError(
                f"plan.args: {path} takes a Flower cid (its data partition): add "
                "partition-id = N to [plan.args]"
            )
        return factory(str(node_config["partition-id"]))
    try:
        from flwr.common import Context, RecordDict
    except ImportError:
        raise ConfigError(
            f"plan.factory: {path} takes a Flower Context, and flwr is not installed: "
            "pip install flwr in the site's environment (or give a factory that takes "
            "keyword arguments from [plan.args])"
        ) from None
    context = Context(
        run_id=0,
        node_id=flower_node_id(node),
        node_config=node_config,
        state=RecordDict(),
        run_config=run_config,
    )
    try:
        return factory(context)
    except KeyError as exc:  # the usual slip: a node_config/run_config key not given
        raise ConfigError(
            f"plan.factory: {path} read a key its Context does not have: {exc} (node_config "
            f"{sorted(node_config)}, run_config {sorted(run_config)}): add it to [plan.args] "
            "(partition-id and num-partitions go to node_config, the rest to run_config)"
        ) from None


def unwrap_client(obj: Any) -> Any:
    """What to wrap as a plan for ``obj`` from a factory: the ``NumPyClient`` inside a
    ``.to_client()`` wrapper, a shim over any other ``flwr.client.Client``, else ``obj``.
    ``ConfigError`` for an object shaped like a Client when flwr is not there to drive it."""
    inner = getattr(obj, "numpy_client", None)
    if inner is not None and all(
        callable(getattr(inner, m, None)) for m in ("get_parameters", "fit", "evaluate")
    ):
        return inner  # flwr's NumPyClientWrapper keeps the client as .numpy_client
    if _flwr_loaded():
        from flwr.client import Client

        if isinstance(obj, Client):
            return ClientAsNumPy(obj)
    return obj


class ClientAsNumPy:
    """A ``flwr.client.Client`` (``fit(FitIns) -> FitRes``, ...) seen through the
    ``NumPyClient`` shape, converting with flwr's public ``ndarrays_to_parameters`` and
    ``parameters_to_ndarrays``; a result whose status is not OK raises ``ValueError`` (the
    job fails, and the aggregator hears of it)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def get_parameters(self, config: dict[str, Any]) -> list[Any]:
        from flwr.common import GetParametersIns, parameters_to_ndarrays

        res = self.client.get_parameters(GetParametersIns(config=dict(config)))
        _check_status(res, "get_parameters")
        return list(parameters_to_ndarrays(res.parameters))

    def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[Any, int, Any]:
        from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays

        res = self.client.fit(FitIns(ndarrays_to_parameters(parameters), dict(config)))
        _check_status(res, "fit")
        return list(parameters_to_ndarrays(res.parameters)), res.num_examples, res.metrics

    def evaluate(self, parameters: list[Any], config: dict[str, Any]) -> tuple[Any, int, Any]:
        from flwr.common import EvaluateIns, ndarrays_to_parameters

        res = self.client.evaluate(EvaluateIns(ndarrays_to_parameters(parameters), dict(config)))
        _check_status(res, "evaluate")
        return res.loss, res.num_examples, res.metrics


def _check_status(res: Any, where: str) -> None:
    from flwr.common import Code

    status = getattr(res, "status", None)
    code = getattr(status, "code", Code.OK)
    if code != Code.OK:
        message = str(getattr(status, "message", ""))[:200]
        raise ValueError(f"Client.{where} returned status {code}: {message}")
