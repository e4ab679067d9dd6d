"""Federated statistics, the pure part: spec parsing (hostile specs are refused, never
crash), per-site suppression and noise calibration, the root's checks and aggregation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from fedloom.federation.analytics import (
    MIN_CELL_FLOOR,
    QuerySpec,
    SiteAnswer,
    SpecError,
    aggregate,
    check_values,
    compute_site,
    gaussian_epsilon,
    parse_wire,
)

SPEC = QuerySpec(
    "vitals",
    "cohort",
    ("age", "bmi"),
    bins={"age": (0.0, 20.0, 40.0, 60.0, 80.0)},
    bounds={"age": (0.0, 100.0), "bmi": (10.0, 50.0)},
    min_cell=5,
)


def frame(ages: list[float], bmis: list[float] | None = None) -> pd.DataFrame:
    return pd.DataFrame({"age": ages, "bmi": bmis if bmis is not None else [25.0] * len(ages)})


def test_a_spec_travels_flat_and_parses_back_to_itself() -> None:
    wire = SPEC.to_wire()
    assert all(isinstance(v, str | int | float) for v in wire.values())
    back = parse_wire("vitals", wire)
    assert (back.tag, back.columns, back.min_cell) == (SPEC.tag, SPEC.columns, SPEC.min_cell)
    assert dict(back.bins) == dict(SPEC.bins) and dict(back.bounds) == dict(SPEC.bounds)


@pytest.mark.parametrize(
    "change",
    [
        {"min_cell": 1},  # below the floor every site keeps
        {"min_cell": True},
        {"tag": "../../etc"},
        {"col.1": "age"},  # a column twice
        {"col.5": "gap"},  # col.2 .. col.4 missing
        {"edge.0.1": -5.0},  # edges must increase
        {"edge.3.0": 1.0},  # a column the query does not list
        {"lo.1": 60.0},  # lo >= hi
        {"hi.0": None},
        {"z": 0.01},  # below the smallest noise multiplier
        {"shell": "rm -rf"},
        {"col.0": "a\nb"},
    ],
)
def test_hostile_specs_are_refused(change: dict[str, Any]) -> None:
    wire = {**SPEC.to_wire(), **change}
    with pytest.raises(SpecError):
        parse_wire("vitals", wire)


def test_noise_without_bounds_for_every_column_is_refused() -> None:
    wire = {**SPEC.to_wire(), "z": 1.0}
    del wire["lo.1"], wire["hi.1"]
    with pytest.raises(SpecError, match="bounds"):
        parse_wire("vitals", wire)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
)
_keys = st.one_of(
    st.sampled_from(["tag", "min_cell", "z", "col.0", "col.1", "edge.0.0", "edge.0.1", "lo.0"]),
    st.from_regex(r"(col|lo|hi)\.[0-9]{1,4}", fullmatch=True),
    st.from_regex(r"edge\.[0-9]{1,4}\.[0-9]{1,4}", fullmatch=True),
    st.text(max_size=20),
)


@settings(max_examples=150, deadline=None)
@given(query=st.text(max_size=80), spec=st.dictionaries(_keys, _scalars, max_size=30))
def test_any_spec_parses_or_is_refused_cleanly(query: str, spec: dict[str, Any]) -> None:
    try:
        parsed = parse_wire(query, spec)
    except SpecError:
        return
    assert parse_wire(query, parsed.to_wire()) == parsed  # what parses is a fixed point


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=-5, max_value=10**7),
    values=st.dictionaries(
        st.one_of(
            st.from_regex(r"(count|sum|sumsq|supp)\.[0-2]", fullmatch=True),
            st.from_regex(r"(hist|supp)\.[0-2]\.[0-5]", fullmatch=True),
            st.text(max_size=10),
        ),
        st.one_of(st.floats(), st.integers(), st.booleans(), st.text(max_size=5)),
        max_size=20,
    ),
)
def test_any_report_is_checked_without_crashing(n: int, values: dict[str, Any]) -> None:
    try:
        check_values(SPEC, n, values, max_rows=1000)
    except SpecError:
        return
    assert 0 <= n <= 1000
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in values.values())


def test_small_cells_are_suppressed_at_the_site() -> None:
    ages = [5.0] * 7 + [25.0] * 2 + [45.0] * 6  # 2 people in [20, 40): suppressed
    answer = compute_site(frame(ages), SPEC)
    assert answer.n == 15
    assert answer.values["hist.0.0"] == 7 and answer.values["hist.0.2"] == 6
    assert "hist.0.1" not in answer.values and answer.values["supp.0.1"] == 1.0
    assert answer.values["hist.0.3"] == 0  # an empty cell discloses nobody
    # Complementary suppression: count - released cells would give the suppressed cell.
    assert answer.values["supp.0"] == 1.0
    assert not any(k in answer.values for k in ("count.0", "sum.0", "sumsq.0"))
    check_values(SPEC, answer.n, answer.values, max_rows=15)


def test_values_outside_the_bins_are_a_cell_too() -> None:
    """SPEC's bins end at 80, its bounds at 100: one patient of 90 falls in no bin. An
    exact answer that released the count and every cell would give that patient away
    (count - cells = 1): the values outside the bins are a cell, suppressed as any."""
    ages = [5.0] * 7 + [45.0] * 6 + [90.0]
    answer = compute_site(frame(ages), SPEC)
    released = sum(v for k, v in answer.values.items() if k.startswith("hist.0."))
    if "count.0" in answer.values:
        outside = answer.values["count.0"] - released
        assert outside == 0 or outside >= SPEC.min_cell, answer.values
    assert answer.values["supp.0"] == 1.0
    check_values(SPEC, answer.n, answer.values, max_rows=14)
    # As many outside as min_cell: nobody is singled out, the moments are released.
    answer = compute_site(frame([5.0] * 7 + [45.0] * 6 + [90.0] * 5), SPEC)
    assert answer.values["count.0"] == 18 and "supp.0" not in answer.values


def test_a_column_with_too_few_values_sends_only_its_flag() -> None:
    answer = compute_site(frame([30.0] * 10, [20.0, 21.0] + [math.nan] * 8), SPEC)
    assert answer.values["supp.1"] == 1.0
    assert not any(k in answer.values for k in ("count.1", "sum.1", "sumsq.1"))


def test_a_dataset_under_min_cell_rows_is_refused() -> None:
    with pytest.raises(SpecError) as info:
        compute_site(frame([30.0] * 4), SPEC)
    assert info.value.code == "too_few_rows"


def test_a_missing_or_text_column_is_a_bad_column() -> None:
    with pytest.raises(SpecError) as info:
        compute_site(pd.DataFrame({"age": [1.0] * 9}), SPEC)
    assert info.value.code == "bad_column"
    with pytest.raises(SpecError) as info:
        compute_site(pd.DataFrame({"age": ["x"] * 9, "bmi": [1.0] * 9}), SPEC)
    assert info.value.code == "bad_column"


def test_values_are_clipped_to_the_bounds() -> None:
    answer = compute_site(frame([500.0] * 10), SPEC)
    assert answer.values["sum.0"] == 10 * 100.0  # clipped to hi


def test_noise_is_calibrated_per_value_to_one_gaussian_mechanism() -> None:
    spec = QuerySpec(
        "vitals",
        "cohort",
        ("age",),
        bins={"age": (0.0, 50.0, 100.0)},
        bounds={"age": (-20.0, 100.0)},
        noise_multiplier=2.0,
    )
    k = spec.touches()
    assert k == 1 + 4  # n; count, sum, sumsq and one histogram cell
    assert spec.sigma("n") == pytest.approx(2.0 * math.sqrt(k))
    assert spec.sigma("sum.0") == pytest.approx(2.0 * 100.0 * math.sqrt(k))
    assert spec.sigma("sumsq.0") == pytest.approx(2.0 * 100.0**2 * math.sqrt(k))
    ages = [10.0] * 40 + [70.0] * 60
    rng = np.random.default_rng(7)
    draws = [compute_site(frame(ages), spec, rng) for _ in range(400)]
    counts = np.array([a.values["count.0"] for a in draws])
    sums = np.array([a.values["sum.0"] for a in draws])
    # The empirical noise matches the calibration (400 draws: 15 % on the std).
    assert counts.mean() == pytest.approx(100.0, abs=4 * spec.sigma("count.0") / 20)
    assert counts.std() == pytest.approx(spec.sigma("count.0"), rel=0.15)
    assert sums.std() == pytest.approx(spec.sigma("sum.0"), rel=0.15)
    assert sums.mean() == pytest.approx(40 * 10 + 60 * 70, abs=4 * spec.sigma("sum.0") / 20)
    for a in draws[:20]:
        check_values(spec, a.n, a.values, max_rows=100)  # noisy honest answers pass


def test_the_root_refuses_reports_no_honest_site_could_send() -> None:
    good = compute_site(frame([5.0] * 10 + [45.0] * 10), SPEC)
    check_values(SPEC, good.n, good.values, max_rows=20)
    bad: list[tuple[int, dict[str, Any]]] = [
        (21, dict(good.values)),  # more rows than the roster lets it claim
        (20, {**good.values, "count.0": 25.0}),  # more values than rows
        (20, {**good.values, "hist.0.0": 10.5}),  # a fractional exact count
        (20, {**good.values, "sum.0": 1e9}),  # beyond bounds x count
        (20, {**good.values, "hist.0.9": 1.0}),  # a cell the query lacks
        (20, {**good.values, "count.7": 1.0}),  # a column the query lacks
        (20, {k: v for k, v in good.values.items() if k != "sum.0"}),  # half a column
        (20, {**good.values, "note": 1.0}),
        (2, {}),  # under min_cell: the site should have refused
    ]
    for n, values in bad:
        with pytest.raises(SpecError):
            check_values(SPEC, n, values, max_rows=20)


def answers(*ages: list[float]) -> dict[str, SiteAnswer]:
    return {f"s{i}": compute_site(frame(a), SPEC) for i, a in enumerate(ages)}


def test_nothing_is_published_below_min_sites() -> None:
    two = answers([5.0] * 10, [45.0] * 10)
    assert aggregate(SPEC, two) is None


def test_the_root_publishes_pooled_moments_and_safe_cells() -> None:
    a, b, c = [5.0] * 10 + [25.0] * 3, [45.0] * 8 + [25.0] * 6, [65.0] * 6 + [25.0] * 2
    result = aggregate(SPEC, answers(a, b, c), {"dataset_missing": 1})
    assert result is not None
    pooled = np.array(a + b + c)
    col = result["columns"]["age"]
    assert result["n"] == len(pooled) and result["sites"] == 3
    # s0 and s2 suppressed a cell of age, so they left its moments out too: one site's
    # are not published.
    assert col["suppressed"] is True and col["sites"] == 1 and "mean" not in col
    bmi = result["columns"]["bmi"]  # no histogram, nothing suppressed: pooled moments
    assert bmi["count"] == len(pooled) and bmi["mean"] == pytest.approx(25.0)
    assert bmi["std"] == pytest.approx(0.0, abs=1e-6)
    hist = col["histogram"]
    # [20, 40): 3 + 6 + 2 people, but s0's 3 and s2's 2 were suppressed at the sites; the
    # cell reported only by s1 (one site) is not published.
    assert hist["suppressed_at_sites"] == [0, 2, 0, 0]
    assert hist["counts"][1] is None
    # Every site reported [0, 20) (10, 0, 0): a total of 10 from three sites is published.
    assert hist["counts"][0] == 10
    assert result["refused"] == {"dataset_missing": 1}
    assert result["dp"] is None


def test_a_noisy_result_carries_its_epsilon() -> None:
    spec = QuerySpec("q", "t", ("age",), bounds={"age": (0.0, 100.0)}, noise_multiplier=1.0)
    rng = np.random.default_rng(1)
    got = {f"s{i}": compute_site(frame([40.0] * 200), spec, rng) for i in range(3)}
    result = aggregate(spec, got)
    assert result is not None and result["dp"]["noise_multiplier"] == 1.0
    assert result["dp"]["epsilon_per_site"] == pytest.approx(gaussian_epsilon(1.0, 1e-5))


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_epsilon_is_the_analytic_gaussian_mechanism(z: float, delta: float) -> None:
    eps = gaussian_epsilon(z, delta)
    # Balle & Wang (2018), Theorem 8, evaluated independently with scipy at the answer.
    d = norm.cdf(1 / (2 * z) - eps * z) - math.exp(eps) * norm.cdf(-1 / (2 * z) - eps * z)
    assert d == pytest.approx(delta, rel=1e-4)
    assert gaussian_epsilon(z * 2, delta) < eps  # more noise, less ε


def test_min_cell_floor_holds_in_the_config_constructor_too() -> None:
    with pytest.raises(SpecError):
        QuerySpec("q", "t", ("a",), min_cell=MIN_CELL_FLOOR - 1)
    with pytest.raises(SpecError, match="reserved"):
        QuerySpec("evaluate", "t", ("a",))


_edges = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=8, unique=True).map(
    lambda xs: tuple(sorted(xs))
)


@st.composite
def valid_specs(draw: st.DrawFn) -> QuerySpec:
    names = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=12)
    columns = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    bins = {c: draw(_edges) for c in columns if draw(st.booleans())}
    noisy = draw(st.booleans())
    bounds = {}
    for c in columns:
        if noisy or draw(st.booleans()):
            lo = draw(st.floats(-1e3, 1e3))
            bounds[c] = (lo, lo + draw(st.floats(0.5, 1e3)))
    return QuerySpec(
        "q",
        "t",
        tuple(columns),
        bins=bins,
        bounds=bounds,
        min_cell=draw(st.integers(MIN_CELL_FLOOR, 50)),
        noise_multiplier=draw(st.floats(0.5, 5.0)) if noisy else None,
    )


@settings(max_examples=150, deadline=None)
@given(spec=valid_specs(), seed=st.integers(0, 2**32 - 1), rows=st.integers(0, 60))
def test_any_valid_spec_round_trips_and_any_table_gives_a_report_the_root_accepts(
    spec: QuerySpec, seed: int, rows: int
) -> None:
    assert parse_wire("q", spec.to_wire()) == spec
    rng = np.random.default_rng(seed)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, 1e6, -1e6])
    table = pd.DataFrame(
        {
            c: np.where(
                rng.random(rows) < 0.2, rng.choice(specials, rows), rng.normal(0, 100, rows)
            )
            for c in spec.columns
        }
    )
    try:
        answer = compute_site(table, spec, rng)
    except SpecError as exc:
        assert exc.code in ("too_few_rows", "bad_column")
        return
    assert all(math.isfinite(v) for v in answer.values.values())
    check_values(spec, answer.n, answer.values, max_rows=rows)  # an honest site passes
