"""``Table``: a required field that is missing while a near spelling of it is present names
that spelling (``target`` for ``targets``), not just the missing field."""

from __future__ import annotations

import pytest

from fedloom.federation.config_reader import ConfigError, Table


def test_a_missing_required_field_names_its_misspelling() -> None:
    t = Table({"kind": "kill", "target": ["root"]}, "fault[0]")
    t.text("kind")
    with pytest.raises(ConfigError) as info:
        t.array("targets")
    assert str(info.value) == (
        "fault[0].targets: required field is missing (found 'target': did you mean 'targets'?)"
    )


def test_a_missing_field_with_nothing_like_it_says_only_that() -> None:
    with pytest.raises(ConfigError) as info:
        Table({"kind": "kill"}, "").number("duration_s")
    assert str(info.value) == "duration_s: required field is missing"
