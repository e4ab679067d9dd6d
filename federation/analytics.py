"""Federated statistics: query specs, what one site computes, what the root publishes.

A query (``[[analytics]]`` at the root) names a dataset tag and numeric columns, and
optionally histogram bin edges and value bounds per column. The root sends it to every
site as a ``StatsRequest`` whose ``spec`` is a flat map (the wire carries scalars only)::

    tag          = "cohort-2026"            the sites' registered dataset with this tag
    col.<i>      = "age"                    column i (i = 0, 1, ... contiguous)
    edge.<i>.<j> = 0.0, 20.0, ...           column i's histogram bin edges, increasing
    lo.<i>, hi.<i>                          column i's bounds (values are clipped to them)
    min_cell     = 5                        cells under it are suppressed at the site
    z            = 1.1                      DP noise multiplier (absent: no noise)

A site answers with a ``StatsReport`` over the rows of that dataset: ``n`` (rows), and in
``values`` (keys by column index, never by name) ``count.<i>`` (finite values: missing and
infinite ones are left out), ``sum.<i>``, ``sumsq.<i>`` and ``hist.<i>.<j>`` (values in
``[e_j, e_j+1)``, the last bin closed). Suppression (``min_cell``, never below
``MIN_CELL_FLOOR`` whatever a root asks): a site with fewer rows refuses (code
``too_few_rows``); a column with fewer values sends only ``supp.<i> = 1``; a histogram
cell with ``0 < count < min_cell`` is left out and flagged ``supp.<i>.<j> = 1``, and then
(complementary suppression, exact answers) the column's count, sum and sum of squares are
left out too (``supp.<i> = 1`` with the other cells): ``count - released cells`` would give
the suppressed cell back. The values in no bin count as such a cell (``0 < outside <
min_cell`` withholds the moments too). Under noise a released figure is already DP and a
difference of them only a noisy one, so a noisy answer keeps them. A column without
bounds is treated as bounded by ``±MAX_ABS_VALUE``: a site refuses (``bad_column``) a
column with a finite value beyond it, and bounds and bin edges beyond it are refused, so
no sum can overflow.

DP (``z`` set; every column then needs bounds): record-level DP for the rows of one site's
dataset, per query. One row moves ``n`` by 1, each column's count and one histogram cell by
1, its sum by at most ``max(|lo|, |hi|)`` and its sum of squares by at most ``max(lo², hi²)``
(values clipped to ``[lo, hi]``). With ``k`` such released quantities per row, each value
gets Gaussian noise of σ = z · sensitivity · √k: normalised by their sensitivities, the
released vector moves by at most √k in L2, so the whole answer is ONE Gaussian mechanism
with noise multiplier z. ``gaussian_epsilon(z, delta)`` is its exact ε at δ (the analytic
Gaussian mechanism, Balle & Wang, ICML 2018). Suppression is applied to the noisy values
(post-processing). Answering the same query again spends again: sites keep their answer
per query and spec and repeat it instead.

The root (``aggregate``) publishes totals only from at least ``min_sites`` sites: rows,
per column count, mean and (population) standard deviation, and histogram cells whose
total is at least ``min_cell`` and that at least ``min_sites`` sites reported. A figure
that is not finite is left out (None), never published.

``check_values`` bounds what one site may claim: each value in the range an honest site's
could have, and consistent with the others (``count.i <= n``; the released cells of column
i sum to at most ``count.i``, or ``n``; ``lo * count.i <= sum.i <= hi * count.i``;
``0 <= sumsq.i <= max(lo², hi²) * count.i``), each widened by ``NOISE_SLACK_SIGMAS`` σ of
the figures involved under noise. So a lying site moves a published mean only within the
column's bounds and a histogram only within the rows it may claim.

Everything a peer sends is parsed here strictly (``parse_wire``, ``check_values``):
bounded sizes, known keys only, finite numbers; a bad spec or report is a ``SpecError``,
never another exception.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "EVALUATE",
    "MAX_ABS_VALUE",
    "MAX_BINS",
    "MAX_COLUMNS",
    "MIN_CELL_FLOOR",
    "QuerySpec",
    "SiteAnswer",
    "SpecError",
    "aggregate",
    "check_name",
    "check_values",
    "compute_site",
    "gaussian_epsilon",
    "parse_wire",
]

EVALUATE = "evaluate"  # a reserved query name: the root's evaluation schedule (runtime.reports)
MAX_COLUMNS = 16
MAX_BINS = 64  # bins per column (edges: one more)
MIN_CELL_FLOOR = 3  # no site suppresses less, whatever a root asks
MAX_MIN_CELL = 1_000_000
MAX_NAME = 64
MAX_SPEC_KEYS = 2 + 1 + 3 * MAX_COLUMNS + MAX_COLUMNS * (MAX_BINS + 1)
MAX_VALUE_KEYS = 4 * MAX_COLUMNS + 2 * MAX_COLUMNS * MAX_BINS
# With noise, a value may stray from its exact range by this many σ before it is refused
# (an honest site's noise exceeds 12 σ with probability below 1e-32).
NOISE_SLACK_SIGMAS = 12.0
# The magnitude any bound, bin edge or value of a column without bounds may have: sums
# of squares over any roster stay far below float max (1e24 per row).
MAX_ABS_VALUE = 1e12
Z_MIN, Z_MAX = 0.1, 1e4  # as algorithms.dp.ledger's: no privacy below, overflow above

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COLUMN_BAD = re.compile(r"[\x00-\x1f\x7f]")
_SPEC_KEY = re.compile(r"^(col|lo|hi)\.(\d{1,3})$|^edge\.(\d{1,3})\.(\d{1,3})$")
_VALUE_KEY = re.compile(r"^(count|sum|sumsq|supp)\.(\d{1,3})$|^(hist|supp)\.(\d{1,3})\.(\d{1,3})$")


class SpecError(ValueError):
    """A query spec or a report that does not hold (the message says what, briefly);
    ``code``: the refusal code a site sends for it (``bad_spec``, ``bad_column``,
    ``too_few_rows``)."""

    def __init__(self, message: str, code: str = "bad_spec") -> None:
        super().__init__(message)
        self.code = code


def check_name(what: str, value: object) -> str:
    """A query name or dataset tag: 1-64 characters of letters, digits, ``_ . -``."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or not _NAME.match(value):
        raise SpecError(f"{what} must be 1-{MAX_NAME} letters, digits, '_', '.' or '-'")
    return value


def _finite(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{what} must be a number")
    try:
        x = float(value)
    except OverflowError:  # an int beyond float range
        raise SpecError(f"{what} must be finite") from None
    if not math.isfinite(x):
        raise SpecError(f"{what} must be finite")
    return x


def _bounded(what: str, value: object) -> float:
    x = _finite(what, value)
    if abs(x) > MAX_ABS_VALUE:
        raise SpecError(f"{what} must be within ±{MAX_ABS_VALUE:g}")
    return x


@dataclass(frozen=True, slots=True)
class QuerySpec:
    """One federated statistics query (see the module docstring)."""

    name: str
    tag: str
    columns: tuple[str, ...]
    bins: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    min_cell: int = 5
    noise_multiplier: float | None = None
    min_sites: int = 3  # the root's: publish only totals over this many sites
    delta: float = 1e-5  # the root's: δ at which ε is reported

    def __post_init__(self) -> None:
        check_name("query name", self.name)
        if self.name == EVALUATE:
            raise SpecError(f"query name {EVALUATE!r} is reserved")
        check_name("dataset tag", self.tag)
        if not 0 < len(self.columns) <= MAX_COLUMNS:
            raise SpecError(f"a query names 1 to {MAX_COLUMNS} columns")
        for c in self.columns:
            if not isinstance(c, str) or not 0 < len(c) <= MAX_NAME or _COLUMN_BAD.search(c):
                raise SpecError(f"column names are 1-{MAX_NAME} printable characters")
        if len(set(self.columns)) != len(self.columns):
            raise SpecError("a column is named twice")
        for col, edges in self.bins.items():
            if col not in self.columns:
                raise SpecError("bins name a column the query does not list")
            if not 2 <= len(edges) <= MAX_BINS + 1:
                raise SpecError(f"a histogram has 1 to {MAX_BINS} bins (2 to {MAX_BINS + 1} edges)")
            xs = [_bounded("a bin edge", e) for e in edges]
            if any(b <= a for a, b in itertools.pairwise(xs)):
                raise SpecError("bin edges must increase")
        for col, pair in self.bounds.items():
            if col not in self.columns:
                raise SpecError("bounds name a column the query does not list")
            if len(pair) != 2:
                raise SpecError("bounds are [lo, hi]")
            lo, hi = (_bounded("a bound", v) for v in pair)
            if not lo < hi:
                raise SpecError("bounds need lo < hi")
        if isinstance(self.min_cell, bool) or not isinstance(self.min_cell, int):
            raise SpecError("min_cell must be a whole number")
        if not MIN_CELL_FLOOR <= self.min_cell <= MAX_MIN_CELL:
            raise SpecError(f"min_cell must be in [{MIN_CELL_FLOOR}, {MAX_MIN_CELL}]")
        if self.noise_multiplier is not None:
            z = _finite("the noise multiplier", self.noise_multiplier)
            if not Z_MIN <= z <= Z_MAX:
                raise SpecError(f"the noise multiplier must be in [{Z_MIN:g}, {Z_MAX:g}]")
            if set(self.bounds) != set(self.columns):
                raise SpecError("with noise, every column needs bounds = [lo, hi]")

    # -- the wire
    def to_wire(self) -> dict[str, Any]:
        """The flat ``StatsRequest.spec`` (see the module docstring)."""
        out: dict[str, Any] = {"tag": self.tag, "min_cell": self.min_cell}
        if self.noise_multiplier is not None:
            out["z"] = float(self.noise_multiplier)
        for i, col in enumerate(self.columns):
            out[f"col.{i}"] = col
            for j, e in enumerate(self.bins.get(col, ())):
                out[f"edge.{i}.{j}"] = float(e)
            if col in self.bounds:
                out[f"lo.{i}"], out[f"hi.{i}"] = (float(v) for v in self.bounds[col])
        return out

    # -- DP calibration
    def touches(self) -> int:
        """How many released values one row can move (k of the module docstring)."""
        return 1 + sum(3 + (1 if c in self.bins else 0) for c in self.columns)

    def sensitivity(self, key: str) -> float:
        """How far one row moves the released value ``key`` (``n`` for the row count)."""
        if key == "n":
            return 1.0
        kind, idx = key.split(".", 1)
        if kind in ("count", "hist"):
            return 1.0
        lo, hi = self.bounds[self.columns[int(idx)]]
        if kind == "sum":
            return max(abs(lo), abs(hi))
        return max(lo * lo, hi * hi)  # sumsq

    def limits(self, i: int) -> tuple[float, float]:
        """Column ``i``'s bounds, ``±MAX_ABS_VALUE`` when it has none."""
        return tuple(self.bounds.get(self.columns[i], (-MAX_ABS_VALUE, MAX_ABS_VALUE)))  # type: ignore[return-value]

    def sigma(self, key: str) -> float:
        """The noise σ of released value ``key`` (0 without noise)."""
        if self.noise_multiplier is None:
            return 0.0
        return self.noise_multiplier * self.sensitivity(key) * math.sqrt(self.touches())


def parse_wire(query: str, spec: Mapping[str, Any]) -> QuerySpec:
    """A ``StatsRequest`` from a parent, checked strictly (``SpecError`` otherwise)."""
    check_name("query name", query)
    if not isinstance(spec, Mapping) or len(spec) > MAX_SPEC_KEYS:
        raise SpecError(f"a spec is a map of at most {MAX_SPEC_KEYS} keys")
    cols: dict[int, str] = {}
    edges: dict[int, dict[int, float]] = {}
    lo: dict[int, float] = {}
    hi: dict[int, float] = {}
    tag: object = None
    min_cell: object = None
    z: float | None = None
    for key, value in spec.items():
        if key == "tag":
            tag = value
            continue
        if key == "min_cell":
            min_cell = value
            continue
        if key == "z":
            z = _finite("z", value)
            continue
        m = _SPEC_KEY.match(key) if isinstance(key, str) else None
        if m is None:
            raise SpecError(
                "a spec key is not one of tag, min_cell, z, col.i, edge.i.j, lo.i, hi.i"
            )
        if m.group(1) == "col":
            if not isinstance(value, str):
                raise SpecError("col.i must be a string")
            cols[int(m.group(2))] = value
        elif m.group(1) in ("lo", "hi"):
            (lo if m.group(1) == "lo" else hi)[int(m.group(2))] = _finite(key, value)
        else:
            edges.setdefault(int(m.group(3)), {})[int(m.group(4))] = _finite("an edge", value)
    if sorted(cols) != list(range(len(cols))):
        raise SpecError("columns must be col.0, col.1, ... without gaps")
    if set(edges) - set(cols) or set(lo) - set(cols) or set(lo) != set(hi):
        raise SpecError("edges and bounds must belong to listed columns, lo and hi together")
    bins: dict[str, tuple[float, ...]] = {}
    for i, es in edges.items():
        if sorted(es) != list(range(len(es))):
            raise SpecError("edges must be edge.i.0, edge.i.1, ... without gaps")
        bins[cols[i]] = tuple(es[j] for j in range(len(es)))
    if not isinstance(min_cell, int) or isinstance(min_cell, bool):
        raise SpecError("min_cell must be a whole number")
    return QuerySpec(
        name=query,
        tag=check_name("dataset tag", tag),
        columns=tuple(cols[i] for i in range(len(cols))),
        bins=bins,
        bounds={cols[i]: (lo[i], hi[i]) for i in lo},
        min_cell=min_cell,
        noise_multiplier=z,
    )


# ------------------------------------------------------------------------- a site


@dataclass(frozen=True, slots=True)
class SiteAnswer:
    """What a site sends: ``n`` rows and ``values`` (keys of the module docstring)."""

    n: int
    values: Mapping[str, float]


def _column(frame: Any, name: str) -> np.ndarray[Any, np.dtype[np.float64]]:
    try:
        series = frame[name]
    except (KeyError, IndexError, TypeError):
        raise SpecError(f"the dataset has no column {name[:MAX_NAME]!r}", "bad_column") from None
    try:
        arr = np.asarray(series, dtype=np.float64)
    except (TypeError, ValueError):
        raise SpecError(f"column {name[:MAX_NAME]!r} is not numeric", "bad_column") from None
    if arr.ndim != 1:
        raise SpecError(f"column {name[:MAX_NAME]!r} is not one column", "bad_column")
    return arr


def compute_site(frame: Any, spec: QuerySpec, rng: np.random.Generator | None = None) -> SiteAnswer:
    """``spec`` over ``frame`` (a pandas DataFrame or anything indexable by column name
    giving numeric 1-d arrays): noise (when ``spec`` has a noise multiplier; ``rng``: the
    noise source, fresh OS entropy by default) then suppression. ``SpecError`` when a
    column is missing or not numeric; code ``too_few_rows`` (``SpecError`` too) when the
    dataset has fewer than ``min_cell`` rows."""
    noisy = spec.noise_multiplier is not None
    gen = rng if rng is not None else np.random.default_rng()
    arrays = [_column(frame, c) for c in spec.columns]
    n_rows = len(arrays[0]) if arrays else 0
    if any(len(a) != n_rows for a in arrays):
        raise SpecError("columns differ in length", "bad_column")

    def release(key: str, exact: float) -> float:
        s = spec.sigma(key)
        return float(exact + gen.normal(0.0, s)) if s > 0.0 else float(exact)

    n = release("n", n_rows)
    if n < spec.min_cell:
        raise SpecError(f"fewer than min_cell = {spec.min_cell} rows", "too_few_rows")
    values: dict[str, float] = {}
    for i, (col, arr) in enumerate(zip(spec.columns, arrays, strict=True)):
        x = arr[np.isfinite(arr)]  # missing (NaN) and infinite values are left out
        if col in spec.bounds:
            lo, hi = spec.bounds[col]
            x = np.clip(x, lo, hi)
        elif len(x) and float(np.max(np.abs(x))) > MAX_ABS_VALUE:
            raise SpecError(
                f"column {i} has values beyond ±{MAX_ABS_VALUE:g}: give it bounds", "bad_column"
            )
        count = release(f"count.{i}", len(x))
        if count < spec.min_cell:
            values[f"supp.{i}"] = 1.0
            continue
        total, squares = float(np.sum(x)), float(np.sum(x * x))
        moments = {
            f"count.{i}": count,
            f"sum.{i}": release(f"sum.{i}", total),
            f"sumsq.{i}": release(f"sumsq.{i}", squares),
        }
        edges = spec.bins.get(col)
        suppressed = False
        if edges is not None:
            cells, _ = np.histogram(x, bins=np.asarray(edges, dtype=np.float64))
            for j, c in enumerate(cells):
                v = release(f"hist.{i}.{j}", float(c))
                if v < spec.min_cell and (noisy or v > 0):
                    values[f"supp.{i}.{j}"] = 1.0
                    suppressed = True
                else:
                    values[f"hist.{i}.{j}"] = v
            # The values in no bin (bins narrower than the bounds or the data) are a cell
            # too: an exact count minus the released cells would give them away.
            outside = len(x) - int(cells.sum())
            suppressed = suppressed or 0 < outside < spec.min_cell
        if suppressed and not noisy:  # complementary suppression (the module docstring)
            values[f"supp.{i}"] = 1.0
        else:
            values.update(moments)
    return SiteAnswer(max(0, round(n)), values)


# ------------------------------------------------------------------------- the root


def check_values(spec: QuerySpec, n: int, values: Mapping[str, Any], max_rows: int) -> None:
    """A site's report for ``spec``, checked: known keys only, finite numbers, ``n`` at
    most ``max_rows`` (what the roster lets the site claim), every value in the range an
    honest site's could have and consistent with the others (the module docstring), each
    widened by ``NOISE_SLACK_SIGMAS`` σ under noise. ``SpecError`` naming the first
    problem."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= max_rows + _slack(spec, "n"):
        raise SpecError("n is out of range")
    if n < spec.min_cell:
        raise SpecError("n is under min_cell: the site should have refused")
    if not isinstance(values, Mapping) or len(values) > MAX_VALUE_KEYS:
        raise SpecError("too many values")
    noisy = spec.noise_multiplier is not None
    got: dict[str, float] = {}
    for key, raw in values.items():
        m = _VALUE_KEY.match(key) if isinstance(key, str) else None
        if m is None:
            raise SpecError("a value key is not one of count/sum/sumsq/hist/supp")
        v = _finite("a value", raw)
        kind = m.group(1) or m.group(3)
        i = int(m.group(2) or m.group(4))
        if i >= len(spec.columns):
            raise SpecError("a value names a column the query does not list")
        col = spec.columns[i]
        if m.group(5) is not None:
            edges = spec.bins.get(col, ())
            if int(m.group(5)) >= len(edges) - 1:
                raise SpecError("a histogram cell the query does not have")
        got[key] = v
        if kind == "supp":
            if v != 1.0:
                raise SpecError("supp.* is 1")
            continue
        slack = _slack(spec, key)
        if kind in ("count", "hist"):
            if not (noisy or v.is_integer()) or not -slack <= v <= n + slack:
                raise SpecError(f"{kind} is out of range")
            if v < spec.min_cell and (noisy or kind == "count" or v != 0):
                raise SpecError(f"{kind} is under min_cell: the site should have suppressed it")
        elif kind == "sum":
            top = max(abs(x) for x in spec.limits(i)) * n
            if not -top - slack <= v <= top + slack:
                raise SpecError("sum is out of range")
        elif not -slack <= v <= max(x * x for x in spec.limits(i)) * n + slack:
            raise SpecError("sumsq is out of range")
    for i in range(len(spec.columns)):
        _check_column(spec, i, n, got)


def _check_column(spec: QuerySpec, i: int, n: int, got: Mapping[str, float]) -> None:
    """Column ``i``'s values against each other (the module docstring)."""
    have = [f"{k}.{i}" in got for k in ("count", "sum", "sumsq")]
    if any(have) != all(have) or any(have) == (f"supp.{i}" in got):
        raise SpecError("a column needs count, sum and sumsq, or supp alone")
    noisy = spec.noise_multiplier is not None
    edges = spec.bins.get(spec.columns[i], ())
    cells = [got[f"hist.{i}.{j}"] for j in range(len(edges) - 1) if f"hist.{i}.{j}" in got]
    if any(f"hist.{i}.{j}" in got and f"supp.{i}.{j}" in got for j in range(len(edges) - 1)):
        raise SpecError("a histogram cell is both released and suppressed")
    rounding = 1.0 if noisy else 0.0  # a noisy n is rounded
    if all(have):
        count, total, squares = (got[f"{k}.{i}"] for k in ("count", "sum", "sumsq"))
        dc = _slack(spec, f"count.{i}")
        if count > n + dc + _slack(spec, "n") + rounding:
            raise SpecError("a column's count is above n")
        lo, hi = spec.limits(i)
        top = max(abs(lo), abs(hi))
        rel = 1e-9 * (abs(count) + 1.0)  # the sums' float rounding
        ds = _slack(spec, f"sum.{i}") + top * (dc + rel)
        if not lo * count - ds <= total <= hi * count + ds:
            raise SpecError("a column's sum is beyond its bounds times its count")
        dq = _slack(spec, f"sumsq.{i}") + top * top * (dc + rel)
        if not -dq <= squares <= top * top * count + dq:
            raise SpecError("a column's sum of squares is beyond its bounds times its count")
        cap = count + dc
    else:
        cap = n + _slack(spec, "n") + rounding
    if cells and math.fsum(cells) > cap + (len(edges) - 1) * _slack(spec, f"hist.{i}.0"):
        raise SpecError("a column's histogram holds more values than its count")


def _slack(spec: QuerySpec, key: str) -> float:
    return NOISE_SLACK_SIGMAS * spec.sigma(key)


def _total(xs: list[float]) -> float | None:
    """The exact sum of ``xs``, None when it is not finite."""
    try:
        t = math.fsum(xs)
    except (OverflowError, ValueError):
        return None
    return t if math.isfinite(t) else None


def aggregate(
    spec: QuerySpec, answers: Mapping[str, SiteAnswer], refused: Mapping[str, int] | None = None
) -> dict[str, Any] | None:
    """The published result over the sites' ``answers`` (checked ones), or None while
    fewer than ``spec.min_sites`` sites answered (nothing is published then). One pass over
    the answers; a figure that is not finite is left out (None)."""
    if len(answers) < spec.min_sites:
        return None
    total_n = sum(a.n for a in answers.values())
    by_key: dict[str, list[float]] = {}
    for a in answers.values():
        for key, v in a.values.items():
            by_key.setdefault(key, []).append(v)
    columns: dict[str, Any] = {}
    for i, col in enumerate(spec.columns):
        counts = by_key.get(f"count.{i}", [])
        sums, squares = by_key.get(f"sum.{i}", []), by_key.get(f"sumsq.{i}", [])
        entry: dict[str, Any] = {"sites": len(counts)}
        count = _total(counts)
        mean = std = None
        if (
            count is not None
            and len(counts) >= spec.min_sites
            and count >= spec.min_cell
            and len(sums) == len(squares) == len(counts)
        ):
            total, sq = _total(sums), _total(squares)
            if total is not None and sq is not None:
                mean = total / count
                var = sq / count - mean * mean
                std = math.sqrt(max(0.0, var)) if math.isfinite(var) else None
        if count is None or mean is None or not math.isfinite(mean):
            entry["suppressed"] = True
        else:
            entry.update(count=_rounded(count, spec), mean=mean, std=std, suppressed=False)
        edges = spec.bins.get(col)
        if edges is not None:
            cells: list[float | int | None] = []
            partial: list[int] = []
            for j in range(len(edges) - 1):
                got = by_key.get(f"hist.{i}.{j}", [])
                partial.append(len(by_key.get(f"supp.{i}.{j}", [])))
                cell = _total(got)
                ok = cell is not None and len(got) >= spec.min_sites and cell >= spec.min_cell
                cells.append(_rounded(cell, spec) if ok and cell is not None else None)
            entry["histogram"] = {
                "edges": list(edges),
                "counts": cells,
                "suppressed_at_sites": partial,
            }
        columns[col] = entry
    dp = None
    if spec.noise_multiplier is not None:
        dp = {
            "noise_multiplier": spec.noise_multiplier,
            "delta": spec.delta,
            "epsilon_per_site": gaussian_epsilon(spec.noise_multiplier, spec.delta),
            "unit": "one row of one site's dataset, this query",
        }
    return {
        "query": spec.name,
        "tag": spec.tag,
        "sites": len(answers),
        "n": total_n,
        "min_cell": spec.min_cell,
        "min_sites": spec.min_sites,
        "refused": dict(sorted((refused or {}).items())),
        "columns": columns,
        "dp": dp,
    }


def _rounded(x: float, spec: QuerySpec) -> float | int:
    return x if spec.noise_multiplier is not None else round(x)


# ------------------------------------------------------------------------- privacy


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(z: float, epsilon: float) -> float:
    """δ(ε) of the Gaussian mechanism with σ = z·Δ (Balle & Wang 2018, Theorem 8)."""
    a = 1.0 / (2.0 * z)
    first = _phi(a - epsilon * z)
    tail = _phi(-a - epsilon * z)
    second = 0.0 if tail == 0.0 else math.exp(min(epsilon + math.log(tail), 700.0))
    return max(0.0, first - second)


def gaussian_epsilon(z: float, delta: float) -> float:
    """The smallest ε for which one Gaussian mechanism of noise multiplier ``z`` is
    (ε, δ)-DP (the analytic Gaussian mechanism; bisection to 1e-9)."""
    if not (z > 0 and math.isfinite(z)) or not 0.0 < delta < 1.0:
        raise ValueError("need z > 0 and 0 < delta < 1")
    if gaussian_delta(z, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(z, hi) > delta:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if gaussian_delta(z, mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9:
            break
    return hi
