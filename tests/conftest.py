"""Suite-wide: ``tmp_path`` lives in memory (/dev/shm) where the machine has one with room.

Most tests write state through real StateStores, audit logs and outboxes, which fsync
every batch. On a disk shared with other work an fsync can take tens of milliseconds, so
the suite waited on the disk far more than it computed (the chaos checker's tests: 150 s
on /tmp, 21 s on /dev/shm on the same loaded machine). On tmpfs the same files are
written, fsynced and read back by the same code; only the disk's latency is gone. What a
test asserts about durability is about a process killed or a write cut short, which tmpfs
keeps exactly as a disk does (a power cut is not something a test can perform).

An explicit ``--basetemp`` or ``PYTEST_DEBUG_TEMPROOT`` is respected, and without a
writable /dev/shm holding ``MIN_FREE`` the usual temporary directory is used. Each session
gets its own fresh directory there (parallel sessions never share one), removed at the end.
A session holds an flock on ``<directory>.lock`` while it runs, so the directory of one that
was killed (no end hook ran) is removed by the next session, and a live one's never is.

Where this Python writes no bytecode (``PYTHONDONTWRITEBYTECODE``, ``-B``), the processes the
tests start (every ``fedloom run`` daemon, CLI and worker process: hundreds) would each
compile fedloom's sources afresh, about half of a daemon's start-up CPU. So the session
first brings the checkout's own bytecode up to date (``compileall``: the ``__pycache__``
folders a plain ``python`` writes, git-ignored; only files older than their source are
compiled), as a first import would have where bytecode is written; what imports it reads
is unchanged, and installed packages are left alone.

The test modules themselves are imported through pytest's assertion rewriting, which caches
each rewritten module as a ``.pyc`` beside the others (``<name>.<tag>-pytest-<version>.pyc``,
checked against the source's hash on every read) only where Python writes bytecode, and
otherwise rewrites all of them again in every session (about 15 s of collection here). So
the session lets Python write bytecode while it collects (``pytest_collection``): pytest
reads the same rewritten code from the cache from the next session on, the asserts are
rewritten by pytest's own code as before, and nothing else is written there (the checkout's
bytecode is current already and pip compiled the installed packages'). Bytecode writing is
off again before the first test runs.
"""

from __future__ import annotations

import compileall
import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedloom.runtime.federation_files import PORT_RANGE_ENV, _pick_range
from tests.packaging.wheel_smoke import SUBPACKAGES

SHM = Path("/dev/shm")
PREFIX = "fedloom-pytest-"
MIN_FREE = 2 << 30  # bytes free on /dev/shm to put a session's tmp_path there
STALE_AFTER_S = 60.0  # a lock file this old and not held belongs to a killed session
_KEY = pytest.StashKey[tuple[Path, int]]()


def _sweep_killed_sessions() -> None:
    """Remove the directories of earlier sessions that ended without their end hook."""
    for lock in SHM.glob(f"{PREFIX}*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime < STALE_AFTER_S:
                continue  # just made: its session may not hold it yet
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError while a session runs
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)


def _in_memory_basetemp() -> tuple[Path, int] | None:
    """A fresh directory on /dev/shm and the fd of its held lock, or None."""
    if os.environ.get("PYTEST_DEBUG_TEMPROOT") or not SHM.is_dir():
        return None
    if not os.access(SHM, os.W_OK):
        return None
    _sweep_killed_sessions()
    if shutil.disk_usage(SHM).free < MIN_FREE:
        return None
    fd, lock = tempfile.mkstemp(prefix=PREFIX, suffix=".lock", dir=SHM)
    fcntl.flock(fd, fcntl.LOCK_EX)
    base = Path(lock).with_suffix("")
    base.mkdir(mode=0o700)
    return base, fd


REPO = Path(__file__).resolve().parents[1]
# The checkout's packages (``fedloom/`` links to the others) and the test modules daemons
# import (plans, servers written in tests).
SOURCES = ("fedloom", *SUBPACKAGES, "tests")


def _compile_checkout() -> None:
    """Bytecode for the checkout's sources where Python itself would write none."""
    if not sys.flags.dont_write_bytecode:
        return  # each first import writes it, as usual
    for name in SOURCES:
        folder = REPO / name
        if folder.is_dir() and not folder.is_symlink():
            compileall.compile_dir(folder, quiet=2, workers=1)


def _own_port_range() -> None:
    """Under pytest-xdist, each worker hands out daemon ports from its own slice of the
    range ``free_port`` picks from (``$FEDLOOM_PORT_RANGE``, inherited by the daemons and
    CLIs its tests start): ``free_port`` keeps one process's picks distinct, not two
    processes', and two workers' daemons on one port fail to start."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not worker.startswith("gw") or not count.isdigit():
        return
    index, n = int(worker.removeprefix("gw")), int(count)
    first, last = _pick_range()
    size = (last - first + 1) // max(1, n)
    if not 0 <= index < n or size < 100:
        return
    low = first + index * size
    os.environ[PORT_RANGE_ENV] = f"{low}-{low + size - 1}"


@pytest.hookimpl(tryfirst=True)  # before the tmpdir plugin reads the option
def pytest_configure(config: pytest.Config) -> None:
    _own_port_range()
    _compile_checkout()
    if config.option.basetemp is None and (made := _in_memory_basetemp()) is not None:
        config.option.basetemp = str(made[0])
        config.stash[_KEY] = made


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> object:
    """Collect with bytecode writing on, so pytest caches the rewritten test modules."""
    off = sys.dont_write_bytecode
    sys.dont_write_bytecode = False
    try:
        return (yield)
    finally:
        sys.dont_write_bytecode = off


def pytest_unconfigure(config: pytest.Config) -> None:
    made = config.stash.get(_KEY, None)
    if made is not None:
        base, fd = made
        shutil.rmtree(base, ignore_errors=True)
        base.with_suffix(".lock").unlink(missing_ok=True)
        os.close(fd)
