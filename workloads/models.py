"""Training plans (``algorithms.training.TrainingPlan``) for the simulator and the daemons.

* ``SoftmaxRegression``: multinomial logistic regression in numpy, exact minibatch
  gradients, FedProx proximal term. Built for speed: a job of 5 steps × batch 10 on
  d = 60, C = 10 is about 45 small numpy calls, ~0.1 ms on one core.
* ``TorchMLP`` / ``TorchCNN``: small torch models on the CPU (one thread), with weights
  exchanged as numpy float32 dicts keyed by ``state_dict`` names. torch is imported only
  when one of them is used, so softmax-only simulations never pay for it.

Minibatches (all plans): consecutive slices of a random permutation of the local training
set, a fresh permutation per epoch, drawn from a generator restarted from
``config["seed"]`` (``SeededRng``). A plan is not meant to run two jobs at once (a site
trains one job at a time); different plans are independent and may train in parallel
threads.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedloom.algorithms.protocol import TrainResult, Weights
from fedloom.algorithms.training import TrainConfig, TrainingPlan
from fedloom.workloads.datasets import Split

MODEL_NAMES: Final = ("softmax", "mlp", "cnn")

# Below this many local examples a permutation via argsort of uniforms is cheapest;
# above it, drawing only the needed prefix (Generator.choice) avoids O(n) work per job.
_SMALL_N: Final = 4096


_M128: Final = (1 << 128) - 1
# Odd 128-bit multipliers (digits of the golden ratio and of pi): seeds that differ by one
# land on unrelated PCG64 states and stream increments.
_K_STATE: Final = 0x9E3779B97F4A7C15F39CC0605CEDC835
_K_INC: Final = 0x243F6A8885A308D313198A2E03707345


class SeededRng:
    """A ``Generator`` that restarts from an integer seed in about a microsecond.

    ``default_rng(seed)`` runs ``SeedSequence`` (≈ 12 µs, a tenth of a softmax job's
    budget); here the seed is hashed multiplicatively straight into a PCG64 state and
    increment. Same seed, same stream. Not thread-safe: use ``thread_rng()``.
    """

    __slots__ = ("_bits", "_gen")

    def __init__(self) -> None:
        self._bits = np.random.PCG64(0)
        self._gen = np.random.Generator(self._bits)

    def reset(self, seed: int) -> np.random.Generator:
        x = (seed + 1) & _M128
        state = (x * _K_STATE) & _M128
        state ^= state >> 64
        self._bits.state = {
            "bit_generator": "PCG64",
            "state": {"state": state, "inc": ((x * _K_INC) & _M128) | 1},
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._gen


_local = threading.local()


def thread_rng() -> SeededRng:
    """This thread's ``SeededRng``. Shared by all plans: a job resets it and draws all its
    randomness at once, so jobs never see each other's state (and plans stay cheap to build:
    creating a PCG64 costs a ``SeedSequence``)."""
    rng: SeededRng | None = getattr(_local, "rng", None)
    if rng is None:
        rng = _local.rng = SeededRng()
    return rng


def minibatch_order(rng: np.random.Generator, n: int, total: int) -> npt.NDArray[np.intp]:
    """``total`` example indices in ``[0, n)``: the first ``total`` entries of a sequence of
    independent uniform random permutations of ``range(n)`` (one per epoch)."""
    if total <= n:
        if n <= _SMALL_N:
            return rng.random(n).argsort()[:total]
        return rng.choice(n, total, replace=False)
    # rng.permutation(n) is arange(n) shuffled: shuffle each epoch's slice of one copy of
    # the tiled aranges in place (the same draws, no per-epoch arrays to concatenate).
    epochs = -(-total // n)
    key = (n, epochs)
    tiled = _TILED.get(key)
    if tiled is None:
        tiled = np.tile(np.arange(n), epochs)
        if len(_TILED) < 64:
            _TILED[key] = tiled
    order = tiled.copy()
    shuffle = rng.shuffle
    for lo in range(0, epochs * n, n):
        shuffle(order[lo : lo + n])
    return order[:total]


# (n, epochs) -> arange(n) repeated epochs times (read-only use: copied before shuffling).
_TILED: dict[tuple[int, int], npt.NDArray[np.intp]] = {}


# Parsed configs by (lr, local_steps, batch_size, mu): parsing and validating a config
# costs a few µs per job, and a run uses only a handful of distinct ones.
_CONFIG_CACHE: dict[tuple[Any, ...], TrainConfig] = {}


def parse_config(config: Mapping[str, Any]) -> tuple[TrainConfig, int]:
    """``(validated config, seed)``; the seed is validated on every call."""
    get = config.get
    lr, steps, bs, mu = get("lr"), get("local_steps"), get("batch_size"), get("mu")
    # types are part of the key: True == 1, but True is not a valid batch size
    key = (lr, steps, bs, mu, type(lr), type(steps), type(bs), type(mu))
    try:
        cfg = _CONFIG_CACHE.get(key)
    except TypeError:  # unhashable value: let the full parser report it
        cfg = None
    if cfg is None:
        cfg = TrainConfig.from_mapping({k: v for k, v in config.items() if k != "seed"})
        if len(_CONFIG_CACHE) < 64:
            _CONFIG_CACHE[key] = cfg
    seed = get("seed", 0)
    if type(seed) is not int or seed < 0:
        seed = TrainConfig.from_mapping({"seed": seed}).seed
    return cfg, seed


def _check_split(split: Split | None, n_features: int, n_classes: int, what: str) -> Split:
    if split is None:
        return Split.empty(n_features)
    if split.x.shape[1] != n_features:
        raise ValueError(f"{what}: {split.x.shape[1]} features, model expects {n_features}")
    if len(split) and (int(split.y.min()) < 0 or int(split.y.max()) >= n_classes):
        raise ValueError(f"{what}: labels outside [0, {n_classes})")
    return split


# ---------------------------------------------------------------------------- softmax


class SoftmaxRegression:
    """Multinomial logistic regression: p = softmax(x W + b), mean cross-entropy loss.

    Weights: ``{"W": (d, C) float32, "b": (C,) float32}``; ``init`` gives zeros (the
    FedProx convention for this convex model) unless ``init_scale > 0``.
    ``evaluate`` uses the ``test`` split, or the ``train`` split when ``test`` is empty.

    Speed (a job is ~45 small numpy calls, each ~1-3 µs, so the number of calls is what
    counts): W and b are stacked into one (d+1, C) float64 matrix θ and x gets a column of
    ones, so one matmul gives the logits and one gives both gradients; x, the one-hot
    labels and lr/batch are gathered and folded once per job.

    The softmax is not shifted by the row maximum on the fast path. That is safe in
    practice: the gradient of the logits sums to zero over classes, so the class-mean
    logit stays where the initial weights put it (0 from ``init``) and the largest logit
    is >= that mean; exp overflows only past 709, i.e. for a diverged model. A job whose
    result is not finite is re-run with the max-shifted (always stable) softmax, so the
    result is exact either way.
    """

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        train: Split | None = None,
        test: Split | None = None,
        *,
        init_scale: float = 0.0,
    ) -> None:
        if n_features < 1 or n_classes < 2:
            raise ValueError("SoftmaxRegression needs n_features >= 1 and n_classes >= 2")
        self.n_features = d = int(n_features)
        self.n_classes = c = int(n_classes)
        self.init_scale = float(init_scale)
        tr = _check_split(train, d, c, "train")
        te = _check_split(test, d, c, "test")
        # Its own copy when it is a view (a site's test split is a slice of all its data,
        # which would otherwise stay alive beside the rows).
        self._eval = _owned(te if len(te) else tr)
        self._n_train = len(tr)
        # One row per example: [x, 1, onehot(y)]; a single gather per job fetches all.
        # float32 features keep float32 rows (exact: the 1 and the one-hot too), half the
        # memory of float64 ones; a job widens only the rows it gathered, so it computes
        # on the same float64 values either way.
        dtype = np.float32 if tr.x.dtype == np.float32 else np.float64
        rows = np.zeros((len(tr), d + 1 + c), dtype)
        rows[:, :d] = tr.x
        rows[:, d] = 1.0
        rows[np.arange(len(tr)), d + 1 + tr.y] = 1.0
        self._rows = rows

    @property
    def nbytes(self) -> int:
        """Bytes of data this plan holds (its training rows and its evaluation split)."""
        return int(self._rows.nbytes + self._eval.x.nbytes + self._eval.y.nbytes)

    @property
    def n_train(self) -> int:
        return self._n_train

    @property
    def n_params(self) -> int:
        return (self.n_features + 1) * self.n_classes

    def init(self, seed: int) -> Weights:
        d, c = self.n_features, self.n_classes
        if self.init_scale > 0:
            rng = np.random.default_rng(seed)
            W = rng.normal(0.0, self.init_scale, (d, c)).astype(np.float32)
            b = rng.normal(0.0, self.init_scale, c).astype(np.float32)
            return {"W": W, "b": b}
        return {"W": np.zeros((d, c), np.float32), "b": np.zeros(c, np.float32)}

    def _theta(self, weights: Weights) -> npt.NDArray[np.float64]:
        d, c = self.n_features, self.n_classes
        try:
            W, b = weights["W"], weights["b"]
        except KeyError as e:
            raise ValueError(f"softmax weights need 'W' and 'b', missing {e}") from None
        if W.shape != (d, c) or b.shape != (c,):
            raise ValueError(f"softmax weights: W {W.shape} / b {b.shape}, expected ({d}, {c})")
        theta = np.empty((d + 1, c), np.float64)
        theta[:d] = W
        theta[d] = b
        return theta

    def _weights(self, theta: npt.NDArray[np.float64]) -> Weights:
        # One cast; "W" and "b" are views of that fresh array (nobody else holds it).
        t32 = theta.astype(np.float32)
        return {"W": t32[:-1], "b": t32[-1]}

    def train(self, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        cfg, seed = parse_config(config)
        n = self._n_train
        if n == 0:
            raise ValueError("SoftmaxRegression.train: this plan has no training data")
        theta = self._theta(weights)  # a fresh array: updated in place below
        order = minibatch_order(thread_rng().reset(seed), n, cfg.batch_size * cfg.local_steps)
        rows = self._rows.take(order, axis=0).astype(np.float64, copy=False)  # take: no fancy
        if not self._descend(theta, rows, cfg, stable=False):
            theta = self._theta(weights)
            self._descend(theta, rows, cfg, stable=True)
        return TrainResult(self._weights(theta), n)

    def _descend(
        self,
        theta: npt.NDArray[np.float64],
        rows: npt.NDArray[np.float64],
        cfg: TrainConfig,
        *,
        stable: bool,
    ) -> bool:
        """``local_steps`` SGD steps on ``theta`` in place; False if the result is not finite."""
        bs, d1 = cfg.batch_size, self.n_features + 1
        # One (batch, ...) slab per step: iterating the leading axis yields each step's
        # views (the same strides as slices of the 2-D rows) without slicing per step.
        steps = rows.reshape(cfg.local_steps, bs, rows.shape[1])
        xb = steps[:, :, :d1]
        yb = steps[:, :, d1:]
        xbk = xb * (cfg.lr / bs)  # folds the step size and the 1/batch mean into x
        c = self.n_classes
        probs = np.empty((bs, c), np.float64)
        denom = np.empty((bs, 1), np.float64)
        grad = np.empty((d1, c), np.float64)
        prox = cfg.mu > 0
        if prox:  # theta <- theta - lr*mu*(theta - theta_global) - lr*grad
            shrink = 1.0 - cfg.lr * cfg.mu
            pull = theta * (cfg.lr * cfg.mu)
        matmul, exp, divide, row_sum = np.matmul, np.exp, np.divide, np.add.reduce
        for x, y, xk in zip(xb, yb, xbk, strict=True):
            matmul(x, theta, out=probs)
            if stable:
                probs -= np.maximum.reduce(probs, axis=1, keepdims=True)
            exp(probs, out=probs)
            row_sum(probs, axis=1, keepdims=True, out=denom)
            divide(probs, denom, out=probs)
            probs -= y
            matmul(xk.T, probs, out=grad)  # lr * minibatch gradient, at the old theta
            if prox:
                theta *= shrink
                theta += pull
            theta -= grad
        return stable or math.isfinite(theta.sum())

    def objective(
        self,
        weights: Mapping[str, npt.NDArray[Any]],
        x: npt.NDArray[np.floating[Any]],
        y: npt.NDArray[np.integer[Any]],
        *,
        mu: float = 0.0,
        anchor: Mapping[str, npt.NDArray[Any]] | None = None,
    ) -> tuple[float, dict[str, npt.NDArray[np.float64]]]:
        """The exact local objective on (x, y) and its gradient (float64), for checking.

        ``mean cross-entropy + (mu/2)·||w − anchor||²``; ``train`` descends this, with
        ``anchor`` = the weights it was given.
        """
        W = np.asarray(weights["W"], np.float64)
        b = np.asarray(weights["b"], np.float64)
        z = np.asarray(x, np.float64) @ W + b
        z -= z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        rows = np.arange(len(y))
        loss = float(np.mean(lse - z[rows, y]))
        p = np.exp(z - lse[:, None])
        p[rows, y] -= 1.0
        p /= len(y)
        gW = np.asarray(x, np.float64).T @ p
        gb = p.sum(axis=0)
        if mu > 0 and anchor is not None:
            dW = W - anchor["W"]
            db = b - anchor["b"]
            loss += 0.5 * mu * float((dW * dW).sum() + (db * db).sum())
            gW += mu * dW
            gb += mu * db
        return loss, {"W": gW, "b": gb}

    def evaluate(self, weights: Weights) -> dict[str, float]:
        ev = self._eval
        if len(ev) == 0:
            raise ValueError("SoftmaxRegression.evaluate: this plan has no evaluation data")
        theta = self._theta(weights)
        z = ev.x.astype(np.float64) @ theta[:-1] + theta[-1]
        return _ce_metrics(z, ev.y)


def _owned(split: Split) -> Split:
    """``split`` itself, or a copy of it if its arrays are views of larger ones."""
    if split.x.base is None and split.y.base is None:
        return split
    return Split(split.x.copy(), split.y.copy())


def _ce_metrics(z: npt.NDArray[np.float64], y: npt.NDArray[np.integer[Any]]) -> dict[str, float]:
    """Accuracy and mean cross-entropy of logits ``z`` against labels ``y``."""
    acc = float(np.mean(z.argmax(axis=1) == y))
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    loss = float(np.mean(lse - z[np.arange(len(y)), y]))
    return {"accuracy": acc, "loss": loss}


# ------------------------------------------------------------------------------ torch


def _torch() -> Any:
    import torch

    return torch


class _TorchPlan:
    """Shared machinery: numpy weights in and out, manual SGD with the FedProx term."""

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        train: Split | None = None,
        test: Split | None = None,
    ) -> None:
        if n_features < 1 or n_classes < 2:
            raise ValueError(f"{type(self).__name__} needs n_features >= 1 and n_classes >= 2")
        self.n_features = int(n_features)
        self.n_classes = int(n_classes)
        tr = _check_split(train, n_features, n_classes, "train")
        te = _check_split(test, n_features, n_classes, "test")
        self._train = tr
        self._eval = te if len(te) else tr
        self._module: Any = None
        self._tensors: Any = None  # (x_train, y_train, x_eval, y_eval) as torch tensors

    def _build(self) -> Any:
        raise NotImplementedError

    def _net(self) -> Any:
        if self._module is None:
            torch = _torch()
            # The module's own random init is overwritten by every load; fork so building
            # it leaves the caller's global torch RNG untouched.
            with torch.random.fork_rng(devices=[]):
                self._module = self._build()
            self._module.requires_grad_(True)
            tr, ev = self._train, self._eval
            t = torch.tensor  # copies: the plan never shares memory with the data set
            self._tensors = (t(tr.x), t(tr.y), t(ev.x), t(ev.y))
        return self._module

    @property
    def n_train(self) -> int:
        return len(self._train)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names (``state_dict`` order) and shapes."""
        return {k: tuple(v.shape) for k, v in self._net().state_dict().items()}

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    def init(self, seed: int) -> Weights:
        """PyTorch's default init law (U(±1/√fan_in) for weights and biases of Linear and
        Conv2d layers), drawn with numpy from ``seed`` so it is exactly reproducible."""
        rng = np.random.default_rng(seed)
        shapes = self.param_shapes()
        out: Weights = {}
        for name, shape in shapes.items():
            owner = name.rsplit(".", 1)[0]
            w_shape = shapes[f"{owner}.weight"]
            fan_in = math.prod(w_shape[1:])
            bound = 1.0 / math.sqrt(fan_in)
            out[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
        return out

    def _load(self, weights: Weights) -> Any:
        torch = _torch()
        net = self._net()
        params = dict(net.named_parameters())
        if set(weights) != set(params):
            raise ValueError(
                f"{type(self).__name__} weights: expected keys {sorted(params)}, "
                f"got {sorted(weights)}"
            )
        with torch.no_grad():
            for name, p in params.items():
                w = weights[name]
                if tuple(w.shape) != tuple(p.shape):
                    raise ValueError(f"weights[{name!r}]: shape {w.shape}, expected {p.shape}")
                p.copy_(torch.tensor(np.asarray(w, np.float32)))
        return net

    def _export(self) -> Weights:
        return {k: v.detach().numpy().copy() for k, v in self._net().state_dict().items()}

    def train(self, weights: Weights, config: Mapping[str, Any]) -> TrainResult:
        torch = _torch()
        torch.set_num_threads(1)
        cfg, seed = parse_config(config)
        n = self.n_train
        if n == 0:
            raise ValueError(f"{type(self).__name__}.train: this plan has no training data")
        net = self._load(weights)
        net.train()
        xt, yt, _, _ = self._tensors
        params = list(net.parameters())
        anchor = [p.detach().clone() for p in params] if cfg.mu > 0 else None
        rng = thread_rng().reset(seed)
        order = torch.from_numpy(minibatch_order(rng, n, cfg.batch_size * cfg.local_steps))
        cross_entropy = torch.nn.functional.cross_entropy
        foreach_add, foreach_sub = torch._foreach_add_, torch._foreach_sub
        loss_sum = 0.0
        bs = cfg.batch_size
        for lo in range(0, bs * cfg.local_steps, bs):
            idx = order[lo : lo + bs]
            loss = cross_entropy(net(xt[idx]), yt[idx])
            grads = list(torch.autograd.grad(loss, params))
            loss_sum += float(loss.detach())
            with torch.no_grad():
                if anchor is not None:  # FedProx: d/dw (mu/2)||w - w0||^2 = mu (w - w0)
                    foreach_add(grads, foreach_sub(params, anchor), alpha=cfg.mu)
                foreach_add(params, grads, alpha=-cfg.lr)
        return TrainResult(self._export(), n, {"train_loss": loss_sum / cfg.local_steps})

    def evaluate(self, weights: Weights) -> dict[str, float]:
        torch = _torch()
        torch.set_num_threads(1)
        if len(self._eval) == 0:
            raise ValueError(f"{type(self).__name__}.evaluate: no evaluation data")
        net = self._load(weights)
        net.eval()
        _, _, xe, ye = self._tensors
        with torch.no_grad():
            z = net(xe).double().numpy()
        return _ce_metrics(z, ye.numpy())


class TorchMLP(_TorchPlan):
    """One hidden layer: Linear(d, hidden) → ReLU → Linear(hidden, C)."""

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        train: Split | None = None,
        test: Split | None = None,
        *,
        hidden: int = 32,
    ) -> None:
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.hidden = int(hidden)
        super().__init__(n_features, n_classes, train, test)

    def _build(self) -> Any:
        nn = _torch().nn
        return nn.Sequential(
            nn.Linear(self.n_features, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.n_classes),
        )


class TorchCNN(_TorchPlan):
    """A small CNN for square one-channel images (8×8 digits by default):
    conv3×3(1→c1) → ReLU → maxpool2 → conv3×3(c1→c2) → ReLU → maxpool2 → Linear(·, C)."""

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        train: Split | None = None,
        test: Split | None = None,
        *,
        channels: tuple[int, int] = (8, 16),
    ) -> None:
        side = math.isqrt(n_features)
        if side * side != n_features or side < 4:
            raise ValueError(
                f"TorchCNN needs square images of side >= 4 (64 features for digits), "
                f"got n_features={n_features}"
            )
        if len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"channels must be two positive ints, got {channels}")
        self.side = side
        self.channels = (int(channels[0]), int(channels[1]))
        super().__init__(n_features, n_classes, train, test)

    def _build(self) -> Any:
        nn = _torch().nn
        c1, c2 = self.channels
        out_side = self.side // 2 // 2
        return nn.Sequential(
            nn.Unflatten(1, (1, self.side, self.side)),
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * out_side * out_side, self.n_classes),
        )


def make_model(
    name: str,
    n_features: int,
    n_classes: int,
    *,
    train: Split | None = None,
    test: Split | None = None,
    **kw: Any,
) -> TrainingPlan:
    """A training plan by name: ``"softmax"`` (kw: ``init_scale``), ``"mlp"`` (kw:
    ``hidden``) or ``"cnn"`` (kw: ``channels``), on the given train / evaluation splits."""
    if name == "softmax":
        return SoftmaxRegression(n_features, n_classes, train, test, **kw)
    if name == "mlp":
        return TorchMLP(n_features, n_classes, train, test, **kw)
    if name == "cnn":
        return TorchCNN(n_features, n_classes, train, test, **kw)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
