"""Secure channel: handshake over links, records, streaming tensors, and every rejection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from fedloom.transport import wire, ws
from fedloom.transport.channel import (
    OFFLOAD_MODES,
    STREAM_ABOVE,
    AddressBusy,
    ChannelClosed,
    ChannelOptions,
    ChannelTruncated,
    Gatekeeper,
    GateLimits,
    HandshakeTimeout,
    SecureChannel,
    UnexpectedMessage,
    client_channel,
    server_channel,
)
from fedloom.transport.errors import (
    FrameTooLarge,
    HandshakeError,
    NonFiniteTensor,
    PeerRefused,
    ProtocolError,
    RecordError,
)
from fedloom.transport.half import half_source
from fedloom.transport.handshake import ClientHandshake
from fedloom.transport.identity import Identity
from fedloom.transport.links import Link, LinkClosed, memory_link_pair, reserve_share
from fedloom.transport.records import CIPHER_AEGIS256
from fedloom.transport.streaming import TensorStreamDecoder, TensorStreamEncoder
from fedloom.transport.tensors import CodecSpec, decode_tensors, encode_tensors
from tests.transport.cipher_params import CIPHER_PARAMS
from tests.transport.link_pairs import LINK_KINDS, Pki, channel_pair, link_pair, make_pki

TIMEOUT_S = 15.0
HANDSHAKE_FRAMES = 3  # client side: c1, c2, then its stream header


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@contextlib.asynccontextmanager
async def channels(
    kind: str, pki: Pki, options: ChannelOptions | None = None
) -> AsyncIterator[tuple[SecureChannel, SecureChannel]]:
    async with link_pair(kind) as (a, b):
        client, server = await channel_pair(a, b, pki, options=options or ChannelOptions())
        try:
            yield client, server
        finally:
            # Both at once: each answers the other's close (one after the other, the first
            # waits out its close time-out whenever the test left the second end unread).
            await asyncio.gather(client.close(), server.close())


def pinned(cipher: str, offload: str = "auto", **kw: int) -> ChannelOptions:
    """Options that make both ends use one record cipher."""
    return ChannelOptions(ciphers=(cipher,), offload=offload, **kw)


def delta(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((n // 4, 4)).astype(np.float32),
        "conv.bias": rng.standard_normal(7).astype(np.float32),
        "steps": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False, True]),
    }


def update(tensors: dict[str, np.ndarray]) -> wire.Update:
    return wire.Update("site-1", 3, 7, tensors, n_examples=120, metrics={"loss": 0.5})


# ------------------------------------------------------------------ happy paths


@pytest.mark.parametrize("kind", LINK_KINDS)
async def test_small_messages_both_ways(kind: str, pki: Pki) -> None:
    async with asyncio.timeout(TIMEOUT_S), channels(kind, pki) as (client, server):
        assert server.peer_id == "site-1" and server.peer_role == "site"
        assert client.peer_id == "agg" and client.peer_role == "root"
        assert client.transcript_hash == server.transcript_hash
        for side in (client, server):  # each side samples the link's round trip
            assert side.handshake_rtt_s is not None and 0 < side.handshake_rtt_s < TIMEOUT_S
        for payload in (b"", b"x", os.urandom(1000)):
            await client.send_message(payload)
            assert await server.recv_message() == payload
            await server.send_message(payload[::-1])
            assert await client.recv_message() == payload[::-1]


@pytest.mark.parametrize("kind", LINK_KINDS)
async def test_twenty_megabyte_message(kind: str, pki: Pki) -> None:
    big = os.urandom(20 * (1 << 20) + 12345)
    async with asyncio.timeout(TIMEOUT_S), channels(kind, pki) as (client, server):
        sending = asyncio.create_task(client.send_message(big))
        assert await server.recv_message() == big
        await sending
        await client.send_message(b"after")  # framing intact after a multi-record message
        assert await server.recv_message() == b"after"


@pytest.mark.parametrize("cipher", CIPHER_PARAMS)
@pytest.mark.parametrize("kind", LINK_KINDS)
@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "topk"])
async def test_streamed_tensors_equal_the_batch_codec(
    kind: str, codec: str, cipher: str, pki: Pki
) -> None:
    tensors = delta(1_500_000)  # 6 MB of fp32: streamed
    spec = CodecSpec(kind=codec)  # type: ignore[arg-type]
    expected = decode_tensors(*encode_tensors(tensors, spec))
    async with asyncio.timeout(TIMEOUT_S), channels(kind, pki, pinned(cipher)) as (client, server):
        assert client.cipher == server.cipher == cipher
        sending = asyncio.create_task(client.send_tensors(update(tensors), spec))
        got = await server.recv_tensors()
        await sending
    assert isinstance(got, wire.Update)
    assert (got.src, got.seq, got.base_version, got.n_examples) == ("site-1", 3, 7, 120)
    assert dict(got.metrics) == {"loss": 0.5}
    assert list(got.delta) == list(expected)
    for name, arr in expected.items():
        assert got.delta[name].dtype == arr.dtype
        assert np.array_equal(got.delta[name], arr)
        assert not got.delta[name].flags.writeable


@pytest.mark.parametrize("offload", OFFLOAD_MODES)
@pytest.mark.parametrize("cipher", CIPHER_PARAMS)
async def test_fp32_pieces_are_decrypted_straight_into_the_tensors(
    cipher: str, offload: str, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AEGIS-256 records holding raw fp32 pieces open into the tensor's own memory;
    # compressed pieces (zeros) and pieces that straddle tensors take the copying path.
    counts = {"direct": 0, "copied": 0}
    feed_direct, feed_piece = TensorStreamDecoder.feed_direct, TensorStreamDecoder.feed_piece

    def counting_direct(self: TensorStreamDecoder) -> None:
        counts["direct"] += 1
        feed_direct(self)

    def counting_piece(self: TensorStreamDecoder, piece: bytes | bytearray | memoryview) -> None:
        counts["copied"] += 1
        feed_piece(self, piece)

    monkeypatch.setattr(TensorStreamDecoder, "feed_direct", counting_direct)
    monkeypatch.setattr(TensorStreamDecoder, "feed_piece", counting_piece)
    tensors = delta(2_000_000)  # 8 MB of fp32 noise: 8 pieces, most of them direct
    tensors["zeros"] = np.zeros(1_000_000, dtype=np.float32)  # 4 MB that lz4 shrinks
    options = pinned(cipher, offload)
    async with asyncio.timeout(TIMEOUT_S), channels("memory", pki, options) as (client, server):
        sending = asyncio.create_task(client.send_tensors(update(tensors)))
        got = await server.recv_tensors()
        await sending
    assert isinstance(got, wire.Update)
    for name, arr in tensors.items():
        assert np.array_equal(got.delta[name], arr)
    if cipher == CIPHER_AEGIS256:
        assert counts["direct"] >= 6 and counts["copied"] >= 4
    else:  # PyNaCl's secretstream returns fresh bytes: every piece is copied
        assert counts["direct"] == 0 and counts["copied"] >= 12


@pytest.mark.parametrize("cipher", CIPHER_PARAMS)
async def test_fp16_pieces_are_decrypted_straight_into_the_kept_float16(
    cipher: str, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AEGIS-256 records holding fp16 pieces open into the float16 the decoder keeps (no
    # buffer per record, no copy), in a worker thread (they are converted there too).
    seen: list[tuple[bool, bool]] = []  # (direct, on the loop thread) per piece fed
    feed_direct, feed_piece = TensorStreamDecoder.feed_direct, TensorStreamDecoder.feed_piece

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def counting_direct(self: TensorStreamDecoder) -> None:
        seen.append((True, on_loop()))
        feed_direct(self)

    def counting_piece(self: TensorStreamDecoder, piece: bytes | bytearray | memoryview) -> None:
        seen.append((False, on_loop()))
        feed_piece(self, piece)

    monkeypatch.setattr(TensorStreamDecoder, "feed_direct", counting_direct)
    monkeypatch.setattr(TensorStreamDecoder, "feed_piece", counting_piece)
    tensors = delta(2_000_000)  # 4 MB as fp16: 4 pieces
    spec = CodecSpec(kind="fp16", lz4=False)
    async with asyncio.timeout(TIMEOUT_S), channels("memory", pki, pinned(cipher)) as (c, s):
        sending = asyncio.create_task(c.send_tensors(update(tensors), spec))
        got = await s.recv_tensors()
        await sending
    assert isinstance(got, wire.Update)
    want = decode_tensors(*encode_tensors(tensors, spec))
    for name, arr in want.items():
        assert np.array_equal(got.delta[name], arr)
        if arr.dtype.kind == "f":  # floats travel as float16, remembered as received
            kept = half_source(got.delta[name])
            assert kept is not None and np.array_equal(kept, tensors[name].astype(np.float16))
    if cipher == CIPHER_AEGIS256:
        # the last piece holds the end of conv.weight and the small tensors: copied
        assert sum(direct for direct, _ in seen) == 3 and not any(loop for _, loop in seen)
    else:  # PyNaCl's secretstream returns fresh bytes: every piece is copied
        assert seen and not any(direct for direct, _ in seen)


@pytest.mark.parametrize(
    ("dtype", "codec", "on_loop_thread"),
    [
        (np.float32, "fp32", True),  # the model going down: pieces are slices of it
        (np.float16, "fp16", True),  # a site's delta kept as float16: slices too
        (np.float32, "fp16", False),  # converted piece by piece: a worker builds it
        (np.float64, "fp32", False),  # cast to float32 first
    ],
)
async def test_an_encoder_that_only_slices_memory_is_built_on_the_loop_thread(
    dtype: type, codec: str, on_loop_thread: bool, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[bool] = []  # per encoder: built on the event loop's thread
    init = TensorStreamEncoder.__init__

    def noting_init(self: TensorStreamEncoder, *args: Any, **kwargs: Any) -> None:
        try:
            asyncio.get_running_loop()
            built.append(True)
        except RuntimeError:
            built.append(False)
        init(self, *args, **kwargs)

    monkeypatch.setattr(TensorStreamEncoder, "__init__", noting_init)
    tensors: dict[str, np.ndarray] = {
        "w": np.random.default_rng(1).standard_normal(600_000).astype(dtype)
    }
    spec = CodecSpec(kind=codec)  # type: ignore[arg-type]
    async with asyncio.timeout(TIMEOUT_S), channels("memory", pki) as (client, server):
        sending = asyncio.create_task(client.send_tensors(update(tensors), spec))
        got = await server.recv_tensors()
        await sending
    assert built == [on_loop_thread]
    assert isinstance(got, wire.Update)
    want = decode_tensors(*encode_tensors(tensors, spec))
    assert np.array_equal(got.delta["w"], want["w"])


@pytest.mark.parametrize("size", [400, 1_500_000])  # one record, and streamed
async def test_a_gated_message_is_delivered_only_once_its_gate_is_done(size: int, pki: Pki) -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    msg = update(delta(size))
    async with asyncio.timeout(TIMEOUT_S), channels("memory", pki) as (client, server):
        sending = asyncio.create_task(client.send_tensors(msg, after=gate))
        receiving = asyncio.create_task(server.recv_tensors())
        await asyncio.sleep(0.2)  # everything but the last record may move meanwhile
        assert not receiving.done() and not sending.done()
        gate.set_result(None)
        got = await receiving
        await sending
    assert isinstance(got, wire.Update) and got.seq == msg.seq


async def test_a_failed_gate_breaks_the_channel_and_the_message_never_arrives(pki: Pki) -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    async with asyncio.timeout(TIMEOUT_S), channels("memory", pki) as (client, server):
        sending = asyncio.create_task(client.send_tensors(update(delta(1_500_000)), after=gate))
        receiving = asyncio.create_task(server.recv_tensors())
        await asyncio.sleep(0.05)
        gate.set_exception(OSError(28, "No space left on device"))
        with pytest.raises(OSError):
            await sending
        assert client.closed
        with pytest.raises((ProtocolError, LinkClosed)):
            await receiving


async def test_small_tensor_messages_are_not_streamed(pki: Pki) -> None:
    msgs: list[wire.Message] = [
        update(delta(400)),
        wire.Ack("site-1", 3),
        wire.ModelBroadcast(4, {"w": np.ones((3, 3), np.float32)}),
        wire.Heartbeat("site-1", 9),
    ]
    async with asyncio.timeout(TIMEOUT_S), channels("memory", pki) as (client, server):
        for msg in msgs:
            await client.send_tensors(msg)
            got = await server.recv_tensors()
            assert wire.encode(got) == wire.encode(msg)
        await client.send_tensors(wire.Ack("site-1", 4))
        assert wire.decode(await server.recv_message()) == wire.Ack("site-1", 4)


@pytest.mark.parametrize("cipher", CIPHER_PARAMS)
async def test_rekey_in_the_middle_of_a_message(cipher: str, pki: Pki) -> None:
    options = pinned(cipher, rekey_bytes=256 * 1024)
    big = os.urandom(5 * (1 << 20))
    tensors = delta(1_000_000)
    async with asyncio.timeout(TIMEOUT_S), channels("ws", pki, options) as (client, server):
        sending = asyncio.create_task(client.send_message(big))
        assert await server.recv_message() == big
        await sending
        after_first = client.rekeys
        assert after_first >= 3  # several times inside one 5 MiB message
        sending = asyncio.create_task(client.send_tensors(update(tensors)))
        got = await server.recv_tensors()
        await sending
        assert client.rekeys >= after_first + 3  # and inside a streamed one
        assert isinstance(got, wire.Update)
        assert np.array_equal(got.delta["conv.weight"], tensors["conv.weight"])
        await server.send_message(b"still fine")
        assert await client.recv_message() == b"still fine"


@pytest.mark.parametrize("kind", LINK_KINDS)
async def test_full_duplex_and_orderly_close(kind: str, pki: Pki) -> None:
    async with asyncio.timeout(TIMEOUT_S), link_pair(kind) as (a, b):
        client, server = await channel_pair(a, b, pki)

        async def talk(channel: SecureChannel, tag: bytes) -> list[bytes]:
            async def send_all() -> None:
                for i in range(30):
                    await channel.send_message(tag * (i * 5000))

            sender = asyncio.create_task(send_all())
            got = [await channel.recv_message() for _ in range(30)]
            await sender
            return got

        got_c, got_s = await asyncio.gather(talk(client, b"c"), talk(server, b"s"))
        assert got_c == [b"s" * (i * 5000) for i in range(30)]
        assert got_s == [b"c" * (i * 5000) for i in range(30)]
        await client.close()
        with pytest.raises(ChannelClosed):
            await server.recv_message()
        assert server.peer_closed
        with pytest.raises(ChannelClosed):
            await client.send_message(b"after close")
        await server.close()


async def test_cancelled_idle_receive_leaves_the_channel_usable(pki: Pki) -> None:
    async with asyncio.timeout(TIMEOUT_S), channels("ws", pki) as (client, server):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await server.recv_message()
        await client.send_message(b"later")
        assert await server.recv_message() == b"later"


# ------------------------------------------------------------------ rejections


class TamperLink:
    """Wraps a link; ``tamper(i, frame)`` returns the frames actually sent for send #i."""

    def __init__(self, inner: Link, tamper: Callable[[int, bytes], list[bytes]]) -> None:
        self._inner = inner
        self._tamper = tamper
        self._sent = 0

    @property
    def closed(self) -> bool:
        return self._inner.closed

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        i, self._sent = self._sent, self._sent + 1
        for frame in self._tamper(i, data):
            await self._inner.send(frame)

    async def recv(self) -> bytes:
        return await self._inner.recv()

    async def close(self) -> None:
        await self._inner.close()


def flip(frame: bytes, at: int) -> bytes:
    out = bytearray(frame)
    out[at % len(out)] ^= 0x40
    return bytes(out)


def make_tamper(kind: str) -> Callable[[int, bytes], list[bytes]]:
    first = HANDSHAKE_FRAMES  # the first record after the handshake and stream header
    held: list[bytes] = []

    def tamper(i: int, frame: bytes) -> list[bytes]:
        if i < first:
            return [frame]
        if kind == "flip_body" and i == first + 1:
            return [flip(frame, len(frame) // 2)]
        if kind == "flip_mac" and i == first + 1:
            return [flip(frame, -1)]
        if kind == "flip_flags" and i == first + 1:  # aegis256: the flags byte in clear
            return [flip(frame, 0)]
        if kind == "truncate" and i == first + 1:
            return [frame[:-5]]
        if kind == "duplicate" and i == first + 1:
            return [frame, frame]
        if kind == "drop" and i == first + 1:
            return []
        if kind == "reorder" and i == first + 1:
            held.append(frame)
            return []
        if kind == "reorder" and i == first + 2:
            return [frame, held.pop()]
        return [frame]

    return tamper


@pytest.mark.parametrize("cipher", CIPHER_PARAMS)
@pytest.mark.parametrize(
    "tampering", ["flip_body", "flip_mac", "flip_flags", "truncate", "duplicate", "drop", "reorder"]
)
async def test_tampered_record_closes_the_channel(tampering: str, cipher: str, pki: Pki) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        a, b = memory_link_pair()
        client, server = await channel_pair(
            TamperLink(a, make_tamper(tampering)), b, pki, options=pinned(cipher)
        )
        await client.send_message(b"record one")
        for i in range(3):
            await client.send_message(b"record %d" % (i + 2))
        assert await server.recv_message() == b"record one"
        if tampering == "duplicate":
            assert await server.recv_message() == b"record 2"  # the original; its copy fails
        with pytest.raises(RecordError, match="authentication"):
            await server.recv_message()
        assert server.closed
        with pytest.raises(ChannelClosed, match="broken"):
            await server.recv_message()
        with pytest.raises(ChannelTruncated):
            await client.recv_message()  # the peer hung up on us, without TAG_FINAL


@pytest.mark.parametrize("cipher", CIPHER_PARAMS)
async def test_record_tampered_inside_a_streamed_message(cipher: str, pki: Pki) -> None:
    tensors = delta(2_000_000)
    async with asyncio.timeout(TIMEOUT_S):
        a, b = memory_link_pair()

        def tamper(i: int, frame: bytes) -> list[bytes]:
            return [flip(frame, 1000)] if i == HANDSHAKE_FRAMES + 4 else [frame]

        client, server = await channel_pair(TamperLink(a, tamper), b, pki, options=pinned(cipher))
        sending = asyncio.create_task(client.send_tensors(update(tensors)))
        with pytest.raises(RecordError):
            await server.recv_tensors()
        assert server.closed
        # The sender may have queued every record before the server broke the link (a
        # race, not a fault); either way nothing more goes through.
        with contextlib.suppress(LinkClosed):
            await sending
        with pytest.raises((LinkClosed, ChannelClosed)):
            await client.send_message(b"more")


@pytest.mark.parametrize("kind", LINK_KINDS)
async def test_missing_tag_final_is_detected(kind: str, pki: Pki) -> None:
    async with asyncio.timeout(TIMEOUT_S), link_pair(kind) as (a, b):
        client, server = await channel_pair(a, b, pki)
        await client.send_message(b"last words")
        await a.close()  # the link ends, but the channel was never closed
        assert await server.recv_message() == b"last words"
        with pytest.raises(ChannelTruncated, match="TAG_FINAL"):
            await server.recv_message()


async def test_eof_in_the_middle_of_a_message(pki: Pki) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        a, b = memory_link_pair()

        def tamper(i: int, frame: bytes) -> list[bytes]:
            return [] if i >= HANDSHAKE_FRAMES + 2 else [frame]

        client, server = await channel_pair(TamperLink(a, tamper), b, pki)
        await client.send_message(os.urandom(3 * (1 << 20)))  # only the first record goes out
        await a.close()
        with pytest.raises(ChannelTruncated):
            await server.recv_message()


@pytest.mark.parametrize("kind", LINK_KINDS)
async def test_oversize_frame_is_rejected(kind: str, pki: Pki) -> None:
    cap = (1 << 20) + 64
    async with asyncio.timeout(TIMEOUT_S), link_pair(kind, max_frame=cap) as (a, b):
        client, server = await channel_pair(a, b, pki)
        await client.send_message(b"fine")
        await a.send(bytes(cap + 1))  # below the channel: one frame too large
        assert await server.recv_message() == b"fine"
        with pytest.raises(FrameTooLarge):
            await server.recv_message()
        assert server.closed


async def test_message_above_the_cap_closes_the_channel(pki: Pki) -> None:
    from fedloom.transport.limits import Limits

    options = ChannelOptions(limits=Limits(max_message_bytes=2 * (1 << 20)))
    async with asyncio.timeout(TIMEOUT_S), channels("memory", pki, options) as (client, server):
        sending = asyncio.create_task(client.send_message(bytes(3 * (1 << 20))))
        with pytest.raises(FrameTooLarge):
            await server.recv_message()
        with contextlib.suppress(LinkClosed):
            await sending
        assert server.closed


@pytest.mark.parametrize("cipher", CIPHER_PARAMS)
@pytest.mark.parametrize("row", [100, 200_000])  # in the first piece, and further on
async def test_bad_tensors_are_rejected_and_the_channel_goes_on(
    row: int, cipher: str, pki: Pki
) -> None:
    tensors = delta(1_000_000)
    tensors["conv.weight"][row, 2] = np.inf if row > 1000 else np.nan
    assert tensors["conv.weight"].nbytes > STREAM_ABOVE
    async with asyncio.timeout(TIMEOUT_S), channels("ws", pki, pinned(cipher)) as (client, server):
        sending = asyncio.create_task(client.send_tensors(update(tensors)))
        with pytest.raises(NonFiniteTensor, match=r"conv\.weight"):
            await server.recv_tensors()
        await sending
        small = update(delta(100))
        await client.send_tensors(small)
        assert isinstance(await server.recv_tensors(), wire.Update)
        # A tensor stream where bytes are expected is skipped whole, with a clear error.
        sending = asyncio.create_task(client.send_tensors(update(delta(1_000_000))))
        with pytest.raises(UnexpectedMessage):
            await server.recv_message()
        await sending
        await client.send_message(b"in sync")
        assert await server.recv_message() == b"in sync"
        assert not server.closed


async def test_unknown_key_is_refused_before_any_application_data(pki: Pki) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        a, b = memory_link_pair()
        frames_read: list[bytes] = []

        class Spy(TamperLink):
            async def recv(self) -> bytes:
                frame = await super().recv()
                frames_read.append(frame)
                return frame

        spy = Spy(b, lambda i, f: [f])
        results = await asyncio.gather(
            client_channel(a, pki.stranger, pki.roster, "agg"),
            server_channel(spy, pki.server, pki.roster),
            return_exceptions=True,
        )
        client_result, server_result = results
        assert isinstance(server_result, PeerRefused)
        assert "unknown key" in str(server_result)
        assert isinstance(client_result, HandshakeError)
        assert len(frames_read) == 1  # c1 only: nothing after the refusal was parsed
        assert spy.closed


@pytest.mark.parametrize("who", ["wrong_id", "wrong_role", "wrong_server"])
async def test_key_under_another_identity_is_refused(who: str, pki: Pki) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        a, b = memory_link_pair()
        if who == "wrong_id":  # site-1's key claiming to be site-2
            client = Identity("site-2", "site", pki.client.signing_key)
            expected = "agg"
        elif who == "wrong_role":  # site-1's key claiming the root role
            client = Identity("site-1", "root", pki.client.signing_key)
            expected = "agg"
        else:  # the client dialled site-2 but reached the aggregator
            client = pki.client
            expected = "site-2"
        results = await asyncio.gather(
            client_channel(a, client, pki.roster, expected),
            server_channel(b, pki.server, pki.roster),
            return_exceptions=True,
        )
        assert all(isinstance(r, HandshakeError) for r in results), results
        assert any(isinstance(r, PeerRefused) for r in results), results


async def test_handshake_timeout(pki: Pki) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        a, b = memory_link_pair()
        with pytest.raises(HandshakeTimeout):
            await server_channel(b, pki.server, pki.roster, timeout=0.2)  # a sends nothing
        assert b.closed
        with pytest.raises(LinkClosed):
            await a.recv()


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 10, os.urandom(4096), os.urandom(5000)])
async def test_garbage_handshake_is_refused(garbage: bytes, pki: Pki) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        a, b = memory_link_pair()
        await a.send(garbage)
        with pytest.raises(HandshakeError):
            await server_channel(b, pki.server, pki.roster)
        assert b.closed


def test_bad_channel_options_are_value_errors() -> None:
    with pytest.raises(ValueError, match="offload must be one of"):
        ChannelOptions(offload="gpu")
    with pytest.raises(ValueError, match="record ciphers must be distinct names"):
        ChannelOptions(ciphers=("rot13",))


async def test_errors_are_protocol_errors_with_reasons() -> None:
    for cls in (ChannelTruncated, UnexpectedMessage, HandshakeTimeout):
        assert issubclass(cls, ProtocolError)
        assert cls.reason
    assert issubclass(ChannelClosed, LinkClosed)


# ------------------------------------------------------------------ a server under abuse


@contextlib.asynccontextmanager
async def secure_echo_server(
    pki: Pki, limits: GateLimits | None = None, **server_options: Any
) -> AsyncIterator[tuple[ws.WsServer, Gatekeeper]]:
    gate = Gatekeeper(pki.server, pki.roster, limits=limits)

    async def on_link(link: ws.WebSocketLink) -> None:
        channel = await gate.accept(link, address=link.remote_address)
        try:
            while True:
                await channel.send_message(await channel.recv_message())
        except ChannelClosed:
            pass
        finally:
            await channel.close()

    server_options.setdefault("idle_timeout", gate.limits.handshake_timeout)
    server = await ws.serve("127.0.0.1", 0, on_link, close_timeout=0.5, **server_options)
    try:
        yield server, gate
    finally:
        await server.close()


async def dial(server: ws.WsServer, pki: Pki, identity: Identity | None = None) -> SecureChannel:
    link = await ws.connect(server.url, close_timeout=0.5)
    return await client_channel(link, identity or pki.client, pki.roster, "agg")


async def echo(channel: SecureChannel, payload: bytes) -> None:
    await channel.send_message(payload)
    assert await channel.recv_message() == payload


async def test_server_survives_every_rejection(pki: Pki) -> None:
    async with asyncio.timeout(TIMEOUT_S), secure_echo_server(pki) as (server, gate):
        with pytest.raises(HandshakeError):
            await dial(server, pki, pki.stranger)  # unknown key
        with pytest.raises(HandshakeError):
            await dial(server, pki, Identity("site-2", "site", pki.client.signing_key))
        garbage = await ws.connect(server.url, close_timeout=0.5)
        await garbage.send(os.urandom(300))  # not a handshake
        with pytest.raises(LinkClosed):
            await garbage.recv()
        oversize = await ws.connect(server.url, close_timeout=0.5)
        await oversize.send(bytes(ws.MAX_FRAME + 1))
        with pytest.raises(LinkClosed):
            await oversize.recv()
        # A tampered record after a good handshake.
        link = await ws.connect(server.url, close_timeout=0.5)
        tampered = TamperLink(link, make_tamper("flip_body"))
        channel = await client_channel(tampered, pki.client, pki.roster, "agg")
        await echo(channel, b"fine")
        await channel.send_message(b"tampered")
        with pytest.raises(ChannelTruncated):
            await channel.recv_message()
        # ...and the server still serves an honest client.
        honest = await dial(server, pki)
        await echo(honest, b"still here")
        await honest.close()
        assert gate.refused == {"peer_refused": 2, "handshake": 1, "too_large": 1}
        assert gate.accepted == 2


async def test_a_thousand_half_open_connections(pki: Pki) -> None:
    """Silent TCP, half an HTTP request, silent WebSockets and half handshakes, 1,000 in
    all, while an authenticated link keeps working; the cap and the time-outs bound them."""
    max_pending = 64
    # Every connection comes from 127.0.0.1: the caps per address are the global ones here
    # (test_a_flood_from_one_address_does_not_keep_a_site_out tests those).
    limits = GateLimits(max_pending, max_pending_per_address=max_pending, handshake_timeout=2.0)
    async with (
        asyncio.timeout(40.0),
        secure_echo_server(pki, limits, max_connections_per_address=4096) as (server, gate),
    ):
        live = await dial(server, pki)
        await echo(live, b"before")
        writers: list[asyncio.StreamWriter] = []
        links: list[ws.WebSocketLink] = []

        async def silent_tcp(partial: bytes) -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(partial)
            writers.append(writer)

        async def half_websocket(first_flight: bool) -> None:
            with contextlib.suppress(LinkClosed):
                link = await ws.connect(server.url, close_timeout=0.2, heartbeat=None)
                links.append(link)
                if first_flight:  # c1, then silence
                    await link.send(ClientHandshake(pki.client, pki.roster, "agg").start())

        half_http = b"GET /fedloom HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        opened = [silent_tcp(b"") for _ in range(400)]
        opened += [silent_tcp(half_http) for _ in range(200)]
        opened += [half_websocket(i % 2 == 0) for i in range(400)]
        peak_pending = 0
        for batch in range(0, len(opened), 100):
            await asyncio.gather(*opened[batch : batch + 100])
            peak_pending = max(peak_pending, gate.pending)
            await echo(live, os.urandom(64 * 1024))  # the live link keeps working
        assert len(writers) + len(links) == 1000
        assert peak_pending <= max_pending
        assert gate.refused["busy"] > 0  # the cap was reached, and enforced
        for _ in range(10):
            await echo(live, os.urandom(256 * 1024))
        # Every half-open connection is gone within the time-outs; the live one remains.
        async with asyncio.timeout(15.0):
            while gate.pending or server.open_connections > 1:
                await asyncio.sleep(0.1)
        assert gate.refused["handshake_timeout"] > 0
        await echo(live, b"after")
        fresh = await dial(server, pki)  # and new peers get in again
        await echo(fresh, b"welcome")
        await fresh.close()
        await live.close()
        for writer in writers:
            writer.close()
        for link in links:
            await link.close()


FLOOD_FROM = "127.0.0.2"  # loopback is all of 127.0.0.0/8: another source address
# The gate's handshake time-out in the flood tests: short, so the flood renews itself within
# the test, but long enough that the real site's handshake beats it on a loaded machine
# (the parallel suite on 2 cores).
HANDSHAKE_S = 1.5
UPGRADE = (
    b"GET /fedloom HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


async def flood(port: int, size: int, opened: list[int]) -> None:
    """Keep ``size`` idle upgrades open from FLOOD_FROM, opening a new one as soon as the
    server drops one (refused or timed out), until cancelled."""
    await flood_from([FLOOD_FROM], port, size, opened)


async def flood_from(addresses: list[str], port: int, per_address: int, opened: list[int]) -> None:
    """Keep ``per_address`` idle upgrades open from each of ``addresses``, opening a new
    one as soon as the server drops one (refused or timed out), until cancelled."""

    async def one_slot(address: str) -> None:
        while True:
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(address, 0)
                )
                writer.write(UPGRADE)
                opened[0] += 1
                try:
                    while await reader.read(4096):  # until the server drops it
                        pass
                finally:
                    writer.close()
            await asyncio.sleep(0.01)

    async with asyncio.TaskGroup() as tg:
        for address in addresses:
            for _ in range(per_address):
                tg.create_task(one_slot(address))


async def test_a_flood_from_one_address_does_not_keep_a_site_out(pki: Pki) -> None:
    """The attack: more idle WebSocket upgrades than the gate admits at once, from one
    address, renewed as soon as the server drops them. A rostered site, from another
    address, completes its handshake while the flood goes on."""
    limits = GateLimits(max_pending=16, handshake_timeout=HANDSHAKE_S)
    assert limits.per_address == 2  # max_pending // 8: the rest is for other addresses
    opened = [0]
    async with asyncio.timeout(TIMEOUT_S), secure_echo_server(pki, limits) as (server, gate):
        # Four times max_pending: dropped links free their slot before the attacker sees
        # their TCP close, so it keeps more open than the gate admits.
        flooding = asyncio.create_task(flood(server.port, 64, opened))
        try:
            # The flood holds its share, is refused beyond it, and renews what times out.
            async with asyncio.timeout(10.0):
                while gate.refused["handshake_timeout"] < 2 or gate.pending_from(FLOOD_FROM) < 2:
                    await asyncio.sleep(0.01)
            assert gate.refused["busy_address"] > 0
            for _ in range(5):
                site = await dial(server, pki)  # from 127.0.0.1, in the middle of the flood
                await echo(site, b"admitted")
                await site.close()
                assert gate.pending_from(FLOOD_FROM) <= limits.per_address
                assert gate.pending <= limits.max_pending
            assert not flooding.done()
        finally:
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flooding
        assert gate.accepted == 5
        assert opened[0] > 64  # it did renew itself


def test_gate_limits_are_validated() -> None:
    assert GateLimits().per_address == 32 and GateLimits(max_pending=7).per_address == 1
    assert GateLimits(max_pending=10, max_pending_per_address=10).per_address == 10
    assert GateLimits().reserved == 64 and GateLimits(max_pending=3).reserved == 0
    assert GateLimits(max_pending=10, reserved_for_known=9).reserved == 9
    bad: dict[str, Any]
    for bad in (
        {"max_pending": 4, "reserved_for_known": 4},
        {"reserved_for_known": -1},
        {"max_pending": 0},
        {"max_pending_per_address": 0},
        {"max_pending": 4, "max_pending_per_address": 5},
        {"handshake_timeout": 0.0},
    ):
        with pytest.raises(ValueError):
            GateLimits(**bad)


async def test_pending_handshakes_are_counted_per_address(pki: Pki) -> None:
    # Memory links: the address is whatever the caller says it is.
    gate = Gatekeeper(pki.server, pki.roster, limits=GateLimits(max_pending=4, handshake_timeout=5))
    held: list[Link] = []
    tasks: list[asyncio.Task[SecureChannel]] = []
    for address in ("10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "2001:db8::2", None):
        client, server = memory_link_pair()
        held.append(client)
        tasks.append(asyncio.create_task(gate.accept(server, address=address)))
    await asyncio.sleep(0)
    # 10.0.0.1 and its IPv4-mapped form are one address, and so is one IPv6 /64.
    assert [t.done() for t in tasks] == [False, True, False, True, False]
    for task in (tasks[1], tasks[3]):
        with pytest.raises(AddressBusy):
            await task
    assert gate.pending == 3 and gate.pending_from("10.0.0.1") == 1
    assert gate.pending_from("2001:db8::ffff") == 1 and gate.pending_from(None) == 1
    assert gate.refused == {"busy_address": 2}
    for link in held:
        await link.close()
    for task in (tasks[0], tasks[2], tasks[4]):
        with pytest.raises((ProtocolError, LinkClosed)):
            await task
    assert gate.pending == 0 and gate.pending_from("10.0.0.1") == 0


async def _gate_login(gate: Gatekeeper, pki: Pki, identity: Identity, address: str) -> None:
    """``identity`` authenticates to ``gate`` from ``address`` (a memory link), then leaves."""
    client, server = memory_link_pair()
    channels = await asyncio.gather(
        client_channel(client, identity, pki.roster, "agg"), gate.accept(server, address=address)
    )
    for channel in channels:
        await channel.close()


async def test_a_rostered_insider_cannot_hold_the_reserve_for_known_addresses(pki: Pki) -> None:
    """The attack (second review, finding 4): a rostered site authenticates from two
    addresses, which makes both known, then holds every idle handshake the per-address
    cap allows from each (the whole reserve, before); six unknown addresses hold the
    rest. A returning honest site, from the address it authenticated from before, still
    completes its handshake: the insider held only its share of the reserve."""
    gate = Gatekeeper(pki.server, pki.roster, limits=GateLimits(handshake_timeout=5.0))
    limits = gate.limits
    share = reserve_share(limits.reserved)
    assert (limits.max_pending, limits.per_address, limits.reserved, share) == (256, 32, 64, 8)
    for identity, address in ((pki.other, "10.0.0.1"), (pki.other, "10.0.0.2")):
        await _gate_login(gate, pki, identity, address)  # the insider, site-2
    await _gate_login(gate, pki, pki.client, "10.0.0.3")  # the honest site, before
    assert {gate.known.peer_of(f"10.0.0.{i}") for i in (1, 2, 3)} == {"site-1", "site-2"}

    held: list[Link] = []
    tasks: list[asyncio.Task[SecureChannel]] = []
    flood = ["10.0.0.1", "10.0.0.2"] * limits.per_address
    flood += [f"192.0.2.{i}" for i in range(1, 7) for _ in range(limits.per_address)]
    for address in flood:
        client, server = memory_link_pair()
        held.append(client)  # never sends its flight
        tasks.append(asyncio.create_task(gate.accept(server, address=address)))
    await asyncio.sleep(0)
    outside = limits.max_pending - limits.reserved
    assert gate.reserved_by("site-2") == share  # of 64; its other links share the 192
    assert gate.pending == outside + share and gate.refused["busy"] == len(flood) - gate.pending
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await _gate_login(gate, pki, pki.client, "10.0.0.3")  # admitted mid-flood
        assert gate.accepted == 4 and gate.reserved_by("site-2") == share
    finally:
        for link in held:
            await link.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, (ProtocolError, LinkClosed)) for r in results)
    assert gate.pending == 0 and gate.reserved_by("site-2") == 0


def _masked(first: int, payload: bytes) -> bytes:
    """A client frame of < 126 bytes, masked with an all-zero key (a valid key)."""
    return bytes((first, 0x80 | len(payload))) + bytes(4) + payload


@pytest.mark.parametrize(
    ("fragment", "code"),
    [
        pytest.param(b"", 1008, id="empty"),  # an empty non-final fragment: at once
        pytest.param(b"x", 1008, id="one-byte"),  # the 1,025th fragment
        pytest.param(b"y" * 100, 1009, id="100-bytes"),  # past the 4 KiB handshake cap
    ],
)
async def test_a_fragment_flood_before_authentication_is_cut_off(
    fragment: bytes, code: int, pki: Pki
) -> None:
    """The attack: right after the upgrade, one message that never ends, in 20,000 small
    or empty fragments. It used to cost the server an array per fragment (hundreds of
    MB per connection); now the connection is failed within a few KiB, and a rostered
    site is served meanwhile."""
    count = 20_000 if len(fragment) < 100 else 1_500  # about 150 kB in all
    attack = UPGRADE + _masked(0x02, fragment) + _masked(0x00, fragment) * count
    async with asyncio.timeout(TIMEOUT_S), secure_echo_server(pki) as (server, gate):
        tracemalloc.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(attack)
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
            first, second = await reader.readexactly(2)
            assert first == 0x88  # a close frame...
            body = await reader.readexactly(second & 0x7F)
            assert int.from_bytes(body[:2], "big") == code  # ...saying why
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        writer.close()
        assert peak <= 1024 * 1024  # the attack's bytes were built before tracing
        site = await dial(server, pki)
        await echo(site, b"served")
        await site.close()
        assert gate.accepted == 1
        async with asyncio.timeout(5.0):
            while sum(gate.refused.values()) != 1:  # the framing error, as the gate saw it
                await asyncio.sleep(0.01)
