"""The privacy ledger: ε at δ equals dp-accounting's on the same events, budgets, records."""

from __future__ import annotations

import logging
import math
import sys

import dp_accounting as dpa
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.algorithms.dp.ledger import (
    LEDGER_FORMAT,
    RDP_ORDERS,
    LedgerError,
    PrivacyEvent,
    PrivacyLedger,
    require_accountant,
)

DELTA = 1e-5


def reference(events: list[PrivacyEvent], accountant: str) -> float:
    """dp-accounting itself, composing the same events in their order (a run of one event
    at once: PLD convolutions one by one cost a second or two each)."""
    acc = (
        dpa.rdp.RdpAccountant(list(RDP_ORDERS)) if accountant == "rdp" else dpa.pld.PLDAccountant()
    )
    runs: list[tuple[PrivacyEvent, int]] = []
    for e in events:
        if runs and runs[-1][0] == e:
            runs[-1] = (e, runs[-1][1] + 1)
        else:
            runs.append((e, 1))
    for e, count in runs:
        g = dpa.GaussianDpEvent(e.z)
        acc.compose(g if e.q is None else dpa.PoissonSampledDpEvent(e.q, g), count)
    return float(acc.get_epsilon(DELTA))


def history() -> list[PrivacyEvent]:
    return [PrivacyEvent(1.2, 0.1)] * 30 + [PrivacyEvent(2.0, None)] * 3 + [PrivacyEvent(1.2, 0.05)]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting_on_the_same_events(accountant: str) -> None:
    events = history()
    ledger = PrivacyLedger(accountant)
    assert ledger.epsilon(DELTA) == 0.0
    for v, e in enumerate(events, start=1):
        ledger.record(v, e)
    assert len(ledger) == len(events)
    # PLD: the ledger composes each distinct event at once, in its own order; both
    # discretise, so they agree to the discretisation.
    rel = 1e-9 if accountant == "rdp" else 1e-6
    assert ledger.epsilon(DELTA) == pytest.approx(reference(events, accountant), rel=rel)


@settings(max_examples=20, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.7, 1.0, 1.5, 4.0]),
            st.sampled_from([None, 0.01, 0.2, 1.0]),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_rdp_epsilon_matches_for_any_history(pairs: list[tuple[float, float | None]]) -> None:
    events = [PrivacyEvent(z, q) for z, q in pairs]
    ledger = PrivacyLedger("rdp")
    for v, e in enumerate(events):
        ledger.record(v, e)
    # q = 1.0 is the unsampled Gaussian
    ref = [PrivacyEvent(e.z, None if e.q == 1.0 else e.q) for e in events]
    assert ledger.epsilon(DELTA) == pytest.approx(reference(ref, "rdp"), rel=1e-9)


def test_epsilon_if_and_releases_left() -> None:
    ledger = PrivacyLedger("rdp")
    e = PrivacyEvent(1.0, 0.05)
    for v in range(10):
        ledger.record(v, e)
    nxt = ledger.epsilon_if(e, DELTA)
    assert nxt > ledger.epsilon(DELTA)
    left = ledger.releases_left(e, DELTA, 3.0)
    assert left > 0
    assert ledger.epsilon_if(e, DELTA, left) <= 3.0 < ledger.epsilon_if(e, DELTA, left + 1)
    assert ledger.releases_left(e, DELTA, ledger.epsilon(DELTA) * 0.5) == 0
    ledger.record(10, e)
    assert ledger.epsilon(DELTA) == pytest.approx(nxt, rel=1e-12)


def test_thousands_of_releases_are_cheap_and_exact() -> None:
    ledger = PrivacyLedger("rdp")
    e = PrivacyEvent(1.1, 0.02)
    for v in range(5000):
        ledger.record(v, e)
        ledger.epsilon(DELTA)  # what the aggregator asks after every release
    acc = dpa.rdp.RdpAccountant(list(RDP_ORDERS))
    acc.compose(dpa.PoissonSampledDpEvent(0.02, dpa.GaussianDpEvent(1.1)), 5000)
    assert ledger.epsilon(DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)


def test_integer_orders_log_no_convergence_warnings(caplog: pytest.LogCaptureFixture) -> None:
    # dp-accounting's default fractional orders warn for this event; ours do not.
    ledger = PrivacyLedger("rdp")
    with caplog.at_level(logging.WARNING):
        ledger.record(1, PrivacyEvent(0.8, 0.05))
        ledger.epsilon(DELTA)
    assert not [r for r in caplog.records if "converge" in r.getMessage()]


def test_records_round_trip() -> None:
    ledger = PrivacyLedger("rdp")
    for v, e in enumerate(history(), start=3):
        ledger.record(v, e)
    data = ledger.to_records()
    again = PrivacyLedger.from_records(data)
    assert again.releases == ledger.releases
    assert again.epsilon(DELTA) == ledger.epsilon(DELTA)


def good() -> dict[str, object]:
    return {"format": LEDGER_FORMAT, "releases": [{"version": 1, "z": 1.0, "q": None, "count": 1}]}


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(format="something/else"), "not a fedloom privacy ledger"),
        (lambda d: d.pop("format"), "not a fedloom privacy ledger"),
        (lambda d: d.update(releases="x"), "must be a list"),
        (lambda d: d["releases"].append({"version": 2, "z": 1.0}), "record 1: expected"),
        (lambda d: d["releases"].append({"version": 2, "z": -1.0, "q": None, "count": 1}), "z"),
        (lambda d: d["releases"].append({"version": 2, "z": 1.0, "q": 1.5, "count": 1}), "q"),
        (lambda d: d["releases"].append({"version": 2, "z": math.nan, "q": None, "count": 1}), "z"),
        (lambda d: d["releases"].append({"version": 1, "z": 1.0, "q": None, "count": 1}), "grow"),
        (
            lambda d: d["releases"].append({"version": True, "z": 1.0, "q": None, "count": 1}),
            "version",
        ),
        (lambda d: d["releases"].append({"version": 2, "z": 1.0, "q": None, "count": 0}), "count"),
        (lambda d: d["releases"].append({"version": 2, "z": "1", "q": None, "count": 1}), "z"),
    ],
)
def test_corrupt_or_foreign_records_are_refused(mutate: object, match: str) -> None:
    data = good()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(LedgerError, match=match):
        PrivacyLedger.from_records(data)
    with pytest.raises(LedgerError):
        PrivacyLedger.from_records([1, 2, 3])


def test_events_and_accountants_are_checked() -> None:
    with pytest.raises(LedgerError):
        PrivacyEvent(0.0)
    with pytest.raises(LedgerError):
        PrivacyEvent(1.0, 0.0)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyLedger("moments")
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger().epsilon(0.0)


def test_missing_extra_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedloom.cli import _missing_extra

    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError) as info:
        require_accountant()
    assert info.value.name == "dp_accounting"
    hint = _missing_extra(info.value)
    assert hint is not None and "pip install 'fedloom[privacy]'" in hint


def test_rdp_vectors_are_numbers() -> None:
    ledger = PrivacyLedger()
    ledger.record(0, PrivacyEvent(1.0))
    assert np.isfinite(ledger.epsilon(DELTA))
