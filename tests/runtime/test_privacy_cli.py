"""``fedloom privacy STATE_DIR``, the daemon's [privacy] table and its gauges: a root's
ledger read back from a real state directory (checkpoint + live log) exactly as the root
itself restores it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from fedloom.algorithms.dp.ledger import PrivacyEvent, PrivacyLedger
from fedloom.algorithms.dp.release import PRIVACY_LOG_KEY, PrivacyConfig
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.protocol import Metric, Persist
from fedloom.cli import main
from fedloom.federation.config_reader import ConfigError
from fedloom.federation.factory import Neighbours, build_node
from fedloom.federation.params import AlgorithmConfig, TrainingConfig
from fedloom.federation.store import StateStore
from fedloom.runtime.config import parse_config
from fedloom.runtime.metrics import MetricsSink
from fedloom.runtime.privacy_cli import read_ledger
from fedloom.transport.wire import Update
from tests.algorithms.alg_helpers import hello, model, recv, requests

DELTA = 1e-5
SITES = {f"s{i}": "site" for i in range(4)}


def root(privacy: PrivacyConfig, key: int = 1) -> FedBuffAggregator:
    node = build_node(
        "root",
        "root",
        "fedbuff",
        AlgorithmConfig(buffer_size=2, concurrency=2),
        TrainingConfig(lr=0.1, local_steps=1, batch_size=4, mu=0.0),
        Neighbours(children=SITES),
        seed=0,
        weights=model(0.0),
        privacy=privacy,
        noise_key=key,
    )
    assert isinstance(node, FedBuffAggregator)
    return node


def run_root(
    state_dir: Path, privacy: PrivacyConfig, updates: int
) -> tuple[FedBuffAggregator, list[Any]]:
    """A root that checkpoints at start (as a daemon does) and then writes every Persist
    it asks for into a real StateStore; ``updates`` task answers."""
    node = root(privacy)
    store = StateStore(state_dir)
    store.load()
    store.apply(Persist("checkpoint", node.snapshot()))
    effects: list[Any] = []
    for s in SITES:
        effects += node.handle(hello(s), 0.0)
    pending = requests(effects)
    seq = 0
    while pending and seq < updates:
        site, req = pending.pop(0)
        seq += 1
        delta = {k: v + 0.5 for k, v in model().items()}
        out = node.handle(recv(site, Update(site, seq, req.version, delta, 10, 1, req.task)), 1.0)
        for e in out:
            if isinstance(e, Persist):
                store.apply(e)
        effects += out
        pending += requests(out)
    store.close()
    return node, effects


def test_reads_checkpoint_and_live_log_like_the_root(tmp_path: Path) -> None:
    privacy = PrivacyConfig("central", 1.3, 0.7, DELTA, 40.0)
    node, effects = run_root(tmp_path, privacy, updates=9)
    assert node.version == 4  # 2 updates a release
    assert sum(1 for e in effects if isinstance(e, Persist) and e.key == PRIVACY_LOG_KEY) == 4
    found = read_ledger(tmp_path)
    assert found is not None
    ledger, settings, held = found
    assert not held
    assert ledger.to_records() == node._dp.ledger.to_records()  # type: ignore[union-attr]
    assert settings["epsilon_budget"] == 40.0 and settings["delta"] == DELTA


def test_cli_prints_releases_epsilon_and_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    privacy = PrivacyConfig("central", 1.3, 0.7, DELTA, 40.0)
    node, _ = run_root(tmp_path, privacy, updates=6)
    expected = PrivacyLedger()
    for v in range(1, node.version + 1):
        expected.record(v, PrivacyEvent(1.3))
    eps = expected.epsilon(DELTA)
    assert main(["privacy", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["releases"] == node.version == 3
    assert report["epsilon"] == pytest.approx(eps, rel=1e-12)
    assert report["epsilon_budget"] == 40.0
    assert report["budget_left"] == pytest.approx(40.0 - eps)
    assert report["runs"] == [
        {"first_version": 1, "last_version": 3, "z": 1.3, "q": None, "releases": 3}
    ]
    assert report["releases_left"] == expected.releases_left(PrivacyEvent(1.3), DELTA, 40.0)
    assert main(["privacy", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "versions 1..3: 3 x Gaussian z = 1.3, no sampling" in text
    assert f"epsilon: {eps:.4f} at delta = 1e-05" in text
    assert main(["privacy", str(tmp_path), "--delta", "1e-3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] < eps


def test_not_a_private_root_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", str(tmp_path / "missing")]) == 2
    assert "no such state directory" in capsys.readouterr().err
    store = StateStore(tmp_path)
    store.load()
    store.apply(Persist("checkpoint", root(PrivacyConfig()).snapshot()))
    store.close()
    assert main(["privacy", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no privacy ledger" in err and "Traceback" not in err


def test_a_damaged_ledger_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = StateStore(tmp_path)
    store.load()
    snap = root(PrivacyConfig("central", 1.0, 1.0)).snapshot()
    snap["privacy"]["releases"] = [{"version": 1, "z": -2.0, "q": None, "count": 1}]
    store.apply(Persist("checkpoint", snap))
    store.close()
    assert main(["privacy", str(tmp_path)]) == 2
    assert "damaged privacy ledger" in capsys.readouterr().err
    # The root itself refuses the same state (the daemon: one line, exit 2).
    with pytest.raises(ValueError, match="z must be"):
        root(PrivacyConfig("central", 1.0, 1.0)).restore(snap)


def test_missing_extra_is_one_line_naming_the_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    privacy = PrivacyConfig("central", 1.3, 0.7, DELTA)
    run_root(tmp_path, privacy, updates=2)
    for name in [m for m in sys.modules if m == "dp_accounting" or m.startswith("dp_accounting.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # as if not installed
    assert main(["privacy", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "pip install 'fedloom[privacy]'" in err
    # A root built with [privacy] needs it too: the daemon stops the same way at start.
    with pytest.raises(ModuleNotFoundError):
        root(privacy)


def config(role: str, node: str, pub: str, **tables: Any) -> dict[str, Any]:
    return {
        "role": role,
        "node_id": node,
        "state_dir": "state",
        "identity": {"key": "k.key"},
        "roster": {"path": "roster.toml", "consortium_key": pub},
        **tables,
    }


CENTRAL = {"mechanism": "central", "noise_multiplier": 1.1, "clip": 0.5}


def test_daemon_config_reads_privacy_for_the_root_only(tmp_path: Path) -> None:
    from fedloom.transport.identity import Identity

    pub = Identity.generate("consortium", "consortium").public_line().split()[-1]
    root_cfg = config(
        "root",
        "root",
        pub,
        children=["s0"],
        listen={"port": 9},
        plan={"dataset": "synthetic", "n_sites": 1},
        privacy={**CENTRAL, "epsilon_budget": 8.0},
    )
    cfg = parse_config(root_cfg, base_dir=tmp_path)
    assert cfg.privacy == PrivacyConfig("central", 1.1, 0.5, 1e-5, 8.0, "rdp")
    assert parse_config({**root_cfg, "privacy": {}}, base_dir=tmp_path).privacy == PrivacyConfig()
    site_cfg = config(
        "site",
        "s0",
        pub,
        parent={"id": "root", "url": "ws://127.0.0.1:9"},
        plan={"dataset": "synthetic", "n_sites": 1, "site_index": 0},
        privacy=CENTRAL,
    )
    with pytest.raises(ConfigError, match=r"root's.*\[dp_sgd\]"):
        parse_config(site_cfg, base_dir=tmp_path)
    # Under secure aggregation a site's [privacy] is the least noise it lets a seal ask.
    secure = {**site_cfg, "secure_aggregation": {"enabled": True, "clip": 0.5}}
    assert parse_config(secure, base_dir=tmp_path).privacy.noise_multiplier == 1.1


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"mechanism": "central", "clip": 1.0}, "noise_multiplier: required"),
        ({"mechanism": "central", "noise_multiplier": 1.0}, "clip: required"),
        ({"mechanism": "central", "noise_multiplier": 0, "clip": 1.0}, "noise_multiplier"),
        ({"mechanism": "central", "noise_multiplier": 1, "clip": 1, "delta": 0.5}, "delta"),
        ({"mechanism": "central", "noise_multiplier": 1, "clip": 1, "accountant": "x"}, "rdp"),
        ({"mechanism": "central", "noise_multiplier": 1, "clip": 1, "epsilon": 3}, "unknown"),
        ({"epsilon_budget": 3.0}, "needs mechanism"),
        ({"mechanism": "local"}, "central"),
    ],
)
def test_privacy_table_is_strict(table: dict[str, Any], match: str) -> None:
    from fedloom.federation.config_reader import Table
    from fedloom.federation.privacy import read_privacy

    with pytest.raises(ConfigError, match=match):
        read_privacy(Table(table, "privacy"))


def test_gauges_reach_prometheus() -> None:
    from prometheus_client import generate_latest

    sink = MetricsSink()
    sink(Metric("privacy_epsilon", 2.5))
    sink(Metric("privacy_budget", 8.0))
    sink(Metric("privacy_budget_exhausted", 1.0))
    text = generate_latest(sink.registry).decode()
    assert "fedloom_privacy_epsilon 2.5" in text
    assert "fedloom_privacy_budget 8.0" in text
    assert "fedloom_privacy_budget_exhausted 1.0" in text
