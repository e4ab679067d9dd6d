"""A daemon's aggregator knows the roster's sites, so a region's relayed refusals are
checked against them (issue 14): the root and a region opened as ``fedloom run`` opens them
(``open_daemon``: roster, config, node), then a hostile region child relays refusals in
made-up names and in a real site's name (no ``[subtrees]``)."""

from __future__ import annotations

from pathlib import Path

from fedloom.algorithms.aggregator_base import AggregatorBase
from fedloom.algorithms.protocol import Log, Metric, Received
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import open_daemon
from fedloom.runtime.federation_files import ROOT_ID, write_federation
from fedloom.runtime.nodes import bound_claims
from fedloom.transport.roster import Roster
from fedloom.transport.wire import Hello, TrainRefused
from tests.runtime.test_e2e import SYNTHETIC

REGIONS = {"region-a": ["site-1", "site-2"], "region-b": ["site-3"]}


def site_labels(out: list[object]) -> list[str]:
    return [
        e.labels["site"]
        for e in out
        if isinstance(e, Metric) and e.name == "site_refusals" and e.labels
    ]


def test_the_root_believes_a_region_only_for_the_rosters_sites(tmp_path: Path) -> None:
    fed = write_federation(tmp_path / "fed", REGIONS, plan=SYNTHETIC, declare_examples=False)
    d = open_daemon(load_config(fed.nodes[ROOT_ID].config))
    try:
        root = d.node
        assert isinstance(root, AggregatorBase)
        assert root.claim_bounds.roster_sites == {"site-1", "site-2", "site-3"}
        root.handle(Received("region-a", Hello("region-a", "region")), 0.0)
        out = root.handle(Received("region-a", TrainRefused("site-3", 4, 0, "failed", "x")), 1.0)
        assert site_labels(out) == ["site-3"]  # a roster site: believed (no [subtrees])
        out = []
        for i in range(50):
            forged = TrainRefused(f"ghost-{i}", i, 0, "plan_not_approved", "made up")
            out += root.handle(Received("region-a", forged), 2.0 + i)
        assert site_labels(out) == ["other"] * 50
        assert set(root.refusals_view()) == {"site-3", "region-a"}
        assert root.refusals_view()["region-a"]["count"] == 50
        lines = [e for e in out if isinstance(e, Log) and "cannot speak for" in e.text]
        assert len(lines) == 1 and "region-a" in lines[0].text
    finally:
        d.close()


def test_a_region_takes_a_newer_rosters_sites(tmp_path: Path) -> None:
    fed = write_federation(tmp_path / "fed", REGIONS, plan=SYNTHETIC, declare_examples=False)
    cfg = load_config(fed.nodes["region-a"].config)
    d = open_daemon(cfg)
    try:
        region = d.node
        assert isinstance(region, AggregatorBase)
        assert region.claim_bounds.roster_sites == {"site-1", "site-2", "site-3"}
        fewer = Roster(d.roster.version + 1, [e for e in d.roster.entries if e.node_id != "site-3"])
        bound_claims(cfg, region, fewer)  # what installing a newer roster does
        assert region.claim_bounds.roster_sites == {"site-1", "site-2"}
    finally:
        d.close()
