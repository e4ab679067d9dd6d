"""End to end: real ``fedloom run`` processes on loopback, real encrypted transport.

Every test bounds itself (``pytest.mark.timeout``) and every wait has its own deadline; the
federations are small (one region, two sites, synthetic data, which needs no scikit-learn
import) except the demo-sized one. Processes are always stopped, SIGKILLed if need be.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w

from fedloom.federation.store import StateStore
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import load_node
from fedloom.runtime.federation_files import (
    DEMO_REGIONS,
    ROOT_ID,
    Federation,
    NodeFiles,
    free_port,
    write_federation,
    write_roster,
)
from fedloom.runtime.harness import REPO_ROOT, Cluster, DaemonProcess, daemon_env, sample, scrape
from fedloom.runtime.relay_seq import RELAY_SEQ_KEY
from fedloom.transport.identity import Identity

pytestmark = pytest.mark.timeout(90)

SYNTHETIC = {"dataset": "synthetic", "model": "softmax", "alpha": 0.5, "beta": 0.5}
SMALL = {"region-a": ["site-1", "site-2"]}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` on time-out."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def metric(node: NodeFiles, name: str, **labels: str) -> float:
    assert node.metrics_url is not None
    value = sample(scrape(node.metrics_url, timeout=2.0), name, **labels)
    return 0.0 if value is None else value


def applied(node: NodeFiles, src: str) -> float:
    return metric(node, "fedloom_updates_applied_total", src=src)


def wait_ready(proc: DaemonProcess, timeout: float = 30.0) -> None:
    """Until the latest start of ``proc`` has logged that it is ready."""
    wait_for(
        f"{proc.node_id} to be ready",
        lambda: proc.log_text().count('"msg": "ready: ') >= proc.starts,
        timeout,
    )


def wait_applied_more(node: NodeFiles, src: str) -> None:
    """Until ``node`` has applied one more update from ``src`` than now."""
    before = applied(node, src)
    wait_for(
        f"{node.node_id} to apply another update of {src}", lambda: applied(node, src) > before
    )


def offline(fed: Federation, node_id: str) -> Any:
    """The node as its next start would recover it (the daemon must not be running)."""
    return load_node(load_config(fed.nodes[node_id].config))


@pytest.fixture
def small(tmp_path: Path) -> Iterator[tuple[Federation, Cluster]]:
    fed = write_federation(
        tmp_path / "fed", SMALL, plan=SYNTHETIC, root_aggregation={"buffer_size": 1}
    )
    cluster = Cluster(fed)
    try:
        yield fed, cluster
    finally:
        cluster.stop()


def check_clean_exit(cluster: Cluster, ids: list[str] | None = None) -> None:
    codes = cluster.stop(ids)
    bad = {k: v for k, v in codes.items() if v != 0}
    assert not bad, f"unclean exits {bad}:\n" + "\n".join(
        cluster[k].log_text()[-2000:] for k in bad
    )


# ----------------------------------------------------------------------------- converge


def test_demo_sized_federation_converges(tmp_path: Path) -> None:
    fed = write_federation(tmp_path / "fed", DEMO_REGIONS)
    root = fed.nodes[ROOT_ID]
    with Cluster(fed, args={ROOT_ID: ["--eval-interval", "0.3"]}) as cluster:
        cluster.start()
        wait_for(
            "the global model to reach v20 with accuracy >= 0.9",
            lambda: (
                metric(root, "fedloom_model_version") >= 20
                and metric(root, "fedloom_eval_accuracy") >= 0.9
            ),
            timeout=60,
            every=0.25,
        )
        assert not cluster.dead()
        # The global model can get there on one region alone when the root starts late
        # and the other region is still backing off: every site must contribute soon.
        children = {
            site: region
            for region in fed.by_role("region")
            for site in fed.config(region.node_id)["children"]
        }
        wait_for(
            "every hospital to contribute an update",
            lambda: all(applied(region, site) >= 1 for site, region in children.items()),
            timeout=30,
            every=0.25,
        )
        assert not cluster.dead()
        check_clean_exit(cluster)
    version, weights = offline(fed, ROOT_ID).current_model()
    assert version >= 20
    from fedloom.workloads.workload import from_config

    assert from_config(fed.plan).evaluate(weights)["accuracy"] >= 0.9


# ------------------------------------------------------------------------- site killed


@pytest.mark.parametrize("crash", ["unread", "ack_lost"])
def test_site_killed_mid_upload_is_applied_exactly_once(
    small: tuple[Federation, Cluster], crash: str
) -> None:
    """The region is frozen so that site-1's next update cannot be acknowledged; site-1
    persists and sends it; then site-1 crashes (SIGKILL) while the update is still unread
    in the frozen region's socket (``unread``), or after the region applied it and acked
    into a frozen site-1 (``ack_lost``: the resend must be recognised as a duplicate).
    Restarted, site-1 resends it; the region applies it exactly once."""
    fed, cluster = small
    region = fed.nodes["region-a"]
    cluster.start()
    wait_for("site-1's first updates", lambda: applied(region, "site-1") >= 2)
    in_flight = None
    for _ in range(5):
        cluster["region-a"].signal(signal.SIGSTOP)
        try:
            time.sleep(0.6)  # site-1 finishes its job: Persist, then Send (no Ack can come)
            if crash == "ack_lost":
                cluster["site-1"].signal(signal.SIGSTOP)
            else:
                cluster["site-1"].kill()
        finally:
            cluster["region-a"].signal(signal.SIGCONT)
        if crash == "ack_lost":
            time.sleep(1.0)  # the region reads, applies, persists, acks into the frozen site
            cluster["site-1"].kill()
        site = offline(fed, "site-1")
        if site.pending:
            in_flight = site.seq
            break
        cluster["site-1"].start()  # no luck this time (site-1 was between jobs): again
        wait_ready(cluster["site-1"])
        wait_applied_more(region, "site-1")
    assert in_flight is not None, "site-1 never had an unacknowledged update when killed"

    cluster["site-1"].start()
    wait_ready(cluster["site-1"])
    wait_for(
        f"site-1's update {in_flight} to be applied after the restart",
        lambda: applied(region, "site-1") >= in_flight,
    )
    if crash == "ack_lost":
        wait_for(
            "the resent update to be recognised as a duplicate",
            lambda: metric(region, "fedloom_updates_duplicate_total", src="site-1") >= 1,
        )
    check_clean_exit(cluster, ["site-1", "site-2"])
    applied_n = applied(region, "site-1")
    check_clean_exit(cluster, ["region-a", ROOT_ID])

    site = offline(fed, "site-1")
    reg = offline(fed, "region-a")
    recorded = {s for s in range(1, site.seq + 1) if reg._ledger.seen("site-1", s)}
    pending = {u.seq for u in site._outbox.pending()}
    assert in_flight in recorded
    # Nothing lost (every update is recorded or still pending at the site) and nothing
    # applied twice (one application per recorded update, in a region that never restarted).
    assert recorded | pending == set(range(1, site.seq + 1))
    assert applied_n == len(recorded), (applied_n, sorted(recorded))


# ----------------------------------------------------------------------- region killed


def test_region_killed_recovers_from_checkpoint_without_losing_acked_updates(
    small: tuple[Federation, Cluster],
) -> None:
    fed, cluster = small
    region, root = fed.nodes["region-a"], fed.nodes[ROOT_ID]
    cluster.start()
    wait_for(
        "the root to apply the region's first aggregates",
        lambda: (
            applied(root, "region-a") >= 3
            and applied(region, "site-1") >= 3
            and applied(region, "site-2") >= 3
        ),
    )
    cluster["region-a"].kill()
    forwards_applied = applied(root, "region-a")
    check_clean_exit(cluster, ["site-1", "site-2"])

    # What the sites hold as acknowledged must all be in the region's recovered state.
    acked: dict[str, set[int]] = {}
    for sid in ("site-1", "site-2"):
        site = offline(fed, sid)
        pending = {u.seq for u in site._outbox.pending()}
        acked[sid] = set(range(1, site.seq + 1)) - pending
    assert any(acked.values()), "nothing was acknowledged before the kill"
    reg = offline(fed, "region-a")
    for sid, seqs in acked.items():
        lost = [s for s in sorted(seqs) if not reg._ledger.seen(sid, s)]
        assert not lost, f"acknowledged updates of {sid} lost: {lost}"
    # A restarted region must not reuse the number of an aggregate the root already
    # applied (the root would drop the new aggregate as a duplicate).
    assert reg.seq >= forwards_applied

    cluster.start(["region-a", "site-1", "site-2"])
    for sid in ("region-a", "site-1", "site-2"):
        wait_ready(cluster[sid])
    assert "recovered a checkpoint" in wait_for(
        "the region's recovery line",
        lambda: next(
            (ln for ln in cluster["region-a"].log_text().splitlines() if "recovered" in ln), ""
        ),
    )
    wait_for(
        "new aggregates from the restarted region",
        lambda: applied(root, "region-a") >= forwards_applied + 2,
    )
    assert metric(root, "fedloom_updates_rejected_total", reason="src_mismatch") == 0
    check_clean_exit(cluster)


# ------------------------------------------------------------------------ not in roster


def test_site_not_in_roster_is_refused_and_the_aggregator_lives_on(
    small: tuple[Federation, Cluster], tmp_path: Path
) -> None:
    fed, cluster = small
    region = fed.nodes["region-a"]
    # The intruder trusts a roster of its own consortium, which lists it and the real
    # region key; the real roster does not list it.
    forged = tmp_path / "forged"
    forged.mkdir()
    intruder = Identity.generate("site-x", "site")
    intruder.save(forged)
    fake_consortium = Identity.generate("consortium", "consortium")
    region_key = Identity.load(fed.config("region-a")["identity"]["key"])
    write_roster(forged / "roster.toml", [intruder, region_key], fake_consortium)
    (forged / "consortium.pub").write_text(fake_consortium.public_line() + "\n")
    cfg = fed.config("site-1")
    cfg.update(node_id="site-x", state_dir=str(forged / "state"))
    cfg["identity"] = {"key": str(forged / "site-x.key")}
    cfg["roster"] = {
        "path": str(forged / "roster.toml"),
        "consortium_key_file": str(forged / "consortium.pub"),
    }
    (forged / "site-x.toml").write_text(tomli_w.dumps(cfg))
    files = NodeFiles(
        "site-x", "site", forged / "site-x.toml", forged / "state", forged / "site-x.log"
    )
    cluster.add(DaemonProcess(files))

    cluster.start()
    wait_for(
        "the region to refuse site-x",
        lambda: (
            "refused" in cluster["region-a"].log_text()
            and "cannot reach region-a" in cluster["site-x"].log_text()
        ),
    )
    before = applied(region, "site-1")
    wait_for("site-1 to keep training", lambda: applied(region, "site-1") > before + 2)
    assert cluster["region-a"].alive and cluster["site-x"].alive
    assert "connected to site-x" not in cluster["region-a"].log_text()
    assert applied(region, "site-x") == 0
    check_clean_exit(cluster)


# ------------------------------------------------------------------------ gossip relay


def test_firewalled_gossip_peers_reach_each_other_through_a_relay(tmp_path: Path) -> None:
    """Two peers that accept no inbound connection gossip via a relay daemon."""
    relay, peers = Identity.generate("relay", "relay"), ["peer-a", "peer-b"]
    identities = [relay, *(Identity.generate(p, "peer") for p in peers)]
    consortium = Identity.generate("consortium", "consortium")
    write_roster(tmp_path / "roster.toml", identities, consortium)
    (tmp_path / "consortium.pub").write_text(consortium.public_line() + "\n")
    relay_port = free_port()
    procs: list[DaemonProcess] = []
    for ident in identities:
        node_id = ident.node_id
        ident.save(tmp_path / "keys")
        cfg: dict[str, Any] = {
            "role": ident.role,
            "node_id": node_id,
            "state_dir": str(tmp_path / "state" / node_id),
            "identity": {"key": str(tmp_path / "keys" / f"{node_id}.key")},
            "roster": {
                "path": str(tmp_path / "roster.toml"),
                "consortium_key_file": str(tmp_path / "consortium.pub"),
            },
            "metrics": {"host": "127.0.0.1", "port": free_port()},
        }
        if node_id == "relay":
            cfg["listen"] = {"host": "127.0.0.1", "port": relay_port}
        else:
            index = peers.index(node_id)
            cfg["peers"] = [{"id": peers[1 - index]}]  # no url, and no [listen]: firewalled
            cfg["relay"] = {"id": "relay", "url": f"ws://127.0.0.1:{relay_port}/fedloom"}
            cfg["plan"] = {**SYNTHETIC, "n_sites": 2, "site_index": index, "seed": 1}
            cfg["aggregation"] = {"algorithm": "gossip", "gossip_interval_s": 0.5}
        path = tmp_path / f"{node_id}.toml"
        path.write_text(tomli_w.dumps(cfg))
        files = NodeFiles(
            node_id,
            ident.role,
            path,
            tmp_path / "state" / node_id,
            tmp_path / f"{node_id}.log",
            listen_port=relay_port if node_id == "relay" else 0,
            metrics_port=cfg["metrics"]["port"],
        )
        procs.append(DaemonProcess(files))
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            wait_ready(proc)
        relay_files = procs[0].files
        wait_for(
            "the relay to pass on shares both ways",
            lambda: all(
                metric(relay_files, "fedloom_relay_forwarded_total", dst=p) >= 10 for p in peers
            ),
        )
        for proc in procs[1:]:
            text = proc.log_text()
            assert "connected to relay" in text
            assert metric(proc.files, "fedloom_peers_pruned_total", peer=peers[0]) == 0
            assert metric(proc.files, "fedloom_peers_pruned_total", peer=peers[1]) == 0
            assert "dropped a relayed message" not in text
        assert metric(relay_files, "fedloom_relay_peers") == 2
        assert metric(relay_files, "fedloom_link_rtt_seconds_count") >= 2  # one per handshake
        assert metric(relay_files, "fedloom_link_rtt_last_seconds", peer="peer-a") > 0
    finally:
        codes = {p.node_id: p.stop() for p in procs}
    assert all(c == 0 for c in codes.values()), codes
    for index, node_id in enumerate(peers):  # relay numbers kept for after a restart
        with StateStore(tmp_path / "state" / node_id) as store:
            kept = store.load().values[RELAY_SEQ_KEY]
        assert kept["seen"][peers[1 - index]] > 0 and kept["sent"] > time.time_ns()


# ------------------------------------------------------------------------- the demo


def test_demo_interrupted_leaves_no_process_behind(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    demo = subprocess.Popen(
        [sys.executable, "-m", "fedloom", "demo", "--workdir", str(workdir), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=daemon_env(),
        cwd=REPO_ROOT,
        start_new_session=True,
        # Ctrl-C as at a terminal, even where pytest itself runs with SIGINT ignored (a
        # background job of a non-interactive shell): an ignored signal is inherited.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert demo.stdout is not None
    try:
        pids: list[int] = []
        deadline = time.monotonic() + 30
        while not pids and time.monotonic() < deadline:
            line = demo.stdout.readline().decode()
            match = re.search(r"started \d+ daemons \(pids ([\d, ]+)\)", line)
            if match:
                pids = [int(p) for p in match.group(1).split(",")]
        assert len(pids) == 9
        # Interrupt while the regions run and the sites may still be starting.
        wait_for(
            "a region to run",
            lambda: "fresh start" in (workdir / "logs" / "region-north.log").read_text(),
            timeout=30,
        )
        demo.send_signal(signal.SIGINT)
        out = demo.communicate(timeout=30)[0].decode()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    assert demo.returncode == 130, out
    assert "interrupted" in out
    wait_for("every daemon to be gone", lambda: not any(psutil.pid_exists(p) for p in pids), 5)
    leftovers = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(str(workdir) in part for part in (p.info["cmdline"] or []))
    ]
    assert not leftovers
