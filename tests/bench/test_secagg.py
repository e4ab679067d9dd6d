"""bench/secagg.py's quickest cell, for real: a root daemon process and 6 sites in 2 site
processes on loopback, a 20,000-parameter model, no dropouts, 1 warm-up + 2 measured
flushes plain and then secure (about 15 s). Checks what the figures are made of: both
federations released versions, the bytes per site per flush are the model down and an
update up (4 bytes per coordinate for a masked one), the secure flush went through the
view and unmask rounds, and the last line is the figure."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench.secagg as secagg  # noqa: E402  (its processes import it by this name)

pytestmark = pytest.mark.timeout(180)

PARAMS = 20_000


def test_quickest_cell_measures_plain_and_secure_flushes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = secagg.main(
        [
            "--sites",
            "6",
            "--dropouts",
            "0",
            "--params",
            str(PARAMS),
            "--warmup",
            "1",
            "--flushes",
            "2",
            "--site-procs",
            "2",
            "--timeout",
            "90",
            "--workdir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    plain, secure = (next(r for r in rows if r["secure"] is s) for s in (False, True))
    model_bytes = 4 * PARAMS
    for row in (plain, secure):
        assert row["n"] == 6 and row["d"] == 0
        assert len(row["intervals"]) == 2 and all(x > 0 for x in row["intervals"])
        # Every site gets at least one fp32 model per flush and sends one update.
        assert row["down"] >= 0.9 * model_bytes
        assert row["up"] > 0
    # A masked upload is d + 1 raw uint32 words plus 5 share bundles: never less.
    assert secure["up"] >= 4 * (PARAMS + 1)
    phases = secure["phases"]
    assert 0 <= phases["first upload"] <= phases["last upload"] <= phases["release"]
    assert phases["last view sig"] > 0 and phases["last shares"] > 0
    assert secure["latency"] == pytest.approx(phases["release"], rel=0.5)
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"secagg: 6 sites 0% dropout: secure flush \d+\.\d\ds vs plain \d+\.\d\ds = "
        r"\d+\.\d\dx \[goal <= 2\.0\]",
        last,
    ), last
    # Every process the bench started is gone (each ran in its own run directory).
    root_log = tmp_path / "6-0.0-secure" / "logs" / "root-bench.log"
    assert "secure cohort applied" in root_log.read_text()
    assert "root: stopped cleanly" in root_log.read_text()
