"""sd_notify protocol against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedloom.runtime import systemd


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A bound datagram socket and the environment systemd would give the service."""
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5.0)
    try:
        yield sock, {"NOTIFY_SOCKET": str(path)}
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    assert systemd.notify("READY=1", env={}) is False
    assert systemd.ready(env={}) is False and systemd.stopping(env={}) is False
    assert systemd.watchdog_interval({}) is None


def test_ready_status_stopping_reach_the_socket(
    fake_systemd: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = fake_systemd
    assert systemd.ready("recovered 12 updates", env=env)
    assert sock.recv(4096) == b"READY=1\nSTATUS=recovered 12 updates"
    assert systemd.status("2 peers\nconnected", env=env)
    assert sock.recv(4096) == b"STATUS=2 peers connected"
    assert systemd.extend_timeout(90, env=env)
    assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=90000000"
    assert systemd.stopping(env=env)
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_socket_address() -> None:
    name = f"fedloom-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_unreachable_or_odd_socket_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "absent")}) is False
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": "relative/path"}) is False
    assert "failed" in caplog.text and "ignored" in caplog.text


def test_watchdog_interval_from_the_environment() -> None:
    pid = str(os.getpid())
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": pid}) == 0.5
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}) is None
    for bad in ("", "0", "-5", "soon"):
        assert systemd.watchdog_interval({"WATCHDOG_USEC": bad}) is None


async def test_watchdog_loop_pings_until_stopped(
    fake_systemd: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = fake_systemd
    sock.setblocking(False)
    env = {**env, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(systemd.watchdog_loop(stop, env=env))
        got: list[bytes] = []
        async with asyncio.timeout(20):  # generous: only a hang fails this
            while len(got) < 2:
                got.append(await loop.sock_recv(sock, 4096))
        assert got == [b"WATCHDOG=1", b"WATCHDOG=1"]
        stop.set()
    assert task.done() and task.exception() is None
    systemd.stopping(env=env)
    # Whatever pings were still queued, STOPPING=1 is the last word.
    last = b""
    while True:
        try:
            last = sock.recv(4096)
        except BlockingIOError:
            break
    assert last == b"STOPPING=1"


async def test_watchdog_loop_returns_at_once_without_a_watchdog() -> None:
    stop = asyncio.Event()
    async with asyncio.timeout(5):
        await systemd.watchdog_loop(stop, env={"NOTIFY_SOCKET": "/nonexistent"})
    with pytest.raises(ValueError, match="> 0"):
        await systemd.watchdog_loop(stop, interval=0.0)
