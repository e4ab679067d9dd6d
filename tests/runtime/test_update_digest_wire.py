"""Updates signed over their float16 wire form, through a daemon's real receiving path:
an honest streamed fp16 update verifies and its float16 reaches the store as it came; the
same values re-encoded as fp32 under that signature are refused, and the daemon lives on."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from fedloom.algorithms.protocol import Metric, PeerDown, Persist
from fedloom.federation.signing import EndToEndCore
from fedloom.federation.store import StateStore
from fedloom.runtime.signing import EndToEnd
from fedloom.transport.channel import STREAM_ABOVE
from fedloom.transport.e2e import (
    OldUpdateVersionError,
    as_received,
    as_sent,
    digest_as_received,
    sign_update,
    tensors_digest,
    update_digest_sent,
)
from fedloom.transport.half import half_source, remember_half
from fedloom.transport.identity import Identity
from fedloom.transport.tensors import CodecSpec, decode_tensors, encode_tensors
from fedloom.transport.wire import ModelBroadcast, Update
from tests.runtime.test_signatures import LIMIT, ROOT, ROSTER, SITE, Hub, Sink, dial, node, until

FP16 = CodecSpec("fp16")
FP32 = CodecSpec()
N = STREAM_ABOVE // 2 + 4096  # float16 bytes above STREAM_ABOVE: the update is streamed


def delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(N).astype(np.float32) * 1e-2, "b": np.ones(3, np.float32)}


def logged_and_read_back(state: Path, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` appended to a fresh store's log, and what a reopened store reads back."""
    store = StateStore(state)
    store.load()
    store.apply(Persist("log", record, append=True))
    store.close()
    again = StateStore(state)
    (back,) = again.load().logs["log"]
    again.close()
    return back


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
    # reads back exactly the float32 that was applied, then lets the float16 go.
    w = got.delta["w"]
    half = half_source(w)
    assert half is not None and np.array_equal(half, honest.delta["w"].astype(np.float16))
    record = logged_and_read_back(tmp_path / "agg", {"delta": dict(got.delta)})
    assert half_source(w) is None  # written: no longer held beside the update
    for name, arr in got.delta.items():
        assert np.array_equal(record["delta"][name].view(np.uint8), arr.view(np.uint8))


def test_the_store_does_not_take_a_float16_source_that_disagrees(tmp_path: Path) -> None:
    # Defence in depth against a decoder bug: a source whose first values are not the
    # tensor's is not written.
    arr = np.linspace(-1, 1, 8192, dtype=np.float32)
    wrong = arr.astype(np.float16)
    wrong[0] = 7.0
    arr = remember_half(arr, wrong)
    record = logged_and_read_back(tmp_path / "s", {"x": arr})
    assert np.array_equal(record["x"].view(np.uint32), arr.view(np.uint32))


@pytest.mark.parametrize("route", ["flag", "base"])
def test_a_decoded_delta_changed_past_the_probe_cannot_be_logged_stale(
    tmp_path: Path, route: str
) -> None:
    # Review finding: writing element 5000 (past the store's 64-value probe) of a decoded
    # fp16 delta, by making it writable or through its base, left the float16 behind:
    # the store logged it and a restart replayed another delta than was applied. Decoded
    # tensors are now views of read-only memory: both writes are refused, and what the
    # store replays is what was applied.
    d = {"w": np.linspace(-1, 1, 8192, dtype=np.float32)}
    arr = decode_tensors(*encode_tensors(d, CodecSpec("fp16", lz4=False)))["w"]
    applied = arr.copy()
    with pytest.raises(ValueError):
        if route == "flag":
            arr.flags.writeable = True
        else:
            arr.base[5000] = 123.0
        arr[5000] = 123.0
    record = logged_and_read_back(tmp_path / "s", {"x": arr})
    assert np.array_equal(record["x"].view(np.uint32), arr.view(np.uint32))
    assert np.array_equal(arr.view(np.uint32), applied.view(np.uint32))


def test_old_peers_are_refused_as_such_and_a_model_keeps_no_float16() -> None:
    # A site of an older fedloom signs fedloom-update-v1 over the decoded float32 of its
    # fp16 delta, or fedloom-update-v2 over the SHA-256 of its float16: refused (counted
    # as old_update_version), naming the version.
    receiver = EndToEndCore(ROOT, ROSTER)
    d = delta(5)
    got = decode_tensors(*encode_tensors(d, FP16))  # what the root decodes, float16 kept
    assert half_source(got["w"]) is not None
    envelope = ["fedloom-update-v1", "site-1", 1, 0, "root", 10, digest_as_received(d, FP16)]
    sig = SITE.sign(msgpack.packb(envelope, use_bin_type=True))
    with pytest.raises(OldUpdateVersionError, match=r"site-1.*fedloom-update-v1.*upgrade"):
        receiver.check_now(Update("site-1", 1, 0, got, 10, sig=sig), "site-1")
    assert receiver.rejected == {"old_update_version": 1}
    v2 = ["fedloom-update-v2", "site-1", 2, 0, "root", 10, tensors_digest(as_sent(d, FP16))]
    sig = SITE.sign(msgpack.packb(v2, use_bin_type=True))
    with pytest.raises(OldUpdateVersionError, match=r"site-1.*fedloom-update-v2.*upgrade"):
        receiver.check_now(Update("site-1", 2, 0, got, 10, sig=sig), "site-1")
    assert receiver.rejected == {"old_update_version": 2} and receiver.verified == 0
    # A verified model is hashed as float32: its float16 sources are dropped there.
    root, site = EndToEndCore(ROOT, ROSTER), EndToEndCore(SITE, ROSTER)
    sealed = root.seal_now(ModelBroadcast(1, d), "site-1", FP16)
    assert isinstance(sealed, ModelBroadcast)
    weights = decode_tensors(*encode_tensors(sealed.weights, FP16))
    assert half_source(weights["w"]) is not None
    site.check_now(dataclasses.replace(sealed, weights=weights), "root")
    assert half_source(weights["w"]) is None and site.verified == 1
