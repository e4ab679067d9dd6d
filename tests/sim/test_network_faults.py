"""Message loss that drops messages, and codecs chosen per link tier (sim.network)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedloom.sim.network import LinkParams, UniformLinks
from fedloom.transport.codec_policy import CodecPolicy
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import Update
from tests.sim.test_network import Blob, TableLinks, _wire, make

ROLES = {"s": "site", "r": "region", "root": "root"}


def lossy_run(p: float, seed: int, n: int = 400) -> tuple[list[str], Any, float]:
    """``n`` 100-byte messages s -> r at 1000 B/s with message loss ``p``."""
    k, net, rec = make(links=UniformLinks(latency_s=0.01, bandwidth_bps=8000.0), roles=ROLES)
    net.set_message_loss(p, seed=seed)
    for i in range(n):
        assert net.send("s", "r", Blob(str(i), 100))
    k.run()
    return [m.tag for _, _, _, m in rec.delivered], net.stats, rec.delivered[-1][0]


def test_lost_messages_never_arrive_are_counted_and_still_use_the_link() -> None:
    tags, stats, last = lossy_run(0.25, seed=7)
    dropped = stats.messages_dropped_loss
    # 400 draws at p = 0.25: 100 expected, sd 8.7; 60..140 is more than four sd each side.
    assert 60 < dropped < 140
    assert len(tags) + dropped == stats.messages_sent == 400
    assert stats.messages_delivered == len(tags)
    assert stats.bytes_sent == 400 * 100  # a lost message took its time on the link too
    assert tags == sorted(tags, key=int)  # what arrives keeps the link's order
    if tags[-1] == "399":  # the last one arrived: after every message's serialisation
        assert last == pytest.approx(400 * 100 / 1000 + 0.01)


def test_which_messages_are_lost_depends_on_the_seed_only() -> None:
    a, _, _ = lossy_run(0.3, seed=1)
    b, _, _ = lossy_run(0.3, seed=1)
    c, _, _ = lossy_run(0.3, seed=2)
    assert a == b
    assert a != c


def test_no_message_loss_by_default_and_none_on_loopback() -> None:
    tags, stats, _ = lossy_run(0.0, seed=1, n=50)
    assert len(tags) == 50 and stats.messages_dropped_loss == 0
    loopback = LinkParams(0.0, float("inf"))
    k, net, rec = make(links=TableLinks({}, loopback), roles=ROLES)
    net.set_message_loss(0.9, seed=1)  # co-located nodes: nothing crosses a network
    for i in range(50):
        net.send("r", "root", Blob(str(i), 100))
    k.run()
    assert len(rec.delivered) == 50 and net.stats.messages_dropped_loss == 0


def test_message_loss_per_tier() -> None:
    k, net, rec = make(links=UniformLinks(latency_s=0.01, bandwidth_bps=8e6), roles=ROLES)
    net.set_message_loss(0.0, by_tier={"site->region": 0.5}, seed=3)
    for i in range(200):
        net.send("s", "r", Blob(f"up{i}", 100))
        net.send("r", "s", Blob(f"down{i}", 100))
        net.send("r", "root", Blob(f"root{i}", 100))
    k.run()
    arrived = [m.tag for _, _, _, m in rec.delivered]
    assert sum(t.startswith("down") for t in arrived) == 200
    assert sum(t.startswith("root") for t in arrived) == 200
    assert 60 < sum(t.startswith("up") for t in arrived) < 140


@pytest.mark.parametrize("p", [1.0, -0.1, float("nan"), True])
def test_impossible_message_loss_is_refused(p: Any) -> None:
    _, net, _ = make(roles=ROLES)
    with pytest.raises(ValueError, match="message loss"):
        net.set_message_loss(p)
    with pytest.raises(ValueError, match="'site->region'"):
        net.set_message_loss(0.1, by_tier={"site->region": p})


def test_a_tier_codec_encodes_only_that_tiers_messages() -> None:
    delta = {"w": np.full((100, 100), 0.5, dtype=np.float32)}
    k, net, rec = make(
        links=UniformLinks(0.0, 1e6),
        codec=_wire(),
        codecs=CodecPolicy(up=CodecSpec("fp32", lz4=False)),
        roles=ROLES,
    )
    net.set_tier_codecs({"region->root": CodecPolicy(up=CodecSpec("fp16", lz4=False))})
    assert net.spec_for("r", "root", Update("r", 1, 0, delta, 1)).kind == "fp16"
    assert net.spec_for("s", "r", Update("s", 1, 0, delta, 1)).kind == "fp32"
    net.send("s", "r", Update(src="s", seq=1, base_version=0, delta=delta, n_examples=1))
    net.send("r", "root", Update(src="r", seq=1, base_version=0, delta=delta, n_examples=1))
    k.run()
    by_tier = net.bytes_by_tier
    assert by_tier["region->root"] == pytest.approx(by_tier["site->region"] / 2, rel=0.01)
    received = {dst: msg.delta["w"] for _, _, dst, msg in rec.delivered}
    assert received["root"].dtype == np.float32  # decoded back, with fp16's rounding
    assert np.array_equal(received["r"], delta["w"])
