"""A DP-SGD site daemon's privacy ledger: kept in its state directory, enforced through the
asyncio driver (a refused job is TrainFailed 'privacy budget exhausted'), shown on
/metrics, and still refusing after a restart; [dp_sgd] config errors."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from fedloom.algorithms.protocol import Effect, Event, PeerUp, Train, TrainDone, TrainFailed
from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.config import parse_config
from fedloom.runtime.daemon import open_daemon
from fedloom.runtime.driver import AsyncDriver
from fedloom.runtime.federation_files import Federation, write_federation
from fedloom.runtime.metrics import MetricsSink
from fedloom.runtime.serve import _dp_sgd_trainer
from fedloom.runtime.trainer import PlanTrainer
from fedloom.workloads.dp_sgd import LEDGER_KEY, LedgerTrainer
from tests.runtime.test_driver import FakePeers, ScriptNode, run_driver, until

pytest.importorskip("opacus")

PLAN = {"dataset": "synthetic", "model": "mlp", "hidden": 4, "samples_per_site": 60}
# 5 steps at q = 1/ceil(n/4) (about 1/12) a job; z = 1: ε ≈ 2.6, 3.0, 3.4, 3.7, 3.9, ...
JOB = {"lr": 0.05, "local_steps": 5, "batch_size": 4}
DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "epsilon_budget": 3.5}


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return write_federation(tmp_path / "fed", {"region-a": ["site-1", "site-2"]}, plan=PLAN)


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _site_config(fed: Federation, **dp: Any) -> Any:
    cfg = fed.config("site-1")
    cfg["dp_sgd"] = {**DP, **dp}
    return parse_config(cfg, check_files=True)


async def _train_until_refused(
    parsed: Any, max_jobs: int = 50
) -> tuple[TrainFailed, MetricsSink, int, bool]:
    """Open the site daemon, run jobs through the asyncio driver with the daemon's DP-SGD
    trainer until one is refused: (its TrainFailed, the sink, jobs done, whether the state
    dir held a ledger)."""
    d = open_daemon(parsed)
    try:
        sink = MetricsSink()
        assert d.plan is not None
        trainer = _dp_sgd_trainer(d, PlanTrainer(d.plan), sink, asyncio.get_running_loop(), None)
        assert isinstance(trainer, LedgerTrainer)
        w0 = d.plan.init(0)
        jobs = iter(range(1, max_jobs + 1))

        def script(event: Event, now: float) -> list[Effect]:
            if isinstance(event, PeerUp | TrainDone):
                return [Train(next(jobs), w0, dict(JOB))]
            return []

        node = ScriptNode("site-1", script)
        driver = AsyncDriver(node, peers=FakePeers([]), trainer=trainer, seed=1)

        async def body() -> None:
            driver.post_nowait(PeerUp("p"))
            await until(lambda: bool(node.events(TrainFailed)))
            await asyncio.sleep(0.01)  # the gauge's call_soon_threadsafe

        await run_driver(driver, body)
        (failed,) = node.events(TrainFailed)
        done = node.events(TrainDone)
        for t in done:
            assert t.result.metrics["dp_epsilon"] <= parsed.dp_sgd.epsilon_budget
        eps = trainer.ledger.epsilon
        assert sink.value("fedloom_site_privacy_epsilon") == pytest.approx(eps)
        restored = d.recovery.values.get(LEDGER_KEY) is not None  # what open_daemon found
        return failed, sink, len(done), restored
    finally:
        d.close()


async def test_the_budget_stops_training_and_a_restarted_site_still_refuses(
    fed: Federation,
) -> None:
    parsed = _site_config(fed)
    failed, sink, jobs, restored = await _train_until_refused(parsed)
    assert not restored and jobs > 0  # a fresh state dir: jobs ran before the budget ran out
    assert failed.reason.startswith("privacy budget exhausted")
    assert sink.value("fedloom_privacy_budget_refusals_total") == 1
    spent = sink.value("fedloom_site_privacy_epsilon")
    assert spent is not None and 0 < spent <= 3.5
    page = generate_latest(sink.registry).decode()
    assert "fedloom_site_privacy_epsilon" in page

    # The state dir holds the ledger: a restarted daemon refuses its very first job.
    failed2, sink2, jobs2, restored2 = await _train_until_refused(parsed)
    assert restored2 and jobs2 == 0
    assert failed2.reason.startswith("privacy budget exhausted")
    assert sink2.value("fedloom_site_privacy_epsilon") == pytest.approx(spent)

    # A larger budget in the config lets the same history train again.
    more = _site_config(fed, epsilon_budget=5.0)
    _, sink3, jobs3, restored3 = await _train_until_refused(more)
    assert restored3 and jobs3 > 0  # on top of the restored history
    assert spent < (sink3.value("fedloom_site_privacy_epsilon") or 0) <= 5.0


async def test_a_corrupt_ledger_in_the_state_dir_is_a_config_error(fed: Federation) -> None:
    from fedloom.algorithms.protocol import Persist

    parsed = _site_config(fed)
    d = open_daemon(parsed)
    try:
        d.store.apply(Persist(LEDGER_KEY, {"format": 1, "history": [[1.0, 7.0, 3]]}))
    finally:
        d.close()
    d = open_daemon(parsed)
    try:
        assert d.plan is not None
        with pytest.raises(ConfigError, match=r"state_dir: .* corrupt value: privacy ledger"):
            _dp_sgd_trainer(d, PlanTrainer(d.plan), MetricsSink(), asyncio.get_running_loop(), None)
    finally:
        d.close()


def test_dp_sgd_config_errors_name_the_field(fed: Federation) -> None:
    region = fed.config("region-a")
    region["dp_sgd"] = dict(DP)
    with pytest.raises(ConfigError, match="dp_sgd: only a site trains with DP-SGD"):
        parse_config(region)
    site = fed.config("site-1")
    site["dp_sgd"] = dict(DP)
    site["plan"] = {**site["plan"], "model": "softmax"}
    with pytest.raises(ConfigError, match=r"dp_sgd: model 'softmax' cannot train.*'mlp', 'cnn'"):
        parse_config(site)
    site = fed.config("site-1")
    site["dp_sgd"] = {**DP, "sigma": 1.0}
    with pytest.raises(ConfigError, match=r"dp_sgd\.sigma: unknown field"):
        parse_config(site)
    site = fed.config("site-1")
    site["dp_sgd"] = {"max_grad_norm": 1.0}
    with pytest.raises(ConfigError, match=r"dp_sgd\.noise_multiplier: required"):
        parse_config(site)
    site = fed.config("site-1")
    site["dp_sgd"] = dict(DP)
    site["plan"] = {"factory": "mypkg:make"}
    with pytest.raises(ConfigError, match="dp_sgd: needs a built-in"):
        parse_config(site)


@pytest.mark.timeout(120)
def test_with_a_process_pool_jobs_train_there_and_the_ledger_stays_here() -> None:
    from fedloom.runtime.trainer import SitePlan, make_executor
    from fedloom.workloads.dp_sgd import DpSgdConfig, PrivacyBudgetExhaustedError, PrivacyLedger
    from fedloom.workloads.workload import ModelSpec, SyntheticSpec, Workload

    dp = DpSgdConfig(1.0, 1.0, epsilon_budget=3.5)
    workload = Workload(
        SyntheticSpec(samples_per_site=60), 2, ModelSpec("mlp", hidden=4), dp_sgd=dp
    )
    plan = SitePlan(workload, 0)
    saved: list[Any] = []
    ledger = PrivacyLedger(dp, persist=saved.append)
    pool = make_executor("process", 1)
    try:
        trainer = LedgerTrainer(PlanTrainer(plan), ledger, workload.n_examples(0), pool)
        w0 = plan.init(0)
        done = 0
        with pytest.raises(PrivacyBudgetExhaustedError):
            for seed in range(50):
                out = trainer("site-1", w0, {**JOB, "seed": seed})
                assert any((out.weights[k] != w0[k]).any() for k in w0)
                done += 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    assert done >= 2 and len(saved) == done  # every job recorded in this process
    assert PrivacyLedger.parse(saved[-1]) == ledger.history


def test_fedloom_privacy_reads_a_sites_ledger_from_its_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from fedloom.algorithms.protocol import Persist
    from fedloom.cli import main
    from fedloom.federation.store import StateStore
    from fedloom.workloads.dp_sgd import DpJob, DpSgdConfig, PrivacyLedger

    store = StateStore(tmp_path / "state")  # held open, as by a running site daemon
    store.load()
    try:
        ledger = PrivacyLedger(
            DpSgdConfig(1.0, 0.5, 1e-5, 8.0),
            persist=lambda v: store.apply(Persist(LEDGER_KEY, v)),
        )
        ledger.record(DpJob(1.0, 1 / 15, 20))
        ledger.record(DpJob(1.0, 1 / 15, 20))
        ledger.record(DpJob(1.0, 1 / 4, 5))
        assert main(["privacy", str(tmp_path / "state")]) == 0
        text = capsys.readouterr().out
        assert "record-level DP-SGD at this site" in text
        assert "40 x Gaussian z = 1, Poisson-sampled at q = 0.06667" in text
        assert f"epsilon: {ledger.epsilon:.4f} at delta = 1e-05" in text
        assert f"budget: 8 ({8.0 - ledger.epsilon:.4f} left)" in text
        assert main(["privacy", str(tmp_path / "state"), "--json", "--delta", "1e-6"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["steps"] == 45 and report["delta"] == 1e-6
        assert report["epsilon"] > ledger.epsilon  # a smaller delta costs more epsilon
    finally:
        store.close()
