"""Fuzz campaign over every decoder of a peer's bytes and the handshake (issue 10).

Structure-aware mutation fuzzing in pure Python: each target starts from valid inputs
(every wire message type under every codec, lz4 on and off; tensor manifests and
payloads; streamed manifests and pieces, compressed or not; stream headers; relay
envelopes; signed updates and models; handshake flights; roster text; sealed records)
and mutates them at two levels:

* the msgpack tree: ints, lengths, shapes, dtypes, codecs, scales, top-k counts and
  index kinds replaced with boundary and hostile values (zero dimensions next to huge
  ones, 2**63, NaN scales, F32_MAX/127 ...), keys dropped or added, types swapped;
  signed messages are re-signed after mutation, as a rostered but hostile peer would;
* the bytes: bit flips, boundary bytes (msgpack markers), big-endian length fields,
  truncation, insertion, deletion, duplication and splicing with another seed.

Every input must either decode or raise a declared ``ProtocolError``
(``transport.errors``); anything else is an *unexpected exception*: counted, and the
first few of each kind per target are saved as reproducers (``--out``, one ``.msgpack``
input and one ``.txt`` traceback each; ``--replay FILE`` runs one again).

    .venv/bin/python bench/fuzz.py                      # 1,000,000 inputs, 2 workers
    .venv/bin/python bench/fuzz.py --inputs 20000 --workers 1 --seed 7

The last line is ``fuzz: N inputs, M unexpected exceptions (target 0)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import math
import multiprocessing
import random
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import nacl.signing  # noqa: E402
import numpy as np  # noqa: E402

from fedloom.transport import e2e, records, settings, tensors, wire, ws_frames  # noqa: E402
from fedloom.transport.channel import (  # noqa: E402
    TENSOR_FIELDS,
    ChannelClosed,
    ChannelOptions,
    SecureChannel,
    _parse_stream_header,
)
from fedloom.transport.errors import ProtocolError  # noqa: E402
from fedloom.transport.handshake import ClientHandshake, ServerHandshake, SessionKeys  # noqa: E402
from fedloom.transport.identity import Identity  # noqa: E402
from fedloom.transport.limits import Limits  # noqa: E402
from fedloom.transport.links import memory_link_pair  # noqa: E402
from fedloom.transport.records import CHUNK_SIZE  # noqa: E402
from fedloom.transport.roster import Roster, RosterEntry  # noqa: E402
from fedloom.transport.streaming import TensorStreamDecoder, TensorStreamEncoder  # noqa: E402
from fedloom.transport.tensors import CodecSpec  # noqa: E402

DEFAULT_INPUTS = 1_000_000
REPRODUCERS_PER_KIND = 3  # saved per (target, exception type, place)
LIMITS = Limits()

F32_MAX = float(np.finfo(np.float32).max)
INT_MIN, UINT_MAX = -(2**63), 2**64 - 1  # what msgpack can carry
INTERESTING_INTS = [
    0, 1, -1, 2, 3, 4, 7, 8, 16, 127, 128, 255, 256, 4095, 4096, 4097, 65535, 65536,
    2**20, 2**24, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63,
    UINT_MAX, -(2**31), INT_MIN,
]  # fmt: skip
INTERESTING_FLOATS = [
    0.0, -0.0, 1.0, -1.0, 0.5, math.nan, math.inf, -math.inf, F32_MAX, -F32_MAX,
    F32_MAX / 127, F32_MAX / 127.5, F32_MAX / 128, tensors._MAX_INT8_SCALE,
    float(np.nextafter(np.float32(tensors._SAFE_INT8_SCALE), np.float32(math.inf))),
    5e-324, 1.4e-45, 1e308, 3.4e38, 65504.0, 65520.0, 1e-30,
]  # fmt: skip
INTERESTING_STRS = [
    "", "w", "x", "payload", "raw", "fp16", "int8", "topk", "fp32", "zip", "float32",
    "float64", "float16", "int16", "int32", "int64", "uint8", "bool", "complex64",
    "object", "O", "<f4", ">f4", "u8", "u16", "u32", "u64", "bitmap", "hello", "ack",
    "update", "model_broadcast", "train_request", "gossip_share", "heartbeat", "relayed",
    "site-1", "agg", "root", "site", "region", "relay", "c1", "s1", "c2", "\x00", "é" * 7,
    "a" * 300,
]  # fmt: skip
MSGPACK_MARKERS = [
    0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5,
    0xC6, 0xC7, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD3, 0xD4, 0xD9, 0xDA, 0xDB,
    0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF,
]  # fmt: skip


# ---------------------------------------------------------------------------- mutation


def hostile_shape(rng: random.Random) -> list[int]:
    """A shape built to break size arithmetic: zeros next to huge dimensions, products
    just past the limits, too many dimensions, negative or out-of-range ints."""
    pick = rng.random()
    if pick < 0.3:
        return [0, 2**31, 2**31] if rng.random() < 0.5 else [2**31, 0, 2**31]
    if pick < 0.5:
        n = rng.randint(1, 34)
        dims = [rng.choice([0, 1, 2, 2**16, 2**31, 2**32, 2**62, UINT_MAX]) for _ in range(n)]
        dims[rng.randrange(n)] = 0
        return dims
    if pick < 0.7:
        return [rng.choice(INTERESTING_INTS) for _ in range(rng.randint(0, 6))]
    if pick < 0.85:
        return [rng.randint(0, 64) for _ in range(rng.randint(0, 4))]
    return [0] + [2] * rng.randint(28, 40)


def _value_like(rng: random.Random) -> Any:
    makers: list[Callable[[], Any]] = [
        lambda: rng.choice(INTERESTING_INTS),
        lambda: rng.choice(INTERESTING_FLOATS),
        lambda: rng.choice(INTERESTING_STRS),
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 32, 64, 65]))),
        lambda: [],
        lambda: {},
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: hostile_shape(rng),
    ]
    return rng.choice(makers)()


def mutate_bytes(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """One byte-level mutation (see the module docstring)."""
    buf = bytearray(data)
    op = rng.randrange(10)
    if not buf:
        op = 4
    if op == 0:
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        buf[rng.randrange(len(buf))] = rng.choice(MSGPACK_MARKERS)
    elif op == 2:
        width = rng.choice([1, 2, 4, 8])
        i = rng.randrange(len(buf))
        value = rng.choice(INTERESTING_INTS) % (1 << (8 * width))
        buf[i : i + width] = value.to_bytes(width, "big")
    elif op == 3:
        del buf[rng.randrange(len(buf) + 1) :]
    elif op == 4:
        i = rng.randrange(len(buf) + 1)
        buf[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 2, 4, 8, 17])))
    elif op == 5:
        i = rng.randrange(len(buf))
        del buf[i : i + rng.randint(1, 16)]
    elif op == 6:
        i = rng.randrange(len(buf))
        j = min(len(buf), i + rng.randint(1, 64))
        buf[j:j] = buf[i:j] * rng.randint(1, 4)
    elif op == 7 and others:
        other = rng.choice(others)
        buf = buf[: rng.randrange(len(buf) + 1)] + other[rng.randrange(len(other) + 1) :]
    elif op == 8:
        for _ in range(rng.randint(2, 8)):
            buf[rng.randrange(len(buf))] = rng.getrandbits(8)
    else:
        buf += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 32)))
    return bytes(buf)


def _slots(obj: Any, out: list[tuple[Any, Any]], parent: Any = None, key: Any = None) -> None:
    """Every (container, key) holding a value in ``obj``, depth first."""
    if parent is not None:
        out.append((parent, key))
    if isinstance(obj, dict):
        for k in list(obj):
            _slots(obj[k], out, obj, k)
    elif isinstance(obj, list):
        for i in range(len(obj)):
            _slots(obj[i], out, obj, i)


_SPECIAL_STRS = {
    "codec": ["raw", "fp16", "int8", "topk", "fp32", "zip", ""],
    "dtype": ["float32", "float64", "float16", "int8", "int64", "uint8", "bool", "complex64", "O"],
    "index": ["u8", "u16", "u32", "bitmap", "u64", ""],
    "type": [*wire._SCHEMAS_BY_NAME, "nope"],
}


def mutate_value(rng: random.Random, key: Any, value: Any, others: list[bytes]) -> Any:
    """A replacement for ``value`` (found under ``key``), aware of the codec's fields."""
    if key == "shape" and rng.random() < 0.7:
        return hostile_shape(rng)
    if key in _SPECIAL_STRS and rng.random() < 0.6:
        return rng.choice(_SPECIAL_STRS[key])
    if key == "scale" and rng.random() < 0.7:
        return rng.choice(INTERESTING_FLOATS)
    if key in ("k", "stored", "piece", "seq", "version", "count", "n_examples") and (
        rng.random() < 0.6
    ):
        return rng.choice(INTERESTING_INTS)
    if key == "lz4" and rng.random() < 0.5:
        return not value if isinstance(value, bool) else rng.random() < 0.5
    if rng.random() < 0.15:
        return _value_like(rng)  # a type swap
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        choice = rng.random()
        if choice < 0.5:
            return rng.choice(INTERESTING_INTS)
        return max(INT_MIN, min(UINT_MAX, value + rng.choice([-2, -1, 1, 2, 8, -8])))
    if isinstance(value, float):
        return rng.choice(INTERESTING_FLOATS)
    if isinstance(value, str):
        if rng.random() < 0.5 or not value:
            return rng.choice(INTERESTING_STRS)
        return value[: rng.randrange(len(value))] + rng.choice(INTERESTING_STRS)
    if isinstance(value, bytes):
        return mutate_bytes(rng, value, others)
    if isinstance(value, list):
        if value and rng.random() < 0.4:
            i = rng.randrange(len(value))
            return value[:i] + value[i + 1 :]
        if value and rng.random() < 0.5:
            return [*value, copy.deepcopy(rng.choice(value))]
        return [*value, _value_like(rng)]
    if isinstance(value, dict):
        new = dict(value)
        if new and rng.random() < 0.5:
            del new[rng.choice(list(new))]
        else:
            new[rng.choice(INTERESTING_STRS)] = _value_like(rng)
        return new
    return _value_like(rng)


def mutate_tree(rng: random.Random, tree: Any, others: list[bytes], rounds: int = 1) -> Any:
    """A mutated deep copy of a msgpack-ready tree (the root itself is never replaced)."""
    tree = copy.deepcopy(tree)
    for _ in range(rounds):
        slots: list[tuple[Any, Any]] = []
        _slots(tree, slots)
        if not slots:
            break
        # Favour the codec's own fields, where the size arithmetic lives.
        special = [s for s in slots if s[1] in ("shape", "scale", "k", "stored", "index")]
        parent, key = rng.choice(special) if special and rng.random() < 0.4 else rng.choice(slots)
        parent[key] = mutate_value(rng, key, parent[key], others)
    return tree


def pack(tree: Any) -> bytes:
    packed: bytes = msgpack.packb(tree, use_bin_type=True)
    return packed


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# ---------------------------------------------------------------------------- seeds


def _det_identity(node_id: str, role: str, n: int) -> Identity:
    return Identity(node_id, role, nacl.signing.SigningKey(bytes([n]) * 32))


class World:
    """Deterministic identities, roster and valid seed messages shared by the targets."""

    def __init__(self) -> None:
        self.root = _det_identity("agg", "root", 1)
        self.site = _det_identity("site-1", "site", 2)
        self.peer = _det_identity("peer-2", "site", 3)
        self.consortium = _det_identity("consortium", "root", 4)
        entries = [
            RosterEntry(i.node_id, i.role, i.public_key) for i in (self.root, self.site, self.peer)
        ]
        self.roster = Roster(1, entries)
        rng = np.random.default_rng(0)
        self.tensor_sets: list[dict[str, np.ndarray]] = [
            {},
            {"w": rng.standard_normal(40).astype(np.float32)},
            {
                "w": rng.standard_normal((5, 8)).astype(np.float32),
                "b": np.zeros(3, np.float32),
                "n": np.arange(4, dtype=np.int64),
                "m": np.array([True, False]),
                "e": np.zeros((0, 3), np.float32),
            },
            {"z": np.zeros(300, np.float32), "s": np.float32(2.5) * np.ones((), np.float32)},
        ]
        self.specs = [
            CodecSpec(kind, topk_fraction=0.25, lz4=lz4)
            for kind in ("fp32", "fp16", "int8", "topk")
            for lz4 in (False, True)
        ]

    def messages(self) -> list[wire.Message]:
        out: list[wire.Message] = [
            wire.Hello("site-1", "site", 10),
            wire.Ack("site-1", 3),
            wire.Heartbeat("peer-2", 4),
        ]
        for t in self.tensor_sets:
            out += [
                wire.ModelBroadcast(2, t, "agg", 1, b"\x01" * 64),
                wire.TrainRequest(1, 2, t, {"lr": 0.1, "epochs": 1, "name": "x", "ok": True}),
                wire.Update("site-1", 1, 2, t, 10, 1, 1, {"loss": 0.5}, b"\x02" * 64),
                wire.GossipShare("peer-2", 3, t, 0.5),
                wire.Relayed("peer-2", "site-1", 9, {"payload": np.arange(16, dtype=np.uint8)}),
            ]
        return out

    def wire_seeds(self) -> list[bytes]:
        return [wire.encode(m, spec) for m in self.messages() for spec in self.specs]


# ---------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One decoder: valid seeds, how to mutate them, how to run one input."""

    name: str
    seeds: list[Any]
    mutate: Callable[[random.Random, Any], Any]
    run: Callable[[Any], None]
    weight: int = 1
    close: Callable[[], None] = lambda: None  # after the last input


def _bytes_target(name: str, seeds: list[bytes], run: Callable[[bytes], None]) -> Target:
    trees = [unpack(s) for s in seeds]

    def mutate(rng: random.Random, i: int) -> bytes:
        pick = rng.random()
        data = seeds[i]
        if pick < 0.65:  # the msgpack tree, then (sometimes) its bytes too
            try:
                data = pack(mutate_tree(rng, trees[i], seeds, rounds=rng.choice([1, 1, 2, 3])))
            except (OverflowError, ValueError, TypeError):  # not packable: bytes instead
                pick = 1.0
        if pick >= 0.5:
            for _ in range(rng.randint(1, 4)):
                data = mutate_bytes(rng, data, seeds)
        return data

    return Target(name, seeds, mutate, run)


def wire_target(world: World) -> Target:
    return _bytes_target("wire", world.wire_seeds(), lambda d: _ignore(wire.decode(d, LIMITS)))


def _ignore(_: object) -> None:
    return None


def tensors_target(world: World) -> Target:
    seeds: list[list[Any]] = []
    payloads: list[bytes] = []
    for t in world.tensor_sets:
        for spec in world.specs:
            manifest, payload = tensors.encode_tensors(t, spec)
            seeds.append([manifest, payload])
            payloads.append(payload)

    def mutate(rng: random.Random, i: int) -> Any:
        return mutate_tree(rng, seeds[i], payloads, rounds=rng.choice([1, 1, 2, 3]))

    def run(item: Any) -> None:
        tensors.decode_tensors(item[0], item[1], LIMITS)

    return Target("tensors", seeds, mutate, run, weight=2)


def stream_target(world: World) -> Target:
    rng = np.random.default_rng(1)
    sets: list[dict[str, np.ndarray]] = [
        *world.tensor_sets,
        {
            "a": rng.standard_normal(2500).astype(np.float32),  # several 4 KiB pieces
            "b": np.zeros(1500, np.float32),  # compressible pieces
            "i": np.arange(700, dtype=np.int16),
        },
    ]
    seeds: list[list[Any]] = []
    blobs: list[bytes] = []
    for t in sets:
        for spec in world.specs:
            encoder = TensorStreamEncoder(t, spec, piece=4096)
            pieces = []
            while not encoder.done:
                pieces.append(bytes(encoder.next_piece()))
            seeds.append([encoder.manifest, pieces, False])
            seeds.append([encoder.manifest, pieces, True])  # decrypted in place
            blobs += pieces

    def mutate(rng: random.Random, i: int) -> Any:
        return mutate_tree(rng, seeds[i], blobs, rounds=rng.choice([1, 1, 2, 3]))

    def run(item: Any) -> None:
        manifest, pieces, direct = item if isinstance(item, list) and len(item) == 3 else (0, [], 0)
        decoder = TensorStreamDecoder(manifest, LIMITS)
        for piece in pieces if isinstance(pieces, list) else []:
            if not isinstance(piece, bytes):
                continue  # the channel hands the decoder bytes only
            target = decoder.direct_target() if direct is True else None
            if target is not None and len(target) == len(piece):
                target[:] = piece  # what the record layer does before feed_direct
                decoder.feed_direct()
            else:
                decoder.feed_piece(piece)
        decoder.finish()

    return Target("stream", seeds, mutate, run, weight=2)


def stream_header_target(world: World) -> Target:
    seeds = []
    for t in world.tensor_sets[1:]:
        for spec in world.specs[::2]:
            encoder = TensorStreamEncoder(t, spec, piece=4096)
            for msg in (
                wire.Update("site-1", 1, 2, {}, 10),
                wire.TrainRequest(1, 2, {}),
                wire.ModelBroadcast(1, {}),
                wire.GossipShare("peer-2", 1, {}),
            ):
                header = {"envelope": wire.encode(msg), "stream": encoder.manifest}
                seeds.append(pack(header))
    return _bytes_target("stream_header", seeds, lambda d: _ignore(_parse_stream_header(d, LIMITS)))


def e2e_target(world: World) -> Target:
    """Signed updates and models, checked as a receiver does (decode, digest, verify,
    replay and version guards); mutated trees are re-signed by the sender's real key."""
    seeds: list[bytes] = []
    for t in world.tensor_sets:
        for spec in world.specs[::2]:
            seeds.append(wire.encode(_sign(world, wire.Update("site-1", 1, 2, t, 10)), spec))
            seeds.append(wire.encode(_sign(world, wire.ModelBroadcast(2, t, parent=1)), spec))
            seeds.append(wire.encode(_sign(world, wire.TrainRequest(1, 2, t)), spec))
    plain = _bytes_target("e2e", seeds, lambda d: None)

    def mutate(rng: random.Random, i: int) -> bytes:
        data: bytes = plain.mutate(rng, i)
        if rng.random() < 0.5:  # a hostile but rostered sender signs what it sends
            try:
                msg = wire.decode(data, LIMITS)
            except ProtocolError:
                return data
            resigned = _sign(world, msg)
            if resigned is not msg:
                tree = unpack(data)
                tree["sig"] = resigned.sig  # type: ignore[union-attr]
                if "settings" in tree:
                    tree["settings"] = resigned.settings  # type: ignore[union-attr]
                data = pack(tree)
        return data

    def run(data: bytes) -> None:
        msg = wire.decode(data, LIMITS)
        if isinstance(msg, wire.Update):
            digest = e2e.update_digest(msg.delta)
            e2e.verify_update(
                world.roster, msg.sig, msg.src, msg.seq, msg.base_version, "agg",
                msg.n_examples, digest,
            )  # fmt: skip
            e2e.ReplayGuard().check(msg.src, msg.seq)
        elif isinstance(msg, wire.ModelBroadcast | wire.TrainRequest):
            digest = e2e.tensors_digest(msg.weights)
            try:
                signed = msg.settings or settings.settings_digest(msg.config)
            except (TypeError, ValueError):  # a config no root could have signed
                return
            e2e.verify_model(
                world.roster, msg.signer, msg.sig, msg.version, msg.parent, digest, signed
            )
            e2e.ModelVersionGuard().check(msg.version, digest)

    return Target("e2e", seeds, mutate, run, weight=2)


def _sign(world: World, msg: wire.Message) -> wire.Message:
    try:
        if isinstance(msg, wire.Update):
            digest = e2e.update_digest(msg.delta)
            sig = e2e.sign_update(
                world.site, "site-1", msg.seq, msg.base_version, "agg", msg.n_examples, digest
            )
            return dataclasses.replace(msg, src="site-1", sig=sig)
        if isinstance(msg, wire.ModelBroadcast | wire.TrainRequest):
            digest = e2e.tensors_digest(msg.weights)
            signed = settings.settings_digest(msg.config)
            sig = e2e.sign_model(world.root, msg.version, msg.parent, digest, signed)
            return dataclasses.replace(msg, signer="agg", sig=sig, settings=signed)
    except ValueError:  # fields a signer refuses to sign (negative ints)
        pass
    return msg


def relay_target(world: World) -> Target | str:
    """Relayed envelopes from ``peer-2``, opened by ``site-1`` (``transport.relay``). Half
    the inputs mutate a sealed envelope; the other half are sealed properly by the
    sender's real keys around a mutated inner message (a rostered but hostile peer)."""
    try:
        from fedloom.transport import relay

        sender = _first(relay.RelaySender, (world.peer, world.roster), (world.peer,))
        _first(relay.RelayInbox, (world.site, world.roster), ("site-1", world.roster))
    except Exception as exc:  # an API this harness does not know: report, do not crash
        return f"relay API not usable here ({type(exc).__name__}: {exc})"
    inner: list[wire.Message] = [wire.GossipShare("peer-2", 3, t, 0.5) for t in world.tensor_sets]
    inner.append(wire.Heartbeat("peer-2", 5))
    seeds = [
        wire.encode(sender.seal("site-1", m, spec), CodecSpec("fp32", lz4=False))
        for m in inner
        for spec in world.specs[::2]
    ]
    plain = _bytes_target("relay", seeds, lambda d: None)
    inner_seeds = [wire.encode(m, spec) for m in inner for spec in world.specs]
    inner_mut = _bytes_target("relay-inner", inner_seeds, lambda d: None)
    placeholder = wire.Heartbeat("peer-2", 0)

    def mutate(rng: random.Random, i: int) -> bytes:
        if rng.random() < 0.5:
            data: bytes = plain.mutate(rng, i)
            return data
        body = inner_mut.mutate(rng, rng.randrange(len(inner_seeds)))
        # The sender's own encoding of its message is replaced by the hostile bytes;
        # everything else (numbering, encryption, signature) is the real sender's.
        real = wire.encode
        wire.encode = lambda msg, spec=tensors.DEFAULT_SPEC: body
        try:
            envelope = sender.seal("site-1", placeholder)
        finally:
            wire.encode = real
        return wire.encode(envelope, CodecSpec("fp32", lz4=False))

    def run(data: bytes) -> None:
        msg = wire.decode(data, LIMITS)
        if isinstance(msg, wire.Relayed):
            inbox = _first(relay.RelayInbox, (world.site, world.roster), ("site-1", world.roster))
            inbox.open(msg)

    return Target("relay", seeds, mutate, run)


def _first(cls: Any, *signatures: tuple[Any, ...]) -> Any:
    """``cls(*args)`` for the first argument list its constructor takes."""
    for args in signatures[:-1]:
        try:
            return cls(*args)
        except (TypeError, AttributeError):
            continue
    return cls(*signatures[-1])


def handshake_target(world: World) -> Target:
    """Each flight as received: c1 by a server, s1 by a client that sent its c1, c2 by a
    server that answered a c1 (fresh ephemeral keys each time, so a mutated flight that
    survives parsing still meets the signature checks)."""
    client = ClientHandshake(world.site, world.roster, "agg")
    server = ServerHandshake(world.root, world.roster)
    c1 = client.start()
    s1 = server.receive(c1)
    assert s1 is not None
    c2 = client.receive(s1)
    assert c2 is not None
    flights = {"c1": c1, "s1": s1, "c2": c2}
    seeds: list[tuple[str, bytes]] = list(flights.items())
    trees = {name: unpack(data) for name, data in flights.items()}
    others = list(flights.values())

    def mutate(rng: random.Random, i: int) -> Any:
        name = seeds[i][0]
        if rng.random() < 0.5:
            try:
                data = pack(mutate_tree(rng, trees[name], others, rounds=rng.choice([1, 2])))
            except (OverflowError, ValueError, TypeError):
                data = flights[name]
            if rng.random() < 0.5:
                data = mutate_bytes(rng, data, others)
        else:
            data = flights[name]
            for _ in range(rng.randint(1, 3)):
                data = mutate_bytes(rng, data, others)
        return [name, data]

    def run(item: Any) -> None:
        name, data = item
        if name == "c1":
            ServerHandshake(world.root, world.roster).receive(data)
        elif name == "s1":
            c = ClientHandshake(world.site, world.roster, "agg")
            c.start()
            c.receive(data)
        else:
            s = ServerHandshake(world.root, world.roster)
            s.receive(c1_for_c2)
            s.receive(data)

    c1_for_c2 = c1
    return Target("handshake", seeds, mutate, run)


_TOML_VALUES = [
    "0", "-1", "1", "9223372036854775807", "-9223372036854775808", "1e999", "nan", "inf",
    "true", '""', '"x"', "[]", "[1, 2]", '["a", 3]', "{}", '{a = 1}', "1979-05-27",
    '"' + "A" * 43 + '="', '"' + "A" * 44 + '"', '"' + "a" * 200 + '"', '"\\u0000"',
    '"ws://h:1/p"', '"wss://[::1]:99999/x"', '"http://x"', "'''x'''", '"site"', '"root"',
    "[" * 700 + "]" * 700, "{a = " * 400 + "1" + "}" * 400,
]  # fmt: skip


def roster_target(world: World) -> Target:
    entries = [
        RosterEntry(
            i.node_id,
            i.role,
            i.public_key,
            (f"wss://{i.node_id}.example:8443/fl",),
            examples=225 if i.role == "site" else None,  # the optional field too
        )
        for i in (world.root, world.site, world.peer)
    ]
    unsigned = Roster(3, entries).to_toml()
    signed = Roster.sign(unsigned, world.consortium)
    seeds = [signed.encode(), unsigned.encode()]
    consortium_key = world.consortium.public_key

    def mutate(rng: random.Random, i: int) -> bytes:
        text = seeds[i].decode()
        lines = text.split("\n")
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            j = rng.randrange(len(lines))
            if op < 0.45 and "=" in lines[j]:
                k, _, _ = lines[j].partition("=")
                lines[j] = f"{k}= {rng.choice(_TOML_VALUES)}"
            elif op < 0.6:
                lines.insert(j, rng.choice(lines))
            elif op < 0.7:
                del lines[j]
            elif op < 0.8:
                lines.insert(
                    j, rng.choice(["[[nodes]]", "[signature]", "[x]", "x = 1", "[", "examples = 3"])
                )
            else:
                data = mutate_bytes(rng, "\n".join(lines).encode(), seeds)
                return data
        return "\n".join(lines).encode()

    def run(data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return  # refused by read_small_text (a RosterError) before any parsing
        try:
            Roster.loads(text, consortium_key)
        finally:
            Roster.loads_unsigned(text)

    return Target("roster", seeds, mutate, run)


def records_target(world: World) -> Target:
    key = bytes(range(32))
    seeds: list[list[Any]] = []
    blobs: list[bytes] = []
    for cipher in records.available_ciphers():
        sender = records.RecordSender(key, cipher=cipher)
        header = sender.header()
        recs = [
            bytes(sender.seal(b"\x01" + b"m" * 50, last=False, now=0.0)),
            bytes(sender.seal(b"tail", last=True, now=0.0)),
            bytes(sender.close()),
        ]
        seeds.append([records.available_ciphers().index(cipher), header, recs])
        blobs += [header, *recs]

    def mutate(rng: random.Random, i: int) -> Any:
        item = mutate_tree(rng, seeds[i], blobs, rounds=rng.choice([1, 2]))
        item[0] = seeds[i][0]  # the cipher is negotiated, not sent
        return item

    def run(item: Any) -> None:
        cipher_index, header, recs = item
        receiver = records.RecordReceiver(key, cipher=records.available_ciphers()[cipher_index])
        if not isinstance(header, bytes) or not isinstance(recs, list):
            return  # the link delivers bytes only
        receiver.start(header)
        for record in recs:
            if isinstance(record, bytes):
                receiver.open(record)

    return Target("records", seeds, mutate, run)


def channel_target(world: World) -> Target:
    """A ``SecureChannel``'s receiving side (message assembly: kind bytes, multi-record
    messages, stream headers, streamed pieces written straight into tensors) fed records
    that a peer holding the session key sealed around mutated plaintext, as after a
    completed handshake."""
    key_out, key_in = bytes(range(32)), bytes(range(32, 64))
    keys = SessionKeys(key_out, key_in, "agg", "root", bytes(32), records.available_ciphers()[0])
    options = ChannelOptions()
    rng = np.random.default_rng(2)
    messages: list[wire.Message] = [
        wire.Ack("agg", 1),
        wire.TrainRequest(1, 2, {"w": rng.standard_normal(40).astype(np.float32)}),
        wire.ModelBroadcast(2, {"w": rng.standard_normal(3000).astype(np.float32)}),
        wire.Update("agg", 1, 2, {"a": np.zeros(2000, np.float32), "n": np.arange(9)}, 3),
    ]
    seeds: list[list[Any]] = []  # [cipher index, [[chunk, ...] per message]]
    blobs: list[bytes] = []
    for cipher_index in range(len(records.available_ciphers())):
        for msg in messages:
            for spec in world.specs:
                plain = _channel_plaintext(msg, spec)
                seeds.append([cipher_index, plain])
                blobs += [c for m in plain for c in m]
    loop = asyncio.new_event_loop()

    def mutate(rng: random.Random, i: int) -> Any:
        cipher_index, plain = seeds[i]
        if len(plain) == 2 and rng.random() < 0.5:  # a stream: mutate its manifest's tree
            header = unpack(plain[0][0][1:])
            header["stream"] = mutate_tree(rng, header["stream"], blobs, rng.choice([1, 2]))
            with contextlib.suppress(OverflowError, ValueError, TypeError):  # else unchanged
                plain = [[b"\x02" + pack(header)], plain[1]]
            return [cipher_index, plain]
        item = mutate_tree(rng, [cipher_index, plain], blobs, rounds=rng.choice([1, 2, 3]))
        item[0] = cipher_index  # negotiated, not sent
        return item

    def run(item: Any) -> None:
        loop.run_until_complete(_run_channel(item, keys, options, key_in))

    return Target("channel", seeds, mutate, run, weight=2, close=loop.close)


def _channel_plaintext(msg: wire.Message, spec: CodecSpec) -> list[list[bytes]]:
    """The record plaintexts ``SecureChannel.send_tensors`` produces for ``msg``: one list
    of chunks per message (a streamed one is its header message, then its pieces)."""
    field = TENSOR_FIELDS.get(type(msg))
    if field is None or not getattr(msg, field):
        return [_chunks(b"\x01" + wire.encode(msg, spec))]
    encoder = TensorStreamEncoder(getattr(msg, field), spec, piece=4096)
    envelope = wire.encode(_with(msg, {}), spec)
    header = pack({"envelope": envelope, "stream": encoder.manifest})
    pieces = []
    while not encoder.done:
        pieces.append(bytes(encoder.next_piece()))
    return [_chunks(b"\x02" + header), pieces]


def _chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_SIZE] for i in range(0, max(1, len(data)), CHUNK_SIZE)]


async def _run_channel(item: Any, keys: SessionKeys, options: ChannelOptions, key: bytes) -> None:
    cipher_index, plain = item
    keys = dataclasses.replace(keys, cipher=records.available_ciphers()[cipher_index])
    ours, theirs = memory_link_pair(max_queue=100_000)
    channel = SecureChannel(ours, keys, options)
    sender = records.RecordSender(key, cipher=keys.cipher)
    await theirs.send(sender.header())
    for message in plain if isinstance(plain, list) else []:
        chunks = [c for c in message if isinstance(c, bytes)] if isinstance(message, list) else []
        for n, chunk in enumerate(chunks):
            await theirs.send(sender.seal(chunk, last=n == len(chunks) - 1, now=0.0))
    await theirs.send(sender.close())
    try:
        while True:
            await channel.recv_tensors()
    except ChannelClosed:
        pass  # the peer's FINAL record: the end of its messages
    finally:
        await theirs.close()
        await channel.close()


def ws_frames_target(world: World) -> Target:
    """The WebSocket frame parser of server links, fed a client's masked frames (whole
    messages, fragments, pings, closes, large lengths) mutated and cut at random points.
    It never raises: a violation sets ``error`` (the close code), anything raised is
    unexpected."""
    key = b"\x01\x02\x03\x04"

    def frame(first: int, payload: bytes) -> bytes:
        return ws_frames.masked_frame(first, np.frombuffer(payload, np.uint8), key).tobytes()

    wire_bytes = world.wire_seeds()[:40:3]
    seeds = [
        frame(0x82, wire_bytes[1]) + frame(0x89, b"ping") + frame(0x82, wire_bytes[2]),
        frame(0x02, b"x" * 200) + frame(0x00, b"") + frame(0x80, b"y" * 70_000),
        frame(0x88, b"\x03\xe8bye"),
        frame(0x81, "é".encode() * 10) + frame(0x8A, b""),
        frame(0x82, bytes(130)) + frame(0x82, bytes(66_000)),
        *(frame(0x82, b) for b in wire_bytes),
    ]

    def mutate(rng: random.Random, i: int) -> list[bytes]:
        data = seeds[i]
        for _ in range(rng.randint(1, 4)):
            data = mutate_bytes(rng, data, seeds)
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.choice([0, 1, 3, 8])))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]

    def run(chunks: list[bytes]) -> None:
        parser = ws_frames.FrameParser(1 << 20)
        for chunk in chunks:
            parser.feed(chunk)
        if parser.error is not None:  # the declared outcome: the link closes with a code
            raise FramingRefusedError(f"{parser.error.code}: {parser.error.reason}")

    return Target("ws_frames", seeds, mutate, run)


class FramingRefusedError(ProtocolError):
    """A frame parser's verdict, counted as a declared refusal."""

    reason: ClassVar[str] = "framing"


def hostile_shapes_target(world: World) -> Target:
    """Generated rather than mutated: every tensor message and codec with a tensor whose
    shape is ``hostile_shape``, the payload sized to match what the other fields say."""
    seeds = [
        m
        for m in world.messages()
        if isinstance(m, wire.ModelBroadcast | wire.TrainRequest | wire.Update | wire.GossipShare)
    ]
    empty = {"e": np.zeros(0, np.float32)}
    trees = []
    for m in seeds:
        for spec in world.specs:
            tree = unpack(wire.encode(_with(m, empty), spec))
            trees.append(tree)

    def mutate(rng: random.Random, i: int) -> bytes:
        tree = copy.deepcopy(trees[i])
        tensor_field = next(v for v in tree.values() if isinstance(v, dict) and "m" in v)
        entry = tensor_field["m"]["tensors"][0]
        entry["shape"] = hostile_shape(rng)
        if entry["codec"] == "topk":
            entry["k"] = rng.choice([0, 0, 1, 2**31])
        if rng.random() < 0.3:
            tensor_field["p"] = bytes(rng.choice([0, 1, 4, 8, 64]))
        return pack(tree)

    return Target(
        "hostile_shapes",
        trees,
        mutate,
        lambda d: _ignore(wire.decode(d, LIMITS)),
    )


def _with(msg: wire.Message, t: dict[str, np.ndarray]) -> wire.Message:
    for name in ("weights", "delta", "x"):
        if hasattr(msg, name):
            return dataclasses.replace(msg, **{name: t})  # type: ignore[arg-type]
    return msg


TARGET_FACTORIES: list[Callable[[World], Target | str]] = [
    wire_target,
    tensors_target,
    stream_target,
    stream_header_target,
    e2e_target,
    relay_target,
    handshake_target,
    roster_target,
    records_target,
    channel_target,
    ws_frames_target,
    hostile_shapes_target,
]


# ---------------------------------------------------------------------------- campaign


@dataclass
class TargetStats:
    inputs: int = 0
    accepted: int = 0  # decoded without error
    rejected: int = 0  # a declared ProtocolError
    unexpected: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)


@dataclass
class Finding:
    target: str
    kind: str  # exception type and where it was raised
    text: str  # the traceback
    item: Any


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    last = tb[-1] if tb else None
    place = f"{Path(last.filename).name}:{last.lineno}" if last else "?"
    return f"{type(exc).__name__} at {place}"


def build_targets() -> tuple[list[Target], list[str]]:
    world = World()
    targets, skipped = [], []
    for make in TARGET_FACTORIES:
        made = make(world)
        if isinstance(made, str):
            skipped.append(f"{make.__name__}: {made}")
        else:
            targets.append(made)
    return targets, skipped


def run_worker(args: tuple[int, int, int]) -> tuple[dict[str, TargetStats], list[Finding]]:
    """Run ``count`` inputs with ``seed``; ``worker`` only varies the random stream."""
    count, seed, worker = args
    rng = random.Random(seed * 1_000_003 + worker)
    targets, _ = build_targets()
    schedule = [t for t in targets for _ in range(t.weight)]
    stats = {t.name: TargetStats() for t in targets}
    findings: list[Finding] = []
    saved: Counter[tuple[str, str]] = Counter()
    np.seterr(all="ignore")  # a RuntimeWarning is not an exception (nor made one here)
    for i in range(count):
        target = schedule[i % len(schedule)]
        item = target.mutate(rng, rng.randrange(len(target.seeds)))
        st = stats[target.name]
        st.inputs += 1
        start = time.perf_counter()
        try:
            target.run(item)
        except ProtocolError as exc:
            st.rejected += 1
            st.kinds[exc.reason] += 1
        except Exception as exc:  # the point of the campaign
            st.unexpected += 1
            kind = _where(exc)
            if saved[(target.name, kind)] < REPRODUCERS_PER_KIND:
                saved[(target.name, kind)] += 1
                text = "".join(traceback.format_exception(exc))
                findings.append(Finding(target.name, kind, text, item))
        else:
            st.accepted += 1
        elapsed = time.perf_counter() - start
        st.seconds += elapsed
        st.slowest = max(st.slowest, elapsed)
    for target in targets:
        target.close()
    return stats, findings


@dataclass
class Summary:
    inputs: int
    unexpected: int
    stats: dict[str, TargetStats]
    findings: list[Finding]
    skipped: list[str]
    seconds: float


def run_campaign(inputs: int, seed: int = 0, workers: int = 2) -> Summary:
    """Fuzz ``inputs`` inputs over every target, split over ``workers`` processes."""
    start = time.perf_counter()
    probe, skipped = build_targets()  # the workers build their own
    for target in probe:
        target.close()
    shares = [inputs // workers + (1 if w < inputs % workers else 0) for w in range(workers)]
    jobs = [(n, seed, w) for w, n in enumerate(shares) if n]
    if workers == 1:
        results = [run_worker(job) for job in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(run_worker, jobs)
    stats: dict[str, TargetStats] = {}
    findings: list[Finding] = []
    for part, found in results:
        findings += found
        for name, st in part.items():
            total = stats.setdefault(name, TargetStats())
            total.inputs += st.inputs
            total.accepted += st.accepted
            total.rejected += st.rejected
            total.unexpected += st.unexpected
            total.seconds += st.seconds
            total.slowest = max(total.slowest, st.slowest)
            total.kinds.update(st.kinds)
    return Summary(
        inputs=sum(s.inputs for s in stats.values()),
        unexpected=sum(s.unexpected for s in stats.values()),
        stats=stats,
        findings=findings,
        skipped=skipped,
        seconds=time.perf_counter() - start,
    )


def save_findings(findings: list[Finding], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, f in enumerate(findings):
        stem = out / f"{f.target}-{n:03d}"
        stem.with_suffix(".msgpack").write_bytes(pack({"target": f.target, "input": f.item}))
        stem.with_suffix(".txt").write_text(f"{f.target}: {f.kind}\n\n{f.text}")
        paths.append(stem.with_suffix(".msgpack"))
    return paths


def replay(path: Path) -> int:
    """Run one saved reproducer again; print what it raises."""
    saved = unpack(path.read_bytes())
    targets, _ = build_targets()
    target = next(t for t in targets if t.name == saved["target"])
    try:
        target.run(saved["input"])
    except ProtocolError as exc:
        print(f"{path.name}: refused as declared ({exc.reason}): {exc}")
        return 0
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        for t in targets:
            t.close()
    print(f"{path.name}: decoded without error")
    return 0


def print_summary(summary: Summary, out: Path | None) -> None:
    header = f"{'target':<16}{'inputs':>10}{'accepted':>10}{'refused':>10}{'unexpected':>11}"
    print(header + f"{'us/input':>10}{'slowest ms':>12}  top refusal reasons")
    for name, st in summary.stats.items():
        per = 1e6 * st.seconds / st.inputs if st.inputs else 0.0
        reasons = ", ".join(f"{k} {v}" for k, v in st.kinds.most_common(3))
        print(
            f"{name:<16}{st.inputs:>10,}{st.accepted:>10,}{st.rejected:>10,}"
            f"{st.unexpected:>11,}{per:>10.0f}{1e3 * st.slowest:>12.1f}  {reasons}"
        )
    for line in summary.skipped:
        print(f"skipped {line}")
    if summary.findings:
        kinds = Counter((f.target, f.kind) for f in summary.findings)
        for (target, kind), n in kinds.most_common():
            print(f"unexpected in {target}: {kind} ({n} saved)")
        if out is not None:
            paths = save_findings(summary.findings, out)
            print(f"{len(paths)} reproducers in {out} (replay one with --replay FILE)")
    print(f"{summary.seconds:.1f} s wall")
    print(f"fuzz: {summary.inputs} inputs, {summary.unexpected} unexpected exceptions (target 0)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=DEFAULT_INPUTS, help="inputs in all")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "runs" / "fuzz",
        help="where reproducers of unexpected exceptions go (default runs/fuzz)",
    )
    parser.add_argument("--replay", type=Path, help="run one saved reproducer and exit")
    args = parser.parse_args(argv)
    if args.replay is not None:
        return replay(args.replay)
    if args.inputs < 1 or args.workers < 1:
        parser.error("--inputs and --workers must be >= 1")
    summary = run_campaign(args.inputs, args.seed, min(args.workers, args.inputs))
    print_summary(summary, args.out)
    return 1 if summary.unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
