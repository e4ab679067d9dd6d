"""The extras declared in pyproject.toml and what ``fedloom`` says when one is missing agree.

``fedloom.cli`` turns a ModuleNotFoundError for an extra's package into one line naming the
extra; these tests keep its table in step with pyproject.toml and run the real command with
the sim extra's packages made unimportable (as on a base install).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedloom.cli import _EXTRA_OF

REPO = Path(__file__).resolve().parents[2]
# Distribution name -> the module it installs, where the two differ.
MODULE_OF = {"scikit-learn": "sklearn", "prometheus-client": "prometheus_client"}


def _name(requirement: str) -> str:
    dist = re.split(r"[ <>=!~;\[(]", requirement, maxsplit=1)[0].lower()
    return MODULE_OF.get(dist, dist.replace("-", "_"))


def _project() -> dict[str, Any]:
    with (REPO / "pyproject.toml").open("rb") as fh:
        project: dict[str, Any] = tomllib.load(fh)["project"]
    return project


def test_every_sim_and_torch_package_is_named_with_its_extra() -> None:
    extras = _project()["optional-dependencies"]
    declared = {_name(req): extra for extra in ("sim", "torch") for req in extras[extra]}
    assert declared == _EXTRA_OF


def test_the_base_install_needs_no_extra_and_serves_metrics() -> None:
    base = {_name(req) for req in _project()["dependencies"]}
    assert not base & set(_EXTRA_OF), "a base dependency is also an extra's"
    # What a daemon cannot start without (the issue: prometheus-client was only an extra).
    assert {"numpy", "msgpack", "lz4", "pynacl", "aiohttp", "prometheus_client"} <= base


BLOCK = """\
import sys
for name in {modules!r}:
    sys.modules[name] = None  # import raises ModuleNotFoundError, as on a base install
from fedloom.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["sim", "plan"])
def test_simulator_commands_without_the_sim_extra_name_it_in_one_line(
    command: str, tmp_path: Path
) -> None:
    sim_modules = sorted(m for m, extra in _EXTRA_OF.items() if extra == "sim")
    scenario, out = REPO / "scenarios" / "hospitals.toml", tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK.format(modules=sim_modules), command, scenario, "--out", out],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "the 'sim' extra installs: pip install 'fedloom[sim]'" in lines[0]
    assert not out.exists()


def test_local_init_on_synthetic_data_needs_no_sim_extra(tmp_path: Path) -> None:
    blocked = sorted(_EXTRA_OF)
    fed = tmp_path / "fed"
    init = ["local", "init", str(fed), "--shape", "star", "--sites", "2", "--dataset", "synthetic"]
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK.format(modules=blocked), *init],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for node in ("root", "site-0", "site-1"):
        with (fed / f"{node}.toml").open("rb") as fh:
            plan = tomllib.load(fh)["plan"]
        assert plan["dataset"] == "synthetic"
        assert "dirichlet_alpha" not in plan
    with (fed / "roster.toml").open("rb") as fh:
        roster = tomllib.load(fh)
    examples = {n["id"]: n.get("examples") for n in roster["nodes"]}
    assert examples["site-0"] == examples["site-1"] == 180  # 200 a site, 10% held out


def test_local_init_refuses_an_unknown_dataset(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedloom", "local", "init", tmp_path / "f", "--dataset", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "fedloom: error: --dataset: 'nope' is not one of synthetic, breast_cancer, digits"
    )
