"""A sync round's size is never clamped in silence (issue 15): clients_per_round above
the root's sites, or min_cohort above clients_per_round, is a ConfigError naming the
field and the limit, in the daemon's reader and builder as in the simulator's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedloom.algorithms.protocol import Deadline, PeerDown
from fedloom.algorithms.sync import SyncAggregator
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.factory import build_root
from fedloom.federation.params import DEFAULT_CLIENTS_PER_ROUND, AlgorithmConfig, read_algorithm
from tests.algorithms.alg_helpers import hello, metrics, model, recv, requests, upd

SITES = {f"s{i}": "site" for i in range(1, 5)}


def root(p: AlgorithmConfig, sites: dict[str, str] = SITES) -> Any:
    return build_root(
        "fedavg",
        "root",
        sites,
        model(0.0),
        p,
        buffer_size=1,
        concurrency=len(sites),
        train_config={},
        rng=np.random.default_rng(0),
    )


def test_min_cohort_above_clients_per_round_is_an_error_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"aggregation\.min_cohort: 5 .*clients_per_round 4"):
        read_algorithm(Table({"clients_per_round": 4, "min_cohort": 5}, "aggregation"))
    with pytest.raises(ConfigError, match=r"min_cohort: 11 .*\(its default\) 10.*at most 10"):
        read_algorithm(Table({"min_cohort": 11}, "aggregation"))
    p = read_algorithm(Table({"clients_per_round": 4, "min_cohort": 4}, "aggregation"))
    assert (p.clients_per_round, p.min_cohort) == (4, 4)


def test_clients_per_round_above_the_roots_sites_is_refused_by_the_builder() -> None:
    p = read_algorithm(Table({"clients_per_round": 80}, "aggregation"))
    with pytest.raises(ConfigError, match=r"clients_per_round: 80 .* 4 sites.*at most 4"):
        root(p)
    # min_cohort within the default K but above the sites a round can select
    with pytest.raises(ConfigError, match=r"min_cohort: 6 .* 4 sites a round selects"):
        root(AlgorithmConfig(min_cohort=6))


def test_an_unwritten_clients_per_round_is_every_site_of_a_small_root_or_ten() -> None:
    assert AlgorithmConfig().clients_per_round is None
    assert root(AlgorithmConfig()).clients_per_round == len(SITES)
    many = {f"s{i}": "site" for i in range(25)}
    assert root(AlgorithmConfig(), many).clients_per_round == DEFAULT_CLIENTS_PER_ROUND
    assert root(AlgorithmConfig(clients_per_round=4, min_cohort=4)).min_cohort == 4


def test_the_daemons_root_over_every_site_keeps_going_below_min_cohort() -> None:
    """The daemons build their sync root here too: every site selected, min_cohort =
    every site, one dies: rounds go on with the three live ones (``algorithms.sync``)."""
    p = AlgorithmConfig(clients_per_round=4, min_cohort=4, over_selection=1.0, round_timeout_s=30)
    agg = root(p)
    assert isinstance(agg, SyncAggregator)
    reqs = [r for s in SITES for r in requests(agg.handle(hello(s), 0.0))]
    agg.handle(PeerDown("s4"), 1.0)
    now = 2.0
    for seq in range(1, 5):
        out = []
        for peer, req in reqs:
            if peer != "s4":
                msg = upd(peer, seq, base=req.version, value=1.0, n=10, task=req.task)
                out += agg.handle(recv(peer, msg), now)
        reqs = requests(out)
        if not reqs:  # the round that lost s4 cannot fill: wait, then run with the live
            wake = agg.next_deadline()
            assert wake is not None
            out = agg.handle(Deadline(), wake)
            assert metrics(out, "round_unfillable")
            now, reqs = wake, requests(out)
        assert sorted(p for p, _ in reqs) == ["s1", "s2", "s3"]
    assert agg.version == 3
