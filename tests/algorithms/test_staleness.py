import itertools
import math

import pytest

from fedloom.algorithms.staleness import constant, hinge, make_staleness, polynomial


def test_constant_is_one_for_every_staleness() -> None:
    s = constant()
    assert [s(t) for t in (0, 1, 100)] == [1.0, 1.0, 1.0]


def test_polynomial_matches_fedbuff_inverse_sqrt() -> None:
    s = polynomial()  # a = 0.5: FedBuff's 1/sqrt(1+tau)
    assert s(0) == 1.0
    assert s(3) == pytest.approx(0.5)
    assert s(8) == pytest.approx(1 / 3)
    assert polynomial(1.0)(4) == pytest.approx(0.2)


def test_polynomial_is_decreasing() -> None:
    s = polynomial(0.5)
    values = [s(t) for t in range(50)]
    assert all(a > b for a, b in itertools.pairwise(values))


def test_hinge_flat_then_hyperbolic() -> None:
    s = hinge(a=10.0, b=4.0)
    assert [s(t) for t in range(5)] == [1.0] * 5
    assert s(5) == pytest.approx(1 / 11)
    assert s(6) == pytest.approx(1 / 21)


def test_factory_builds_by_name_and_rejects_unknown() -> None:
    assert make_staleness("polynomial", {"a": 1.0})(1) == pytest.approx(0.5)
    assert make_staleness("constant")(7) == 1.0
    assert make_staleness("hinge", {"a": 1, "b": 0})(1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown staleness"):
        make_staleness("exponential")
    with pytest.raises(ValueError, match="bad parameters"):
        make_staleness("polynomial", {"b": 1})


def test_bad_parameters_and_negative_staleness_raise() -> None:
    with pytest.raises(ValueError):
        polynomial(-1.0)
    with pytest.raises(ValueError):
        hinge(1.0, -2.0)
    with pytest.raises(ValueError):
        polynomial()(-1)
    assert not math.isnan(polynomial(0.0)(10))
