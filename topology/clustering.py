"""Group sites into clusters from a dense RTT matrix with k-medoids.

- Seeding: PAM's greedy BUILD (Kaufman & Rousseeuw 1990): add, one at a time, the medoid that
  lowers the total RTT-to-nearest-medoid the most. Deterministic, and unlike random seeding it
  does not put two medoids in one tight group while leaving another group without one.
- Refinement: alternating k-medoids (Park & Jun 2009): assign to the nearest medoid, move each
  medoid to the member with the smallest summed RTT, repeat. A few k-medoids++ restarts run
  too; the lowest total cost wins.
- Choosing k (when not given): the k in 2..``max_k`` with the best mean silhouette
  (Rousseeuw 1987), estimated on a seeded sample of rows so it stays O(sample · n · k).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatMatrix = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

DEFAULT_MAX_K = 40
_SILHOUETTE_SAMPLE = 600


def kmedoids(
    rtt: FloatMatrix, k: int, *, seed: int = 0, n_restarts: int = 3, max_iter: int = 100
) -> list[list[int]]:
    """Partition indices 0..n-1 into exactly ``k`` non-empty clusters minimising Σ RTT to medoid."""
    n = rtt.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmedoids: need 1 <= n_clusters <= {n} sites, got {k}")
    rng = np.random.default_rng(seed)
    labels, cost = _refine(rtt, _build(rtt, k), max_iter)
    for _ in range(n_restarts):
        other, other_cost = _refine(rtt, _kmedoids_pp(rtt, k, rng), max_iter)
        if other_cost < cost - 1e-12:
            labels, cost = other, other_cost
    return _groups(labels, k)


def auto_kmedoids(
    rtt: FloatMatrix, *, seed: int = 0, max_k: int = DEFAULT_MAX_K, max_iter: int = 100
) -> list[list[int]]:
    """k-medoids with k chosen by the best mean silhouette over 2..max_k (1 for n < 4)."""
    n = rtt.shape[0]
    if n < 4:
        return [list(range(n))]
    top = min(n - 1, max_k)
    greedy = _build(rtt, top)  # BUILD is greedy, so its prefixes seed every smaller k
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, _SILHOUETTE_SAMPLE), replace=False))
    best_k, best_score = 1, -np.inf
    best_labels = np.zeros(n, dtype=np.intp)
    for k in range(2, top + 1):
        labels, _ = _refine(rtt, greedy[:k].copy(), max_iter)
        score = _mean_silhouette(rtt, labels, k, sample)
        if score > best_score + 1e-12:
            best_k, best_score, best_labels = k, score, labels
    return _groups(best_labels, best_k)


def _build(rtt: FloatMatrix, k: int) -> IntArray:
    medoids = [int(np.argmin(rtt.sum(axis=1)))]
    nearest = rtt[:, medoids[0]].copy()
    for _ in range(1, k):
        gain = np.maximum(nearest[:, None] - rtt, 0.0).sum(axis=0)
        gain[medoids] = -1.0
        pick = int(np.argmax(gain))
        medoids.append(pick)
        np.minimum(nearest, rtt[:, pick], out=nearest)
    return np.array(medoids, dtype=np.intp)


def _kmedoids_pp(rtt: FloatMatrix, k: int, rng: np.random.Generator) -> IntArray:
    n = rtt.shape[0]
    chosen = [int(rng.integers(n))]
    nearest = rtt[:, chosen[0]].copy()
    for _ in range(1, k):
        weights = nearest**2
        weights[chosen] = 0.0
        total = float(weights.sum())
        if total > 0.0:
            pick = int(rng.choice(n, p=weights / total))
        else:  # every remaining site sits on a medoid: pick any unchosen one
            pick = int(rng.choice(np.setdiff1d(np.arange(n), chosen)))
        chosen.append(pick)
        np.minimum(nearest, rtt[:, pick], out=nearest)
    return np.array(chosen, dtype=np.intp)


def _assign(rtt: FloatMatrix, medoids: IntArray) -> IntArray:
    labels: IntArray = np.argmin(rtt[:, medoids], axis=1).astype(np.intp)
    # A medoid always belongs to its own cluster (ties at distance 0 could steal it otherwise),
    # which keeps every cluster non-empty.
    labels[medoids] = np.arange(len(medoids))
    return labels


def _refine(rtt: FloatMatrix, medoids: IntArray, max_iter: int) -> tuple[IntArray, float]:
    labels = _assign(rtt, medoids)
    for _ in range(max_iter):
        new = medoids.copy()
        for c in range(len(medoids)):
            members = np.flatnonzero(labels == c)
            within = rtt[np.ix_(members, members)].sum(axis=1)
            new[c] = members[int(np.argmin(within))]
        if np.array_equal(new, medoids):
            break
        medoids = new
        labels = _assign(rtt, medoids)
    cost = float(rtt[np.arange(rtt.shape[0]), medoids[labels]].sum())
    return labels, cost


def _mean_silhouette(rtt: FloatMatrix, labels: IntArray, k: int, rows: IntArray) -> float:
    n = rtt.shape[0]
    onehot = np.zeros((n, k), dtype=np.float64)
    onehot[np.arange(n), labels] = 1.0
    sizes = onehot.sum(axis=0)
    sums = rtt[rows] @ onehot  # summed RTT from each sampled row to every cluster
    own = labels[rows]
    own_size = sizes[own]
    a = sums[np.arange(len(rows)), own] / np.maximum(own_size - 1.0, 1.0)
    means = sums / sizes
    means[np.arange(len(rows)), own] = np.inf
    b = means.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(own_size > 1, (b - a) / np.maximum(a, b), 0.0)  # singletons score 0
    return float(np.nan_to_num(s).mean())


def _groups(labels: IntArray, k: int) -> list[list[int]]:
    groups: list[list[int]] = [[] for _ in range(k)]
    for i, c in enumerate(labels.tolist()):
        groups[c].append(i)
    # Order clusters by their first member so results do not depend on medoid order.
    return sorted((g for g in groups if g), key=lambda g: g[0])
