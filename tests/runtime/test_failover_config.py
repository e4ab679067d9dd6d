"""Failover settings in daemon configs: ``[[parent.fallback]]``, ``failover_after_s``,
``max_held`` (sites) and ``[subtrees]`` (aggregators); each mistake is one clear error."""

from __future__ import annotations

from typing import Any

import pytest

from fedloom.algorithms.incorporation import MAX_HELD_LIMIT
from fedloom.federation.config_reader import ConfigError
from tests.runtime.test_config import parse, root_raw, site_raw

STANDBY = {"id": "region-eu-b", "url": "ws://region-eu-b.example.org:7443/fedloom"}


def test_a_site_reads_its_fallbacks_and_failover_settings() -> None:
    raw = site_raw()
    raw["parent"] |= {"fallback": [STANDBY], "failover_after_s": 30, "max_held": 8}
    cfg = parse(raw)
    assert [f.id for f in cfg.fallbacks] == ["region-eu-b"]
    assert cfg.fallbacks[0].url == STANDBY["url"]
    assert (cfg.failover_after_s, cfg.max_held) == (30.0, 8)
    plain = parse(site_raw())
    assert plain.fallbacks == () and plain.failover_after_s == 60.0 and plain.max_held == 32


def test_a_root_reads_the_subtrees_of_its_regions() -> None:
    raw = root_raw()
    raw["subtrees"] = {"region-eu": ["site-1", "site-2"], "region-us": ["site-3"]}
    assert parse(raw).subtrees == {"region-eu": ("site-1", "site-2"), "region-us": ("site-3",)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["parent"].update(fallback=[{"id": "region-eu-b"}]), "url"),
        (lambda r: r["parent"].update(fallback=[dict(STANDBY, id=r["parent"]["id"])]), "twice"),
        (lambda r: r["parent"].update(fallback=[STANDBY, STANDBY]), "twice"),
        (lambda r: r["parent"].update(fallback=["region-eu-b"]), "table"),
        (lambda r: r["parent"].update(failover_after_s=0), "failover_after_s"),
        (lambda r: r["parent"].update(max_held=0), "max_held"),
        # More kept updates than the root's pair ledger tolerates out of order.
        (lambda r: r["parent"].update(max_held=MAX_HELD_LIMIT + 1), "max_held"),
        (lambda r: r.update(subtrees={"region-eu": ["site-1"]}), "only aggregators"),
    ],
)
def test_site_mistakes_are_named(change: Any, message: str) -> None:
    raw = site_raw()
    change(raw)
    with pytest.raises(ConfigError, match=message):
        parse(raw)


def test_root_mistakes_are_named() -> None:
    raw = root_raw()
    raw["subtrees"] = {"region-asia": ["site-1"]}
    with pytest.raises(ConfigError, match=r"subtrees\.region-asia: not one of children"):
        parse(raw)
    raw = root_raw()
    raw["subtrees"] = {"region-eu": ["site-1", "site-1"]}
    with pytest.raises(ConfigError, match="listed twice"):
        parse(raw)


def test_only_sites_fail_over() -> None:
    raw = root_raw()
    del raw["plan"]
    raw.update(role="region", node_id="region-eu", children=["site-1"], aggregation={})
    raw["parent"] = {
        "id": "root",
        "url": "ws://root.example.org:7443/fedloom",
        "fallback": [STANDBY],
    }
    with pytest.raises(ConfigError, match="only sites fail over"):
        parse(raw)


def test_a_region_and_its_standby_keep_their_forwards_parts() -> None:
    raw = root_raw()
    del raw["plan"]
    raw.update(role="region", node_id="region-eu", children=["site-1"], aggregation={})
    raw["parent"] = {"id": "root", "url": "ws://root.example.org:7443/fedloom"}
    assert not parse(raw).has_standby
    raw["failover"] = {"has_standby": True}
    assert parse(raw).has_standby
    site = site_raw()
    site["failover"] = {"has_standby": True}
    with pytest.raises(ConfigError, match="only a region"):
        parse(site)
