"""A workload: a federated data set, a model, and the per-site training plans built on them.

``Workload(dataset_spec, n_sites, model_spec, seed)`` answers what the simulator asks:
how many examples site ``i`` holds (cheap), the training plan of site ``i`` (built on
demand and kept in a small LRU cache, so 10,000 sites never sit in memory at once), fresh
model weights, and an evaluation of any weights on the global test set.

A workload pickles to its specs only (a few hundred bytes); an unpickled copy rebuilds
whatever it needs deterministically, so a process-pool executor can ship it once into
each worker. Site indices run ``0 .. n_sites-1``; mapping them to site ids is the caller's
business.
"""

from __future__ import annotations

import math
import operator
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

from fedloom.algorithms.protocol import Weights
from fedloom.algorithms.training import TrainingPlan
from fedloom.workloads.datasets import (
    SKLEARN_DATASETS,
    DirichletFederated,
    FederatedDataset,
    Split,
    SyntheticFederated,
)
from fedloom.workloads.dp_sgd import DpSgdConfig, DpSgdPlan, check_model
from fedloom.workloads.models import MODEL_NAMES, make_model

DATASET_NAMES: Final = ("synthetic", *SKLEARN_DATASETS)
# Site data kept in memory (LRU beyond this); regenerating a site costs more than a job.
CACHE_BYTES: Final = 1 << 30


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """FedProx Synthetic(α, β) (see ``fedloom.workloads.datasets.SyntheticFederated``)."""

    alpha: float = 1.0
    beta: float = 1.0
    iid: bool = False
    samples_per_site: int | None = None
    max_samples_per_site: int | None = None

    @property
    def name(self) -> str:
        return "synthetic"


@dataclass(frozen=True, slots=True)
class SklearnSpec:
    """A scikit-learn data set with Dirichlet label skew (see ``DirichletFederated``)."""

    name: str = "breast_cancer"
    dirichlet_alpha: float = 0.5
    test_fraction: float = 0.2
    min_samples_per_site: int = 5


DatasetSpec = SyntheticSpec | SklearnSpec


# A synthetic site's written sample count at most this: 10^9 asked numpy for 224 GiB
# (a MemoryError traceback, or the process killed).
MAX_SAMPLES_PER_SITE = 1_000_000
# The MLP's width at most this: hidden = 10^8 (billions of weights per model copy) was
# killed for memory instead of refused.
MAX_HIDDEN = 65_536


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """``name`` in ``MODEL_NAMES``; ``hidden`` is the MLP width (ignored by other models)."""

    name: str = "softmax"
    hidden: int = 32

    def kwargs(self) -> dict[str, Any]:
        return {"hidden": self.hidden} if self.name == "mlp" else {}


class Workload:
    """Per-site training plans and a global evaluation for one (data set, model, seed)."""

    def __init__(
        self,
        dataset: DatasetSpec,
        n_sites: int,
        model: ModelSpec | None = None,
        seed: int = 0,
        *,
        eval_sites: int = 100,
        cache_size: int = 1_000_000,
        cache_bytes: int = CACHE_BYTES,
        dp_sgd: DpSgdConfig | None = None,
    ) -> None:
        model = model if model is not None else ModelSpec()
        if model.name not in MODEL_NAMES:
            raise ValueError(f"model: unknown {model.name!r}; expected one of {MODEL_NAMES}")
        if dp_sgd is not None:
            check_model(model.name)  # ConfigError (a ValueError) naming the models that can
        self.dp_sgd = dp_sgd  # sites train with DP-SGD (workloads.dp_sgd); evaluation does not
        if eval_sites < 1:
            raise ValueError(f"eval_sites must be >= 1, got {eval_sites}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.dataset_spec = dataset
        self.model_spec = model
        self.seed = int(seed)
        self.eval_sites = int(eval_sites)
        self.cache_size = int(cache_size)
        self.cache_bytes = int(cache_bytes)
        self._data = _build_dataset(dataset, int(n_sites), self.seed)
        if model.name == "cnn" and math.isqrt(self._data.n_features) ** 2 != self._data.n_features:
            raise ValueError(
                f"model: 'cnn' needs square image features (dataset 'digits'), "
                f"{dataset.name!r} has {self._data.n_features} features"
            )
        self._plans: OrderedDict[int, TrainingPlan] = OrderedDict()
        self._sizes: dict[int, int] = {}
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._eval: tuple[TrainingPlan, int, int] | None = None  # plan, n_test, sites pooled

    # -- pickling: specs only ----------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset_spec,
            "n_sites": self.n_sites,
            "model": self.model_spec,
            "seed": self.seed,
            "eval_sites": self.eval_sites,
            "cache_size": self.cache_size,
            "cache_bytes": self.cache_bytes,
            "dp_sgd": self.dp_sgd,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["dataset"],
            state["n_sites"],
            state["model"],
            state["seed"],
            eval_sites=state["eval_sites"],
            cache_size=state["cache_size"],
            cache_bytes=state["cache_bytes"],
            dp_sgd=state.get("dp_sgd"),
        )

    # -- sizes --------------------------------------------------------------------------
    @property
    def dataset(self) -> FederatedDataset:
        return self._data

    @property
    def n_sites(self) -> int:
        return self._data.n_sites

    @property
    def n_features(self) -> int:
        return self._data.n_features

    @property
    def n_classes(self) -> int:
        return self._data.n_classes

    def n_examples(self, i: int) -> int:
        """Training examples at site ``i`` (does not generate the site's data)."""
        return self._data.n_examples(i)

    # -- plans --------------------------------------------------------------------------
    def _make(self, train: Split | None, test: Split | None) -> TrainingPlan:
        m = self.model_spec
        return make_model(
            m.name, self.n_features, self.n_classes, train=train, test=test, **m.kwargs()
        )

    def site_plan(self, i: int) -> TrainingPlan:
        """Site ``i``'s training plan (its evaluation uses the site's local test split, or
        its training data where it has none). Built on first use, kept in an LRU cache."""
        with self._lock:
            plan = self._plans.get(i)
            if plan is not None:
                self._plans.move_to_end(i)
                return plan
        data = self._data.site(i)  # outside the lock: generation may take a while
        plan = self._make(data.train, data.test)
        if self.dp_sgd is not None:
            plan = DpSgdPlan(plan, self.dp_sgd)
        size = _plan_bytes(plan, data.train, data.test)
        with self._lock:
            if i not in self._plans:
                self._plans[i] = plan
                self._sizes[i] = size
                self._cached_bytes += size
            plan = self._plans[i]
            self._plans.move_to_end(i)
            # Keep every site while the data fits the byte budget: regenerating a site's
            # data costs more than training on it.
            while len(self._plans) > 1 and (
                len(self._plans) > self.cache_size or self._cached_bytes > self.cache_bytes
            ):
                old, _ = self._plans.popitem(last=False)
                self._cached_bytes -= self._sizes.pop(old)
        return plan

    def _eval_plan(self) -> tuple[TrainingPlan, int, int]:
        if self._eval is None:
            test, pooled = self._data.test_set(self.eval_sites)
            self._eval = (self._make(None, test), len(test), pooled)
        return self._eval

    def init_weights(self, seed: int) -> Weights:
        """Fresh model weights (deterministic in ``seed``)."""
        return self._make(None, None).init(seed)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        """``accuracy`` and ``loss`` on the global test set, with ``n_test`` (its size) and
        ``eval_sites`` (sites whose test splits were pooled; 0 for a held-out set)."""
        plan, n_test, pooled = self._eval_plan()
        out = plan.evaluate(weights)
        out["n_test"] = float(n_test)
        out["eval_sites"] = float(pooled)
        return out

    def n_params(self) -> int:
        return sum(int(w.size) for w in self.init_weights(0).values())

    @classmethod
    def from_config(
        cls,
        d: Mapping[str, Any],
        *,
        n_sites: int | None = None,
        seed: int | None = None,
        dp_sgd: DpSgdConfig | None = None,
    ) -> Workload:
        """Same as the module-level ``from_config``."""
        return from_config(d, n_sites=n_sites, seed=seed, dp_sgd=dp_sgd)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for reports."""
        _, n_test, pooled = self._eval_plan()
        return {
            "dataset": self._data.describe(),
            "model": asdict(self.model_spec),
            "dp_sgd": None if self.dp_sgd is None else asdict(self.dp_sgd),
            "n_sites": self.n_sites,
            "n_params": self.n_params(),
            "seed": self.seed,
            "eval_sites": pooled,
            "n_test": n_test,
            "cache_size": self.cache_size,
        }


def _build_dataset(spec: DatasetSpec, n_sites: int, seed: int) -> FederatedDataset:
    if isinstance(spec, SyntheticSpec):
        return SyntheticFederated(
            n_sites,
            spec.alpha,
            spec.beta,
            iid=spec.iid,
            seed=seed,
            samples_per_site=spec.samples_per_site,
            max_samples_per_site=spec.max_samples_per_site,
        )
    if isinstance(spec, SklearnSpec):
        return DirichletFederated(
            spec.name,
            n_sites,
            alpha=spec.dirichlet_alpha,
            seed=seed,
            test_fraction=spec.test_fraction,
            min_samples_per_site=spec.min_samples_per_site,
        )
    raise ValueError(f"dataset: unsupported spec {spec!r}")


# --------------------------------------------------------------------------------- config

_COMMON_KEYS: Final = (
    "dataset",
    "n_sites",
    "seed",
    "model",
    "hidden",
    "eval_sites",
    "cache_size",
    "cache_mb",
)
_SYNTHETIC_KEYS: Final = ("alpha", "beta", "iid", "samples_per_site", "max_samples_per_site")
_SKLEARN_KEYS: Final = ("dirichlet_alpha", "test_fraction", "min_samples_per_site")


def from_config(
    d: Mapping[str, Any],
    *,
    n_sites: int | None = None,
    seed: int | None = None,
    dp_sgd: DpSgdConfig | None = None,
) -> Workload:
    """Build a workload from a plain mapping (a TOML table), strictly.

    Keys: ``dataset`` ("synthetic" | "breast_cancer" | "digits", required), ``n_sites``
    (required here or as the keyword; both must agree), ``seed`` (the table's wins over the
    keyword, default 0), ``model``
    ("softmax" | "mlp" | "cnn", default "softmax"), ``hidden`` (MLP width), ``eval_sites``,
    ``cache_size`` (site plans kept in memory) and ``cache_mb`` (their bytes, default 1024:
    ``CACHE_BYTES``); for synthetic ``alpha``, ``beta``, ``iid``, ``samples_per_site``,
    ``max_samples_per_site``; for the scikit-learn sets ``dirichlet_alpha``,
    ``test_fraction``, ``min_samples_per_site``. Anything else, or a wrong type or range,
    raises ``ValueError`` naming the field. ``dp_sgd`` (a site's ``[dp_sgd]`` table): the
    sites' plans train with DP-SGD; a model that cannot raises ``ConfigError``.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"workload config: expected a table, got {type(d).__name__}")
    name = d.get("dataset")
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset: expected one of {DATASET_NAMES}, got {name!r}")
    allowed = set(_COMMON_KEYS) | set(_SYNTHETIC_KEYS if name == "synthetic" else _SKLEARN_KEYS)
    for key in d:
        if key not in allowed:
            if key in _SYNTHETIC_KEYS:
                raise ValueError(f"{key}: only valid for dataset 'synthetic', not {name!r}")
            if key in _SKLEARN_KEYS:
                raise ValueError(f"{key}: only valid for datasets {SKLEARN_DATASETS}")
            raise ValueError(f"{key}: unknown workload field (known: {sorted(allowed)})")
    sites = _merge("n_sites", d.get("n_sites"), n_sites)
    if sites is None:
        raise ValueError("n_sites: required field is missing")
    n = _int(d, "n_sites", 1, value=sites)
    # A seed in the table pins the data (and the initial weights) whatever run seed is given.
    s = d.get("seed", seed)
    seed_v = 0 if s is None else _int(d, "seed", 0, value=s)

    model_name = d.get("model", "softmax")
    if model_name not in MODEL_NAMES:
        raise ValueError(f"model: expected one of {MODEL_NAMES}, got {model_name!r}")
    model = ModelSpec(model_name, hidden=_int(d, "hidden", 1, default=32, high=MAX_HIDDEN))

    spec: DatasetSpec
    if name == "synthetic":
        iid = d.get("iid", False)
        if not isinstance(iid, bool):
            raise ValueError(f"iid: expected true or false, got {iid!r}")
        spec = SyntheticSpec(
            alpha=_float(d, "alpha", 1.0, low=0.0),
            beta=_float(d, "beta", 1.0, low=0.0),
            iid=iid,
            samples_per_site=_opt_int(d, "samples_per_site", 2, MAX_SAMPLES_PER_SITE),
            max_samples_per_site=_opt_int(d, "max_samples_per_site", 2),
        )
    else:
        spec = SklearnSpec(
            name=name,
            dirichlet_alpha=_float(d, "dirichlet_alpha", 0.5, low=0.0, strict=True),
            test_fraction=_float(d, "test_fraction", 0.2, low=0.0, high=1.0, strict=True),
            min_samples_per_site=_int(d, "min_samples_per_site", 0, default=5),
        )
    return Workload(
        spec,
        n,
        model,
        seed_v,
        eval_sites=_int(d, "eval_sites", 1, default=100),
        cache_size=_int(d, "cache_size", 1, default=1_000_000),
        cache_bytes=_int(d, "cache_mb", 1, default=CACHE_BYTES >> 20) << 20,
        dp_sgd=dp_sgd,
    )


def _merge(key: str, in_table: Any, given: Any) -> Any:
    if in_table is not None and given is not None and in_table != given:
        raise ValueError(f"{key}: config says {in_table!r} but {given!r} was passed")
    return in_table if in_table is not None else given


def _int(
    d: Mapping[str, Any],
    key: str,
    low: int,
    *,
    default: int | None = None,
    value: Any = None,
    high: int | None = None,
) -> int:
    v = value if value is not None else d.get(key, default)
    if isinstance(v, bool):
        raise ValueError(f"{key}: expected an integer >= {low}, got {v!r}")
    try:
        out = operator.index(v)
    except TypeError:
        raise ValueError(f"{key}: expected an integer >= {low}, got {v!r}") from None
    if out < low:
        raise ValueError(f"{key}: expected an integer >= {low}, got {out}")
    if high is not None and out > high:
        raise ValueError(f"{key}: expected an integer <= {high}, got {out}")
    return out


def _opt_int(d: Mapping[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    return None if d.get(key) is None else _int(d, key, low, high=high)


def _float(
    d: Mapping[str, Any],
    key: str,
    default: float,
    *,
    low: float,
    high: float | None = None,
    strict: bool = False,
) -> float:
    v = d.get(key, default)
    rng = f"{'>' if strict else '>='} {low}" + (f" and < {high}" if high is not None else "")
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{key}: expected a number {rng}, got {v!r}")
    f = float(v)
    if not math.isfinite(f):  # inf is > low: "expected a number > 0.0, got inf" misled
        raise ValueError(f"{key}: expected a finite number {rng}, got {v!r}")
    if not ((f > low if strict else f >= low) and (high is None or f < high)):
        raise ValueError(f"{key}: expected a number {rng}, got {v!r}")
    return f


def _plan_bytes(plan: object, train: Split, test: Split) -> int:
    """What a cached plan costs: the bytes it says it holds (``nbytes``: a softmax plan's
    training rows and evaluation split), else its data's."""
    nbytes = getattr(plan, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    return _split_bytes(train) + _split_bytes(test)


def _split_bytes(split: Split | None) -> int:
    if split is None:
        return 0
    return int(split.x.nbytes) + int(split.y.nbytes)
