"""Federated data sets that need no download: FedProx Synthetic(α, β) and Dirichlet splits.

* ``SyntheticFederated``: the Synthetic(α, β) recipe of FedProx (Li et al., arXiv
  1812.06127, ``generate_synthetic.py``) scaled to any number of sites. Each site's data is
  generated on demand from its own stream ``SeedSequence([seed, site_index])``, so a
  10,000-site data set costs nothing until a site is asked for.
* ``DirichletFederated``: scikit-learn's bundled ``load_breast_cancer`` / ``load_digits``
  split across sites with Dirichlet label skew (Hsu, Qi and Brown, arXiv 1909.06335).

Both provide the ``FederatedDataset`` protocol: ``n_examples(i)`` (training examples at
site ``i``), ``site(i) -> SiteData`` and ``test_set(eval_sites) -> (Split, n_pooled_sites)``.
Features are float32 of shape ``(n, n_features)``, labels int64 in ``[0, n_classes)``.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from fedloom.federation.seeds import seed_sequence

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

# Independent named streams derived from the data set seed. Site streams are
# ``SeedSequence([seed, i])``; these use a spawn key, so they can never coincide with one.
_STREAM_IID_MODEL: Final = 0
_STREAM_EVAL_SITES: Final = 1
_STREAM_TEST_SPLIT: Final = 2
_STREAM_PARTITION: Final = 3


def _named_rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


@dataclass(frozen=True, slots=True, eq=False)
class Split:
    """Examples ``x`` (float32, ``(n, d)``) with labels ``y`` (int64, ``(n,)``)."""

    x: F32
    y: I64

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"Split: x {self.x.shape} and y {self.y.shape} do not match")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @staticmethod
    def empty(n_features: int) -> Split:
        return Split(np.zeros((0, n_features), np.float32), np.zeros(0, np.int64))

    @staticmethod
    def concat(parts: Sequence[Split], n_features: int) -> Split:
        if not parts:
            return Split.empty(n_features)
        return Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


@dataclass(frozen=True, slots=True, eq=False)
class SiteData:
    """One site's local data. ``test`` may be empty (Dirichlet splits have no local test)."""

    train: Split
    test: Split


class FederatedDataset(Protocol):
    """What a workload needs from a federated data set."""

    @property
    def n_sites(self) -> int: ...

    @property
    def n_features(self) -> int: ...

    @property
    def n_classes(self) -> int: ...

    def n_examples(self, i: int) -> int:
        """Training examples held by site ``i`` (cheap: does not build the site's data)."""
        ...

    def site(self, i: int) -> SiteData: ...

    def test_set(self, eval_sites: int) -> tuple[Split, int]:
        """The global test set and the number of sites whose test splits were pooled in it
        (0 when it is a held-out set that belongs to no site)."""
        ...

    def describe(self) -> dict[str, Any]: ...


def _check_site(i: int, n_sites: int) -> int:
    if not 0 <= i < n_sites:
        raise ValueError(f"site index {i} out of range [0, {n_sites})")
    return int(i)


# ---------------------------------------------------------------------------- synthetic


@dataclass(frozen=True, slots=True)
class SyntheticSiteParameters:
    """The hidden per-site quantities of Synthetic(α, β) (exposed for tests and analysis)."""

    n_total: int  # n_k: train + test examples
    u: float  # mean of the site's model, u_k ~ N(0, α)
    B: float  # mean of the site's feature means, B_k ~ N(0, β)
    v: npt.NDArray[np.float64]  # feature means v_k ~ N(B_k, 1)^d (zeros in the IID variant)
    W: npt.NDArray[np.float64]  # (d, C) labelling model
    b: npt.NDArray[np.float64]  # (C,)


class SyntheticFederated:
    """FedProx Synthetic(α, β): d = 60 features, 10 classes, non-IID features and labels.

    Per site k, drawn in this order from ``default_rng(SeedSequence([seed, k]))``:

    1. n_k = ⌊LogNormal(4, 2)⌋ + 50 (replaced by ``samples_per_site`` when given, then
       capped at ``max_samples_per_site`` when given; the draw is always made so that the
       rest of the stream does not depend on these options);
    2. u_k ~ N(0, α) and B_k ~ N(0, β) (α, β are standard deviations);
       v_k ~ N(B_k, 1)^d;  W_k ~ N(u_k, 1)^{d×C};  b_k ~ N(u_k, 1)^C (one vector draw);
    3. x ~ N(v_k, Σ) with Σ = diag((j+1)^-1.2), in float32;  y = argmax softmax(x W_k + b_k).

    The first ⌊0.9 n_k⌋ examples are the site's training split, the rest its test split.
    IID variant: v_k = 0 and one global W, b ~ N(0, 1) (drawn from a separate stream) for
    every site; the per-site draws are still made so the stream layout is the same.
    """

    def __init__(
        self,
        n_sites: int,
        alpha: float = 1.0,
        beta: float = 1.0,
        *,
        iid: bool = False,
        seed: int = 0,
        samples_per_site: int | None = None,
        max_samples_per_site: int | None = None,
        n_features: int = 60,
        n_classes: int = 10,
        train_fraction: float = 0.9,
    ) -> None:
        if n_sites < 1:
            raise ValueError(f"n_sites must be >= 1, got {n_sites}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if samples_per_site is not None and samples_per_site < 2:
            raise ValueError(f"samples_per_site must be >= 2, got {samples_per_site}")
        if max_samples_per_site is not None and max_samples_per_site < 2:
            raise ValueError(f"max_samples_per_site must be >= 2, got {max_samples_per_site}")
        if n_features < 1 or n_classes < 2:
            raise ValueError("need n_features >= 1 and n_classes >= 2")
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        self._n_sites = int(n_sites)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.iid = bool(iid)
        self.seed = int(seed)
        self.samples_per_site = samples_per_site
        self.max_samples_per_site = max_samples_per_site
        self._d = int(n_features)
        self._c = int(n_classes)
        self.train_fraction = float(train_fraction)
        # x ~ N(v, Σ), Σ = diag((j+1)^-1.2): scale standard normals by (j+1)^-0.6
        self._sqrt_cov32 = np.power(np.arange(1, self._d + 1, dtype=np.float64), -0.6).astype(
            np.float32
        )
        self._n_total: dict[int, int] = {}  # memo for n_examples (ints only: tiny)
        self._iid_model: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
        self._iid32: tuple[F32, F32, F32] | None = None  # _iid_float32

    @property
    def n_sites(self) -> int:
        return self._n_sites

    @property
    def n_features(self) -> int:
        return self._d

    @property
    def n_classes(self) -> int:
        return self._c

    # -- per-site streams ------------------------------------------------------------
    def _site_rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng(seed_sequence(self.seed, i))  # SeedSequence([seed, i])

    def _draw_n_total(self, rng: np.random.Generator) -> int:
        n = int(rng.lognormal(4.0, 2.0)) + 50  # int() truncates: floor for positives
        if self.samples_per_site is not None:
            n = self.samples_per_site
        if self.max_samples_per_site is not None:
            n = min(n, self.max_samples_per_site)
        return n

    def n_total(self, i: int) -> int:
        """n_k: all examples (train + test) of site ``i``; draws only the first number."""
        _check_site(i, self._n_sites)
        n = self._n_total.get(i)
        if n is None:
            if self.samples_per_site is not None:
                # A fixed size needs no draw (site() still advances its own stream past it).
                n = self.samples_per_site
                if self.max_samples_per_site is not None:
                    n = min(n, self.max_samples_per_site)
            else:
                n = self._draw_n_total(self._site_rng(i))
            self._n_total[i] = n
        return n

    def _n_train(self, n_total: int) -> int:
        return min(max(int(self.train_fraction * n_total), 1), n_total - 1)

    def n_examples(self, i: int) -> int:
        """Training examples at site ``i``: ⌊0.9 n_k⌋ (clamped to leave one test example)."""
        return self._n_train(self.n_total(i))

    def _global_model(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        if self._iid_model is None:
            rng = _named_rng(self.seed, _STREAM_IID_MODEL)
            W = rng.normal(0.0, 1.0, (self._d, self._c))
            b = rng.normal(0.0, 1.0, self._c)
            self._iid_model = (W, b)
        return self._iid_model

    def site_parameters(self, i: int) -> SyntheticSiteParameters:
        """The hidden quantities of site ``i`` (without generating its examples)."""
        _check_site(i, self._n_sites)
        return self._parameters(self._site_rng(i))

    def _parameters(self, rng: np.random.Generator) -> SyntheticSiteParameters:
        d, c = self._d, self._c
        n = self._draw_n_total(rng)
        # One draw for all site parameters (fewer numpy calls: sites are built per job
        # when they fall out of the workload's cache): [u, B, v (d), W (d*c), b (c)].
        z = rng.standard_normal(2 + d + d * c + c)
        u = self.alpha * float(z[0])
        B = self.beta * float(z[1])
        v = z[2 : 2 + d] + B
        W = z[2 + d : 2 + d + d * c].reshape(d, c) + u
        b = z[2 + d + d * c :] + u
        if self.iid:
            v = np.zeros(d)
            W, b = self._global_model()
        return SyntheticSiteParameters(n_total=n, u=u, B=B, v=v, W=W, b=b)

    def site(self, i: int) -> SiteData:
        """Generate site ``i``'s data (deterministic; nothing is cached here)."""
        _check_site(i, self._n_sites)
        rng = self._site_rng(i)
        d, c = self._d, self._c
        if self.iid:
            # _parameters' draws (the stream's layout), of which the IID variant keeps only
            # n_total: its v is zeros and its W, b the global model's (float32 copies kept).
            n_total = self._draw_n_total(rng)
            rng.standard_normal(2 + d + d * c + c)
            v32, W32, b32 = self._iid_float32()
        else:
            p = self._parameters(rng)
            n_total = p.n_total
            v32, W32, b32 = p.v.astype(np.float32), p.W.astype(np.float32), p.b.astype(np.float32)
        x = rng.standard_normal((n_total, d), dtype=np.float32)
        x *= self._sqrt_cov32
        x += v32
        # argmax of softmax(z) is argmax of z; labels come from the stored float32 features
        logits = x @ W32
        logits += b32
        y = logits.argmax(axis=1).astype(np.int64)
        k = self._n_train(n_total)
        return SiteData(train=Split(x[:k], y[:k]), test=Split(x[k:], y[k:]))

    def _iid_float32(self) -> tuple[F32, F32, F32]:
        """The IID variant's v (zeros), W and b as float32 (the global model's, cast once)."""
        if self._iid32 is None:
            W, b = self._global_model()
            self._iid32 = (
                np.zeros(self._d, np.float32),
                W.astype(np.float32),
                b.astype(np.float32),
            )
        return self._iid32

    # -- evaluation -------------------------------------------------------------------
    def eval_site_indices(self, eval_sites: int) -> npt.NDArray[np.int64]:
        """A deterministic sample of at most ``eval_sites`` site indices (sorted)."""
        if eval_sites < 1:
            raise ValueError(f"eval_sites must be >= 1, got {eval_sites}")
        if eval_sites >= self._n_sites:
            return np.arange(self._n_sites, dtype=np.int64)
        rng = _named_rng(self.seed, _STREAM_EVAL_SITES)
        return np.sort(rng.choice(self._n_sites, eval_sites, replace=False)).astype(np.int64)

    def test_set(self, eval_sites: int = 100) -> tuple[Split, int]:
        """The test splits of ``eval_site_indices(eval_sites)`` pooled into one set."""
        idx = self.eval_site_indices(eval_sites)
        parts = [self.site(int(i)).test for i in idx]
        return Split.concat(parts, self._d), len(idx)

    def describe(self) -> dict[str, Any]:
        return {
            "name": "synthetic",
            "alpha": self.alpha,
            "beta": self.beta,
            "iid": self.iid,
            "seed": self.seed,
            "n_sites": self._n_sites,
            "n_features": self._d,
            "n_classes": self._c,
            "samples_per_site": self.samples_per_site,
            "max_samples_per_site": self.max_samples_per_site,
            "train_fraction": self.train_fraction,
        }


# ---------------------------------------------------------------------------- dirichlet

SKLEARN_DATASETS: Final = ("breast_cancer", "digits")


def _sklearn_data_file(file_name: str) -> Path | None:
    """A data file scikit-learn ships (``sklearn/datasets/data/``), found without importing
    scikit-learn: its import loads scipy and pandas, seconds of every daemon's start-up on
    a small machine, where reading the file takes milliseconds. Raises the
    ModuleNotFoundError (name "sklearn") of a missing ``data`` extra; None when scikit-learn
    is installed in some other way (then its own loader reads the data)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")
    for base in spec.submodule_search_locations or ():
        path = Path(base) / "datasets" / "data" / file_name
        if path.is_file():
            return path
    return None


def _read_breast_cancer(path: Path) -> tuple[npt.NDArray[np.float64], I64]:
    """``sklearn.datasets.load_breast_cancer(return_X_y=True)``, read as scikit-learn
    reads it (``load_csv_data``: a header of counts and names, then rows of features and a
    label), so the arrays are the very same."""
    with path.open("r", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        head = next(rows)
        data = np.empty((int(head[0]), int(head[1])))
        target = np.empty((int(head[0]),), dtype=int)
        for i, row in enumerate(rows):
            data[i] = np.asarray(row[:-1], dtype=np.float64)
            target[i] = np.asarray(row[-1], dtype=int)
    return data, target


def _read_digits(path: Path) -> tuple[npt.NDArray[np.float64], I64]:
    """``sklearn.datasets.load_digits(return_X_y=True)`` (all ten classes), read as
    scikit-learn reads it: ``np.loadtxt`` of the gzipped CSV, the label last."""
    with path.open("rb") as raw, gzip.open(raw, mode="rt", encoding="utf-8") as fh:
        data = np.loadtxt(fh, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int, copy=False)


def load_sklearn(name: str) -> tuple[npt.NDArray[np.float64], I64]:
    """Features and labels of a data set bundled with scikit-learn (no download)."""
    if name not in SKLEARN_DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {SKLEARN_DATASETS}")
    file_name = "breast_cancer.csv" if name == "breast_cancer" else "digits.csv.gz"
    path = _sklearn_data_file(file_name)
    if path is not None:
        read = _read_breast_cancer if name == "breast_cancer" else _read_digits
        x, y = read(path)
    else:
        from sklearn import datasets  # scikit-learn installed without its files on disk

        if name == "breast_cancer":
            x, y = datasets.load_breast_cancer(return_X_y=True)
        else:
            x, y = datasets.load_digits(return_X_y=True)
    return np.asarray(x, np.float64), np.asarray(y, np.int64)


def _approximate_mode(class_counts: I64, n_draws: int, rng: np.random.RandomState) -> I64:
    """scikit-learn's ``utils.extmath._approximate_mode``: how many of ``n_draws`` come
    from each class (floored shares, the rest to the largest remainders, ties by ``rng``)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    mode: I64 = floored.astype(np.int64)
    return mode


def stratified_split(y: I64, test_fraction: float, seed: int) -> tuple[I64, I64]:
    """Train and test indices of ``y``, exactly those of scikit-learn's
    ``train_test_split(..., test_size=test_fraction, stratify=y, random_state=seed)``
    (its ``StratifiedShuffleSplit``, one split), computed without importing scikit-learn
    (``tests/workloads/test_datasets.py`` compares the two)."""
    n = int(y.shape[0])
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if np.min(class_counts) < 2:
        raise ValueError("every class needs at least 2 examples for a stratified split")
    if min(n_train, n_test) < classes.shape[0]:
        raise ValueError(
            f"a stratified split of {n} examples into {n_train} and {n_test} cannot hold "
            f"each of {classes.shape[0]} classes on both sides"
        )
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[Any] = []
    test: list[Any] = []
    for i in range(classes.shape[0]):
        permutation = rng.permutation(class_counts[i])
        perm_indices_class_i = class_indices[i].take(permutation, mode="clip")
        train.extend(perm_indices_class_i[: n_i[i]])
        test.extend(perm_indices_class_i[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def dirichlet_partition(
    y: npt.NDArray[np.integer[Any]],
    n_sites: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_per_site: int = 5,
) -> list[npt.NDArray[np.int64]]:
    """Split the indices of ``y`` across ``n_sites`` with Dirichlet label skew.

    For every class (in sorted order) its shuffled indices are cut into ``n_sites``
    consecutive pieces with proportions ~ Dir(α·1) (Hsu et al. 2019). Then, so that no
    site is (nearly) empty, any site with fewer than ``min_per_site`` examples takes
    randomly chosen examples, one at a time, from whichever site holds the most. This
    touches only the largest sites and at most ``n_sites · min_per_site`` examples, so the
    skew is essentially preserved. Every index lands at exactly one site; each site's
    indices are returned sorted.
    """
    n = int(y.shape[0])
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet alpha must be a finite number > 0, got {alpha!r}")
    if min_per_site < 0:
        raise ValueError(f"min_per_site must be >= 0, got {min_per_site}")
    if n < n_sites * min_per_site:
        raise ValueError(
            f"{n} examples cannot give {n_sites} sites at least {min_per_site} each; "
            "use fewer sites or a smaller min_samples_per_site"
        )
    sites: list[list[int]] = [[] for _ in range(n_sites)]
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for s, part in enumerate(np.split(idx, cuts)):
            sites[s].extend(part.tolist())
    sizes = np.array([len(s) for s in sites], np.int64)
    for s in range(n_sites):
        while sizes[s] < min_per_site:
            donor = int(np.argmax(sizes))  # has > min_per_site (pigeonhole)
            pool = sites[donor]
            j = int(rng.integers(len(pool)))
            pool[j], pool[-1] = pool[-1], pool[j]
            sites[s].append(pool.pop())
            sizes[donor] -= 1
            sizes[s] += 1
    return [np.sort(np.asarray(s, np.int64)) for s in sites]


class DirichletFederated:
    """A scikit-learn data set split across sites with Dirichlet label skew.

    1. A stratified global test split (``test_fraction``, default 20%) is held out first.
    2. Features are standardised with the mean and standard deviation of the training part
       (constant features get scale 1).
    3. The training part is split with ``dirichlet_partition`` (α = ``alpha``).

    Sites have no local test split (``SiteData.test`` is empty); the global test set is the
    held-out split.
    """

    def __init__(
        self,
        name: str,
        n_sites: int,
        *,
        alpha: float = 0.5,
        seed: int = 0,
        test_fraction: float = 0.2,
        min_samples_per_site: int = 5,
    ) -> None:
        if name not in SKLEARN_DATASETS:
            raise ValueError(f"unknown data set {name!r}; expected one of {SKLEARN_DATASETS}")
        if n_sites < 1:
            raise ValueError(f"n_sites must be >= 1, got {n_sites}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.name = name
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.test_fraction = float(test_fraction)
        self.min_samples_per_site = int(min_samples_per_site)
        x, y = load_sklearn(name)
        split_seed = int(_named_rng(seed, _STREAM_TEST_SPLIT).integers(2**31 - 1))
        train, test = stratified_split(y, test_fraction, split_seed)
        x_tr, x_te, y_tr, y_te = x[train], x[test], y[train], y[test]
        mean = x_tr.mean(axis=0)
        std = x_tr.std(axis=0)
        std[std == 0] = 1.0
        self._x_train = ((x_tr - mean) / std).astype(np.float32)
        self._y_train = np.asarray(y_tr, np.int64)
        self._test = Split(((x_te - mean) / std).astype(np.float32), np.asarray(y_te, np.int64))
        self._n_classes = int(y.max()) + 1
        self._parts = dirichlet_partition(
            self._y_train,
            n_sites,
            self.alpha,
            _named_rng(seed, _STREAM_PARTITION),
            min_per_site=self.min_samples_per_site,
        )

    @property
    def n_sites(self) -> int:
        return len(self._parts)

    @property
    def n_features(self) -> int:
        return int(self._x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return self._n_classes

    @property
    def n_train_total(self) -> int:
        return int(self._y_train.shape[0])

    def site_indices(self, i: int) -> npt.NDArray[np.int64]:
        """Indices into the (global) training part that belong to site ``i``."""
        return self._parts[_check_site(i, self.n_sites)]

    def n_examples(self, i: int) -> int:
        return int(self.site_indices(i).shape[0])

    def site(self, i: int) -> SiteData:
        idx = self.site_indices(i)
        train = Split(self._x_train[idx], self._y_train[idx])
        return SiteData(train=train, test=Split.empty(self.n_features))

    def label_counts(self) -> npt.NDArray[np.int64]:
        """``(n_sites, n_classes)`` label histogram of the split."""
        out = np.zeros((self.n_sites, self._n_classes), np.int64)
        for s, idx in enumerate(self._parts):
            out[s] = np.bincount(self._y_train[idx], minlength=self._n_classes)
        return out

    def test_set(self, eval_sites: int = 100) -> tuple[Split, int]:
        """The held-out global test split (``eval_sites`` is irrelevant here: 0 pooled)."""
        return self._test, 0

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dirichlet_alpha": self.alpha,
            "seed": self.seed,
            "n_sites": self.n_sites,
            "n_features": self.n_features,
            "n_classes": self._n_classes,
            "test_fraction": self.test_fraction,
            "min_samples_per_site": self.min_samples_per_site,
            "n_train": self.n_train_total,
            "n_test": len(self._test),
        }
