"""The root's model signature covers the training settings sent with the model
(``transport.settings``, ``transport.e2e`` envelope v2; issue 14, item 2)."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.transport.e2e import (
    SignatureError,
    model_signed_bytes,
    sign_model,
    tensors_digest,
    verify_model,
)
from fedloom.transport.errors import MalformedMessage
from fedloom.transport.identity import Identity
from fedloom.transport.roster import Roster, RosterEntry
from fedloom.transport.settings import (
    NO_SETTINGS,
    settings_digest,
    settings_problem,
)
from fedloom.transport.wire import ModelBroadcast, TrainRequest, decode, encode

ROOT = Identity.generate("root", "root")
ROSTER = Roster(1, [RosterEntry("root", "root", ROOT.public_key)])
HASH = tensors_digest({"w": np.arange(6, dtype=np.float32)})
CONFIG = {"lr": 0.05, "local_steps": 5, "batch_size": 10, "mu": 0.0}

scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
configs = st.dictionaries(st.text(max_size=12), scalars, max_size=8)


def test_the_digest_is_sha256_of_the_labelled_sorted_items() -> None:
    packed = msgpack.packb(
        [
            "fedloom-settings-v1",
            [["batch_size", 10], ["local_steps", 5], ["lr", 0.05], ["mu", 0.0]],
        ],
        use_bin_type=True,
    )
    assert settings_digest(CONFIG) == hashlib.sha256(packed).digest()
    assert NO_SETTINGS == settings_digest({}) != settings_digest(CONFIG)


@settings(max_examples=200, deadline=None)
@given(configs)
def test_the_digest_survives_the_wire_and_ignores_key_order(config: dict[str, Any]) -> None:
    digest = settings_digest(config)
    assert settings_digest(dict(reversed(list(config.items())))) == digest
    got = decode(encode(TrainRequest(1, 2, {}, config, settings=digest)))
    assert isinstance(got, TrainRequest)
    assert got.settings == digest and settings_digest(got.config) == digest
    assert settings_problem(got.config, digest) is None


@settings(max_examples=200, deadline=None)
@given(configs, st.text(max_size=12), scalars)
def test_any_change_changes_the_digest(config: dict[str, Any], key: str, value: Any) -> None:
    changed = {**config, key: value}
    same = key in config and type(config[key]) is type(value) and config[key] == value
    if isinstance(value, float) and key in config and isinstance(config[key], float):
        same = same and math.copysign(1, value) == math.copysign(1, config[key])
    assert (settings_digest(changed) == settings_digest(config)) == same
    if not same:
        assert settings_problem(changed, settings_digest(config)) is not None


def test_types_are_kept_apart_and_numpy_scalars_hash_as_their_value() -> None:
    digests = {settings_digest({"k": v}) for v in (1, 1.0, True, "1")}
    assert len(digests) == 4
    assert settings_digest({"lr": np.float64(0.05), "n": np.int64(5)}) == settings_digest(
        {"lr": 0.05, "n": 5}
    )


@pytest.mark.parametrize(
    "config", [{1: 2}, {"lr": [0.1]}, {"lr": math.nan}, {"lr": math.inf}, {"n": 2**64}]
)
def test_what_cannot_travel_cannot_be_hashed(config: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        settings_digest(config)
    assert "cannot be hashed" in (settings_problem(config, NO_SETTINGS) or "")


def test_the_signature_covers_the_settings() -> None:
    signed = settings_digest(CONFIG)
    sig = sign_model(ROOT, 5, 4, HASH, signed)
    verify_model(ROSTER, "root", sig, 5, 4, HASH, signed)
    other = settings_digest({**CONFIG, "lr": 0.5})
    with pytest.raises(SignatureError, match="does not match"):
        verify_model(ROSTER, "root", sig, 5, 4, HASH, other)
    with pytest.raises(SignatureError, match="does not match"):
        verify_model(ROSTER, "root", sig, 5, 4, HASH)  # the empty config's
    with pytest.raises(SignatureError, match="settings"):
        verify_model(ROSTER, "root", sig, 5, 4, HASH, b"short")


def test_an_old_format_signature_never_verifies() -> None:
    """A v1 signature (``{version, parent, hash}``, label ``fedloom-model-v1``) is not a
    signature of any v2 envelope, with the settings of the empty config or any other."""
    v1 = msgpack.packb(["fedloom-model-v1", 5, 4, HASH], use_bin_type=True)
    old_sig = ROOT.sign(v1)
    for signed in (NO_SETTINGS, settings_digest(CONFIG)):
        with pytest.raises(SignatureError):
            verify_model(ROSTER, "root", old_sig, 5, 4, HASH, signed)
    assert model_signed_bytes(5, 4, HASH)[:20] != v1[:20]
    assert b"fedloom-model-v2" in model_signed_bytes(5, 4, HASH)


def test_model_messages_carry_config_and_settings_on_the_wire() -> None:
    signed = settings_digest(CONFIG)
    w = {"w": np.arange(3, dtype=np.float32)}
    for msg in (
        ModelBroadcast(3, w, "root", 2, b"s" * 64, config=CONFIG, settings=signed),
        TrainRequest(1, 3, w, CONFIG, "root", 2, b"s" * 64, settings=signed),
    ):
        got = decode(encode(msg))
        assert type(got) is type(msg)
        assert dict(got.config) == CONFIG and got.settings == signed


@pytest.mark.parametrize("drop", ["config", "settings"])
def test_the_envelope_must_hold_the_new_fields(drop: str) -> None:
    env = msgpack.unpackb(encode(ModelBroadcast(3, {}, config=CONFIG)), raw=False)
    del env[drop]
    with pytest.raises(MalformedMessage, match="missing"):
        decode(msgpack.packb(env, use_bin_type=True))
