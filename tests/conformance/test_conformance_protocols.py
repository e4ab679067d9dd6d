"""The real protocol nodes under a driver: progress, exactly-once, failures absorbed."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.gossip import GossipPeer
from fedloom.algorithms.regional import RegionalAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.sync import SyncAggregator
from fedloom.topology.gossip import gossip
from fedloom.topology.specs import Site
from fedloom.topology.wan import WanModel
from tests.conformance.harness import Federation, metric_count, metrics, version_of
from tests.conformance.toy_nodes import NoisyTrainer


def model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((4, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def site_ids(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


def fedbuff_star(
    n_sites: int, *, buffer_size: int = 2, concurrency: int | None = None, timeout: float = 30.0
) -> tuple[dict[str, Any], dict[str, str], list[tuple[str, str]]]:
    sites = site_ids(n_sites)
    root = FedBuffAggregator(
        "root",
        {s: "site" for s in sites},
        model(),
        buffer_size=buffer_size,
        concurrency=concurrency or n_sites,
        task_timeout_s=timeout,
        train_config={"lr": 0.1},
        rng=0,
    )
    nodes: dict[str, Any] = {"root": root}
    nodes.update({s: SiteNode(s, "root", n_examples=10) for s in sites})
    roles = {"root": "root", **{s: "site" for s in sites}}
    return nodes, roles, [("root", s) for s in sites]


def test_star_fedbuff_reaches_versions(federation: Federation) -> None:
    nodes, roles, pairs = fedbuff_star(4)
    federation.start(nodes, roles, pairs, trainer=NoisyTrainer())
    assert federation.run_until(lambda: version_of(federation, "root") >= 10, timeout_s=600)
    applied = metrics(federation, "update_applied")
    assert len(applied) >= 20  # K = 2 updates per version
    assert {m.labels["src"] for m in applied} == set(site_ids(4))
    assert federation.journal.checker.updates_duplicated == 0
    # The model moved: every applied delta pushes the weights up.
    _, weights = federation.node("root").current_model()
    assert float(np.mean(weights["w"])) > 0.1


def test_resend_after_reconnect_is_deduplicated(federation: Federation) -> None:
    nodes, roles, pairs = fedbuff_star(3)
    federation.start(nodes, roles, pairs, trainer=NoisyTrainer())
    # Cut the first site whose update is applied right away: its Ack is still in flight.
    assert federation.run_until(lambda: metric_count(federation, "update_applied") >= 1, 300)
    victim = metrics(federation, "update_applied")[0].labels["src"]
    site = federation.node(victim)
    federation.partition([victim], duration_s=5.0)
    federation.run_for(10.0)
    assert federation.run_until(lambda: site.pending == 0, timeout_s=300)
    if federation.exact_timing:
        # The lost Ack made the site resend; the root recognised the duplicate.
        dupes = metrics(federation, "update_duplicate")
        assert any(m.labels.get("src") == victim for m in dupes)
    assert federation.journal.checker.updates_duplicated == 0
    applied = {(m.labels["src"], m.labels["seq"]) for m in metrics(federation, "update_applied")}
    seqs = sorted(int(seq) for src, seq in applied if src == victim)
    assert seqs == list(range(1, len(seqs) + 1))  # no gaps: nothing was lost either


def test_sync_round_completes_with_a_dropout(federation: Federation) -> None:
    sites = site_ids(3)
    root = SyncAggregator(
        "root",
        {s: "site" for s in sites},
        model(),
        clients_per_round=3,
        round_timeout_s=20.0,
        min_cohort=2,
        train_config={"lr": 0.1},
        rng=0,
    )
    nodes: dict[str, Any] = {"root": root, **{s: SiteNode(s, "root", n_examples=10) for s in sites}}
    roles = {"root": "root", **{s: "site" for s in sites}}
    federation.fail_next_jobs("site-00")
    federation.start(nodes, roles, [("root", s) for s in sites], trainer=NoisyTrainer())
    assert federation.run_until(lambda: version_of(federation, "root") >= 3, timeout_s=300)
    assert federation.node("site-00").jobs_failed == 1
    assert metric_count(federation, "train_failed") == 1
    assert federation.journal.checker.updates_duplicated == 0


def test_gossip_peers_reach_consensus(federation: Federation) -> None:
    plan = gossip([Site(f"p{i}", region="eu") for i in range(6)], WanModel(), graph="ring")
    nodes: dict[str, Any] = {}
    for i, spec in enumerate(plan.nodes):
        start = {"w": np.full((2, 2), float(i), dtype=np.float32)}
        nodes[spec.id] = GossipPeer(
            spec.id,
            dict(spec.mixing),
            spec.self_weight,
            start,
            gossip_interval_s=1.0,
            rng=np.random.default_rng(i),
        )
    roles = {n: "peer" for n in nodes}
    pairs = sorted({tuple(sorted((n.id, p))) for n in plan.nodes for p in n.peers})
    federation.start(nodes, roles, pairs)  # type: ignore[arg-type]

    def spread() -> float:
        values = [float(np.mean(nodes[n].current_model()[1]["w"])) for n in nodes]
        return max(values) - min(values)

    assert spread() == 5.0
    assert federation.run_until(lambda: spread() < 0.05, timeout_s=600)
    values = [float(np.mean(nodes[n].current_model()[1]["w"])) for n in nodes]
    assert 1.5 < float(np.mean(values)) < 3.5  # near the initial average 2.5


def test_killed_site_does_not_stall_the_aggregator(federation: Federation) -> None:
    nodes, roles, pairs = fedbuff_star(4, timeout=20.0)
    federation.start(nodes, roles, pairs, trainer=NoisyTrainer())
    assert federation.run_until(lambda: version_of(federation, "root") >= 3, timeout_s=300)
    killed_at = federation.now
    federation.kill("site-01")
    reached = version_of(federation, "root")
    assert federation.run_until(
        lambda: version_of(federation, "root") >= reached + 10, timeout_s=600
    )
    late = [
        m
        for m in metrics(federation, "update_applied")
        if m.labels["src"] == "site-01" and m.time > killed_at
    ]
    assert not late  # nothing from the dead site arrived after its death
    assert federation.journal.checker.updates_duplicated == 0


def hierarchical_fedbuff() -> tuple[dict[str, Any], dict[str, str], list[tuple[str, str]]]:
    regions = {"region-a": site_ids(3), "region-b": [f"site-{i:02d}" for i in range(3, 6)]}
    root = FedBuffAggregator(
        "root",
        {r: "region" for r in regions},
        model(),
        buffer_size=1,
        concurrency=1,
        task_timeout_s=60.0,
        rng=0,
    )
    nodes: dict[str, Any] = {"root": root}
    roles = {"root": "root"}
    pairs: list[tuple[str, str]] = []
    for r, sites in regions.items():
        nodes[r] = RegionalAggregator(
            r,
            "root",
            {s: "site" for s in sites},
            buffer_size=2,
            concurrency=3,
            task_timeout_s=30.0,
            train_config={"lr": 0.1},
            rng=1,
        )
        roles[r] = "region"
        pairs.append(("root", r))
        for s in sites:
            nodes[s] = SiteNode(s, r, n_examples=10)
            roles[s] = "site"
            pairs.append((r, s))
    return nodes, roles, pairs


def test_hierarchical_fedbuff_makes_progress(federation: Federation) -> None:
    nodes, roles, pairs = hierarchical_fedbuff()
    federation.start(nodes, roles, pairs, trainer=NoisyTrainer())
    assert federation.run_until(lambda: version_of(federation, "root") >= 8, timeout_s=600)
    assert federation.journal.checker.updates_duplicated == 0
    by_node = {m.node for m in metrics(federation, "update_applied")}
    assert by_node == {"root", "region-a", "region-b"}


def test_region_partition_heals_without_loss_or_duplicates(federation: Federation) -> None:
    nodes, roles, pairs = hierarchical_fedbuff()
    federation.start(nodes, roles, pairs, trainer=NoisyTrainer())
    assert federation.run_until(lambda: version_of(federation, "root") >= 4, timeout_s=600)
    cut_at = federation.now
    federation.partition(["region-b", "site-03", "site-04", "site-05"], duration_s=30.0)
    # The other region keeps the root going while region-b is away ...
    reached = version_of(federation, "root")
    assert federation.run_until(lambda: version_of(federation, "root") >= reached + 3, 25.0)
    during = [
        m
        for m in metrics(federation, "update_applied")
        if m.node == "root" and cut_at < m.time < cut_at + 30.0
    ]
    assert during and all(m.labels["src"] == "region-a" for m in during)
    # ... and region-b's work reaches the root again once the cut heals.
    federation.run_for(max(0.0, cut_at + 30.0 - federation.now))
    healed_at = federation.now
    assert federation.run_until(
        lambda: any(
            m.node == "root" and m.labels["src"] == "region-b" and m.time > healed_at
            for m in metrics(federation, "update_applied")
        ),
        timeout_s=300,
    )
    region_b = federation.node("region-b")
    assert federation.run_until(lambda: region_b.pending == 0, timeout_s=300)
    assert federation.journal.checker.updates_duplicated == 0
