"""Seeds both drivers derive: the same job trains identically in the simulator and a daemon."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.federation.seeds import (
    DerivedSeeds,
    EntityRngs,
    derived_seed,
    entity_rng,
    entity_seed,
    seed_sequence,
    stable_key,
)


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


KEYS = st.one_of(st.integers(0, 2**64 - 1), st.integers(-(2**70), -1), st.text(max_size=12))


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(-(2**70), 2**70), prefix=st.lists(KEYS, max_size=3), key=KEYS)
def test_derived_seeds_under_a_prefix_are_derived_seed(
    seed: int, prefix: list[int | str], key: int | str
) -> None:
    assert DerivedSeeds(seed, *prefix).seed(key) == derived_seed(seed, *prefix, key)


def test_derived_seeds_refuse_what_derived_seed_refuses() -> None:
    for bad in (True, 1.5, None, b"x"):
        with pytest.raises(TypeError):
            DerivedSeeds(1, bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            DerivedSeeds(1, "train").seed(bad)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(-(2**70), 2**70), keys=st.lists(KEYS, max_size=4))
def test_entity_streams_are_those_of_the_seed_sequence_of_the_stable_keys(
    seed: int, keys: list[int | str]
) -> None:
    """entity_seed hands SeedSequence the keys' 32-bit words itself: the same pool and
    streams as ``SeedSequence([stable_key(seed), *stable_keys])`` (every run's compute,
    dropout and loss draws depend on it); ``EntityRngs`` under a prefix gives the same."""
    reference = np.random.SeedSequence([stable_key(seed), *(stable_key(k) for k in keys)])
    ours = entity_seed(seed, *keys)
    assert ours.generate_state(8).tolist() == reference.generate_state(8).tolist()
    draws = np.random.default_rng(reference).random(4).tolist()
    assert entity_rng(seed, *keys).random(4).tolist() == draws
    if keys:
        assert EntityRngs(seed, keys[0]).rng(*keys[1:]).random(4).tolist() == draws


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.integers(0, 2**80), min_size=1, max_size=3))
def test_seed_sequence_is_numpys_for_non_negative_ints(keys: list[int]) -> None:
    reference = np.random.SeedSequence(keys)
    assert seed_sequence(*keys).generate_state(8).tolist() == reference.generate_state(8).tolist()


def test_seed_sequence_refuses_negative_keys_as_numpy_does() -> None:
    with pytest.raises(ValueError):
        np.random.SeedSequence([-1])
    with pytest.raises(ValueError):
        seed_sequence(3, -1)
