from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.sim.kernel import Kernel, SimulationError
from fedloom.sim.network import (
    CodecPolicy,
    LinkParams,
    Network,
    Partition,
    UniformLinks,
    mathis_bandwidth,
)
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import Ack, GossipShare, Heartbeat, ModelBroadcast, TrainRequest, Update


@dataclass(frozen=True)
class Blob:
    """A toy message whose encoding is exactly ``size`` bytes."""

    tag: str
    size: int


class PaddedCodec:
    """Pickle padded to the message's declared size (pickle ignores trailing bytes)."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, msg: Any, spec: Any) -> bytes:
        self.calls += 1
        data = pickle.dumps(msg)
        assert len(data) <= msg.size
        return data + bytes(msg.size - len(data))

    def decode(self, data: bytes) -> Any:
        return pickle.loads(data)


class TableLinks:
    def __init__(self, table: dict[tuple[str, str], LinkParams], default: LinkParams) -> None:
        self.table = table
        self.default = default

    def link(self, src: str, dst: str) -> LinkParams:
        return self.table.get((src, dst), self.default)


class Recorder:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.delivered: list[tuple[float, str, str, Any]] = []
        self.notices: list[tuple[float, str, str, bool]] = []

    def deliver(self, src: str, dst: str, msg: Any) -> None:
        self.delivered.append((self.kernel.now, src, dst, msg))

    def notify(self, node: str, peer: str, up: bool) -> None:
        self.notices.append((self.kernel.now, node, peer, up))


def make(
    links: Any = None,
    codec: Any = None,
    neighbours: list[tuple[str, str]] | None = None,
    roles: dict[str, str] | None = None,
    codecs: CodecPolicy | None = None,
) -> tuple[Kernel, Network, Recorder]:
    k = Kernel()
    rec = Recorder(k)
    net = Network(
        k,
        links or UniformLinks(latency_s=0.01, bandwidth_bps=8000.0),
        deliver=rec.deliver,
        notify=rec.notify,
        codec=codec if codec is not None else PaddedCodec(),
        codecs=codecs,
        roles=roles,
        neighbours=neighbours or [],
    )
    return k, net, rec


def test_delivery_time_is_latency_plus_serialisation() -> None:
    # 8000 bit/s = 1000 B/s: a 500 B message takes 0.5 s to serialise.
    k, net, rec = make()
    assert net.send("a", "b", Blob("m", 500))
    k.run()
    (t, src, dst, msg) = rec.delivered[0]
    assert (src, dst, msg) == ("a", "b", Blob("m", 500))
    assert t == pytest.approx(0.5 + 0.01)


def test_link_is_a_fifo_queue_and_never_reorders() -> None:
    k, net, rec = make()
    sizes = [1000, 100, 500, 100]
    for i, size in enumerate(sizes):
        net.send("a", "b", Blob(str(i), size))
    k.run()
    assert [m.tag for _, _, _, m in rec.delivered] == ["0", "1", "2", "3"]
    finish = np.cumsum(sizes) / 1000.0
    assert [t for t, *_ in rec.delivered] == pytest.approx(list(finish + 0.01))


def test_queue_drains_when_idle_and_directions_are_independent() -> None:
    k, net, rec = make()
    net.send("a", "b", Blob("1", 1000))
    net.send("b", "a", Blob("2", 1000))  # the other direction has its own queue
    k.run()
    assert [t for t, *_ in rec.delivered] == pytest.approx([1.01, 1.01])
    k.schedule_at(5.0, net.send, "a", "b", Blob("3", 1000))  # link idle since 1.0
    k.run()
    assert rec.delivered[-1][0] == pytest.approx(6.01)


def test_per_link_latency_and_bandwidth() -> None:
    table = {("a", "b"): LinkParams(0.2, 16000.0), ("a", "c"): LinkParams(0.05, math.inf)}
    k, net, rec = make(links=TableLinks(table, LinkParams(0.0, 8000.0)))
    net.send("a", "b", Blob("ab", 1000))
    net.send("a", "c", Blob("ac", 1000))
    k.run()
    arrivals = {m.tag: t for t, _, _, m in rec.delivered}
    assert arrivals["ab"] == pytest.approx(0.5 + 0.2)
    assert arrivals["ac"] == pytest.approx(0.05)  # infinite bandwidth: latency only


def test_mathis_formula() -> None:
    # RTT 100 ms, p = 1 %: (1460*8 / 0.1) * 1.22 / 0.1 = 1,424,960 bit/s.
    assert mathis_bandwidth(100e6, 0.1, 0.01) == pytest.approx(1460 * 8 / 0.1 * 1.22 / 0.1)
    assert mathis_bandwidth(1e6, 0.1, 0.01) == 1e6  # the link itself is the bottleneck
    assert mathis_bandwidth(100e6, 0.1, 0.0) == 100e6
    assert mathis_bandwidth(100e6, 0.0, 0.01) == 100e6
    with pytest.raises(ValueError):
        mathis_bandwidth(1e6, 0.1, 1.0)


def test_loss_slows_links_but_drops_nothing() -> None:
    links = UniformLinks(latency_s=0.05, bandwidth_bps=100e6, loss=0.01)
    k, net, rec = make(links=links)
    expected_bw = mathis_bandwidth(100e6, 0.1, 0.01)
    assert net.effective_bandwidth("a", "b") == pytest.approx(expected_bw)
    for i in range(20):
        net.send("a", "b", Blob(str(i), 10_000))
    k.run()
    assert len(rec.delivered) == 20
    assert rec.delivered[-1][0] == pytest.approx(20 * 10_000 * 8 / expected_bw + 0.05)


def test_start_announces_neighbour_links_after_latency() -> None:
    table = {("b", "a"): LinkParams(0.3, 1e6), ("a", "b"): LinkParams(0.1, 1e6)}
    k, net, rec = make(links=TableLinks(table, LinkParams(0.0, 1e6)), neighbours=[("a", "b")])
    net.start()
    k.run()
    # a hears about b once something could travel b -> a (0.3 s), b after 0.1 s.
    assert sorted(rec.notices) == [(0.1, "b", "a", True), (0.3, "a", "b", True)]


def test_partition_blocks_crossing_messages_and_notifies_both_ends() -> None:
    nb = [("root", "s1"), ("root", "s2"), ("s1", "s2")]
    k, net, rec = make(neighbours=nb)
    net.start()
    net.add_partition(Partition(1.0, 2.0, frozenset({"s1"})))
    k.run(until=0.5)
    assert len(rec.notices) == 6
    rec.notices.clear()
    k.run(until=1.0)
    assert sorted(rec.notices) == [
        (1.0, "root", "s1", False),
        (1.0, "s1", "root", False),
        (1.0, "s1", "s2", False),
        (1.0, "s2", "s1", False),
    ]
    assert not net.send("root", "s1", Blob("cut", 100))
    assert not net.connected("s1", "s2")
    assert net.send("root", "s2", Blob("fine", 100))
    k.run(until=1.5)
    assert [m.tag for *_, m in rec.delivered] == ["fine"]
    assert net.stats.messages_blocked == 1
    rec.notices.clear()
    k.run(until=3.0)
    ups = sorted(rec.notices)
    assert [(n, p, up) for _, n, p, up in ups] == [
        ("root", "s1", True),
        ("s1", "root", True),
        ("s1", "s2", True),
        ("s2", "s1", True),
    ]
    assert all(t == pytest.approx(2.01) for t, *_ in ups)
    assert net.send("root", "s1", Blob("healed", 100))
    k.run()
    assert rec.delivered[-1][3].tag == "healed"


def test_messages_in_flight_are_lost_when_the_link_goes_down() -> None:
    k, net, rec = make(neighbours=[("a", "b")])
    net.send("a", "b", Blob("slow", 2000))  # arrives at 2.01
    net.add_partition(Partition(1.0, 1.5, frozenset({"b"})))
    k.run()
    assert rec.delivered == []
    assert net.stats.messages_lost == 1
    # The queue was flushed with the connection: a new message does not wait for it.
    k.schedule_at(3.0, net.send, "a", "b", Blob("new", 1000))
    k.run()
    assert rec.delivered[0][0] == pytest.approx(4.01)


def test_links_inside_and_outside_a_partition_keep_working() -> None:
    k, net, rec = make()
    net.add_partition(Partition(0.0, 10.0, frozenset({"r1", "s1"})))
    k.run(until=0.0)
    assert net.send("r1", "s1", Blob("in", 100))
    assert net.send("root", "s9", Blob("out", 100))
    assert not net.send("root", "r1", Blob("across", 100))
    k.run(until=5.0)
    assert sorted(m.tag for *_, m in rec.delivered) == ["in", "out"]


def test_overlapping_partitions_notify_only_on_transitions() -> None:
    k, net, rec = make(neighbours=[("a", "b")])
    net.start()
    net.add_partition(Partition(1.0, 3.0, frozenset({"a"})))
    net.add_partition(Partition(2.0, 4.0, frozenset({"b"})))
    k.run()
    seq = [(round(t, 3), n, up) for t, n, _, up in rec.notices if n == "a"]
    assert seq == [(0.01, "a", True), (1.0, "a", False), (4.01, "a", True)]


def test_up_notice_is_cancelled_if_link_drops_again_before_it_arrives() -> None:
    links = UniformLinks(latency_s=1.0, bandwidth_bps=1e6)
    k, net, rec = make(links=links, neighbours=[("a", "b")])
    net.start()
    net.add_partition(Partition(2.0, 3.0, frozenset({"a"})))
    net.add_partition(Partition(3.5, 5.0, frozenset({"a"})))  # PeerUp would land at 4.0
    k.run()
    a_seq = [(t, up) for t, n, _, up in rec.notices if n == "a"]
    assert a_seq == [(1.0, True), (2.0, False), (6.0, True)]


def test_kill_notifies_neighbours_after_delay_and_silences_the_dead() -> None:
    k, net, rec = make(neighbours=[("root", "s1"), ("root", "s2")])
    net.start()
    k.run(until=1.0)
    rec.notices.clear()
    net.send("s1", "root", Blob("in-flight", 1000))  # would arrive at 2.01
    net.kill("s1", detection_delay_s=5.0)
    assert net.is_dead("s1")
    assert not net.send("root", "s1", Blob("to-dead", 100))
    k.run()
    assert rec.delivered == []
    assert rec.notices == [(6.0, "root", "s1", False)]
    assert net.stats.messages_lost == 1 and net.stats.messages_blocked == 1


def test_sending_to_self_raises() -> None:
    _, net, _ = make()
    with pytest.raises(SimulationError):
        net.send("a", "a", Blob("x", 10))


def test_bad_partitions_are_rejected() -> None:
    with pytest.raises(ValueError):
        Partition(2.0, 1.0, frozenset({"a"}))
    with pytest.raises(ValueError):
        Partition(0.0, 1.0, frozenset())


def test_broadcast_is_encoded_once_per_burst() -> None:
    codec = PaddedCodec()
    k, net, rec = make(codec=codec)
    msg = Blob("model", 300)
    for peer in ("b", "c", "d"):
        net.send("a", peer, msg)
    assert codec.calls == 1
    net.end_burst()
    net.send("a", "e", msg)
    assert codec.calls == 2
    k.run()
    assert len(rec.delivered) == 4


def test_real_codec_sizes_and_lossy_decoding() -> None:
    rng = np.random.default_rng(0)
    delta = {"w": rng.standard_normal((50, 10)).astype(np.float32)}
    roles = {"s": "site", "r": "root"}
    policy = CodecPolicy(up=CodecSpec("int8"), down=CodecSpec("fp32"))
    k, net, rec = make(links=UniformLinks(0.0, 1e9), codec=_wire(), roles=roles, codecs=policy)
    up = Update(src="s", seq=1, base_version=0, delta=delta, n_examples=10)
    down = ModelBroadcast(version=1, weights=delta)
    net.send("s", "r", up)
    net.send("r", "s", down)
    net.send("r", "s", Heartbeat(src="r"))
    net.send("s", "r", Ack(src="s", seq=1))
    k.run()
    got = {type(m).__name__: m for *_, m in rec.delivered}
    # int8 is lossy: close but not equal; fp32 models arrive exactly.
    assert not np.array_equal(got["Update"].delta["w"], delta["w"])
    np.testing.assert_allclose(got["Update"].delta["w"], delta["w"], atol=0.05)
    np.testing.assert_array_equal(got["ModelBroadcast"].weights["w"], delta["w"])
    assert net.bytes_by_type["Update"] < net.bytes_by_type["ModelBroadcast"] / 2
    assert net.bytes_by_tier["site->root"] == net.bytes_by_type["Update"] + net.bytes_by_type["Ack"]
    assert net.messages_by_tier == {"site->root": 2, "root->site": 2}
    assert net.stats.bytes_sent == sum(net.bytes_by_tier.values())


def test_codec_choice_changes_simulated_time() -> None:
    delta = {"w": np.ones((100, 100), dtype=np.float32) * 0.5}
    times = {}
    for kind in ("fp32", "fp16"):
        policy = CodecPolicy(up=CodecSpec(kind, lz4=False))
        k, net, rec = make(links=UniformLinks(0.0, 1e6), codec=_wire(), codecs=policy)
        net.send("s", "r", Update(src="s", seq=1, base_version=0, delta=delta, n_examples=1))
        k.run()
        times[kind] = rec.delivered[0][0]
    assert times["fp16"] == pytest.approx(times["fp32"] / 2, rel=0.01)


def _wire() -> Any:
    from fedloom.sim.network import WireCodec

    return WireCodec()


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["fp32", "fp16", "int8", "topk"]),
    tasks=st.lists(st.integers(-(2**40), 2**40), min_size=2, max_size=5),
    version=st.integers(0, 2**33),
    config=st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(
            st.integers(-(2**31), 2**31),
            st.floats(allow_nan=False, allow_infinity=False),
            st.booleans(),
        ),
        max_size=3,
    ),
)
def test_shared_tensor_shortcut_is_exact(
    kind: str, tasks: list[int], version: int, config: dict[str, Any]
) -> None:
    from fedloom.transport import wire

    weights = {"w": np.linspace(-1, 1, 120, dtype=np.float32).reshape(12, 10)}
    spec = CodecSpec(kind)  # type: ignore[arg-type]
    policy = CodecPolicy(up=spec, down=spec)
    _, net, _ = make(links=UniformLinks(0.0, 1e9), codec=_wire(), codecs=policy)
    net.verify_encoding = True  # every shortcut is checked against a full encode
    for task in tasks:
        for msg in (
            TrainRequest(task, version, weights, config),
            GossipShare("p" * (task % 7 + 1), task, weights, 0.5),
            ModelBroadcast(version + task % 3, weights),
        ):
            size, decoded = net.encoded(msg)
            full = wire.encode(msg, spec)
            assert size == len(full)
            expected = wire.decode(full)
            for f in type(msg).__dataclass_fields__:
                got, want = getattr(decoded, f), getattr(expected, f)
                if (
                    isinstance(want, dict)
                    and want
                    and isinstance(next(iter(want.values())), np.ndarray)
                ):
                    assert all(np.array_equal(got[k], want[k]) for k in want)
                else:
                    assert got == want
            net.end_burst()
    # Lossy: bare + full on a miss, bare + verify on a hit; fp32 is sized, never encoded.
    encodings_full = 0 if kind == "fp32" else 3 * len(tasks) * 2
    assert net.stats.encodings == encodings_full


@pytest.mark.parametrize(("kind", "encodings"), [("fp16", 11), ("fp32", 0)])
def test_model_requests_share_one_tensor_encoding(kind: str, encodings: int) -> None:
    from fedloom.transport import wire

    weights = {"w": np.ones((30, 30), dtype=np.float32)}
    spec = CodecSpec(kind)  # type: ignore[arg-type]
    codecs = CodecPolicy(down=spec)
    k, net, rec = make(links=UniformLinks(0.0, 1e9), codec=_wire(), codecs=codecs)
    for task in range(10):
        net.send("root", f"s{task}", TrainRequest(task, 1, weights, {"lr": 0.1}))
        net.end_burst()
    k.run()
    # fp16: 1 full encode + 10 tensor-less envelopes; fp32 (lossless): sized, not encoded.
    assert net.stats.encodings == encodings
    sent = [TrainRequest(task, 1, weights, {"lr": 0.1}) for task in range(10)]
    assert net.stats.bytes_sent == sum(len(wire.encode(m, spec)) for m in sent)
    got = [m for *_, m in rec.delivered]
    assert [m.task for m in got] == list(range(10))
    assert all(np.array_equal(m.weights["w"], weights["w"]) for m in got)


def test_bytes_the_receiver_refuses_are_dropped_on_arrival() -> None:
    k, net, rec = make(links=UniformLinks(0.1, 1e6), codec=_wire(), roles={"s": "site"})
    net.decode_lossless = True  # by default fp32 messages are not decoded (lossless)
    bad = {"w": np.array([1.0, np.nan], dtype=np.float32)}
    net.send("s", "r", Update(src="s", seq=1, base_version=0, delta=bad, n_examples=1))
    net.send("s", "r", TrainRequest(1, 0, {"w": np.ones(2, np.float32)}, {"lr": math.inf}))
    net.send("s", "r", Ack(src="s", seq=1))
    k.run()
    assert [type(m).__name__ for *_, m in rec.delivered] == ["Ack"]
    assert net.stats.messages_rejected == 2
    assert net.stats.bytes_sent == sum(net.bytes_by_tier.values()) > 0
    assert sum(net.rejections.values()) == 2


def test_lossless_messages_arrive_as_sent_with_their_encoded_size() -> None:
    from fedloom.transport import wire

    k, net, rec = make(links=UniformLinks(0.1, 1e6), codec=_wire(), roles={"s": "site"})
    msg = Update(src="s", seq=1, base_version=0, delta={"w": np.ones(8, np.float32)}, n_examples=3)
    net.send("s", "r", msg)
    k.run()
    assert [m for *_, m in rec.delivered] == [msg]
    assert net.stats.bytes_sent == len(wire.encode(msg))
