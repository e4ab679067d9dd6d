"""Wire envelope: round trips of every message and strict rejection of hostile bytes."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.transport import wire
from fedloom.transport.errors import (
    CodecError,
    FrameTooLarge,
    MalformedMessage,
    NonFiniteTensor,
    ProtocolError,
)
from fedloom.transport.limits import MiB
from fedloom.transport.tensors import CodecKind, CodecSpec
from fedloom.transport.wire import (
    MESSAGE_TYPES,
    SECAGG_MESSAGE_TYPES,
    Ack,
    EvalReport,
    GossipShare,
    Heartbeat,
    Hello,
    Incorporated,
    Limits,
    Message,
    ModelBroadcast,
    Overlap,
    Relayed,
    RosterUpdate,
    StatsReport,
    StatsRequest,
    TrainRefused,
    TrainRequest,
    Update,
    decode,
    encode,
    message_type_name,
)

KINDS: tuple[CodecKind, ...] = ("fp32", "fp16", "int8", "topk")
SIG = bytes(range(64))  # a signature's size (the wire does not check signatures)


def model(seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((60, 10)).astype(np.float32),
        "b": rng.standard_normal(10).astype(np.float32),
    }


def all_messages() -> list[Message]:
    return [
        Hello(src="site-1", role="site", n_examples=120),
        ModelBroadcast(version=7, weights=model(1)),
        TrainRequest(
            task=3,
            version=7,
            weights=model(2),
            config={"lr": 0.05, "local_steps": 5, "prox": True, "opt": "sgd", "mu": 0},
        ),
        Update(
            src="site-1",
            seq=4,
            base_version=6,
            delta=model(3),
            n_examples=120,
            count=2,
            task=3,
            metrics={"loss": 0.25, "accuracy": 0.9},
        ),
        Update(src="s", seq=1, base_version=0, delta={}, n_examples=0),
        Update(src="s", seq=2, base_version=1, delta=model(5), n_examples=3, sig=SIG),
        ModelBroadcast(version=8, weights=model(6), signer="root", parent=7, sig=SIG),
        TrainRequest(task=4, version=8, weights=model(7), signer="root", parent=7, sig=SIG),
        Ack(src="site-1", seq=4),
        GossipShare(src="p3", step=11, x=model(4), w=0.5),
        Heartbeat(src="p3", step=2),
        Incorporated(src="site-1", seq=4),
        Overlap(src="region-a", seq=9, pairs=(("site-1", 3), ("site-2", 5))),
        RosterUpdate(version=3, text="version = 3"),
        # Issue 14's messages: a refusal, an evaluation, a statistics query and its answer
        # (they go through the corruption and field-replacement tests below too).
        TrainRefused(src="site-1", task=4, version=8, code="plan_not_approved", reason="no"),
        EvalReport(src="site-1", version=10, n_examples=42, metrics={"accuracy": 0.9}),
        StatsRequest(query="ages", spec={"tag": "heart", "columns": "age", "min_cell": 5}),
        StatsReport(src="site-1", query="ages", n=40, values={"count.0": 40.0, "sum.0": 2e3}),
        StatsReport(src="site-2", query="ages", n=0, code="dataset_missing", reason="no tag"),
    ]


def tensors_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def assert_same_message(got: Message, want: Message) -> None:
    assert type(got) is type(want)
    for f in dataclasses.fields(want):
        g, w = getattr(got, f.name), getattr(want, f.name)
        if isinstance(w, dict) and w and isinstance(next(iter(w.values())), np.ndarray):
            assert tensors_equal(g, w), f.name
        else:
            assert g == w, f.name
            assert type(g) is type(w) or isinstance(w, dict), f.name


def envelope(msg: Message) -> dict[str, Any]:
    return msgpack.unpackb(encode(msg), raw=False)  # type: ignore[no-any-return]


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips_exactly_with_fp32(msg: Message) -> None:
    assert_same_message(decode(encode(msg)), msg)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("msg", all_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips_with_every_codec(msg: Message, kind: CodecKind) -> None:
    spec = CodecSpec(kind, topk_fraction=0.1)
    got = decode(encode(msg, spec))
    assert type(got) is type(msg)
    for f in dataclasses.fields(msg):
        want = getattr(msg, f.name)
        value = getattr(got, f.name)
        if f.name in ("weights", "delta", "x"):
            assert list(value) == list(want)
            for name, arr in want.items():
                assert value[name].shape == arr.shape
                assert value[name].dtype == np.float32
                assert not value[name].flags.writeable
                tolerance = {"fp32": 0, "fp16": 1e-2, "int8": 0.05, "topk": np.inf}[kind]
                assert np.abs(value[name] - arr).max(initial=0.0) <= tolerance
        else:
            assert value == want


def test_envelope_layout() -> None:
    msg = Update(src="a", seq=1, base_version=0, delta=model(), n_examples=5)
    env = envelope(msg)
    assert env["v"] == 1
    assert env["type"] == "update"
    assert set(env) == {"v", "type", *(f.name for f in dataclasses.fields(Update))}
    assert set(env["delta"]) == {"m", "p"}
    assert isinstance(env["delta"]["p"], bytes)
    assert [e["name"] for e in env["delta"]["m"]["tensors"]] == ["w", "b"]
    assert env["count"] == 1 and env["task"] == -1 and env["metrics"] == {}
    assert env["sig"] == b""  # unsigned by default (the simulator, in-memory runs)
    model_env = envelope(ModelBroadcast(version=2, weights={}, signer="r", parent=1, sig=SIG))
    assert (model_env["signer"], model_env["parent"], model_env["sig"]) == ("r", 1, SIG)


def test_signature_fields_must_be_bytes_of_bounded_length() -> None:
    # Encoding: local misuse raises TypeError/ValueError.
    for bad in ("ab", bytearray(b"ab"), memoryview(b"ab"), None):
        unsigned = Update(src="a", seq=1, base_version=0, delta={}, n_examples=1)
        with pytest.raises(TypeError, match=r"update\.sig must be bytes"):
            encode(dataclasses.replace(unsigned, sig=bad))
    with pytest.raises(ValueError, match="limit 256"):
        encode(ModelBroadcast(version=1, weights={}, sig=bytes(wire.MAX_BIN_BYTES + 1)))
    # Decoding: a peer's str, int, nil, array or oversize bin is a MalformedMessage.
    for msg in (
        Update(src="a", seq=1, base_version=0, delta={}, n_examples=1),
        ModelBroadcast(version=1, weights={}),
        TrainRequest(task=1, version=1, weights={}),
    ):
        env = envelope(msg)
        name = message_type_name(type(msg))
        for bad in ("text", 7, None, [1, 2], bytes(wire.MAX_BIN_BYTES + 1)):
            env["sig"] = bad
            with pytest.raises(MalformedMessage, match=rf"{name}\.sig"):
                decode(pack(env))
        env["sig"] = bytes(wire.MAX_BIN_BYTES)
        got = decode(pack(env))
        assert isinstance(got, Update | ModelBroadcast | TrainRequest)
        assert got.sig == bytes(wire.MAX_BIN_BYTES)
    env = envelope(ModelBroadcast(version=1, weights={}))
    env["signer"] = b"root"
    with pytest.raises(MalformedMessage, match=r"model_broadcast\.signer must be a str"):
        decode(pack(env))


def test_the_examples_cover_every_message_type() -> None:
    # The hostile-input tests below start from these: a type left out is never attacked.
    # (Secure aggregation's messages have their own suite, test_wire_secagg.py, and a
    # Relayed envelope's raw uint8 payload its own, test_relayed.py.)
    others = set(SECAGG_MESSAGE_TYPES) | {Relayed}
    assert {type(m) for m in all_messages()} >= set(MESSAGE_TYPES) - others


def test_schema_covers_every_message_field() -> None:
    names = set()
    for cls in MESSAGE_TYPES:
        schema = wire._SCHEMAS[cls]
        assert [name for name, _ in schema.fields] == [f.name for f in dataclasses.fields(cls)]
        names.add(message_type_name(cls))
    assert len(names) == len(MESSAGE_TYPES)


def test_codec_choice_changes_message_size() -> None:
    big = {"w": np.random.default_rng(0).standard_normal(25_000).astype(np.float32)}
    sizes = {
        kind: len(encode(ModelBroadcast(version=1, weights=big), CodecSpec(kind))) for kind in KINDS
    }
    assert sizes["fp32"] > 100_000
    assert 1.9 < sizes["fp32"] / sizes["fp16"] < 2.1
    assert 3.8 < sizes["fp32"] / sizes["int8"] < 4.1
    assert sizes["topk"] < sizes["int8"] / 10


def test_encode_coerces_numpy_scalars_and_rejects_misuse() -> None:
    msg = Update(
        src="a",
        seq=np.int64(3),  # type: ignore[arg-type]
        base_version=0,
        delta={},
        n_examples=1,
        metrics={"loss": np.float32(0.5), "n": np.int64(3)},  # type: ignore[dict-item]
    )
    got = decode(encode(msg))
    assert isinstance(got, Update)
    assert got.seq == 3 and type(got.seq) is int
    assert got.metrics == {"loss": 0.5, "n": 3}
    with pytest.raises(TypeError, match="not a wire message"):
        encode("hello")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config"):
        encode(TrainRequest(task=1, version=1, weights={}, config={"layers": [1, 2]}))
    with pytest.raises(TypeError, match="config"):
        encode(TrainRequest(task=1, version=1, weights={}, config={1: 2}))  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="src"):
        encode(Ack(src=5, seq=1))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode(Ack(src="a", seq=1.5))  # type: ignore[arg-type]


# ------------------------------------------------------------------ rejections


def test_size_cap_comes_first() -> None:
    data = encode(ModelBroadcast(version=1, weights=model()))
    with pytest.raises(FrameTooLarge, match="limit 100"):
        decode(data, Limits(max_message_bytes=100))
    with pytest.raises(FrameTooLarge):
        decode(b"\xc1" * 101, Limits(max_message_bytes=100))


@pytest.mark.parametrize(
    "data",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 2**32 - 1 elements
        b"\xdf\xff\xff\xff\xff",  # map32
        b"\xdb\xff\xff\xff\xff",  # str32
        b"\xc6\xff\xff\xff\xff",  # bin32
        b"\xc9\xff\xff\xff\xff\x01",  # ext32
        b"\xdc\xff\xff" + b"\xc0" * 10,  # array16 with too few elements
    ],
)
def test_huge_length_headers_are_rejected_cheaply(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode(data)


def test_container_caps_apply() -> None:
    env = envelope(
        TrainRequest(task=1, version=1, weights={}, config={str(i): i for i in range(50)})
    )
    with pytest.raises(MalformedMessage, match="max_map_len"):
        decode(pack(env), Limits(max_map_len=20))
    env["config"] = {"k": "x" * 200}
    with pytest.raises(MalformedMessage, match="max_str_len"):
        decode(pack(env), Limits(max_str_len=100))


@pytest.mark.parametrize("depth", [2000, 1025, 500])
def test_deep_nesting_is_a_protocol_error(depth: int) -> None:
    nested = b"\x91" * depth + b"\xc0"
    with pytest.raises(MalformedMessage):
        decode(nested)
    # The same nesting inside a config value, where the schema wants a scalar.
    placeholder = "DEEP-PLACEHOLDER"
    data = encode(TrainRequest(task=1, version=1, weights={}, config={"x": placeholder}))
    spliced = data.replace(pack(placeholder), b"\x91" * (depth - 3) + b"\xc0")
    assert spliced != data
    with pytest.raises(MalformedMessage):
        decode(spliced)


def test_non_string_map_keys_are_rejected() -> None:
    with pytest.raises(MalformedMessage, match="map key"):
        decode(pack({1: 2}))
    env: dict[Any, Any] = envelope(Ack(src="a", seq=1))
    env[b"v2"] = 1
    with pytest.raises(MalformedMessage, match="unexpected field"):
        decode(pack(env))
    req = envelope(TrainRequest(task=1, version=1, weights={}))
    req["config"] = {b"lr": 0.1}
    with pytest.raises(MalformedMessage, match="keys must be str"):
        decode(pack(req))


@pytest.mark.parametrize(
    "ext",
    [
        b"\xd4\x01\x00",  # fixext1, type 1
        b"\xd6\xff\x00\x00\x00\x00",  # timestamp (type -1), which msgpack decodes itself
        b"\xc7\x00\x05",  # ext8 of length 0
        b"\xc9\x00\x00\x00\x01\x07\x00",  # ext32
    ],
)
def test_ext_types_are_rejected(ext: bytes) -> None:
    data = encode(Ack(src="EXT-PLACEHOLDER", seq=1))
    spliced = data.replace(pack("EXT-PLACEHOLDER"), ext)
    assert spliced != data
    with pytest.raises(MalformedMessage):
        decode(spliced)


def test_trailing_bytes_are_rejected() -> None:
    data = encode(Ack(src="a", seq=1))
    with pytest.raises(MalformedMessage, match="trailing"):
        decode(data + b"\x00")
    with pytest.raises(MalformedMessage, match="trailing"):
        decode(data + data)


def test_truncated_and_empty_input() -> None:
    data = encode(Update(src="a", seq=1, base_version=0, delta=model(), n_examples=1))
    for cut in (0, 1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(MalformedMessage):
            decode(data[:cut])


def test_envelope_shape_version_and_type() -> None:
    for obj in ([1, 2], 5, "update", None):
        with pytest.raises(MalformedMessage, match="must be a msgpack map"):
            decode(pack(obj))
    env = envelope(Ack(src="a", seq=1))
    for bad_version in (2, "1", True, None, [1]):
        with pytest.raises(MalformedMessage, match="wire version"):
            decode(pack({**env, "v": bad_version}))
    for bad_type in ("nope", "Ack", 3, None, ["ack"]):
        with pytest.raises(MalformedMessage, match="unknown message type"):
            decode(pack({**env, "type": bad_type}))


def test_missing_extra_and_mistyped_fields_are_named() -> None:
    env = envelope(Update(src="a", seq=1, base_version=0, delta=model(), n_examples=1))
    for name in ("seq", "delta", "metrics", "count"):
        with pytest.raises(MalformedMessage, match=f"missing field '{name}'"):
            decode(pack({k: v for k, v in env.items() if k != name}))
    with pytest.raises(MalformedMessage, match="unexpected field 'extra'"):
        decode(pack({**env, "extra": 1}))
    cases: dict[str, list[Any]] = {
        "src": [1, None, b"a"],
        "seq": [True, 1.0, "1", None],
        "n_examples": [False, [1]],
        "metrics": [[], {"x": [1]}, {"x": None}, {"x": float("nan")}],
        "delta": [b"", {"m": {}}, {"m": {}, "p": b"", "q": 1}],
    }
    for name, values in cases.items():
        for value in values:
            with pytest.raises(ProtocolError, match=rf"update\.{name}"):
                decode(pack({**env, name: value}))
    gossip = envelope(GossipShare(src="p", step=1, x={}, w=0.5))
    for w in ("0.5", None, float("inf"), float("nan"), True):
        with pytest.raises(MalformedMessage, match=r"gossip_share\.w"):
            decode(pack({**gossip, "w": w}))
    assert decode(pack({**gossip, "w": 1})) == GossipShare(src="p", step=1, x={}, w=1.0)


def test_tensor_errors_keep_their_class_and_name_the_field() -> None:
    delta = model()
    delta["w"] = delta["w"].copy()
    delta["w"][0, 0] = np.nan
    data = encode(Update(src="a", seq=1, base_version=0, delta=delta, n_examples=1))
    with pytest.raises(NonFiniteTensor, match=r"update\.delta: tensor 'w'"):
        decode(data)
    assert isinstance(decode(data, Limits(reject_nonfinite=False)), Update)

    env = envelope(ModelBroadcast(version=1, weights=model()))
    env["weights"]["m"]["tensors"][0]["dtype"] = "object"
    with pytest.raises(CodecError, match=r"model_broadcast\.weights: .*whitelist"):
        decode(pack(env))


def test_decoded_tensor_caps_apply_through_decode() -> None:
    data = encode(ModelBroadcast(version=1, weights={"z": np.zeros(1 << 20, np.float32)}))
    assert len(data) < 64 * 1024  # zeros compress
    with pytest.raises(ProtocolError, match="max_decoded_bytes"):
        decode(data, Limits(max_decoded_bytes=MiB))
    assert isinstance(decode(data, Limits(max_decoded_bytes=4 * MiB)), ModelBroadcast)


def test_limits_validate_their_arguments() -> None:
    bad: list[dict[str, Any]] = [
        {"max_tensors": 0},
        {"max_str_len": -1},
        {"max_ndim": 65},
        {"max_map_len": 1.5},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="Limits"):
            Limits(**kwargs)
    with pytest.raises(ValueError, match="reject_nonfinite"):
        Limits(reject_nonfinite=1)  # type: ignore[arg-type]


def test_accepts_bytearray_and_memoryview() -> None:
    data = encode(Heartbeat(src="p", step=3))
    assert decode(bytearray(data)) == Heartbeat(src="p", step=3)
    assert decode(memoryview(data)) == Heartbeat(src="p", step=3)


# ------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode(data)


ENCODED = [encode(m, CodecSpec(k, 0.1)) for m in all_messages() for k in KINDS]


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, len(ENCODED) - 1),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255), st.booleans()), max_size=4),
)
def test_corrupted_messages_raise_only_protocol_errors(
    index: int, edits: list[tuple[float, int, bool]]
) -> None:
    data = bytearray(ENCODED[index])
    for where, byte, cut in edits:
        i = min(int(where * len(data)), len(data) - 1)
        if cut:
            del data[i:]
        else:
            data[i] = byte
        if not data:
            break
    try:
        msg = decode(bytes(data))
    except ProtocolError:
        return
    assert isinstance(msg, MESSAGE_TYPES)


scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=4)
)
values = st.recursive(
    scalars | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), value=values)
def test_replaced_fields_raise_only_protocol_errors(data: st.DataObject, value: Any) -> None:
    env = msgpack.unpackb(data.draw(st.sampled_from(ENCODED)), raw=False)
    target = data.draw(st.sampled_from([*sorted(env), "extra"]))
    env[target] = value
    try:
        msg = decode(pack(env))
    except ProtocolError:
        return
    assert isinstance(msg, MESSAGE_TYPES)


def test_nan_free_floats_in_mappings_survive() -> None:
    got = decode(
        encode(Update(src="a", seq=1, base_version=0, delta={}, n_examples=1, metrics={"x": -0.0}))
    )
    assert isinstance(got, Update)
    assert math.copysign(1.0, got.metrics["x"]) == -1.0
