"""The load generator (runtime.chaos.loadgen): N real sites in one process, and how chaos
scenarios name them (``load_sites``, target ``"loadgen"``)."""

from __future__ import annotations

import json
import logging
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloom.federation.config_reader import ConfigError
from fedloom.runtime.chaos.checker import RunData, check_exactly_once, load_states
from fedloom.runtime.chaos.faults import wait_gone
from fedloom.runtime.chaos.layout import lay_out
from fedloom.runtime.chaos.loadgen import (
    LOADGEN_ID,
    FixedDeltaTrainer,
    LoadgenProcess,
    Observer,
    attach_loadgen,
    read_loadgen_config,
)
from fedloom.runtime.chaos.scenario import parse_scenario
from fedloom.runtime.harness import DaemonProcess, scrape

# ---------------------------------------------------------------------------- trainer


def test_the_trainer_adds_one_seeded_delta_of_the_models_shape() -> None:
    weights = {"w": np.ones((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    trainer = FixedDeltaTrainer({"load-0": 17}, scale=1e-3, seed=5)
    first = trainer("load-0", weights, {})
    again = FixedDeltaTrainer({}, scale=1e-3, seed=5)("load-9", weights, {})
    assert first.n_examples == 17 and again.n_examples == 1
    for k, v in weights.items():
        assert first.weights[k].shape == v.shape and first.weights[k].dtype == v.dtype
        delta = first.weights[k] - v
        assert 0 < np.abs(delta).max() < 0.01
        np.testing.assert_array_equal(first.weights[k], again.weights[k])
    other = FixedDeltaTrainer({}, scale=1e-3, seed=6)("load-0", weights, {})
    assert not np.array_equal(other.weights["w"], first.weights["w"])


# ----------------------------------------------------------------------------- config


def test_a_loadgen_config_without_sites_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "loadgen.toml"
    path.write_text("[loadgen]\nsites = []\n[metrics]\nport = 70000\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"loadgen\.sites"):
        read_loadgen_config(path)
    path.write_text('[loadgen]\nsites = ["a.toml"]\nspeed = 2\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="speed"):
        read_loadgen_config(path)
    path.write_text('[loadgen]\nsites = ["a.toml"]\n[metrics]\nport = 9\n', encoding="utf-8")
    cfg = read_loadgen_config(path)
    assert cfg.sites == (tmp_path / "a.toml",) and cfg.metrics_port == 9


# --------------------------------------------------------------------------- scenario


def _scenario(federation: str, fault: str = "") -> object:
    import tomllib

    text = f"duration_s = 60\n[federation]\n{federation}\n{fault}"
    return parse_scenario(tomllib.loads(text))


def test_load_sites_are_spread_and_faults_name_the_load_generator() -> None:
    scen: object = _scenario(
        'shape = "hierarchy"\nregions = 2\nsites = 2\nload_sites = 4',
        '[[fault]]\nat_s = 1\nkind = "kill"\ntargets = ["region-0/*"]\n'
        '[[fault]]\nat_s = 2\nkind = "reset"\ntargets = ["loadgen"]\n'
        '[[fault]]\nat_s = 3\nkind = "kill_all"\n',
    )
    shape = scen.shape  # type: ignore[attr-defined]
    assert shape.regions == {
        "region-0": ["site-0", "load-0", "load-2"],
        "region-1": ["site-1", "load-1", "load-3"],
    }
    assert shape.processes == ["root", "region-0", "region-1", "site-0", "site-1", LOADGEN_ID]
    kill, reset, kill_all = scen.faults  # type: ignore[attr-defined]
    assert kill.targets == ("site-0", LOADGEN_ID)
    assert set(reset.targets) == {f"load-{i}->region-{i % 2}" for i in range(4)}
    assert LOADGEN_ID in kill_all.targets and "load-0" not in kill_all.targets


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ('kind = "kill"\ntargets = ["load-1"]', "is a load site, not a process"),
        ('kind = "corrupt"\ntargets = ["loadgen"]', "takes only kill"),
        ('kind = "disk_full"\ntargets = ["root/*"]', "takes only kill"),
    ],
)
def test_faults_a_load_site_cannot_take_are_refused(fault: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _scenario('shape = "star"\nsites = 0\nload_sites = 3', f"[[fault]]\nat_s = 1\n{fault}\n")


def test_without_load_sites_a_federation_needs_a_site() -> None:
    with pytest.raises(ConfigError, match="sites"):
        _scenario('shape = "star"\nsites = 0')


# ---------------------------------------------------------------------------- process

N_SITES = 10


def _wait(what: str, test: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if test():  # type: ignore[operator]
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _applied(url: str) -> float:
    try:
        samples = scrape(url)
    except OSError:
        return 0.0
    return sum(v for (name, _), v in samples.items() if name == "fedloom_updates_applied_total")


def _senders(url: str) -> set[str]:
    """The sites the root has applied at least one update from (its labelled counter)."""
    try:
        samples = scrape(url)
    except OSError:
        return set()
    return {
        dict(labels).get("src", "")
        for (name, labels), v in samples.items()
        if name == "fedloom_updates_applied_total" and v > 0
    }


def _healthz(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
            return bool(json.loads(resp.read())["ready"])
    except OSError:
        return False


@pytest.mark.timeout(300)
def test_ten_load_sites_drain_into_the_roots_ledger_exactly_once(tmp_path: Path) -> None:
    """10 sites in one load generator against one root daemon: every update a site's outbox
    holds as acknowledged is in the root's ledger once, and each site delivered some."""
    sites = [f"load-{i}" for i in range(N_SITES)]
    plan = {"dataset": "digits", "model": "mlp", "hidden": 50, "min_samples_per_site": 5}
    fed = lay_out(tmp_path, {"root": sites}, star=True, plan=plan)
    fed, load = attach_loadgen(fed, sites)
    assert set(fed.nodes) == {"root", LOADGEN_ID} and set(load) == set(sites)
    root = DaemonProcess(fed.nodes["root"])
    gen = LoadgenProcess(fed.nodes[LOADGEN_ID])
    root_url, gen_url = fed.nodes["root"].metrics_url, fed.nodes[LOADGEN_ID].metrics_url
    assert root_url is not None and gen_url is not None
    procs = [root, gen]
    try:
        root.start()
        gen.start()
        _wait("updates from every site", lambda: _applied(root_url) >= 3 * N_SITES, 180)
        # ... and at least one from each (a site whose first job ran last may still be short).
        _wait("one applied update from each site", lambda: _senders(root_url) >= set(sites), 120)
        assert _healthz(gen_url), gen.log_text()[-2000:]
        key = ("fedloom_loadgen_updates_produced", ())
        _wait("its /metrics", lambda: scrape(gen_url).get(key, 0.0) >= 3 * N_SITES, 30)
        assert gen.stop(20) == 0, gen.log_text()[-2000:]  # sites first: nothing in flight
        assert root.stop(20) == 0, root.log_text()[-2000:]
    finally:
        for p in procs:
            p.kill()
        assert not wait_gone([p.pid for p in procs if p.pid is not None], 10)
    assert "Traceback" not in gen.log_text()
    nodes: dict[str, dict[str, object]] = {
        "root": {"role": "root", "parent": None, "state_dir": "state/root"},
        LOADGEN_ID: {"role": "loadgen", "parent": None, "state_dir": None},
    }
    nodes.update({s: {"role": "site", "parent": "root", "state_dir": f"state/{s}"} for s in sites})
    data = RunData(tmp_path, {"nodes": nodes}, [], [], [])
    states = load_states(data)
    assert LOADGEN_ID not in states
    verdict = check_exactly_once(data, states)
    assert verdict.passed, verdict.detail
    for s in sites:
        st = states[s]
        assert not isinstance(st, str), st
        assert len(st.acknowledged) >= 1, s  # every site delivered


# --------------------------------------------------------------------------- observer


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_healthz_is_ok_while_the_main_loop_beats_and_degraded_when_it_stalls() -> None:
    observer = Observer("127.0.0.1", 0, stale_after_s=0.3)
    try:
        observer.start()
        url = observer.url
        assert url is not None
        assert _status(url) == 503  # not serving yet: starting
        observer.serving = True
        observer.beat()
        deadline = time.monotonic() + 5
        while _status(url) != 200 and time.monotonic() < deadline:
            observer.beat()
            time.sleep(0.05)
        assert _status(url) == 200
        time.sleep(0.8)  # no beat: the loop that runs the sites is stalled
        assert _status(url) == 503
        observer.refresh([], [])
        text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
        assert "fedloom_loadgen_sites 0.0" in text
    finally:
        observer.close()


def test_the_timeline_plot_gives_load_sites_their_load_generators_row(tmp_path: Path) -> None:
    from fedloom.runtime.chaos.report import _row

    nodes = {
        "root": {"role": "root"},
        "site-0": {"role": "site", "parent": "root"},
        "load-7": {"role": "site", "parent": "root", "process": "loadgen"},
    }
    data = RunData(tmp_path, {"nodes": nodes}, [], [], [])
    assert _row(data, "load-7->root") == "loadgen->root"
    assert _row(data, "load-7") == "loadgen"
    assert _row(data, "site-0->root") == "site-0->root"


def test_a_chaos_run_puts_one_load_generator_in_place_of_its_load_sites(tmp_path: Path) -> None:
    from fedloom.runtime.chaos.layout import read_config
    from fedloom.runtime.chaos.runner import ChaosRun

    scen: Any = _scenario('shape = "star"\nsites = 1\nload_sites = 3')
    run = ChaosRun(scen, tmp_path / "run", backend="proxy")
    try:
        run.set_up()
        run.write_run_json(final=False)
    finally:
        run.tear_down()
    assert run.fed is not None and set(run.fed.nodes) == {"root", "site-0", LOADGEN_ID}
    nodes = json.loads((tmp_path / "run" / "run.json").read_text())["nodes"]
    assert nodes[LOADGEN_ID]["role"] == "loadgen" and nodes[LOADGEN_ID]["state_dir"] is None
    for i in range(3):
        site = nodes[f"load-{i}"]
        assert site["role"] == "site" and site["parent"] == "root"
        assert site["process"] == "loadgen" and site["state_dir"] == f"federation/state/load-{i}"
        assert site["log"] == "federation/logs/loadgen.log"
        assert site["metrics_url"] == nodes[LOADGEN_ID]["metrics_url"]
    assert "process" not in nodes["site-0"]
    cfg = read_loadgen_config(run.fed.nodes[LOADGEN_ID].config)
    assert [p.stem for p in cfg.sites] == ["load-0", "load-1", "load-2"]
    for path in cfg.sites:  # each dials its parent through its own fault-proxy link
        site_cfg = read_config(path)
        port = run.link_ports[f"{path.stem}->root"]
        assert site_cfg["parent"]["url"] == f"ws://127.0.0.1:{port}/fedloom"
        assert "metrics" not in site_cfg


def test_a_load_generator_that_cannot_start_says_why_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedloom.runtime.chaos.loadgen import main

    fed = lay_out(tmp_path / "fed", {"root": ["load-0"]}, star=True)
    config = tmp_path / "loadgen.toml"
    config.write_text(f'[loadgen]\nsites = ["{fed.nodes["root"].config}"]\n', encoding="utf-8")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hangup = signal.getsignal(signal.SIGHUP)
    try:  # main() sets up logging and SIGHUP for its process: put this one's back
        assert main([str(config), "--log-format", "text"]) == 2  # a root is not a site
        err = capsys.readouterr().err
        assert "the load generator runs sites" in err and "Traceback" not in err
        config.write_text('[loadgen]\nsites = ["missing.toml"]\n', encoding="utf-8")
        assert main([str(config), "--log-format", "text"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "missing.toml" in err and "not found" in err
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        signal.signal(signal.SIGHUP, hangup)
