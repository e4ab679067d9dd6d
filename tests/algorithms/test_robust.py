import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.robust import (
    AUTO_FACTOR,
    AUTO_MIN_SAMPLES,
    AUTO_WINDOW,
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


_START = 7.0  # the model's norm: the starting bound


def _reference_bound(latest: dict[str | int, float], src: str | None) -> float:
    """The auto bound by its definition: AUTO_FACTOR x the lower median of the others."""
    others = [n for s, n in latest.items() if s != src]
    if len(others) < AUTO_MIN_SAMPLES:
        return _START
    median = statistics.median_low(others)
    return AUTO_FACTOR * median if median > 0.0 else _START


_SENDERS = st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h", None])
_NORMS = st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.5, 9.0]) | st.floats(0.0, 50.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_SENDERS, _NORMS), max_size=80), _SENDERS)
def test_auto_bound_is_the_lower_median_of_the_other_senders(
    steps: list[tuple[str | None, float]], asker: str | None
) -> None:
    """Whatever the order of senders, repeats, ties and evictions from the window, the bound
    met by each update (and by a restored copy) is the definition's, exactly."""
    clip = NormClip("auto", {"w": np.array([_START, 0.0], dtype=np.float32)})
    latest: dict[str | int, float] = {}
    anon = 0
    for src, norm in steps:
        c = clip.bound(src)
        assert c == _reference_bound(latest, src)
        clip.apply(_delta(norm), norm, src)
        key: str | int
        if src is None:
            anon += 1
            key = anon
        else:
            key = src
        latest.pop(key, None)
        latest[key] = norm if c is None else min(norm, c)
        if len(latest) > AUTO_WINDOW:
            del latest[next(iter(latest))]
    restored = NormClip("auto", {"w": np.ones(2, dtype=np.float32)})
    restored.restore(clip.snapshot())
    for probe in (clip, restored):
        assert probe.bound(asker) == _reference_bound(latest, asker)
