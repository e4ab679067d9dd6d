"""A hostile parent cannot crash a site that dials it (issue 10, item 1).

The attacker is a real server that speaks the real handshake as the rostered root. It
sends the dialling site a model whose tensor shape has a zero dimension next to huge
ones (``[0, 2**31, 2**31]``: zero elements, but numpy cannot shape an array like it),
as a plain message, with the top-k codec, and streamed; or any message while a decoder
is made to raise an arbitrary ``RuntimeError``. Each time the site's connection is
dropped with a logged protocol error, the site's peer set and driver keep running, the
site redials, and an honest signed model sent on the next connection is delivered.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import numpy as np
import pytest

from fedloom.algorithms.protocol import Effect, Event, PeerDown, PeerUp, Received
from fedloom.runtime.connection import Connection, ProgressLink, WirePipe
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.network_peers import Backoff, DialTarget, NetworkPeers
from fedloom.runtime.peer_table import ConnectionTable
from fedloom.runtime.signing import EndToEnd
from fedloom.transport import channel as channel_module
from fedloom.transport import tensors, wire, ws
from fedloom.transport.channel import Gatekeeper, SecureChannel
from fedloom.transport.identity import Identity
from fedloom.transport.links import Link, LinkClosed, memory_link_pair
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.streaming import TensorStreamEncoder
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import ModelBroadcast, TrainRequest

LIMIT = 15.0  # a bound on each test, never a timing assertion
HOSTILE_SHAPE = [0, 2**31, 2**31]
EVIL = "evil"  # the name of the hostile tensor
FP32 = CodecSpec("fp32", lz4=False)
TOPK = CodecSpec("topk", topk_fraction=0.5, lz4=False)

Attack = Callable[[SecureChannel], Awaitable[None]]


class Pki:
    def __init__(self) -> None:
        self.root = Identity.generate("agg", "root")
        self.site = Identity.generate("site-1", "site")
        entries = [RosterEntry(i.node_id, i.role, i.public_key) for i in (self.root, self.site)]
        self.roster = Roster(1, entries)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


class Recorder:
    """The site's node: records every event (the attack is below the node)."""

    node_id = "site-1"

    def __init__(self) -> None:
        self.seen: list[Event] = []

    def handle(self, event: Event, now: float) -> list[Effect]:
        self.seen.append(event)
        return []

    def next_deadline(self) -> float | None:
        return None

    def models(self) -> list[Any]:
        return [
            e.msg
            for e in self.seen
            if isinstance(e, Received) and isinstance(e.msg, TrainRequest | ModelBroadcast)
        ]


def with_shape(encoded: bytes, field: str, shape: list[int]) -> bytes:
    """``encoded`` with its one tensor's manifest shape replaced (as an attacker would)."""
    env = msgpack.unpackb(encoded, raw=False)
    env[field]["m"]["tensors"][0]["shape"] = shape
    packed: bytes = msgpack.packb(env, use_bin_type=True)
    return packed


def empty_weights() -> dict[str, np.ndarray]:
    return {EVIL: np.zeros((0, 4), np.float32)}  # zero elements, as the hostile shape


def plain(msg: wire.Message, field: str, spec: CodecSpec) -> Attack:
    async def attack(channel: SecureChannel) -> None:
        await channel.send_message(with_shape(wire.encode(msg, spec), field, HOSTILE_SHAPE))

    return attack


def streamed(spec: CodecSpec, monkeypatch: pytest.MonkeyPatch) -> Attack:
    """The real streaming sender, with the hostile shape written into its manifest."""

    def hostile_encoder(tensors: Any, spec: CodecSpec = FP32, **kw: Any) -> TensorStreamEncoder:
        encoder = TensorStreamEncoder(tensors, spec, **kw)
        for entry in encoder.manifest["tensors"]:
            if entry["name"] == EVIL:
                entry["shape"] = HOSTILE_SHAPE
        return encoder

    monkeypatch.setattr(channel_module, "STREAM_ABOVE", -1)  # stream even empty tensors
    monkeypatch.setattr(channel_module, "TensorStreamEncoder", hostile_encoder)

    async def attack(channel: SecureChannel) -> None:
        await channel.send_tensors(TrainRequest(1, 1, empty_weights()), spec)

    return attack


class EvilParent:
    """A server holding the root's key: the n-th accepted connection runs ``attacks[n]``
    (then waits for the site to hang up); connections past the list get an honest model."""

    def __init__(self, pki: Pki, attacks: list[Attack]) -> None:
        self.pki = pki
        self.attacks = attacks
        self.gate = Gatekeeper(pki.root, pki.roster)
        self.e2e = EndToEnd(pki.root, pki.roster)
        self.accepted = 0
        self.honest = TrainRequest(7, 1, {"w": np.arange(4, dtype=np.float32)})

    async def on_link(self, link: Link) -> None:
        channel = await self.gate.accept(link)
        n = self.accepted
        self.accepted += 1
        try:
            if n < len(self.attacks):
                await self.attacks[n](channel)
            else:
                signed = await self.e2e.seal(self.honest, "site-1", FP32)
                await channel.send_tensors(signed, FP32)
            while True:  # until the site drops the connection
                await channel.recv_message()
        except LinkClosed:
            pass
        finally:
            await channel.close()


@asynccontextmanager
async def site_against(
    pki: Pki, attacks: list[Attack]
) -> AsyncIterator[tuple[AsyncDriver, Recorder, NetworkPeers]]:
    """A site driver dialling an ``EvilParent`` that runs ``attacks``; both stopped after."""
    parent = EvilParent(pki, attacks)
    server = await ws.serve("127.0.0.1", 0, parent.on_link, close_timeout=0.5)
    node = Recorder()
    peers = NetworkPeers(
        pki.site,
        pki.roster,
        dial=[DialTarget("agg", server.url)],
        connect=lambda url: ws.connect(url, close_timeout=0.5),
        backoff=Backoff(base_s=0.02, cap_s=0.1),
        keepalive_s=0.5,
        down_after_s=5.0,
        rng=random.Random(0),
    )
    driver = AsyncDriver(node, peers=peers)
    task = asyncio.ensure_future(driver.run())
    try:
        yield driver, node, peers
        assert not task.done(), "the site's driver ended"
    finally:
        driver.stop()
        await asyncio.wait_for(task, LIMIT)  # re-raises if the driver failed
        await server.close()


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


async def survives(pki: Pki, attacks: list[Attack]) -> Recorder:
    """Run ``attacks`` one connection each; the site must live on and then take the honest
    model from the next connection."""
    async with asyncio.timeout(LIMIT), site_against(pki, attacks) as (driver, node, peers):
        await until(lambda: len(node.models()) == 1)
        assert driver.running and "agg" in peers.connected()
    (model,) = node.models()  # the hostile ones never reached the node
    np.testing.assert_array_equal(model.weights["w"], np.arange(4, dtype=np.float32))
    n = len(attacks)
    assert node.seen.count(PeerUp("agg")) == n + 1
    assert node.seen.count(PeerDown("agg")) >= n
    return node


def dropped_for(caplog: pytest.LogCaptureFixture, reason: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "fedloom.runtime.connection"
        and r.levelno == logging.WARNING
        and getattr(r, "reason", None) == reason
    ]


@pytest.mark.parametrize(
    ("make", "field", "spec"),
    [
        (lambda: TrainRequest(1, 1, empty_weights()), "weights", FP32),
        (lambda: TrainRequest(1, 1, empty_weights()), "weights", TOPK),
        (lambda: ModelBroadcast(1, empty_weights()), "weights", FP32),
        (lambda: ModelBroadcast(1, empty_weights()), "weights", TOPK),
    ],
    ids=["train-request-fp32", "train-request-topk", "broadcast-fp32", "broadcast-topk"],
)
async def test_a_shape_numpy_cannot_build_drops_the_connection_not_the_site(
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    make: Callable[[], wire.Message],
    field: str,
    spec: CodecSpec,
) -> None:
    caplog.set_level(logging.WARNING)
    await survives(pki, [plain(make(), field, spec)])
    (record,) = dropped_for(caplog, "decompression_bomb")
    assert "non-zero dimensions multiply" in record.getMessage()


@pytest.mark.parametrize("spec", [FP32, TOPK], ids=["fp32", "topk"])
async def test_a_streamed_shape_numpy_cannot_build_drops_the_connection_not_the_site(
    pki: Pki, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, spec: CodecSpec
) -> None:
    caplog.set_level(logging.WARNING)
    await survives(pki, [streamed(spec, monkeypatch)])
    (record,) = dropped_for(caplog, "decompression_bomb")
    assert "non-zero dimensions multiply" in record.getMessage()


async def test_the_same_attack_again_and_again_never_keeps_the_site_down(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    attack = plain(TrainRequest(1, 1, empty_weights()), "weights", FP32)
    await survives(pki, [attack] * 5)
    assert len(dropped_for(caplog, "decompression_bomb")) == 5


async def test_a_decoder_bug_ends_that_connection_only(
    pki: Pki, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: any exception out of a decoder is that connection's protocol
    error, logged with its traceback; the site redials and goes on."""
    real = tensors.decode_tensors

    def buggy(manifest: Any, payload: Any, limits: Any = tensors.DEFAULT_LIMITS) -> Any:
        if manifest["tensors"] and manifest["tensors"][0]["name"] == EVIL:
            raise RuntimeError("a decoder bug")
        return real(manifest, payload, limits)

    monkeypatch.setattr(wire, "decode_tensors", buggy)
    caplog.set_level(logging.WARNING)
    hostile = TrainRequest(1, 1, {EVIL: np.ones(3, np.float32)})
    await survives(pki, [lambda channel: channel.send_tensors(hostile, FP32)])
    (record,) = [r for r in caplog.records if getattr(r, "reason", None) == "undecodable"]
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert len(dropped_for(caplog, "malformed")) == 1


# ------------------------------------------------ containment below the channel


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def post_nowait(self, event: Event, valid: Callable[[], bool] | None = None) -> None:
        self.events.append(event)

    async def post(self, event: Event, valid: Callable[[], bool] | None = None) -> None:
        self.events.append(event)


async def test_a_plain_pipe_turns_a_decoder_bug_into_that_connections_protocol_error(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def buggy(data: Any, limits: Any = None) -> Any:
        raise RuntimeError("a decoder bug")

    monkeypatch.setattr(wire, "decode", buggy)
    caplog.set_level(logging.WARNING)
    sink = Sink()
    table = ConnectionTable("me")
    table.sink = sink
    mine, theirs = memory_link_pair()
    conn = Connection("peer", WirePipe(mine), local_id="me")
    table.open(conn)
    async with asyncio.timeout(LIMIT):
        served = asyncio.ensure_future(table.serve(conn))
        await theirs.send(b"anything")
        reason = await served
    assert reason.startswith("bad bytes from the peer (malformed)")
    assert sink.events == [PeerUp("peer"), PeerDown("peer")]
    (record,) = [r for r in caplog.records if getattr(r, "reason", None) == "undecodable"]
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


class BrokenPipe:
    """A pipe whose every method fails with an arbitrary exception."""

    def __init__(self, link: Link) -> None:
        self.progress = ProgressLink(link)

    async def send(self, msg: Any, after: Any = None) -> None:
        raise KeyError("send bug")

    async def recv(self) -> Any:
        raise ZeroDivisionError("recv bug")

    async def close(self) -> None:
        raise OSError("close bug")


async def test_a_connection_whose_every_job_fails_is_dropped_and_the_table_lives_on() -> None:
    sink = Sink()
    table = ConnectionTable("me")
    table.sink = sink
    mine, _theirs = memory_link_pair()
    conn = Connection("peer", BrokenPipe(mine), local_id="me", keepalive_s=0.01)
    table.open(conn)
    async with asyncio.timeout(LIMIT):
        reason = await table.serve(conn)  # returns: nothing reaches the caller
    assert reason.startswith("unexpected")
    assert sink.events == [PeerUp("peer"), PeerDown("peer")]
    assert table.connected() == frozenset()


async def test_a_dial_that_fails_with_a_bug_is_retried(pki: Pki) -> None:
    attempts = 0

    async def connect(url: str) -> Link:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("a bug in connect")

    peers = NetworkPeers(
        pki.site,
        pki.roster,
        dial=[DialTarget("agg", "ws://127.0.0.1:9/")],
        connect=connect,
        backoff=Backoff(base_s=0.01, cap_s=0.02),
        rng=random.Random(0),
    )
    async with asyncio.timeout(LIMIT):
        task = asyncio.ensure_future(peers.run(Sink()))
        await until(lambda: attempts >= 3)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert peers.dial_failures >= 3
