"""The ``federation`` fixture: one instance per registered driver (see harness.DRIVERS)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conformance.harness import DRIVERS, Federation


@pytest.fixture(params=sorted(DRIVERS))
def federation(request: pytest.FixtureRequest) -> Iterator[Federation]:
    fed = DRIVERS[request.param]()
    try:
        yield fed
    finally:
        fed.close()
