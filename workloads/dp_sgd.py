"""Record-level DP-SGD at a site (Opacus), and the site's privacy ledger.

A site whose config has a ``[dp_sgd]`` table (top level in a site daemon's config and in a
scenario file) trains its torch plan with Opacus: ``PrivacyEngine.make_private`` wraps a
fresh copy of the model with the given ``noise_multiplier`` (z) and ``max_grad_norm`` (C),
so every step clips each example's gradient to L2 norm C and adds N(0, z²C²) noise to their
sum. Minibatches are Poisson samples (Opacus's ``DPDataLoader`` and its
``UniformWithReplacementSampler``): every example is in a step's batch with probability
``q = 1/ceil(n/batch_size)``, the sample rate Opacus gives a data loader of that batch size
over ``n`` examples. A job is ``local_steps`` such steps. The Poisson sampler and the noise
draw from torch generators seeded from the OS's entropy (``os.urandom``, 64 bits each): the
job's own seed (``config["seed"]``) is derived from the run seed and the site's id, which the
aggregators know, and noise they could regenerate would protect nothing. Only the simulator
(``DpSgdConfig.deterministic``, never read from a file) seeds them from the job's seed, so a
run is reproducible. Opacus's ``secure_mode`` (a CSPRNG, and torchcsprng) is not used.
The FedProx proximal step, when ``mu > 0``, is applied after the private step: it depends
on no record, so it spends no privacy.

Only torch models (``mlp``, ``cnn``) train this way; ``softmax`` (numpy) with ``[dp_sgd]``
is a configuration error.

The ledger (``PrivacyLedger``) records each job's ``(noise_multiplier, sample_rate,
steps)`` as Opacus's ``RDPAccountant`` keeps its history (one entry per distinct (z, q):
RDP adds up in any order), and ε at ``delta`` is that accountant's over the site's whole
history. Before a job that would take ε above
``epsilon_budget``, the site refuses to train (``PrivacyBudgetExhaustedError``: the driver
answers ``TrainFailed`` with reason "privacy budget exhausted: ..."). A job is recorded once
it has trained and before its result is handed back, so a released update is always
counted. A site daemon keeps its ledger in its state directory (a value of its
``StateStore``, see ``runtime.serve``), so the refusal outlives a restart; the simulator
keeps one per site in memory (``LedgerExecutor``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from fedloom.algorithms.dp.ledger import DELTA_MAX, SIGMA_MAX, Z_MAX, Z_MIN
from fedloom.algorithms.protocol import TrainedDelta, TrainResult, Weights
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.training import Trainer, TrainingRefusedError
from fedloom.workloads.models import _TorchPlan, parse_config

__all__ = [
    "DP_SGD_MODELS",
    "LEDGER_KEY",
    "DpJob",
    "DpSgdConfig",
    "DpSgdPlan",
    "LedgerExecutor",
    "LedgerTrainer",
    "PrivacyBudgetExhaustedError",
    "PrivacyLedger",
    "job_of",
    "read_dp_sgd",
    "sample_rate",
    "train_dp_sgd",
]

log = logging.getLogger("fedloom.dp_sgd")

# Models that train through Opacus (torch); the others refuse ``[dp_sgd]``.
DP_SGD_MODELS: Final = ("mlp", "cnn")
# The site's ledger, an independent value of its StateStore (``Recovery.values``).
LEDGER_KEY: Final = "site/privacy-ledger"
_LEDGER_FORMAT: Final = 1
# Jobs with one (z, q) share an entry (``_merged``), so a history is short; one this long
# is corrupt and refused on restore.
_MAX_HISTORY: Final = 100_000


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class DpSgdConfig:
    """``[dp_sgd]``: z, C, δ and an optional budget ε (None: account, never refuse)."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float = 1e-5
    epsilon_budget: float | None = None
    # The simulator's: sampling and noise seeded from the job's seed (reproducible runs).
    # Never from a config file: a daemon draws them from the OS (see the module docstring).
    deterministic: bool = False

    def __post_init__(self) -> None:
        # Any z > 0 here (tests train with negligible noise); a [dp_sgd] table and a
        # persisted ledger take z in [Z_MIN, Z_MAX] only (``read_dp_sgd``, ``parse``).
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"dp_sgd.noise_multiplier: expected > 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"dp_sgd.max_grad_norm: expected > 0, got {self.max_grad_norm}")
        if not 0 < self.delta <= DELTA_MAX:
            raise ValueError(
                f"dp_sgd.delta: expected a number in (0, {DELTA_MAX:g}], got {self.delta}"
            )
        b = self.epsilon_budget
        if b is not None and not (math.isfinite(b) and b > 0):
            raise ValueError(f"dp_sgd.epsilon_budget: expected > 0, got {b}")


def read_dp_sgd(t: Table) -> DpSgdConfig:
    """A ``[dp_sgd]`` table, strictly (unknown keys are refused, fields are named)."""
    z = t.number("noise_multiplier", min=Z_MIN, max=Z_MAX)
    c = t.number("max_grad_norm", min=0.0, exclusive_min=True)
    # δ must be well below 1/n (n: the site's records); n is known only when a job runs
    # (``LedgerTrainer`` refuses δ ≥ 1/n), so the table caps it at DELTA_MAX.
    delta = t.number("delta", 1e-5, min=0.0, max=DELTA_MAX, exclusive_min=True)
    budget = t.number("epsilon_budget", None, min=0.0, exclusive_min=True)
    if budget is not None and not math.isfinite(budget):
        raise ConfigError(f"{t.where('epsilon_budget')}: expected a finite number, got {budget}")
    if not math.isfinite(z) or not math.isfinite(c):
        key = "noise_multiplier" if not math.isfinite(z) else "max_grad_norm"
        raise ConfigError(f"{t.where(key)}: expected a finite number")
    if z * c > SIGMA_MAX:  # the noise would overflow the float32 model to inf
        raise ConfigError(
            f"{t.where('max_grad_norm')}: σ = noise_multiplier · max_grad_norm = {z * c:g} is "
            f"beyond what float32 models hold (at most {SIGMA_MAX:g}): lower max_grad_norm"
        )
    t.finish()
    return DpSgdConfig(float(z), float(c), float(delta), None if budget is None else float(budget))


def check_model(model: str, where: str = "dp_sgd") -> None:
    """``ConfigError`` unless ``model`` trains with DP-SGD."""
    if model not in DP_SGD_MODELS:
        raise ConfigError(
            f"{where}: model {model!r} cannot train with DP-SGD; record-level DP-SGD "
            f"(Opacus) needs a torch model: {', '.join(repr(m) for m in DP_SGD_MODELS)}"
        )


# ------------------------------------------------------------------------- training


def sample_rate(batch_size: int, n: int) -> float:
    """Opacus's Poisson rate for a loader of ``batch_size`` over ``n`` examples: 1/#batches."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"sample_rate: need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
    return 1.0 / math.ceil(n / batch_size)


@dataclass(frozen=True, slots=True)
class DpJob:
    """What one job spends: ``steps`` Poisson-sampled steps at rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def job_of(config: Mapping[str, Any], n_train: int, dp: DpSgdConfig) -> DpJob:
    """The privacy cost of training ``config`` (a TrainRequest's) on ``n_train`` records."""
    cfg, _ = parse_config(config)
    return DpJob(dp.noise_multiplier, sample_rate(cfg.batch_size, n_train), cfg.local_steps)


def _generator(torch: Any, seed: int | None, stream: int) -> Any:
    """A torch generator: from the job's seed (``seed``), or from the OS (None)."""
    g = torch.Generator()
    if seed is None:
        g.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    else:
        g.manual_seed((int(seed) * 2 + stream) % (1 << 63))
    return g


_quiet = threading.Lock()
_quieted = False


def _quiet_opacus() -> None:
    """Opacus warns on every ``PrivacyEngine`` that ``secure_mode`` is off (see the module
    docstring), and torch that the input needs no gradient: once per process is plenty."""
    global _quieted
    with _quiet:
        if not _quieted:
            warnings.filterwarnings("ignore", "Secure RNG turned off", UserWarning)
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            _quieted = True


def train_dp_sgd(
    plan: _TorchPlan, weights: Weights, config: Mapping[str, Any], dp: DpSgdConfig
) -> TrainResult:
    """One DP-SGD job of ``plan`` (see the module docstring). ``TrainResult.metrics`` has
    only ``dp_sample_rate`` (no training loss: it is an un-noised function of the records)."""
    import torch
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    _quiet_opacus()
    torch.set_num_threads(1)
    cfg, job_seed = parse_config(config)
    seed = job_seed if dp.deterministic else None
    n = plan.n_train
    if n == 0:
        raise ValueError(f"{type(plan).__name__}.train: this plan has no training data")
    plan._net()  # builds the plan's tensors
    xt, yt, _, _ = plan._tensors
    with torch.random.fork_rng(devices=[]):  # the build's own init is overwritten below
        net = plan._build()
    names = dict(net.named_parameters())
    if set(weights) != set(names):
        raise ValueError(
            f"{type(plan).__name__} weights: expected keys {sorted(names)}, got {sorted(weights)}"
        )
    with torch.no_grad():
        for name, p in names.items():
            w = weights[name]
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(f"weights[{name!r}]: shape {w.shape}, expected {p.shape}")
            p.copy_(torch.tensor(w, dtype=torch.float32))
    anchor = [p.detach().clone() for p in net.parameters()] if cfg.mu > 0 else None
    q = sample_rate(cfg.batch_size, n)
    loader = DPDataLoader(
        torch.utils.data.TensorDataset(xt, yt),
        sample_rate=q,
        generator=_generator(torch, seed, 0),
    )
    engine = PrivacyEngine(accountant="rdp")
    module, optimizer, loader = engine.make_private(
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=cfg.lr),
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=False,  # the loader above already samples as Opacus does
        noise_generator=_generator(torch, seed, 1),
    )
    module.train()
    cross_entropy = torch.nn.functional.cross_entropy
    steps = 0
    try:
        while steps < cfg.local_steps:
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                # An empty Poisson batch: the step is noise only.
                loss = cross_entropy(module(xb), yb) if len(xb) else module(xb).sum()
                loss.backward()
                optimizer.step()
                if anchor is not None:  # FedProx, after the private step (no record)
                    with torch.no_grad():
                        for p, a in zip(net.parameters(), anchor, strict=True):
                            p.sub_(p - a, alpha=cfg.lr * cfg.mu)
                steps += 1
                if steps == cfg.local_steps:
                    break
    finally:
        module._close()  # removes Opacus's hooks from the (discarded) module
    out = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    # Only values that are functions of public quantities leave the site: q = batch / n
    # (the record count n is public, as ``n_examples`` is; see the README). The mean
    # training loss is NOT reported: it is computed on the raw records without noise, and
    # one record can move it arbitrarily (the simulator evaluates the model centrally).
    return TrainResult(out, n, {"dp_sample_rate": q})


class DpSgdPlan:
    """A torch plan that trains with DP-SGD; ``init`` and ``evaluate`` are the plan's."""

    def __init__(self, plan: Any, dp: DpSgdConfig) -> None:
        if not isinstance(plan, _TorchPlan):
            raise ConfigError(
                f"dp_sgd: {type(plan).__name__} cannot train with DP-SGD; record-level "
                f"DP-SGD (Opacus) needs a torch model: "
                f"{', '.join(repr(m) for m in DP_SGD_MODELS)}"
            )
        self.plan = plan
        self.dp = dp

    @property
    def n_train(self) -> int:
        return self.plan.n_train

    def init(self, seed: int) -> Weights:
        return self.plan.init(seed)

    def train(self, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        return train_dp_sgd(self.plan, weights, config, self.dp)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        return self.plan.evaluate(weights)


# --------------------------------------------------------------------------- ledger


class PrivacyBudgetExhaustedError(TrainingRefusedError):
    """The job would take the site's ε above its budget: it is not trained."""

    code = "privacy_budget"


# One step's RDP curve per (z, q): the accountant's ``compute_rdp(q, z, steps, orders)`` is
# that curve times ``steps``, and its fractional orders cost ~0.4 s per entry to evaluate.
_RDP_CACHE: dict[tuple[float, float], Any] = {}
_RDP_LOCK = threading.Lock()


def _step_rdp(z: float, q: float) -> Any:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    with _RDP_LOCK:
        found = _RDP_CACHE.get((z, q))
    if found is None:
        alphas = RDPAccountant.DEFAULT_ALPHAS
        found = privacy_analysis.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=alphas)
        with _RDP_LOCK:
            if len(_RDP_CACHE) >= 4096:
                _RDP_CACHE.clear()
            _RDP_CACHE[(z, q)] = found
    return found


def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of ``history``: exactly ``RDPAccountant.get_epsilon`` (same orders,
    same sums) with each (z, q)'s one-step curve computed once."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as privacy_analysis

    rdp = sum([_step_rdp(z, q) * steps for z, q, steps in history])
    eps, _ = privacy_analysis.get_privacy_spent(
        orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
    )
    return max(0.0, float(eps))


class PrivacyLedger:
    """One site's DP-SGD history and ε (Opacus's RDP accountant); thread-safe.

    ``persist(value)`` is called with the ledger's new value (``snapshot()``) after every
    recorded job, before ``record`` returns; ``on_epsilon(eps)`` with ε after every job
    and once at construction; ``on_refused()`` at every refusal. The first refusal is
    logged (WARNING) once per ledger object.
    """

    def __init__(
        self,
        dp: DpSgdConfig,
        history: list[tuple[float, float, int]] | None = None,
        *,
        persist: Callable[[dict[str, Any]], None] | None = None,
        on_epsilon: Callable[[float], None] | None = None,
        on_refused: Callable[[], None] | None = None,
        name: str = "site",
    ) -> None:
        if not Z_MIN <= dp.noise_multiplier <= Z_MAX:  # what a [dp_sgd] table allows
            raise ValueError(
                f"dp_sgd.noise_multiplier: a ledger accounts for z in [{Z_MIN:g}, {Z_MAX:g}], "
                f"got {dp.noise_multiplier}"
            )
        self.dp = dp
        self.name = name
        self.history: list[tuple[float, float, int]] = list(history or [])
        self._persist = persist
        self._on_epsilon = on_epsilon
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self._logged = False
        self.refusals = 0
        self._eps = _epsilon(self.history, dp.delta)
        if on_epsilon is not None:
            on_epsilon(self._eps)

    @property
    def epsilon(self) -> float:
        """ε at ``dp.delta`` spent so far."""
        return self._eps

    def epsilon_after(self, job: DpJob) -> float:
        """ε at ``dp.delta`` if ``job`` were recorded too."""
        with self._lock:
            return _epsilon(_merged(self.history, job), self.dp.delta)

    def admit(self, job: DpJob) -> None:
        """Raise ``PrivacyBudgetExhaustedError`` if ``job`` would take ε above the budget."""
        budget = self.dp.epsilon_budget
        if budget is None:
            return
        after = self.epsilon_after(job)
        if after <= budget:
            return
        with self._lock:
            self.refusals += 1
            first, self._logged = not self._logged, True
        text = (
            f"privacy budget exhausted: epsilon {self._eps:.4g} spent, {after:.4g} after this "
            f"job ({job.steps} steps at sample rate {job.sample_rate:.4g}, noise multiplier "
            f"{job.noise_multiplier:g}), budget {budget:g} at delta {self.dp.delta:g}"
        )
        if first:
            log.warning("%s: %s; no more training", self.name, text, extra={"node": self.name})
        if self._on_refused is not None:
            self._on_refused()
        raise PrivacyBudgetExhaustedError(text)

    def record(self, job: DpJob) -> float:
        """Add ``job`` (persisted before returning); ε after it."""
        with self._lock:
            history = _merged(self.history, job)
            eps = _epsilon(history, self.dp.delta)
            value = self._value(history)
            if self._persist is not None:
                self._persist(value)  # raises: the job is not released
            self.history = history
            self._eps = eps
        if self._on_epsilon is not None:
            self._on_epsilon(eps)
        return eps

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._value(self.history)

    def _value(self, history: list[tuple[float, float, int]]) -> dict[str, Any]:
        """What is persisted: the history, and the settings it was kept under (for
        ``fedloom privacy``; a restart takes δ and the budget from its config)."""
        dp = self.dp
        return {
            "format": _LEDGER_FORMAT,
            "history": [list(h) for h in history],
            "delta": dp.delta,
            "epsilon_budget": dp.epsilon_budget,
            "noise_multiplier": dp.noise_multiplier,
            "max_grad_norm": dp.max_grad_norm,
        }

    @staticmethod
    def parse(value: Any) -> list[tuple[float, float, int]]:
        """The history in a persisted ledger value (``ValueError`` if it is not one)."""
        if not isinstance(value, Mapping) or value.get("format") != _LEDGER_FORMAT:
            raise ValueError(f"privacy ledger: expected format {_LEDGER_FORMAT}, got {value!r:.80}")
        raw = value.get("history")
        if not isinstance(raw, list | tuple) or len(raw) > _MAX_HISTORY:
            raise ValueError("privacy ledger: history is not a list of bounded length")
        out: list[tuple[float, float, int]] = []
        for entry in raw:
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise ValueError(f"privacy ledger: bad entry {entry!r:.80}")
            z, q, steps = entry
            ok = (
                isinstance(z, float | int)
                and not isinstance(z, bool)
                and Z_MIN <= z <= Z_MAX
                and isinstance(q, float | int)
                and not isinstance(q, bool)
                and 0 < q <= 1
                and isinstance(steps, int)
                and not isinstance(steps, bool)
                and steps >= 1
            )
            if not ok:
                raise ValueError(f"privacy ledger: bad entry {entry!r:.80}")
            out.append((float(z), float(q), int(steps)))
        return out


def _merged(history: list[tuple[float, float, int]], job: DpJob) -> list[tuple[float, float, int]]:
    """``history`` plus ``job``, merged into the entry with the same z and q if there is
    one (RDP composes by addition, in any order): the history holds one entry per distinct
    (z, q), at most one per batch count ⌈n/batch_size⌉ for each z, whatever batch sizes an
    aggregator alternates between."""
    out = list(history)
    for i, (z, q, s) in enumerate(out):
        if z == job.noise_multiplier and q == job.sample_rate:
            out[i] = (z, q, s + job.steps)
            return out
    out.append((job.noise_multiplier, job.sample_rate, job.steps))
    return out


# ------------------------------------------------------------------ driver adapters


class LedgerTrainer:
    """A daemon's ``Trainer`` for a DP-SGD site: admit, train, record, release.

    ``inner`` trains (a ``PlanTrainer`` over a ``DpSgdPlan``); with ``pool`` (a process
    pool) it runs there while this wrapper, in the driver's thread pool, keeps the ledger
    in the daemon's process.
    """

    def __init__(
        self, inner: Trainer, ledger: PrivacyLedger, n_train: int, pool: Any = None
    ) -> None:
        if n_train >= 1 and ledger.dp.delta >= 1.0 / n_train:
            raise ConfigError(
                f"dp_sgd.delta: {ledger.dp.delta:g} is not below 1/n for this site's "
                f"{n_train} records (a delta that large allows releasing a record outright); "
                f"use delta < {1.0 / n_train:.3g}"
            )
        self.inner = inner
        self.ledger = ledger
        self.n_train = int(n_train)
        self.pool = pool

    def __call__(self, node_id: str, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        job = job_of(config, self.n_train, self.ledger.dp)
        self.ledger.admit(job)
        if self.pool is not None:
            result: TrainResult = self.pool.submit(self.inner, node_id, weights, config).result()
        else:
            result = self.inner(node_id, weights, config)
        eps = self.ledger.record(job)
        return TrainResult(result.weights, result.n_examples, {**result.metrics, "dp_epsilon": eps})


class _SimExecutor(Protocol):
    def submit(
        self,
        node_id: str,
        weights: Weights,
        config: Mapping[str, Any],
        *,
        due: float | None = None,
    ) -> Any: ...
    def join(self, ticket: Any) -> TrainResult | TrainedDelta: ...
    def discard(self, ticket: Any) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Ticket:
    node_id: str
    job: DpJob | None
    inner: Any
    refused: PrivacyBudgetExhaustedError | None = None


class LedgerExecutor:
    """The simulator's executor for DP-SGD sites: one in-memory ledger per site.

    A job is admitted when submitted (a refused one fails when joined, as a daemon's
    fails when it would have ended) and recorded when joined; a discarded job (its site
    died) released nothing and is not recorded. Works over the inline and the process
    executor alike: the ledgers stay in the simulator's process.
    """

    def __init__(self, inner: _SimExecutor, dp: DpSgdConfig, n_train: Callable[[str], int]) -> None:
        self.inner = inner
        self.dp = dp
        self._n_train = n_train
        self.ledgers: dict[str, PrivacyLedger] = {}

    def ledger(self, node_id: str) -> PrivacyLedger:
        led = self.ledgers.get(node_id)
        if led is None:
            led = self.ledgers[node_id] = PrivacyLedger(self.dp, name=node_id)
        return led

    def submit(
        self,
        node_id: str,
        weights: Weights,
        config: Mapping[str, Any],
        *,
        due: float | None = None,
    ) -> _Ticket:
        job = job_of(config, self._n_train(node_id), self.dp)
        try:
            self.ledger(node_id).admit(job)
        except PrivacyBudgetExhaustedError as exc:
            return _Ticket(node_id, None, None, exc)
        return _Ticket(node_id, job, self.inner.submit(node_id, weights, config, due=due))

    def join(self, ticket: _Ticket) -> TrainResult | TrainedDelta:
        if ticket.refused is not None:
            raise ticket.refused
        result = self.inner.join(ticket.inner)
        assert ticket.job is not None
        eps = self.ledger(ticket.node_id).record(ticket.job)
        return dataclasses.replace(result, metrics={**result.metrics, "dp_epsilon": eps})

    def discard(self, ticket: _Ticket) -> None:
        if ticket.refused is None:
            self.inner.discard(ticket.inner)

    def close(self) -> None:
        self.inner.close()

    def epsilons(self) -> dict[str, float]:
        """ε at δ spent by each site that trained."""
        return {k: v.epsilon for k, v in sorted(self.ledgers.items())}
