"""Shared set-up for the real-daemon tests that serve a federation in this process
(``open_daemon`` + ``serve`` over real WebSockets on loopback): editing a node's TOML,
waiting for a condition, reading a published JSON file, a root-and-sites star, and the
``serving`` context that starts every daemon and stops them all (bounded) at the end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import Daemon, open_daemon, serve
from fedloom.runtime.federation_files import ROOT_ID, Federation, write_federation

SYNTHETIC = {"dataset": "synthetic", "model": "softmax", "alpha": 0.5, "beta": 0.5}
# Connection timings short enough for a test: a lost peer is noticed and redialled fast.
FAST = {"keepalive_s": 1.0, "down_after_s": 5.0, "backoff_base_s": 0.05, "backoff_cap_s": 0.3}


def edit(path: Path, **changes: object) -> None:
    """Set (replace) top-level tables or keys of the TOML file at ``path``."""
    cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    cfg.update(changes)
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")


async def until(
    what: str, check: Callable[[], Any], timeout: float = 45.0, every: float = 0.1
) -> Any:
    """``check()``'s first true value, polled every ``every`` s; fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := check()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)
    return value


def read_json(path: Path) -> Any:
    """The JSON at ``path``, or None while it is missing or not (yet) whole."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def flower_plan(factory: str, partition: int) -> dict[str, object]:
    """A ``[plan]`` that runs the Flower client ``factory`` on partition ``partition``."""
    args = {"partition-id": partition, "num-partitions": 3, "local-epochs": 1}
    return {"factory": factory, "args": args}


def star(tmp_path: Path, sites: list[str], **options: Any) -> Federation:
    """A root and ``sites`` dialling it directly (no region); ``options`` go to
    ``write_federation`` (``plan`` defaults to ``SYNTHETIC``)."""
    options.setdefault("plan", SYNTHETIC)
    fed = write_federation(tmp_path / "fed", {"region-a": sites}, **options)
    root = fed.nodes[ROOT_ID]
    edit(root.config, children=sites)
    url = f"ws://127.0.0.1:{root.listen_port}/fedloom"
    for s in sites:
        edit(fed.nodes[s].config, parent={"id": ROOT_ID, "url": url})
    del fed.nodes["region-a"]
    return fed


def region_federation(tmp_path: Path, sites: list[str]) -> Federation:
    """A root, ``region-a`` and ``sites`` under it, with buffers of one (every update
    makes a release) and ``FAST`` connections."""
    return write_federation(
        tmp_path / "fed",
        {"region-a": sites},
        plan={"dataset": "synthetic", "model": "softmax"},
        root_aggregation={"buffer_size": 1},
        region_aggregation={"buffer_size": 1, "concurrency": 4},
        connection=FAST,
    )


@contextlib.asynccontextmanager
async def serving(
    nodes: Federation | Mapping[str, Path], **serve_options: Any
) -> AsyncIterator[dict[str, Daemon]]:
    """Every daemon of ``nodes`` (a federation, or node id -> config path) served in this
    process, with ``serve_options`` passed to ``serve``. On a normal exit of the block no
    daemon may have ended by itself, and each must stop without an error; at the end all
    are stopped (bounded) and closed."""
    if isinstance(nodes, Federation):
        nodes = {n: f.config for n, f in nodes.nodes.items()}
    daemons = {n: open_daemon(load_config(path)) for n, path in nodes.items()}
    shutdown = asyncio.Event()
    tasks = [
        asyncio.create_task(serve(d, install_signals=False, shutdown=shutdown, **serve_options))
        for d in daemons.values()
    ]
    try:
        yield daemons
        for t in tasks:
            assert not t.done(), t  # no daemon ended by itself
    finally:
        shutdown.set()
        try:
            ends = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        finally:
            for d in daemons.values():
                d.close()
    for end in ends:
        if isinstance(end, BaseException):
            raise end
