"""A crafted state directory's LOG RECORDS (not its checkpoint) of the wrong shape, read
back through the one restore protocol (``Restorable.restore(checkpoint, records)``) by
``fedloom run``: the daemon stops with one line naming the directory and the key (exit 2,
no traceback), whatever the record looks like."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedloom.algorithms.aggregator_base import APPLIED_KEY
from fedloom.algorithms.protocol import Persist
from fedloom.algorithms.regional import PENDING_KEY as REGION_PENDING
from fedloom.algorithms.site import PENDING_KEY as SITE_PENDING
from fedloom.cli import main
from fedloom.federation.store import StateStore
from fedloom.runtime.federation_files import ROOT_ID, Federation, write_federation

REGION = "region-a"
SITE = "site-1"

# Records no node writes: a missing field, a field of the wrong type, not a mapping.
WRONG_SHAPES: list[Any] = [{}, {"x": 1}, {"seq": "a"}, {"seq": None}, {"n": "x"}, 7]
WRONG_IDS = ["empty", "stranger", "text-seq", "none-seq", "text-n", "int"]


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return write_federation(
        tmp_path / "fed",
        {REGION: [SITE, "site-2"]},
        plan={"dataset": "synthetic", "model": "softmax"},
    )


def run_with_record(
    fed: Federation, node_id: str, key: str, record: Any, capsys: pytest.CaptureFixture[str]
) -> str:
    """Append ``record`` to log ``key`` (a valid frame), run the node, return its error."""
    with StateStore(fed.nodes[node_id].state_dir) as store:
        store.load()
        store.apply(Persist(key, record, append=True))
    capsys.readouterr()
    assert main(["run", "--config", str(fed.nodes[node_id].config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fedloom: error: state_dir: ")
    assert str(fed.nodes[node_id].state_dir) in err and repr(key) in err
    assert "cannot restore" in err
    return err


@pytest.mark.parametrize(
    ("node_id", "key"),
    [(ROOT_ID, APPLIED_KEY), (REGION, APPLIED_KEY), (REGION, REGION_PENDING), (SITE, SITE_PENDING)],
    ids=["root-applied", "region-applied", "region-pending", "site-pending"],
)
@pytest.mark.parametrize("record", WRONG_SHAPES, ids=WRONG_IDS)
def test_a_log_record_of_the_wrong_shape_stops_the_daemon_with_one_line(
    fed: Federation, node_id: str, key: str, record: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    run_with_record(fed, node_id, key, record, capsys)
