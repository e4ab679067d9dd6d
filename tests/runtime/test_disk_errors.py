"""Disk faults on REAL file systems: a state directory on a small tmpfs filled up under a
running daemon, a read-only bind mount, a restart with the disk still full, and a corrupted
last WAL frame. Each ends with one line naming the path and the cause, and the exit status
systemd acts on (``runtime.exit_status``); never a traceback, never "cannot listen".

Mounting needs root (CAP_SYS_ADMIN); without it the mount tests are skipped, saying so.
Every daemon process is stopped (by PID) before its mount is taken away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import Persist
from fedloom.algorithms.site import PENDING_KEY, SiteNode
from fedloom.cli import main
from fedloom.federation.store import CorruptStateError, StateIOError, StateStore, StoreError
from fedloom.runtime.audit import AuditLog, record
from fedloom.runtime.chaos.faults import remount_bind_read_only
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import DaemonError, load_node, open_daemon, stop_reason
from fedloom.runtime.exit_status import (
    EXIT_CONFIG,
    EXIT_CORRUPT_STATE,
    EXIT_ENVIRONMENT,
    EXIT_FAILED,
)
from fedloom.runtime.federation_files import ROOT_ID, Federation, write_federation
from fedloom.runtime.harness import Cluster, DaemonProcess, scrape
from fedloom.runtime.recovery import _check_owner
from fedloom.transport.wire import Update

pytestmark = pytest.mark.timeout(120)

SYNTHETIC = {"dataset": "synthetic", "model": "softmax", "alpha": 0.5, "beta": 0.5}
UNITS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"


# ---------------------------------------------------------------------------- mounts


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str = "256k") -> Iterator[list[Path]]:
    """A tmpfs of ``size`` on ``path``; yields the list of mounts to take away at the end
    (a test may stack a read-only bind mount on it), unmounted last-first in any case."""
    path.mkdir(parents=True, exist_ok=True)
    res = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {res.stderr.strip()}")
    layers = [path]
    try:
        yield layers
    finally:
        for layer in reversed(layers):
            if _run("umount", str(layer)).returncode != 0:
                _run("umount", "-l", str(layer))  # a straggler holds it: detach anyway


def make_read_only(layers: list[Path]) -> None:
    """Stack a read-only bind mount on ``layers[0]``: new files can no longer be created
    there (a running daemon's open log stays writable, as on a real remount)."""
    path = layers[0]
    assert _run("mount", "--bind", str(path), str(path)).returncode == 0
    layers.append(path)
    remount_bind_read_only(path)  # retried while a daemon's audit write holds it busy


def fill(directory: Path) -> Path:
    """Write zeros into ``directory/filler`` until the file system is full."""
    filler = directory / "filler"
    block = b"\0" * 4096
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(block)
    with contextlib.suppress(OSError), filler.open("ab", buffering=0) as f:
        while True:
            f.write(b"\0")  # the last partial page too
    return filler


# --------------------------------------------------------------------------- helpers


def wait_for(what: str, check: Callable[[], Any], timeout: float = 45.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def applied(fed: Federation, node_id: str) -> float:
    url = fed.nodes[node_id].metrics_url
    assert url is not None
    samples = scrape(url, timeout=2.0)
    return sum(v for (n, _), v in samples.items() if n == "fedloom_updates_applied_total")


def exit_of(proc: DaemonProcess, timeout: float = 45.0) -> int:
    wait_for(f"{proc.node_id} to exit", lambda: not proc.alive, timeout)
    rc = proc.returncode
    assert rc is not None
    return rc


def log_lines(proc: DaemonProcess, since: int = 0) -> list[dict[str, Any]]:
    """The JSON log lines of ``proc`` from byte ``since`` on (a traceback fails the test)."""
    text = proc.log_text()[since:]
    assert "Traceback" not in text, text[-3000:]
    lines = []
    for raw in text.splitlines():
        if raw.strip():
            lines.append(json.loads(raw))  # every line is one JSON object: nothing raw
    return lines


def the_error(proc: DaemonProcess, since: int = 0) -> str:
    """The one ERROR line with which ``proc`` stopped (its exit line)."""
    stops = [ln for ln in log_lines(proc, since) if "exit_status" in ln]
    assert len(stops) == 1, stops
    msg = str(stops[0]["msg"])
    assert "cannot listen" not in msg and "TaskGroup" not in msg, msg
    return msg


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return write_federation(
        tmp_path / "fed",
        {"region-a": ["site-1"]},
        plan=SYNTHETIC,
        root_aggregation={"buffer_size": 1},
        region_aggregation={"buffer_size": 1, "concurrency": 1},
    )


# ----------------------------------------------------------------- disk full, running


def test_a_full_disk_stops_the_region_with_one_line_and_a_restartable_status(
    fed: Federation,
) -> None:
    region = fed.nodes["region-a"]
    with mounted_tmpfs(region.state_dir), Cluster(fed) as cluster:
        cluster.start()
        wait_for("region-a to apply updates", lambda: applied(fed, "region-a") >= 2)
        filler = fill(region.state_dir)
        proc = cluster["region-a"]
        assert exit_of(proc) == EXIT_ENVIRONMENT
        msg = the_error(proc)
        assert f"cannot write state to {region.state_dir}/" in msg
        assert f"No space left on device (errno {errno.ENOSPC})" in msg

        # Restarted with the disk still full: the same kind of line, no traceback.
        since = len(proc.log_text())
        proc.start()
        assert exit_of(proc) == EXIT_ENVIRONMENT
        msg = the_error(proc, since)
        assert str(region.state_dir) in msg and f"(errno {errno.ENOSPC})" in msg

        # Once the disk has room again, the restart succeeds and training goes on.
        filler.unlink()
        since = len(proc.log_text())
        before = applied(fed, ROOT_ID)
        proc.start()
        wait_for("the root to apply region-a's forwards", lambda: applied(fed, ROOT_ID) > before)
        assert proc.alive and not [ln for ln in log_lines(proc, since) if "exit_status" in ln]
        assert cluster.stop(["region-a"]) == {"region-a": 0}


def test_a_read_only_state_dir_stops_the_region_with_one_line(fed: Federation) -> None:
    """Remounted read-only under a running region: its next checkpoint (a new file)
    is refused; a restart on the read-only disk cannot even take the directory's lock."""
    region = fed.nodes["region-a"]
    # Room to spare: the open log stays writable after the remount, and a 256 KB disk
    # could fill (ENOSPC) before the read-only refusal this test is about.
    with mounted_tmpfs(region.state_dir, size="16m") as layers, Cluster(fed) as cluster:
        cluster.start()
        wait_for("region-a to apply updates", lambda: applied(fed, "region-a") >= 1)
        make_read_only(layers)
        proc = cluster["region-a"]
        assert exit_of(proc, timeout=60) == EXIT_ENVIRONMENT
        msg = the_error(proc)
        assert str(region.state_dir) in msg
        assert f"Read-only file system (errno {errno.EROFS})" in msg

        since = len(proc.log_text())
        proc.start()
        assert exit_of(proc) == EXIT_ENVIRONMENT
        msg = the_error(proc, since)
        assert f"cannot open the state directory {region.state_dir}" in msg
        assert f"(errno {errno.EROFS})" in msg


def test_a_restart_on_a_full_disk_is_one_line_in_process(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    """The start-up path alone (no network): the compaction checkpoint cannot be written."""
    site = fed.nodes["site-1"]
    with mounted_tmpfs(site.state_dir):
        cfg = load_config(site.config)
        open_daemon(cfg).close()  # state as a first start leaves it
        fill(site.state_dir)
        status = main(["run", "--config", str(site.config), "--log-format", "text"])
        err = capsys.readouterr().err
        assert status == EXIT_ENVIRONMENT, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"cannot write state to {site.state_dir}/" in err
        assert "No space left on device" in err


def test_a_state_dir_that_names_a_file_is_a_config_error_saying_so(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    """state_dir pointing at a file: the OS says "File exists" (mkdir), which reads as if
    the directory were fine; the line must say it is not a directory."""
    site = fed.nodes["site-1"]
    site.state_dir.parent.mkdir(parents=True, exist_ok=True)
    site.state_dir.write_text("not a directory\n")
    status = main(["run", "--config", str(site.config), "--log-format", "text"])
    err = capsys.readouterr().err
    assert status == EXIT_CONFIG, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"state_dir: {site.state_dir} is not a directory" in err
    assert "File exists" not in err


def test_another_nodes_state_dir_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config copied from another node's, state_dir left as it was: the daemon started
    on that node's state (its outbox, its model) and appended to and signed its audit log
    as itself. It is a configuration error naming both nodes."""
    two = write_federation(tmp_path / "fed", {"region-a": ["site-1", "site-2"]}, plan=SYNTHETIC)
    one, other = two.nodes["site-1"], two.nodes["site-2"]
    open_daemon(load_config(one.config)).close()
    AuditLog(one.state_dir, "site-1", None).append([("daemon_start", {"role": "site"})])
    before = {p: p.read_bytes() for p in one.state_dir.rglob("*") if p.is_file()}
    text = other.config.read_text().replace(str(other.state_dir), str(one.state_dir))
    other.config.write_text(text)
    status = main(["run", "--config", str(other.config), "--log-format", "text"])
    err = capsys.readouterr().err
    assert status == EXIT_CONFIG, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "'site-1'" in err and "'site-2'" in err and "state_dir" in err
    after = {p: p.read_bytes() for p in one.state_dir.rglob("*") if p.is_file()}
    assert after == before
    # A command given --state-dir alone on a fresh log names no node: no owner yet.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    record(fresh, "plan_approved", digest="sha256:ab")
    _check_owner(dataclasses.replace(load_config(other.config), state_dir=fresh))  # no raise


# ------------------------------------------------------------------- corrupt last frame


def site_with_updates(fed: Federation, n: int) -> Path:
    """site-1's state dir holding ``n`` pending updates in its live log; returns the log."""
    cfg = load_config(fed.nodes["site-1"].config)
    d = open_daemon(cfg)
    try:
        for seq in range(1, n + 1):
            update = Update("site-1", seq, 0, {"w": np.full(16, seq, np.float32)}, n_examples=5)
            rec = {"op": "add", "seq": seq, "update": update}
            d.store.apply(Persist(PENDING_KEY, rec, append=True))
    finally:
        d.close()
    [log] = sorted(fed.nodes["site-1"].state_dir.glob("wal.*.log"))
    return log


def test_a_corrupt_last_frame_is_refused_checked_and_repaired(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    site = fed.nodes["site-1"]
    log = site_with_updates(fed, 3)
    original = bytearray(log.read_bytes())
    last = original.rindex(b"FLs1")  # the last frame's offset
    original[-2] ^= 0x40  # one bit of the last update: the frame is complete, its CRC wrong
    log.write_bytes(bytes(original))

    # fedloom run refuses, naming file and offset, with the corrupt-state status.
    assert main(["run", "--config", str(site.config), "--log-format", "text"]) == (
        EXIT_CORRUPT_STATE
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{log}: damaged frame at offset {last}" in err and "checksum" in err
    assert err.count("fedloom state check") == 1, err  # pointed there once, not twice
    assert log.read_bytes() == bytes(original)  # nothing was dropped

    # state check shows it (and changes nothing).
    assert main(["state", "check", str(site.state_dir)]) == EXIT_CORRUPT_STATE
    out = capsys.readouterr().out
    assert f"{log.name} bytes {last}..{len(original)}: CORRUPT: checksum mismatch" in out
    assert f"{PENDING_KEY} 2" in out  # the intact records per key
    assert "'site/pending' add record(s): seq 3" in out  # what the damaged frame seems to hold
    assert log.read_bytes() == bytes(original)

    # Refused while a daemon holds the lock; done with a backup once it does not.
    with StateStore(site.state_dir):
        assert main(["state", "repair", str(site.state_dir), "--drop-damaged"]) == EXIT_CONFIG
        assert "holds this state directory's lock" in capsys.readouterr().err
    assert main(["state", "repair", str(site.state_dir), "--drop-damaged"]) == 0
    out = capsys.readouterr().out
    assert f"dropped {len(original) - last} bytes" in out
    assert "the site forgets these updates" in out
    # The damaged frame held seq 3, which the region may have applied: never reused.
    assert f"{PENDING_KEY!r}: the node numbers its next update above 3" in out
    [backup] = site.state_dir.glob(f"{log.name}.*.bak")
    assert backup.read_bytes() == bytes(original) and log.read_bytes()[:last] == original[:last]

    assert main(["state", "check", str(site.state_dir)]) == 0
    capsys.readouterr()
    node = load_node(load_config(site.config))  # starts again: updates 1 and 2 are pending
    assert isinstance(node, SiteNode) and (node.seq, node.pending) == (3, 2)


def test_repair_truncates_only_at_a_frame_boundary(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    site = fed.nodes["site-1"]
    log = site_with_updates(fed, 3)
    data = log.read_bytes()
    second = data.index(b"FLs1", 1)
    assert main(["state", "repair", str(site.state_dir), "--truncate-at", "7"]) == EXIT_CONFIG
    assert "not a frame boundary" in capsys.readouterr().err
    assert main(["state", "repair", str(site.state_dir), "--truncate-at", str(second)]) == 0
    out = capsys.readouterr().out
    assert "2 intact frame(s)" in out and "seq 2, seq 3" in out
    assert log.read_bytes()[:second] == data[:second]
    node = load_node(load_config(site.config))  # seqs 2 and 3 are not numbered again
    assert isinstance(node, SiteNode) and (node.seq, node.pending) == (3, 1)


def test_a_damaged_checkpoint_is_shown_and_not_repaired(
    fed: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    site = fed.nodes["site-1"]
    log = site_with_updates(fed, 1)
    ckpt = site.state_dir / "checkpoint.ckpt"
    before = ckpt.read_bytes()
    ckpt.write_bytes(before[:-1] + bytes([before[-1] ^ 1]))
    assert main(["state", "check", str(site.state_dir)]) == EXIT_CORRUPT_STATE
    out = capsys.readouterr().out
    assert "checkpoint: DAMAGED" in out and f"{ckpt}: damaged frame at offset 0" in out
    assert f"live log: {log.name}" in out and f"{PENDING_KEY} 1" in out
    assert main(["state", "repair", str(site.state_dir), "--drop-damaged"]) == EXIT_CONFIG
    assert "restore it from a backup" in capsys.readouterr().err
    assert main(["run", "--config", str(site.config)]) == EXIT_CORRUPT_STATE
    assert str(ckpt) in capsys.readouterr().err


# --------------------------------------------------------------- exit status mapping


def test_listen_failures_and_disk_failures_are_told_apart() -> None:
    full = StateIOError("write state to", "/s/wal.log", OSError(errno.ENOSPC, "No space"))
    nested = BaseExceptionGroup("tg", [BaseExceptionGroup("inner", [full])])
    reason = stop_reason(nested)
    assert reason is not None and reason.exit_code == EXIT_ENVIRONMENT
    assert str(reason) == "state_dir: cannot write state to /s/wal.log: No space (errno 28)"
    broken = StoreError("an earlier write failed; restart and recover")
    broken.__cause__ = OSError(errno.EIO, "Input/output error")
    assert (r := stop_reason(broken)) is not None and r.exit_code == EXIT_ENVIRONMENT
    corrupt = CorruptStateError("x: damaged frame at offset 9", path=Path("x"), offset=9)
    assert (r := stop_reason(corrupt)) is not None and r.exit_code == EXIT_CORRUPT_STATE
    assert stop_reason(ValueError("a bug")) is None
    assert stop_reason(OSError(errno.EADDRINUSE, "in use")) is None  # not the disk's


async def test_a_port_in_use_is_still_a_listen_failure(fed: Federation) -> None:
    from fedloom.runtime.daemon import serve

    root = fed.nodes[ROOT_ID]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", root.listen_port))
        taken.listen()
        d = open_daemon(load_config(root.config))
        try:
            with pytest.raises(DaemonError) as info:
                await serve(d, install_signals=False, ready_wait_s=0.1)
        finally:
            d.close()
    assert info.value.exit_code == EXIT_FAILED
    assert str(info.value).startswith(f"listen: cannot listen on 127.0.0.1:{root.listen_port}")
    assert "in use" in str(info.value)


# -------------------------------------------------------------------- systemd units


@pytest.mark.parametrize("unit", ["fedloom-site.service", "fedloom-aggregator.service"])
def test_units_do_not_restart_config_or_corruption_exits(unit: str) -> None:
    values = [
        line.partition("=")[2].split()
        for line in (UNITS_DIR / unit).read_text().splitlines()
        if line.startswith("RestartPreventExitStatus=")
    ]
    assert values == [[str(EXIT_CONFIG), str(EXIT_CORRUPT_STATE)]]
    assert str(EXIT_ENVIRONMENT) not in values[0]  # a full disk is restarted once fixed
