import numpy as np
import pytest

from algorithms.robust import clip_by_norm, coordinate_median, trimmed_mean


def d(*vals: float) -> dict[str, np.ndarray]:
    return {"p": np.array(vals, dtype=np.float32)}


def test_clip_scales_to_the_norm_only_when_above() -> None:
    out, clipped = clip_by_norm(d(3.0, 4.0), 1.0)
    assert clipped
    np.testing.assert_allclose(out["p"], [0.6, 0.8], rtol=1e-6)
    same, clipped = clip_by_norm(d(0.3, 0.4), 1.0)
    assert not clipped
    np.testing.assert_array_equal(same["p"], d(0.3, 0.4)["p"])
    with pytest.raises(ValueError):
        clip_by_norm(d(1.0), 0.0)


def test_median_ignores_an_outlier() -> None:
    out = coordinate_median([d(1.0, 0.0), d(2.0, 0.0), d(1000.0, -50.0)])
    np.testing.assert_allclose(out["p"], [2.0, 0.0])
    even = coordinate_median([d(1.0), d(3.0)])
    np.testing.assert_allclose(even["p"], [2.0])


def test_trimmed_mean_drops_both_tails() -> None:
    deltas = [d(v) for v in (-100.0, 1.0, 2.0, 3.0, 100.0)]
    np.testing.assert_allclose(trimmed_mean(deltas, 0.2)["p"], [2.0])
    np.testing.assert_allclose(trimmed_mean(deltas, 0.0)["p"], [1.2])
    # beta too large for n keeps the middle values instead of trimming everything
    np.testing.assert_allclose(trimmed_mean([d(1.0), d(5.0)], 0.49)["p"], [3.0])
    with pytest.raises(ValueError):
        trimmed_mean(deltas, 0.5)
    with pytest.raises(ValueError):
        coordinate_median([])
