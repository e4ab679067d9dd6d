"""One secure FedBuff federation (``[secure_aggregation]``) on every driver the harness
has (simulator, asyncio over in-memory links, asyncio over loopback WebSockets with the
secure channel and end-to-end signing): training converges, the root applies cohorts,
and no site ever sends it a plain update."""

from __future__ import annotations

from typing import Any

import pytest

from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.sync import SyncAggregator
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.federation.secagg_keys import derived_secagg_keys
from fedloom.federation.secagg_params import SecureAggregationConfig
from fedloom.transport.wire import MaskedUpdate, SecAggJoin, Update
from tests.conformance import workload
from tests.conformance.harness import (
    Federation,
    Unsupported,
    metrics,
    received,
    version_of,
)

SITES = [f"site-{i:02d}" for i in range(5)]
TRAINING = TrainingConfig(lr=0.1, local_steps=1, batch_size=1, mu=0.0)
# Cohorts of 5 with t = 3; a least-squares job moves the weights by ~1-2, so clip 4.
SECAGG = SecureAggregationConfig(
    enabled=True,
    min_cohort=3,
    max_dropout=0.4,
    max_colluders=0,  # t = 3 of 5 (a bare majority; the collusion bound has its own tests)
    clip=4.0,
    precision_bits=16,
    form_wait_s=5.0,
    upload_timeout_s=30.0,
    unmask_timeout_s=30.0,
)


def secure_star() -> dict[str, Any]:
    keys = derived_secagg_keys(["root", *SITES], seed=3)
    p = AlgorithmConfig(buffer_size=5, concurrency=5, task_timeout_s=60.0, clip_norm=None)
    nodes: dict[str, Any] = {
        "root": build_node(
            "root",
            "root",
            "fedbuff",
            p,
            TRAINING,
            Neighbours(children=dict.fromkeys(SITES, "site")),
            seed=0,
            weights=workload.start(),
            secagg=SECAGG,
            secagg_keys=keys["root"],
        )
    }
    for s in SITES:
        nodes[s] = build_node(
            "site",
            s,
            "fedbuff",
            p,
            TRAINING,
            Neighbours(parent="root", parent_role="root"),
            seed=0,
            n_examples=workload.N,
            secagg=SECAGG,
            secagg_keys=keys[s],
        )
    return nodes


def converge_on_cohorts(federation: Federation, nodes: dict[str, Any]) -> int:
    """Start the secure star ``nodes`` on ``federation`` with the least-squares workload and
    run it until the root's model is 10 times closer to the optimum than the start, within
    40 versions (one cohort per version; plain federations get there in fewer). Checks that
    every version came from a cohort and the root received joins and masked uploads (signed
    where the driver signs), never a plain update, and that nothing was counted twice.
    Returns the number of versions."""
    try:
        federation.start(
            nodes,
            {"root": "root", **dict.fromkeys(SITES, "site")},
            [("root", s) for s in SITES],
            trainer=workload.LeastSquaresTrainer(),
        )
    except Unsupported as exc:
        pytest.skip(f"{federation.name}: {exc}")
    initial = workload.distance(workload.start())
    assert federation.run_until(
        lambda: workload.distance(federation.node("root").current_model()[1]) < initial / 10,
        timeout_s=600,
    )
    versions = version_of(federation, "root")
    assert 1 <= versions <= 40
    applied = [m for m in metrics(federation, "secagg_cohort_applied") if m.node == "root"]
    assert len(applied) >= versions
    assert received(federation, "root", Update) == []
    assert received(federation, "root", SecAggJoin)
    masked = received(federation, "root", MaskedUpdate)
    assert masked
    if federation.signs:  # each upload arrived signed by its site, and was checked
        assert all(len(m.sig) == 64 for _, _, m in masked)
    assert federation.journal.checker.updates_duplicated == 0
    return versions


def test_secure_fedbuff_converges_on_cohort_sums_only(federation: Federation) -> None:
    nodes = secure_star()
    root = nodes["root"]
    assert isinstance(root, FedBuffAggregator) and root.secure_aggregation is not None
    converge_on_cohorts(federation, nodes)
    for s in SITES:  # no site ever sent a plain update
        assert not [
            e
            for _, n, e in federation.journal.effects
            if n == s and type(getattr(e, "msg", None)) is Update
        ]


def secure_sync_star(algorithm: str) -> dict[str, Any]:
    """A fedavg/fedprox root whose rounds are cohorts of all 5 sites (t = 3)."""
    keys = derived_secagg_keys(["root", *SITES], seed=5)
    p = AlgorithmConfig(
        clients_per_round=5,
        over_selection=1.0,
        round_timeout_s=60.0,
        clip_norm=None,
        max_examples_per_site=workload.N,  # members weigh n / N: full precision
    )
    training = TrainingConfig(
        lr=0.1, local_steps=1, batch_size=1, mu=0.01 if algorithm == "fedprox" else 0.0
    )
    nodes: dict[str, Any] = {
        "root": build_node(
            "root",
            "root",
            algorithm,
            p,
            training,
            Neighbours(children=dict.fromkeys(SITES, "site")),
            seed=0,
            weights=workload.start(),
            secagg=SECAGG,
            secagg_keys=keys["root"],
        )
    }
    for s in SITES:
        nodes[s] = build_node(
            "site",
            s,
            algorithm,
            p,
            training,
            Neighbours(parent="root", parent_role="root"),
            seed=0,
            n_examples=workload.N,
            secagg=SECAGG,
            secagg_keys=keys[s],
        )
    return nodes


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_secure_sync_rounds_converge_on_cohort_sums_only(
    federation: Federation, algorithm: str
) -> None:
    nodes = secure_sync_star(algorithm)
    root = nodes["root"]
    assert isinstance(root, SyncAggregator) and root.secure_aggregation is not None
    converge_on_cohorts(federation, nodes)
    closed = [m for m in metrics(federation, "round_closed") if m.node == "root"]
    assert closed and all(m.labels == {"reason": "cohort"} for m in closed)
