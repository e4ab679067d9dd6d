"""A region takes the root's signed settings from the same model broadcast again (issue 14).

Through the daemon's signing layer and the wire codec (``test_signed_settings.SignedNet``):
a root restarted with another ``[training]`` re-broadcasts the same model version under a
new proof; a region restored from a checkpoint that kept no root config must not hand its
sites its own ``[training]`` (which the root did not sign) meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np

from fedloom.algorithms.protocol import Deadline, Log, PeerDown, PeerUp, Received, Send, Train
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.runtime.signing import EndToEnd
from fedloom.transport.wire import Hello, ModelBroadcast, TrainRefused, TrainRequest
from tests.runtime.test_signed_settings import (
    IDS,
    ROOT_CONFIG,
    ROSTER,
    SignedNet,
    fedbuff_root,
    region_node,
    start_tree,
    tree,
)

NEW_CONFIG = {**ROOT_CONFIG, "lr": 0.01, "local_steps": 7}


async def reconnect_site(net: SignedNet, now: float) -> None:
    """The site restarts (idle again) and reconnects to the region."""
    await net.deliver("region", net.nodes["region"].handle(PeerDown("site-1"), now))
    net.nodes["site-1"] = SiteNode("site-1", "region", n_examples=10, seed=3)
    net.ends["site-1"] = EndToEnd(IDS["site-1"], ROSTER)
    await net.up("site-1", "region")
    await net.up("region", "site-1")


def test_a_root_restarted_with_new_training_settings_at_the_same_version() -> None:
    net = tree()

    async def run() -> None:
        await start_tree(net)
        # The root restarts (a new process: a new signing layer) with another [training]
        # and the same model version; the region is told as it reconnects.
        await net.deliver("region", net.nodes["region"].handle(PeerDown("root"), 1.0))
        net.nodes["root"] = fedbuff_root(NEW_CONFIG)
        net.ends["root"] = EndToEnd(IDS["root"], ROSTER)
        await net.up("root", "region")
        await net.up("region", "root")
        await reconnect_site(net, 2.0)

    asyncio.run(run())
    assert net.refused == []
    first, again = net.sent("root", ModelBroadcast)
    assert first.version == again.version and dict(again.config) == NEW_CONFIG
    request = net.sent("region", TrainRequest)[-1]
    assert dict(request.config) == NEW_CONFIG  # the restarted root's, signed
    # On the wire: the request carries the proof the restarted root signed.
    wired = [m for _, _, m in net.carried if isinstance(m, TrainRequest)][-1]
    old, signed = [m for _, _, m in net.carried if isinstance(m, ModelBroadcast)]
    assert wired.sig == signed.sig and wired.settings == signed.settings != old.settings
    train = net.of("site-1", Train)[-1]
    assert train.config["lr"] == 0.01 and train.config["local_steps"] == 7
    assert net.sent("site-1", TrainRefused) == []
    # What the region checkpoints now is the new config and proof.
    config, settings = net.nodes["region"].snapshot()["settings"]
    assert config == NEW_CONFIG and settings == signed.settings


def test_the_same_broadcast_again_changes_nothing() -> None:
    net = tree()
    asyncio.run(start_tree(net))
    (broadcast,) = net.sent("root", ModelBroadcast)
    region = net.nodes["region"]
    out = region.handle(Received("root", broadcast), 3.0)
    assert not any(isinstance(e, Send | Log) for e in out)
    # Another model under the same version (not what the region holds) is not taken.
    other = dataclasses.replace(
        broadcast,
        weights={k: v + 1 for k, v in broadcast.weights.items()},
        config={**ROOT_CONFIG, "lr": 9.0},
    )
    out = region.handle(Received("root", other), 4.0)
    assert not any(isinstance(e, Send) for e in out)
    assert region.snapshot()["settings"][0] == ROOT_CONFIG


def test_a_region_restored_without_the_roots_config_waits_for_it() -> None:
    net = tree()

    async def run() -> None:
        await start_tree(net)
        # A checkpoint written before settings were kept (and an older proof).
        snap: dict[str, Any] = dict(net.nodes["region"].snapshot())
        snap.pop("settings")
        snap["proof"] = ("root", 0, b"\x01" * 64)
        restored = region_node()
        restored.restore(snap)
        net.nodes["region"] = restored
        net.ends["region"] = EndToEnd(IDS["region"], ROSTER)
        await net.deliver("root", net.nodes["root"].handle(PeerDown("region"), 1.0))
        # The site reconnects first: no task while the root's config is unknown.
        await reconnect_site(net, 1.0)
        for t in (10.0, 30.0):
            await net.deliver("region", restored.handle(Deadline(), t))
        before = list(net.sent("region", TrainRequest))
        assert len(before) == 1  # the one sent before the restart
        waits = [e for e in net.of("region", Log) if "no tasks until" in e.text]
        assert len(waits) == 1 and waits[0].level == "warning"
        # The root comes back: its broadcast of the same model brings its config.
        await net.up("root", "region")
        await net.up("region", "root")

    asyncio.run(run())
    assert net.refused == []
    request = net.sent("region", TrainRequest)[-1]
    assert dict(request.config) == ROOT_CONFIG
    assert len(net.of("site-1", Train)) == 2  # before the restart, and now
    assert net.sent("site-1", TrainRefused) == []


def test_a_nested_region_gets_the_new_settings_too() -> None:
    """The parent region passes the re-broadcast on to its region children."""
    top = RegionalAggregator(
        "top", "root", {"mid": "region"}, buffer_size=1, concurrency=1, train_config={}
    )
    weights = {"w": np.ones(3, np.float32)}
    top.handle(PeerUp("root"), 0.0)
    top.handle(PeerUp("mid"), 0.0)
    top.handle(Received("mid", Hello("mid", "region")), 0.0)
    first = ModelBroadcast(0, weights, config={"lr": 0.1}, signer="root", sig=b"a" * 64)
    top.handle(Received("root", first), 1.0)
    again = dataclasses.replace(first, config={"lr": 0.2}, sig=b"b" * 64)
    out = top.handle(Received("root", again), 2.0)
    sent = [e.msg for e in out if isinstance(e, Send) and e.peer == "mid"]
    assert len(sent) == 1 and isinstance(sent[0], ModelBroadcast)
    assert dict(sent[0].config) == {"lr": 0.2} and sent[0].sig == b"b" * 64
    # The same again: nothing more goes to the child.
    out = top.handle(Received("root", again), 3.0)
    assert not any(isinstance(e, Send) and e.peer == "mid" for e in out)
