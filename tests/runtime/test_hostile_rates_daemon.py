"""A running root daemon (default robust="mean", buffer_size 2 as in the demo) whose rostered
region floods it (issue 10 review, findings 2 and 7), or says Hello and then nothing (second
review, finding 1). The hostile region speaks through the real WebSocket, channel and
end-to-end signatures: 1,000 Hellos buy one model, and 20 signed, fresh updates of a huge
delta are taken (the mean takes every forward) but move the root by at most the clip per
flush, and every honest update is acknowledged. A region that is connected but quiet never
stalls the root."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.robust import NormClip
from fedloom.algorithms.weights_math import l2_norm, sub
from fedloom.runtime.config import load_config
from fedloom.runtime.connection import ProgressLink
from fedloom.runtime.daemon import load_roster, open_daemon
from fedloom.runtime.federation_files import ROOT_ID, write_federation
from fedloom.transport import ws
from fedloom.transport.channel import SecureChannel, client_channel
from fedloom.transport.e2e import sign_update, update_digest_sent
from fedloom.transport.identity import Identity
from fedloom.transport.wire import Ack, Heartbeat, Hello, ModelBroadcast, Update
from tests.runtime.test_daemon import SYNTHETIC, running
from tests.runtime.test_signatures import FP32


@pytest.fixture
def fed(tmp_path: Path) -> Any:
    return write_federation(
        tmp_path / "fed",
        {"region-a": ["site-1"], "region-b": ["site-2"]},
        plan=SYNTHETIC,
        root_aggregation={"buffer_size": 2, "weighting": "uniform"},
    )


class Region:
    """One rostered region's side of the real channel to the root."""

    def __init__(self, fed: Any, name: str) -> None:
        cfg = load_config(fed.nodes[name].config)
        self.name = name
        self.me = Identity.load(cfg.identity_key)
        self.roster = load_roster(cfg, self.me)
        self.url = fed.nodes[ROOT_ID].url
        self.channel: SecureChannel | None = None
        self.broadcasts = 0
        self.acked: list[int] = []

    async def connect(self) -> SecureChannel:
        link = ProgressLink(await ws.connect(self.url))
        self.channel = await client_channel(link, self.me, self.roster, ROOT_ID)
        return self.channel

    def update(self, seq: int, base: int, tensors: dict[str, np.ndarray]) -> Update:
        digest = update_digest_sent(tensors, FP32)
        sig = sign_update(self.me, self.name, seq, base, ROOT_ID, 10, digest)
        return Update(self.name, seq, base, tensors, 10, count=1, sig=sig)

    async def until_ack(self, seq: int) -> None:
        """Read (counting broadcasts and acks) until the root acks ``seq``."""
        assert self.channel is not None
        while seq not in self.acked:
            msg = await self.channel.recv_tensors()
            if isinstance(msg, ModelBroadcast):
                self.broadcasts += 1
            elif isinstance(msg, Ack):
                self.acked.append(msg.seq)


@pytest.mark.timeout(60)
async def test_a_running_root_bounds_a_flooding_region_and_its_hellos(fed: Any) -> None:
    d = open_daemon(load_config(fed.nodes[ROOT_ID].config))
    root = d.node
    assert isinstance(root, FedBuffAggregator)
    start = root.current_model()[1]
    huge = {k: np.full(v.shape, -1e6, np.float32) for k, v in start.items()}
    small = {k: np.full(v.shape, 0.01, np.float32) for k, v in start.items()}
    first_bound = NormClip("auto", start).bound()  # r-a's clip: no norms of r-b yet
    assert first_bound is not None
    evil, honest = Region(fed, "region-a"), Region(fed, "region-b")
    async with running(d, fed.nodes[ROOT_ID].listen_port) as task:
        async with asyncio.timeout(30):
            good = await honest.connect()
            await good.send_tensors(Hello("region-b", "region"))
            bad = await evil.connect()
            for _ in range(1_000):
                await bad.send_tensors(Hello("region-a", "region"))
            await good.send_tensors(honest.update(1, 0, small))  # r-b is active
            await honest.until_ack(1)
            # The flood: 20 fresh updates of -1e6. The mean takes every forward (a slot
            # limit would let a barely active region pace its sibling), so each flush is
            # bounded by the clip r-a meets: the model's norm, one other sender known.
            steps = []
            for seq in range(1, 21):
                before = root.current_model()[1]
                await bad.send_tensors(evil.update(seq, root.version, huge))
                await evil.until_ack(seq)
                steps.append(l2_norm(sub(root.current_model()[1], before)))
            # 1,000 Hellos bought one model; every other broadcast is a new version.
            assert evil.broadcasts <= 1 + root.version
            assert all(step <= first_bound * 1.001 for step in steps)
            for seq in (2, 3):
                await good.send_tensors(honest.update(seq, root.version, small))
                await honest.until_ack(seq)
            assert not task.done()
            drift = l2_norm(sub(root.current_model()[1], start))
            assert drift <= root.version * first_bound * 1.001
        await bad.close()
        await good.close()


@pytest.mark.timeout(60)
async def test_a_region_that_says_hello_and_nothing_else_does_not_stall_the_root(
    fed: Any,
) -> None:
    """Second review, finding 1: region-b connects, says Hello and then sends nothing (its
    hospitals offline for the night, or hostile); region-a's updates still train the root."""
    d = open_daemon(load_config(fed.nodes[ROOT_ID].config))
    root = d.node
    assert isinstance(root, FedBuffAggregator)
    start = root.current_model()[1]
    small = {k: np.full(v.shape, 0.01, np.float32) for k, v in start.items()}
    bound = NormClip("auto", start).bound()
    assert bound is not None
    quiet, honest = Region(fed, "region-b"), Region(fed, "region-a")
    async with running(d, fed.nodes[ROOT_ID].listen_port) as task:
        async with asyncio.timeout(30):
            mute = await quiet.connect()
            await mute.send_tensors(Hello("region-b", "region"))
            await mute.send_tensors(Heartbeat("region-b", -1))  # an idle link's keep-alive
            good = await honest.connect()
            await good.send_tensors(Hello("region-a", "region"))
            for seq in range(1, 7):
                before = root.current_model()[1]
                await good.send_tensors(honest.update(seq, root.version, small))
                await honest.until_ack(seq)
                assert l2_norm(sub(root.current_model()[1], before)) <= bound * 1.001
            assert honest.acked == [1, 2, 3, 4, 5, 6] and root.version == 3
            assert "region-b" in root._regions_up and not task.done()  # still connected
        await mute.close()
        await good.close()
