"""What an approval covers, attacked through the real code paths (review findings):
evaluation and statistics at a site (``SiteReports`` under ``reports_gate``), bounded
settings a job leaves out, code the digest must not miss (sourceless bytecode, hidden
entries, a forged ``__pycache__``), and damaged approvals files."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import py_compile
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import Log, Received
from fedloom.cli import main
from fedloom.federation.analytics import QuerySpec
from fedloom.federation.config_reader import ConfigError
from fedloom.runtime import governance
from fedloom.runtime.config import DaemonConfig
from fedloom.runtime.datasets import DatasetRegistry
from fedloom.runtime.governance import (
    APPROVALS_FILE,
    Approvals,
    ApprovalsError,
    GovernedTrainer,
    plan_digest,
    prepare_plan_code,
    read_approvals,
    reports_gate,
    site_gate,
    start_digest,
)
from fedloom.runtime.nodes import build_plan
from fedloom.runtime.reports import DatasetSource, SiteReports
from fedloom.transport.wire import EvalReport, StatsReport, StatsRequest, TrainRequest
from tests.runtime.test_governance import (
    BOUNDS,
    DIGEST,
    GOOD,
    Recorder,
    builtin_site,
    load,
    refusal,
    weights,
    write_site,
)
from tests.runtime.test_reports import Jobs, feed, sends

WALKTHROUGH = Path(__file__).parents[2] / "deploy" / "examples" / "walkthrough"
HEART_PLAN = (WALKTHROUGH / "heart-plan.toml").read_text(encoding="utf-8").split("[training]")[0]


# ------------------------------------------------------------------ evaluation, statistics


def tabular_site(tmp_path: Path, governance_toml: str = "") -> DaemonConfig:
    """A hospital with the walkthrough's plan and its table registered twice: tagged
    "heart" (the plan's) and "other" (a table the plan never names)."""
    cfg = load(write_site(tmp_path, HEART_PLAN + governance_toml))
    reg = DatasetRegistry(cfg.state_dir)
    for tag in ("heart", "other"):
        reg.add(
            WALKTHROUGH / "hospital-a.csv",
            name=f"{tag}-a",
            tags=[tag],
            label="outcome",
            types={"sex": "category"},
        )
    return cfg


def service(cfg: DaemonConfig, jobs: Jobs) -> SiteReports:
    """The site's service as ``serve`` layers it: the plan it builds, the gate it passes."""
    plan = build_plan(cfg)
    gate = reports_gate(cfg, None)
    source = DatasetSource(cfg.state_dir)
    return SiteReports(cfg.node_id, lambda: "root", plan, jobs, datasets=source, gate=gate)


def ask(s: SiteReports, jobs: Jobs, tag: str) -> StatsReport:
    spec = QuerySpec("peek", tag, ("chol",))
    feed(s, Received("root", StatsRequest(spec.name, spec.to_wire())))
    (done,) = jobs.run_all()
    (send,) = sends(feed(s, done))
    assert isinstance(send.msg, StatsReport)
    return send.msg


def evaluate(s: SiteReports, jobs: Jobs, version: int) -> list[Any]:
    w = s._plan.init(1)
    feed(s, Received("root", TrainRequest(task=version + 1, version=version, weights=w)))
    (done,) = jobs.run_all()
    return feed(s, done)


def test_an_unapproved_plan_neither_evaluates_nor_answers_statistics(tmp_path: Path) -> None:
    cfg = tabular_site(tmp_path)  # tabular: approval required by default
    jobs = Jobs()
    s = service(cfg, jobs)
    feed(s, Received("root", StatsRequest("evaluate", {"every": 1})))
    out = evaluate(s, jobs, 0)
    assert not [m for m in sends(out) if isinstance(m.msg, EvalReport)]
    (log,) = [e for e in out if isinstance(e, Log)]
    assert "not approved" in log.fields["reason"]
    # A query over a table the plan never names: refused whatever the approval.
    other = ask(s, jobs, "other")
    assert (other.code, other.n, other.values) == ("tag_not_allowed", 0, {})
    # The plan's own table: only while the plan is approved.
    assert ask(s, jobs, "heart").code == "plan_not_approved"
    Approvals(cfg.state_dir).approve(plan_digest(cfg), BOUNDS)
    (report,) = [m.msg for m in sends(evaluate(s, jobs, 1))]
    assert isinstance(report, EvalReport) and 0.0 <= report.metrics["accuracy"] <= 1.0
    heart = ask(s, jobs, "heart")
    assert heart.code == "" and heart.n > 0
    assert ask(s, jobs, "other").code == "tag_not_allowed"
    # A revocation counts from the next query and evaluation on.
    Approvals(cfg.state_dir).revoke(plan_digest(cfg))
    assert ask(s, jobs, "heart").code == "plan_not_approved"
    assert not sends(evaluate(s, jobs, 2))


def test_statistics_tags_name_what_a_site_answers(tmp_path: Path) -> None:
    cfg = tabular_site(tmp_path, '\n[governance]\nstatistics_tags = ["other"]\n')
    jobs = Jobs()
    s = service(cfg, jobs)
    # The operator's own list: answered without a plan approval; the plan's tag is not in it.
    assert ask(s, jobs, "other").n > 0
    assert ask(s, jobs, "heart").code == "tag_not_allowed"
    with pytest.raises(ConfigError, match="statistics_tags"):
        load(write_site(tmp_path / "bad", HEART_PLAN + '[governance]\nstatistics_tags = ["a b"]\n'))


def test_a_site_without_approval_required_answers_only_its_plans_tag(tmp_path: Path) -> None:
    cfg = tabular_site(tmp_path, "\n[governance]\nrequire_approval = false\n")
    jobs = Jobs()
    s = service(cfg, jobs)
    assert ask(s, jobs, "heart").n > 0
    assert ask(s, jobs, "other").code == "tag_not_allowed"


# ------------------------------------------------------------------ bounds


def test_a_bounded_setting_the_job_leaves_out_is_refused(tmp_path: Path) -> None:
    inner = Recorder()
    trainer = GovernedTrainer(inner, tmp_path, DIGEST, True)
    Approvals(tmp_path).approve(DIGEST, BOUNDS)
    for key in BOUNDS:  # the plan would run it at its own default, which no bound covers
        exc = refusal(trainer, {k: v for k, v in GOOD.items() if k != key})
        assert exc.code == "out_of_bounds" and f"leave out {key} (missing)" in str(exc)
    assert inner.jobs == []
    trainer("hospital-a", weights(), GOOD)
    assert len(inner.jobs) == 1


# ------------------------------------------------------------------ the digest


@pytest.fixture
def plan_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A fresh plan package on sys.path; the process's bytecode settings restored after."""
    name = f"scopeplan_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / "code" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "train.py").write_text("VALUE = 'honest'\ndef make():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    monkeypatch.setattr(sys, "pycache_prefix", sys.pycache_prefix)
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", "")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX")
    monkeypatch.setattr(governance, "_START_DIGESTS", {})
    yield name, pkg
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def gated_factory_site(tmp_path: Path, name: str) -> DaemonConfig:
    plan = f'[plan]\nfactory = "{name}.train:make"\n\n[governance]\nrequire_approval = true\n'
    return load(write_site(tmp_path / "site", plan))


def test_sourceless_bytecode_and_hidden_entries_are_refused(
    tmp_path: Path, plan_pkg: tuple[str, Path]
) -> None:
    name, pkg = plan_pkg
    cfg = gated_factory_site(tmp_path, name)
    honest = plan_digest(cfg)
    # A helper shipped as bytecode only: Python imports it; the digest cannot review it.
    src = tmp_path / "helper_src.py"
    src.write_text("VALUE = 'EXFILTRATE'\n")
    py_compile.compile(str(src), cfile=str(pkg / "helper.pyc"), doraise=True)
    with pytest.raises(ConfigError, match=r"helper\.pyc: compiled bytecode outside __pycache__"):
        plan_digest(cfg)
    (pkg / "helper.pyc").unlink()
    assert plan_digest(cfg) == honest
    # A hidden file the code reads, and a hidden directory: refused, not skipped.
    (pkg / ".cfg").write_text("send_everything=1")
    with pytest.raises(ConfigError, match=r"\.cfg: a hidden file"):
        plan_digest(cfg)
    (pkg / ".cfg").unlink()
    (pkg / "sub" / ".git").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"\.git: a hidden directory"):
        plan_digest(cfg)
    shutil.rmtree(pkg / "sub")
    assert plan_digest(cfg) == honest
    # The CLI says the same in one line (exit 2).
    assert main(["plans", "digest", "--config", str(cfg.source)]) == 0
    (pkg / ".env").write_text("x")
    assert main(["plans", "digest", "--config", str(cfg.source)]) == 2


def test_a_forged_pycache_does_not_run_in_a_gated_site(
    tmp_path: Path, plan_pkg: tuple[str, Path]
) -> None:
    name, pkg = plan_pkg
    cfg = gated_factory_site(tmp_path, name)
    honest = plan_digest(cfg)
    # Bytecode Python loads without looking at the source (unchecked hash), for train.py.
    evil = tmp_path / "evil.py"
    evil.write_text("VALUE = 'EVIL'\ndef make():\n    return None\n")
    cached = importlib.util.cache_from_source(str(pkg / "train.py"))
    py_compile.compile(
        str(evil),
        cfile=cached,
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    assert plan_digest(cfg) == honest  # __pycache__ is not what the digest covers ...
    assert importlib.import_module(f"{name}.train").VALUE == "EVIL"  # ... the attack
    for mod in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[mod]
    # ... and a gated site ignores it: prepare_plan_code runs before build_plan imports.
    prepare_plan_code(cfg)
    assert sys.pycache_prefix == str((cfg.state_dir / "pycache").resolve())
    assert importlib.import_module(f"{name}.train").VALUE == "honest"
    assert start_digest(cfg) == honest  # computed before the import, used by the gate
    (pkg / "train.py").write_text("VALUE = 'changed'\n")
    assert start_digest(cfg) == honest and plan_digest(cfg) != honest  # once, at start


# ------------------------------------------------------------------ damaged approvals

DAMAGED = {
    "huge_int": '{"format":1,"approvals":[{"digest":"sha256:'
    + "ab" * 32
    + '","approved_at":'
    + "9" * 5000
    + "}]}",
    "deep": '{"format":1,"approvals":' + "[" * 100_000 + "]" * 100_000 + "}",
}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_approvals_file_fails_closed_at_start_and_in_the_cli(
    tmp_path: Path,
    damage: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = builtin_site(tmp_path)
    site.write_text(site.read_text() + "\n[governance]\nrequire_approval = true\n")
    cfg = load(site)
    cfg.state_dir.mkdir(parents=True)
    (cfg.state_dir / APPROVALS_FILE).write_text(DAMAGED[damage])
    with pytest.raises(ApprovalsError, match="not valid JSON"):
        read_approvals(cfg.state_dir / APPROVALS_FILE)
    inner = Recorder()
    with caplog.at_level(logging.WARNING, logger="fedloom.daemon"):
        trainer = site_gate(cfg, inner, None)  # the daemon's start: no crash
    assert "damaged" in caplog.text
    assert isinstance(trainer, GovernedTrainer)
    assert refusal(trainer, GOOD).code == "plan_not_approved" and inner.jobs == []
    gate = reports_gate(cfg, trainer)
    assert gate is not None
    with pytest.raises(Exception, match="damaged") as info:
        gate.check_evaluate()
    assert getattr(info.value, "code", None) == "plan_not_approved"
    capsys.readouterr()
    assert main(["plans", "list", "--config", str(cfg.source)]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_tabular_sites_hello_announces_its_training_rows(tmp_path: Path) -> None:
    from fedloom.runtime.nodes import n_examples_of

    cfg = tabular_site(tmp_path)
    rows = len((WALKTHROUGH / "hospital-a.csv").read_text().splitlines()) - 1
    n = n_examples_of(build_plan(cfg))
    assert n == rows - round(rows * 0.2)  # test_fraction = 0.2 held out
    empty = load(write_site(tmp_path / "empty", HEART_PLAN))
    assert n_examples_of(build_plan(empty)) == 0  # nothing registered yet
    assert np.isscalar(n)


class _Holder:
    """A node holding one model (what a root's ``current_model`` gives)."""

    def __init__(self, weights: Any) -> None:
        self.weights = weights

    def current_model(self) -> tuple[int, Any]:
        return 3, self.weights


async def test_a_node_without_data_logs_and_exports_no_evaluation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    from types import SimpleNamespace

    from fedloom.runtime.evaluation import evaluate_models
    from fedloom.runtime.metrics import MetricsSink
    from fedloom.workloads.tabular import TabularPlan

    cfg = tabular_site(tmp_path)
    root_plan = TabularPlan(cfg.plan.tabular, None)  # a tabular root: no table of its own
    assert root_plan.evaluate(root_plan.init(1)) == {}
    sink = MetricsSink()
    calls: list[int] = []

    def evaluate(weights: Any) -> dict[str, float]:
        calls.append(1)
        return root_plan.evaluate(weights)

    plan: Any = SimpleNamespace(evaluate=evaluate)
    d: Any = SimpleNamespace(plan=plan, node=_Holder(root_plan.init(1)), cfg=cfg)
    results: list[Any] = []
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO):
        # Stopped once evaluate was called: the loop handles its result before it stops.
        await asyncio.wait_for(
            asyncio.gather(
                evaluate_models(d, sink, stop, 0.01, lambda v, r: results.append((v, r))),
                _set_when(stop, lambda: bool(calls)),
            ),
            20,
        )
    assert results == [] and "accuracy" not in caplog.text
    names = {s.name for family in sink.registry.collect() for s in family.samples}
    assert not any(n.startswith("fedloom_eval_") for n in names)
    # With data (the site's plan) the gauges and the line are there.
    d.plan = build_plan(cfg)
    stop.clear()
    with caplog.at_level(logging.INFO):
        await asyncio.wait_for(
            asyncio.gather(
                evaluate_models(d, sink, stop, 0.01, lambda v, r: results.append((v, r))),
                _set_when(stop, lambda: bool(results)),
            ),
            20,
        )
    assert results and results[0][0] == 3 and 0.0 <= results[0][1]["accuracy"] <= 1.0
    names = {s.name for family in sink.registry.collect() for s in family.samples}
    assert "fedloom_eval_accuracy" in names


async def _set_when(event: Any, check: Any) -> None:
    import asyncio

    while not check():
        await asyncio.sleep(0.01)
    event.set()


def test_generated_demo_sites_say_no_approval_and_a_tabular_plan_file_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import tomllib

    from fedloom.runtime.config import load_config

    assert main(["local", "init", str(tmp_path / "demo"), "--sites", "2"]) == 0
    text = (tmp_path / "demo" / "site-0.toml").read_text()
    assert "# The demo's synthetic data" in text
    assert tomllib.loads(text)["governance"] == {"require_approval": False}
    cfg = load_config(tmp_path / "demo" / "site-0.toml")
    with caplog.at_level(logging.INFO, logger="fedloom.daemon"):
        site_gate(cfg, Recorder(), None)
    (record,) = [r for r in caplog.records if "no approval is required" in r.getMessage()]
    assert record.levelno == logging.INFO  # the operator's (generated) choice: no WARNING
    plan_file = WALKTHROUGH / "heart-plan.toml"
    assert (
        main(["local", "init", str(tmp_path / "t"), "--sites", "2", "--plan", str(plan_file)]) == 0
    )
    raw = tomllib.loads((tmp_path / "t" / "site-0.toml").read_text())
    assert "governance" not in raw  # a hospital's own table: approval required by default
    capsys.readouterr()
