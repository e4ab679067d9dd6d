"""Non-network nemeses of a chaos run: processes, disks and bad input from outside.

* ``Processes``: kill (SIGKILL of the daemon's process group), pause (SIGSTOP) and resume,
  restart, kill everything at once, a duplicate daemon (same identity; same state directory
  or a copy of it). Every deliberate stop is written to the timeline *before* it happens
  (``intended: true``); a daemon that exits by itself is written as ``process_exit`` with
  ``intended: false`` (its exit status and last log line) and, if the scenario asks for it,
  restarted after a delay as systemd's ``Restart=on-failure`` would.
* ``Disks``: a node's state directory on a small tmpfs this process mounts (root only),
  filled to ENOSPC or remounted read-only; bytes of a stopped daemon's write-ahead log or
  checkpoint damaged in place (``corrupt_state``). ``Disks.restore`` (also run at exit)
  lifts every disk fault and unmounts every tmpfs, copying its files back onto the real
  disk first so the checker reads the state as the run left it.
* ``InputFlood``: garbage bytes, idle TCP connections, or WebSocket upgrades that never
  start fedloom's handshake, against a daemon's listening port.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedloom.runtime.chaos.layout import read_config
from fedloom.runtime.chaos.record import Timeline
from fedloom.runtime.federation_files import NodeFiles, free_port
from fedloom.runtime.harness import Cluster, DaemonProcess

__all__ = [
    "Disks",
    "InputFlood",
    "Processes",
    "corrupt_state",
    "last_log_line",
    "tmpfs_support",
    "wal_frames",
]

FILL_NAME = ".chaos-fill"
# What deploy/systemd/*.service say in RestartPreventExitStatus=: a configuration mistake and
# damaged state, which restarting cannot fix (runtime/exit_status.py).
NO_RESTART_STATUS = frozenset((2, 65))
_FRAME = struct.Struct("<4sQI")  # federation.store's frame header: magic, body length, crc32


def last_log_line(path: Path, limit: int = 300) -> str:
    """The last non-empty line of a daemon's log (what it said before it exited)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 8192))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else ""


# =========================================================================== processes


def _signal_group(proc: DaemonProcess, sig: int) -> None:
    """Signal the daemon's whole process group (its own session: workers too)."""
    if proc.pid is None or not proc.alive:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@dataclass
class _Duplicate:
    proc: DaemonProcess
    fault: str
    node: str
    ended: bool = False


class Processes:
    """The federation's daemons and every deliberate thing done to them."""

    def __init__(
        self,
        cluster: Cluster,
        timeline: Timeline,
        *,
        stop_grace_s: float,
        restart_exited_after_s: float = 0.0,
        say: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.cluster = cluster
        self.timeline = timeline
        self.stop_grace_s = stop_grace_s
        self.restart_after_s = restart_exited_after_s
        self.say = say
        self.down: set[str] = set()  # deliberately stopped, or exited and not restarted
        self.paused: set[str] = set()
        self._restart_at: dict[str, float] = {}
        self._duplicates: list[_Duplicate] = []

    @property
    def nodes(self) -> list[str]:
        return list(self.cluster.procs)

    def start(self, node: str, fault: str = "start") -> None:
        proc = self.cluster[node]
        proc.start()
        self.down.discard(node)
        self._restart_at.pop(node, None)
        self.timeline.event("process_start", fault, [node], {"pid": proc.pid})

    def start_all(self) -> None:
        """Start every daemon; ``log_started`` writes them to the timeline once all are up."""
        for node in self.nodes:
            self.cluster[node].start()

    def log_started(self, ready_after_s: Mapping[str, float | None]) -> None:
        for node in self.nodes:
            detail = {"pid": self.cluster[node].pid, "ready_after_s": ready_after_s.get(node)}
            self.timeline.event("process_start", "start", [node], detail)

    def kill(self, nodes: Sequence[str], fault: str) -> None:
        """SIGKILL (a crash) of each node's process group; logged first."""
        for n in nodes:  # a deliberate stop overrides a pending automatic restart
            self._restart_at.pop(n, None)
        live = [n for n in nodes if self.cluster[n].alive]
        if not live:
            return
        self.timeline.event("process_kill", fault, live, {"signal": "SIGKILL"})
        for n in live:
            proc = self.cluster[n]
            if n in self.paused:  # a stopped process dies of SIGKILL all the same
                self.paused.discard(n)
            proc.kill()
            self.down.add(n)

    def terminate(self, nodes: Sequence[str], fault: str) -> dict[str, int | None]:
        """SIGTERM (a clean stop), SIGKILL after the grace period; logged first."""
        for n in nodes:
            self._restart_at.pop(n, None)
        live = [n for n in nodes if self.cluster[n].alive]
        if not live:
            return {}
        self.timeline.event("process_kill", fault, live, {"signal": "SIGTERM"})
        self._resume_quietly(live)
        codes = self.cluster.stop(live, timeout=self.stop_grace_s)
        self.down.update(live)
        self._log_stops(fault, codes)
        return codes

    def _log_stops(self, fault: str, codes: Mapping[str, int | None]) -> None:
        """Each SIGTERM's outcome, for the checker: the status, and whether the daemon
        needed the SIGKILL after the grace period (a hang on shutdown)."""
        for node, rc in codes.items():
            detail = {"signal": "SIGTERM", "returncode": rc, "sigkill": rc == -signal.SIGKILL}
            if rc != 0:
                detail["last_log_line"] = last_log_line(self.cluster[node].files.log)
            self.timeline.event("process_exit", fault, [node], detail)

    def pause(self, nodes: Sequence[str], fault: str) -> None:
        live = [n for n in nodes if self.cluster[n].alive and n not in self.paused]
        if not live:
            return
        self.timeline.event("process_pause", fault, live, {"signal": "SIGSTOP"})
        for n in live:
            _signal_group(self.cluster[n], signal.SIGSTOP)
            self.paused.add(n)

    def resume(self, nodes: Sequence[str], fault: str) -> None:
        chosen = [n for n in nodes if n in self.paused]
        if not chosen:
            return
        self.timeline.event("process_resume", fault, chosen, {"signal": "SIGCONT"})
        self._resume_quietly(chosen)

    def _resume_quietly(self, nodes: Sequence[str]) -> None:
        for n in nodes:
            if n in self.paused:
                _signal_group(self.cluster[n], signal.SIGCONT)
                self.paused.discard(n)

    def restart(self, nodes: Sequence[str], fault: str, *, graceful: bool = True) -> None:
        """Stop the running ones (SIGTERM, or SIGKILL if not ``graceful``), start them all."""
        if graceful:
            self.terminate(nodes, fault)
        else:
            self.kill(nodes, fault)
        for n in nodes:
            if not self.cluster[n].alive:
                self.start(n, fault)

    def duplicate(self, node: str, fault: str, *, same_state: bool) -> dict[str, Any]:
        """A second daemon with ``node``'s identity: its config, or a copy with its own
        copy of the state directory; metrics (if any) on a port of its own."""
        files = self.cluster[node].files
        cfg = read_config(files.config)
        state = files.state_dir
        if not same_state:
            state = files.state_dir.parent / f"{node}.duplicate"
            shutil.rmtree(state, ignore_errors=True)
            # The lock file is what keeps two daemons off one directory; a copy is free.
            shutil.copytree(files.state_dir, state, ignore=shutil.ignore_patterns("lock"))
            cfg["state_dir"] = str(state)
        metrics_port = 0
        if "metrics" in cfg:
            metrics_port = free_port()
            cfg["metrics"]["port"] = metrics_port
        dup_config = files.config.with_name(f"{node}.duplicate.toml")
        dup_config.write_text(tomli_w.dumps(cfg), encoding="utf-8")
        dup_files = NodeFiles(
            node,
            files.role,
            dup_config,
            state,
            files.log.with_name(f"{node}.duplicate.log"),
            files.listen_port,
            metrics_port,
            files.site_index,
        )
        proc = DaemonProcess(dup_files)
        proc.start()
        self._duplicates.append(_Duplicate(proc, fault, node))
        return {
            "pid": proc.pid,
            "same_state": same_state,
            "config": str(dup_config),
            "log": str(dup_files.log),
        }

    def stop_duplicates(self, fault: str | None = None) -> list[tuple[_Duplicate, int | None]]:
        out = []
        for d in self._duplicates:
            if d.ended or (fault is not None and d.fault != fault):
                continue
            d.proc.signal(signal.SIGCONT)
            rc = d.proc.stop(self.stop_grace_s)
            d.ended = True
            out.append((d, rc))
        return out

    def finished_duplicates(self) -> list[tuple[_Duplicate, int | None]]:
        """Duplicates that exited by themselves since the last call (refused, presumably)."""
        out = []
        for d in self._duplicates:
            if not d.ended and d.proc.proc is not None and not d.proc.alive:
                d.ended = True
                out.append((d, d.proc.returncode))
        return out

    def watch(self, now: float) -> list[str]:
        """Log daemons that exited by themselves; restart them when it is time. Returns
        the nodes newly found dead."""
        found = []
        for node, proc in self.cluster.procs.items():
            if node in self.down or proc.proc is None or proc.alive:
                continue
            self.down.add(node)
            self.paused.discard(node)
            found.append(node)
            detail = {"returncode": proc.returncode, "last_log_line": last_log_line(proc.files.log)}
            self.timeline.event("process_exit", "none", [node], detail, intended=False)
            self.say(
                f"{node} exited by itself (status {proc.returncode}): {detail['last_log_line']}"
            )
            if self.restart_after_s > 0 and proc.returncode not in NO_RESTART_STATUS:
                self._restart_at[node] = now + self.restart_after_s
        for node, when in list(self._restart_at.items()):
            if now >= when:
                self.start(node, "restart_exited")
        return found

    def shutdown(self) -> dict[str, int | None]:
        """Resume what is paused, SIGTERM everything, SIGKILL after the grace period."""
        self._resume_quietly(list(self.paused))
        self.stop_duplicates()
        live = [n for n in self.nodes if self.cluster[n].alive]
        if live:
            self.timeline.event("process_kill", "end", live, {"signal": "SIGTERM", "end": True})
        codes = self.cluster.stop(live, timeout=self.stop_grace_s)
        self.down.update(live)
        self._log_stops("end", codes)
        return codes

    def pids(self) -> list[int]:
        """Every process this run started (daemons and duplicates), alive or not."""
        procs = [*self.cluster.procs.values(), *(d.proc for d in self._duplicates)]
        return [p.pid for p in procs if p.pid is not None]


# =============================================================================== disks


def tmpfs_support() -> tuple[bool, str]:
    """Whether this process can mount a tmpfs (root and a kernel that lets it), and why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "disk faults need root (to mount a tmpfs); run as root or drop them"
    probe = Path(tempfile.mkdtemp(prefix="fedloom-tmpfs-probe-"))
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if res.returncode != 0:
            why = (res.stderr or res.stdout).strip().splitlines()
            return False, f"cannot mount a tmpfs: {why[-1] if why else res.returncode}"
        subprocess.run(["umount", str(probe)], capture_output=True, timeout=10, check=False)
        return True, "tmpfs mounts work"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot mount a tmpfs: {exc}"
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


def _mount(*args: str) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {res.stderr.strip() or res.returncode}")


def remount_bind_read_only(path: Path, tries: int = 100) -> None:
    """Make the bind mount on ``path`` read-only. The kernel refuses (busy) while a file is
    open for writing through it, which a daemon does for a moment with each audit batch:
    try again until that write is done."""
    for _ in range(tries - 1):
        try:
            _mount("-o", "remount,bind,ro", str(path))
            return
        except OSError as exc:
            if "busy" not in str(exc):
                raise
        time.sleep(0.05)
    _mount("-o", "remount,bind,ro", str(path))


@dataclass
class _Mount:
    path: Path
    size_mb: int
    read_only: bool = False
    ro_method: str = ""  # "remount" (the tmpfs) or "bind" (a read-only layer on top)
    filled: bool = False


def _umount(path: Path) -> None:
    """Unmount the top mount on ``path``; lazily when something still holds it open."""
    res = subprocess.run(["umount", str(path)], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        lazy = subprocess.run(
            ["umount", "-l", str(path)], capture_output=True, text=True, timeout=30
        )
        if lazy.returncode != 0:
            raise OSError(f"umount {path}: {lazy.stderr.strip() or res.stderr.strip()}")


@dataclass
class Disks:
    """Every tmpfs this run mounted, and the disk faults standing on them."""

    mounts: dict[str, _Mount] = field(default_factory=dict)
    _registered: bool = False

    def prepare(self, node: str, state_dir: Path, size_mb: int) -> None:
        """Mount a ``size_mb`` tmpfs on ``node``'s (still empty) state directory."""
        if not self._registered:
            atexit.register(self.restore)
            self._registered = True
        state_dir.mkdir(parents=True, exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(state_dir))
        self.mounts[node] = _Mount(state_dir, size_mb)

    def fill(self, node: str) -> dict[str, Any]:
        """Write zeros until the tmpfs is full (ENOSPC)."""
        m = self.mounts[node]
        path = m.path / FILL_NAME
        written = 0
        chunk = b"\0" * (1 << 20)
        try:
            with path.open("ab") as fh:
                while True:
                    try:
                        fh.write(chunk)
                        fh.flush()
                        written += len(chunk)
                    except OSError:
                        if len(chunk) <= 4096:
                            break
                        chunk = chunk[: len(chunk) // 16]
        except OSError:
            pass  # closing flushes what no longer fits: the disk is as full as it gets
        m.filled = True
        free = shutil.disk_usage(m.path).free
        return {"path": str(m.path), "filled_bytes": written, "free_bytes": free}

    def unfill(self, node: str) -> None:
        m = self.mounts[node]
        with contextlib.suppress(FileNotFoundError):
            (m.path / FILL_NAME).unlink()
        m.filled = False

    def set_read_only(self, node: str, on: bool) -> dict[str, Any]:
        """Make the state directory read-only, or writable again.

        The tmpfs itself is remounted read-only when nothing has a file open for writing;
        otherwise (the kernel refuses: busy) a read-only bind mount is stacked on the
        directory, so every file opened from then on is read-only while descriptors already
        open keep writing (``method`` in the result says which)."""
        m = self.mounts[node]
        if not on:
            if m.ro_method == "bind":
                _umount(m.path)
            elif m.ro_method == "remount":
                _mount("-o", "remount,rw", str(m.path))
            m.read_only, m.ro_method = False, ""
            return {"path": str(m.path), "read_only": False}
        try:
            _mount("-o", "remount,ro", str(m.path))
            m.ro_method = "remount"
        except OSError:
            _mount("--bind", str(m.path), str(m.path))
            try:
                remount_bind_read_only(m.path)
            except OSError:
                _umount(m.path)
                raise
            m.ro_method = "bind"
        m.read_only = True
        return {"path": str(m.path), "read_only": True, "method": m.ro_method}

    def restore(self) -> list[str]:
        """Lift every disk fault and unmount every tmpfs, keeping the files (copied back onto
        the real disk). Idempotent; returns problems (empty when all went well)."""
        problems: list[str] = []
        for node, m in list(self.mounts.items()):
            try:
                if m.read_only:
                    self.set_read_only(node, False)
                self.unfill(node)
                keep = Path(tempfile.mkdtemp(prefix=f"fedloom-chaos-{node}-"))
                shutil.copytree(m.path, keep, dirs_exist_ok=True, symlinks=True)
                _umount(m.path)
                shutil.copytree(keep, m.path, dirs_exist_ok=True, symlinks=True)
                shutil.rmtree(keep, ignore_errors=True)
            except (OSError, subprocess.SubprocessError) as exc:
                problems.append(f"{m.path}: {exc}")
            del self.mounts[node]
        return problems


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    try:
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            return any(line.split()[1] == target for line in fh if len(line.split()) > 1)
    except OSError:
        return False


# ============================================================================ corrupt


class NothingToCorruptError(Exception):
    """The state directory holds no file of the kind asked for (yet)."""


def _frames(path: Path) -> list[tuple[int, int]]:
    """(offset, total length) of each whole frame of a store file, in order."""
    data = path.read_bytes()
    out = []
    pos = 0
    while pos + _FRAME.size <= len(data):
        magic, length, _crc = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        if magic != b"FLs1" or end > len(data):
            break
        out.append((pos, end - pos))
        pos = end
    return out


def wal_frames(state_dir: Path) -> int:
    """Whole frames in the live write-ahead log of ``state_dir`` (0 when there is none)."""
    wal = _live_wal(state_dir)
    try:
        return len(_frames(wal)) if wal is not None else 0
    except OSError:  # rotated away between the listing and the read
        return 0


def _live_wal(state_dir: Path) -> Path | None:
    logs = sorted(
        state_dir.glob("wal.*.log"), key=lambda p: int(p.name.split(".")[1]), reverse=True
    )
    return logs[0] if logs else None


def corrupt_state(state_dir: Path, where: str, rng: random.Random) -> dict[str, Any]:
    """Damage a stopped daemon's store in place; returns what was done (file, offset).

    ``wal_middle``: one byte of a frame's body with an intact frame after it;
    ``wal_end``: one byte of the last frame's body (its length intact: not a torn write);
    ``wal_torn``: a frame cut short after the last one (what a crash mid-write leaves: the
    write in flight, which nothing acted on; not corruption);
    ``checkpoint``: one byte in the middle of the checkpoint's body.
    """
    if where == "checkpoint":
        path = state_dir / "checkpoint.ckpt"
        if not path.exists():
            raise NothingToCorruptError(f"no checkpoint in {state_dir}")
        frames = _frames(path)
        if not frames:
            raise NothingToCorruptError(f"{path}: no whole frame")
        start, length = frames[0]
        offset = start + _FRAME.size + (length - _FRAME.size) // 2
        return _flip(path, offset, where)
    wal = _live_wal(state_dir)
    if wal is None:
        raise NothingToCorruptError(f"no write-ahead log in {state_dir}")
    frames = _frames(wal)
    if where == "wal_middle":
        if len(frames) < 2:
            raise NothingToCorruptError(f"{wal}: {len(frames)} frame(s), a middle one needs 2")
        start, length = frames[rng.randrange(len(frames) - 1)]
    else:
        if not frames:
            raise NothingToCorruptError(f"{wal}: no whole frame")
        start, length = frames[-1]
    if where == "wal_torn":
        # A crash tears only the write in flight, whose acks and sends wait for it: a new
        # frame (here the last one's bytes again) cut short at the end of the log. Cutting
        # a frame already there would take away a write the daemon had acted on (sent its
        # acks and forwards), which no crash does and the checker rightly refutes.
        with wal.open("rb") as fh:
            fh.seek(start)
            frame = fh.read(length)
        cut = max(_FRAME.size + 1, length // 2)
        end = start + length  # past a tail the kill itself tore, if any: it goes
        with wal.open("r+b") as fh:
            fh.truncate(end)
            fh.seek(end)
            fh.write(frame[:cut])
            fh.flush()
            os.fsync(fh.fileno())
        return {"file": str(wal), "offset": end, "where": where, "torn_bytes": cut}
    body = length - _FRAME.size
    offset = start + _FRAME.size + (rng.randrange(body) if body > 0 else 0)
    return _flip(path=wal, offset=offset, where=where) | {"frame_offset": start}


def _flip(path: Path, offset: int, where: str) -> dict[str, Any]:
    with path.open("r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0xFF]))
        fh.flush()
        os.fsync(fh.fileno())
    return {"file": str(path), "offset": offset, "where": where}


# ========================================================================== bad input


class InputFlood(threading.Thread):
    """Bad input from outside against ``port`` until ``stop()``:

    ``garbage``: ``connections`` connections spread over ``duration_s``, each sends ``size``
    random bytes, then waits (2 s at most) for the daemon to close it;
    ``idle``: ``connections`` connections opened at once, never a byte sent;
    ``upgrade``: ``connections`` WebSocket upgrades of ``/fedloom``, then silence (fedloom's
    own handshake never starts).
    """

    def __init__(
        self, kind: str, port: int, *, connections: int, size: int, duration_s: float, seed: int
    ) -> None:
        super().__init__(name=f"chaos-{kind}-{port}", daemon=True)
        self.kind = kind
        self.port = port
        self.connections = connections
        self.size = size
        self.duration_s = duration_s
        self.rng = random.Random(seed)
        self._halt = threading.Event()
        self.stats: dict[str, int] = {"opened": 0, "failed": 0, "closed_by_daemon": 0}
        self._socks: list[socket.socket] = []

    def stop(self) -> None:
        self._halt.set()

    def _connect(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2.0)
        except OSError:
            self.stats["failed"] += 1
            return None
        self.stats["opened"] += 1
        return s

    def run(self) -> None:
        try:
            if self.kind == "garbage":
                self._garbage()
            else:
                self._hold()
        finally:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()

    def _garbage(self) -> None:
        gap = self.duration_s / max(1, self.connections)
        for _ in range(self.connections):
            if self._halt.is_set():
                return
            s = self._connect()
            if s is not None:
                with s:
                    try:
                        s.sendall(self.rng.randbytes(self.size))
                        s.settimeout(2.0)
                        while s.recv(4096):
                            pass
                        self.stats["closed_by_daemon"] += 1
                    except TimeoutError:
                        pass
                    except OSError:
                        self.stats["closed_by_daemon"] += 1
            self._halt.wait(gap)

    def _hold(self) -> None:
        for _ in range(self.connections):
            if self._halt.is_set():
                break
            s = self._connect()
            if s is None:
                continue
            if self.kind == "upgrade":
                key = base64.b64encode(self.rng.randbytes(16)).decode("ascii")
                request = (
                    f"GET /fedloom HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                with contextlib.suppress(OSError):
                    s.sendall(request.encode("ascii"))
            self._socks.append(s)
        self._halt.wait(self.duration_s)
        for s in self._socks:  # a daemon that cut an idle connection left it readable at EOF
            try:
                s.setblocking(False)
                if s.recv(1 << 16) == b"":
                    self.stats["closed_by_daemon"] += 1
            except BlockingIOError:
                pass
            except OSError:
                self.stats["closed_by_daemon"] += 1


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """PIDs still alive after ``timeout`` (empty when every one has exited)."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if _alive(p)]
        if left:
            time.sleep(0.05)
    return left


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True
