"""The settings an aggregator sends are signed by the root (issue 14, item 2).

Real nodes (a FedBuff or a synchronous FedAvg root, a region, a site) exchange their
messages through the daemon's own signing layer (``runtime.signing.EndToEnd``: ``seal`` as
a message leaves, ``check`` as it arrives) and the wire codec in between. The attacks are
made through that path: a region whose tasks carry another lr than the root's, and a
man-in-the-middle that rewrites a signed request's config on the wire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Effect, Log, Metric, PeerUp, Received, Send, Train
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.sync import SyncAggregator
from fedloom.runtime.signing import EndToEnd
from fedloom.transport.errors import ProtocolError
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.settings import settings_digest
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import (
    Message,
    ModelBroadcast,
    TrainRefused,
    TrainRequest,
    decode,
    encode,
)

ROOT_CONFIG = {"lr": 0.05, "local_steps": 5, "batch_size": 10, "mu": 0.0}
REGION_CONFIG = {"lr": 0.5, "local_steps": 50, "batch_size": 10, "mu": 0.0}
FP32 = CodecSpec()
IDS = {
    "root": Identity.generate("root", "root"),
    "region": Identity.generate("region", "region"),
    "site-1": Identity.generate("site-1", "site"),
}
ROSTER = Roster(1, [RosterEntry(i.node_id, i.role, i.public_key) for i in IDS.values()])
Tamper = Callable[[str, str, Message], Message]


def model() -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32), "b": np.zeros(2, np.float32)}


def no_tamper(src: str, dst: str, msg: Message) -> Message:
    return msg


class SignedNet:
    """Nodes whose messages go through each one's ``EndToEnd`` and the wire codec; what a
    node sends is handled by its receiver at once (depth first), effects recorded."""

    def __init__(self, nodes: dict[str, Any], tamper: Tamper = no_tamper) -> None:
        self.nodes = nodes
        self.ends = {n: EndToEnd(IDS[n], ROSTER) for n in nodes}
        self.tamper = tamper
        self.effects: dict[str, list[Effect]] = {n: [] for n in nodes}
        self.refused: list[tuple[str, str, ProtocolError]] = []
        self.carried: list[tuple[str, str, Message]] = []  # as received, after the wire

    async def deliver(self, node: str, effects: list[Effect]) -> None:
        self.effects[node].extend(effects)
        for effect in effects:
            if isinstance(effect, Send) and effect.peer in self.nodes:
                await self.send(node, effect.peer, effect.msg)

    async def send(self, src: str, dst: str, msg: Message) -> None:
        sealed = await self.ends[src].seal(msg, dst, FP32)
        on_wire = decode(encode(self.tamper(src, dst, sealed), FP32))
        self.carried.append((src, dst, on_wire))
        try:
            await self.ends[dst].check(on_wire, src)
        except ProtocolError as exc:  # the daemon ends that connection and lives on
            self.refused.append((src, dst, exc))
            return
        await self.deliver(dst, self.nodes[dst].handle(Received(src, on_wire), 0.0))

    async def up(self, node: str, peer: str) -> None:
        await self.deliver(node, self.nodes[node].handle(PeerUp(peer), 0.0))

    def of(self, node: str, kind: type) -> list[Any]:
        return [e for e in self.effects[node] if isinstance(e, kind)]

    def sent(self, node: str, kind: type) -> list[Any]:
        return [e.msg for e in self.of(node, Send) if isinstance(e.msg, kind)]


class LrRegion(RegionalAggregator):
    """A region that hands its sites another lr than the root signed (the attack)."""

    def _task_config(self) -> dict[str, Any]:
        return {**super()._task_config(), "lr": 10.0}


def fedbuff_root(train_config: dict[str, Any] = ROOT_CONFIG) -> FedBuffAggregator:
    return FedBuffAggregator(
        "root",
        {"region": "region"},
        model(),
        buffer_size=1,
        concurrency=1,
        train_config=train_config,
    )


def region_node(region_cls: type[RegionalAggregator] = RegionalAggregator) -> RegionalAggregator:
    return region_cls(
        "region",
        "root",
        {"site-1": "site"},
        buffer_size=1,
        concurrency=1,
        train_config=REGION_CONFIG,
    )


def tree(region_cls: type[RegionalAggregator] = RegionalAggregator, **kw: Any) -> SignedNet:
    site = SiteNode("site-1", "region", n_examples=10, seed=3)
    return SignedNet(
        {"root": fedbuff_root(), "region": region_node(region_cls), "site-1": site}, **kw
    )


async def start_tree(net: SignedNet) -> None:
    await net.up("root", "region")
    await net.up("region", "root")
    await net.up("site-1", "region")
    await net.up("region", "site-1")


def test_sites_train_with_the_roots_signed_settings_not_the_regions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = tree()
    asyncio.run(start_tree(net))
    assert net.refused == []
    (broadcast,) = net.sent("root", ModelBroadcast)
    assert dict(broadcast.config) == ROOT_CONFIG
    (request,) = net.sent("region", TrainRequest)
    assert dict(request.config) == ROOT_CONFIG  # the root's, not the region's [training]
    (train,) = net.of("site-1", Train)
    assert train.config["lr"] == 0.05 and train.config["local_steps"] == 5
    assert {"seed", "server_round"} <= set(train.config)  # the site's own, added after
    assert net.of("site-1", Send) == [] or not net.sent("site-1", TrainRefused)
    # The region says its own settings are unused (once).
    notes = [e for e in net.of("region", Log) if "differ from the root's" in e.text]
    assert len(notes) == 1 and notes[0].fields is not None
    assert notes[0].fields["root"]["lr"] == 0.05
    # What the root signed covers those settings, and the region relayed that proof.
    assert net.ends["root"].signed >= 1 and net.ends["site-1"].verified == 1
    proof = net.ends["root"].own_proof(broadcast.version)
    assert proof is not None and proof.settings == settings_digest(ROOT_CONFIG)
    assert net.ends["root"].own_proof(broadcast.version + 1) is None


def refusals(net: SignedNet) -> list[TrainRefused]:
    return net.sent("site-1", TrainRefused)


def test_a_region_that_alters_lr_gets_a_refusal_and_the_site_trains_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = tree(LrRegion)
    with caplog.at_level(logging.WARNING, logger="fedloom.runtime.signing"):
        asyncio.run(start_tree(net))
    (request,) = net.sent("region", TrainRequest)
    assert request.config["lr"] == 10.0
    # The model is the root's (the connection stays up), the settings are not: refused.
    assert net.refused == []
    assert net.of("site-1", Train) == []
    assert net.nodes["site-1"].settings_refused == 1
    (refusal,) = refusals(net)
    assert refusal.code == "unsigned_settings" and refusal.task == request.task
    assert refusal.src == "site-1" and refusal.version == request.version
    assert "not what the root signed" in refusal.reason
    assert Metric("message_rejected", 1.0, {"reason": "unsigned_settings"}) in net.of(
        "site-1", Metric
    )
    (warning,) = [e for e in net.of("site-1", Log) if e.level == "warning"]
    assert "not trained" in warning.text
    # The region's signing layer saw it relay the root's proof with other settings.
    assert any("unsigned_settings" in r.getMessage() for r in caplog.records)
    # The refusal reached the region, which relays it up: the root sees it too.
    assert net.sent("region", TrainRefused) == [refusal]


def test_a_man_in_the_middle_rewriting_the_config_is_refused() -> None:
    def raise_lr(src: str, dst: str, msg: Message) -> Message:
        if isinstance(msg, TrainRequest):
            return dataclasses.replace(msg, config={**msg.config, "local_steps": 500})
        return msg

    net = tree(tamper=raise_lr)
    asyncio.run(start_tree(net))
    assert net.of("site-1", Train) == []
    (refusal,) = refusals(net)
    assert refusal.code == "unsigned_settings"


def test_stripping_the_settings_digest_is_a_forged_model() -> None:
    """Without the digest the signature is checked over the config's own digest, which
    the root did not sign: refused on receipt like any forged model (nothing trained)."""

    def strip(src: str, dst: str, msg: Message) -> Message:
        if isinstance(msg, TrainRequest):
            return dataclasses.replace(msg, config={**msg.config, "lr": 9.0}, settings=b"")
        return msg

    net = tree(tamper=strip)
    asyncio.run(start_tree(net))
    assert net.of("site-1", Train) == []
    assert [(s, d, e.reason) for s, d, e in net.refused] == [("region", "site-1", "bad_signature")]


def test_a_broadcast_with_altered_settings_is_refused_by_the_region() -> None:
    def alter(src: str, dst: str, msg: Message) -> Message:
        if isinstance(msg, ModelBroadcast):
            return dataclasses.replace(msg, config={**msg.config, "lr": 3.0})
        return msg

    net = tree(tamper=alter)
    asyncio.run(start_tree(net))
    assert [(s, d, e.reason) for s, d, e in net.refused] == [
        ("root", "region", "unsigned_settings")
    ]
    assert net.sent("region", TrainRequest) == [] and net.of("site-1", Train) == []


@pytest.mark.parametrize("tampered", [False, True])
def test_a_sync_fedavg_root_signs_its_settings(tampered: bool) -> None:
    def alter(src: str, dst: str, msg: Message) -> Message:
        if tampered and isinstance(msg, TrainRequest):
            return dataclasses.replace(msg, config={**msg.config, "mu": 1.0})
        return msg

    root = SyncAggregator(
        "root", {"site-1": "site"}, model(), clients_per_round=1, train_config=ROOT_CONFIG
    )
    site = SiteNode("site-1", "root", n_examples=10)
    net = SignedNet({"root": root, "site-1": site}, tamper=alter)

    async def run() -> None:
        await net.up("site-1", "root")
        await net.up("root", "site-1")

    asyncio.run(run())
    (request,) = [m for s, _, m in net.carried if s == "root" and isinstance(m, TrainRequest)]
    assert request.settings == settings_digest(ROOT_CONFIG) and request.sig
    if tampered:
        assert net.of("site-1", Train) == []
        assert [r.code for r in refusals(net)] == ["unsigned_settings"]
    else:
        (train,) = net.of("site-1", Train)
        assert train.config["mu"] == 0.0 and refusals(net) == []


def test_repeated_refusals_warn_once_a_minute_and_count_each() -> None:
    site = SiteNode("site-1", "root")
    signed = settings_digest(ROOT_CONFIG)
    bad = TrainRequest(1, 0, model(), {**ROOT_CONFIG, "lr": 1.0}, settings=signed)
    effects: list[Effect] = []
    for t in range(5):
        effects += site.handle(Received("root", dataclasses.replace(bad, task=t + 1)), float(t))
    warnings = [e for e in effects if isinstance(e, Log) and e.level == "warning"]
    assert len(warnings) == 1
    sent = [e.msg for e in effects if isinstance(e, Send)]
    assert [m.task for m in sent if isinstance(m, TrainRefused)] == [1, 2, 3, 4, 5]
    assert site.settings_refused == 5
    assert not any(isinstance(e, Train) for e in effects)
    # Later (past the interval) one more line, saying how many went unlogged.
    late = site.handle(Received("root", dataclasses.replace(bad, task=9)), 120.0)
    (line,) = [e for e in late if isinstance(e, Log)]
    assert "4 more refused" in line.text
    # The right settings are trained.
    good = dataclasses.replace(bad, task=10, config=dict(ROOT_CONFIG))
    assert any(isinstance(e, Train) for e in site.handle(Received("root", good), 121.0))


def test_unsigned_requests_are_not_checked() -> None:
    """In-memory runs without signing carry no digest: nothing changes for them."""
    site = SiteNode("site-1", "root")
    out = site.handle(Received("root", TrainRequest(1, 0, model(), {"lr": 7.0})), 0.0)
    (train,) = [e for e in out if isinstance(e, Train)]
    assert train.config["lr"] == 7.0
