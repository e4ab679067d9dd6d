"""What one lying site (or a root fishing for one row) can get out of federated
statistics: a site's claims are bounded and consistent, so a published mean stays within
the column's bounds and a histogram within the rows the sites may claim; a suppressed
cell cannot be recovered from the same answer."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.federation.analytics import (
    MAX_ABS_VALUE,
    QuerySpec,
    SiteAnswer,
    SpecError,
    aggregate,
    check_values,
    compute_site,
)

SPEC = QuerySpec(
    "q",
    "cohort",
    ("age",),
    bins={"age": tuple(float(x) for x in range(0, 101, 20))},
    bounds={"age": (0.0, 100.0)},
    min_cell=5,
    min_sites=2,
)


def test_one_answer_does_not_give_a_suppressed_cell_back() -> None:
    ages = [30.0] * 39 + [93.0]  # one patient aged 93
    spec = QuerySpec("q1", "cohort", ("age",), bins={"age": (0.0, 50.0, 120.0)})
    values = compute_site(pd.DataFrame({"age": ages}), spec).values
    assert values["hist.0.0"] == 39 and values["supp.0.1"] == 1.0
    # count - released cells would be the suppressed cell: the count is not released,
    # nor the sums that would give the row's value.
    assert values["supp.0"] == 1.0
    assert not {"count.0", "sum.0", "sumsq.0"} & set(values)
    check_values(spec, 40, values, max_rows=40)  # and the root takes it as it is


def test_a_noisy_answer_keeps_its_moments_next_to_suppressed_cells() -> None:
    spec = QuerySpec(
        "q",
        "t",
        ("age",),
        bins={"age": (0.0, 50.0, 100.0)},
        bounds={"age": (0.0, 100.0)},
        noise_multiplier=1.0,
    )
    import numpy as np

    values = compute_site(pd.DataFrame({"age": [30.0] * 40}), spec, np.random.default_rng(3)).values
    assert "supp.0.1" in values and "count.0" in values  # a difference is only noise


BASE = {"count.0": 20.0, "sum.0": 800.0, "sumsq.0": 32000.0, "hist.0.2": 20.0}


@pytest.mark.parametrize(
    ("n", "change"),
    [
        (20, {"count.0": 5.0, "sum.0": 10_000.0}),  # a mean of 2000 in [0, 100]
        (20, {"sum.0": -1.0}),  # below lo * count
        (20, {"sumsq.0": 100.0**2 * 20 + 1}),  # above hi² * count
        (20, {"count.0": 21.0}),  # more values than rows ...
        (20, {f"hist.0.{j}": 20.0 for j in range(5)}),  # ... or cells than values
        (20, {"count.0": 4.0}),  # a count the site should have suppressed
        (20, {"hist.0.1": 2.0}),  # a cell the site should have suppressed
        (20, {"supp.0.2": 1.0}),  # a cell both released and suppressed
    ],
)
def test_a_report_that_contradicts_itself_is_refused(n: int, change: dict[str, float]) -> None:
    check_values(SPEC, 20, BASE, max_rows=100)
    with pytest.raises(SpecError):
        check_values(SPEC, n, {**BASE, **change}, max_rows=100)


def test_bounds_and_unbounded_values_stay_where_no_sum_overflows() -> None:
    with pytest.raises(SpecError):
        QuerySpec("q", "t", ("a",), bounds={"a": (0.0, 1e300)})
    with pytest.raises(SpecError):
        QuerySpec("q", "t", ("a",), bins={"a": (0.0, 1e13)})
    raw = QuerySpec("q", "t", ("a",))
    with pytest.raises(SpecError) as info:
        compute_site(pd.DataFrame({"a": [1.0] * 9 + [2 * MAX_ABS_VALUE]}), raw)
    assert info.value.code == "bad_column"
    # What a site may claim for a column without bounds: at most ±MAX_ABS_VALUE per value.
    with pytest.raises(SpecError):
        check_values(raw, 10, {"count.0": 10.0, "sum.0": 1.7e308, "sumsq.0": 1.0}, 10)


def _claims() -> Any:
    """A site's report: numbers anywhere around the honest range (many are lies)."""
    cell = st.one_of(st.none(), st.sampled_from([0.0, 5.0, 8.0, 20.0, 40.0]))
    return st.fixed_dictionaries(
        {
            "n": st.integers(5, 30),
            "count.0": st.integers(0, 60).map(float),
            "sum.0": st.floats(-500, 6000),
            "sumsq.0": st.floats(-100, 6e5),
            **{f"hist.0.{j}": cell for j in range(5)},
        }
    )


@settings(max_examples=300, deadline=None)
@given(claims=st.lists(_claims(), min_size=2, max_size=4))
def test_whatever_passes_the_checks_publishes_figures_within_the_bounds(
    claims: list[dict[str, Any]],
) -> None:
    answers: dict[str, SiteAnswer] = {}
    for i, c in enumerate(claims):
        n = c.pop("n")
        values = {k: v for k, v in c.items() if v is not None}
        try:
            check_values(SPEC, n, values, max_rows=30)
        except SpecError:
            continue
        answers[f"s{i}"] = SiteAnswer(n, values)
    result = aggregate(SPEC, answers)
    if result is None:
        return
    col = result["columns"]["age"]
    if not col["suppressed"]:
        assert -1e-6 <= col["mean"] <= 100.0 + 1e-6  # the float rounding allowed for
        assert math.isfinite(col["std"]) and col["std"] <= 100.0
        assert col["count"] <= result["n"]
    cells = [c for c in col["histogram"]["counts"] if c is not None]
    assert sum(cells) <= result["n"]
