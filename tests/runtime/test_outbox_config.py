"""``[outbox] max_mib``: the backpressure bound of a site's or region's outbox."""

from __future__ import annotations

from typing import Any

import pytest

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.config import DaemonConfig
from fedloom.runtime.daemon import outbox_bytes
from fedloom.transport.limits import MiB
from tests.runtime.test_config import parse, root_raw, site_raw


def with_outbox(raw: dict[str, Any], value: object) -> DaemonConfig:
    return parse({**raw, "outbox": {"max_mib": value}})


def test_absent_means_derived_from_the_model() -> None:
    cfg = parse(site_raw())
    assert cfg.outbox_max_mib is None and outbox_bytes(cfg) is None


def test_a_bound_in_mib_becomes_bytes() -> None:
    cfg = with_outbox(site_raw(), 1.5)
    assert cfg.outbox_max_mib == 1.5 and outbox_bytes(cfg) == int(1.5 * MiB)


@pytest.mark.parametrize("bad", [0, -1, "64", True, float("nan"), float("inf")])
def test_bad_values_name_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"outbox\.max_mib"):
        with_outbox(site_raw(), bad)


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="max_bytes"):
        parse({**site_raw(), "outbox": {"max_bytes": 1}})


def test_a_root_has_no_outbox() -> None:
    with pytest.raises(ConfigError, match=r"outbox\.max_mib: only sites and regions"):
        with_outbox(root_raw(), 8)
