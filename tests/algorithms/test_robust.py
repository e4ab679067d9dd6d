import numpy as np
import pytest

from fedloom.algorithms.robust import (
    AUTO_FACTOR,
    AUTO_MIN_SAMPLES,
    NormClip,
    clip_by_norm,
    coordinate_median,
    trimmed_mean,
)
from fedloom.algorithms.weights_math import l2_norm


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


def _delta(norm: float) -> dict[str, np.ndarray]:
    return {"w": np.array([norm, 0.0], dtype=np.float32)}


def test_auto_clip_starts_at_the_model_norm_then_follows_the_median() -> None:
    clip = NormClip("auto", {"w": np.array([3.0, 4.0], dtype=np.float32)})
    assert clip.bound() == 5.0  # the model's own norm until enough deltas were seen
    big, clipped = clip.apply(_delta(50.0), 50.0)
    assert clipped and l2_norm(big) == pytest.approx(5.0)
    for _ in range(AUTO_MIN_SAMPLES):
        clip.apply(_delta(1.0), 1.0)
    assert clip.bound() == pytest.approx(AUTO_FACTOR * 1.0)


def test_auto_clip_is_not_raised_by_a_minority_of_huge_deltas() -> None:
    clip = NormClip("auto", {"w": np.ones(2, dtype=np.float32)})
    for i in range(200):  # every other delta is an attacker's (half the window at most)
        norm = 3e38 if i % 2 else 0.5
        clip.apply(_delta(norm), norm)
    assert clip.bound() == pytest.approx(AUTO_FACTOR * 0.5)


def test_clip_settings() -> None:
    assert NormClip(None, {}).bound() is None and NormClip("off", {}).bound() is None
    assert NormClip(2.0, {}).bound() == 2.0
    with pytest.raises(ValueError):
        NormClip(-1.0, {})
    with pytest.raises(ValueError):
        NormClip("sometimes", {})
