"""Strict, path-aware reading of TOML tables into typed values.

Every accessor names the offending field in its error (``arms[1].training.lr: expected a
number > 0, got 'fast'``) and ``finish()`` rejects unknown keys with a did-you-mean hint,
so a typo in a scenario file is reported instead of silently ignored.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file is wrong; the message names the field and what is expected."""


_MISSING: Any = object()


class Table:
    """A view of one TOML table that records which keys were read."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'file'}: expected a table, got {_show(data)}")
        self._data = data
        self._path = path
        self._seen: set[str] = set()

    # -- plumbing -----------------------------------------------------------------
    def where(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def has(self, key: str) -> bool:
        return key in self._data

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key in self._data:
            return self._data[key]
        if default is _MISSING:
            raise self.missing(key)
        return default

    def missing(self, key: str, what: str = "required field is missing") -> ConfigError:
        """``key`` is absent: a key written instead that is close to it is named (a typo
        read as "missing" alone sends the reader looking for a field that is there)."""
        near = difflib.get_close_matches(key, [k for k in self._data if k != key], n=1)
        hint = f" (found {near[0]!r}: did you mean {key!r}?)" if near else ""
        return ConfigError(f"{self.where(key)}: {what}{hint}")

    def fail(self, key: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(f"{self.where(key)}: expected {expected}, got {_show(got)}")

    # -- typed accessors ---------------------------------------------------------
    def text(self, key: str, default: Any = _MISSING, choices: Sequence[str] | None = None) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        if choices is not None and value not in choices:
            hint = difflib.get_close_matches(value, list(choices), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"{self.where(key)}: {value!r} is not one of {', '.join(choices)}{extra}"
            )
        return value

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        min: float | None = None,
        max: float | None = None,
        exclusive_min: bool = False,
    ) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, "a number", value)
        self._check_range(key, float(value), min, max, exclusive_min)
        if float(value) in (float("inf"), float("-inf")):  # no field means "unbounded" by inf
            raise ConfigError(f"{self.where(key)}: expected a finite number, got {value}")
        return float(value)

    def integer(
        self, key: str, default: Any = _MISSING, *, min: int | None = None, max: int | None = None
    ) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, "a whole number", value)
        self._check_range(key, value, min, max, False)
        return value

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def array(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, list):
            raise self.fail(key, "a list", value)
        return value

    def table(self, key: str, default: Any = _MISSING) -> Table:
        value = self._get(key, {} if default is _MISSING else default)
        if not isinstance(value, Mapping):
            raise self.fail(key, "a table", value)
        return Table(value, self.where(key))

    def raw(self, key: str, default: Any = None) -> Any:
        return self._get(key, default)

    def _check_range(
        self, key: str, value: float, lo: float | None, hi: float | None, exclusive_lo: bool
    ) -> None:
        if value != value:  # NaN passes every comparison below
            raise ConfigError(f"{self.where(key)}: expected a number, got nan")
        if lo is not None and (value < lo or (exclusive_lo and value == lo)):
            op = ">" if exclusive_lo else ">="
            raise ConfigError(f"{self.where(key)}: expected a number {op} {lo}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(f"{self.where(key)}: expected a number <= {hi}, got {value}")

    def finish(self) -> None:
        """Reject keys nobody read: they are typos or fields this version does not know."""
        unknown = [k for k in self._data if k not in self._seen]
        if not unknown:
            return
        key = unknown[0]
        hint = difflib.get_close_matches(key, sorted(self._seen), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        known = ", ".join(sorted(self._seen)) or "none"
        raise ConfigError(f"{self.where(key)}: unknown field{extra}; known fields: {known}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
