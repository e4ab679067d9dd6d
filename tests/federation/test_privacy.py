"""federation.privacy: the [privacy] table, the plans central DP runs on, the DpRelease a
root is given, and where the noise secret comes from."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.dp.release import PrivacyConfig
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.site import SiteNode
from fedloom.algorithms.sync import SyncAggregator
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.federation.privacy import NO_PRIVACY, central_params, read_privacy
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.federation.secagg_params import SecureAggregationConfig
from tests.algorithms.alg_helpers import model

TRAINING = TrainingConfig(lr=0.1, local_steps=1, batch_size=4, mu=0.0)


def test_absent_or_none_is_no_privacy() -> None:
    assert read_privacy(Table({}, "privacy")) == NO_PRIVACY
    assert not read_privacy(Table({"mechanism": "none"}, "privacy")).enabled


def test_a_full_table() -> None:
    cfg = read_privacy(
        Table(
            {
                "mechanism": "central",
                "noise_multiplier": 0.9,
                "clip": 2,
                "delta": 1e-6,
                "epsilon_budget": 4,
                "accountant": "pld",
            },
            "arms[0].privacy",
        )
    )
    assert cfg == PrivacyConfig("central", 0.9, 2.0, 1e-6, 4.0, "pld")


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"mechanism": "central", "noise_multiplier": 1, "clip": -1}, "clip"),
        ({"mechanism": "central", "noise_multiplier": 1, "clip": 1, "epsilon_budget": 0}, "budget"),
        ({"mechanism": "central", "noise_multiplier": "1", "clip": 1}, "number"),
        ({"mechanism": "central", "noise_multiplier": 1, "clip": 1, "nois": 1}, "unknown"),
        # σ = z·C beyond float32: every release overflowed and was dropped, silently stuck
        ({"mechanism": "central", "noise_multiplier": 100, "clip": 1e29}, "clip: .*float32"),
    ],
)
def test_mistakes_name_their_field(table: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        read_privacy(Table(table, "privacy"))
    assert "privacy." in str(info.value)


def test_the_privacy_clip_replaces_an_auto_clip_norm() -> None:
    p = central_params(
        PrivacyConfig("central", 1.0, 0.25), "fedbuff", AlgorithmConfig(), {"s": "site"}
    )
    assert p.clip_norm == 0.25
    same = AlgorithmConfig(clip_norm=0.25)
    assert central_params(PrivacyConfig("central", 1.0, 0.25), "fedbuff", same, {}) == same
    assert central_params(None, "fedbuff", AlgorithmConfig(), {}) == AlgorithmConfig()


def build(role: str, algorithm: str = "fedbuff", **kw: Any) -> Any:
    children = {f"s{i}": "site" for i in range(8)}
    return build_node(
        role,
        "root" if role == "root" else "s0",
        algorithm,
        AlgorithmConfig(buffer_size=3, clients_per_round=2, over_selection=1.0),
        TRAINING,
        Neighbours(children=children) if role == "root" else Neighbours(parent="root"),
        seed=0,
        weights=model(0.0),
        **kw,
    )


def test_roots_get_their_denominator_and_sampling_rate() -> None:
    privacy = PrivacyConfig("central", 1.0, 1.0)
    buff = build("root", privacy=privacy)
    assert isinstance(buff, FedBuffAggregator) and buff._dp is not None
    assert buff._dp.denominator == 3 and buff._dp.sampling_rate is None
    sync = build("root", "fedavg", privacy=privacy)
    assert isinstance(sync, SyncAggregator) and sync._dp is not None
    assert sync._dp.denominator == 2 and sync._dp.sampling_rate == pytest.approx(2 / 8)
    assert build("root")._dp is None


def test_noise_key_is_the_seeds_unless_a_secret_is_given() -> None:
    privacy = PrivacyConfig("central", 1.0, 1.0)
    a, b = build("root", privacy=privacy), build("root", privacy=privacy)
    assert a.snapshot()["privacy"]["noise_key"] == b.snapshot()["privacy"]["noise_key"]
    c = build("root", privacy=privacy, noise_key=12345)
    assert c.snapshot()["privacy"]["noise_key"] == (12345).to_bytes(32, "big")


def secure_site_rng(noise_key: int | None) -> np.random.Generator:
    keys = derived_secagg_keys(["root", "s0"], 0)
    site = build(
        "site",
        secagg=SecureAggregationConfig(enabled=True, min_cohort=2),
        secagg_keys=keys["s0"],
        noise_key=noise_key,
    )
    assert isinstance(site, SiteNode) and site.secure is not None
    rng = site.secure._rng
    assert isinstance(rng, np.random.Generator)
    return rng


def test_a_secure_sites_noise_comes_from_its_secret_when_given() -> None:
    # The simulator: the node's own stream, the same for the same seed (reproducible).
    assert secure_site_rng(None).random() == secure_site_rng(None).random()
    # A daemon: a secret noise_key; the config's seed no longer predicts the noise.
    assert secure_site_rng(1).random() != secure_site_rng(None).random()
    assert secure_site_rng(1).random() != secure_site_rng(2).random()
