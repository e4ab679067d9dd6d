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
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

SHM = Path("/dev/shm")
MIN_FREE = 2 << 30  # bytes free on /dev/shm to put a session's tmp_path there
_KEY = pytest.StashKey[Path]()


def _in_memory_basetemp() -> Path | None:
    if os.environ.get("PYTEST_DEBUG_TEMPROOT") or not SHM.is_dir():
        return None
    if not os.access(SHM, os.W_OK) or shutil.disk_usage(SHM).free < MIN_FREE:
        return None
    return Path(tempfile.mkdtemp(prefix="fedloom-pytest-", dir=SHM))


@pytest.hookimpl(tryfirst=True)  # before the tmpdir plugin reads the option
def pytest_configure(config: pytest.Config) -> None:
    if config.option.basetemp is None and (base := _in_memory_basetemp()) is not None:
        config.option.basetemp = str(base)
        config.stash[_KEY] = base


def pytest_unconfigure(config: pytest.Config) -> None:
    base = config.stash.get(_KEY, None)
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)
