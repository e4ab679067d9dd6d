"""Regional failover with real ``fedloom run`` processes: a root, a region and its standby,
two sites. The region dies with forwards the (paused) root never acknowledged; the sites
move to the standby and training resumes; the dead region comes back with its old
forwards, which the root refuses as already taken. Every acknowledged site update is
applied at the root exactly once (``algorithms.incorporation``)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from fedloom.runtime.federation_files import (
    ROOT_ID,
    Federation,
    NodeFiles,
    free_port,
    site_examples,
    write_federation,
    write_roster,
)
from fedloom.runtime.harness import Cluster
from fedloom.transport.identity import Identity
from tests.runtime.test_e2e import SYNTHETIC, applied, check_clean_exit, metric, offline, wait_for

pytestmark = pytest.mark.timeout(90)

SITES = ("site-1", "site-2")
REGION, STANDBY = "region-a", "region-a2"


def add_standby(fed: Federation) -> None:
    """A second region identity with the same children; the root takes both and declares
    their subtree; the sites list the standby as their fallback parent."""
    keys = fed.workdir / "keys"
    standby = Identity.generate(STANDBY, "region")
    standby.save(keys, overwrite=True)
    others = [Identity.load(keys / f"{n}.key") for n in fed.nodes]
    consortium = Identity.load(keys / "consortium.key")
    examples = site_examples(fed.plan, list(SITES))
    write_roster(fed.roster, [*others, standby], consortium, examples=examples)

    cfg = fed.config(REGION)
    cfg["failover"] = {"has_standby": True}  # both keep their forwards' parts to rebuild
    fed.nodes[REGION].config.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    port, metrics_port = free_port(), free_port()
    cfg.update(
        node_id=STANDBY,
        identity={"key": str(keys / f"{STANDBY}.key")},
        state_dir=str(fed.workdir / "state" / STANDBY),
        listen={"host": "127.0.0.1", "port": port},
        metrics={"host": "127.0.0.1", "port": metrics_port},
    )
    path = fed.workdir / f"{STANDBY}.toml"
    path.write_text(tomli_w.dumps(cfg), encoding="utf-8")
    fed.nodes[STANDBY] = NodeFiles(
        STANDBY,
        "region",
        path,
        Path(cfg["state_dir"]),
        fed.workdir / "logs" / f"{STANDBY}.log",
        port,
        metrics_port,
    )

    root = fed.config(ROOT_ID)
    root["children"] = [REGION, STANDBY]
    root["subtrees"] = {REGION: list(SITES), STANDBY: list(SITES)}
    fed.nodes[ROOT_ID].config.write_text(tomli_w.dumps(root), encoding="utf-8")
    for site in SITES:
        cfg = fed.config(site)
        cfg["parent"]["failover_after_s"] = 1.0
        cfg["parent"]["fallback"] = [{"id": STANDBY, "url": f"ws://127.0.0.1:{port}/fedloom"}]
        fed.nodes[site].config.write_text(tomli_w.dumps(cfg), encoding="utf-8")


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[Federation, Cluster]]:
    fed = write_federation(
        tmp_path / "fed",
        {REGION: list(SITES)},
        plan=SYNTHETIC,
        root_aggregation={"buffer_size": 1},
        region_aggregation={"buffer_size": 2},
    )
    add_standby(fed)
    cluster = Cluster(fed)
    try:
        yield fed, cluster
    finally:
        cluster.stop()


def test_a_dead_region_is_replaced_by_its_standby_and_nothing_counts_twice(
    federation: tuple[Federation, Cluster],
) -> None:
    fed, cluster = federation
    root = fed.nodes[ROOT_ID]
    cluster.start()
    wait_for("the region's first forwards", lambda: applied(root, REGION) >= 2)
    # The root pauses: the region acks its sites and its forwards wait unacknowledged.
    cluster[ROOT_ID].signal(signal.SIGSTOP)
    try:
        time.sleep(1.5)
        cluster[REGION].kill()  # ... and the region dies with them
    finally:
        cluster[ROOT_ID].signal(signal.SIGCONT)
    stale = offline(fed, REGION).pending
    before = applied(root, STANDBY)
    wait_for(
        "training to resume through the standby",
        lambda: applied(root, STANDBY) >= before + 3,
        timeout=45,  # a loaded machine (the whole suite) is slow to train
    )
    assert metric(root, "fedloom_model_version") > 0
    # The dead region comes back with its old forwards. Whichever region delivered a site
    # update second was refused (Overlap) and rebuilt its forward without it: the stale
    # forwards if the standby was first, else the standby's resends of updates whose
    # settlement the dead region never passed on.
    cluster.start([REGION])
    if stale:
        wait_for(
            "the stale forwards to be answered",
            lambda: (
                (
                    metric(root, "fedloom_updates_duplicate_total", src=REGION)
                    + metric(root, "fedloom_forward_overlap_pairs_total", src=REGION)
                )
                >= 1
            ),
        )
    overlaps = sum(
        metric(root, "fedloom_forward_overlap_pairs_total", src=r) for r in (REGION, STANDBY)
    )
    assert overlaps >= 1  # some site update was offered twice, and refused once
    assert not cluster.dead()
    check_clean_exit(cluster, [*SITES, REGION, STANDBY])  # nothing reaches the root now
    applied_pairs = sum(
        metric(root, "fedloom_pairs_applied_total", src=r) for r in (REGION, STANDBY)
    )
    check_clean_exit(cluster)

    # Each application adds one to the counter; each distinct site update is one entry
    # in the root's durable pair ledger: equal means none was applied twice.
    ledger = offline(fed, ROOT_ID)._pairs
    incorporated = set()
    for site in SITES:
        node = offline(fed, site)
        kept = {u.seq for u in node.snapshot()["held"]} | {u.seq for u in node._outbox.pending()}
        for seq in range(1, node.seq + 1):
            if ledger.overlap([(site, seq)]):
                incorporated.add((site, seq))
            else:  # not at the root: then the site still holds it (in a buffer)
                assert seq in kept, f"{site}'s acknowledged update {seq} was lost"
    assert applied_pairs == len(incorporated) > 0
