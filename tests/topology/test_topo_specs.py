import math

import numpy as np
import pytest

from fedloom.topology.specs import Link, Site
from fedloom.topology.wan import (
    CITY_COORDS,
    WanModel,
    mean_rtt_within,
    region_rtt_from_coords,
    rtt_matrix,
)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"id": ""}, "Site.id"),
        ({"region": ""}, "Site.region"),
        ({"n_examples": -1}, "Site.n_examples"),
        ({"n_examples": 1.5}, "Site.n_examples"),
        ({"compute_speed": 0.0}, "Site.compute_speed"),
        ({"uplink_bps": -1.0}, "Site.uplink_bps"),
        ({"downlink_bps": math.inf}, "Site.downlink_bps"),
        ({"uplink_bps": True}, "Site.uplink_bps"),
        ({"access_latency_s": -0.1}, "Site.access_latency_s"),
        ({"access_latency_s": math.nan}, "Site.access_latency_s"),
        ({"inbound": 1}, "Site.inbound"),
    ],
)
def test_site_validation_names_the_field(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"id": "a", "region": "eu"} | kwargs
    with pytest.raises(ValueError, match=field):
        Site(**args)  # type: ignore[arg-type]


def test_site_normalises_numbers_and_round_trips() -> None:
    s = Site("a", "eu", n_examples=3, uplink_bps=10, downlink_bps=20)
    assert isinstance(s.uplink_bps, float) and s.uplink_bps == 10.0
    assert Site.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown field"):
        Site.from_dict({"id": "a", "region": "eu", "colour": "red"})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"latency_s": -1.0}, "Link.latency_s"),
        ({"bandwidth_bps": 0.0}, "Link.bandwidth_bps"),
        ({"loss": 1.0}, "Link.loss"),
        ({"loss": -0.1}, "Link.loss"),
    ],
)
def test_link_validation(kwargs: dict[str, float], field: str) -> None:
    args = {"latency_s": 0.01, "bandwidth_bps": 1e6} | kwargs
    with pytest.raises(ValueError, match=field):
        Link(**args)


def test_link_allows_loopback_bandwidth() -> None:
    assert Link(0.0, math.inf).bandwidth_bps == math.inf


def test_wan_rtt_is_symmetric_and_uses_defaults() -> None:
    wan = WanModel({("eu", "us"): 0.09, ("eu", "eu"): 0.004}, default_inter_rtt_s=0.2)
    a = Site("a", "eu", access_latency_s=0.001)
    b = Site("b", "us", access_latency_s=0.002)
    c = Site("c", "eu", access_latency_s=0.003)
    d = Site("d", "asia", access_latency_s=0.0)
    assert wan.rtt(a, b) == pytest.approx(0.093)
    assert wan.rtt(b, a) == wan.rtt(a, b)
    assert wan.rtt(a, c) == pytest.approx(0.008)  # (eu, eu) override of the intra default
    assert wan.rtt(b, Site("e", "us")) == pytest.approx(0.002 + 0.005 + 0.01)
    assert wan.rtt(a, d) == pytest.approx(0.201)
    assert wan.rtt(a, a) == 0.0


def test_wan_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="two different RTTs"):
        WanModel({("a", "b"): 0.1, ("b", "a"): 0.2})
    with pytest.raises(ValueError, match="default_inter_rtt_s"):
        WanModel(default_inter_rtt_s=-1.0)
    with pytest.raises(ValueError, match="loss"):
        WanModel(loss=1.0)
    wan = WanModel({("b", "a"): 0.05, ("c", "a"): 0.07}, loss=0.01)
    assert wan.region_rtt == {("a", "b"): 0.05, ("a", "c"): 0.07}
    assert WanModel.from_dict(wan.to_dict()) == wan


def test_rtt_matrix_matches_pairwise_and_mean_within() -> None:
    rng = np.random.default_rng(1)
    wan = WanModel({("x", "y"): 0.03})
    sites = [
        Site(f"s{i}", "xyz"[i % 3], access_latency_s=float(rng.uniform(0, 0.02))) for i in range(12)
    ]
    m = rtt_matrix(sites, wan)
    for i, a in enumerate(sites):
        for j, b in enumerate(sites):
            assert m[i, j] == pytest.approx(wan.rtt(a, b))
    expected = m.sum(axis=1) / (len(sites) - 1)
    assert np.allclose(mean_rtt_within(sites, wan), expected)


def test_region_rtt_from_coords_is_plausible() -> None:
    rtts = region_rtt_from_coords(CITY_COORDS)
    assert rtts[("london", "paris")] < 0.02
    assert 0.1 < rtts[("london", "sydney")] < 0.4
    wan = WanModel(rtts)
    assert wan.region_rtt_s("paris", "london") == rtts[("london", "paris")]
