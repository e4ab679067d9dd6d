"""Every link of a daemon decodes under limits derived from its model, and tensors of
another shape are refused before they are hashed (issue 10, item 6). The attacks are
the review's: an lz4 int8 bomb, a ~200-byte top-k update with k = 0 that decodes to
2 GiB, and signed updates or models of another layout; each is sent by an authenticated
peer through the real channel, connection and end-to-end checks."""

from __future__ import annotations

import asyncio
import logging
import tomllib
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lz4.frame
import numpy as np
import pytest
import tomli_w

from fedloom.algorithms.protocol import PeerDown, PeerUp
from fedloom.federation.config_reader import ConfigError
from fedloom.runtime import signing as signing_mod
from fedloom.runtime.config import load_config
from fedloom.runtime.connection import ChannelPipe, ProgressLink
from fedloom.runtime.daemon import build_peers, load_roster, open_daemon, serve
from fedloom.runtime.federation_files import ROOT_ID, write_federation, write_roster
from fedloom.runtime.network_peers import DialTarget, NetworkPeers
from fedloom.runtime.signing import EndToEnd
from fedloom.transport import wire, ws
from fedloom.transport.channel import SecureChannel, client_channel
from fedloom.transport.e2e import sign_update, update_digest_sent
from fedloom.transport.errors import ProtocolError
from fedloom.transport.identity import Identity
from fedloom.transport.limits import Limits, MiB, ModelLayout
from fedloom.transport.links import LinkClosed
from fedloom.transport.wire import Ack, Update
from tests.runtime.test_daemon import SYNTHETIC, listening
from tests.runtime.test_signatures import (
    FP32,
    LIMIT,
    OTHER,
    REGION,
    ROOT,
    ROSTER,
    SITE,
    FakeParent,
    Hub,
    Sink,
    dial,
    node,
    signed_model,
    signed_update,
    until,
)
from tests.transport.test_limits import lz4_int8_bomb, topk_bomb, update_bytes

MODEL = {"w": np.zeros(1000, np.float32), "b": np.zeros(3, np.float32)}
LAYOUT = ModelLayout.of(MODEL)
CAP = Limits.for_model(LAYOUT).max_decoded_bytes
GOOD = {"w": np.full(1000, 0.5, np.float32), "b": np.ones(3, np.float32)}


class Hashes:
    """Counts digests the receiving side computes (``runtime.signing``'s hashes: a model's
    ``tensors_digest``, an update's ``update_digest``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for name in ("tensors_digest", "update_digest"):
            monkeypatch.setattr(signing_mod, name, self._spy(getattr(signing_mod, name)))

    def _spy(self, real: Any) -> Any:
        def spy(tensors: Any) -> bytes:
            self.calls += 1
            digest: bytes = real(tensors)
            return digest

        return spy


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of Python and numpy allocations inside the block (in ``[0]`` after it)."""
    out = [0]
    tracemalloc.start()
    try:
        yield out
        out[0] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def wide(elements: int, src: str = "site-1") -> bytes:
    """An update of one float32 tensor of zeros of ``elements`` (lz4: tiny on the wire)."""
    entry = {"name": "w", "codec": "raw", "dtype": "float32", "shape": [elements]}
    payload = lz4.frame.compress(bytes(4 * elements), store_size=False)
    return update_bytes({"m": {"lz4": True, "tensors": [entry]}, "p": payload}, src)


def signed(delta: dict[str, np.ndarray]) -> bytes:
    """A correctly signed update of ``delta`` from site-1 to the root, as wire bytes."""
    return wire.encode(signed_update(SITE, "root", 1, delta))


ATTACKS: dict[str, tuple[Callable[[], bytes], str]] = {
    "lz4_int8": (lz4_int8_bomb, "decompression_bomb"),
    "topk_k0": (topk_bomb, "decompression_bomb"),
    "just_above_the_model": (lambda: wide(CAP // 4 + 1), "decompression_bomb"),
    "other_shape": (lambda: signed({**GOOD, "b": np.ones(4, np.float32)}), "layout"),
    "other_names": (lambda: signed({"w": GOOD["w"], "c": GOOD["b"]}), "layout"),
    "int_dtype": (lambda: signed({**GOOD, "w": np.ones(1000, np.int32)}), "layout"),
    "model_sized_other_shape": (lambda: wide(CAP // 4 - 1024), "layout"),
}


def root_peers(hub: Hub) -> NetworkPeers:
    root = node(hub, ROOT, listen=("agg", 0))
    root.e2e.set_layout(LAYOUT)  # what the daemon does at start (``runtime.daemon``)
    return root


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_hostile_update_is_refused_before_allocation_or_hashing(
    attack: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    make, reason = ATTACKS[attack]
    data = make()
    hub, sink = Hub(), Sink()
    root = root_peers(hub)
    hashes = Hashes(monkeypatch)
    caplog.set_level(logging.WARNING)
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        running = tg.create_task(root.run(sink))
        await until(lambda: root.listen_url is not None)
        assert root.listen_url is not None
        channel = await dial(hub, root.listen_url, SITE, "root")
        await until(lambda: sink.count(PeerUp("site-1")) == 1)
        with peak_memory() as peak:
            await channel.send_message(data)
            await until(lambda: sink.count(PeerDown("site-1")) == 1)
        assert sink.received() == []  # the node never saw it
        assert hashes.calls == 0  # nothing was hashed
        # The receiver held at most the message and two model sizes (lz4 decompresses
        # into a buffer, then copies it out).
        assert peak[0] < len(data) + 2 * CAP + MiB, peak[0]
        logged = [r.getMessage() for r in caplog.records if r.name == "fedloom.runtime.connection"]
        assert any(f"({reason})" in m for m in logged), logged
        # The root is alive: the site reconnects and its update goes through.
        again = await dial(hub, root.listen_url, SITE, "root")
        good = signed_update(SITE, "root", 1, GOOD)
        await again.send_tensors(good)
        await until(lambda: len(sink.received()) == 1)
        got = sink.received()[0]
        assert isinstance(got, Update) and got.sig == good.sig
        assert hashes.calls == 1
        assert not running.done()
        await again.close()
        await channel.close()
        running.cancel()
    hub.close()


async def test_memory_per_child_link_stays_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Three authenticated children send, at once and again after each refusal, the
    largest message the model's limits let through, of another shape: the root holds at
    most a few model sizes per link, and never hashes any of it."""
    # Captured log records would keep each refusal (and the frames behind it) alive.
    caplog.set_level(logging.ERROR, logger="fedloom.runtime.connection")
    hub, sink = Hub(), Sink()
    root = root_peers(hub)
    hashes = Hashes(monkeypatch)
    rounds = 3
    sent = {i.node_id: wide(CAP // 4 - 1024, i.node_id) for i in (SITE, OTHER, REGION)}

    async def attacker(identity: Identity) -> None:
        assert root.listen_url is not None
        data = sent[identity.node_id]
        for _ in range(rounds):
            channel = await dial(hub, root.listen_url, identity, "root")
            await channel.send_message(data)
            with pytest.raises((LinkClosed, ProtocolError)):
                await channel.recv_tensors()  # the root closes the link
            await channel.close()

    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        running = tg.create_task(root.run(sink))
        await until(lambda: root.listen_url is not None)
        with peak_memory() as peak:
            async with asyncio.TaskGroup() as attackers:
                for identity in (SITE, OTHER, REGION):
                    attackers.create_task(attacker(identity))
        assert root.e2e.rejected == {"layout": 3 * rounds}
        assert hashes.calls == 0 and sink.received() == []
        assert peak[0] < 3 * 3 * CAP + MiB, peak[0]
        assert not running.done()
        running.cancel()
    hub.close()


async def test_a_region_takes_its_limits_from_the_first_verified_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A region has no plan: its children's links decode under ``Limits.before_model``
    and its parent's under the defaults until the root's model arrives, then every link
    (the site's, already open, included) under the model's."""
    hub, sink = Hub(), Sink()
    parent = FakeParent(hub, ROOT)
    url = await parent.listen()
    region = node(hub, REGION, listen=("region", 0), dial=[DialTarget("root", url)])
    region.inbound_before_model = Limits.before_model()  # what the daemon sets for a region
    hashes = Hashes(monkeypatch)
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        running = tg.create_task(region.run(sink))
        up = await parent.channels.get()
        await until(lambda: region.listen_url is not None)
        assert region.listen_url is not None
        site = await dial(hub, region.listen_url, SITE, "region")
        await until(lambda: sink.count(PeerUp("site-1")) == 1)
        assert region.e2e.layout is None and region.limits is None
        site_conn = region.table.get("site-1")
        assert site_conn is not None and isinstance(site_conn.pipe, ChannelPipe)
        assert site_conn.pipe.limits == Limits.before_model()
        await up.send_tensors(signed_model(1, MODEL))
        await until(lambda: len(sink.received()) == 1)
        assert region.e2e.layout == LAYOUT
        assert region.limits == Limits.for_model(LAYOUT)
        site_conn = region.table.get("site-1")  # the same link, under the model's caps now
        assert site_conn is not None and isinstance(site_conn.pipe, ChannelPipe)
        assert site_conn.pipe.limits == region.limits
        # The open site link now refuses the top-k bomb from its manifest.
        await site.send_message(topk_bomb())
        await until(lambda: sink.count(PeerDown("site-1")) == 1)
        # A root-signed model of another layout is refused before it is hashed.
        hashed = hashes.calls
        other = {"w": np.zeros(999, np.float32), "b": np.zeros(3, np.float32)}
        await up.send_tensors(signed_model(2, other))
        await until(lambda: region.e2e.rejected == {"layout": 1})
        assert hashes.calls == hashed
        assert len(sink.received()) == 1
        assert not running.done()
        await site.close()
        await up.close()
        running.cancel()
    hub.close()


async def test_a_fresh_region_takes_nothing_model_sized_from_its_children() -> None:
    """Before its first model a region (no plan) caps what the peers dialling it send at
    ``Limits.before_model``: a child's model-sized update ends that link before it is
    decoded or held, the region lives on, and the site is served once the model came."""
    hub, sink = Hub(), Sink()
    parent = FakeParent(hub, ROOT)
    url = await parent.listen()
    region = node(hub, REGION, listen=("region", 0), dial=[DialTarget("root", url)])
    region.inbound_before_model = Limits.before_model()  # what the daemon sets for a region
    big = wide(Limits.before_model().max_decoded_bytes // 4 + 1)  # lz4: a few KiB on the wire
    async with asyncio.timeout(LIMIT), asyncio.TaskGroup() as tg:
        running = tg.create_task(region.run(sink))
        up = await parent.channels.get()
        await until(lambda: region.listen_url is not None)
        assert region.listen_url is not None
        site = await dial(hub, region.listen_url, SITE, "region")
        await until(lambda: sink.count(PeerUp("site-1")) == 1)
        await site.send_message(big)
        await until(lambda: sink.count(PeerDown("site-1")) == 1)
        assert sink.received() == [] and not running.done()
        await up.send_tensors(signed_model(1, MODEL))
        await until(lambda: len(sink.received()) == 1)
        again = await dial(hub, region.listen_url, SITE, "region")
        await until(lambda: sink.count(PeerUp("site-1")) == 2)
        conn = region.table.get("site-1")
        assert conn is not None and isinstance(conn.pipe, ChannelPipe)
        assert conn.pipe.limits == Limits.for_model(LAYOUT)
        await again.send_message(wire.encode(signed_update(SITE, "region", 1, GOOD)))
        await until(lambda: len(sink.received()) == 2)
        await again.close()
        await site.close()
        await up.close()
        running.cancel()
    hub.close()


# ------------------------------------------------------------------ real daemons


@pytest.fixture
def fed(tmp_path: Path) -> Any:
    return write_federation(
        tmp_path / "fed",
        {"region-a": ["site-1"]},
        plan=SYNTHETIC,
        region_aggregation={"buffer_size": 2, "concurrency": 1},
    )


def test_each_daemon_knows_its_limits_at_start(fed: Any) -> None:
    """The root from its model, a site from its plan's template; a fresh region (no
    plan) learns them from its first verified model (see the test above)."""
    for node_id in (ROOT_ID, "site-1", "region-a"):
        d = open_daemon(load_config(fed.nodes[node_id].config))
        try:
            peers = build_peers(d)
            if node_id == "region-a":
                assert peers.limits is None and peers.e2e.layout is None
                assert peers.inbound_before_model == Limits.before_model()
                continue
            assert peers.inbound_before_model is None
            assert d.plan is not None
            layout = ModelLayout.of(d.plan.init(d.cfg.seed))
            assert peers.e2e.layout == layout
            assert peers.limits == Limits.for_model(layout)
            assert peers.limits.max_decoded_bytes < 2 * MiB  # a small model
        finally:
            d.close()


async def next_ack(channel: SecureChannel) -> Ack:
    while True:
        msg = await channel.recv_tensors()
        if isinstance(msg, Ack):
            return msg


@pytest.mark.timeout(60)
async def test_a_running_root_refuses_bombs_and_acks_what_follows(
    fed: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real root daemon (WebSocket, channel, driver): its region sends the top-k and
    lz4 bombs and a signed update of another shape; each ends only that connection,
    unhashed, and an update sent afterwards is acknowledged."""
    hashes = Hashes(monkeypatch)
    cfg = load_config(fed.nodes[ROOT_ID].config)
    d = open_daemon(cfg)
    region_cfg = load_config(fed.nodes["region-a"].config)
    me = Identity.load(region_cfg.identity_key)
    roster = load_roster(region_cfg, me)
    model = d.node.current_model()  # type: ignore[attr-defined]
    delta = {k: np.full(v.shape, 0.01, np.float32) for k, v in model[1].items()}
    url = fed.nodes[ROOT_ID].url
    shutdown = asyncio.Event()

    async def connect() -> SecureChannel:
        link = ProgressLink(await ws.connect(url))
        return await client_channel(link, me, roster, ROOT_ID)

    def update(seq: int, tensors: dict[str, np.ndarray]) -> Update:
        digest = update_digest_sent(tensors, FP32)
        sig = sign_update(me, "region-a", seq, 0, ROOT_ID, 10, digest)
        return Update("region-a", seq, 0, tensors, 10, sig=sig)

    wrong = update(1, {**delta, "extra": np.zeros(2, np.float32)})
    try:
        task = asyncio.create_task(serve(d, install_signals=False, shutdown=shutdown))
        await listening(fed.nodes[ROOT_ID].listen_port)
        for attack in (topk_bomb(), lz4_int8_bomb()):
            channel = await connect()
            await channel.send_message(attack)
            with pytest.raises((LinkClosed, ProtocolError)):
                await next_ack(channel)  # the root ends this connection
            await channel.close()
        channel = await connect()
        await channel.send_tensors(wrong)
        with pytest.raises((LinkClosed, ProtocolError)):
            await next_ack(channel)
        await channel.close()
        assert hashes.calls == 0
        # The daemon lives on and acknowledges a good update.
        channel = await connect()
        await channel.send_tensors(update(1, delta))
        async with asyncio.timeout(20):
            assert await next_ack(channel) == Ack("region-a", 1)
        assert hashes.calls == 1
        await channel.close()
        assert not task.done()
        shutdown.set()
        await asyncio.wait_for(task, 15)
    finally:
        d.close()


@pytest.mark.parametrize(("mib", "cap"), [(None, 256 * MiB), (1.5, 3 * MiB // 2)])
def test_a_relay_caps_envelopes_at_its_configured_size(
    tmp_path: Path, mib: float | None, cap: int
) -> None:
    """A relay holds no model: its links decode under ``[connection] max_message_mib``
    (256 MiB unless set), never under the decoders' 2 GiB ceiling."""
    relay, peer = Identity.generate("relay", "relay"), Identity.generate("peer-a", "peer")
    consortium = Identity.generate("consortium", "consortium")
    write_roster(tmp_path / "roster.toml", [relay, peer], consortium)
    (tmp_path / "consortium.pub").write_text(consortium.public_line() + "\n")
    relay.save(tmp_path / "keys")
    raw: dict[str, Any] = {
        "role": "relay",
        "node_id": "relay",
        "state_dir": str(tmp_path / "state"),
        "identity": {"key": str(tmp_path / "keys" / "relay.key")},
        "roster": {
            "path": str(tmp_path / "roster.toml"),
            "consortium_key_file": str(tmp_path / "consortium.pub"),
        },
        "listen": {"host": "127.0.0.1", "port": 0},
    }
    if mib is not None:
        raw["connection"] = {"max_message_mib": mib}
    (tmp_path / "relay.toml").write_text(tomli_w.dumps(raw))
    d = open_daemon(load_config(tmp_path / "relay.toml"))
    try:
        peers = build_peers(d)
        assert peers.limits is not None and peers.e2e.layout is None
        assert peers.limits.max_message_bytes == peers.limits.max_decoded_bytes == cap
    finally:
        d.close()


def test_only_a_relay_takes_max_message_mib(fed: Any) -> None:
    path = fed.nodes["site-1"].config
    raw = tomllib.loads(path.read_text())
    raw["connection"]["max_message_mib"] = 64
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError, match="only a relay takes it"):
        load_config(path)


def test_peers_built_with_a_layout_already_known_take_its_limits() -> None:
    # A caller may set the layout before it builds the peer set (a harness does);
    # __init__ applied it before its connection table existed and failed.
    e2e = EndToEnd(ROOT, ROSTER)
    e2e.set_layout(LAYOUT)
    peers = node(Hub(), ROOT, e2e=e2e)
    assert peers.limits is not None and peers.limits.max_decoded_bytes == CAP
