"""Seeds both drivers derive: the same job trains identically in the simulator and a daemon."""

from __future__ import annotations

import pytest

from fedloom.federation.seeds import derived_seed, stable_key


def test_stable_keys_and_derived_seeds() -> None:
    assert stable_key("abc") == stable_key("abc") != stable_key("abd")
    assert stable_key(5) == 5
    with pytest.raises(TypeError):
        stable_key(True)
    s = derived_seed(1, "train", "site-1", 3)
    assert s == derived_seed(1, "train", "site-1", 3)
    assert 0 <= s < 2**31
    assert s != derived_seed(1, "train", "site-1", 4)
    assert s != derived_seed(2, "train", "site-1", 3)
    # Pinned: every run's training seeds (hence its results) depend on these exact values.
    assert s == 1155322572
    assert derived_seed(5, "train", "r00-s0001", 12) == 1275226853
