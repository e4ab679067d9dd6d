"""Limits tied to the model (issue 10, item 6): what a model's honest messages need fits,
and the decode bombs found by the review are refused before anything is allocated."""

from __future__ import annotations

import tracemalloc
from typing import Any

import lz4.frame
import msgpack
import numpy as np
import pytest

from fedloom.transport import tensors as tensors_mod
from fedloom.transport import wire
from fedloom.transport.errors import DecompressionBomb
from fedloom.transport.limits import (
    DECODED_FACTOR,
    DEFAULT_MODEL_SLACK,
    MODEL_FACTOR,
    Limits,
    MiB,
    ModelLayout,
)
from fedloom.transport.tensors import CodecSpec
from tests.transport.link_pairs import Pki, channel_pair, link_pair, make_pki

# A model with a large tensor (streamed by channels), small and one-element ones, a
# 4-d one and a non-float one.
MODEL: dict[str, np.ndarray] = {
    "conv.weight": np.zeros((16, 3, 5, 5), np.float32),
    "fc.weight": np.zeros((600, 500), np.float32),
    "fc.bias": np.zeros(500, np.float32),
    "scale": np.zeros(1, np.float64),
    "steps": np.zeros(3, np.int64),
}
LAYOUT = ModelLayout.of(MODEL)
LIMITS = Limits.for_model(LAYOUT)
SPECS = [
    CodecSpec("fp32"),
    CodecSpec("fp32", lz4=False),
    CodecSpec("fp16"),
    CodecSpec("int8"),
    CodecSpec("topk", 0.01),
    CodecSpec("topk", 0.3),
    CodecSpec("topk", 1.0),
    CodecSpec("topk", 1.0, lz4=False),
]


def honest(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in MODEL.items()}
    out["steps"] = np.arange(3, dtype=np.int64)
    return out


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


# ------------------------------------------------------------------ the limits


def test_limits_follow_the_model() -> None:
    decoded = 4 * (16 * 3 * 5 * 5 + 600 * 500 + 500 + 1) + 8 * 3  # floats decode as fp32
    assert LAYOUT.decoded_bytes == decoded
    slack = DEFAULT_MODEL_SLACK + 1024
    assert decoded < LIMITS.max_message_bytes <= MODEL_FACTOR * decoded + slack
    # Decoding an fp16 message holds the float32 and the float16 it came from.
    assert DECODED_FACTOR * decoded < LIMITS.max_decoded_bytes <= DECODED_FACTOR * decoded + slack
    assert LIMITS.max_tensors == 5 and LIMITS.max_ndim == 4
    assert LIMITS.max_decoded_bytes < Limits().max_decoded_bytes // 500  # was 2 GiB
    # Caps derived from the layout or from the weights are the same; other fields
    # come from the base.
    base = Limits(reject_nonfinite=False, max_str_len=1000)
    derived = Limits.for_model(MODEL, base=base)
    assert derived.max_decoded_bytes == LIMITS.max_decoded_bytes
    assert (derived.reject_nonfinite, derived.max_str_len) == (False, 1000)
    assert Limits.for_model({}).max_tensors == 1  # a relayed envelope still fits
    with pytest.raises(ValueError, match="slack"):
        Limits.for_model(MODEL, slack=-1)


def test_layout_mismatch_reasons() -> None:
    good = honest()
    assert LAYOUT.mismatch(good) is None
    assert (
        LAYOUT.mismatch(
            {k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in good.items()}
        )
        is None
    )
    assert LAYOUT.mismatch([1, 2]) == "not_a_mapping"
    assert LAYOUT.mismatch({k: v for k, v in good.items() if k != "scale"}) == "names"
    assert LAYOUT.mismatch({**good, "extra": np.zeros(1, np.float32)}) == "names"
    renamed = {("x" if k == "scale" else k): v for k, v in good.items()}
    assert LAYOUT.mismatch(renamed) == "names"
    assert LAYOUT.mismatch({**good, "fc.bias": np.zeros(501, np.float32)}) == "shape"
    assert LAYOUT.mismatch({**good, "fc.bias": np.zeros((500, 1), np.float32)}) == "shape"
    assert LAYOUT.mismatch({**good, "fc.bias": np.zeros(500, np.int32)}) == "dtype"
    assert LAYOUT.mismatch({**good, "steps": np.zeros(3, np.float32)}) == "dtype"
    assert LAYOUT.mismatch({**good, "fc.bias": [0.0] * 500}) == "not_array"
    with pytest.raises(ValueError, match="twice"):
        ModelLayout((("a", (1,), np.dtype("<f4")), ("a", (2,), np.dtype("<f4"))))


@pytest.mark.parametrize("spec", SPECS, ids=repr)
async def test_every_honest_message_of_the_model_fits_its_limits(spec: CodecSpec, pki: Pki) -> None:
    """Updates, models and gossip shares of the model, streamed or whole, and a relayed
    envelope carrying a share, all decode under ``Limits.for_model``."""
    w = honest()
    share = wire.GossipShare("p-1", 3, w, 0.5)
    payload = np.frombuffer(wire.encode(share, spec), np.uint8)
    messages: list[wire.Message] = [
        wire.Update("site-1", 1, 0, w, 10, metrics={"loss": 0.5}, sig=b"s" * 64),
        wire.TrainRequest(1, 2, w, config={"lr": 0.1}, signer="root", sig=b"s" * 64),
        wire.ModelBroadcast(2, w, signer="root", parent=1, sig=b"s" * 64),
        share,
        wire.Relayed("p-1", "p-2", 1, {"payload": payload}, b"s" * 64),
        wire.Hello("site-1", "site", 10),
    ]
    async with link_pair("memory") as (a, b):
        client, server = await channel_pair(a, b, pki)
        try:
            for msg in messages:
                await client.send_tensors(msg, spec)
                got = await server.recv_tensors(LIMITS)
                assert type(got) is type(msg)
        finally:
            await client.close()
            await server.close()


# ------------------------------------------------------------------ the attacks


def update_bytes(delta: dict[str, Any], src: str = "site-1") -> bytes:
    """An ``Update`` envelope around a hand-made tensor field (a hostile site's bytes)."""
    data: bytes = msgpack.packb(
        {
            "v": 1,
            "type": "update",
            "src": src,
            "seq": 1,
            "base_version": 0,
            "delta": delta,
            "n_examples": 10,
            "count": 1,
            "task": -1,
            "metrics": {},
            "sig": b"s" * 64,
            "pairs": [],
        },
        use_bin_type=True,
    )
    return data


def lz4_int8_bomb(elements: int = 16 * MiB) -> bytes:
    """An int8 tensor of zeros whose lz4 frame is ~250 times smaller than it (and 1000
    times smaller than its float32 decoding)."""
    compressor = lz4.frame.LZ4FrameCompressor()
    chunk = bytes(MiB)
    frame = [compressor.begin()]
    frame += [compressor.compress(chunk) for _ in range(elements // MiB)]
    frame.append(compressor.flush())
    entry = {"name": "fc.weight", "codec": "int8", "shape": [elements], "scale": 1.0}
    return update_bytes({"m": {"lz4": True, "tensors": [entry]}, "p": b"".join(frame)})


def topk_bomb() -> bytes:
    """k = 0 with a one-byte index: no stored bytes at all, a 2 GiB dense delta."""
    entry = {"name": "fc.weight", "codec": "topk", "shape": [1 << 29], "k": 0, "index": "u8"}
    return update_bytes({"m": {"lz4": False, "tensors": [entry]}, "p": b""})


def test_the_topk_bomb_is_a_few_hundred_bytes() -> None:
    assert len(topk_bomb()) < 256
    assert len(lz4_int8_bomb()) < MiB // 8


class ReachedError(Exception):
    """Raised by a spy: the decoder got as far as the expensive step."""


@pytest.mark.parametrize(
    ("bomb", "step"),
    [(lz4_int8_bomb, "_lz4_decompress"), (topk_bomb, "_decode_topk")],
    ids=["lz4_int8", "topk_k0"],
)
def test_decode_bombs_are_refused_before_any_allocation(
    bomb: Any, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bomb()

    def spy(*args: Any) -> Any:
        raise ReachedError(step)

    monkeypatch.setattr(tensors_mod, step, spy)
    # Under the global defaults (what child links used) the bomb gets to decompress or
    # to allocate its dense array ...
    with pytest.raises(ReachedError):
        wire.decode(data, Limits())
    # ... under the model's limits it is refused from its manifest alone.
    tracemalloc.start()
    try:
        with pytest.raises(DecompressionBomb, match="max_decoded_bytes"):
            wire.decode(data, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(data) + 256 * 1024
