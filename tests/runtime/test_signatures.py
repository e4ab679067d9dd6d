"""End-to-end signatures enforced on the wire: daemons sign what they send, refuse what
does not verify, and live on (issue 3, "What must be shown" 1)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Event, Metric, PeerDown, PeerUp, Received, Send
from fedloom.runtime.connection import ProgressLink
from fedloom.runtime.network_peers import Backoff, DialTarget, NetworkPeers, OnLink
from fedloom.runtime.signing import EndToEnd
from fedloom.transport.channel import SecureChannel, client_channel, server_channel
from fedloom.transport.codec_policy import CodecPolicy
from fedloom.transport.e2e import (
    digest_as_received,
    model_signed_bytes,
    sign_model,
    sign_update,
    update_digest_sent,
    update_signed_bytes,
)
from fedloom.transport.errors import ProtocolError
from fedloom.transport.identity import Identity
from fedloom.transport.links import Link, memory_link_pair
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.tensors import CodecSpec
from fedloom.transport.wire import Ack, Message, ModelBroadcast, TrainRequest, Update

LIMIT = 15.0
ROOT = Identity.generate("root", "root")
REGION = Identity.generate("region", "region")
SITE = Identity.generate("site-1", "site")
OTHER = Identity.generate("site-2", "site")
ROSTER = Roster(
    1, [RosterEntry(i.node_id, i.role, i.public_key) for i in (ROOT, REGION, SITE, OTHER)]
)
FP32 = CodecSpec()


def weights(seed: int = 0, n: int = 1000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(n).astype(np.float32), "b": np.zeros(3, np.float32)}


# ---------------------------------------------------------------------- plumbing


class Sink:
    def __init__(self) -> None:
        self.posted: list[Event] = []

    def post_nowait(self, event: Event, valid: Callable[[], bool] | None = None) -> None:
        self.posted.append(event)

    async def post(self, event: Event, valid: Callable[[], bool] | None = None) -> None:
        self.posted.append(event)

    def received(self) -> list[Message]:
        return [e.msg for e in self.posted if isinstance(e, Received)]

    def count(self, event: Event) -> int:
        return self.posted.count(event)


class Hub:
    """In-memory ``connect``/``serve`` for ``NetworkPeers`` (no sockets)."""

    def __init__(self) -> None:
        self.servers: dict[str, OnLink] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, host: str, port: int, on_link: OnLink) -> Listener:
        url = f"mem://{host}/{len(self.servers)}"
        self.servers[url] = on_link
        return Listener(self, url)

    async def connect(self, url: str) -> Link:
        on_link = self.servers.get(url)
        if on_link is None:
            raise OSError(f"nothing listens at {url}")
        mine, theirs = memory_link_pair()
        task = asyncio.ensure_future(on_link(theirs))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return mine

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()


class Listener:
    def __init__(self, hub: Hub, url: str) -> None:
        self.hub = hub
        self.url = url

    async def close(self) -> None:
        self.hub.servers.pop(self.url, None)


def node(hub: Hub, identity: Identity, *, roster: Roster = ROSTER, **kwargs: Any) -> NetworkPeers:
    return NetworkPeers(
        identity,
        roster,
        connect=hub.connect,
        serve=hub.serve,
        backoff=Backoff(base_s=0.01, cap_s=0.05),
        keepalive_s=1.0,
        down_after_s=10.0,
        rng=random.Random(0),
        **kwargs,
    )


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.002)


async def dial(hub: Hub, url: str, identity: Identity, peer: str) -> SecureChannel:
    """A hand-driven client channel: sends whatever a test crafts, signed or not."""
    return await client_channel(ProgressLink(await hub.connect(url)), identity, ROSTER, peer)


def signed_update(
    identity: Identity, recipient: str, seq: int, delta: dict[str, np.ndarray], **kw: Any
) -> Update:
    digest = update_digest_sent(delta, FP32)
    sig = sign_update(identity, identity.node_id, seq, 0, recipient, 10, digest)
    return Update(identity.node_id, seq, 0, delta, 10, sig=sig, **kw)


def signed_model(version: int, w: dict[str, np.ndarray], parent: int = 0) -> ModelBroadcast:
    sig = sign_model(ROOT, version, parent, digest_as_received(w, FP32))
    return ModelBroadcast(version, w, signer="root", parent=parent, sig=sig)


# ------------------------------------------------------- updates into an aggregator

DELTA = weights(1)


def forged() -> Update:
    # site-2's key signs an envelope that claims to come from site-1.
    data = update_signed_bytes("site-1", 1, 0, "root", 10, update_digest_sent(DELTA, FP32))
    return Update("site-1", 1, 0, DELTA, 10, sig=OTHER.sign(data))


def redirected() -> Update:
    return signed_update(SITE, "region", 1, DELTA)  # signed for another aggregator


def tampered() -> Update:
    good = signed_update(SITE, "root", 1, DELTA)
    return dataclasses.replace(good, delta={**DELTA, "b": np.ones(3, np.float32)})


def inflated() -> Update:
    return dataclasses.replace(signed_update(SITE, "root", 1, DELTA), n_examples=10_000)


def relayed() -> Update:
    return signed_update(OTHER, "root", 1, DELTA)  # valid, but site-1's channel carries it


def unsigned() -> Update:
    return Update("site-1", 1, 0, DELTA, 10)


@pytest.mark.parametrize(
    ("attack", "reason", "says"),
    [
        (forged, "bad_signature", "signature does not match 'site-1'"),
        (redirected, "bad_signature", "for 'root': signature does not match"),
        (tampered, "bad_signature", "forged, altered or redirected"),
        (inflated, "bad_signature", "forged, altered or redirected"),
        (relayed, "src_mismatch", "claims to come from 'site-2' but 'site-1' sent it"),
        (unsigned, "unsigned", "update 1 from 'site-1' is not signed"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
async def test_a_bad_update_is_refused_and_the_aggregator_lives_on(
    attack: Callable[[], Update], reason: str, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    hub, sink, metrics = Hub(), Sink(), []
    root = node(hub, ROOT, listen=("agg", 0), e2e=EndToEnd(ROOT, ROSTER, report=metrics.append))
    caplog.set_level(logging.WARNING)
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        running = tg.create_task(root.run(sink))
        await until(lambda: root.listen_url is not None)
        assert root.listen_url is not None
        channel = await dial(hub, root.listen_url, SITE, "root")
        await channel.send_tensors(attack())
        await until(lambda: sink.count(PeerDown("site-1")) == 1)
        assert sink.received() == []  # the node never saw it
        assert root.e2e.rejected == {reason: 1}
        assert metrics == [Metric("update_rejected", 1.0, {"reason": reason})]
        logged = [r.getMessage() for r in caplog.records if r.name == "fedloom.runtime.connection"]
        assert any(f"({reason})" in m and says in m for m in logged), logged
        # The daemon is alive: the site reconnects and a good update goes through.
        again = await dial(hub, root.listen_url, SITE, "root")
        good = signed_update(SITE, "root", 1, DELTA)
        await again.send_tensors(good)
        await until(lambda: len(sink.received()) == 1)
        got = sink.received()[0]
        assert isinstance(got, Update) and got.sig == good.sig
        assert not running.done()
        await again.close()
        await channel.close()
        running.cancel()
    hub.close()


# ------------------------------------------------------------ models into a site


class FakeParent:
    """A listener that authenticates as ``identity`` and hands each channel to the test."""

    def __init__(self, hub: Hub, identity: Identity) -> None:
        self.identity = identity
        self.channels: asyncio.Queue[SecureChannel] = asyncio.Queue()
        self.hub = hub

    async def listen(self) -> str:
        listener = await self.hub.serve("parent", 0, self._on_link)
        return listener.url

    async def _on_link(self, link: Link) -> None:
        channel = await server_channel(ProgressLink(link), self.identity, ROSTER)
        await self.channels.put(channel)


def by_region(version: int, w: dict[str, np.ndarray]) -> ModelBroadcast:
    sig = REGION.sign(model_signed_bytes(version, 4, digest_as_received(w, FP32)))
    return ModelBroadcast(version, w, signer="region", parent=4, sig=sig)


MODEL = weights(2)
NEWER = weights(3)
MODEL_ATTACKS: list[tuple[Callable[[], Message], str, str]] = [
    (lambda: by_region(5, MODEL), "bad_signature", "signed by 'region', a region, not a root"),
    (lambda: signed_model(3, MODEL), "stale_model", "version 3 is older than version 5"),
    (lambda: signed_model(5, NEWER), "model_conflict", "a second, different model"),
    (
        lambda: dataclasses.replace(signed_model(6, MODEL), weights=NEWER),
        "bad_signature",
        "model version 6 claimed to be from 'root': signature does not match",
    ),
    (
        lambda: dataclasses.replace(signed_model(6, MODEL), signer="site-2"),
        "bad_signature",
        "signed by 'site-2', a site, not a root",
    ),
    (lambda: ModelBroadcast(6, MODEL), "unsigned", "carries no root signature"),
    (
        lambda: TrainRequest(1, 6, MODEL),
        "unsigned",
        "training request of model version 6 from 'region' carries no root signature",
    ),
]


@pytest.mark.parametrize(
    ("attack", "reason", "says"),
    MODEL_ATTACKS,
    ids=[r + str(i) for i, (_, r, _) in enumerate(MODEL_ATTACKS)],
)
async def test_a_bad_model_is_refused_and_the_site_lives_on(
    attack: Callable[[], Message], reason: str, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    hub, sink, metrics = Hub(), Sink(), []
    parent = FakeParent(hub, REGION)  # a compromised region, relaying to the site
    url = await parent.listen()
    site = node(hub, SITE, dial=[DialTarget("region", url)])
    site.e2e.report = metrics.append
    caplog.set_level(logging.WARNING)
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        running = tg.create_task(site.run(sink))
        channel = await parent.channels.get()
        await channel.send_tensors(signed_model(5, MODEL))  # the root's model, relayed
        await until(lambda: len(sink.received()) == 1)
        await channel.send_tensors(attack())
        await until(lambda: sink.count(PeerDown("region")) == 1)
        assert len(sink.received()) == 1
        assert site.e2e.rejected == {reason: 1}
        assert metrics == [Metric("message_rejected", 1.0, {"reason": reason})]
        logged = [r.getMessage() for r in caplog.records if r.name == "fedloom.runtime.connection"]
        assert any(f"({reason})" in m and says in m for m in logged), logged
        # The site redials; the same model again and a newer one are accepted.
        again = await parent.channels.get()
        await again.send_tensors(signed_model(5, MODEL))
        request = TrainRequest(2, 6, NEWER, signer="root", parent=5)
        request = dataclasses.replace(
            request, sig=sign_model(ROOT, 6, 5, digest_as_received(NEWER, FP32))
        )
        await again.send_tensors(request)
        await until(lambda: len(sink.received()) == 3)
        assert [getattr(m, "version", None) for m in sink.received()] == [5, 5, 6]
        assert site.e2e.guard.current == 6
        assert not running.done()
        await again.close()
        await channel.close()
        running.cancel()
    hub.close()


# ------------------------------------------------- signing on the way out, relayed


async def test_root_region_site_sign_relay_and_verify_with_lossy_codecs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub()
    sinks = {n: Sink() for n in ("root", "region", "site-1")}
    # Lossy codecs both ways: signatures cover what each receiver decodes. fp16 twice
    # (root, then region) gives the same weights, so the root's proof still holds.
    root = node(hub, ROOT, listen=("root", 0), codecs=CodecPolicy(down=CodecSpec("fp16")))
    caplog.set_level(logging.WARNING)
    big = {"w": np.random.default_rng(4).standard_normal(300_000).astype(np.float32)}
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(root.run(sinks["root"]))]
        await until(lambda: root.listen_url is not None)
        assert root.listen_url is not None
        region = node(
            hub,
            REGION,
            listen=("region", 0),
            dial=[DialTarget("root", root.listen_url)],
            codecs=CodecPolicy(up=CodecSpec("topk", 0.1), down=CodecSpec("fp16")),
        )
        tasks.append(tg.create_task(region.run(sinks["region"])))
        await until(lambda: region.listen_url is not None)
        assert region.listen_url is not None
        site = node(
            hub,
            SITE,
            dial=[DialTarget("region", region.listen_url)],
            codecs=CodecPolicy(up=CodecSpec("int8")),
        )
        tasks.append(tg.create_task(site.run(sinks["site-1"])))
        await until(lambda: {"region", "site-1"} <= root.connected() | region.connected())

        # The root signs each version once, chaining parents (one model layout: the
        # region learns it from the first and refuses tensors of any other).
        assert root.send("region", ModelBroadcast(5, {"w": big["w"] / 2}))
        assert root.send("region", ModelBroadcast(6, big))
        await until(lambda: len(sinks["region"].received()) == 2)
        v5, v6 = sinks["region"].received()
        assert isinstance(v5, ModelBroadcast) and isinstance(v6, ModelBroadcast)
        assert (v5.signer, v5.parent, v6.signer, v6.parent) == ("root", 0, "root", 5)
        assert region.e2e.guard.current == 6

        # The region relays the root's proof to its site, on the weights it received.
        assert region.send("site-1", TrainRequest(1, 6, v6.weights))
        await until(lambda: len(sinks["site-1"].received()) == 1)
        req = sinks["site-1"].received()[0]
        assert isinstance(req, TrainRequest) and (req.signer, req.sig) == ("root", v6.sig)

        # Updates: the site signs its int8 delta (streamed), the region its aggregate.
        assert site.send("region", Update("site-1", 1, 6, big, 10))
        await until(lambda: len(sinks["region"].received()) == 3)
        assert region.send("root", Update("region", 1, 6, big, 10, count=1))
        await until(lambda: len(sinks["root"].received()) == 1)
        assert root.e2e.rejected == {} and region.e2e.rejected == {}

        # A model the region has no proof for goes out unsigned, with a warning; the
        # site refuses it.
        assert region.send("site-1", TrainRequest(2, 7, v6.weights))
        await until(lambda: site.e2e.rejected == {"unsigned": 1})
        assert any(
            "no root signature for model version 7" in r.getMessage() for r in caplog.records
        )
        for task in tasks:
            task.cancel()
    hub.close()


async def test_a_replayed_signed_update_is_applied_once() -> None:
    hub, agg_sink = Hub(), Sink()
    root = node(hub, ROOT, listen=("root", 0))
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(root.run(agg_sink))]
        await until(lambda: root.listen_url is not None)
        assert root.listen_url is not None
        site = node(hub, SITE, dial=[DialTarget("root", root.listen_url)])
        tasks.append(tg.create_task(site.run(Sink())))
        await until(lambda: "site-1" in root.connected())
        update = Update("site-1", 1, 0, DELTA, 10)
        assert site.send("root", update)
        assert site.send("root", update)  # a resend after a lost ack, or a replay
        await until(lambda: len(agg_sink.received()) == 2)
        for task in tasks:
            task.cancel()
    hub.close()
    first, second = agg_sink.received()
    assert isinstance(first, Update) and isinstance(second, Update)
    assert first.sig == second.sig and first.sig  # signed, and identical (Ed25519)
    agg = FedBuffAggregator(
        "root",
        {"site-1": "site"},
        {k: np.zeros_like(v) for k, v in DELTA.items()},
        buffer_size=5,
        concurrency=1,
    )
    effects = [
        e
        for e in (PeerUp("site-1"), *(Received("site-1", m) for m in (first, second)))
        for e in agg.handle(e, 0.0)
    ]
    assert (agg.applied, agg.duplicates) == (1, 1)
    acks = [e for e in effects if isinstance(e, Send) and isinstance(e.msg, Ack)]
    assert [a.msg for a in acks] == [Ack("site-1", 1), Ack("site-1", 1)]


async def test_an_unsignable_message_goes_out_unsigned_with_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    e2e = EndToEnd(SITE, ROSTER)
    bad = Update("site-1", 1, -1, DELTA, 10)  # a negative base version cannot be signed
    assert await e2e.seal(bad, "root", FP32) is bad
    assert "cannot sign a Update for root" in caplog.text
    other = Update("site-2", 1, 0, DELTA, 10)  # not ours to sign: left alone
    assert await e2e.seal(other, "root", FP32) is other


def test_signing_cannot_be_turned_off_or_borrowed() -> None:
    hub = Hub()
    peers = node(hub, SITE)
    assert isinstance(peers.e2e, EndToEnd) and peers.e2e.node_id == "site-1"
    with pytest.raises(ValueError, match="signs as 'site-2'"):
        node(hub, SITE, e2e=EndToEnd(OTHER, ROSTER))


# ------------------------------------------------------------------ properties

texts = st.text(max_size=12)
ints = st.integers(-(2**63), 2**64 - 1)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["update", "model", "request"]),
    sig=st.binary(max_size=256),
    signer=st.sampled_from(["root", "region", "site-1", ""]) | texts,
    number=ints,
    src=st.sampled_from(["site-1", "site-2"]) | texts,
)
def test_random_signature_fields_raise_only_protocol_errors(
    kind: str, sig: bytes, signer: str, number: int, src: str
) -> None:
    msg: Message
    if kind == "update":
        msg = Update(src, number, number, DELTA, number, sig=sig)
    elif kind == "model":
        msg = ModelBroadcast(number, MODEL, signer=signer, parent=number, sig=sig)
    else:
        msg = TrainRequest(1, number, MODEL, signer=signer, parent=number, sig=sig)
    e2e = EndToEnd(ROOT if kind == "update" else SITE, ROSTER)
    with pytest.raises(ProtocolError):
        asyncio.run(e2e.check(msg, "site-1"))
    assert sum(e2e.rejected.values()) == 1


async def test_a_restarted_region_relays_the_proof_its_node_kept() -> None:
    """No broadcast verified since the restart, but the node restored the root's proof
    with its model: the request goes out as the node made it, and the site accepts it."""
    w = weights(3)
    digest = digest_as_received(w, FP32)
    req = TrainRequest(1, 5, w, signer="root", parent=4, sig=sign_model(ROOT, 5, 4, digest))
    region = EndToEnd(REGION, ROSTER)
    sent = await region.seal(req, "site-1", FP32)
    assert sent is req and region.unsigned_sent == 0
    await EndToEnd(SITE, ROSTER).check(sent, "region")  # verifies against the root's key
    unsigned = await region.seal(dataclasses.replace(req, sig=b"", signer=""), "site-1", FP32)
    assert not unsigned.sig and region.unsigned_sent == 1  # nothing to relay: sent unsigned
