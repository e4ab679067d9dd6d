"""A site's dataset registry: the tables it lets plans train on, by tag.

``fedloom dataset add`` (``runtime.dataset_cli``) records a CSV or Parquet file with its
schema (feature and label columns, their types, the label's classes), tags, the SHA-256 of
its bytes, its size and row count in ``STATE_DIR/datasets.json``. The registry holds no
data, only where the data is and what it must hash to; the file itself is never written
to. Names are unique; a tag names at most one active dataset (a plan asks for its data
by tag, so the answer must be one table; as in Fed-BioMed, a conflicting tag is refused).
``revoke`` marks a record revoked (``revoked_at``); records are never deleted.

Writes are atomic (tmp + fsync + ``os.replace`` + fsync of the directory) and serialised
by ``flock`` on ``STATE_DIR/datasets.lock`` (not the daemon's own ``lock``: the operator
registers data while the site runs). Readers need no lock: they see the old or the new
file whole.

``DatasetWatch`` is what a training plan asks at the start of every job
(``workloads.tabular.TableSource``): the active record tagged ``tag``, or
``TrainingRefusedError`` with code "dataset_missing" (no active dataset with that tag, or
its file is gone), "dataset_revoked" (the tag's dataset was revoked) or "dataset_changed"
(the file's bytes no longer hash to the registered SHA-256). It is cheap: the registry
file is re-read only when its ``stat`` (inode, size, mtime) changed, and the data file is
re-hashed only when the registry or the file's own ``stat`` changed. (A file rewritten in
place with its size and mtime forged back is not noticed until the registry changes;
``load_frame`` always hashes the bytes it parses.)

Public API (kept stable: federated statistics and the run report use it):
``DatasetRegistry(state_dir)`` with ``add``, ``get``, ``active_by_tag``, ``revoke``,
``records``; ``DatasetRecord`` (frozen, ``to_json``/``from_json``); ``load_frame(record)``;
``read_table``; ``DatasetWatch``; ``RegistryError`` (a ``ConfigError``: one line, exit 2).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import io
import json
import os
import re
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedloom.federation.config_reader import ConfigError
from fedloom.federation.training import TrainingRefusedError

__all__ = [
    "COLUMN_TYPES",
    "FORMATS",
    "MAX_CLASSES",
    "REGISTRY_FILE",
    "DatasetRecord",
    "DatasetRegistry",
    "DatasetWatch",
    "RegistryError",
    "file_sha256",
    "load_frame",
    "read_table",
]

REGISTRY_FILE = "datasets.json"
LOCK_FILE = "datasets.lock"
COLUMN_TYPES = ("int", "float", "category", "bool")
FORMATS = ("csv", "parquet")
MAX_CLASSES = 1000  # a label with more distinct values is not a class label
_FORMAT_TAG = "fedloom-datasets"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_INT_RE = re.compile(r"\s*[+-]?\d+\s*")
_TRUE = frozenset(("true", "yes", "1"))
_FALSE = frozenset(("false", "no", "0"))
_CHUNK = 1 << 20


class RegistryError(ConfigError):
    """A registry operation the operator asked for cannot be done (one line, exit 2)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_name(value: str, what: str) -> str:
    """A dataset name or tag: letters, digits, '.', '_', '-', at most 64 characters."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise RegistryError(
            f"{what} {value!r}: use 1-64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return value


# ------------------------------------------------------------------------------ record


@dataclass(frozen=True, slots=True)
class DatasetRecord:
    """One registered table (never its data)."""

    name: str
    path: str  # absolute
    format: str  # "csv" | "parquet"
    sha256: str  # of the file's bytes
    size: int  # bytes
    rows: int
    features: tuple[tuple[str, str], ...]  # (column, type) in the declared order
    label: str
    label_type: str
    classes: tuple[Any, ...]  # the label's distinct values, sorted
    tags: tuple[str, ...]
    added_at: str  # ISO 8601, UTC
    revoked_at: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # unknown keys, kept on rewrite

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def status(self) -> str:
        return "active" if self.active else "revoked"

    @property
    def column_types(self) -> dict[str, str]:
        """Every declared column (features and label) -> its type."""
        out = dict(self.features)
        out[self.label] = self.label_type
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            **self.extra,
            "name": self.name,
            "path": self.path,
            "format": self.format,
            "sha256": self.sha256,
            "size": self.size,
            "rows": self.rows,
            "schema": {
                "features": [{"name": c, "type": t} for c, t in self.features],
                "label": {"name": self.label, "type": self.label_type},
                "classes": list(self.classes),
            },
            "tags": list(self.tags),
            "added_at": self.added_at,
            "revoked_at": self.revoked_at,
        }

    @classmethod
    def from_json(cls, d: Any) -> DatasetRecord:
        """Strict: ``ValueError`` naming what is wrong."""
        if not isinstance(d, Mapping):
            raise ValueError("a record is not an object")
        try:
            schema = d["schema"]
            features = tuple((str(f["name"]), str(f["type"])) for f in schema["features"])
            label = schema["label"]
            rec = cls(
                name=str(d["name"]),
                path=str(d["path"]),
                format=str(d["format"]),
                sha256=str(d["sha256"]),
                size=int(d["size"]),
                rows=int(d["rows"]),
                features=features,
                label=str(label["name"]),
                label_type=str(label["type"]),
                classes=tuple(schema["classes"]),
                tags=tuple(str(t) for t in d["tags"]),
                added_at=str(d["added_at"]),
                revoked_at=None if d.get("revoked_at") is None else str(d["revoked_at"]),
                extra={k: v for k, v in d.items() if k not in _RECORD_KEYS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a record is malformed ({type(exc).__name__}: {exc})") from None
        bad = [t for _, t in (*features, (rec.label, rec.label_type)) if t not in COLUMN_TYPES]
        if bad or rec.format not in FORMATS or not re.fullmatch(r"[0-9a-f]{64}", rec.sha256):
            raise ValueError(f"record {rec.name!r} is malformed (type, format or sha256)")
        return rec


_RECORD_KEYS = frozenset(
    ("name", "path", "format", "sha256", "size", "rows", "schema", "tags", "added_at", "revoked_at")
)


# ------------------------------------------------------------------------------ tables


def _open_regular(path: str | os.PathLike[str]) -> io.BufferedReader:
    """``path`` opened for reading, if it is a regular file; else ``OSError`` "not a
    regular file". Opened non-blocking: a FIFO's open() would wait for a writer forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file: a directory, FIFO or device")
        os.set_blocking(fd, True)
        return open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def file_sha256(path: str | os.PathLike[str]) -> tuple[str, int]:
    """``(hex SHA-256 of the file's bytes, its size)``, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with _open_regular(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise RegistryError(f"{path}: expected a .csv or .parquet file (got {suffix or 'no suffix'})")


def _parse_bytes(data: bytes, fmt: str, where: str) -> Any:
    """The table in ``data`` as a pandas DataFrame (CSV: every cell a string)."""
    import pandas as pd

    try:
        if fmt == "csv":
            sep = "\t" if where.lower().endswith(".tsv") else ","
            opts: dict[str, Any] = {"dtype": str, "keep_default_na": False, "na_filter": False}
            frame = pd.read_csv(io.BytesIO(data), sep=sep, **opts)
            # pandas renames a repeated header (a, a -> a, a.1): the header row as written
            header = pd.read_csv(io.BytesIO(data), sep=sep, header=None, nrows=1, **opts)
            names = [str(c) for c in header.iloc[0]] if len(header) else []
        else:
            import pyarrow.parquet as pq

            # The schema's names first: pyarrow cannot read a repeated name (refused below).
            names = [str(c) for c in pq.read_schema(io.BytesIO(data)).names]
            if len(set(names)) == len(names):
                frame = pd.read_parquet(io.BytesIO(data), engine="pyarrow")
                names = [str(c) for c in frame.columns]
    except ImportError:  # pyarrow missing: fedloom.cli names the extra
        raise
    except Exception as exc:  # pandas and pyarrow raise many kinds on a bad file
        text = " ".join(str(exc).split())[:200]
        raise RegistryError(f"{where}: cannot read it as {fmt.upper()} ({text})") from None
    seen: set[str] = set()
    for name in names:
        if name in seen:
            shown = name if len(name) <= 40 else name[:37] + "..."
            raise RegistryError(
                f"{where}: the column name {shown!r} appears more than once in the header "
                "(every column needs its own name)"
            )
        seen.add(name)
    return frame


def _row(i: int, fmt: str) -> str:
    return f"row {i + 1} (line {i + 2})" if fmt == "csv" else f"row {i + 1}"


def _bad(where: str, col: str, i: int, fmt: str, value: Any, expected: str) -> RegistryError:
    if isinstance(value, np.generic):
        value = value.item()
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return RegistryError(
        f"{where}: column {col!r}, {_row(i, fmt)}: {shown} is not {expected} "
        "(fix the file, or declare the column's type with --type COL=TYPE)"
    )


def _nulls(series: Any) -> Any:
    mask = series.isna().to_numpy()
    if _is_text(series):
        mask = mask | (series.astype(str).str.strip() == "").to_numpy()
    return mask


def _is_text(series: Any) -> bool:
    """Strings (every CSV column; a Parquet string column), not numbers or booleans."""
    return getattr(series.dtype, "kind", "O") not in "biuf"


def coerce_column(series: Any, kind: str, col: str, fmt: str, where: str) -> Any:
    """``series`` as a numpy array of ``kind`` (int64, float64, bool, or str objects);
    ``RegistryError`` naming the column and the first bad row."""
    missing = _nulls(series)
    if missing.any():
        i = int(np.argmax(missing))
        raise RegistryError(
            f"{where}: column {col!r}, {_row(i, fmt)}: empty value (every row must be complete: "
            "impute or drop incomplete rows first)"
        )
    values = series.to_numpy()
    if kind == "category":
        return np.array([_category(v) for v in values], dtype=object)
    if _is_text(series):  # strings (CSV): parse them
        text = series.astype(str).str.strip()
        if kind == "int":
            ok = text.str.fullmatch(_INT_RE.pattern).to_numpy()
            if not ok.all():
                i = int(np.argmin(ok))
                raise _bad(where, col, i, fmt, values[i], "a whole number")
            try:
                return text.astype(np.int64).to_numpy()
            except (OverflowError, ValueError):  # a whole number beyond 64 bits
                i = next(j for j, t in enumerate(text) if not _I64_MIN <= int(t) <= _I64_MAX)
                raise _bad(where, col, i, fmt, values[i], _INT64) from None
        if kind == "float":
            import pandas as pd

            num = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
            ok = np.isfinite(num)
            if not ok.all():
                i = int(np.argmin(ok))
                raise _bad(where, col, i, fmt, values[i], "a finite number")
            return num
        low = text.str.lower()
        is_true = low.isin(_TRUE).to_numpy()
        ok = is_true | low.isin(_FALSE).to_numpy()
        if not ok.all():
            i = int(np.argmin(ok))
            raise _bad(where, col, i, fmt, values[i], "true/false (or yes/no, 1/0)")
        return is_true
    # typed columns (Parquet)
    if values.dtype.kind not in "biuf":
        i = 0
        raise _bad(where, col, i, fmt, values[i], f"of type {kind} (the column is {values.dtype})")
    num = values.astype(np.float64)
    if kind == "float":
        ok = np.isfinite(num)
        if not ok.all():
            i = int(np.argmin(ok))
            raise _bad(where, col, i, fmt, values[i], "a finite number")
        return num
    if kind == "int":
        ok = np.isfinite(num) & (num == np.round(num))
        if not ok.all():
            i = int(np.argmin(ok))
            raise _bad(where, col, i, fmt, values[i], "a whole number")
        if values.dtype.kind == "u":  # compared as integers: no float rounding at 2**63
            ok = values <= np.uint64(_I64_MAX)
        elif values.dtype.kind == "f":
            ok = (num >= -(2.0**63)) & (num < 2.0**63)
        if not ok.all():  # astype would wrap it around silently
            i = int(np.argmin(ok))
            raise _bad(where, col, i, fmt, values[i], _INT64)
        return values.astype(np.int64)
    ok = (num == 0) | (num == 1)
    if not ok.all():
        i = int(np.argmin(ok))
        raise _bad(where, col, i, fmt, values[i], "true/false (or 1/0)")
    return num == 1


_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_INT64 = "a whole number within 64 bits (-2**63 to 2**63-1)"


def _category(v: Any) -> str:
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def _infer(series: Any) -> str:
    """The narrowest type every value of ``series`` fits (category when nothing else)."""
    if series.dtype.kind == "b":
        return "bool"
    if series.dtype.kind in "iu":
        return "int"
    if series.dtype.kind == "f":
        return "float"
    if set(series.astype(str).str.strip().str.lower()) <= {"true", "false"}:
        return "bool"  # (yes/no and 1/0 are bool only when declared so)
    for kind in ("int", "float"):
        try:
            coerce_column(series, kind, "", "csv", "")
        except RegistryError:
            continue
        return kind
    return "category"


def _classes(values: Any, kind: str) -> tuple[Any, ...]:
    distinct = np.unique(values)
    if len(distinct) > MAX_CLASSES:
        raise RegistryError(
            f"the label has {len(distinct)} distinct values (more than {MAX_CLASSES}): the "
            "tabular plan classifies; choose a categorical label column"
        )
    if kind == "bool":
        return tuple(bool(v) for v in distinct)
    if kind == "int":
        return tuple(int(v) for v in distinct)
    if kind == "float":
        return tuple(float(v) for v in distinct)
    return tuple(str(v) for v in distinct)


@dataclass(frozen=True, slots=True)
class Table:
    """A table read and checked against its declared columns: ``columns`` maps each
    declared column to a numpy array of its type."""

    columns: dict[str, Any]
    rows: int
    sha256: str
    size: int


def _read_bytes(path: Path, fmt: str, expect_sha256: str | None) -> tuple[Any, str, int]:
    """``(DataFrame, SHA-256, size)`` of ``path``, read once: what is parsed is what was
    hashed. ``expect_sha256``: refuse a file whose bytes differ (``TrainingRefusedError``
    "dataset_changed"; "dataset_missing" when it is gone)."""
    where = str(path)
    try:
        with _open_regular(path) as f:
            data = f.read()
    except OSError as exc:
        gone = isinstance(exc, FileNotFoundError)
        if expect_sha256 is not None:
            raise TrainingRefusedError(
                f"the registered file {where} is gone"
                if gone
                else f"cannot read the registered file {where} ({exc.strerror})",
                "dataset_missing",
            ) from None
        raise RegistryError(
            f"{where}: file not found" if gone else f"{where}: cannot read it ({exc.strerror})"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if expect_sha256 is not None and digest != expect_sha256:
        raise TrainingRefusedError(
            f"the registered file {where} changed (its SHA-256 is no longer the one "
            "registered); register the new file under a new name and revoke the old one",
            "dataset_changed",
        )
    return _parse_bytes(data, fmt, where), digest, len(data)


def _convert(frame: Any, types: Mapping[str, str], fmt: str, where: str) -> dict[str, Any]:
    present = [str(c) for c in frame.columns]
    absent = [c for c in types if c not in present]
    if absent:
        raise RegistryError(
            f"{where}: no column {absent[0]!r} (the file has: {', '.join(present[:20])})"
        )
    return {c: coerce_column(frame[c], kind, c, fmt, where) for c, kind in types.items()}


def read_table(
    path: Path,
    fmt: str,
    types: Mapping[str, str],
    *,
    expect_sha256: str | None = None,
) -> Table:
    """Read ``path`` once, hash the bytes read and parse them (so what is checked is what
    was hashed), and convert the ``types`` columns. ``expect_sha256``: refuse a file whose
    bytes differ (``TrainingRefusedError`` "dataset_changed")."""
    frame, digest, size = _read_bytes(path, fmt, expect_sha256)
    return Table(_convert(frame, types, fmt, str(path)), len(frame), digest, size)


def load_frame(record: DatasetRecord) -> Any:
    """The registered table as a pandas DataFrame with the record's columns in their
    declared types (category columns as strings). The file's bytes are hashed first:
    ``TrainingRefusedError`` ("dataset_changed") when they are not the registered ones,
    ("dataset_missing") when the file is gone; ``RegistryError`` when it no longer fits
    its schema."""
    import pandas as pd

    table = read_table(
        Path(record.path), record.format, record.column_types, expect_sha256=record.sha256
    )
    return pd.DataFrame(table.columns)


# ---------------------------------------------------------------------------- registry


def _audit(state_dir: Path, kind: str, done: str, identity: Any = None, **fields: Any) -> None:
    """Record a registry change in the node's audit log (``runtime.audit``); ``done``
    says what already happened, should the log refuse the entry. ``identity``: the
    node's, when the command could read it: the log's head is signed too."""
    from fedloom.runtime.audit import record

    try:
        record(state_dir, kind, identity=identity, **fields)
    except ConfigError as exc:
        raise RegistryError(f"{done}, but the audit log refused the entry: {exc}") from None


class DatasetRegistry:
    """``STATE_DIR/datasets.json`` (see the module docstring)."""

    def __init__(self, state_dir: str | os.PathLike[str], identity: Any = None) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / REGISTRY_FILE
        self.identity = identity  # signs the audit log's head after a change (optional)

    # -- reading

    def records(self) -> tuple[DatasetRecord, ...]:
        """Every record, oldest first (none when there is no registry yet)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ()
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{self.path}: cannot read the dataset registry ({exc})") from None
        try:
            doc = json.loads(text)
            if not isinstance(doc, Mapping) or doc.get("format") != _FORMAT_TAG:
                raise ValueError(f"not a {_FORMAT_TAG} file")
            if not isinstance(doc.get("datasets"), list):
                raise ValueError("no list of datasets")
            return tuple(DatasetRecord.from_json(d) for d in doc["datasets"])
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
            detail = str(exc)[:200]  # (an over-long integer's message quotes no digits)
            raise RegistryError(f"{self.path}: damaged dataset registry: {detail}") from None

    def get(self, name: str) -> DatasetRecord | None:
        """The record named ``name`` (active or revoked), or None."""
        return next((r for r in self.records() if r.name == name), None)

    def active_by_tag(self, tag: str) -> DatasetRecord | None:
        """The active dataset tagged ``tag`` (at most one), or None."""
        return _active_by_tag(self.records(), tag)

    # -- changing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise RegistryError(
                f"{self.state_dir}: cannot open the state directory ({exc.strerror})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, records: Sequence[DatasetRecord]) -> None:
        doc = {"format": _FORMAT_TAG, "version": 1, "datasets": [r.to_json() for r in records]}
        data = (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()
        tmp = self.state_dir / f".{REGISTRY_FILE}.{os.getpid()}.{threading.get_ident()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.state_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise RegistryError(
                f"{self.path}: cannot write the registry ({exc.strerror})"
            ) from None

    def add(
        self,
        file: str | os.PathLike[str],
        *,
        name: str,
        tags: Sequence[str],
        label: str,
        features: Sequence[str] | None = None,
        types: Mapping[str, str] | None = None,
    ) -> DatasetRecord:
        """Register ``file`` (see the module docstring); ``RegistryError`` on any mistake.

        ``features``: the feature columns (None: every column but the label); ``types``:
        column -> "int" | "float" | "category" | "bool" (columns not given are inferred).
        """
        check_name(name, "dataset name")
        if not tags:
            raise RegistryError("give at least one --tag (plans name their data by tag)")
        for t in tags:
            check_name(t, "tag")
        tags = tuple(dict.fromkeys(tags))
        path = Path(file).expanduser().absolute()
        if not path.exists():
            raise RegistryError(f"{path}: file not found")
        fmt = format_of(path)
        types = dict(types or {})
        for col, kind in types.items():
            if kind not in COLUMN_TYPES:
                raise RegistryError(
                    f"--type {col}={kind}: the type must be one of {', '.join(COLUMN_TYPES)}"
                )
        self._check_free(name, tags)
        frame, digest, size = _read_bytes(path, fmt, None)
        header = [str(c) for c in frame.columns]
        if label not in header:
            raise RegistryError(
                f"{path}: no label column {label!r} (the file has: {', '.join(header[:20])})"
            )
        if features is None:
            features = [c for c in header if c != label]
        features = list(features)
        if not features:
            raise RegistryError(f"{path}: no feature columns besides the label {label!r}")
        if label in features:
            raise RegistryError(f"--features: {label!r} is the label; it cannot be a feature")
        if len(set(features)) != len(features):
            dup = next(c for c in features if features.count(c) > 1)
            raise RegistryError(f"--features: {dup!r} is listed twice")
        for col in features:
            if col not in header:
                raise RegistryError(
                    f"{path}: no column {col!r} (the file has: {', '.join(header[:20])})"
                )
        unknown = [c for c in types if c not in (*features, label)]
        if unknown:
            raise RegistryError(f"--type {unknown[0]}: not a feature or the label")
        if len(frame) == 0:
            raise RegistryError(f"{path}: the table has no rows")
        declared = {c: types.get(c) or _infer(frame[c]) for c in [*features, label]}
        columns = _convert(frame, declared, fmt, str(path))
        record = DatasetRecord(
            name=name,
            path=str(path),
            format=fmt,
            sha256=digest,
            size=size,
            rows=len(frame),
            features=tuple((c, declared[c]) for c in features),
            label=label,
            label_type=declared[label],
            classes=_classes(columns[label], declared[label]),
            tags=tags,
            added_at=_now(),
        )
        with self._locked():
            records = self.records()
            _check_free_in(records, name, tags)
            self._write([*records, record])
        _audit(
            self.state_dir,
            "dataset_added",
            f"dataset {name!r} is registered",
            self.identity,
            name=name,
            path=record.path,
            sha256=record.sha256,
            rows=record.rows,
            tags=list(tags),
        )
        return record

    def revoke(self, name: str) -> DatasetRecord:
        """Mark ``name`` revoked (its file is not touched); ``RegistryError`` when unknown
        or already revoked."""
        with self._locked():
            records = list(self.records())
            i = next((i for i, r in enumerate(records) if r.name == name), None)
            if i is None:
                raise RegistryError(_unknown(name, records))
            if not records[i].active:
                raise RegistryError(
                    f"dataset {name!r} was already revoked at {records[i].revoked_at}"
                )
            rec = DatasetRecord(**{**_fields(records[i]), "revoked_at": _now()})
            records[i] = rec
            self._write(records)
        _audit(
            self.state_dir,
            "dataset_revoked",
            f"dataset {name!r} is revoked",
            self.identity,
            name=name,
            sha256=rec.sha256,
            tags=list(rec.tags),
        )
        return rec

    def _check_free(self, name: str, tags: Sequence[str]) -> None:
        _check_free_in(self.records(), name, tags)


def _fields(rec: DatasetRecord) -> dict[str, Any]:
    return {f: getattr(rec, f) for f in DatasetRecord.__dataclass_fields__}


def _unknown(name: str, records: Sequence[DatasetRecord]) -> str:
    names = ", ".join(r.name for r in records) or "none yet"
    return f"no dataset named {name!r} (registered: {names}; see `fedloom dataset list`)"


def _check_free_in(records: Sequence[DatasetRecord], name: str, tags: Sequence[str]) -> None:
    if any(r.name == name for r in records):
        raise RegistryError(
            f"a dataset named {name!r} is already registered (names are never reused: pick "
            f"another name; to retire the old one: fedloom dataset revoke {name})"
        )
    for r in records:
        clash = [t for t in tags if r.active and t in r.tags]
        if clash:
            raise RegistryError(
                f"tag {clash[0]!r} already names the active dataset {r.name!r} (a plan asks "
                f"for its data by tag); revoke it first (fedloom dataset revoke {r.name}) "
                "or pick another tag"
            )


def _active_by_tag(records: Sequence[DatasetRecord], tag: str) -> DatasetRecord | None:
    hits = [r for r in records if r.active and tag in r.tags]
    return hits[-1] if hits else None


# ------------------------------------------------------------------------------- watch


def _stat_sig(path: str | os.PathLike[str]) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class DatasetWatch:
    """The registry as a training plan sees it (``workloads.tabular.TableSource``): checked
    at the start of every job, cheaply (see the module docstring). Picklable (a process
    pool's copy starts with no cache)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        for module in ("pandas", "pyarrow"):  # the tabular extra: say so at start, not per job
            importlib.import_module(module)  # ModuleNotFoundError: fedloom.cli names the extra
        self.registry = DatasetRegistry(state_dir)
        self._init_cache()

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._reg_sig: tuple[int, int, int, int] | bool | None = False  # False: never read
        self._records: tuple[DatasetRecord, ...] = ()
        self._verified: dict[str, tuple[tuple[int, int, int, int], str]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"state_dir": self.registry.state_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.registry = DatasetRegistry(state["state_dir"])
        self._init_cache()

    def current(self, tag: str) -> DatasetRecord:
        """The active record tagged ``tag`` whose file still hashes to its registered
        SHA-256; ``TrainingRefusedError`` (dataset_missing, dataset_revoked,
        dataset_changed) otherwise."""
        with self._lock:
            sig = _stat_sig(self.registry.path)
            changed = sig != self._reg_sig
            if changed:
                try:
                    self._records = self.registry.records()
                except RegistryError as exc:
                    raise TrainingRefusedError(str(exc), "dataset_missing") from None
                self._reg_sig = sig
                self._verified.clear()
            rec = _active_by_tag(self._records, tag)
            if rec is None:
                revoked = [r.name for r in self._records if tag in r.tags]
                if revoked:
                    raise TrainingRefusedError(
                        f"the dataset tagged {tag!r} ({revoked[-1]}) was revoked at this site",
                        "dataset_revoked",
                    )
                raise TrainingRefusedError(
                    f"this site holds no active dataset tagged {tag!r} "
                    "(fedloom dataset add ... --tag TAG)",
                    "dataset_missing",
                )
            fsig = _stat_sig(rec.path)
            if fsig is None:
                raise TrainingRefusedError(
                    f"the file of dataset {rec.name!r} ({rec.path}) is gone", "dataset_missing"
                )
            if self._verified.get(rec.name) != (fsig, rec.sha256):
                try:
                    digest, size = file_sha256(rec.path)
                except OSError as exc:
                    raise TrainingRefusedError(
                        f"cannot read the file of dataset {rec.name!r} ({exc.strerror})",
                        "dataset_missing",
                    ) from None
                if digest != rec.sha256 or size != rec.size:
                    self._verified.pop(rec.name, None)
                    raise TrainingRefusedError(
                        f"the file of dataset {rec.name!r} ({rec.path}) changed since it was "
                        "registered (SHA-256 differs); register the new file under a new name",
                        "dataset_changed",
                    )
                self._verified[rec.name] = (fsig, rec.sha256)
            return rec

    def load(self, record: DatasetRecord) -> Any:
        """``load_frame(record)``: the hash is checked on the very bytes parsed."""
        try:
            return load_frame(record)
        except RegistryError as exc:  # the file no longer fits its own schema
            raise TrainingRefusedError(str(exc), "dataset_changed") from None
