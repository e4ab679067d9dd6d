"""A running root daemon under the default aggregation settings does not let a child's
claims or overflowing deltas rewrite its model (issue 10, item 2). The hostile child is the
root's rostered region, speaking through the real WebSocket, channel and end-to-end
signature checks: it claims ``count = 10**15`` (a field its signature does not cover) and
sends deltas near float32's maximum. Each is acknowledged (decided and recorded), the
model stays finite and near where it was, and honest updates still train it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.robust import NormClip
from fedloom.algorithms.weights_math import is_finite, l2_norm, sub
from fedloom.runtime.config import load_config
from fedloom.runtime.connection import ProgressLink
from fedloom.runtime.daemon import load_roster, open_daemon
from fedloom.runtime.federation_files import ROOT_ID, write_federation
from fedloom.transport import ws
from fedloom.transport.channel import client_channel
from fedloom.transport.e2e import sign_update, update_digest_sent
from fedloom.transport.identity import Identity
from fedloom.transport.wire import Ack, Update
from tests.runtime.test_daemon import SYNTHETIC, running
from tests.runtime.test_model_limits import next_ack
from tests.runtime.test_signatures import FP32

NEAR_MAX = float(np.finfo(np.float32).max) * 0.9


@pytest.fixture
def fed(tmp_path: Path) -> Any:
    return write_federation(
        tmp_path / "fed",
        {"region-a": ["site-1"]},
        plan=SYNTHETIC,
        root_aggregation={"buffer_size": 2, "weighting": "uniform"},
    )


@pytest.mark.timeout(60)
async def test_a_running_root_bounds_inflated_counts_and_overflowing_deltas(fed: Any) -> None:
    d = open_daemon(load_config(fed.nodes[ROOT_ID].config))
    region_cfg = load_config(fed.nodes["region-a"].config)
    me = Identity.load(region_cfg.identity_key)
    roster = load_roster(region_cfg, me)
    root = d.node
    assert isinstance(root, FedBuffAggregator)
    start = root.current_model()[1]
    huge = {k: np.full(v.shape, NEAR_MAX, np.float32) for k, v in start.items()}
    small = {k: np.full(v.shape, 0.01, np.float32) for k, v in start.items()}

    def update(seq: int, base: int, tensors: dict[str, np.ndarray], count: int) -> Update:
        digest = update_digest_sent(tensors, FP32)
        sig = sign_update(me, "region-a", seq, base, ROOT_ID, 10, digest)
        return Update("region-a", seq, base, tensors, 10, count=count, sig=sig)

    async with running(d, fed.nodes[ROOT_ID].listen_port) as task:
        link = ProgressLink(await ws.connect(fed.nodes[ROOT_ID].url))
        channel = await client_channel(link, me, roster, ROOT_ID)
        async with asyncio.timeout(20):
            for seq, count in ((1, 10**15), (2, 1), (3, 10**15), (4, 1)):
                base = root.version
                await channel.send_tensors(update(seq, base, huge, count))
                assert await next_ack(channel) == Ack("region-a", seq)
        assert root.version == 2
        after = root.current_model()[1]
        assert is_finite(after)
        # Each step is clipped to the auto clip's starting bound (the model's norm, or
        # √(parameters) for this all-zero model): nowhere near float32's maximum,
        # whatever the count claimed.
        first_bound = NormClip("auto", start).bound()
        assert first_bound is not None and first_bound < 100.0
        assert l2_norm(sub(after, start)) <= 2 * first_bound * 1.001
        async with asyncio.timeout(20):
            for seq in (5, 6):
                await channel.send_tensors(update(seq, root.version, small, 1))
                assert await next_ack(channel) == Ack("region-a", seq)
        assert root.version == 3 and is_finite(root.current_model()[1])
        await channel.close()
        assert not task.done()
