"""The daemons' malloc settings reach the processes that fedloom starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedloom.runtime.harness import daemon_env
from fedloom.runtime.malloc_tuning import GLIBC_TUNABLES, malloc_env


def test_the_setting_is_added_and_an_operators_own_wins() -> None:
    assert malloc_env({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": GLIBC_TUNABLES}
    own = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert malloc_env(own) == own


def test_demo_daemons_start_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    env = daemon_env()
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['GLIBC_TUNABLES'])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == env["GLIBC_TUNABLES"]
    assert env["GLIBC_TUNABLES"] == GLIBC_TUNABLES
