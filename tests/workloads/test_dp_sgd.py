"""Record-level DP-SGD at a site (Opacus) and the site's privacy ledger (workloads.dp_sgd)."""

from __future__ import annotations

import logging
import math
import tomllib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.federation.config_reader import ConfigError, Table
from fedloom.sim.compute import ComputeModel
from fedloom.sim.driver import SimDriver
from fedloom.sim.executors import InlineExecutor
from fedloom.sim.network import UniformLinks
from fedloom.sim.runner import build_workload, run_once
from fedloom.sim.scenario import parse_scenario
from fedloom.workloads.datasets import Split
from fedloom.workloads.dp_sgd import (
    DpJob,
    DpSgdConfig,
    DpSgdPlan,
    LedgerExecutor,
    PrivacyBudgetExhaustedError,
    PrivacyLedger,
    job_of,
    read_dp_sgd,
    sample_rate,
    train_dp_sgd,
)
from fedloom.workloads.models import TorchMLP
from fedloom.workloads.workload import ModelSpec, SyntheticSpec, Workload, from_config
from tests.conformance.toy_nodes import NoisyTrainer, star

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _toy(n: int = 8, d: int = 5, c: int = 3, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, c, n))


# ----------------------------------------------------------------------------- training


def test_a_dp_sgd_job_changes_the_model_and_only_the_simulator_repeats_its_noise() -> None:
    plan = TorchMLP(5, 3, _toy(40), hidden=8)
    w0 = plan.init(1)
    cfg = {"lr": 0.1, "local_steps": 5, "batch_size": 8, "seed": 7}
    sim = DpSgdPlan(plan, DpSgdConfig(1.0, 1.0, deterministic=True))
    a = sim.train(w0, cfg)
    b = sim.train(w0, cfg)
    assert set(a.weights) == set(w0)
    assert any(not np.array_equal(a.weights[k], w0[k]) for k in w0)
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in w0)
    assert a.n_examples == 40 and a.metrics["dp_sample_rate"] == pytest.approx(1 / 5)
    # A daemon's noise comes from the OS: the same job twice gives two different models.
    daemon = DpSgdPlan(plan, DpSgdConfig(1.0, 1.0))
    c, d = daemon.train(w0, cfg), daemon.train(w0, cfg)
    assert any(not np.array_equal(c.weights[k], d.weights[k]) for k in w0)
    assert sim.evaluate(a.weights).keys() >= {"accuracy", "loss"}


def _per_sample_clipped_mean(plan: TorchMLP, w0: dict[str, Any], split: Split, c: float) -> Any:
    """Σ_i clip_C(∇ℓ_i) / n by hand (Opacus's flat clipping: factor min(1, C/(‖g_i‖+1e-6)))
    and the plain mean gradient, both as {name: array}."""
    net = plan._build()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.tensor(w0[name]))
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    clipped = [torch.zeros_like(p) for p in params]
    plain = [torch.zeros_like(p) for p in params]
    n = len(split)
    for i in range(n):
        x = torch.tensor(split.x[i : i + 1])
        y = torch.tensor(split.y[i : i + 1])
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), params)
        norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
        factor = min(1.0, c / (norm + 1e-6))
        for acc, p_acc, g in zip(clipped, plain, grads, strict=True):
            acc += factor * g / n
            p_acc += g / n
    return (
        {k: v.numpy() for k, v in zip(names, clipped, strict=True)},
        {k: v.numpy() for k, v in zip(names, plain, strict=True)},
    )


def test_each_example_gradient_is_clipped_before_it_is_summed() -> None:
    split = _toy(8)
    plan = TorchMLP(5, 3, split, hidden=8)
    w0 = plan.init(3)
    c = 0.05  # well below these gradients' norms: every example is clipped
    # batch_size >= n: q = 1, every example in every step; the noise is negligible.
    dp = DpSgdConfig(noise_multiplier=1e-9, max_grad_norm=c, deterministic=True)
    out = train_dp_sgd(plan, w0, {"lr": 1.0, "local_steps": 1, "batch_size": 8, "seed": 1}, dp)
    step = {k: w0[k] - out.weights[k] for k in w0}
    clipped, plain = _per_sample_clipped_mean(plan, w0, split, c)
    for k in w0:
        np.testing.assert_allclose(step[k], clipped[k], rtol=1e-4, atol=1e-7)
    norm = math.sqrt(sum(float((v * v).sum()) for v in step.values()))
    plain_norm = math.sqrt(sum(float((v * v).sum()) for v in plain.values()))
    assert norm <= c + 1e-6  # the mean of vectors of norm <= C
    assert plain_norm > 5 * c  # without clipping the step would have been far longer


def test_noise_is_calibrated_to_the_clipping_norm() -> None:
    """With the clip at C and noise z·C on the sum, a step's spread over seeds is about
    lr·z·C/E[batch] per coordinate (here 1·2·0.1/8 = 0.025)."""
    split = _toy(8)
    plan = TorchMLP(5, 3, split, hidden=4)
    w0 = plan.init(0)
    steps = []
    for seed in range(60):
        dp = DpSgdConfig(noise_multiplier=2.0, max_grad_norm=0.1, deterministic=True)
        cfg = {"lr": 1.0, "local_steps": 1, "batch_size": 8, "seed": seed}
        out = train_dp_sgd(plan, w0, cfg, dp)
        steps.append(out.weights["2.bias"] - w0["2.bias"])
    spread = float(np.std(np.stack(steps), axis=0).mean())
    assert 0.018 < spread < 0.032


def test_empty_poisson_batches_are_noise_only_steps() -> None:
    split = _toy(200)
    plan = TorchMLP(5, 3, split, hidden=4)
    w0 = plan.init(0)
    dp = DpSgdConfig(1.0, 1.0, deterministic=True)
    # q = 1/200: most of the 30 steps sample nobody (Opacus hands an empty batch): the job
    # still runs every step and returns finite weights.
    out = train_dp_sgd(plan, w0, {"lr": 0.1, "local_steps": 30, "batch_size": 1, "seed": 0}, dp)
    assert out.metrics["dp_sample_rate"] == pytest.approx(1 / 200)
    assert all(np.isfinite(v).all() for v in out.weights.values())
    moved = {k: float(np.abs(out.weights[k] - w0[k]).max()) for k in w0}
    assert all(m > 0 for m in moved.values())  # every tensor trained (noise and the few samples)


def test_fedprox_step_is_applied_after_the_private_step() -> None:
    plan = TorchMLP(5, 3, _toy(8), hidden=4)
    w0 = plan.init(0)
    dp = DpSgdConfig(1e-9, 0.05, deterministic=True)
    base = {"lr": 1.0, "local_steps": 2, "batch_size": 8, "seed": 1}
    free = train_dp_sgd(plan, w0, base, dp)
    prox = train_dp_sgd(plan, w0, {**base, "mu": 0.5}, dp)
    d_free = sum(float(np.abs(free.weights[k] - w0[k]).sum()) for k in w0)
    d_prox = sum(float(np.abs(prox.weights[k] - w0[k]).sum()) for k in w0)
    assert d_prox < d_free  # pulled back towards the global model


# ------------------------------------------------------------------------------- ledger


def _accountant_epsilon(jobs: list[DpJob], delta: float) -> float:
    """Opacus's RDP accountant, stepped once per optimiser step as a PrivacyEngine does."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for job in jobs:
        for _ in range(job.steps):
            acc.step(noise_multiplier=job.noise_multiplier, sample_rate=job.sample_rate)
    return float(acc.get_epsilon(delta))


def test_epsilon_grows_with_every_job_and_is_the_accountants() -> None:
    dp = DpSgdConfig(1.1, 1.0)
    ledger = PrivacyLedger(dp)
    assert ledger.epsilon == 0.0
    jobs = [job_of({"local_steps": 20, "batch_size": 16}, 225, dp)] * 3
    jobs.append(job_of({"local_steps": 5, "batch_size": 64}, 225, dp))  # another rate
    seen = [0.0]
    for i, job in enumerate(jobs):
        eps = ledger.record(job)
        assert eps > seen[-1]
        assert eps == pytest.approx(_accountant_epsilon(jobs[: i + 1], dp.delta), rel=1e-12)
        seen.append(eps)
    assert ledger.history == [(1.1, 1 / 15, 60), (1.1, 1 / 4, 5)]
    # An aggregator alternating batch sizes does not grow the history.
    for _ in range(3):
        ledger.record(jobs[0])
        ledger.record(jobs[-1])
    assert ledger.history == [(1.1, 1 / 15, 120), (1.1, 1 / 4, 20)]
    assert ledger.epsilon == pytest.approx(
        _accountant_epsilon(jobs + [jobs[0], jobs[-1]] * 3, dp.delta), rel=1e-12
    )
    # An independent library (Google's dp_accounting, RDP) agrees to a few per cent.
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    other = RdpAccountant()
    for z, q, steps in ledger.history:
        other.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
        )
    assert other.get_epsilon(dp.delta) == pytest.approx(ledger.epsilon, rel=0.1)


@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.8, 1.0, 2.0]),
            st.sampled_from([1.0, 1 / 3, 1 / 15]),
            st.integers(1, 50),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_the_merged_history_spends_what_the_jobs_spent(
    raw: list[tuple[float, float, int]],
) -> None:
    jobs = [DpJob(z, q, s) for z, q, s in raw]
    ledger = PrivacyLedger(DpSgdConfig(1.0, 1.0))
    last = 0.0
    for job in jobs:
        eps = ledger.record(job)
        assert eps >= last
        last = eps
    assert sum(s for _, _, s in ledger.history) == sum(j.steps for j in jobs)
    assert ledger.epsilon == pytest.approx(_accountant_epsilon(jobs, 1e-5), rel=1e-12)
    back = PrivacyLedger(DpSgdConfig(1.0, 1.0), PrivacyLedger.parse(ledger.snapshot()))
    assert back.epsilon == ledger.epsilon


def test_the_budget_stops_training_and_survives_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dp = DpSgdConfig(1.0, 1.0, epsilon_budget=5.0)
    job = DpJob(1.0, 1 / 15, 20)
    saved: list[dict[str, Any]] = []
    refused: list[int] = []
    ledger = PrivacyLedger(dp, persist=saved.append, on_refused=lambda: refused.append(1))
    trained = 0
    with caplog.at_level(logging.WARNING, "fedloom.dp_sgd"):
        while True:
            try:
                ledger.admit(job)
            except PrivacyBudgetExhaustedError as exc:
                assert str(exc).startswith("privacy budget exhausted")
                break
            ledger.record(job)
            trained += 1
        assert trained >= 1
        assert trained == 4  # ε 3.07, 3.78, 4.35, 4.86; a fifth job would reach 5.31
        assert ledger.epsilon <= 5.0 < ledger.epsilon_after(job)
        with pytest.raises(PrivacyBudgetExhaustedError):
            ledger.admit(job)  # still refusing; logged once
    assert len([r for r in caplog.records if "privacy budget exhausted" in r.message]) == 1
    assert len(refused) == 2 and len(saved) == trained
    # What the state dir held after the last job: a restarted site refuses at once.
    back = PrivacyLedger(dp, PrivacyLedger.parse(saved[-1]))
    assert back.epsilon == ledger.epsilon
    with pytest.raises(PrivacyBudgetExhaustedError):
        back.admit(job)
    # A smaller job that still fits is admitted: the budget bounds epsilon, not jobs.
    back.admit(DpJob(1.0, 1 / 15, 1))


def test_a_failed_persist_releases_nothing() -> None:
    def broken(value: Any) -> None:
        raise OSError("disk full")

    ledger = PrivacyLedger(DpSgdConfig(1.0, 1.0), persist=broken)
    with pytest.raises(OSError):
        ledger.record(DpJob(1.0, 0.5, 3))
    assert ledger.history == [] and ledger.epsilon == 0.0


@pytest.mark.parametrize(
    "value",
    [
        None,
        {"format": 2, "history": []},
        {"format": 1, "history": "x"},
        {"format": 1, "history": [[1.0, 0.5]]},
        {"format": 1, "history": [[0.0, 0.5, 3]]},
        {"format": 1, "history": [[1.0, 1.5, 3]]},
        {"format": 1, "history": [[1.0, 0.5, True]]},
        {"format": 1, "history": [[float("nan"), 0.5, 3]]},
    ],
)
def test_a_corrupt_ledger_value_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="privacy ledger"):
        PrivacyLedger.parse(value)


def test_sample_rate_is_opacus_rate_for_a_loader_of_that_batch_size() -> None:
    assert sample_rate(16, 225) == 1 / 15
    assert sample_rate(16, 10) == 1.0
    assert sample_rate(10, 100) == 1 / 10
    with pytest.raises(ValueError):
        sample_rate(16, 0)


# ------------------------------------------------------------------------------- config


def test_read_dp_sgd_is_strict_and_names_the_field() -> None:
    ok = read_dp_sgd(Table({"noise_multiplier": 1.2, "max_grad_norm": 0.5}, "dp_sgd"))
    assert ok == DpSgdConfig(1.2, 0.5, 1e-5, None)
    assert not ok.deterministic
    for raw, match in [
        ({"max_grad_norm": 1.0}, "dp_sgd.noise_multiplier: required"),
        ({"noise_multiplier": 1.0}, "dp_sgd.max_grad_norm: required"),
        ({"noise_multiplier": 0, "max_grad_norm": 1.0}, "dp_sgd.noise_multiplier"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1.0}, "dp_sgd.delta"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 0}, "dp_sgd.delta"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "epsilon_budget": -1}, "budget"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "epsilon": 8}, "unknown field"),
        ({"noise_multiplier": "high", "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": float("inf"), "max_grad_norm": 1.0}, "noise_multiplier"),
        ({"noise_multiplier": 100, "max_grad_norm": 1e29}, "max_grad_norm: .*float32"),
    ]:
        with pytest.raises(ConfigError, match=match):
            read_dp_sgd(Table(raw, "dp_sgd"))


def test_a_numpy_model_with_dp_sgd_is_a_config_error_naming_the_torch_models() -> None:
    dp = DpSgdConfig(1.0, 1.0)
    with pytest.raises(ConfigError, match=r"model 'softmax' cannot train with DP-SGD.*'mlp'"):
        from_config({"dataset": "synthetic", "n_sites": 3}, dp_sgd=dp)
    with pytest.raises(ConfigError, match="torch model"):
        Workload(SyntheticSpec(), 3, ModelSpec("softmax"), dp_sgd=dp)
    raw = tomllib.loads((ROOT / "scenarios" / "demo-parity.toml").read_text())
    raw["dp_sgd"] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    with pytest.raises(ConfigError, match=r"dp_sgd: model 'softmax'.*'mlp', 'cnn'"):
        parse_scenario(raw)
    raw["dp_sgd"] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "clip": 1}
    raw["data"]["model"] = "mlp"
    with pytest.raises(ConfigError, match=r"dp_sgd\.clip: unknown field"):
        parse_scenario(raw)


def test_a_workload_with_dp_sgd_pickles_with_it() -> None:
    import pickle

    dp = DpSgdConfig(1.0, 1.0, deterministic=True)
    w = Workload(SyntheticSpec(samples_per_site=20), 2, ModelSpec("mlp", hidden=4), dp_sgd=dp)
    back = pickle.loads(pickle.dumps(w))
    assert back.dp_sgd == dp
    assert isinstance(back.site_plan(0), DpSgdPlan)
    assert back.describe()["dp_sgd"]["noise_multiplier"] == 1.0


# ---------------------------------------------------------------------------- simulator


def test_the_simulator_turns_a_refusal_into_train_failed() -> None:
    nodes, roles, pairs = star(2, task_timeout_s=5.0)
    dp = DpSgdConfig(1.0, 1.0, epsilon_budget=4.0, deterministic=True)
    executor = LedgerExecutor(
        InlineExecutor(NoisyTrainer()), dp, lambda site: 150
    )  # 5 steps at q = 1/15 a job
    d = SimDriver(
        nodes,
        roles,
        UniformLinks(latency_s=0.01, bandwidth_bps=1e9),
        neighbours=pairs,
        compute=ComputeModel.from_config({"distribution": "constant", "mean_s": 1.0}, seed=0),
        executor=executor,
        keep_logs=True,
    )
    d.run(until=200.0)
    reasons = [e.text for _, _, e in d.logs if "failed" in e.text]
    assert reasons and all("privacy budget exhausted" in r for r in reasons)
    eps = executor.epsilons()
    assert set(eps) == {"site-00", "site-01"}
    assert all(0 < e <= 4.0 for e in eps.values())
    assert all(led.refusals >= 1 for led in executor.ledgers.values())
    agg = nodes["agg"]
    assert agg.version > 0  # jobs within the budget were delivered and applied
    assert agg.timeouts > 0  # refused tasks are never answered: the root times them out


def test_a_dp_sgd_scenario_spends_no_more_than_its_budget() -> None:
    raw = tomllib.loads((ROOT / "scenarios" / "demo-parity.toml").read_text())
    raw["data"].update(model="mlp", hidden=4)
    raw["duration_s"] = 300
    raw["eval_interval_s"] = 100
    raw["dp_sgd"] = {"noise_multiplier": 1.5, "max_grad_norm": 1.0, "epsilon_budget": 3.0}
    sc = parse_scenario(raw)
    assert sc.dp_sgd is not None and sc.dp_sgd.deterministic
    wl = build_workload(sc, sc.seed)
    result = run_once(sc, sc.arms[0], wl, sc.seed, label="dp")
    again = run_once(sc, sc.arms[0], build_workload(sc, sc.seed), sc.seed, label="dp")
    assert 0 < float(result.extra["dp_sgd_epsilon_max"]) <= 3.0
    assert int(result.extra["dp_sgd_refused_jobs"]) > 0
    assert result.jobs_finished > 0 and result.versions > 0
    assert result.final_accuracy == again.final_accuracy  # reproducible
    assert result.extra["dp_sgd_epsilon_max"] == again.extra["dp_sgd_epsilon_max"]
