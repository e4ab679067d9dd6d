"""Evaluation: a node that holds a model and has a plan (the root, gossip peers)
evaluates it on the plan's test set whenever it changed, at most every ``interval_s``, and
exports ``fedloom_eval_accuracy``, ``fedloom_eval_loss`` and ``fedloom_eval_model_version``
(and logs the figures); ``on_result(version, figures)``, when given, gets each result too
(the status board's accuracy curve, ``runtime.status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from fedloom.runtime.nodes import model_of
from fedloom.runtime.recovery import Daemon

log = logging.getLogger("fedloom.daemon")


DEFAULT_EVAL_INTERVAL_S = 60.0


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop``; True when stopping."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


async def evaluate_models(
    d: Daemon,
    sink: Any,
    stop: asyncio.Event,
    interval_s: float,
    on_result: Callable[[int, Mapping[str, float]], None] | None = None,
) -> None:
    """Evaluate the node's model on its plan's test set whenever it has changed."""
    from prometheus_client import Gauge

    plan = d.plan
    assert plan is not None
    gauges: list[Any] = []  # registered at the first result: a node with none shows none
    last: int | None = None
    while True:
        model = model_of(d.node)
        if model is not None and model[0] != last:
            version, weights = model
            try:
                result = await asyncio.to_thread(plan.evaluate, weights)
            except Exception:  # a broken evaluation must not take the node down
                log.exception("%s: evaluating model v%d failed", d.cfg.node_id, version)
            else:
                last = version
                if not result:  # a node with no data of its own (a tabular root): nothing
                    continue
                acc = float(result.get("accuracy", math.nan))
                lss = float(result.get("loss", math.nan))
                if not gauges:
                    reg = sink.registry
                    gauges += [
                        Gauge(
                            "fedloom_eval_accuracy", "Accuracy of the current model.", registry=reg
                        ),
                        Gauge("fedloom_eval_loss", "Loss of the current model.", registry=reg),
                        Gauge(
                            "fedloom_eval_model_version",
                            "Model version last evaluated.",
                            registry=reg,
                        ),
                    ]
                for gauge, value in zip(gauges, (acc, lss, float(version)), strict=True):
                    gauge.set(value)
                if on_result is not None:
                    on_result(version, {"accuracy": acc, "loss": lss})
                log.info(
                    "%s: model v%d: accuracy %.4f, loss %.4f",
                    d.cfg.node_id,
                    version,
                    acc,
                    lss,
                    extra={"node": d.cfg.node_id, "version": version, "accuracy": acc, "loss": lss},
                )
        if await sleep_or_stop(stop, interval_s):
            return
