"""The fuzz harness (``bench/fuzz.py``) on a small budget: every target runs, nothing but
declared protocol errors comes out, and its last line is the campaign's verdict."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.bench.loader import load_bench


def load_fuzz() -> ModuleType:
    return load_bench("fuzz")


@pytest.fixture(scope="module")
def fuzz() -> ModuleType:
    return load_fuzz()


def test_two_thousand_inputs_raise_nothing_undeclared(fuzz: ModuleType) -> None:
    summary = fuzz.run_campaign(2000, seed=3, workers=1)
    assert summary.inputs == 2000
    assert summary.unexpected == 0, [f.text for f in summary.findings]
    assert summary.skipped == []
    names = {"wire", "tensors", "stream", "stream_header", "e2e", "relay", "handshake"}
    names |= {"roster", "records", "channel", "ws_frames", "hostile_shapes"}
    assert set(summary.stats) == names
    for name, st in summary.stats.items():
        assert st.inputs > 0 and st.rejected > 0, name  # each target ran and refused


def test_an_undeclared_exception_is_counted_and_saved(
    fuzz: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A decoder bug planted in the batch tensor decoder must show up as unexpected.
    from fedloom.transport import tensors

    def buggy(*args: object, **kwargs: object) -> object:
        raise ValueError("planted")

    monkeypatch.setattr(tensors, "decode_tensors", buggy)
    summary = fuzz.run_campaign(200, seed=0, workers=1)
    assert summary.stats["tensors"].unexpected == summary.stats["tensors"].inputs > 0
    fuzz.print_summary(summary, tmp_path)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"fuzz: 200 inputs, {summary.unexpected} unexpected exceptions (target 0)"
    saved = sorted(tmp_path.glob("tensors-*.msgpack"))
    assert 1 <= len(saved) <= fuzz.REPRODUCERS_PER_KIND
    assert fuzz.replay(saved[0]) == 1  # the reproducer still raises
