"""The built-in tabular plan: a site trains on its own registered table, configured only by
``[plan] kind = "tabular"`` (no Python).

Every node of a federation carries the same ``[plan]`` (``read_tabular``): the dataset tag,
the feature columns, the label and its ``classes`` (their order fixes the model's outputs,
so every site agrees), the categories of each categorical feature (one-hot, in the declared
order; a value not declared encodes as all zeros), the model (``logreg``: multinomial
logistic regression; ``mlp``: one ReLU hidden layer of ``hidden`` units; both numpy), how
numeric features are standardised, the held-out fraction and the seed. The model's shape
follows from the config alone, so a root or region builds it with no data.

Standardisation of the numeric features (``standardize``):

* ``"federated"``: the model carries two tensors nobody trains, ``scaler/mean`` and
  ``scaler/var`` per numeric feature. In every job a site standardises with the global
  values it received and returns, in their place, its OWN training rows' mean and their mean
  square deviation from the global mean it received (its variance plus the squared
  distance of its mean from the global one), so its delta moves the global values toward
  them. The aggregator's average then makes ``scaler/mean`` the average of the sites'
  means and ``scaler/var`` the average of their spreads around it: the pooled mean and
  variance once the mean settles (example-weighted: FedAvg, or FedBuff with ``weighting =
  "examples"``; FedBuff's default ``"uniform"`` weighs the sites alike, and its staleness
  discount leans toward the sites that report fresher, a few % here). Every value averaged
  into ``scaler/var`` is a sum of squares, so a convex combination of them never goes
  negative (unlike E[x²] − E[x]², which cancels catastrophically in float32), and the std a
  site uses is safe whatever it receives (``safe_std``): sqrt of the global variance,
  floored at ``STD_FLOOR`` (1 %) of the site's own std and at 1e-3·(1 + |mean|); a site
  uses its own moments while the global values are not yet known (all zero: the initial
  model) or not finite. The moments are raw units, so whatever bounds or reshapes the
  whole delta acts on the scaler too: ``runtime.config`` refuses a root or region with a
  federated tabular plan and update clipping on (``clip_norm`` not "off"), a server
  optimizer other than plain "sgd" or ``server_momentum`` > 0 (the scaler jumps to its
  target in one step; momentum overshoots it and with FedBuff's stale deltas diverges),
  secure aggregation, or central DP ([privacy]): use "declared" there. A server lr in
  (0, 2) converges (1 is exact). A codec other than fp32 quantises the moments too.
* ``"declared"``: fixed ``[plan.declared_scaling] col = [mean, std]`` for each numeric
  feature.
* ``"none"``: raw values.

The plan asks its ``TableSource`` (the site's dataset registry: ``runtime.datasets``
``DatasetWatch``) for the active table tagged ``dataset_tag`` at the start of every job
and every evaluation; a revoked, missing or changed dataset raises
``TrainingRefusedError`` (codes "dataset_revoked", "dataset_missing", "dataset_changed"),
and a table that does not fit the plan (a column missing or of the wrong type, a label
value outside ``classes``) "dataset_mismatch". Rows are split deterministically (by
``seed``) into training rows and a held-out ``test_fraction``; ``n_examples`` of a job is
the number of training rows; ``evaluate`` reports accuracy, loss and n_examples on the
held-out rows (at a node without a source, the root, it returns ``{}``).

Minibatches and FedProx follow ``workloads.models`` (``config["seed"]``, ``lr``,
``local_steps``, ``batch_size``, ``mu``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.protocol import TrainResult, Weights
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.training import TrainingRefusedError
from fedloom.workloads.models import minibatch_order, parse_config, thread_rng

__all__ = [
    "SCALER_MEAN",
    "SCALER_VAR",
    "STANDARDIZE",
    "STD_FLOOR",
    "TABULAR_MODELS",
    "TableSource",
    "TabularPlan",
    "TabularSpec",
    "read_tabular",
]

TABULAR_MODELS: Final = ("logreg", "mlp")
STANDARDIZE: Final = ("federated", "declared", "none")
SCALER_MEAN: Final = "scaler/mean"
SCALER_VAR: Final = "scaler/var"
STD_FLOOR: Final = 0.01  # the least std a site standardises with, relative to its own
ABS_FLOOR: Final = 1e-3  # and relative to 1 + |mean|
MAX_HIDDEN: Final = 4096
NUMERIC_TYPES: Final = ("int", "float", "bool")

F64 = npt.NDArray[np.float64]


def label_key(value: Any) -> str:
    """A label or category value as every site spells it: booleans ``true``/``false``,
    integral numbers without a decimal point, other values as text."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        f = float(value)
        return str(int(f)) if f.is_integer() else repr(f)
    return str(value).strip()


@dataclass(frozen=True, slots=True)
class TabularSpec:
    """A validated ``[plan] kind = "tabular"`` (see the module docstring)."""

    dataset_tag: str
    features: tuple[str, ...]
    label: str
    classes: tuple[str, ...]  # label_key spellings, in the model's output order
    model: str = "logreg"
    hidden: int = 32
    standardize: str = "federated"
    declared_scaling: tuple[tuple[str, float, float], ...] = ()  # (column, mean, std)
    categories: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (column, values)
    test_fraction: float = 0.2
    seed: int = 0

    @property
    def numeric(self) -> tuple[str, ...]:
        """The numeric features, in config order (standardised, one input each)."""
        cats = dict(self.categories)
        return tuple(f for f in self.features if f not in cats)

    @property
    def n_inputs(self) -> int:
        return len(self.numeric) + sum(len(v) for _, v in self.categories)

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def read_tabular(t: Table) -> TabularSpec:
    """``[plan]`` with ``kind = "tabular"`` (``t`` is the plan table; ``kind`` read or not):
    ``ConfigError`` naming the field on any mistake."""
    t.text("kind", choices=("tabular",))
    tag = t.text("dataset_tag")
    features = t.array("features")
    if not features or not all(isinstance(f, str) and f for f in features):
        raise ConfigError(f"{t.where('features')}: expected a non-empty list of column names")
    if len(set(features)) != len(features):
        dup = next(f for f in features if features.count(f) > 1)
        raise ConfigError(f"{t.where('features')}: {dup!r} is listed twice")
    label = t.text("label")
    if label in features:
        raise ConfigError(f"{t.where('label')}: {label!r} is also a feature")
    raw_classes = t.array("classes")
    classes = [label_key(c) for c in raw_classes]
    if len(classes) < 2:
        raise ConfigError(f"{t.where('classes')}: list at least two label values")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{t.where('classes')}: a label value is listed twice")
    model = t.text("model", "logreg", choices=TABULAR_MODELS)
    hidden = t.integer("hidden", 32, min=1, max=MAX_HIDDEN)
    if t.has("hidden") and model != "mlp":
        raise ConfigError(f'{t.where("hidden")}: only model = "mlp" has a hidden layer')
    standardize = t.text("standardize", "federated", choices=STANDARDIZE)
    cats_t = t.table("categories")
    categories: list[tuple[str, tuple[str, ...]]] = []
    for col in features:
        if not cats_t.has(col):
            continue
        values = cats_t.array(col)
        keys = tuple(label_key(v) for v in values)
        if not keys:
            raise ConfigError(f"{cats_t.where(col)}: list the column's values (one-hot order)")
        if len(set(keys)) != len(keys):
            raise ConfigError(f"{cats_t.where(col)}: a value is listed twice")
        categories.append((col, keys))
    cats_t.finish()  # a category table for a column that is not a feature: refused
    numeric = [f for f in features if f not in dict(categories)]
    scaling_t = t.table("declared_scaling")
    declared: list[tuple[str, float, float]] = []
    if standardize == "declared":
        for col in numeric:
            pair = scaling_t.array(col)
            if (
                len(pair) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
                or not all(math.isfinite(v) for v in pair)
                or pair[1] <= 0
            ):
                raise ConfigError(
                    f"{scaling_t.where(col)}: expected [mean, std] with std > 0, got {pair!r}"
                )
            declared.append((col, float(pair[0]), float(pair[1])))
    elif t.has("declared_scaling"):
        raise ConfigError(
            f'{t.where("declared_scaling")}: only standardize = "declared" uses it '
            f"(standardize is {standardize!r})"
        )
    scaling_t.finish()
    spec = TabularSpec(
        dataset_tag=tag,
        features=tuple(features),
        label=label,
        classes=tuple(classes),
        model=model,
        hidden=hidden,
        standardize=standardize,
        declared_scaling=tuple(declared),
        categories=tuple(categories),
        test_fraction=t.number("test_fraction", 0.2, min=0.0, max=0.9),
        seed=t.integer("seed", 0, min=0),
    )
    return spec


class TableRecord(Protocol):
    """What the plan needs of a registered table (``runtime.datasets.DatasetRecord``)."""

    @property
    def name(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def column_types(self) -> dict[str, str]: ...


class TableSource(Protocol):
    """Where the plan's table comes from (``runtime.datasets.DatasetWatch``)."""

    def current(self, tag: str) -> Any:
        """The ``TableRecord`` tagged ``tag`` now; ``TrainingRefusedError`` when none may
        be used. Called at the start of every job: must be cheap."""
        ...

    def load(self, record: Any) -> Any:
        """The record's table (a pandas DataFrame), its bytes checked against it."""
        ...


@dataclass(frozen=True, slots=True, eq=False)
class _Data:
    """One table prepared for the plan: inputs (numeric first, then one-hot blocks) and
    labels, split into training and held-out rows."""

    key: tuple[str, str]
    x_train: F64
    y_train: npt.NDArray[np.int64]
    x_test: F64
    y_test: npt.NDArray[np.int64]
    mean: F64 = field(default_factory=lambda: np.zeros(0))  # the training rows' E[x]
    var: F64 = field(default_factory=lambda: np.zeros(0))  # and variance, numeric features


def _mismatch(text: str) -> TrainingRefusedError:
    return TrainingRefusedError(text, "dataset_mismatch")


class TabularPlan:
    """A ``TrainingPlan`` over a site's registered table (see the module docstring).

    ``source`` None: a node with no data (root, region): ``init`` only, ``evaluate`` -> {}.
    """

    def __init__(self, spec: TabularSpec, source: TableSource | None = None) -> None:
        self.spec = spec
        self.source = source
        self._lock = threading.Lock()
        self._data: _Data | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "source": self.source}  # a process pool's copy reloads

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.spec = state["spec"]
        self.source = state["source"]
        self._lock = threading.Lock()
        self._data = None

    # -- model

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        s = self.spec
        d, c = s.n_inputs, s.n_classes
        if s.model == "mlp":
            shapes: dict[str, tuple[int, ...]] = {
                "W1": (d, s.hidden),
                "b1": (s.hidden,),
                "W2": (s.hidden, c),
                "b2": (c,),
            }
        else:
            shapes = {"W": (d, c), "b": (c,)}
        if s.standardize == "federated":
            m = len(s.numeric)
            shapes[SCALER_MEAN] = (m,)
            shapes[SCALER_VAR] = (m,)
        return shapes

    def init(self, seed: int) -> Weights:
        """Zeros for logistic regression; He-normal hidden weights for the MLP; the scaler
        at zero ("not yet known")."""
        out: Weights = {k: np.zeros(shape, np.float32) for k, shape in self._shapes().items()}
        if self.spec.model == "mlp":
            rng = np.random.default_rng(seed)
            d, h = out["W1"].shape
            out["W1"] = rng.normal(0.0, math.sqrt(2.0 / d), (d, h)).astype(np.float32)
            out["W2"] = rng.normal(0.0, math.sqrt(1.0 / h), out["W2"].shape).astype(np.float32)
        return out

    def _params(self, weights: Weights) -> dict[str, F64]:
        out: dict[str, F64] = {}
        for k, shape in self._shapes().items():
            if k not in weights:
                raise ValueError(f"tabular weights: missing {k!r}")
            arr = np.asarray(weights[k])
            if arr.shape != shape:
                raise ValueError(f"tabular weights: {k} has shape {arr.shape}, expected {shape}")
            out[k] = arr.astype(np.float64)
        return out

    # -- data

    def n_training_rows(self) -> int:
        """The training rows of the active table tagged ``dataset_tag`` as the site's
        registry records them (its JSON only, no hashing: cheap; what a site's Hello
        announces at start); 0 with no source, no such table or an unreadable registry."""
        registry = getattr(self.source, "registry", None)
        active_by_tag = getattr(registry, "active_by_tag", None)
        if not callable(active_by_tag):
            return 0
        try:
            record = active_by_tag(self.spec.dataset_tag)
        except ConfigError:  # a damaged registry: the first job says so
            return 0
        rows = getattr(record, "rows", None)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            return 0
        return training_rows(rows, self.spec.test_fraction)

    def _current(self) -> _Data:
        assert self.source is not None
        record = self.source.current(self.spec.dataset_tag)  # refusals raise here
        key = (str(record.name), str(record.sha256))
        with self._lock:
            if self._data is not None and self._data.key == key:
                return self._data
        data = self._prepare(key, record)
        with self._lock:
            self._data = data
        return data

    def _prepare(self, key: tuple[str, str], record: Any) -> _Data:
        s = self.spec
        types = dict(record.column_types)
        for col in (*s.features, s.label):
            if col not in types:
                raise _mismatch(
                    f"dataset {record.name!r} has no column {col!r} declared (plan.features / "
                    "plan.label name columns its schema does not have)"
                )
        for col in s.numeric:
            if types[col] not in NUMERIC_TYPES:
                raise _mismatch(
                    f"dataset {record.name!r}: column {col!r} is a {types[col]}; give its "
                    f"values in [plan.categories] {col} = [...] to one-hot encode it"
                )
        frame = self.source.load(record) if self.source is not None else None
        assert frame is not None
        n = len(frame)
        labels = [label_key(v) for v in frame[s.label].to_numpy()]
        index = {c: i for i, c in enumerate(s.classes)}
        y = np.fromiter((index.get(v, -1) for v in labels), np.int64, n)
        if (y < 0).any():
            i = int(np.argmax(y < 0))
            raise _mismatch(
                f"dataset {record.name!r}: label {labels[i]!r} (row {i + 1}) is not one of "
                f"plan.classes {list(s.classes)}"
            )
        blocks = [frame[c].to_numpy().astype(np.float64)[:, None] for c in s.numeric]
        for col, values in s.categories:
            pos = {v: j for j, v in enumerate(values)}
            onehot = np.zeros((n, len(values)), np.float64)
            for i, v in enumerate(frame[col].to_numpy()):
                j = pos.get(label_key(v))
                if j is not None:
                    onehot[i, j] = 1.0
            blocks.append(onehot)
        x = np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0))
        order = np.random.default_rng(s.seed).permutation(n)
        n_test = n - training_rows(n, s.test_fraction)
        test, train = order[:n_test], order[n_test:]
        m = len(s.numeric)
        xt = x[train, :m]
        return _Data(
            key,
            x[train],
            y[train],
            x[test],
            y[test],
            xt.mean(axis=0) if len(train) else np.zeros(m),
            xt.var(axis=0) if len(train) else np.zeros(m),
        )

    def _scale(self, params: Mapping[str, F64], data: _Data) -> tuple[F64, F64]:
        """``(mean, std)`` the numeric inputs are standardised with."""
        s = self.spec
        m = len(s.numeric)
        if s.standardize == "none":
            return np.zeros(m), np.ones(m)
        if s.standardize == "declared":
            by_col = {c: (mu, sd) for c, mu, sd in s.declared_scaling}
            return (
                np.array([by_col[c][0] for c in s.numeric], np.float64),
                np.array([by_col[c][1] for c in s.numeric], np.float64),
            )
        mean, var = params[SCALER_MEAN], params[SCALER_VAR]
        unknown = not var.any() and not mean.any()  # the initial model: no global moments yet
        if unknown or not (np.isfinite(mean).all() and np.isfinite(var).all()):
            mean, var = data.mean, data.var
        return mean, safe_std(var, mean, data.var)

    def _inputs(self, x: F64, mean: F64, std: F64) -> F64:
        m = len(mean)
        if not m:
            return x
        out = x.copy()
        out[:, :m] = (x[:, :m] - mean) / std
        return out

    # -- TrainingPlan

    def train(self, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        if self.source is None:
            raise TrainingRefusedError(
                "this node holds no dataset (a root or region only builds the model)",
                "dataset_missing",
            )
        data = self._current()
        n = len(data.y_train)
        if n == 0:
            raise _mismatch("the dataset has no training rows (lower plan.test_fraction)")
        cfg, seed = parse_config(config)
        params = self._params(weights)
        mean, std = self._scale(params, data)
        x = self._inputs(data.x_train, mean, std)
        order = minibatch_order(thread_rng().reset(seed), n, cfg.batch_size * cfg.local_steps)
        trained = _descend(
            {k: v for k, v in params.items() if not k.startswith("scaler/")},
            {k: v.copy() for k, v in params.items() if not k.startswith("scaler/")},
            x,
            data.y_train,
            order,
            cfg.batch_size,
            cfg.lr,
            cfg.mu,
        )
        out: Weights = {k: v.astype(np.float32) for k, v in trained.items()}
        if self.spec.standardize == "federated":
            out[SCALER_MEAN] = data.mean.astype(np.float32)
            # E[(x − global mean)²] over its rows: its variance plus its mean's distance
            # from the global mean, so the average is the pooled variance once the global
            # mean settles; a sum of squares, never negative.
            out[SCALER_VAR] = (data.var + (data.mean - mean) ** 2).astype(np.float32)
        if not all(np.isfinite(v).all() for v in out.values()):
            raise ValueError("training diverged (non-finite weights): lower training.lr")
        return TrainResult(out, n)

    def evaluate(self, weights: Weights) -> dict[str, float]:
        """Accuracy, loss and n_examples on the held-out rows ({} at a node with no data;
        the training rows when the held-out split is empty)."""
        if self.source is None:
            return {}
        data = self._current()
        params = self._params(weights)
        mean, std = self._scale(params, data)
        x, y = (data.x_test, data.y_test) if len(data.y_test) else (data.x_train, data.y_train)
        z = _logits(params, self._inputs(x, mean, std))
        zs = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(zs).sum(axis=1))
        loss = float(np.mean(lse - zs[np.arange(len(y)), y]))
        acc = float(np.mean(z.argmax(axis=1) == y))
        return {"accuracy": acc, "loss": loss, "n_examples": float(len(y))}


def safe_std(var: F64, mean: F64, local_var: F64) -> F64:
    """The std a site standardises with: ``sqrt(var)`` (a negative var counts as 0),
    floored at ``STD_FLOOR`` of the site's own std and at ``ABS_FLOOR·(1 + |mean|)``, so
    no global value a server step produced (overshoot, momentum, a zero variance) makes the
    inputs blow up."""
    floor = np.maximum(
        STD_FLOOR * np.sqrt(np.maximum(local_var, 0.0)), ABS_FLOOR * (1 + np.abs(mean))
    )
    return np.maximum(np.sqrt(np.maximum(var, 0.0)), floor)


def training_rows(n: int, test_fraction: float) -> int:
    """The rows of an ``n``-row table a plan trains on (at least one: at most ``n - 1``
    are held out)."""
    n_test = round(n * test_fraction)
    return n - min(n_test, n - 1) if n > 0 else 0


def _logits(p: Mapping[str, F64], x: F64) -> F64:
    if "W1" in p:
        h = np.maximum(x @ p["W1"] + p["b1"], 0.0)
        return np.asarray(h @ p["W2"] + p["b2"])
    return np.asarray(x @ p["W"] + p["b"])


def _descend(
    anchor: Mapping[str, F64],
    p: dict[str, F64],
    x: F64,
    y: npt.NDArray[np.int64],
    order: npt.NDArray[np.intp],
    bs: int,
    lr: float,
    mu: float,
) -> dict[str, F64]:
    """Minibatch SGD on mean cross-entropy + (mu/2)·||p − anchor||², in place on ``p``."""
    for lo in range(0, len(order), bs):
        idx = order[lo : lo + bs]
        xb, yb = x[idx], y[idx]
        k = len(idx)
        if "W1" in p:
            pre = xb @ p["W1"] + p["b1"]
            h = np.maximum(pre, 0.0)
            z = h @ p["W2"] + p["b2"]
        else:
            z = xb @ p["W"] + p["b"]
        z -= z.max(axis=1, keepdims=True)
        prob = np.exp(z)
        prob /= prob.sum(axis=1, keepdims=True)
        prob[np.arange(k), yb] -= 1.0
        prob /= k  # d(mean CE)/dz
        grads: dict[str, F64]
        if "W1" in p:
            dh = (prob @ p["W2"].T) * (pre > 0)
            grads = {
                "W2": h.T @ prob,
                "b2": prob.sum(axis=0),
                "W1": xb.T @ dh,
                "b1": dh.sum(axis=0),
            }
        else:
            grads = {"W": xb.T @ prob, "b": prob.sum(axis=0)}
        for name, g in grads.items():
            if mu > 0:
                g = g + mu * (p[name] - anchor[name])
            p[name] -= lr * g
    return p
