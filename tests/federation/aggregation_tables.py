"""An ``[aggregation]`` table read as a scenario's and as a root daemon's: the error each
strict reader refuses it with (its message names the field's path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.config import parse_config
from fedloom.sim.scenario import parse_scenario
from tests.federation.test_factory import CONSORTIUM


def scenario_error(table: dict[str, Any]) -> str:
    """The ``ConfigError`` a one-arm scenario with ``table`` as its algorithm gets."""
    raw = {
        "name": "q",
        "duration_s": 10,
        "data": {"dataset": "synthetic"},
        "sites": {"count": 4},
        "algorithm": table,
        "arms": [{"name": "a", "algorithm": "fedbuff", "topology": "star"}],
    }
    with pytest.raises(ConfigError) as err:
        parse_scenario(raw)
    return str(err.value)


def daemon_config_error(table: dict[str, Any]) -> str:
    """The ``ConfigError`` a FedBuff root's config with ``table`` in ``[aggregation]`` gets."""
    raw = {
        "role": "root",
        "node_id": "root",
        "state_dir": "state",
        "identity": {"key": "keys/root.key"},
        "roster": {"path": "roster.toml", "consortium_key": CONSORTIUM},
        "children": ["a", "b"],
        "listen": {"port": 7443},
        "plan": {"dataset": "synthetic", "model": "softmax", "n_sites": 2},
        "aggregation": {"algorithm": "fedbuff", **table},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=Path("/etc/fedloom"))
    return str(err.value)
