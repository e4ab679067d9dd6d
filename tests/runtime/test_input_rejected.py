"""Bad bytes from a connected peer are counted: ``fedloom_input_rejected_total{reason}``.

A rostered region that has authenticated sends the root bytes that are no wire message:
the root's connection refuses them and closes (as before, with a WARNING), and the
daemon's ``/metrics`` now counts it by reason. The connection-level hook is checked on
its own too: told once per refusal, never for a clean end."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fedloom.runtime.config import load_config
from fedloom.runtime.connection import Connection, WirePipe
from fedloom.runtime.daemon import open_daemon
from fedloom.runtime.federation_files import ROOT_ID, Federation, write_federation
from fedloom.runtime.harness import sample, scrape
from fedloom.runtime.metrics import MetricsSink
from fedloom.transport.links import LinkClosed, memory_link_pair
from fedloom.transport.wire import Hello
from tests.runtime.test_daemon import SYNTHETIC, running
from tests.runtime.test_hostile_rates_daemon import Region

LIMIT = 30.0  # a bound on each test, never a timing assertion
REJECTED = "fedloom_input_rejected_total"


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return write_federation(tmp_path / "fed", {"region-a": ["site-1"]}, plan=SYNTHETIC)


async def rejected(fed: Federation, reason: str) -> float:
    url = fed.nodes[ROOT_ID].metrics_url
    assert url is not None
    samples = await asyncio.to_thread(scrape, url, 2.0)
    return sample(samples, REJECTED, reason=reason) or 0.0


@pytest.mark.timeout(60)
async def test_a_running_root_counts_bad_bytes_from_a_connected_region(fed: Federation) -> None:
    d = open_daemon(load_config(fed.nodes[ROOT_ID].config))
    region = Region(fed, "region-a")
    async with running(d, fed.nodes[ROOT_ID].listen_port) as task, asyncio.timeout(LIMIT):
        assert await rejected(fed, "malformed") == 0.0
        for n in (1, 2):
            channel = await region.connect()  # authenticated: the gate let it in
            try:
                await channel.send_tensors(Hello("region-a", "region"))
                await channel.send_message(b"\x93 not a wire message")
                with pytest.raises(LinkClosed):  # the root closed the connection
                    while True:
                        await channel.recv_message()
            finally:
                await channel.close()
            while await rejected(fed, "malformed") < n:
                await asyncio.sleep(0.1)
            assert await rejected(fed, "malformed") == n
        assert not task.done()


async def test_a_connection_tells_its_hook_once_per_refusal_and_never_for_a_clean_end() -> None:
    told: list[tuple[str, str]] = []

    async def deliver(conn: Connection, msg: Any) -> None:
        pass

    async def run_one(payload: bytes | None) -> str:
        ours, theirs = memory_link_pair()
        conn = Connection("p", WirePipe(ours), local_id="me", on_rejected=lambda *a: told.append(a))
        job = asyncio.ensure_future(conn.run(deliver))
        if payload is None:
            await theirs.close()
        else:
            await theirs.send(payload)
        async with asyncio.timeout(LIMIT):
            return await job

    assert "bad bytes from the peer (malformed)" in await run_one(b"\x93 garbage")
    assert told == [("p", "malformed")]
    assert "link closed" in await run_one(None)
    assert told == [("p", "malformed")]  # a clean end is no refusal


def test_the_sink_counts_refusals_by_reason() -> None:
    sink = MetricsSink()
    assert sink.value(REJECTED, {"reason": "malformed"}) is None
    for reason in ("malformed", "malformed", "too_large"):
        sink.input_rejected("site-1", reason)
    assert sink.value(REJECTED, {"reason": "malformed"}) == 2.0
    assert sink.value(REJECTED, {"reason": "too_large"}) == 1.0
