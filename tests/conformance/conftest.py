"""The ``federation`` fixture: one instance per registered driver (see harness.DRIVERS).

Every conformance test is bounded: 60 s each (a case takes a few seconds on any driver;
the whole directory well under 90 s on 2 cores)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance.harness import DRIVERS, Federation

HERE = Path(__file__).parent
CASE_TIMEOUT_S = 60


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(CASE_TIMEOUT_S))


@pytest.fixture(params=sorted(DRIVERS))
def federation(request: pytest.FixtureRequest) -> Iterator[Federation]:
    fed = DRIVERS[request.param]()
    try:
        yield fed
    finally:
        fed.close()
