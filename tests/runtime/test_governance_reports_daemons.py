"""The review's attack on real daemons: two hospitals whose tabular plan is not approved,
each with a second table the plan never names. The root asks for a federated evaluation
and for statistics over both tags; nothing about either table leaves a site (the
evaluation is not run, the queries are refused with their codes), and once the operators
approve the plan the evaluation is published.

In process (``fedloom local init`` configs, root + 2 sites on loopback), bounded in time."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pytest

from fedloom.cli import main
from fedloom.runtime.config import load_config
from fedloom.runtime.datasets import DatasetRegistry
from tests.runtime.daemon_nets import edit, read_json, serving, until

pytestmark = pytest.mark.timeout(90)

WALKTHROUGH = Path(__file__).parents[2] / "deploy" / "examples" / "walkthrough"
SITES = ["site-0", "site-1"]
QUERIES = [
    {"name": "peek", "dataset_tag": "other", "columns": ["chol"], "min_sites": 2, "min_cell": 3},
    {"name": "vitals", "dataset_tag": "heart", "columns": ["chol"], "min_sites": 2, "min_cell": 3},
]


def logged(caplog: pytest.LogCaptureFixture, msg: str, **fields: str) -> set[str]:
    """The nodes that logged ``msg`` with ``fields`` among its values."""
    out = set()
    for r in caplog.records:
        text = r.getMessage()
        if msg in text and all(f"{k}=" in text and v in text for k, v in fields.items()):
            out.add(text.split(":", 1)[0])
    return out


async def test_an_unapproved_plan_releases_no_evaluation_and_no_statistics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    fed = tmp_path / "fed"
    plan = WALKTHROUGH / "heart-plan.toml"
    assert (
        main(["local", "init", str(fed), "--shape", "star", "--sites", "2", "--plan", str(plan)])
        == 0
    )
    root_toml = fed / "root.toml"
    # A short backoff after each refusal: once approved, the sites get their next job soon.
    aggregation = tomllib.loads(root_toml.read_text(encoding="utf-8"))["aggregation"]
    edit(
        root_toml,
        evaluation={"every": 1, "min_sites": 2},
        analytics=QUERIES,
        aggregation={**aggregation, "refusal_backoff_s": 0.5},
    )
    for i, site in enumerate(SITES):
        reg = DatasetRegistry(load_config(fed / f"{site}.toml").state_dir)
        table = WALKTHROUGH / f"hospital-{'ab'[i]}.csv"
        for tag in ("heart", "other"):
            reg.add(
                table, name=f"{tag}-{i}", tags=[tag], label="outcome", types={"sex": "category"}
            )
    nodes = {n: fed / f"{n}.toml" for n in ["root", *SITES]}
    async with serving(nodes, eval_interval_s=0) as daemons:
        root_state = daemons["root"].cfg.state_dir
        with caplog.at_level(logging.INFO):
            await until(
                "both sites refusing to evaluate",
                lambda: (
                    logged(caplog, "evaluating a model failed", reason="not approved") >= set(SITES)
                ),
            )
            await until(
                "the root seeing both queries refused by both sites",
                lambda: (
                    sum(
                        "statistics query refused by a site" in r.getMessage()
                        for r in caplog.records
                    )
                    >= 4
                ),
            )
        refused = [r.getMessage() for r in caplog.records if "refused by a site" in r.getMessage()]
        assert sum("query=peek" in m and "code=tag_not_allowed" in m for m in refused) == 2
        assert sum("query=vitals" in m and "code=plan_not_approved" in m for m in refused) == 2
        assert not (root_state / "analytics" / "peek.json").exists() or (
            read_json(root_state / "analytics" / "peek.json").get("n", 0) == 0
        )
        evaluation = read_json(root_state / "evaluation.json")
        assert evaluation is None or not evaluation["published"]
        # The operators approve: the next models are evaluated and published.
        bounds = ["--bound", "lr=0.01:1", "--bound", "local_steps=1:50"]
        bounds += ["--bound", "batch_size=8:256", "--bound", "mu=0:1"]
        for site in SITES:
            assert main(["plans", "approve", "--config", str(fed / f"{site}.toml"), *bounds]) == 0
        capsys.readouterr()
        published = await until(
            "a published evaluation after the approval",
            lambda: (v := read_json(root_state / "evaluation.json")) and v["published"],
        )
        assert published[0]["sites"] == 2
