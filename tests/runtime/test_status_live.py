"""The operator's view of a real federation: a root, a region and two sites served in
process (real links, real training), ``fedloom status`` against the root's metrics port
(and against a closed one), and the root's ``/status`` page loaded in Debian's chromium
driven by Playwright: the DOM, the curves, the CSP header, no request leaving 127.0.0.1,
and a screenshot that is a real picture. Bounded (``pytest.mark.timeout``); every daemon
is stopped, the browser closed."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import tomli_w

from fedloom.cli import main
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import open_daemon, serve
from fedloom.runtime.federation_files import ROOT_ID, Federation, free_port, write_federation
from fedloom.runtime.status import SCHEMA
from fedloom.runtime.status_page import CSP
from fedloom.runtime.trainer import GlobalPlan
from fedloom.workloads.workload import from_config

pytestmark = pytest.mark.timeout(60)

CHROMIUM = "/usr/bin/chromium"
SYNTHETIC = {"dataset": "synthetic", "model": "softmax"}
SITES = ["site-1", "site-2"]
REFUSING = "site-3"  # its plan fails every job: the root's refusal book shows it


def refusing_plan(**workload: Any) -> GlobalPlan:
    """The workload's model without local data: every job fails (a ``[plan] factory``)."""
    return GlobalPlan(from_config(workload))


@contextlib.asynccontextmanager
async def live_federation(tmp_path: Path) -> AsyncIterator[tuple[Federation, str]]:
    """Root -> region-a -> site-1, site-2 and site-3 (whose plan fails every job), all
    served in this process until the block ends; yields the federation and the root's
    metrics URL once the root holds version 3, has evaluated a model, has heard of both
    training sites, has site-3's refusal and has published two federated evaluations."""
    fed = write_federation(
        tmp_path / "fed",
        {"region-a": [*SITES, REFUSING]},
        plan=SYNTHETIC,
        training={"lr": 0.1, "local_steps": 2, "batch_size": 8, "mu": 0.0},
        region_aggregation={"buffer_size": 2, "concurrency": 2},
        root_aggregation={"buffer_size": 1},
    )
    root_cfg = fed.config(ROOT_ID)
    root_cfg["evaluation"] = {"every": 2, "min_sites": 2}  # federated evaluation too
    fed.nodes[ROOT_ID].config.write_text(tomli_w.dumps(root_cfg), encoding="utf-8")
    site_cfg = fed.config(REFUSING)
    table = {k: v for k, v in site_cfg["plan"].items() if k != "site_index"}
    site_cfg["plan"] = {"factory": f"{__name__}:refusing_plan", "args": table}
    fed.nodes[REFUSING].config.write_text(tomli_w.dumps(site_cfg), encoding="utf-8")
    daemons = [open_daemon(load_config(n.config)) for n in fed.nodes.values()]
    shutdown = asyncio.Event()
    tasks = [
        asyncio.create_task(
            serve(d, install_signals=False, shutdown=shutdown, eval_interval_s=0.2, ready_wait_s=2)
        )
        for d in daemons
    ]
    url = fed.nodes[ROOT_ID].metrics_url
    assert url is not None
    try:
        deadline = asyncio.get_running_loop().time() + 40
        async with aiohttp.ClientSession() as http:
            while True:
                doc: dict[str, Any] = {}
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"{url}/status.json") as resp:
                        doc = await resp.json()
                sites = {s["id"] for s in doc.get("tiers", [[], [], []])[2]}
                federated = (doc.get("federated_evaluation") or {}).get("evaluation") or {}
                if (
                    (doc.get("model", {}).get("version") or 0) >= 3
                    and doc.get("accuracy")
                    and sites == set(SITES)
                    and len(federated.get("published") or []) >= 2
                    and REFUSING in (doc.get("refusals") or {})
                ):
                    break
                for t in tasks:
                    if t.done():
                        t.result()  # a daemon that died: its error, not a time-out
                assert asyncio.get_running_loop().time() < deadline, f"no progress: {doc}"
                await asyncio.sleep(0.2)
        yield fed, url
    finally:
        shutdown.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        for d in daemons:
            d.close()


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


async def test_fedloom_status_prints_a_live_federation(tmp_path: Path) -> None:
    async with live_federation(tmp_path) as (fed, url):
        # The CLI blocks (urllib): off the loop the daemons run on.
        code, out, err = await asyncio.to_thread(
            run_cli, "status", "--config", str(fed.nodes[ROOT_ID].config)
        )
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].startswith("root (root), fedbuff")
        version = int(lines[1].split()[2])
        assert version >= 3
        assert lines[2].startswith("accuracy: 0.") or lines[2].startswith("accuracy: 1.")
        region = next(x for x in lines if "region-a (region)" in x)
        assert "● region-a (region)  connected  last update" in region
        for site in SITES:
            line = next(x for x in lines if f"{site} (site)" in x)
            assert line.startswith("        · ") and "s ago" in line  # under its region
        assert "privacy: no central DP" in lines
        refusal = lines[lines.index("refusals:") + 1]
        assert refusal.startswith(f"  {REFUSING}: failed x") and "no local data" in refusal
        fed_line = next(x for x in lines if x.startswith("federated evaluation (every 2 "))
        assert re.search(
            r"accuracy [01]\.\d{4} \(loss \d+\.\d{4}\) at version \d+ over \d sites", fed_line
        )
        code, out, err = await asyncio.to_thread(run_cli, "status", "--url", url, "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["schema"] == SCHEMA and doc["model"]["version"] >= version
        # A region keeps a board too: its sites are its children, linked to it.
        region_url = fed.nodes["region-a"].metrics_url
        assert region_url is not None
        code, out, err = await asyncio.to_thread(run_cli, "status", "--url", region_url, "--json")
        assert code == 0, err
        doc = json.loads(out)
        me, children = doc["tiers"][0][0], doc["tiers"][1]
        assert me["id"] == "region-a" and me["parent"] == ROOT_ID and me["parent_connected"]
        assert {c["id"]: c["connected"] for c in children} == dict.fromkeys(
            [*SITES, REFUSING], True
        )
        assert all(c["updates"] >= 1 for c in children if c["id"] != REFUSING)
        assert doc["refusals"][REFUSING]["code"] == "failed"


def test_fedloom_status_says_in_one_line_why_it_sees_nothing(tmp_path: Path) -> None:
    closed = free_port()
    code, out, err = run_cli("status", "--url", f"http://127.0.0.1:{closed}", "--timeout", "2")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "cannot reach" in err and "[metrics] port" in err
    fed = write_federation(tmp_path / "fed", {"region-a": ["site-1"]}, plan=SYNTHETIC)
    code, out, err = run_cli("status", "--config", str(fed.nodes["site-1"].config))
    assert code == 1 and err.count("\n") == 1
    assert "no metrics endpoint: set [metrics] port" in err
    code, out, err = run_cli("status", "--url", "ftp://x")
    assert code == 2 and "http://HOST:PORT" in err


# ------------------------------------------------------------------------ the browser


def browse(url: str, shot: Path) -> dict[str, Any]:
    """Load ``url`` in headless chromium; what the page showed and what it requested."""
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            resp = page.goto(f"{url}/status", wait_until="load", timeout=15000)
            assert resp is not None
            seen = {
                "status": resp.status,
                "headers": resp.headers,
                "title": page.title(),
                "node": page.inner_text("#node"),
                "version": page.inner_text("#fact-model-version"),
                "topology": page.eval_on_selector_all(
                    "#topology g.node", "gs => gs.map(g => g.getAttribute('data-id'))"
                ),
                "curves": page.eval_on_selector_all(
                    "svg polyline.curve", "ps => ps.map(p => p.closest('svg').id)"
                ),
                "points": page.get_attribute("#versions polyline.curve", "points"),
                "scripts": page.eval_on_selector_all("script", "s => s.length"),
                "refusals": page.eval_on_selector_all(
                    "#refusals tr", "rs => rs.map(r => r.innerText)"
                ),
            }
            page.screenshot(path=str(shot), full_page=False)
        finally:
            browser.close()
    seen["requests"] = requests
    return seen


@pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"Debian's chromium ({CHROMIUM}) is not installed"
)
async def test_the_status_page_in_a_real_browser(tmp_path: Path) -> None:
    shot = tmp_path / "status.png"
    async with live_federation(tmp_path) as (_, url):
        seen = await asyncio.to_thread(browse, url, shot)
    assert seen["status"] == 200
    assert seen["headers"]["content-security-policy"] == CSP
    assert seen["node"] == "root" and seen["title"] == "fedloom · root"
    version = int(seen["version"].split(":")[1])
    assert version >= 3
    assert {"root", "region-a", *SITES} <= set(seen["topology"])
    assert set(seen["curves"]) == {"versions", "accuracy", "federated-accuracy"}
    assert len(seen["points"].split()) >= 3  # a step line through >= 2 versions
    assert seen["scripts"] == 0
    assert any(row.startswith(f"{REFUSING}\tfailed") for row in seen["refusals"])
    # Nothing but the page itself (and no favicon or font from anywhere else).
    assert seen["requests"], "the browser made no request"
    for requested in seen["requests"]:
        assert requested.startswith(url), requested
    from PIL import Image  # matplotlib's dependency (the sim extra the tests install)

    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == (1200, 900)
        pixels = np.asarray(img.convert("RGB"), dtype=np.float64)
    # Not blank: the pixel values vary and many colours are used (text, boxes, curves).
    assert pixels.std() > 10.0
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) >= 16
    # The links are drawn in their colours: green (connected) somewhere on the page.
    green = (pixels[..., 1] > 140) & (pixels[..., 0] < 90) & (pixels[..., 2] < 120)
    assert green.sum() > 20
