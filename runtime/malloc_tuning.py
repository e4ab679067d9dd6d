"""glibc malloc settings for processes that allocate model-sized buffers every round.

glibc serves an allocation above its mmap threshold (dynamic, capped at 32 MiB) with a
fresh ``mmap`` and gives it back with ``munmap`` when freed. A daemon decodes, trains on,
aggregates and checkpoints whole models: with a 100 MB model every one of those arrays is
fresh memory, paid for in page faults and the kernel zeroing 100 MB each time. Keeping
allocations up to 256 MiB on the heap, and up to 1 GiB of freed memory at its top, lets
the next round reuse the same pages. Measured on this 2-CPU machine: ten 100 MB array
operations 0.24 -> 0.15 s; ``bench/round.py`` (100 MB FedAvg round) 1.72-1.81 -> 1.51-1.64
s; ``bench/transport_throughput.py`` secure fp32 ~300 -> 390-490 MB/s. The price is resident
memory: it stays at its high-water mark between rounds instead of dropping.

Tunables are read when a process starts, so they travel in its environment: the systemd
units set ``Environment=GLIBC_TUNABLES=...`` (the same string as ``GLIBC_TUNABLES`` here,
which a test checks), and ``fedloom demo`` and the process benchmarks set it for the
processes they start. Elsewhere than glibc the variable is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["GLIBC_TUNABLES", "malloc_env"]

GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"


def malloc_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the daemon malloc settings (an operator's own ``GLIBC_TUNABLES`` wins)."""
    out = dict(env)
    out.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
    return out
