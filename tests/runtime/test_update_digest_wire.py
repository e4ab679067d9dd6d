"""Updates signed over their float16 wire form, through a daemon's real receiving path:
an honest streamed fp16 update verifies and its float16 reaches the store as it came; the
same values re-encoded as fp32 under that signature are refused, and the daemon lives on."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest

from fedloom.algorithms.protocol import Metric, PeerDown, Persist
from fedloom.federation.store import StateStore
from fedloom.runtime.signing import EndToEnd
from fedloom.transport.channel import STREAM_ABOVE
from fedloom.transport.e2e import as_received, sign_update, update_digest_sent
from fedloom.transport.half import half_source, remember_half
from fedloom.transport.identity import Identity
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import Update
from tests.runtime.test_signatures import LIMIT, ROOT, ROSTER, SITE, Hub, Sink, dial, node, until

FP16 = CodecSpec("fp16")
FP32 = CodecSpec()
N = STREAM_ABOVE // 2 + 4096  # float16 bytes above STREAM_ABOVE: the update is streamed


def delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(N).astype(np.float32) * 1e-2, "b": np.ones(3, np.float32)}


def signed(identity: Identity, seq: int, d: dict[str, np.ndarray], spec: CodecSpec) -> Update:
    digest = update_digest_sent(d, spec)
    sig = sign_update(identity, identity.node_id, seq, 0, "root", 10, digest)
    return Update(identity.node_id, seq, 0, d, 10, sig=sig)


async def test_fp16_update_verifies_transcoded_one_is_refused_and_the_store_keeps_its_float16(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub, sink, metrics = Hub(), Sink(), []
    root = node(hub, ROOT, listen=("agg", 0), e2e=EndToEnd(ROOT, ROSTER, report=metrics.append))
    caplog.set_level(logging.WARNING)
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        running = tg.create_task(root.run(sink))
        await until(lambda: root.listen_url is not None)
        assert root.listen_url is not None
        # The attack: a signature over the float16 wire form, with the same (decoded)
        # values sent as float32. Equal values, but not what was signed: refused.
        channel = await dial(hub, root.listen_url, SITE, "root")
        honest = signed(SITE, 1, delta(1), FP16)
        transcoded = dataclasses.replace(honest, delta=as_received(honest.delta, FP16))
        await channel.send_tensors(transcoded, FP32)
        await until(lambda: sink.count(PeerDown("site-1")) == 1)
        assert sink.received() == []
        assert root.e2e.rejected == {"bad_signature": 1}
        assert metrics == [Metric("update_rejected", 1.0, {"reason": "bad_signature"})]
        # The daemon lives on: the honest update, streamed as fp16, verifies.
        again = await dial(hub, root.listen_url, SITE, "root")
        await again.send_tensors(honest, FP16)
        await until(lambda: len(sink.received()) == 1)
        got = sink.received()[0]
        assert isinstance(got, Update) and got.sig == honest.sig
        assert not running.done()
        await again.close()
        await channel.close()
        running.cancel()
    hub.close()
    # Its delta carries the float16 it came from; the store writes that float16 and
    # reads back exactly the float32 that was applied.
    w = got.delta["w"]
    half = half_source(w)
    assert half is not None and np.array_equal(half, honest.delta["w"].astype(np.float16))
    store = StateStore(tmp_path / "agg")
    store.load()
    store.apply(Persist("log", {"delta": dict(got.delta)}, append=True))
    store.close()
    again_store = StateStore(tmp_path / "agg")
    (record,) = again_store.load().logs["log"]
    again_store.close()
    for name, arr in got.delta.items():
        assert np.array_equal(record["delta"][name].view(np.uint8), arr.view(np.uint8))


def test_the_store_does_not_take_a_float16_source_that_disagrees(tmp_path: Path) -> None:
    # Defence in depth: a source whose first values are not the tensor's is not written.
    arr = np.linspace(-1, 1, 8192, dtype=np.float32)
    arr.flags.writeable = False
    wrong = arr.astype(np.float16)
    wrong[0] = 7.0
    remember_half(arr, wrong)
    store = StateStore(tmp_path / "s")
    store.load()
    store.apply(Persist("log", {"x": arr}, append=True))
    store.close()
    again = StateStore(tmp_path / "s")
    (record,) = again.load().logs["log"]
    again.close()
    assert np.array_equal(record["x"].view(np.uint32), arr.view(np.uint32))
