"""``fedloom model export`` beside a running root (real ``fedloom run`` daemons on
loopback): every export while the root trains and checkpoints succeeds, verifies, and
never goes back in versions; after the stop the export is the model the root restores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedloom.cli import main
from fedloom.runtime.config import load_config
from fedloom.runtime.export import verify_export
from fedloom.runtime.federation_files import ROOT_ID
from fedloom.runtime.harness import Cluster
from fedloom.runtime.recovery import load_node
from fedloom.transport.e2e import tensors_digest
from tests.runtime.test_e2e import check_clean_exit, metric, wait_for
from tests.runtime.test_export import federation

pytestmark = pytest.mark.timeout(120)


def test_exports_beside_a_running_root(tmp_path: Path) -> None:
    fed = federation(tmp_path)
    root = fed.nodes[ROOT_ID]
    config = str(root.config)
    versions: list[int] = []
    with Cluster(fed) as cluster:
        cluster.start()
        wait_for("the root's model version 5", lambda: metric(root, "fedloom_model_version") >= 5)
        for i in range(4):
            out = tmp_path / f"live-{i}.safetensors"
            assert main(["model", "export", "--config", config, "--out", str(out)]) == 0
            found = verify_export(out)
            assert found.digest_ok and found.metadata["source"] == "checkpoint+log"
            versions.append(found.version)
            wait_for(
                "a newer version", lambda v=found.version: metric(root, "fedloom_model_version") > v
            )
        check_clean_exit(cluster)
    assert versions == sorted(versions) and versions[0] >= 5
    out = tmp_path / "final.safetensors"
    assert main(["model", "export", "--config", config, "--out", str(out)]) == 0
    node: Any = load_node(load_config(root.config))
    version, weights = node.current_model()
    found = verify_export(out)
    assert found.version == version > versions[-1]
    assert found.metadata["digest"] == "sha256:" + tensors_digest(weights).hex()
    # The root's audit log recorded the versions it released: the lineage comes from it.
    assert found.metadata["lineage_source"].startswith("audit")
    assert json.loads(found.metadata["lineage"])[-1]["version"] == version
