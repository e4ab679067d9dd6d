"""Plumbing shared by the benchmarks that run daemons as separate processes."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import nacl.signing
import numpy as np

from fedloom.algorithms.protocol import Weights
from fedloom.runtime.malloc_tuning import malloc_env
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry


def daemon_malloc() -> str:
    """Run this benchmark and the processes it starts with the daemons' malloc settings;
    returns them for the report. glibc reads them at process start, so a process started
    without them re-executes itself once with them (call this first thing in ``main``)."""
    if "GLIBC_TUNABLES" not in os.environ:
        os.environ.update(malloc_env(os.environ))
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.argv])
    return os.environ["GLIBC_TUNABLES"]


def install_loop() -> str:
    """Use uvloop when it is installed; return the loop's name for the report."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def model_weights(params: int, width: int, small: Mapping[str, int], scale: float) -> Weights:
    """A model-shaped fp32 weight set: one large ``width``-wide matrix plus small tensors."""
    rng = np.random.default_rng(0)
    big = params - sum(small.values())
    rows = big // width
    shapes: dict[str, tuple[int, ...]] = {
        "fc1.weight": (rows, width),
        "fc1.extra": (big - rows * width,),
        **{k: (v,) for k, v in small.items()},
    }
    return {k: rng.standard_normal(s, dtype=np.float32) * scale for k, s in shapes.items()}


def pki(roles: Mapping[str, str], seeds: Mapping[str, bytes]) -> tuple[dict[str, Identity], Roster]:
    """Identities from fixed seeds (so every process derives the same keys) and their roster."""
    ids = {n: Identity(n, role, nacl.signing.SigningKey(seeds[n])) for n, role in roles.items()}
    roster = Roster(1, [RosterEntry(i.node_id, i.role, i.public_key) for i in ids.values()])
    return ids, roster


def stop_processes(procs: Iterable[Any]) -> None:
    """Terminate, then kill what did not stop: a benchmark never leaves a process behind."""
    procs = list(procs)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
