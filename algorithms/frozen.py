"""A cheaper ``__init__`` for the frozen, slotted dataclasses made on every event.

``@dataclass(frozen=True)`` generates an ``__init__`` that sets each field with
``object.__setattr__(self, name, value)`` (its own ``__setattr__`` refuses), which looks the
name up on every call. In a slotted class each field is a member descriptor of the class,
and its ``__set__`` writes the slot directly: ``slot_init(cls)`` replaces the generated
``__init__`` with one that calls those, with the same parameters, defaults and default
factories, so the object is built exactly as before (still frozen: assignment still
raises ``FrozenInstanceError``), a third faster. The events and effects of
``algorithms.protocol`` are built several times per message a node handles (a simulation
at 100,000 sites builds millions).

A class it cannot rebuild exactly (not a slotted dataclass, keyword-only fields, a field
left out of ``__init__``, a ``__post_init__``) keeps its generated ``__init__``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["slot_init"]

T = TypeVar("T")


class _Factory:
    """The default of a parameter whose field has a ``default_factory``."""

    def __repr__(self) -> str:
        return "<factory>"  # as the generated __init__'s signature shows it


_FACTORY = _Factory()


def slot_init(cls: type[T]) -> type[T]:
    """Give ``cls`` (a frozen, slotted dataclass) an ``__init__`` that sets its slots
    through their descriptors; returns ``cls``."""
    if not dataclasses.is_dataclass(cls) or "__slots__" not in cls.__dict__:
        return cls
    if hasattr(cls, "__post_init__"):
        return cls
    params: list[str] = []
    body: list[str] = []
    scope: dict[str, Any] = {"_FACTORY": _FACTORY}
    for i, f in enumerate(dataclasses.fields(cls)):
        descriptor: Any = cls.__dict__.get(f.name)
        if not f.init or f.kw_only or not hasattr(descriptor, "__set__"):
            return cls
        if not f.name.isidentifier():  # dataclass fields are: never code from elsewhere
            return cls
        scope[f"_set{i}"] = descriptor.__set__
        if f.default is not dataclasses.MISSING:
            scope[f"_default{i}"] = f.default
            params.append(f"{f.name}=_default{i}")
        elif f.default_factory is not dataclasses.MISSING:
            scope[f"_factory{i}"] = f.default_factory
            params.append(f"{f.name}=_FACTORY")
            body.append(f"    if {f.name} is _FACTORY:")
            body.append(f"        {f.name} = _factory{i}()")
        else:
            params.append(f.name)
        body.append(f"    _set{i}(self, {f.name})")
    if not body:
        return cls  # no fields: nothing to set
    source = "\n".join([f"def __init__(self, {', '.join(params)}):", *body])
    exec(compile(source, f"<{cls.__qualname__}.__init__>", "exec"), scope)
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__
    init.__annotations__ = dict(getattr(cls.__init__, "__annotations__", {}))
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
