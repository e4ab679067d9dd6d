"""What lets the simulator run 100,000 sites (issue 15) changes no run: the site cache
(a site's plan rebuilt or kept gives the same jobs) and the live gauges it skips."""

from __future__ import annotations

from typing import Any

from fedloom.algorithms.protocol import Effect, Event, Metric, PeerUp
from fedloom.sim.driver import LIVE_GAUGES, SimDriver
from fedloom.sim.network import UniformLinks
from fedloom.sim.report import report_to_dict, strip_wall
from fedloom.sim.runner import run_scenario
from fedloom.sim.scenario import parse_scenario


def tiny_hierarchy(**data: Any) -> dict[str, Any]:
    """hierarchical-100k's shape at 60 sites in 3 regions for one virtual hour."""
    return {
        "name": "tiny-hierarchy",
        "seed": 5,
        "duration_h": 1,
        "eval_interval_s": 600,
        "data": {
            "dataset": "synthetic",
            "iid": True,
            "samples_per_site": 50,
            "model": "softmax",
            **data,
        },
        "sites": {"count": 60, "regions": ["r0", "r1", "r2"]},
        "compute": {"distribution": "exponential", "mean_s": 120},
        "training": {"lr": 0.05, "local_steps": 5, "batch_size": 10},
        "arms": [
            {
                "name": "hier-fedbuff",
                "algorithm": "fedbuff",
                "topology": "hierarchical",
                "regional_concurrency": 6,
                "regional_buffer_size": 3,
                "root_buffer_size": 2,
            }
        ],
    }


def test_a_run_is_the_same_whether_site_plans_are_kept_or_rebuilt() -> None:
    kept = report_to_dict(run_scenario(parse_scenario(tiny_hierarchy())))
    rebuilt = report_to_dict(run_scenario(parse_scenario(tiny_hierarchy(cache_size=1))))
    arm = kept["arms"][0]
    assert arm["updates_applied"] > 100 and arm["final_accuracy"] > 0.3
    assert strip_wall(rebuilt["arms"]) == strip_wall(kept["arms"])


class Gauged:
    """Says on each PeerUp what a site does: a live gauge and a counted metric."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    def handle(self, event: Event, now: float) -> list[Effect]:
        assert isinstance(event, PeerUp)
        return [Metric("outbox_updates", 2.0), Metric("update_late", 1.0)]

    def next_deadline(self) -> float | None:
        return None


def test_the_simulator_skips_live_gauges_unless_asked() -> None:
    def counts(**kwargs: Any) -> dict[str, int]:
        heard: list[str] = []
        nodes = {n: Gauged(n) for n in ("a", "b")}
        roles = {"a": "peer", "b": "peer"}
        d = SimDriver(nodes, roles, UniformLinks(), neighbours=[("a", "b")], **kwargs)
        d.on_metric(lambda node, now, m: heard.append(m.name))
        stats = d.run()
        assert sorted(heard) == sorted(n for n, c in stats.metric_counts.items() for _ in range(c))
        return stats.metric_counts

    assert "outbox_updates" in LIVE_GAUGES and "model_version" not in LIVE_GAUGES
    assert counts() == {"update_late": 2}
    assert counts(live_gauges=True) == {"outbox_updates": 2, "update_late": 2}
