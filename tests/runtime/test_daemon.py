"""``fedloom run``: nodes built from configs, recovery, start-up mistakes, systemd notify."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import time
import types
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.gossip import GossipPeer
from fedloom.algorithms.protocol import Metric, Persist, Received
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import PENDING_KEY, SiteNode
from fedloom.cli import main
from fedloom.federation.config_reader import ConfigError
from fedloom.runtime import serve as serve_mod
from fedloom.runtime import systemd as systemd_mod
from fedloom.runtime.config import DaemonConfig, load_config, parse_config
from fedloom.runtime.daemon import (
    Daemon,
    JsonFormatter,
    build_node,
    build_peers,
    build_plan,
    configure_logging,
    load_identity,
    load_node,
    load_roster,
    model_floor,
    open_daemon,
    report_refusals,
    serve,
)
from fedloom.runtime.exit_status import EXIT_FAILED
from fedloom.runtime.federation_files import ROOT_ID, Federation, write_federation, write_roster
from fedloom.runtime.harness import DaemonProcess
from fedloom.runtime.metrics import MetricsSink
from fedloom.transport.channel import GateLimits
from fedloom.transport.e2e import ModelVersionGuard, StaleModelError
from fedloom.transport.identity import Identity
from fedloom.transport.records import CIPHER_SECRETSTREAM
from fedloom.transport.wire import GossipShare, Update

SYNTHETIC = {"dataset": "synthetic", "model": "softmax"}


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return write_federation(
        tmp_path / "fed",
        {"region-a": ["site-1", "site-2"]},
        plan=SYNTHETIC,
        region_aggregation={"buffer_size": 2, "concurrency": 1},
    )


def built(fed: Federation, node_id: str) -> object:
    cfg = load_config(fed.nodes[node_id].config)
    roster = load_roster(cfg, load_identity(cfg))
    return build_node(cfg, roster, build_plan(cfg))


def test_each_role_becomes_its_node(fed: Federation) -> None:
    root = built(fed, ROOT_ID)
    assert isinstance(root, FedBuffAggregator)
    assert dict(root.children) == {"region-a": "region"}  # roles come from the roster
    region = built(fed, "region-a")
    assert isinstance(region, RegionalAggregator)
    assert region.parent == ROOT_ID and region.buffer_size == 2
    assert dict(region.children) == {"site-1": "site", "site-2": "site"}
    site = built(fed, "site-1")
    assert isinstance(site, SiteNode) and site.parent == "region-a"
    assert site.n_examples > 0


def test_a_gossip_peer_mixes_uniformly_without_weights(fed: Federation, tmp_path: Path) -> None:
    cfg = fed.config("site-1")
    cfg.pop("parent")
    cfg.update(role="peer", node_id="site-1", peers=[{"id": "site-2", "url": "ws://127.0.0.1:9/x"}])
    cfg["aggregation"] = {"algorithm": "gossip", "gossip_mode": "pushsum"}
    parsed = parse_config(cfg, check_files=True)
    ident = Identity.load(parsed.identity_key)
    # The roster lists site-1/site-2 as sites: a peer config must be refused for that.
    with pytest.raises(ConfigError, match="roster lists 'site-1' as a site"):
        load_roster(parsed, ident)
    peer_ids = [Identity.generate(n, "peer") for n in ("p-1", "p-2", "p-3")]
    consortium = Identity.generate("consortium", "consortium")
    write_roster(tmp_path / "peers.toml", peer_ids, consortium)
    peer_ids[0].save(tmp_path / "keys")
    (tmp_path / "c.pub").write_text(consortium.public_line())
    cfg.update(node_id="p-1", peers=[{"id": "p-2"}, {"id": "p-3", "url": "ws://127.0.0.1:9/x"}])
    cfg["identity"] = {"key": str(tmp_path / "keys" / "p-1.key")}
    cfg["roster"] = {
        "path": str(tmp_path / "peers.toml"),
        "consortium_key_file": str(tmp_path / "c.pub"),
    }
    cfg["listen"] = {"port": 0}  # p-2 has no url: it dials p-1
    parsed = parse_config(cfg, check_files=True)
    node = build_node(parsed, load_roster(parsed, load_identity(parsed)), build_plan(parsed))
    assert isinstance(node, GossipPeer)
    # Neighbours are bounded by default: a share may weigh at most the roster's 3 peers.
    _, model = node.current_model()
    heavy = Received("p-2", GossipShare("p-2", 1, model, 3.5))
    rejected = [e for e in node.handle(heavy, 0.0) if isinstance(e, Metric)]
    assert [m.labels for m in rejected] == [{"reason": "share weight over bound"}]
    assert node.clip_radius() is not None
    cfg["aggregation"].update(gossip_clip=0.5, gossip_max_share_weight="off")
    parsed = parse_config(cfg, check_files=True)
    node = build_node(parsed, load_roster(parsed, load_identity(parsed)), build_plan(parsed))
    assert isinstance(node, GossipPeer) and node.clip_radius() == 0.5
    assert not [e for e in node.handle(heavy, 0.0) if isinstance(e, Metric)]


def test_a_restarted_site_refuses_models_older_than_it_held(fed: Federation) -> None:
    cfg = load_config(fed.nodes["site-1"].config)
    d = open_daemon(cfg)
    try:
        assert model_floor(d.node) is None  # a fresh site has held no model
        state = {"outbox": {"seq": 4, "pending": []}, "model": None, "newest_version": 7}
        d.store.apply(Persist("checkpoint", state))
    finally:
        d.close()
    site = load_node(cfg)
    assert model_floor(site) == 7  # serve() seeds the signature guard with it
    guard = ModelVersionGuard(model_floor(site))
    with pytest.raises(StaleModelError, match="older than version 7"):
        guard.check(6, b"d" * 32)
    guard.check(7, b"d" * 32)


def test_the_configured_record_settings_reach_the_channels(fed: Federation) -> None:
    cfg = load_config(fed.nodes["site-1"].config)
    pinned = dataclasses.replace(
        cfg,
        connection=dataclasses.replace(
            cfg.connection,
            ciphers=(CIPHER_SECRETSTREAM,),
            offload="pool",
            handshake_timeout_s=2.5,
            max_pending=64,
        ),
    )
    for config, ciphers, offload, gate in (
        (cfg, None, "auto", GateLimits()),
        (pinned, (CIPHER_SECRETSTREAM,), "pool", GateLimits(64, handshake_timeout=2.5)),
    ):
        d = open_daemon(config)
        try:
            peers = build_peers(d)
            assert (peers.options.ciphers, peers.options.offload) == (ciphers, offload)
            assert peers.gate.limits == gate  # admission before authentication
        finally:
            d.close()


def test_refused_connections_are_counted_in_the_metrics(fed: Federation) -> None:
    d = open_daemon(load_config(fed.nodes["root"].config))
    try:
        peers = build_peers(d)
        sink = MetricsSink()
        seen = report_refusals(peers, sink, Counter())
        assert seen == Counter()
        peers.gate.refused.update({"busy_address": 3, "handshake_timeout": 1})
        peers.listener = types.SimpleNamespace(refused_connections=2, url=None)  # type: ignore[assignment]
        seen = report_refusals(peers, sink, seen)
        peers.gate.refused.update({"busy_address": 2})
        seen = report_refusals(peers, sink, seen)
        assert seen == Counter(busy_address=5, handshake_timeout=1, connection_cap=2)

        def refused(reason: str) -> float | None:
            return sink.value("fedloom_connections_refused_total", {"reason": reason})

        assert (refused("busy_address"), refused("handshake_timeout")) == (5, 1)
        assert refused("connection_cap") == 2
    finally:
        d.close()


def test_recovery_restores_an_unacknowledged_update(fed: Federation) -> None:
    cfg = load_config(fed.nodes["site-1"].config)
    d = open_daemon(cfg)
    try:
        assert d.recovery.checkpoint is None  # a fresh start
        update = Update("site-1", 1, 0, {"w": np.ones(3, np.float32)}, n_examples=5)
        d.store.apply(Persist(PENDING_KEY, {"op": "add", "seq": 1, "update": update}, append=True))
    finally:
        d.close()
    site = load_node(cfg)
    assert isinstance(site, SiteNode)
    assert (site.seq, site.pending) == (1, 1)
    # A restart compacts: the restored state becomes the checkpoint, the log starts empty.
    d = open_daemon(cfg)
    try:
        assert d.recovery.checkpoint is not None
        assert isinstance(d.node, SiteNode) and d.node.pending == 1
    finally:
        d.close()
    d = open_daemon(cfg)
    try:
        assert d.recovery.records(PENDING_KEY) == []
        assert isinstance(d.node, SiteNode) and d.node.pending == 1
    finally:
        d.close()


# ------------------------------------------------------------------- start-up mistakes


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "config file not found" in one_line(capsys)


def test_a_plan_the_factory_refuses_is_a_config_error_naming_the_file(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Synchronous rounds over region children: the factory's ValueError, which reached
    # the daemon as a traceback (exit 1, so systemd restarted it for ever), is a
    # configuration error (exit 2, one line naming the file).
    cfg = fed.config(ROOT_ID)
    cfg["aggregation"]["algorithm"] = "fedavg"
    path = tmp_path / "root.toml"
    path.write_text(tomli_w.dumps(cfg))
    assert main(["run", "--config", str(path)]) == 2
    err = one_line(capsys)
    assert str(path) in err and "synchronous rounds need site children" in err


def test_a_key_the_roster_does_not_list_is_refused_at_start(
    fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = Identity.generate("site-1", "site")
    other.save(tmp_path / "other")
    cfg = fed.config("site-1")
    cfg["identity"] = {"key": str(tmp_path / "other" / "site-1.key")}
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps(cfg))
    assert main(["run", "--config", str(path)]) == 2
    err = one_line(capsys)
    assert "identity.key" in err and "another public key" in err and other.public_line() in err


def test_a_roster_older_than_one_already_used_is_refused(fed: Federation, tmp_path: Path) -> None:
    nodes = [Identity.load(fed.config(n)["identity"]["key"]) for n in fed.nodes]
    consortium = Identity.generate("consortium", "consortium")
    (tmp_path / "c.pub").write_text(consortium.public_line() + "\n")
    cfg = fed.config("site-1")

    def with_roster(version: int, extra: list[Identity]) -> DaemonConfig:
        path = tmp_path / f"roster-{version}-{len(extra)}.toml"
        write_roster(path, nodes + extra, consortium, version=version)
        cfg["roster"] = {"path": str(path), "consortium_key_file": str(tmp_path / "c.pub")}
        (tmp_path / "site.toml").write_text(tomli_w.dumps(cfg))
        return load_config(tmp_path / "site.toml")

    open_daemon(with_roster(2, [])).close()  # version 2 is now remembered
    with pytest.raises(ConfigError, match="roster version 1 is older than version 2"):
        open_daemon(with_roster(1, []))
    intruder = [Identity.generate("site-9", "site")]
    with pytest.raises(ConfigError, match="same version, other content"):
        open_daemon(with_roster(2, intruder))
    open_daemon(with_roster(2, [])).close()  # the same roster again
    open_daemon(with_roster(3, intruder)).close()  # a newer one, and then the old is refused
    with pytest.raises(ConfigError, match="older than version 3"):
        open_daemon(with_roster(2, []))


def test_a_second_daemon_on_one_state_dir_is_refused(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(fed.nodes["site-2"].config)
    d = open_daemon(cfg)
    try:
        # Restartable (1), not a configuration error (2): the holder may be on its way out.
        assert main(["run", "--config", str(fed.nodes["site-2"].config)]) == EXIT_FAILED
        assert "already running" in one_line(capsys)
    finally:
        d.close()


def test_log_levels_and_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="unknown level"):
        configure_logging(["loud"])
    record = logging.LogRecord("fedloom.x", logging.INFO, "f", 1, "hello %s", ("you",), None)
    record.peer = "site-1"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "hello you" and line["peer"] == "site-1" and line["level"] == "info"
    configure_logging(["warning", "fedloom.daemon=debug"], "text")
    try:
        assert logging.getLogger().level == logging.WARNING
        assert logging.getLogger("fedloom.daemon").level == logging.DEBUG
    finally:
        logging.getLogger("fedloom.daemon").setLevel(logging.NOTSET)
        configure_logging(["warning"], "text")


# -------------------------------------------------------------------------- systemd


@pytest.mark.timeout(60)
def test_systemd_notify_ready_watchdog_and_stopping(fed: Federation, tmp_path: Path) -> None:
    """A fake NOTIFY_SOCKET sees READY=1 (listening, recovered), WATCHDOG=1 every half
    WATCHDOG_USEC from the event loop, and STOPPING=1 on SIGTERM; exit status 0."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.5)
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}  # ping every 0.1 s
    proc = DaemonProcess(fed.nodes[ROOT_ID], env=env)
    got: list[tuple[float, str]] = []

    def collect(until: float, want: str) -> None:
        while time.monotonic() < until and not any(want in m for _, m in got):
            with contextlib.suppress(TimeoutError):
                got.append((time.monotonic(), sock.recv(4096).decode()))

    try:
        proc.start()
        collect(time.monotonic() + 30, "READY=1")
        assert any("READY=1" in m for _, m in got), (got, proc.log_text())
        ready_at = next(t for t, m in got if "READY=1" in m)
        collect(ready_at + 1.0, "never")
        pings = [t for t, m in got if m == "WATCHDOG=1" and t > ready_at]
        assert len(pings) >= 4, got
        proc.terminate()
        collect(time.monotonic() + 10, "STOPPING=1")
        assert any(m == "STOPPING=1" for _, m in got)
        assert proc.wait(15) == 0, proc.log_text()
    finally:
        proc.kill()
        sock.close()
    ready = next(m for _, m in got if "READY=1" in m)
    assert "STATUS=root (root); listening on ws://127.0.0.1:" in ready


# ------------------------------------------------------------------------ in process


async def listening(
    port: int, timeout: float = 10.0, serving: asyncio.Task[None] | None = None
) -> None:
    """Wait until ``port`` accepts; if ``serving`` (the daemon's task) ends first, its own
    error (or its early return) is the failure, not a refused connection later."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if serving is not None and serving.done():
                serving.result()  # raises the daemon's error
                raise AssertionError(f"the daemon stopped before listening on {port}") from None
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return


@contextlib.asynccontextmanager
async def running(
    d: Daemon, port: int, hangup: asyncio.Event | None = None
) -> AsyncIterator[asyncio.Task[None]]:
    """Serve ``d`` in process until it listens on ``port``; when the block ends, ask it to
    stop and wait (bounded) for the end. ``d`` is closed either way."""
    shutdown = asyncio.Event()
    try:
        task = asyncio.create_task(
            serve(d, install_signals=False, shutdown=shutdown, hangup=hangup)
        )
        await listening(port, serving=task)
        yield task
        shutdown.set()
        await asyncio.wait_for(task, 15)
    finally:
        d.close()


async def serve_root_then_shut_down(fed: Federation) -> DaemonConfig:
    """Serve the root until it listens, ask it to stop, and wait (bounded) for the end."""
    cfg = load_config(fed.nodes[ROOT_ID].config)
    d = open_daemon(cfg)
    shutdown = asyncio.Event()
    try:
        task = asyncio.create_task(serve(d, install_signals=False, shutdown=shutdown))
        await listening(fed.nodes[ROOT_ID].listen_port, serving=task)
        shutdown.set()
        await asyncio.wait_for(task, 10)
    finally:
        d.close()
    return cfg


async def test_serve_stops_on_request_and_leaves_a_checkpoint(fed: Federation) -> None:
    cfg = await serve_root_then_shut_down(fed)
    node = load_node(cfg)
    assert isinstance(node, FedBuffAggregator) and node.version == 0


async def test_a_task_that_swallows_its_cancellation_cannot_block_shutdown(
    fed: Federation, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def stubborn(stop: asyncio.Event) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)  # ignores stop, swallows the first cancellation
        await asyncio.sleep(3600)

    monkeypatch.setattr(systemd_mod, "watchdog_loop", stubborn)
    monkeypatch.setattr(serve_mod, "STOP_GRACE_S", 0.1)
    await serve_root_then_shut_down(fed)
    assert "still stopping" in caplog.text
