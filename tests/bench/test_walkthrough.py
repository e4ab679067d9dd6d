"""The README's walkthrough (``bench/walkthrough.py``), run end to end exactly as the
README writes it: a CSV registered at a hospital site, the tabular plan approved, a real
local federation (``fedloom run`` daemons on loopback) until version 40, the model
exported and verified, the RO-Crate written; then what it produced is checked."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

from tests.bench.loader import load_bench

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "examples" / "walkthrough"


def load_walkthrough() -> ModuleType:
    return load_bench("walkthrough")


@pytest.fixture(scope="module")
def walkthrough() -> ModuleType:
    return load_walkthrough()


def test_the_readme_block_is_read_as_commands(walkthrough: ModuleType, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n## Walkthrough: a hospital joins\n\ntext\n\n```sh\n# a comment\n"
        "fedloom a \\\n    --b c\n\nfedloom d\n```\n\n```sh\nnot this\n```\n"
    )
    assert walkthrough.steps(readme) == ["fedloom a --b c", "fedloom d"]
    readme.write_text("## Walkthrough: a hospital joins\n\n```sh\nfedloom a \\\n```\n")
    with pytest.raises(ValueError, match="backslash"):
        walkthrough.steps(readme)
    # The real README's block: every command is fedloom's, and it ends with the RO-Crate.
    commands = walkthrough.steps()
    assert commands and all(c.startswith("fedloom ") for c in commands)
    assert commands[-1].startswith("fedloom run-report")


@pytest.mark.timeout(150)
def test_csv_to_ro_crate_as_the_readme_writes_it(
    walkthrough: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rocrate.rocrate import ROCrate
    from safetensors.numpy import load_file

    assert walkthrough.main(["--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(r"walkthrough: CSV to RO-Crate in \d+\.\d s \(\d+ steps\)", last), last
    assert f"({len(walkthrough.steps())} steps)" in last
    walk = tmp_path / "walk"

    # No job was refused: the plan the sites approved is the one the root runs.
    assert "refused" not in (walk / "logs" / "root.log").read_text()
    # The exported model is the root's, at version 40 or later, and verifies.
    model = walk / "model.safetensors"
    tensors = load_file(str(model))
    assert tensors and all(v.size for v in tensors.values())
    assert "digest matches" in out

    crate = ROCrate(walk / "report")
    m = next(e for e in crate.get_entities() if e.id.startswith("#model-v"))
    assert int(m["version"]) >= 40
    # Each hospital's table is described by its hash, never carried.
    for site, csv in (("site-0", "hospital-a.csv"), ("site-1", "hospital-b.csv")):
        digest = hashlib.sha256((EXAMPLES / csv).read_bytes()).hexdigest()
        d = crate.get(f"#dataset-{site}-heart-2026")
        assert d is not None and d["identifier"] == f"sha256:{digest}"
    assert not (walk / "report" / "hospital-a.csv").exists()
    # Both hospitals approved the very plan the root ran (the same digest).
    plan = crate.get("#plan")
    approvals = [e for e in crate.get_entities() if e.id.startswith("#approval-")]
    assert {a["agent"]["@id"] for a in approvals} == {"#node-site-0", "#node-site-1"}
    assert all(a["identifier"] == plan["identifier"] for a in approvals)
    # The sites evaluated the global model on their held-out rows; the root published it.
    metrics = json.loads(crate.get("#metrics")["value"])
    published = metrics["evaluation.json"]["published"]
    assert published[-1]["sites"] == 2 and published[-1]["accuracy"] > 0.7
