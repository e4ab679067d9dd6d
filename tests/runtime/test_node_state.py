"""State a restarted node keeps: the model digest its signature guard starts from."""

from __future__ import annotations

import numpy as np
import pytest

from algorithms.protocol import Received
from algorithms.regional import RegionalAggregator
from runtime.daemon import model_floor, model_floor_digest
from transport.e2e import ModelConflictError, ModelVersionGuard, tensors_digest
from transport.wire import ModelBroadcast


def weights(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((4, 3), value, np.float32)}


def test_a_restarted_region_notices_a_second_model_under_the_version_it_held() -> None:
    region = RegionalAggregator("r1", "root", {"s1": "site"}, buffer_size=1, concurrency=1)
    region.handle(Received("root", ModelBroadcast(5, weights(1.0))), 0.0)
    back = RegionalAggregator("r1", "root", {"s1": "site"}, buffer_size=1, concurrency=1)
    back.restore(region.snapshot())
    floor = model_floor(back)
    assert floor == 5
    guard = ModelVersionGuard(floor, model_floor_digest(back, floor))
    guard.check(5, tensors_digest(weights(1.0)))  # the same model again: fine
    with pytest.raises(ModelConflictError, match="different model under version 5"):
        guard.check(5, tensors_digest(weights(2.0)))
