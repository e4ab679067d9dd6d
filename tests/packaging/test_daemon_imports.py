"""A root and a site daemon, started and run by the real ``fedloom run``, load no simulator
module and none of the sim and torch extras' packages (matplotlib, scikit-learn, networkx,
scipy, rich, psutil, torch), although this environment has them all installed: a daemon on a
base install would otherwise die with ImportError, or drag the simulator in.

Each daemon runs under a small wrapper that calls ``fedloom.cli.main`` and, when the daemon
has stopped (SIGTERM, once the root has published model versions the site trained), writes
every module it ever loaded; so a module imported at start, while training, aggregating or
serving /metrics, or while stopping all count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .wheel_smoke import _clean_env, run_federation, write_federation

# Top-level packages (or fedloom subpackages) a daemon must never load.
FORBIDDEN = (
    "fedloom.sim",
    "matplotlib",
    "sklearn",
    "networkx",
    "scipy",
    "rich",
    "psutil",
    "torch",
)

WRAPPER = """\
import sys
from pathlib import Path

from fedloom.cli import main

out = Path(sys.argv.pop(1))
try:
    status = main(sys.argv[1:])
finally:
    node = Path(sys.argv[sys.argv.index("--config") + 1]).stem
    (out / f"{node}.modules").write_text("\\n".join(sorted(sys.modules)), encoding="utf-8")
sys.exit(status)
"""


def _forbidden(modules: list[str]) -> list[str]:
    """The forbidden packages among ``modules`` (each named once, with how many modules)."""
    hits = [f for m in modules for f in FORBIDDEN if m == f or m.startswith(f + ".")]
    return [f"{f} ({hits.count(f)} modules)" for f in FORBIDDEN if f in hits]


@pytest.mark.timeout(120)
def test_root_and_site_daemons_load_no_simulator_and_no_sim_extras(tmp_path: Path) -> None:
    # The forbidden packages are installed here: a daemon that imports one would load it.
    for name in FORBIDDEN[1:]:
        __import__(name.split(".")[0])  # fails the test if the environment lacks one
    env = _clean_env()
    fed = tmp_path / "federation"
    fed.mkdir()
    cli = [sys.executable, "-m", "fedloom"]
    configs, url = write_federation(cli, Path(sys.executable), fed, env, n_sites=1)
    wrapper = tmp_path / "daemon.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    dumps = tmp_path / "modules"
    dumps.mkdir()

    run_federation(
        [sys.executable, wrapper, dumps], configs, url, fed, env, versions=3, timeout=60.0
    )

    for node in ("root", "site-0"):
        modules = (dumps / f"{node}.modules").read_text(encoding="utf-8").split()
        assert "fedloom.runtime.daemon" in modules or any(
            m.startswith("fedloom.runtime.daemon.") for m in modules
        ), f"{node}: the wrapper did not run a daemon"
        assert "fedloom.workloads.models" in modules, f"{node}: no model was built"
        assert _forbidden(modules) == [], f"{node} loaded {_forbidden(modules)}"
