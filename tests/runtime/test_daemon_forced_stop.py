"""A stop forced while the state disk stalls (issue 13 review): when the grace period ends
with the driver still waiting for a write, serve() ends normally with one WARNING line (no
CancelledError traceback, so `fedloom run` exits 0) and writes no final checkpoint on the
stalled disk: the log already holds everything acknowledged."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fedloom.runtime import serve as serve_mod
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import open_daemon, serve
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.federation_files import ROOT_ID, Federation
from tests.runtime.test_daemon import fed

__all__ = ["fed"]  # the fixture, shared with test_daemon


class StalledDriver(AsyncDriver):
    """Ends run() as AsyncDriver does when force_stop cancels it during a write that never
    completes in time: the cancellation, with the unwritten group counted."""

    async def run(self) -> None:
        try:
            await asyncio.sleep(3600)  # stop() does not end it: a write is stuck
        except asyncio.CancelledError:
            self.unwritten_at_forced_stop = 3
            raise


async def test_a_stop_forced_during_a_stalled_write_is_one_line_and_a_normal_return(
    fed: Federation, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(serve_mod, "AsyncDriver", StalledDriver)
    monkeypatch.setattr(serve_mod, "STOP_GRACE_S", 0.1)
    cfg = load_config(fed.nodes[ROOT_ID].config)
    d = open_daemon(cfg)
    epoch = d.store.epoch
    shutdown = asyncio.Event()
    caplog.set_level(logging.INFO, logger="fedloom")
    try:
        shutdown.set()  # a stop asked for at once: the driver never ends by itself
        # serve() returns: no CancelledError comes out of it.
        await asyncio.wait_for(serve(d, install_signals=False, shutdown=shutdown), 10)
        assert d.store.epoch == epoch  # no final checkpoint written on the stalled disk
    finally:
        d.close()
    lines = [r for r in caplog.records if "state write was still in progress" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "3 record(s)" in lines[0].getMessage()
    assert "stopped cleanly" not in caplog.text and "Traceback" not in caplog.text
    assert sum("still stopping" in r.getMessage() for r in caplog.records) == 1  # warned once
