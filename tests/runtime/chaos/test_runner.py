"""The chaos runner against real daemons: a short star run with a kill, a restart and (as
root) a full disk writes a well-formed run directory, and leaves no process or mount behind.
Also ``fedloom local init`` and the command line's one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fedloom.cli import main
from fedloom.runtime.chaos.faults import tmpfs_support, wait_gone
from fedloom.runtime.chaos.runner import ChaosRun, execute
from fedloom.runtime.chaos.scenario import parse_scenario
from fedloom.runtime.config import load_config

EVENT_KEYS = {"t", "event", "fault", "targets", "detail", "intended"}
NODE_KEYS = {
    "role",
    "parent",
    "standby_for",
    "config",
    "state_dir",
    "log",
    "metrics_url",
    "healthz_url",
}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _mounts_under(path: Path) -> list[str]:
    root = str(path.resolve())
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        return [ln.split()[1] for ln in fh if ln.split()[1].startswith(root)]


@pytest.mark.timeout(120)
def test_a_short_star_run_writes_the_run_directory_and_cleans_up(tmp_path: Path) -> None:
    raw = {
        "name": "short-star",
        "duration_s": 12,
        "federation": {"shape": "star", "sites": 2},
        "run": {"tmpfs_mb": 8, "stop_grace_s": 5},
        "expect": {"resume_within_s": 10},
        # Each fault as long as ever; the root still has 6 s after its restart to be back
        # before the stop at the end (which must be clean).
        "fault": [
            {"at_s": 2, "for_s": 3, "kind": "kill", "targets": ["site-0"]},
            {"at_s": 6, "kind": "restart", "targets": ["root"]},
            {"at_s": 8, "for_s": 2, "kind": "disk_full", "targets": ["site-1"]},
            {"at_s": 1, "for_s": 4, "kind": "latency", "latency_ms": 30, "targets": ["all"]},
        ],
    }
    out = tmp_path / "run"
    run = ChaosRun(parse_scenario(raw), out, backend="proxy")
    assert execute(run) is False

    doc = json.loads((out / "run.json").read_text())
    assert doc["scenario"] == "short-star" and doc["finished"] is True
    assert doc["duration_s"] >= 12 and doc["resume_within_s"] == 10
    assert doc["expect"] == {"resume_within_s": 10.0}
    assert doc["backend"] == "proxy"
    assert set(doc["nodes"]) == {"root", "site-0", "site-1"}
    for node_id, node in doc["nodes"].items():
        assert set(node) == NODE_KEYS
        assert (out / node["config"]).is_file() and (out / node["log"]).is_file()
        assert (out / node["state_dir"]).is_dir()
        assert node["parent"] == (None if node_id == "root" else "root")
        assert node["metrics_url"].endswith("/metrics")
    # Children reach the root through the proxy, not directly.
    site_cfg = load_config(out / doc["nodes"]["site-0"]["config"])
    assert site_cfg.parent is not None
    assert str(doc["links"]["site-0->root"]) in site_cfg.parent.url

    events = _lines(out / "timeline.jsonl")
    assert all(set(e) == EVENT_KEYS for e in events)
    kinds = [(e["event"], e["fault"], tuple(e["targets"])) for e in events]
    kill = kinds.index(("process_kill", "kill@2", ("site-0",)))
    back = kinds.index(("process_start", "kill@2", ("site-0",)))
    assert kill < back and events[back]["t"] >= events[kill]["t"] + 3
    restart = kinds.index(("process_kill", "restart@6", ("root",)))
    # The SIGTERM's outcome is logged: a clean exit, no SIGKILL needed.
    assert kinds[restart + 1] == ("process_exit", "restart@6", ("root",))
    stop = events[restart + 1]["detail"]
    assert stop["signal"] == "SIGTERM" and stop["returncode"] == 0 and not stop["sigkill"]
    assert kinds[restart + 2] == ("process_start", "restart@6", ("root",))
    assert ("fault_start", "latency@1", ("site-0->root", "site-1->root")) in kinds
    assert ("fault_end", "latency@1", ("site-0->root", "site-1->root")) in kinds
    last_kill = max(i for i, e in enumerate(events) if e["event"] == "process_kill")
    assert events[last_kill]["detail"]["end"] is True
    ends = [e for e in events[last_kill + 1 :] if e["event"] == "process_exit"]
    assert sorted(n for e in ends for n in e["targets"]) == sorted(events[last_kill]["targets"])
    assert all(e["intended"] and e["detail"]["returncode"] == 0 for e in ends)
    if tmpfs_support()[0]:
        full = next(e for e in events if e["fault"] == "disk_full@8")
        assert full["event"] == "fault_start" and full["detail"]["free_bytes"] < 64 * 1024
    else:
        assert any(s.startswith("disk_full@8:") for s in doc["skipped"])

    samples = _lines(out / "samples.jsonl")
    assert {s["node"] for s in samples} == {"root", "site-0", "site-1"}
    assert {s["healthz"] for s in samples} <= {"ok", "fail", "timeout", "down"}
    assert all(all(k.startswith("fedloom_") for k in s["metrics"]) for s in samples)
    versions = [
        s["metrics"].get("fedloom_model_version", 0) for s in samples if s["node"] == "root"
    ]
    assert max(versions) >= 1  # the federation trained

    pids = [e["detail"]["pid"] for e in events if e["event"] == "process_start"]
    assert len(pids) == 5  # three daemons, one restart after the kill, one of the root
    assert wait_gone(pids, timeout=5.0) == []
    assert _mounts_under(tmp_path) == []


def test_local_init_writes_a_federation_that_loads(tmp_path: Path, capsys: Any) -> None:
    target = tmp_path / "fed"
    assert main(["local", "init", str(target), "--regions", "2", "--sites", "3"]) == 0
    readme = (target / "README.txt").read_text()
    assert "fedloom run --config" in readme and str(target / "state") in readme
    ids = {"root", "region-0", "region-1", "site-0", "site-1", "site-2"}
    assert {p.stem for p in target.glob("*.toml")} == ids | {"roster"}
    for node in ids:
        assert load_config(target / f"{node}.toml").node_id == node  # roster, keys, plan agree
    star = tmp_path / "star"
    assert main(["local", "init", str(star), "--shape", "star", "--sites", "2"]) == 0
    root = load_config(star / "root.toml")
    assert root.children == ("site-0", "site-1")
    assert load_config(star / "site-1.toml").parent.id == "root"  # type: ignore[union-attr]
    assert not (star / "region-0.toml").exists()


def test_a_relative_directory_gives_configs_that_load_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A config's relative paths are read relative to the config file: a layout written to
    # a relative directory must not name its keys relative to the working directory.
    monkeypatch.chdir(tmp_path)
    assert main(["local", "init", "rel/fed", "--shape", "star", "--sites", "2"]) == 0
    monkeypatch.chdir("/")
    cfg = load_config(tmp_path / "rel" / "fed" / "site-0.toml")
    assert cfg.identity_key == tmp_path / "rel" / "fed" / "keys" / "site-0.key"
    assert cfg.identity_key.exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["local", "init", "{tmp}/x", "--regions", "5", "--sites", "2"], "--regions: expected 1"),
        (["local", "init", "{tmp}/x", "--sites", "0"], "--sites: expected 1 to 200"),
        (["local", "up", "{tmp}"], "not a directory written by `fedloom local init`"),
        (["chaos", "{tmp}/missing.toml"], "no such scenario file"),
    ],
)
def test_user_mistakes_are_one_line(
    tmp_path: Path, capsys: Any, argv: list[str], needle: str
) -> None:
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_chaos_refuses_to_wipe_a_directory_that_is_not_a_run(tmp_path: Path, capsys: Any) -> None:
    scen = tmp_path / "s.toml"
    scen.write_text('duration_s = 5\n[federation]\nshape = "star"\nsites = 1\n')
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "thesis.txt").write_text("do not delete")
    assert main(["chaos", str(scen), "--out", str(keep), "--backend", "proxy"]) == 2
    assert "not empty and not an earlier chaos run" in capsys.readouterr().err
    assert (keep / "thesis.txt").exists()
    assert os.listdir(keep) == ["thesis.txt"]


def test_the_netem_backend_is_refused_with_the_reason(tmp_path: Path, capsys: Any) -> None:
    scen = tmp_path / "s.toml"
    scen.write_text('duration_s = 5\n[federation]\nshape = "star"\nsites = 1\n')
    assert main(["chaos", str(scen), "--out", str(tmp_path / "o"), "--backend", "netem"]) == 2
    err = capsys.readouterr().err
    assert "--backend netem: tc netem is" in err and "ships no netem backend" in err
    assert not (tmp_path / "o").exists()  # refused before anything was laid out


def test_a_gossip_layout_loads_and_the_links_point_through_the_proxy(tmp_path: Path) -> None:
    from fedloom.runtime.chaos.layout import lay_out_gossip, point_link

    shape = parse_scenario(
        {"duration_s": 5, "federation": {"shape": "gossip", "peers": 4, "relayed": 2}}
    ).shape
    fed = lay_out_gossip(tmp_path, shape, aggregation=shape.peer_aggregation)
    assert set(fed.nodes) == {"peer-0", "peer-1", "peer-2", "peer-3", "relay"}
    for link in shape.links:
        dialer, target = link.split("->")
        point_link(fed.nodes[dialer].config, target, "ws://127.0.0.1:9/fedloom")
    cfgs = {n: load_config(f.config) for n, f in fed.nodes.items()}  # each passes validation
    assert cfgs["relay"].role == "relay" and cfgs["relay"].listen is not None
    assert cfgs["peer-3"].listen is None and cfgs["peer-3"].relay is not None
    assert cfgs["peer-3"].relay.url == "ws://127.0.0.1:9/fedloom"
    urls = {p.id: p.url for p in cfgs["peer-0"].peers}
    assert urls == {"peer-3": None, "peer-1": "ws://127.0.0.1:9/fedloom"}  # peer-3 dials 0
    assert cfgs["peer-1"].relay is None  # both its neighbours are reached directly


@pytest.mark.skipif(not tmpfs_support()[0], reason="needs root to mount a tmpfs")
def test_disk_faults_fill_and_freeze_a_tmpfs_then_leave_the_files_on_disk(tmp_path: Path) -> None:
    import errno

    from fedloom.runtime.chaos.faults import Disks

    state = tmp_path / "state"
    disks = Disks()
    disks.prepare("n", state, size_mb=2)
    try:
        assert _mounts_under(tmp_path) == [str(state.resolve())]
        writer = (state / "wal.1.log").open("ab")  # a daemon's open log
        full = disks.fill("n")
        assert full["free_bytes"] < 64 * 1024
        with pytest.raises(OSError) as info:
            (state / "more").write_bytes(b"x" * 200_000)
        assert info.value.errno == errno.ENOSPC
        disks.unfill("n")
        ro = disks.set_read_only("n", True)
        assert ro["method"] == "bind"  # the open writer keeps the tmpfs itself busy
        with pytest.raises(OSError) as info:
            (state / "checkpoint.ckpt.tmp").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        disks.set_read_only("n", False)
        (state / "checkpoint.ckpt").write_bytes(b"kept")
        writer.close()
        assert disks.set_read_only("n", True)["method"] == "remount"  # nothing open now
    finally:
        problems = disks.restore()
    assert problems == []
    assert _mounts_under(tmp_path) == []
    assert (state / "checkpoint.ckpt").read_bytes() == b"kept"  # copied back onto the disk
    assert not (state / ".chaos-fill").exists()


def test_a_standby_layout_gives_sites_a_fallback_and_the_root_both_subtrees(
    tmp_path: Path,
) -> None:
    from fedloom.runtime.chaos.layout import add_standbys, lay_out

    shape = parse_scenario(
        {"duration_s": 5, "federation": {"regions": 2, "sites": 4, "standby": True}}
    ).shape
    fed = lay_out(tmp_path, shape.regions)
    add_standbys(fed, shape.standbys, 7.0)
    cfgs = {n: load_config(f.config) for n, f in fed.nodes.items()}  # each passes validation
    assert set(cfgs) == set(shape.nodes)
    assert cfgs["root"].children == ("region-0", "region-1", "region-0-standby", "region-1-standby")
    assert cfgs["root"].subtrees["region-1-standby"] == cfgs["root"].subtrees["region-1"]
    assert cfgs["region-0-standby"].children == cfgs["region-0"].children == ("site-0", "site-2")
    site = cfgs["site-2"]
    assert [f.id for f in site.fallbacks] == ["region-0-standby"] and site.failover_after_s == 7.0
    assert cfgs["region-0-standby"].listen != cfgs["region-0"].listen


def test_a_hierarchy_layout_declares_every_region_s_sites_at_the_root(tmp_path: Path) -> None:
    """The root checks each region's forwards against its sites and counts site updates
    once (``[subtrees]``); a star has no region, so no subtree."""
    from fedloom.runtime.chaos.layout import lay_out

    shape = parse_scenario({"duration_s": 5, "federation": {"regions": 2, "sites": 5}}).shape
    fed = lay_out(tmp_path / "hier", shape.regions)
    cfgs = {n: load_config(f.config) for n, f in fed.nodes.items()}
    assert cfgs["root"].subtrees == {r: tuple(s) for r, s in shape.regions.items()}
    assert {s for sites in cfgs["root"].subtrees.values() for s in sites} == {
        n for n, c in cfgs.items() if c.role == "site"
    }
    star = lay_out(tmp_path / "star", shape.regions, star=True)
    assert load_config(star.nodes["root"].config).subtrees == {}


def test_a_standby_layout_keeps_the_subtrees_of_regions_without_a_standby(
    tmp_path: Path,
) -> None:
    from fedloom.runtime.chaos.layout import add_standbys, lay_out

    fed = lay_out(tmp_path, {"region-0": ["site-0", "site-2"], "region-1": ["site-1"]})
    add_standbys(fed, {"region-0-standby": "region-0"}, 5.0)
    root = load_config(fed.nodes["root"].config)
    assert root.subtrees == {
        "region-0": ("site-0", "site-2"),
        "region-1": ("site-1",),
        "region-0-standby": ("site-0", "site-2"),
    }


def test_a_torn_tail_is_a_write_nothing_acted_on_every_record_before_it_stays(
    tmp_path: Path,
) -> None:
    """``wal_torn`` leaves what a crash mid-write leaves: a frame cut short after the last
    complete one, which the next start drops; every record the daemon had written (and
    may have acted on) is still there."""
    import random

    from fedloom.algorithms.protocol import Persist
    from fedloom.federation.store import StateStore
    from fedloom.runtime.chaos.faults import corrupt_state

    state = tmp_path / "state"
    with StateStore(state) as store:
        store.load()
        for i in range(5):
            store.apply(Persist("log", {"i": i, "pad": "x" * 100}, append=True))
    wal = next(state.glob("wal.*.log"))
    size = wal.stat().st_size
    done = corrupt_state(state, "wal_torn", random.Random(1))
    assert done["offset"] == size and wal.stat().st_size == size + done["torn_bytes"]
    with StateStore(state) as store:
        found = store.load()
    assert [r["i"] for r in found.records("log")] == [0, 1, 2, 3, 4]
    assert found.torn_bytes == done["torn_bytes"]


class _InterruptedRun:
    """What ``execute`` drives, with no daemons: interrupted while playing, then sent
    another SIGTERM (a second ``kill``, or systemd's) halfway through the teardown."""

    fed = None

    def __init__(self) -> None:
        self.torn_down = False

    def set_up(self) -> None:
        pass

    def play(self) -> None:
        raise KeyboardInterrupt

    def tear_down(self) -> list[str]:
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
        self.torn_down = True  # what follows the signal: resuming and stopping the daemons
        return []


def test_a_second_sigterm_does_not_cut_the_teardown_short() -> None:
    """A paused daemon the teardown never resumed stays stopped after the runner exits:
    its PDEATHSIG SIGTERM waits for a SIGCONT that never comes."""
    import signal

    run = _InterruptedRun()
    before = signal.getsignal(signal.SIGTERM)
    assert execute(run) is True  # type: ignore[arg-type]
    assert run.torn_down
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_interrupted_run_is_marked_unfinished_in_run_json(tmp_path: Path) -> None:
    """The checker (``python -m fedloom.runtime.chaos.checker``) must not take the part of
    a run that Ctrl-C cut short for the whole run."""

    class Interrupted(ChaosRun):
        def play(self) -> None:
            raise KeyboardInterrupt

    raw = {"duration_s": 30, "federation": {"shape": "star", "sites": 1}}
    run = Interrupted(parse_scenario(raw), tmp_path / "run", backend="proxy")
    assert execute(run) is True
    doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert doc["finished"] is False and doc["interrupted"] is True


@pytest.mark.timeout(120)
def test_the_end_of_a_kill_all_restarts_only_what_it_killed(tmp_path: Path) -> None:
    """kill_all's end restarted every daemon not running, site-0 too, which an earlier
    kill (no for_s: until the end) was holding down."""
    raw = {
        "duration_s": 6,
        "federation": {"shape": "star", "sites": 1},
        "run": {"stop_grace_s": 5},
        "fault": [
            {"at_s": 1, "kind": "kill", "targets": ["site-0"]},
            {"at_s": 2, "for_s": 1, "kind": "kill_all"},
        ],
    }
    out = tmp_path / "run"
    assert execute(ChaosRun(parse_scenario(raw), out, backend="proxy")) is False
    events = _lines(out / "timeline.jsonl")
    starts = [(e["fault"], e["targets"]) for e in events if e["event"] == "process_start"]
    assert ("kill_all@2", ["root"]) in starts
    assert not [t for f, t in starts if f != "start" and "site-0" in t], starts


@pytest.mark.timeout(120)
def test_a_corrupt_that_fails_still_restarts_its_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The corrupt kills its node first; when the damage itself failed (an I/O error) the
    node was never started again and stayed down for the rest of the run."""
    from fedloom.runtime.chaos import runner

    def failing(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(runner, "corrupt_state", failing)
    raw = {
        "duration_s": 5,
        "federation": {"shape": "star", "sites": 1},
        "run": {"stop_grace_s": 5},
        "fault": [{"at_s": 1, "kind": "corrupt", "targets": ["site-0"]}],
    }
    out = tmp_path / "run"
    run = ChaosRun(parse_scenario(raw), out, backend="proxy")
    assert execute(run) is False
    events = _lines(out / "timeline.jsonl")
    kinds = [(e["event"], e["fault"]) for e in events if e["targets"] == ["site-0"]]
    assert ("process_kill", "corrupt@1") in kinds
    assert kinds.index(("process_start", "corrupt@1")) > kinds.index(("process_kill", "corrupt@1"))
    assert any("corrupt@1: could not inject it" in s for s in run.skipped), run.skipped
