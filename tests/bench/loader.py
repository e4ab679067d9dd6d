"""Loading a bench script (``bench/<name>.py``) as a module for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as module ``fedloom_bench_<name>``, registered in ``sys.modules``
    (dataclasses look their module up), with ``bench/`` on the path while it runs (a bench
    may import its siblings, e.g. ``_common``)."""
    spec = importlib.util.spec_from_file_location(f"fedloom_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module
