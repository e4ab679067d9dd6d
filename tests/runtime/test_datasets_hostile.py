"""Hostile tables and a hostile registry through the real paths (review findings): whole
numbers beyond 64 bits (CSV, Parquet uint64), repeated CSV headers, and a datasets.json
nested too deep or holding a huge integer: one line naming the file, the column and the
first bad row (exit 2 at the CLI), never a traceback or a silently wrapped value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedloom.cli import main
from fedloom.federation.training import TrainingRefusedError
from fedloom.runtime.datasets import REGISTRY_FILE, DatasetRegistry, DatasetWatch, RegistryError


def cli_add(path: Path, state: Path, *extra: str) -> int:
    return main(
        [
            "dataset",
            "add",
            str(path),
            "--state-dir",
            str(state),
            "--name",
            "n",
            "--tag",
            "t",
            "--label",
            "y",
            *extra,
        ]
    )


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("value", ["99999999999999999999", "-99999999999999999999"])
def test_a_csv_integer_beyond_64_bits_is_one_line_naming_column_and_row(
    tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "big.csv"
    csv.write_text(f"a,y\n1,0\n{value},1\n2,0\n")
    state = tmp_path / "state"
    assert cli_add(csv, state, "--type", "a=int") == 2
    err = one_line_error(capsys)
    assert "column 'a', row 2 (line 3)" in err and "within 64 bits" in err
    # Undeclared, the column is inferred as float (it is a finite number), not an error.
    assert cli_add(csv, state) == 0
    capsys.readouterr()
    (rec,) = DatasetRegistry(state).records()
    assert dict(rec.column_types)["a"] == "float"


def test_parquet_uint64_beyond_int64_is_refused_not_wrapped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "u.parquet"
    big = np.array([1, 2**63 + 5, 3], dtype=np.uint64)
    pd.DataFrame({"a": big, "y": [0, 1, 0]}).to_parquet(path)
    assert cli_add(path, tmp_path / "state") == 2
    err = one_line_error(capsys)
    assert "column 'a', row 2" in err and "9223372036854775813" in err
    # The largest int64 itself fits, as does a uint64 column within range.
    ok = tmp_path / "ok.parquet"
    fits = np.array([1, 2**63 - 1, 3], dtype=np.uint64)
    pd.DataFrame({"a": fits, "y": [0, 1, 0]}).to_parquet(ok)
    rec = DatasetRegistry(tmp_path / "s2").add(ok, name="n", tags=["t"], label="y")
    assert dict(rec.column_types)["a"] == "int"
    # A float column declared int beyond the range: refused too (astype would wrap it).
    flt = tmp_path / "f.parquet"
    pd.DataFrame({"a": [1.0, 1e30, 2.0], "y": [0, 1, 0]}).to_parquet(flt)
    with pytest.raises(RegistryError, match=r"column 'a', row 2: .* within 64 bits"):
        DatasetRegistry(tmp_path / "s3").add(
            flt, name="n", tags=["t"], label="y", types={"a": "int"}
        )


def test_a_repeated_csv_header_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "dup.csv"
    csv.write_text("a,a,y\n1,5,0\n2,6,1\n")  # pandas would read it as a, a.1, y
    assert cli_add(csv, tmp_path / "state") == 2
    err = one_line_error(capsys)
    assert "'a' appears more than once in the header" in err
    assert not (tmp_path / "state" / REGISTRY_FILE).exists()
    # A Parquet schema may name a column twice too: refused the same way (pyarrow's own
    # "Multiple matches for FieldRef.Name(a) ..." named neither the problem nor the fix).
    import pyarrow as pa
    import pyarrow.parquet as pq

    pqt = tmp_path / "dup.parquet"
    pq.write_table(pa.table([[1, 2], [5, 6], [0, 1]], names=["a", "a", "y"]), pqt)
    assert cli_add(pqt, tmp_path / "state") == 2
    assert "dup.parquet: the column name 'a' appears more than once" in one_line_error(capsys)
    assert not (tmp_path / "state" / REGISTRY_FILE).exists()
    # A header that merely looks like pandas' renaming is its own name: accepted.
    fine = tmp_path / "fine.csv"
    fine.write_text("a,a.1,y\n1,5,0\n2,6,1\n")
    rec = DatasetRegistry(tmp_path / "s2").add(fine, name="n", tags=["t"], label="y")
    assert list(rec.column_types)[:2] == ["a", "a.1"]


@pytest.mark.parametrize(
    "text",
    [
        '{"format": "fedloom-datasets", "version": 1, "datasets": '
        + "[" * 100_000
        + "]" * 100_000
        + "}",
        '{"format": "fedloom-datasets", "version": 1, "datasets": [], "x": ' + "9" * 5000 + "}",
    ],
    ids=["deep", "huge_int"],
)
def test_a_damaged_registry_is_one_line_and_the_watch_refuses(
    tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / REGISTRY_FILE).write_text(text)
    with pytest.raises(RegistryError, match="damaged dataset registry"):
        DatasetRegistry(state).records()
    with pytest.raises(TrainingRefusedError) as info:
        DatasetWatch(state).current("t")
    assert info.value.code == "dataset_missing"
    assert main(["dataset", "list", "--state-dir", str(state)]) == 2
    assert "damaged dataset registry" in one_line_error(capsys)
