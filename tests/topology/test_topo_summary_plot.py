from pathlib import Path

import pytest

from fedloom.sim.plots_topology import draw_plan
from fedloom.topology.gossip import gossip
from fedloom.topology.hierarchical import hierarchical
from fedloom.topology.plan import Plan
from fedloom.topology.specs import Site
from fedloom.topology.star import star
from fedloom.topology.summary import format_summary, summarize
from fedloom.topology.wan import WanModel


def _sites(n: int) -> list[Site]:
    return [Site(f"s{i}", ["eu", "us", "asia", "af"][i % 4]) for i in range(n)]


def test_star_plan() -> None:
    plan = star(_sites(8), root_region="us")
    assert plan.kind == "star" and plan.roots == ("root",)
    assert plan.children_of("root") == tuple(f"s{i}" for i in range(8))
    assert plan.site("root@dc").region == "us"
    assert all(plan.parent_of(f"s{i}") == "root" for i in range(8))
    assert star(_sites(8)).site("root@dc").region == "af"  # most populated; ties by name


def test_summaries() -> None:
    h = summarize(hierarchical(_sites(40), WanModel()))
    assert h["kind"] == "hierarchical" and h["n_sites"] == 40
    assert [c["size"] for c in h["clusters"]] == [10, 10, 10, 10]
    assert all(c["aggregator"] and c["standby"] for c in h["clusters"])
    g = summarize(gossip(_sites(16), WanModel(), "ring"))
    assert g["degree"] == {"min": 2, "mean": 2.0, "max": 2}
    assert g["spectral_gap"] > 0
    text = format_summary(hierarchical(_sites(40), WanModel()))
    assert "aggregator" in text and "region labels: 4" in text
    assert "degree min/mean/max: 2/2.00/2" in format_summary(gossip(_sites(16), WanModel()))


@pytest.mark.parametrize(
    "plan",
    [
        hierarchical(_sites(900), WanModel()),
        gossip(_sites(40), WanModel(), "exponential"),
        star(_sites(12)),
    ],
    ids=["hierarchical", "gossip", "star"],
)
def test_draw_plan_writes_png(tmp_path: Path, plan: Plan) -> None:
    out = tmp_path / "topology.png"
    draw_plan(plan, out)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000
