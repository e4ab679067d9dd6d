"""Gossip on 64 peers: better-connected graphs agree sooner; a dead peer does not stall."""

from __future__ import annotations

from fedloom.sim.consensus import run_consensus

N = 64


def test_consensus_speed_follows_the_spectral_gap() -> None:
    runs = {g: run_consensus(g, N, until_s=40.0) for g in ("ring", "kregular", "exponential")}
    gaps = {g: r.spectral_gap for g, r in runs.items()}
    final = {g: r.errors[-1] for g, r in runs.items()}
    assert gaps["ring"] < gaps["kregular"] < gaps["exponential"]
    # Ordered the same way: the larger the gap, the smaller the disagreement left.
    assert final["exponential"] < final["kregular"] < final["ring"]
    assert runs["exponential"].time_to_tolerance is not None
    assert runs["ring"].time_to_tolerance is None  # a ring of 64 needs far longer


def test_a_peer_killed_mid_run_is_pruned_and_the_rest_converge() -> None:
    run = run_consensus("kregular", N, until_s=120.0, kill="p010", kill_at_s=5.0)
    assert run.pruned == 4  # each of its four neighbours prunes it once
    assert run.time_to_tolerance is not None and run.time_to_tolerance > 5.0
    assert run.errors[-1] < 1e-3
