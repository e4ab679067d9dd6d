"""A site's dataset registry (runtime.datasets): records, atomic writes under a lock, type
checks naming the column and row, and the watch a plan consults at every job (revoked,
missing and swapped files refused with their codes)."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import tempfile
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloom.federation.training import TrainingRefusedError
from fedloom.runtime.audit import read_entries
from fedloom.runtime.datasets import (
    LOCK_FILE,
    REGISTRY_FILE,
    DatasetRecord,
    DatasetRegistry,
    DatasetWatch,
    RegistryError,
    load_frame,
)


def write_csv(path: Path, n: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.integers(20, 90, n),
            "chol": rng.normal(200, 40, n).round(2),
            "sex": rng.choice(["F", "M"], n),
            "smoker": rng.choice(["true", "false"], n),
            "outcome": rng.choice(["sick", "well"], n),
        }
    )
    frame.to_csv(path, index=False)
    return path


def add(
    reg: DatasetRegistry, file: Path, name: str = "cohort", tag: str = "heart"
) -> DatasetRecord:
    return reg.add(file, name=name, tags=[tag], label="outcome")


def test_round_trip_records_schema_hash_and_rows(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "cohort.csv")
    reg = DatasetRegistry(tmp_path / "state")
    rec = reg.add(
        file, name="cohort", tags=["heart", "2026"], label="outcome", types={"age": "float"}
    )
    assert rec.rows == 20
    assert rec.sha256 == __import__("hashlib").sha256(file.read_bytes()).hexdigest()
    assert rec.size == file.stat().st_size
    assert rec.path == str(file.absolute())
    assert rec.features == (
        ("age", "float"),
        ("chol", "float"),
        ("sex", "category"),
        ("smoker", "bool"),
    )
    assert (rec.label, rec.label_type, rec.classes) == ("outcome", "category", ("sick", "well"))
    assert rec.revoked_at is None and rec.active
    # A second registry object (another process) reads back the very same record.
    again = DatasetRegistry(tmp_path / "state")
    assert again.records() == (rec,)
    assert again.get("cohort") == rec and again.get("other") is None
    assert again.active_by_tag("2026") == rec and again.active_by_tag("lung") is None
    assert DatasetRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    # No data is stored: only the schema, hash and counts.
    text = (tmp_path / "state" / REGISTRY_FILE).read_text()
    assert "F" not in json.loads(text)["datasets"][0]["schema"]["features"][2].values()
    frame = load_frame(rec)
    assert list(frame.columns) == ["age", "chol", "sex", "smoker", "outcome"]
    assert frame["age"].dtype == np.float64 and frame["smoker"].dtype == bool


def test_features_subset_and_parquet(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "c.csv")
    pq = tmp_path / "c.parquet"
    df = pd.read_csv(csv)
    df.to_parquet(pq)
    reg = DatasetRegistry(tmp_path / "state")
    rec = reg.add(pq, name="pq", tags=["t"], label="outcome", features=["chol", "age"])
    assert rec.format == "parquet"
    assert rec.features == (("chol", "float"), ("age", "int"))
    frame = load_frame(rec)
    np.testing.assert_allclose(frame["chol"], df["chol"])


@pytest.mark.parametrize(
    ("cell", "kind", "expected"),
    [
        ("abc", "float", "column 'chol', row 4 (line 5): 'abc' is not a finite number"),
        ("2.5", "int", "column 'chol', row 4 (line 5): '2.5' is not a whole number"),
        ("", "float", "column 'chol', row 4 (line 5): empty value"),
        ("maybe", "bool", "column 'chol', row 4 (line 5): 'maybe' is not true/false"),
    ],
)
def test_type_errors_name_column_and_first_bad_row(
    tmp_path: Path, cell: str, kind: str, expected: str
) -> None:
    rows = ["chol,outcome"] + ["1,a"] * 3 + [f"{cell},b", "zz,a"]
    file = tmp_path / "t.csv"
    file.write_text("\n".join(rows) + "\n")
    reg = DatasetRegistry(tmp_path / "state")
    with pytest.raises(RegistryError) as info:
        reg.add(file, name="t", tags=["t"], label="outcome", types={"chol": kind})
    assert expected in str(info.value)
    assert reg.records() == ()  # nothing recorded


def test_parquet_type_error_names_row(tmp_path: Path) -> None:
    file = tmp_path / "t.parquet"
    pd.DataFrame({"x": [1.0, 2.0, float("nan")], "y": ["a", "b", "a"]}).to_parquet(file)
    with pytest.raises(RegistryError, match=r"column 'x', row 3: empty value"):
        DatasetRegistry(tmp_path / "s").add(file, name="t", tags=["t"], label="y")
    pd.DataFrame({"x": [1.0, 2.5], "y": ["a", "b"]}).to_parquet(file)
    with pytest.raises(RegistryError, match=r"column 'x', row 2: 2.5 is not a whole number"):
        DatasetRegistry(tmp_path / "s").add(
            file, name="t", tags=["t"], label="y", types={"x": "int"}
        )


def test_refusals_at_add(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "c.csv")
    reg = DatasetRegistry(tmp_path / "state")
    add(reg, file)
    with pytest.raises(RegistryError, match=r"already registered.*fedloom dataset revoke cohort"):
        add(reg, file, tag="other")
    with pytest.raises(
        RegistryError, match="tag 'heart' already names the active dataset 'cohort'"
    ):
        add(reg, file, name="cohort2")
    with pytest.raises(RegistryError, match="no label column 'nope'"):
        reg.add(file, name="x", tags=["x"], label="nope")
    with pytest.raises(RegistryError, match="no column 'bmi'"):
        reg.add(file, name="x", tags=["x"], label="outcome", features=["age", "bmi"])
    with pytest.raises(RegistryError, match="must be one of int, float, category, bool"):
        reg.add(file, name="x", tags=["x"], label="outcome", types={"age": "integer"})
    with pytest.raises(RegistryError, match="file not found"):
        reg.add(tmp_path / "missing.csv", name="x", tags=["x"], label="outcome")
    with pytest.raises(RegistryError, match=r"dataset name '\.\./x'"):
        reg.add(file, name="../x", tags=["x"], label="outcome")
    assert [r.name for r in reg.records()] == ["cohort"]
    # Once revoked, the tag is free again; the name never is.
    reg.revoke("cohort")
    assert add(reg, file, name="cohort2").active
    with pytest.raises(RegistryError, match="already revoked"):
        reg.revoke("cohort")
    with pytest.raises(RegistryError, match="no dataset named 'ghost'"):
        reg.revoke("ghost")


def test_changes_go_to_the_audit_log(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "c.csv")
    reg = DatasetRegistry(tmp_path / "state")
    rec = add(reg, file)
    reg.revoke("cohort")
    entries = [(e["kind"], e["fields"]) for e in read_entries(tmp_path / "state")]
    kinds = [k for k, _ in entries if k.startswith("dataset_")]
    assert kinds == ["dataset_added", "dataset_revoked"]
    added = next(f for k, f in entries if k == "dataset_added")
    assert added["sha256"] == rec.sha256 and added["name"] == "cohort"


def test_write_is_atomic_a_failed_replace_keeps_the_old_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = write_csv(tmp_path / "c.csv")
    state = tmp_path / "state"
    reg = DatasetRegistry(state)
    add(reg, file)
    before = (state / REGISTRY_FILE).read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(RegistryError, match="cannot write the registry"):
        add(reg, file, name="second", tag="lung")
    monkeypatch.undo()
    assert (state / REGISTRY_FILE).read_bytes() == before
    assert sorted(p.name for p in state.iterdir() if "datasets" in p.name) == [
        REGISTRY_FILE,
        LOCK_FILE,
    ]  # no temporary file left behind


@pytest.mark.timeout(60)
def test_writers_are_serialised_by_the_lock(tmp_path: Path) -> None:
    state = tmp_path / "state"
    files = [write_csv(tmp_path / f"c{i}.csv", n=5, seed=i) for i in range(6)]
    reg = DatasetRegistry(state)
    add(reg, files[0], name="d0", tag="t0")
    # While someone else holds the lock, a writer waits.
    fd = os.open(state / LOCK_FILE, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    waiter = threading.Thread(target=reg.revoke, args=("d0",))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()
    assert reg.get("d0").active  # type: ignore[union-attr]
    os.close(fd)
    waiter.join(30)
    assert not waiter.is_alive() and not reg.get("d0").active  # type: ignore[union-attr]
    # Concurrent adds (each its own registry object, as separate commands would) lose none.
    threads = [
        threading.Thread(target=add, args=(DatasetRegistry(state), f, f"d{i}", f"t{i}"))
        for i, f in enumerate(files[1:], start=1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r.name for r in reg.records()) == [f"d{i}" for i in range(6)]


def test_damaged_registry_is_one_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / REGISTRY_FILE).write_text("{not json")
    with pytest.raises(RegistryError, match="damaged dataset registry"):
        DatasetRegistry(state).records()
    with pytest.raises(TrainingRefusedError) as info:
        DatasetWatch(state).current("t")
    assert info.value.code == "dataset_missing"


# -------------------------------------------------------------------------- the watch


def refusal(watch: DatasetWatch, tag: str = "heart") -> str:
    with pytest.raises(TrainingRefusedError) as info:
        watch.current(tag)
    return info.value.code


def test_watch_revoke_stops_the_next_job(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "c.csv")
    state = tmp_path / "state"
    watch = DatasetWatch(state)
    assert refusal(watch) == "dataset_missing"  # nothing registered yet
    rec = add(DatasetRegistry(state), file)
    assert watch.current("heart") == rec  # the registry changed: re-read at once
    assert refusal(watch, "lung") == "dataset_missing"
    DatasetRegistry(state).revoke("cohort")  # another process (the CLI) revokes
    assert refusal(watch) == "dataset_revoked"


def test_watch_refuses_a_swapped_or_deleted_file(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "c.csv")
    state = tmp_path / "state"
    add(DatasetRegistry(state), file)
    watch = DatasetWatch(state)
    watch.current("heart")
    # Swapped for another table (same columns, other rows): refused.
    write_csv(tmp_path / "other.csv", seed=7)
    os.replace(tmp_path / "other.csv", file)
    assert refusal(watch) == "dataset_changed"
    # Edited in place, same size: refused too (the mtime changed).
    write_csv(file)
    watch.current("heart")
    data = bytearray(file.read_bytes())
    data[-2] = ord("l") if data[-2] != ord("l") else ord("k")
    st = file.stat()
    file.write_bytes(bytes(data))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert refusal(watch) == "dataset_changed"
    file.unlink()
    assert refusal(watch) == "dataset_missing"


@pytest.mark.timeout(60)
def test_a_directory_or_fifo_is_refused_never_read(tmp_path: Path) -> None:
    # A directory read "file not found"; a FIFO swapped in for a registered file hung the
    # site's job in open() (no writer ever comes) instead of refusing it.
    reg = DatasetRegistry(tmp_path / "state")
    (tmp_path / "d.csv").mkdir()
    os.mkfifo(tmp_path / "f.csv")
    for name in ("d.csv", "f.csv"):
        with pytest.raises(RegistryError, match=rf"{name}: cannot read it \(not a regular file"):
            reg.add(tmp_path / name, name="x", tags=["x"], label="outcome")
    file = write_csv(tmp_path / "c.csv")
    rec = add(reg, file)
    watch = DatasetWatch(tmp_path / "state")
    watch.current("heart")
    os.replace(tmp_path / "f.csv", file)
    assert refusal(watch) == "dataset_missing"
    with pytest.raises(TrainingRefusedError) as info:
        load_frame(rec)
    assert info.value.code == "dataset_missing"


def test_load_frame_refuses_changed_bytes(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "c.csv")
    rec = add(DatasetRegistry(tmp_path / "s"), file)
    write_csv(file, seed=3)
    with pytest.raises(TrainingRefusedError) as info:
        load_frame(rec)
    assert info.value.code == "dataset_changed"


def test_watch_pickles_without_its_cache(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "c.csv")
    state = tmp_path / "state"
    rec = add(DatasetRegistry(state), file)
    watch = DatasetWatch(state)
    watch.current("heart")
    copy = pickle.loads(pickle.dumps(watch))
    assert copy.current("heart") == rec
    DatasetRegistry(state).revoke("cohort")
    assert refusal(copy) == "dataset_revoked"


# --------------------------------------------------------------------------- property


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ints=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=30),
    floats=st.data(),
)
def test_values_round_trip_through_csv(
    tmp_path: Path, ints: list[int], floats: st.DataObject
) -> None:
    n = len(ints)
    xs = floats.draw(
        st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=n, max_size=n)
    )
    labels = floats.draw(st.lists(st.sampled_from(["a", "b c", "ü"]), min_size=n, max_size=n))
    here = Path(tempfile.mkdtemp(dir=tmp_path))  # one per example
    file = here / "p.csv"
    pd.DataFrame({"i": ints, "x": xs, "y": labels}).to_csv(file, index=False)
    state = here / "state"
    rec = DatasetRegistry(state).add(
        file, name="p", tags=["p"], label="y", types={"i": "int", "x": "float", "y": "category"}
    )
    frame = load_frame(rec)
    assert frame["i"].tolist() == ints
    assert frame["x"].tolist() == xs
    assert frame["y"].tolist() == labels
    assert rec.classes == tuple(sorted(set(labels)))
