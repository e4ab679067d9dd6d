"""``slot_init``: the same constructor as the generated one, cheaper, still frozen."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from fedloom.algorithms import protocol
from fedloom.algorithms.frozen import slot_init
from fedloom.algorithms.incorporation import Contribution


def _pair() -> tuple[type, type]:
    """The same class twice: with its generated __init__, and after slot_init."""

    def make() -> type:
        @dataclass(frozen=True, slots=True)
        class Item:
            name: str
            value: float = 1.0
            labels: Mapping[str, str] | None = None
            extra: dict[str, int] = field(default_factory=dict)

        return Item

    return make(), slot_init(make())


def test_the_same_signature_objects_and_errors() -> None:
    plain, fast = _pair()
    assert str(inspect.signature(plain.__init__)) == str(inspect.signature(fast.__init__))
    for args, kwargs in [(("a",), {}), (("a", 2.0, {"k": "v"}), {}), ((), {"name": "b"})]:
        a, b = plain(*args, **kwargs), fast(*args, **kwargs)
        assert dataclasses.astuple(a) == dataclasses.astuple(b)
    assert fast("a").extra is not fast("a").extra  # a fresh default per object
    for args, kwargs in [((), {}), (("a", 1.0, None, {}, 5), {}), (("a",), {"nope": 1})]:
        with pytest.raises(TypeError):
            plain(*args, **kwargs)
        with pytest.raises(TypeError):
            fast(*args, **kwargs)


def test_still_frozen_comparable_hashable_and_picklable() -> None:
    m = protocol.Metric("update_applied", 2.0, {"src": "s"})
    assert m == protocol.Metric("update_applied", 2.0, {"src": "s"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.value = 3.0  # type: ignore[misc]
    assert hash(protocol.Send("p", None)) == hash(protocol.Send("p", None))  # type: ignore[arg-type]
    assert pickle.loads(pickle.dumps(m)) == m
    assert dataclasses.replace(m, value=5.0).value == 5.0
    assert protocol.TrainResult({}, 3).metrics == {}


def test_the_protocol_events_and_effects_use_it() -> None:
    for cls in (protocol.Received, protocol.Send, protocol.Metric, protocol.Persist, Contribution):
        assert cls.__init__.__code__.co_filename.startswith("<"), cls
        assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"


def test_classes_it_cannot_rebuild_exactly_keep_their_init() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class KwOnly:
        a: int = field(kw_only=True)

    for cls in (NoSlots, PostInit, KwOnly):
        before = cls.__init__
        assert slot_init(cls).__init__ is before
