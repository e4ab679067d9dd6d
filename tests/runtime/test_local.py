"""``fedloom local up DIR`` with DIR relative to where it is run: the daemons it starts run in
another working directory (``runtime.harness``), so DIR must become absolute first."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _fedloom(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedloom", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(120)
def test_local_up_with_a_relative_directory_starts_every_daemon(tmp_path: Path) -> None:
    init = _fedloom(
        "local", "init", "fed", "--shape", "star", "--sites", "1", "--dataset", "synthetic",
        cwd=tmp_path,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    logs = tmp_path / "fed" / "logs"
    up = subprocess.Popen(
        [sys.executable, "-m", "fedloom", "local", "up", "fed"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        ready: set[str] = set()
        while ready != {"root", "site-0"} and up.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            ready = {
                log.stem
                for log in logs.glob("*.log")
                if '"ready": true' in log.read_text(errors="replace")
            }
        root_log = (logs / "root.log").read_text(errors="replace")
        assert up.poll() is None, f"local up exited {up.returncode}; root's log: {root_log[-2000:]}"
        assert ready == {"root", "site-0"}, root_log[-2000:]
        up.send_signal(signal.SIGTERM)
        out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
    assert up.returncode == 0, err
    assert "stopped 2 daemons" in out
    assert "config file not found" not in root_log
