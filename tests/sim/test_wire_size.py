"""``sim.wire_size``: the simulator's message sizes are exactly the encoder's."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedloom.sim.network import UniformLinks
from fedloom.sim.wire_size import _PLANS, WireSizer, wire_size
from fedloom.transport import wire
from fedloom.transport.tensors import CODEC_KINDS, CodecSpec

from .test_network import _wire, make

TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="ab\u00e9\u4e2d", min_size=28, max_size=300),  # str8 / str16 headers
)
INTS = st.one_of(
    st.integers(-40, 300),
    st.sampled_from([-(2**63), -(2**31) - 1, -(2**15) - 1, 2**16, 2**32, 2**64 - 1]),
    st.integers(-(2**63), 2**64 - 1),
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.one_of(INTS, FLOATS, st.booleans(), TEXT, st.just(np.float32(0.25)))
MAPS = st.dictionaries(st.text(max_size=12), SCALARS, max_size=18)  # map16 past 15
PAIRS = st.lists(st.tuples(st.text(min_size=1, max_size=20), st.integers(1, 2**40)), max_size=20)
DTYPES = st.sampled_from(["float32", "float64", "float16", "int32", "uint8", "bool"])


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, np.ndarray]:
    out = {}
    for name in draw(st.lists(st.text(min_size=1, max_size=10), max_size=3, unique=True)):
        dtype = draw(DTYPES)
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=40))
        if draw(st.booleans()):  # compressible: LZ4 shrinks it
            arr = np.zeros(shape, dtype=dtype)
        else:
            elements = st.floats(-1e4, 1e4, width=16) if dtype.startswith("float") else None
            arr = draw(hnp.arrays(dtype, shape, elements=elements))
        out[name] = arr
    return out


# Field annotations of ``transport.wire``'s messages -> values the encoder accepts.
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "int": INTS,
    "float": st.one_of(FLOATS, st.integers(-5, 5)),  # the encoder writes float(value)
    "str": TEXT,
    "bytes": st.binary(max_size=wire.MAX_BIN_BYTES),
    "Tensors": tensors(),
    "Mapping[str, Any]": MAPS,
    "Mapping[str, float]": MAPS,
    "tuple[tuple[str, int], ...]": PAIRS.map(tuple),
}
SIZED = [cls for cls, plan in _PLANS.items() if plan is not None]
SPECS = st.builds(
    CodecSpec,
    kind=st.sampled_from(CODEC_KINDS),
    topk_fraction=st.floats(0.01, 1.0),
    lz4=st.booleans(),
)


def message(cls: type) -> st.SearchStrategy[Any]:
    return st.builds(cls, **{f.name: VALUES[str(f.type)] for f in dataclasses.fields(cls)})


def test_every_message_type_but_secure_aggregation_is_sized_without_encoding() -> None:
    assert set(SIZED) == set(wire.MESSAGE_TYPES) - set(wire.SECAGG_MESSAGE_TYPES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=st.sampled_from(SIZED).flatmap(message), spec=SPECS)
def test_size_is_the_encoded_length(msg: Any, spec: CodecSpec) -> None:
    assert wire_size(msg, spec) == len(wire.encode(msg, spec))


@settings(max_examples=40, deadline=None)
@given(weights=tensors(), spec=SPECS, tasks=st.lists(INTS, min_size=2, max_size=4))
def test_a_model_sent_in_many_requests_keeps_exact_sizes(
    weights: dict[str, np.ndarray], spec: CodecSpec, tasks: list[int]
) -> None:
    sizer = WireSizer()
    for task in tasks:
        for msg in (wire.TrainRequest(task, 3, weights), wire.ModelBroadcast(task, weights)):
            assert sizer.size(msg, spec) == len(wire.encode(msg, spec))


def test_values_the_encoder_refuses_raise_its_own_errors() -> None:
    ones = {"w": np.ones(3, np.float32)}
    cases: list[Any] = [
        wire.Ack(src=5, seq=1),  # type: ignore[arg-type]
        wire.Ack(src="s", seq=2**64),
        wire.Update("s", 1, 0, ones, 1, sig=b"x" * (wire.MAX_BIN_BYTES + 1)),
        wire.Update("s", 1, 0, {"w": np.ones(2, np.complex64)}, 1),
        wire.EvalReport("s", 1, 1, metrics={"a": [1]}),  # type: ignore[dict-item]
        wire.GossipShare("s", 1, ones, w="x"),  # type: ignore[arg-type]
    ]
    for msg in cases:
        with pytest.raises(Exception) as expected:
            wire.encode(msg)
        with pytest.raises(type(expected.value)):
            wire_size(msg)
    # Secure aggregation's messages go through the encoder itself.
    join = wire.SecAggJoin("s", 1, 0)
    assert wire_size(join) == len(wire.encode(join))


def test_the_network_sizes_lossless_messages_exactly_without_encoding() -> None:
    k, net, rec = make(links=UniformLinks(0.01, 1e6), codec=_wire(), roles={"s": "site"})
    net.verify_encoding = True  # every size is checked against a full encode
    zeros = {"w": np.zeros((20, 20), np.float32)}  # LZ4 shrinks it
    noise = {"w": np.random.default_rng(1).normal(size=(20, 20)).astype(np.float32)}
    msgs = [
        wire.Update("s", 1, 0, zeros, 5, metrics={"loss": 0.5}, pairs=(("a", 1),)),
        wire.Update("s", 2, 0, noise, 5),
        wire.TrainRequest(7, 1, noise, {"lr": 0.1}),
        wire.Ack("s", 1),
    ]
    for msg in msgs:
        net.send("s", "r", msg)
        net.end_burst()
    k.run()
    assert net.stats.encodings == 0
    assert [m for *_, m in rec.delivered] == msgs
    assert net.stats.bytes_sent == sum(len(wire.encode(m)) for m in msgs)


def test_float32_arrays_from_another_process_are_sized_without_encoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A process pool's results are unpickled: their float32 descriptor equals numpy's own
    # but is another object. They take the fast path, and the size is still exact.
    from multiprocessing.reduction import ForkingPickler

    from fedloom.sim import wire_size as ws

    rng = np.random.default_rng(3)
    delta = {"w": rng.standard_normal((40, 30)).astype(np.float32), "b": np.zeros(30, np.float32)}
    unpickled = ForkingPickler.loads(ForkingPickler.dumps(delta))
    assert unpickled["w"].dtype is not np.dtype("<f4")  # what the fast path must accept
    big_endian = {k: v.astype(">f4") for k, v in delta.items()}  # equal values, other bytes

    def no_encoding(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("encoded to learn a size")

    for spec in (CodecSpec("fp32"), CodecSpec("fp32", lz4=False)):
        msg = wire.Update("s1", 7, 3, unpickled, 12, 1)
        want = len(wire.encode(msg, spec))
        wire_size(wire.Update("s1", 7, 3, delta, 12, 1), spec)  # the layout's manifest, once
        with monkeypatch.context() as m:
            m.setattr(ws, "encode_tensors", no_encoding)
            assert wire_size(msg, spec) == want
        assert ws._float32_tensors_size(big_endian, spec.lz4) is None  # not its bytes as is
        slow = wire.Update("s1", 7, 3, big_endian, 12, 1)
        assert wire_size(slow, spec) == len(wire.encode(slow, spec))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(delta=tensors(), spec=SPECS)
def test_a_measured_delta_is_sized_by_its_measured_payload_exactly(
    delta: dict[str, np.ndarray], spec: CodecSpec
) -> None:
    # A training worker measures the payload (algorithms.weights_math.MeasuredDelta); the
    # size taken from it is the encoder's, for every codec and layout, float32 or not.
    from fedloom.algorithms.weights_math import measure_delta

    measured = measure_delta(delta)
    msg = wire.Update("s1", 7, 3, measured, 12, 1)
    assert wire_size(msg, spec) == len(wire.encode(msg, spec))


def test_a_measured_payload_is_used_instead_of_compressing_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedloom.algorithms.weights_math import measure_delta
    from fedloom.sim import wire_size as ws

    delta = {"w": np.zeros((64, 64), np.float32), "b": np.ones(64, np.float32)}
    measured = measure_delta(delta)
    want = len(wire.encode(wire.Update("s1", 7, 3, delta, 12, 1)))
    assert measured.lz4_payload is not None and measured.lz4_payload < 64 * 65 * 4  # LZ4 won

    def no_compression(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("compressed again to learn a size")

    monkeypatch.setattr(ws, "fp32_lz4_payload_size", no_compression)
    assert wire_size(wire.Update("s1", 7, 3, measured, 12, 1)) == want
