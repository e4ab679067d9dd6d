"""Well-framed but impossible values in a node's state directory stop ``fedloom run`` with
one line naming the directory and the key, never a traceback (and never a NaN clip)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from fedloom.algorithms.protocol import Persist
from fedloom.cli import main
from fedloom.federation.store import CHECKPOINT_KEY, StateStore
from fedloom.runtime.config import load_config
from fedloom.runtime.daemon import open_daemon
from fedloom.runtime.federation_files import ROOT_ID, Federation, write_federation
from fedloom.runtime.relay_seq import RELAY_SEQ_KEY, RelaySeqState
from fedloom.runtime.roster_updates import ROSTER_SEEN_KEY


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return write_federation(
        tmp_path / "fed",
        {"region-a": ["site-1", "site-2"]},
        plan={"dataset": "synthetic", "model": "softmax"},
    )


def snapshot(fed: Federation, node_id: str) -> dict[str, Any]:
    d = open_daemon(load_config(fed.nodes[node_id].config))
    try:
        return dict(d.node.snapshot())  # type: ignore[attr-defined]
    finally:
        d.close()


def run_with(
    fed: Federation, node_id: str, key: str, value: Any, capsys: pytest.CaptureFixture[str]
) -> str:
    """Write ``value`` under ``key`` (a valid frame), run the node, return its one error line."""
    with StateStore(fed.nodes[node_id].state_dir) as store:
        store.load()
        store.apply(Persist(key, value))
    capsys.readouterr()
    assert main(["run", "--config", str(fed.nodes[node_id].config)]) != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fedloom: error: state_dir: ")
    assert str(fed.nodes[node_id].state_dir) in err and repr(key) in err
    return err


@pytest.mark.parametrize(
    "value",
    [
        7,
        {},
        {"version": "x", "digest": b"x"},
        {"version": 1},
        {"version": -1, "digest": b"x"},
        {"version": 99, "digest": b"x", "text": 5},
    ],
    ids=["int", "empty", "text-version", "no-digest", "negative", "text-not-str"],
)
def test_a_corrupt_roster_seen_is_one_line(
    fed: Federation, value: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run_with(fed, ROOT_ID, ROSTER_SEEN_KEY, value, capsys)


@pytest.mark.parametrize(
    ("node_id", "value"),
    [
        (ROOT_ID, "x"),
        ("site-1", [1]),
        (ROOT_ID, {"sent": -5, "seen": {}}),
        (ROOT_ID, {"sent": 0, "seen": {"region-a": -1}}),
        (ROOT_ID, {"sent": True, "seen": {}}),
    ],
    ids=["text", "list", "negative-sent", "negative-seen", "bool"],
)
def test_a_corrupt_relay_seq_is_one_line(
    fed: Federation, node_id: str, value: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run_with(fed, node_id, RELAY_SEQ_KEY, value, capsys)


def test_relay_seq_refuses_negative_numbers() -> None:
    assert RelaySeqState(None, {"sent": 5, "seen": {"a": 0}}).seen == {"a": 0}
    for bad in ({"sent": -1, "seen": {}}, {"sent": 0, "seen": {"a": -1}}):
        with pytest.raises(ValueError, match="relay-seq"):
            RelaySeqState(None, bad)


@pytest.mark.parametrize(
    "change",
    [
        lambda snap: 5,
        lambda snap: {**snap, "uses": [1]},
        lambda snap: {**snap, "ledger": 5},
        lambda snap: {**snap, "log_n": None},
        lambda snap: {**snap, "buffer": {**snap["buffer"], "clip": [1]}},
        lambda snap: {**snap, "buffer": {**snap["buffer"], "clip": {"recent": 5}}},
    ],
    ids=["int", "uses-list", "ledger-int", "log-n-none", "clip-list", "clip-recent-int"],
)
def test_a_corrupt_checkpoint_is_one_line(
    fed: Federation, change: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run_with(fed, ROOT_ID, CHECKPOINT_KEY, change(snapshot(fed, ROOT_ID)), capsys)


@pytest.mark.parametrize("norm", [math.nan, math.inf, -1.0], ids=["nan", "inf", "negative"])
def test_a_checkpoint_cannot_switch_the_clip_off(
    fed: Federation, norm: float, capsys: pytest.CaptureFixture[str]
) -> None:
    snap = snapshot(fed, ROOT_ID)
    recent = [[f"x{i}", norm] for i in range(4)]
    snap["buffer"] = {**snap["buffer"], "clip": {"recent": recent, "initial": 1.0}}
    err = run_with(fed, ROOT_ID, CHECKPOINT_KEY, snap, capsys)
    assert "clip.recent" in err
