"""``bench/chaos.py`` without running a scenario: how it stops one that runs past its time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.bench.loader import load_bench


@pytest.mark.timeout(60)
def test_a_scenario_past_its_time_is_stopped_with_sigterm_first(tmp_path: Path) -> None:
    """It was SIGKILLed: `fedloom chaos` could not stop its daemons, and a paused one
    stayed stopped for good (its PDEATHSIG SIGTERM waits for a SIGCONT)."""
    bench = load_bench("chaos")
    marker = tmp_path / "terminated"
    child = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        f"    open({str(marker)!r}, 'w').write('SIGTERM')\n"
        "    sys.exit(130)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    status, out, _ = bench.run_bounded([sys.executable, "-c", child], timeout=2.0, grace=20.0)
    assert status == 124 and "started" in out
    assert marker.read_text() == "SIGTERM"
