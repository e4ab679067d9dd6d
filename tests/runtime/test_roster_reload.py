"""Revocation without restarts: rosters installed into running daemons, bounded sessions.

The daemons run in process (``open_daemon`` + ``serve``) over real WebSockets and real
``SecureChannel`` handshakes on loopback; a SIGHUP is a real signal to this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from fedloom.algorithms.protocol import Metric
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.federation.store import StateStore
from fedloom.runtime import metrics as metrics_mod
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import Daemon, load_node, open_daemon, serve
from fedloom.runtime.federation_files import Federation, write_federation, write_roster
from fedloom.runtime.network_peers import MAX_PUSHED_ROSTER, NetworkPeers
from fedloom.runtime.roster_updates import ROSTER_SEEN_KEY
from fedloom.transport import wire, ws
from fedloom.transport.channel import Gatekeeper, SecureChannel, client_channel
from fedloom.transport.identity import Identity
from fedloom.transport.links import Link
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.wire import RosterUpdate

pytestmark = pytest.mark.timeout(60)

SYNTHETIC = {"dataset": "synthetic", "model": "softmax"}
FAST = {"keepalive_s": 1.0, "down_after_s": 5.0, "backoff_base_s": 0.05, "backoff_cap_s": 0.3}


def federation(tmp_path: Path, sites: list[str], **connection: float) -> Federation:
    return write_federation(
        tmp_path / "fed",
        {"region-a": sites},
        plan=SYNTHETIC,
        root_aggregation={"buffer_size": 1},
        region_aggregation={"buffer_size": 1, "concurrency": 4},
        connection={**FAST, **connection},
    )


def identities(fed: Federation, leave_out: Iterable[str] = ()) -> list[Identity]:
    out = set(leave_out)
    keys = fed.workdir / "keys"
    return [Identity.load(keys / f"{n}.key") for n in fed.nodes if n not in out]


def consortium(fed: Federation) -> Identity:
    return Identity.load(fed.workdir / "keys" / "consortium.key")


def publish(
    fed: Federation,
    version: int,
    leave_out: Iterable[str] = (),
    signer: Identity | None = None,
    extra: Iterable[Identity] = (),
) -> str:
    """Write roster ``version`` (without ``leave_out``, with ``extra``) to the roster file."""
    listed = [*identities(fed, leave_out), *extra]
    write_roster(fed.roster, listed, signer or consortium(fed), version=version)
    return fed.roster.read_text()


@dataclass
class Applied:
    """Every ``update_applied`` metric of every in-process daemon: (node, src, seq)."""

    seen: list[tuple[str, str, int]] = field(default_factory=list)

    def of(self, node: str, src: str) -> list[int]:
        return [q for n, s, q in self.seen if n == node and s == src]


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> Applied:
    record = Applied()

    class Recording(metrics_mod.MetricsSink):
        def __call__(self, metric: Metric) -> None:
            if metric.name == "update_applied":
                labels = dict(metric.labels or {})
                record.seen.append((self._node, labels["src"], int(labels["seq"])))
            super().__call__(metric)

    monkeypatch.setattr(metrics_mod, "MetricsSink", Recording)
    return record


@dataclass
class Rejected:
    """Every ``message_rejected`` metric of every in-process daemon: (node, reason)."""

    seen: list[tuple[str, str]] = field(default_factory=list)

    def count(self, node: str, reason: str) -> int:
        return self.seen.count((node, reason))


@pytest.fixture
def rejected(monkeypatch: pytest.MonkeyPatch) -> Rejected:
    record = Rejected()

    class Recording(metrics_mod.MetricsSink):
        def __call__(self, metric: Metric) -> None:
            if metric.name == "message_rejected":
                record.seen.append((self._node, dict(metric.labels or {})["reason"]))
            super().__call__(metric)

    monkeypatch.setattr(metrics_mod, "MetricsSink", Recording)
    return record


@dataclass
class Running:
    daemons: dict[str, Daemon]
    tasks: dict[str, asyncio.Task[None]]
    hangups: dict[str, asyncio.Event]

    def alive(self) -> bool:
        return not any(t.done() for t in self.tasks.values())


@contextlib.asynccontextmanager
async def running(
    fed: Federation, ids: list[str], signals_for: str | None = None
) -> AsyncIterator[Running]:
    """Serve ``ids`` in this event loop; ``signals_for`` gets the real signal handlers."""
    run = Running({}, {}, {})
    shutdowns: list[asyncio.Event] = []
    try:
        for node_id in ids:
            d = open_daemon(load_config(fed.nodes[node_id].config))
            run.daemons[node_id] = d
            shutdown, hangup = asyncio.Event(), asyncio.Event()
            shutdowns.append(shutdown)
            run.hangups[node_id] = hangup
            coro = serve(
                d,
                eval_interval_s=0,
                ready_wait_s=0.1,
                install_signals=node_id == signals_for,
                shutdown=shutdown,
                hangup=hangup,
            )
            run.tasks[node_id] = asyncio.create_task(coro, name=f"serve {node_id}")
        yield run
    finally:
        for shutdown in shutdowns:
            shutdown.set()
        if run.tasks:
            await asyncio.wait(run.tasks.values(), timeout=15)
        for d in run.daemons.values():
            d.close()


async def until(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := check()):
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


def logged(caplog: pytest.LogCaptureFixture, *parts: str) -> int:
    return sum(all(p in r.getMessage() for p in parts) for r in caplog.records)


# --------------------------------------------------------------------- revocation


async def test_a_revoked_site_is_cut_off_within_seconds_and_its_reconnect_refused(
    tmp_path: Path, applied: Applied, caplog: pytest.LogCaptureFixture
) -> None:
    """site-2 and site-3 hold open sessions to their region. A real SIGHUP makes the
    region read roster v2 without site-2; then the root alone is given v3, which lists
    site-3 under a new key (its old one was stolen), and pushes it down: it reaches the
    region (and site-1), two tiers below the root, which cuts the old key's session off.
    site-1 trains on throughout."""
    caplog.set_level(logging.INFO)
    fed = federation(tmp_path, ["site-1", "site-2", "site-3"])
    ids = ["root", "region-a", "site-1", "site-2", "site-3"]
    async with running(fed, ids, signals_for="region-a") as run:
        for site in ("site-1", "site-2", "site-3"):
            await until(f"an update of {site}", partial(applied.of, "region-a", site))

        publish(fed, 2, leave_out=["site-2"])
        os.kill(os.getpid(), signal.SIGHUP)  # only region-a handles it
        await until(
            "region-a to cut site-2 off",
            lambda: logged(caplog, "region-a: installed roster version 2", "site-2"),
        )
        await until(
            "site-2 to see its session end",
            lambda: logged(caplog, "site-2: connection to region-a ended"),
            timeout=5,
        )
        await until(
            "site-2's reconnect to be refused",
            lambda: logged(
                caplog, "region-a: refused a connection", "'site-2'", "roster version 2"
            ),
        )
        await until(
            "site-1 to get v2 from region-a", lambda: run.daemons["site-1"].roster.version == 2
        )
        assert run.daemons["root"].roster.version == 1  # rosters go down the tree, not up
        before = len(applied.of("region-a", "site-1"))
        site2 = len(applied.of("region-a", "site-2"))
        await until(
            "site-1 to keep training", lambda: len(applied.of("region-a", "site-1")) >= before + 2
        )
        assert len(applied.of("region-a", "site-2")) == site2

        rotated = Identity.generate("site-3", "site")
        publish(fed, 3, leave_out=["site-2", "site-3"], extra=[rotated])
        run.hangups["root"].set()
        await until(
            "v3 to reach region-a from the root and cut site-3 off",
            lambda: logged(
                caplog, "region-a: installed roster version 3 from root (pushed)", "site-3"
            ),
        )
        await until("site-1 to get v3", lambda: run.daemons["site-1"].roster.version == 3)
        await until(
            "site-3's reconnect with its old key to be refused",
            lambda: logged(
                caplog, "region-a: refused a connection", "roster version 3 lists another key"
            ),
        )
        before = len(applied.of("region-a", "site-1"))
        await until(
            "site-1 to keep training", lambda: len(applied.of("region-a", "site-1")) >= before + 2
        )
        assert run.alive()
        assert run.daemons["site-2"].roster.version == 1  # never told: it was cut off first

    # The installed roster is durable: with the file rolled back to v1 the region restarts
    # on v3 (the state directory keeps it), not on a roster that admits site-2 again.
    publish(fed, 1)
    with StateStore(fed.nodes["region-a"].state_dir) as store:
        assert store.load().values[ROSTER_SEEN_KEY]["version"] == 3
    d = open_daemon(load_config(fed.nodes["region-a"].config))
    try:
        assert d.roster.version == 3 and d.roster.lookup("site-2") is None
    finally:
        d.close()


# --------------------------------------------------------------- hostile rosters


async def serve_fake_parent(
    fed: Federation, port: int, channels: asyncio.Queue[SecureChannel]
) -> Any:
    """A parent speaking as region-a (its real key, so it is a rostered node) that hands
    each authenticated channel to the test and holds it open."""
    region = Identity.load(fed.workdir / "keys" / "region-a.key")
    gate = Gatekeeper(region, Roster.load(fed.roster, consortium(fed).public_key))
    hold = asyncio.Event()

    async def on_link(link: Link) -> None:
        channel = await gate.accept(link)
        await channels.put(channel)
        with contextlib.suppress(Exception):
            while True:  # read (and drop) what the site sends: keep-alives, Hello, ...
                await channel.recv_message()
        await hold.wait()

    return await ws.serve("127.0.0.1", port, on_link)


async def test_older_forged_or_broken_rosters_are_refused_and_the_daemon_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, rejected: Rejected
) -> None:
    """A (malicious) parent pushes, and the roster file holds, rosters signed by another
    consortium, unsigned, malformed, announced under a false version, or older than the
    one in use: each is refused (a metric each; pushed ones log a line per parent a
    minute, reloads a line each), the site keeps its roster and its session, and a
    genuine newer roster is still installed afterwards."""
    caplog.set_level(logging.INFO)
    fed = federation(tmp_path, ["site-1", "site-2"], down_after_s=60.0)  # a quiet parent
    v1 = fed.roster.read_text()
    other = Identity.generate("consortium", "consortium")
    forged = publish(fed, 5, signer=other)
    unsigned = Roster.loads_unsigned(v1).to_toml()
    publish(fed, 1)  # the file is v1 again

    channels: asyncio.Queue[SecureChannel] = asyncio.Queue()
    parent = await serve_fake_parent(fed, fed.nodes["region-a"].listen_port, channels)
    try:
        async with running(fed, ["site-1"]) as run:
            site = run.daemons["site-1"]
            channel = await asyncio.wait_for(channels.get(), 10)
            hostile = [
                RosterUpdate(9, v1),  # v1 claiming to be v9
                RosterUpdate(5, forged),
                RosterUpdate(6, unsigned),
                RosterUpdate(7, "version = [not toml"),
                RosterUpdate(2, "x" * 1000),
            ]
            for msg in hostile:
                await channel.send_message(wire.encode(msg))
            await until("five refusals", lambda: rejected.count("site-1", "roster_refused") == 5)
            assert logged(caplog, "site-1: refused a roster from region-a (pushed)") == 1
            assert logged(caplog, "announced as version 9 but it is version 1")
            assert site.roster.version == 1

            genuine = publish(fed, 2)
            await channel.send_message(wire.encode(RosterUpdate(2, genuine)))
            await until("the genuine v2 to be installed", lambda: site.roster.version == 2)
            await channel.send_message(wire.encode(RosterUpdate(1, v1)))  # older: ignored
            await channel.send_message(wire.encode(RosterUpdate(3, v1)))  # older, lying
            await until("the lie", lambda: rejected.count("site-1", "roster_refused") == 6)

            # The same through the file and a reload.
            for text in (forged, unsigned, "garbage", v1):
                fed.roster.write_text(text)
                run.hangups["site-1"].set()
                await until("the reload", lambda: not run.hangups["site-1"].is_set())
                await asyncio.sleep(0.2)
            await until(
                "four refused reloads",
                lambda: logged(caplog, f"site-1: refused a roster from {fed.roster}") == 4,
            )
            assert logged(caplog, "roster version 1 is older than version 2")
            assert site.roster.version == 2
            assert run.alive() and not channel.closed
            assert not logged(caplog, "site-1: connection to region-a ended")
    finally:
        await parent.close()


async def test_rosters_flow_down_only_and_a_child_that_connects_late_gets_the_newer_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A site that sends its region a (genuine, newer) roster is ignored: rosters come from
    parents. A site that connects announcing an older version is sent the region's roster,
    once per connection however often it asks (no amplification)."""
    caplog.set_level(logging.INFO)
    fed = federation(tmp_path, ["site-1", "site-2"])
    newer = publish(fed, 4, leave_out=["site-2"])
    publish(fed, 1)
    site = Identity.load(fed.workdir / "keys" / "site-1.key")
    roster = Roster.load(fed.roster, consortium(fed).public_key)
    url = fed.nodes["region-a"].url
    assert url is not None
    async with running(fed, ["region-a"]) as run:
        channel = await client_channel(await _connect(url), site, roster, "region-a")
        await channel.send_message(wire.encode(RosterUpdate(4, newer)))
        await until(
            "the push to be ignored", lambda: logged(caplog, "ignored a roster pushed by site-1")
        )
        assert run.daemons["region-a"].roster.version == 1 and run.alive()
        await channel.close()

        fed.roster.write_text(newer)
        run.hangups["region-a"].set()
        await until("region-a to install v4", lambda: run.daemons["region-a"].roster.version == 4)
        late = await client_channel(await _connect(url), site, roster, "region-a")
        for _ in range(3):  # "I hold version 1", three times
            await late.send_message(wire.encode(RosterUpdate(1)))
        got = await asyncio.wait_for(roster_updates(late, 1), 5)
        assert got == [RosterUpdate(4, newer)]
        with pytest.raises(TimeoutError):  # asked thrice, answered once
            await asyncio.wait_for(roster_updates(late, 1), 1.0)
        await late.close()


async def roster_updates(channel: SecureChannel, n: int) -> list[RosterUpdate]:
    """The next ``n`` roster updates on ``channel`` (skipping keep-alives and the like)."""
    out: list[RosterUpdate] = []
    while len(out) < n:
        msg = await channel.recv_tensors()
        if isinstance(msg, RosterUpdate):
            out.append(msg)
    return out


async def _connect(url: str) -> Link:
    for _ in range(100):
        try:
            return await ws.connect(url)
        except OSError:
            await asyncio.sleep(0.05)
    return await ws.connect(url)


# ------------------------------------------------------------------- max lifetime


async def test_sessions_past_max_session_s_are_reestablished_without_losing_or_repeating_updates(
    tmp_path: Path, applied: Applied, caplog: pytest.LogCaptureFixture
) -> None:
    """With ``max_session_s = 0.5`` every session ends (between messages) and the dialler
    reconnects with a fresh handshake, many times while updates flow: every update is
    recorded by the region or still pending at its site, and none is applied twice."""
    caplog.set_level(logging.INFO)
    fed = federation(tmp_path, ["site-1", "site-2"], max_session_s=0.5)
    async with running(fed, ["root", "region-a", "site-1", "site-2"]) as run:
        await until(
            "three session expiries and reconnects of site-1",
            lambda: logged(caplog, "site-1: connected to region-a") >= 4,
        )
        before = len(applied.of("region-a", "site-1"))
        await until(
            "more updates of site-1", lambda: len(applied.of("region-a", "site-1")) >= before + 2
        )
        assert logged(caplog, "session reached its maximum lifetime")
        assert run.alive()

    for src in ("site-1", "site-2"):
        node = load_node(load_config(fed.nodes[src].config))
        assert isinstance(node, SiteNode)
        region = load_node(load_config(fed.nodes["region-a"].config))
        assert isinstance(region, RegionalAggregator)
        recorded = {s for s in range(1, node.seq + 1) if region._ledger.seen(src, s)}
        pending = {u.seq for u in node._outbox.pending()}
        assert recorded | pending == set(range(1, node.seq + 1)), (src, recorded, pending)
        seqs = applied.of("region-a", src)
        assert len(seqs) == len(set(seqs)), f"an update of {src} was applied twice: {seqs}"
        assert set(seqs) == recorded


def test_a_roster_too_large_for_a_child_to_decode_is_not_pushed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A push that a child would refuse as too large would cost it its parent link on
    every reconnect: such a roster is not pushed (and the log says to reload it)."""
    me = Identity.generate("region-a", "region")
    roster = Roster(1, [RosterEntry("region-a", "region", me.public_key)])
    peers = NetworkPeers(me, roster, roster_text="x" * (MAX_PUSHED_ROSTER + 1))
    assert peers.roster_text == "" and "reload it on every node" in caplog.text
    peers.set_roster(roster, "y" * MAX_PUSHED_ROSTER)
    assert peers.roster_text == "y" * MAX_PUSHED_ROSTER
