"""FedProx Synthetic(α, β) and Dirichlet-split data sets."""

from __future__ import annotations

import numpy as np
import pytest

from fedloom.workloads.datasets import (
    DirichletFederated,
    Split,
    SyntheticFederated,
    dirichlet_partition,
    load_sklearn,
    stratified_split,
)

# ------------------------------------------------------------------------------ synthetic


def test_synthetic_shapes_labels_and_split() -> None:
    ds = SyntheticFederated(20, 1.0, 1.0, seed=3)
    assert (ds.n_sites, ds.n_features, ds.n_classes) == (20, 60, 10)
    for i in range(5):
        site = ds.site(i)
        n_total = ds.n_total(i)
        assert len(site.train) + len(site.test) == n_total
        assert len(site.train) == int(0.9 * n_total) == ds.n_examples(i)
        assert site.train.x.shape == (len(site.train), 60)
        assert site.train.x.dtype == np.float32
        assert site.train.y.dtype == np.int64
        y = np.concatenate([site.train.y, site.test.y])
        assert y.min() >= 0 and y.max() < 10


def test_synthetic_n_k_follows_lognormal_formula() -> None:
    ds = SyntheticFederated(400, seed=0)
    ns = np.array([ds.n_total(i) for i in range(400)])
    assert ns.min() >= 50
    # n_k - 50 = floor(LogNormal(4, 2)): log of it is roughly N(4, 2).
    logs = np.log(ns[ns > 51] - 50 + 0.5)
    assert 3.5 < np.median(logs) < 4.5
    assert 1.5 < logs.std() < 2.5
    # and it is the first draw of the site's own stream
    rng = np.random.default_rng(np.random.SeedSequence([0, 7]))
    assert ds.n_total(7) == int(rng.lognormal(4.0, 2.0)) + 50


def test_synthetic_fixed_size_and_cap() -> None:
    fixed = SyntheticFederated(30, samples_per_site=50, seed=1)
    assert all(fixed.n_total(i) == 50 for i in range(30))
    assert all(fixed.n_examples(i) == 45 for i in range(30))
    capped = SyntheticFederated(300, max_samples_per_site=80, seed=1)
    sizes = [capped.n_total(i) for i in range(300)]
    assert max(sizes) == 80 and min(sizes) >= 50
    # the options change the sizes only: the rest of each site's stream is the same
    free = SyntheticFederated(30, seed=1)
    assert fixed.site_parameters(4).u == free.site_parameters(4).u
    np.testing.assert_array_equal(fixed.site_parameters(4).W, free.site_parameters(4).W)


def test_synthetic_is_deterministic_and_sites_differ() -> None:
    a = SyntheticFederated(50, 0.5, 0.5, seed=11).site(17)
    b = SyntheticFederated(50, 0.5, 0.5, seed=11).site(17)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    c = SyntheticFederated(50, 0.5, 0.5, seed=12).site(17)
    assert not np.array_equal(a.train.x[:5], c.train.x[:5])
    d = SyntheticFederated(50, 0.5, 0.5, seed=11).site(18)
    assert not np.array_equal(a.train.x[:5], d.train.x[:5])


def test_synthetic_labels_follow_the_site_model() -> None:
    ds = SyntheticFederated(5, 1.0, 1.0, seed=2)
    p = ds.site_parameters(1)
    site = ds.site(1)
    z = site.train.x.astype(np.float64) @ p.W + p.b
    # labels come from float64 features; float32 storage may flip a near tie, not more
    assert np.mean(z.argmax(axis=1) == site.train.y) > 0.98


def test_synthetic_feature_covariance_is_diagonal_power_law() -> None:
    ds = SyntheticFederated(1, 0.0, 0.0, seed=5, samples_per_site=20000)
    x = ds.site(0).train.x.astype(np.float64)
    var = x.var(axis=0)
    expected = np.arange(1, 61, dtype=np.float64) ** -1.2
    np.testing.assert_allclose(var, expected, rtol=0.1)


def test_beta_is_a_standard_deviation_of_feature_means() -> None:
    def spread(beta: float) -> float:
        ds = SyntheticFederated(300, 0.0, beta, seed=9, samples_per_site=50)
        means = [ds.site_parameters(i).v.mean() for i in range(300)]
        return float(np.std(means))

    lo, hi = spread(0.1), spread(3.0)
    # v_k ~ N(B_k, 1)^60 with B_k ~ N(0, beta): std of mean(v_k) ≈ sqrt(beta² + 1/60)
    assert hi == pytest.approx(np.sqrt(9 + 1 / 60), rel=0.15)
    assert lo == pytest.approx(np.sqrt(0.01 + 1 / 60), rel=0.2)
    # and the data themselves show it
    ds = SyntheticFederated(200, 0.0, 3.0, seed=9, samples_per_site=50)
    data_means = [ds.site(i).train.x.mean() for i in range(200)]
    assert np.std(data_means) > 2.0


def test_alpha_is_a_standard_deviation_of_model_means() -> None:
    ds = SyntheticFederated(400, 2.0, 0.0, seed=4, samples_per_site=50)
    us = np.array([ds.site_parameters(i).u for i in range(400)])
    assert us.std() == pytest.approx(2.0, rel=0.15)
    W = ds.site_parameters(0).W
    assert W.mean() == pytest.approx(ds.site_parameters(0).u, abs=0.2)


def test_iid_variant_shares_one_model_and_zero_means() -> None:
    ds = SyntheticFederated(10, 1.0, 1.0, iid=True, seed=6)
    p0, p1 = ds.site_parameters(0), ds.site_parameters(1)
    np.testing.assert_array_equal(p0.W, p1.W)
    np.testing.assert_array_equal(p0.b, p1.b)
    assert not p0.v.any()
    x = np.concatenate([ds.site(i).train.x for i in range(10)])
    assert abs(x.mean()) < 0.05


@pytest.mark.parametrize("iid", [True, False])
def test_site_data_is_drawn_from_the_sites_stream_after_its_parameters(iid: bool) -> None:
    """The recipe of the class docstring, drawn here step by step from the site's own
    ``SeedSequence([seed, k])``: the IID variant draws (and drops) the per-site parameters
    too, so its examples are these bit for bit."""
    ds = SyntheticFederated(50, 0.5, 0.5, iid=iid, seed=4, samples_per_site=30)
    for k in (0, 7, 49):
        rng = np.random.default_rng(np.random.SeedSequence([4, k]))
        p = ds._parameters(rng)
        x = rng.standard_normal((30, 60), dtype=np.float32)
        x *= np.power(np.arange(1, 61, dtype=np.float64), -0.6).astype(np.float32)
        x += p.v.astype(np.float32)
        logits = x @ p.W.astype(np.float32) + p.b.astype(np.float32)
        site = ds.site(k)
        np.testing.assert_array_equal(np.concatenate([site.train.x, site.test.x]), x)
        np.testing.assert_array_equal(
            np.concatenate([site.train.y, site.test.y]), logits.argmax(axis=1)
        )


def test_synthetic_eval_set_pools_a_deterministic_sample_of_sites() -> None:
    ds = SyntheticFederated(500, seed=1, samples_per_site=60)
    idx = ds.eval_site_indices(25)
    assert len(idx) == 25 == len(set(idx.tolist()))
    np.testing.assert_array_equal(idx, SyntheticFederated(500, seed=1).eval_site_indices(25))
    test, pooled = ds.test_set(25)
    assert pooled == 25 and len(test) == 25 * 6
    small = SyntheticFederated(4, seed=1, samples_per_site=60)
    assert small.test_set(100)[1] == 4


def test_synthetic_is_lazy_for_ten_thousand_sites() -> None:
    ds = SyntheticFederated(10_000, 1.0, 1.0, seed=0)
    sizes = [ds.n_examples(i) for i in range(10_000)]
    assert len(sizes) == 10_000 and min(sizes) >= 45
    # nothing but the sizes is remembered
    assert ds._iid_model is None
    assert len(ds._n_total) == 10_000


def test_synthetic_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        SyntheticFederated(3, -1.0, 1.0)
    with pytest.raises(ValueError, match="samples_per_site"):
        SyntheticFederated(3, samples_per_site=1)
    with pytest.raises(ValueError, match="out of range"):
        SyntheticFederated(3).site(3)


# ------------------------------------------------------------------------------ dirichlet


def _tv_skew(counts: np.ndarray) -> float:
    """Mean total-variation distance between site label distributions and the global one."""
    glob = counts.sum(axis=0) / counts.sum()
    local = counts / counts.sum(axis=1, keepdims=True)
    return float(0.5 * np.abs(local - glob).sum(axis=1).mean())


def test_dirichlet_partition_covers_every_index_once() -> None:
    y = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(y, 20, 0.3, np.random.default_rng(0), min_per_site=5)
    flat = np.concatenate(parts)
    assert len(flat) == len(y)
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(y)))
    assert min(len(p) for p in parts) >= 5


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = np.repeat(np.arange(10), 200)
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        parts = dirichlet_partition(y, 10, alpha, np.random.default_rng(1), min_per_site=2)
        counts = np.array([np.bincount(y[p], minlength=10) for p in parts])
        skews.append(_tv_skew(counts))
    assert skews[0] < 0.1 < skews[1] < skews[2]


def test_dirichlet_partition_rejects_impossible_minimum() -> None:
    with pytest.raises(ValueError, match="at least"):
        dirichlet_partition(np.zeros(10, np.int64), 5, 0.5, np.random.default_rng(0))


def test_breast_cancer_split() -> None:
    ds = DirichletFederated("breast_cancer", 8, alpha=0.5, seed=2)
    assert (ds.n_features, ds.n_classes) == (30, 2)
    test, pooled = ds.test_set()
    assert pooled == 0
    assert len(test) + ds.n_train_total == 569
    assert len(test) == pytest.approx(0.2 * 569, abs=1)
    assert sum(ds.n_examples(i) for i in range(8)) == ds.n_train_total
    all_idx = np.concatenate([ds.site_indices(i) for i in range(8)])
    np.testing.assert_array_equal(np.sort(all_idx), np.arange(ds.n_train_total))
    # stratified test split keeps the class balance (212 malignant / 357 benign)
    assert np.mean(test.y) == pytest.approx(357 / 569, abs=0.02)
    # standardised with the training statistics
    x = np.concatenate([ds.site(i).train.x for i in range(8)]).astype(np.float64)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-3)
    site = ds.site(0)
    assert len(site.test) == 0 and len(site.train) == ds.n_examples(0) >= 5


def test_digits_split_is_deterministic_and_skewed() -> None:
    a = DirichletFederated("digits", 10, alpha=0.1, seed=4)
    b = DirichletFederated("digits", 10, alpha=0.1, seed=4)
    np.testing.assert_array_equal(a.site_indices(3), b.site_indices(3))
    np.testing.assert_array_equal(a.site(3).train.x, b.site(3).train.x)
    assert (a.n_features, a.n_classes) == (64, 10)
    near_iid = DirichletFederated("digits", 10, alpha=100.0, seed=4)
    assert _tv_skew(a.label_counts()) > 3 * _tv_skew(near_iid.label_counts())


def test_unknown_sklearn_dataset() -> None:
    with pytest.raises(ValueError, match="unknown data set"):
        DirichletFederated("iris", 3)


@pytest.mark.parametrize("name", ["breast_cancer", "digits"])
def test_the_data_and_split_are_scikit_learns_without_importing_it(name: str) -> None:
    """``load_sklearn`` reads scikit-learn's files and ``stratified_split`` splits as its
    ``train_test_split(stratify=y)`` does, so a daemon need not import scikit-learn (and
    scipy, pandas) to build its data: the arrays are scikit-learn's own, bit for bit."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    x, y = load_sklearn(name)
    load = datasets.load_breast_cancer if name == "breast_cancer" else datasets.load_digits
    ref_x, ref_y = load(return_X_y=True)
    assert x.dtype == np.float64 and y.dtype == np.int64
    assert x.tobytes() == np.asarray(ref_x, np.float64).tobytes()
    assert y.tobytes() == np.asarray(ref_y, np.int64).tobytes()
    for seed in (0, 1, 7, 123456789, 2**31 - 2):
        for fraction in (0.2, 0.1, 0.33, 0.9):
            ref = train_test_split(x, y, test_size=fraction, stratify=y, random_state=seed)
            train, test = stratified_split(y, fraction, seed)
            for ours, theirs in zip((x[train], x[test], y[train], y[test]), ref, strict=True):
                assert ours.dtype == theirs.dtype
                np.testing.assert_array_equal(ours, theirs)


def test_split_validates_shapes() -> None:
    with pytest.raises(ValueError):
        Split(np.zeros((3, 2), np.float32), np.zeros(4, np.int64))


@pytest.mark.parametrize("name", ["breast_cancer", "digits"])
def test_without_its_files_on_disk_scikit_learns_own_loader_reads_the_data(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where scikit-learn is installed without its data files where we look for them (a
    zipped or vendored install), ``load_sklearn`` falls back to scikit-learn's loaders."""
    from fedloom.workloads import datasets as datasets_mod

    read_from_files = load_sklearn(name)
    monkeypatch.setattr(datasets_mod, "_sklearn_data_file", lambda file_name: None)
    x, y = load_sklearn(name)
    assert x.tobytes() == read_from_files[0].tobytes()
    assert y.tobytes() == read_from_files[1].tobytes()
