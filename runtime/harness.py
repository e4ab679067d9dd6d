"""The process harness: daemons of a written federation as child processes, and their metrics.

``DaemonProcess`` runs one ``fedloom run --config <node>.toml`` (JSON logs to the node's log
file) in its own session, so a terminal's Ctrl-C reaches the caller only; ``stop`` asks with
SIGTERM, then SIGKILLs the process group after a grace period, and on Linux the child is
also told to die with its parent (``PR_SET_PDEATHSIG``). ``Cluster`` holds the daemons of a
``runtime.federation_files.Federation`` and stops them all on leaving its ``with`` block.
``scrape`` reads a daemon's ``/metrics``. The demo, ``fedloom chaos``, ``fedloom local up``,
``bench/parity.py`` and the end-to-end tests use these.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fedloom
from fedloom.runtime.federation_files import Federation, NodeFiles
from fedloom.runtime.malloc_tuning import malloc_env

__all__ = [
    "REPO_ROOT",
    "STOP_GRACE_S",
    "Cluster",
    "DaemonProcess",
    "Samples",
    "daemon_env",
    "parse_metrics",
    "sample",
    "sample_sum",
    "scrape",
]

# The directory that holds the ``fedloom`` package (a checkout's root, or site-packages when
# installed), put on the daemons' PYTHONPATH so they import the very same package; never the
# package's own folder. Installed, ``fedloom`` is the only top-level name there; in a checkout
# the root also holds the card's folders, so a bare ``runtime`` or ``sim`` is importable in
# the daemons too (ruff's banned-api rule keeps the code from importing them that way).
# The daemons also run in this directory: paths handed to them must be absolute.
REPO_ROOT = Path(fedloom.__file__).absolute().parent.parent
STOP_GRACE_S = 10.0


def _pdeathsig() -> Any:
    """A pre-exec hook asking Linux to SIGTERM the child when this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return hook


_PREEXEC = _pdeathsig()


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = malloc_env(os.environ)  # as the systemd units run the daemons
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    env.update(extra or {})
    return env


class DaemonProcess:
    """One ``fedloom run`` child process (its own session), logging to ``files.log``."""

    def __init__(
        self,
        files: NodeFiles,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.files = files
        self.args = list(args)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def node_id(self) -> str:
        return self.files.node_id

    def command(self) -> list[str]:
        """What ``start`` runs (``runtime.chaos.loadgen`` runs another program)."""
        cmd = [
            sys.executable,
            "-m",
            "fedloom",
            "run",
            "--config",
            str(self.files.config),
        ]
        return [*cmd, "--log-format", "json", *self.args]

    def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self.node_id} is already running")
        self.files.log.parent.mkdir(parents=True, exist_ok=True)
        with self.files.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=daemon_env(self.env),
                cwd=REPO_ROOT,
                start_new_session=True,  # a terminal's Ctrl-C goes to the demo, not here
                preexec_fn=_PREEXEC,
            )
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the session's group: also any worker processes

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        """Ask for a clean stop (SIGTERM) without waiting."""
        self.signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        """Wait for the exit; SIGKILL the group after ``timeout``. Returns the exit status."""
        if self.proc is None:
            return None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            rc = self.proc.wait()
        self._signal_group(signal.SIGKILL)  # leftovers of the group, if any
        return rc

    def stop(self, timeout: float = STOP_GRACE_S) -> int | None:
        self.terminate()
        return self.wait(timeout)

    def log_text(self) -> str:
        try:
            return self.files.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


class Cluster:
    """Daemon processes of a federation; ``with Cluster(...)`` stops them all on exit."""

    def __init__(self, fed: Federation, *, args: Mapping[str, Sequence[str]] | None = None):
        self.fed = fed
        self.procs: dict[str, DaemonProcess] = {
            node_id: DaemonProcess(files, args=(args or {}).get(node_id, ()))
            for node_id, files in fed.nodes.items()
        }

    def __getitem__(self, node_id: str) -> DaemonProcess:
        return self.procs[node_id]

    def add(self, proc: DaemonProcess) -> DaemonProcess:
        self.procs[proc.node_id] = proc
        return proc

    def start(self, ids: Sequence[str] | None = None) -> None:
        for node_id in ids if ids is not None else list(self.procs):
            self.procs[node_id].start()

    def dead(self) -> list[str]:
        """Nodes that were started and have exited."""
        return [p.node_id for p in self.procs.values() if p.proc is not None and not p.alive]

    def stop(
        self, ids: Sequence[str] | None = None, timeout: float = STOP_GRACE_S
    ) -> dict[str, int | None]:
        """SIGTERM the given (default: all) nodes at once, then wait for each in turn."""
        chosen = [self.procs[i] for i in (ids if ids is not None else list(self.procs))]
        for p in chosen:
            p.terminate()
        deadline = time.monotonic() + timeout
        return {p.node_id: p.wait(max(0.1, deadline - time.monotonic())) for p in chosen}

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 1.0) -> Samples:
    """``/metrics`` as ``{(sample name, sorted labels): value}``; empty if unreachable."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as resp:
            text = resp.read().decode("utf-8")
    except (urllib.error.URLError, OSError, TimeoutError):
        return {}
    return parse_metrics(text)


def parse_metrics(text: str) -> Samples:
    """A Prometheus text page as ``{(sample name, sorted labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def sample(
    metrics: Mapping[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    **labels: str,
) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def sample_sum(
    metrics: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str
) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)
