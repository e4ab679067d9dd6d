"""Secure transport throughput against raw WebSockets (issue 3, "What must be shown" 3).

A site process sends a 100 MB fp32 delta (25M parameters) to an aggregator process over
loopback WebSockets, end to end: encode, compress, encrypt, send, receive, decrypt and
decode into tensors (``SecureChannel.send_tensors`` / ``recv_tensors``), and the same
number of bytes as raw aiohttp WebSocket frames (1 MiB binary frames, compression off)
in the same run: that is the baseline of the ratio, the fastest raw transfer aiohttp
does. For context, raw bytes sent as one 100 MB WebSocket message are timed too
(aiohttp reassembles large messages slowly, so that baseline would flatter the ratio),
and the same 1 MiB frames received by the frame reader fedloom's server links use
(``transport.ws_frames``: one unmasking copy per payload where aiohttp's reader makes
five), with the ratio of secure fp32 to that, so the reader's share of the result shows.

The secure channel uses the record cipher the handshake negotiates by default (on a CPU
with AES instructions: AEGIS-256, ``aegis256-stream``) and the default placement of the
work (cheap AEGIS records sealed and opened on the event loop). For comparison, fp32 is
also sent over a channel pinned to ``xchacha20poly1305-secretstream``, and over one whose
ends seal and open every record in the thread pool (``ChannelOptions(offload="pool")``).

Each trial ends when the site gets the aggregator's acknowledgement, sent once the whole
message has been received (and, for the secure path, decoded). Trials alternate raw and
secure; figures are medians of 5. The fp16 and int8 rates are effective fp32-equivalent
rates (100 MB of fp32 parameters per elapsed second). Also: handshake latency (an open
WebSocket, handshake only) and handshakes per second (16 concurrent dialers, TCP +
WebSocket + handshake). Every decoded delta is checked against the batch codec's output
(a BLAKE2b hash, outside the timed window). The CPU time both processes spent per trial
is printed too: where cores are few, both paths are CPU-bound and the ratio of rates
follows the ratio of CPU times. Two lines bound what this design could reach here with
each cipher: the CPU time of raw frames through fedloom's reader plus that of sealing
and opening the same bytes as records (measured in this process), divided by the number
of CPUs, is the shortest possible secure transfer on this machine.

    .venv/bin/python bench/transport_throughput.py [--params 25000000] [--trials 5]

Target: secure fp32 >= 0.6x the raw rate. Prints ``transport_ratio: X.XX x`` last.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from _multiproc import daemon_malloc, install_loop, model_weights, pki  # noqa: E402
from aiohttp import web  # noqa: E402

from fedloom.transport import wire, ws  # noqa: E402
from fedloom.transport.channel import (  # noqa: E402
    ChannelClosed,
    ChannelOptions,
    Gatekeeper,
    SecureChannel,
    client_channel,
)
from fedloom.transport.identity import Identity  # noqa: E402
from fedloom.transport.records import CHUNK_SIZE, CIPHER_SECRETSTREAM  # noqa: E402
from fedloom.transport.roster import Roster  # noqa: E402
from fedloom.transport.tensors import CodecKind, CodecSpec, decode_tensors, encode_tensors  # noqa: E402

MB = 1e6
CODECS: tuple[CodecKind, ...] = ("fp32", "fp16", "int8")
SECRETSTREAM_FP32 = "fp32-secretstream"  # the same fp32 trial, on a channel pinned to it
POOL_FP32 = "fp32-pool"  # ... on a channel whose ends seal and open in the thread pool
HANDSHAKES_SEQUENTIAL = 50
HANDSHAKES_CONCURRENT = 300
DIALERS = 16


def make_delta(params: int) -> dict[str, np.ndarray]:
    """A model-shaped fp32 delta: one large matrix and a few small tensors."""
    small = {"fc1.bias": 4096, "fc2.weight": 419_000, "fc2.bias": 904}
    return model_weights(params, 4096, small, 1e-3)


def tensors_hash(tensors: dict[str, np.ndarray]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name, arr in tensors.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(arr).data)
    return h.digest()


def identities(seeds: dict[str, bytes]) -> tuple[Identity, Identity, Roster]:
    ids, roster = pki({"site-1": "site", "agg": "root"}, {"site-1": seeds["site"], **seeds})
    return ids["site-1"], ids["agg"], roster


# ------------------------------------------------------------------ aggregator process


def aggregator_main(seeds: dict[str, bytes], nbytes: int, ports: Any, stop: Any) -> None:
    install_loop()
    asyncio.run(aggregator(seeds, nbytes, ports, stop))


async def aggregator(seeds: dict[str, bytes], nbytes: int, ports: Any, stop: Any) -> None:
    _, agg, roster = identities(seeds)
    gates = {
        "auto": Gatekeeper(agg, roster),
        "pool": Gatekeeper(agg, roster, options=ChannelOptions(offload="pool")),
    }

    async def on_secure(link: ws.WebSocketLink, gate: Gatekeeper) -> None:
        channel = await gate.accept(link)
        try:
            while True:
                await channel.recv_message()  # "go": the trial starts now
                cpu = time.process_time()
                msg = await channel.recv_tensors()
                if isinstance(msg, wire.Update):
                    await channel.send_message(b"ok")  # the site stops its clock here
                    cpu = time.process_time() - cpu
                    digest = await asyncio.to_thread(tensors_hash, msg.delta)
                    await channel.send_message(struct.pack("<d", cpu) + digest)
        except ChannelClosed:
            pass
        finally:
            await channel.close()

    async def on_raw(request: web.Request) -> web.WebSocketResponse:
        frame_cap = nbytes if request.path.endswith("-message") else CHUNK_SIZE
        # /raw-one-copy: the same bytes through the frame reader fedloom's links use.
        response = ws.OneCopyWebSocketResponse if request.path.endswith("-one-copy") else None
        sock = (response or web.WebSocketResponse)(max_msg_size=frame_cap + 1, compress=False)
        await sock.prepare(request)
        received = 0
        cpu = 0.0
        async for frame in sock:
            if frame.type is not aiohttp.WSMsgType.BINARY:
                break
            if received == 0:
                cpu = time.process_time()  # a trial starts with its first frame
            received += len(frame.data)
            if received >= nbytes:
                received = 0
                await sock.send_bytes(b"ok")
                await sock.send_bytes(struct.pack("<d", time.process_time() - cpu))
        return sock

    secure = await ws.serve("127.0.0.1", 0, lambda link: on_secure(link, gates["auto"]))
    pooled = await ws.serve("127.0.0.1", 0, lambda link: on_secure(link, gates["pool"]))
    app = web.Application()
    app.router.add_get("/raw", on_raw)
    app.router.add_get("/raw-message", on_raw)
    app.router.add_get("/raw-one-copy", on_raw)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    raw_port = runner.addresses[0][1]
    ports.put((secure.url, pooled.url, f"ws://127.0.0.1:{raw_port}/raw"))
    await asyncio.to_thread(stop.wait)
    await secure.close()
    await pooled.close()
    await runner.cleanup()


# ------------------------------------------------------------------ site process


def site_main(seeds: dict[str, bytes], params: int, trials: int, urls: Any, out: Any) -> None:
    install_loop()
    out.put(asyncio.run(site(seeds, params, trials, *urls)))


async def timed(fn: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def site(
    seeds: dict[str, bytes],
    params: int,
    trials: int,
    secure_url: str,
    pool_url: str,
    raw_url: str,
) -> dict[str, Any]:
    site_id, _, roster = identities(seeds)
    delta = make_delta(params)
    nbytes = sum(a.nbytes for a in delta.values())
    expected = {
        c: tensors_hash(decode_tensors(*encode_tensors(delta, CodecSpec(kind=c)))) for c in CODECS
    }
    payload = np.concatenate([a.reshape(-1) for a in delta.values()]).tobytes()
    frames = [payload[i : i + CHUNK_SIZE] for i in range(0, len(payload), CHUNK_SIZE)]

    session = aiohttp.ClientSession()
    raw = await session.ws_connect(raw_url, max_msg_size=CHUNK_SIZE + 1, compress=0)
    raw_msg = await session.ws_connect(raw_url + "-message", max_msg_size=nbytes + 1, compress=0)
    raw_one = await session.ws_connect(
        raw_url + "-one-copy", max_msg_size=CHUNK_SIZE + 1, compress=0
    )
    channel = await client_channel(await ws.connect(secure_url), site_id, roster, "agg")
    pinned = await client_channel(
        await ws.connect(secure_url),
        site_id,
        roster,
        "agg",
        options=ChannelOptions(ciphers=(CIPHER_SECRETSTREAM,)),
    )
    pooled = await client_channel(
        await ws.connect(pool_url), site_id, roster, "agg", options=ChannelOptions(offload="pool")
    )

    def raw_trial(sock: aiohttp.ClientWebSocketResponse) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            for frame in frames:
                await sock.send_bytes(frame)
            assert await sock.receive_bytes() == b"ok"

        return run

    async def raw_message_trial() -> None:
        await raw_msg.send_bytes(payload)
        assert await raw_msg.receive_bytes() == b"ok"

    async def raw_cpu(sock: aiohttp.ClientWebSocketResponse = raw) -> float:
        (cpu,) = struct.unpack("<d", await sock.receive_bytes())
        return float(cpu)

    def secure_trial(codec: CodecKind, chan: SecureChannel) -> Callable[[], Awaitable[None]]:
        msg = wire.Update("site-1", 1, 0, delta, n_examples=1000)
        spec = CodecSpec(kind=codec)

        async def run() -> None:
            await chan.send_tensors(msg, spec)
            assert await chan.recv_message() == b"ok"

        return run

    secure: dict[str, tuple[CodecKind, SecureChannel]] = {c: (c, channel) for c in CODECS}
    secure[SECRETSTREAM_FP32] = ("fp32", pinned)
    secure[POOL_FP32] = ("fp32", pooled)
    raws = {"raw": raw, "raw_one_copy": raw_one}
    times: dict[str, list[float]] = {"raw_message": [], **{n: [] for n in (*raws, *secure)}}
    cpu: dict[str, list[float]] = {name: [] for name in times}  # site + aggregator
    for sock in raws.values():  # warm-up (page faults, buffer growth) on every path
        await raw_trial(sock)()
        await raw_cpu(sock)
    await raw_message_trial()
    await raw_cpu(raw_msg)
    for codec, chan in secure.values():
        await chan.send_message(b"go")
        await secure_trial(codec, chan)()
        await chan.recv_message()
    for _ in range(trials):
        for name, sock in raws.items():
            site_cpu = time.process_time()
            times[name].append(await timed(raw_trial(sock)))
            cpu[name].append(time.process_time() - site_cpu + await raw_cpu(sock))
        site_cpu = time.process_time()
        times["raw_message"].append(await timed(raw_message_trial))
        cpu["raw_message"].append(time.process_time() - site_cpu + await raw_cpu(raw_msg))
        for name, (codec, chan) in secure.items():
            await chan.send_message(b"go")
            site_cpu = time.process_time()
            times[name].append(await timed(secure_trial(codec, chan)))
            site_cpu = time.process_time() - site_cpu
            reply = await chan.recv_message()
            cpu[name].append(site_cpu + struct.unpack("<d", reply[:8])[0])
            if reply[8:] != expected[codec]:
                raise SystemExit(f"{name}: the decoded delta differs from the batch codec's")
    cipher = channel.cipher
    await channel.close()
    await pinned.close()
    await pooled.close()
    await raw.close()
    await raw_msg.close()
    await raw_one.close()
    await session.close()

    latencies = []
    for _ in range(HANDSHAKES_SEQUENTIAL):
        fresh = await ws.connect(secure_url)
        start = time.perf_counter()
        chan = await client_channel(fresh, site_id, roster, "agg")
        latencies.append(time.perf_counter() - start)
        await chan.close()

    async def dialer(count: int) -> None:
        for _ in range(count):
            chan: SecureChannel = await client_channel(
                await ws.connect(secure_url), site_id, roster, "agg"
            )
            await chan.close()

    start = time.perf_counter()
    per = HANDSHAKES_CONCURRENT // DIALERS
    await asyncio.gather(*(dialer(per) for _ in range(DIALERS)))
    rate = per * DIALERS / (time.perf_counter() - start)
    return {
        "nbytes": nbytes,
        "times": times,
        "cpu": cpu,
        "latencies": latencies,
        "rate": rate,
        "cipher": cipher,
    }


# ------------------------------------------------------------------ main


def record_layer_cpu(nbytes: int, cipher: str) -> float:
    """CPU seconds (median of 3) to seal and open ``nbytes`` as 1 MiB records of
    ``cipher``: work the secure path must do on top of what the raw path does."""
    from fedloom.transport.records import RecordReceiver, RecordSender

    # Pieces are views of one large buffer, as the encoder hands them over (so memory
    # traffic is what the real path pays, not a cache-hot 1 MiB buffer sealed again).
    data = memoryview(np.random.default_rng(0).bytes(nbytes))
    count = -(-nbytes // CHUNK_SIZE)
    runs = []
    for _ in range(3):
        key = os.urandom(32)
        sender = RecordSender(key, cipher=cipher)
        receiver = RecordReceiver(key, cipher=cipher)
        receiver.start(sender.header())
        start = time.process_time()
        for i in range(count):
            piece = data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE]
            receiver.open(sender.seal(piece, last=i == count - 1, now=0.0))
        runs.append(time.process_time() - start)
    return statistics.median(runs)


def main() -> None:
    malloc = daemon_malloc()  # first: it may re-execute this process
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    loop_name = install_loop()
    load = os.getloadavg()
    seeds = {"site": os.urandom(32), "agg": os.urandom(32)}
    ctx = mp.get_context("spawn")
    ports, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    nbytes = 4 * args.params
    agg = ctx.Process(target=aggregator_main, args=(seeds, nbytes, ports, stop), daemon=True)
    agg.start()
    try:
        urls = ports.get(timeout=60)
        site_proc = ctx.Process(
            target=site_main, args=(seeds, args.params, args.trials, urls, results), daemon=True
        )
        site_proc.start()
        result = results.get(timeout=600)
        site_proc.join(30)
    finally:
        stop.set()
        agg.join(30)
        if agg.is_alive():
            agg.terminate()

    size = result["nbytes"]
    times = result["times"]
    rate = {name: size / statistics.median(ts) / MB for name, ts in times.items()}
    print(
        f"transport bench: {size / MB:.1f} MB fp32 delta ({args.params:,} parameters), site "
        f"process -> aggregator process, loopback WebSockets, {loop_name}, {os.cpu_count()} "
        f"CPUs, load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )
    print(f"malloc: GLIBC_TUNABLES={malloc} (as the systemd units set it)")
    cpu = {name: statistics.median(values) for name, values in result["cpu"].items()}

    def line(label: str, name: str, unit: str) -> None:
        runs = ", ".join(f"{t:.3f}" for t in times[name])
        print(
            f"{label}: {rate[name]:7.1f} {unit}  (runs, s: {runs}; CPU site + aggregator "
            f"{cpu[name]:.2f} core-s)"
        )

    line("raw aiohttp WebSocket, 1 MiB binary frames (the baseline)", "raw", "MB/s")
    line("raw aiohttp WebSocket, one 100 MB message (context)", "raw_message", "MB/s")
    line(
        "raw WebSocket, 1 MiB frames, through fedloom's frame reader (context)",
        "raw_one_copy",
        "MB/s",
    )
    cipher = result["cipher"]
    line(f"secure fp32 end to end ({cipher}, the default)", "fp32", "MB/s")
    line(f"secure fp32 end to end ({CIPHER_SECRETSTREAM})", SECRETSTREAM_FP32, "MB/s")
    line(f"secure fp32 end to end ({cipher}, every record in the pool)", POOL_FP32, "MB/s")
    line("secure fp16 end to end", "fp16", "MB/s fp32-equivalent")
    line("secure int8 end to end", "int8", "MB/s fp32-equivalent")
    latency = 1000 * statistics.median(result["latencies"])
    print(
        f"handshake latency: median {latency:.2f} ms (open WebSocket, handshake only, "
        f"{HANDSHAKES_SEQUENTIAL} runs)"
    )
    print(
        f"handshakes per second: {result['rate']:.0f} ({DIALERS} concurrent dialers, "
        "TCP + WebSocket + handshake + close)"
    )
    cores = os.cpu_count() or 1
    raw_s = statistics.median(times["raw"])
    for name in (cipher, CIPHER_SECRETSTREAM):
        crypto = record_layer_cpu(size, name)
        floor_s = (cpu["raw_one_copy"] + crypto) / cores
        print(
            f"CPU-bound ceiling with {name}: raw bytes through fedloom's frame reader, "
            f"{cpu['raw_one_copy']:.2f} core-s, + sealing "
            f"and opening {size / MB:.0f} MB of records {crypto:.2f} core-s (measured in this "
            f"process), spread perfectly over {cores} CPUs, take >= {floor_s:.3f} s: secure "
            f"fp32 <= {size / floor_s / MB:.0f} MB/s, ratio <= {raw_s / floor_s:.2f} x"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(
        f"{CIPHER_SECRETSTREAM} (for comparison): "
        f"{rate[SECRETSTREAM_FP32] / rate['raw']:.2f} x the raw rate"
    )
    print(
        "secure fp32 against raw bytes through fedloom's own frame reader (context): "
        f"{rate['fp32'] / rate['raw_one_copy']:.2f} x"
    )
    print(f"transport_ratio: {rate['fp32'] / rate['raw']:.2f} x ({cipher}; target >= 0.6 x)")


if __name__ == "__main__":
    main()
