"""Plain specs for the things a topology is made of: sites (hospitals, data centres) and links.

Both are frozen, slotted and validated on construction; numeric fields are normalised to
``float`` (``int`` for ``n_examples``) so that a spec compares equal to its serialised round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def _number(owner: str, name: str, value: object) -> float:
    if type(value) is float:  # the common case, checked first (specs are built by the 100,000)
        if math.isnan(value):
            raise ValueError(f"{owner}.{name} must not be NaN")
        return value
    # bool is an int subclass: refuse it so `uplink_bps=True` is not silently 1 bit/s.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{owner}.{name} must not be NaN")
    return number


def _positive(owner: str, name: str, value: object, *, allow_inf: bool = False) -> float:
    number = _number(owner, name, value)
    if number <= 0.0 or (math.isinf(number) and not allow_inf):
        raise ValueError(f"{owner}.{name} must be a positive finite number, got {value!r}")
    return number


def _non_negative(owner: str, name: str, value: object) -> float:
    number = _number(owner, name, value)
    if number < 0.0 or math.isinf(number):
        raise ValueError(f"{owner}.{name} must be a non-negative finite number, got {value!r}")
    return number


def _name(owner: str, name: str, value: object) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise ValueError(
            f"{owner}.{name} must be a non-empty string without surrounding spaces, got {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class Site:
    """One machine that takes part: a hospital site, or the data centre hosting the root.

    ``access_latency_s`` is the access network's contribution to every round trip this site
    makes (see ``WanModel.rtt``). ``inbound`` says whether the site accepts inbound
    connections; hospitals usually do not (they dial out only).
    """

    id: str
    region: str
    n_examples: int = 0
    compute_speed: float = 1.0
    uplink_bps: float = 100e6
    downlink_bps: float = 100e6
    access_latency_s: float = 0.005
    inbound: bool = False

    def __post_init__(self) -> None:
        _name("Site", "id", self.id)
        _name("Site", "region", self.region)
        if isinstance(self.n_examples, bool) or not isinstance(self.n_examples, int):
            raise ValueError(f"Site.n_examples must be an int, got {self.n_examples!r}")
        if self.n_examples < 0:
            raise ValueError(f"Site.n_examples must be >= 0, got {self.n_examples}")
        if not isinstance(self.inbound, bool):
            raise ValueError(f"Site.inbound must be a bool, got {self.inbound!r}")
        set_ = object.__setattr__
        set_(self, "compute_speed", _positive("Site", "compute_speed", self.compute_speed))
        set_(self, "uplink_bps", _positive("Site", "uplink_bps", self.uplink_bps))
        set_(self, "downlink_bps", _positive("Site", "downlink_bps", self.downlink_bps))
        set_(
            self,
            "access_latency_s",
            _non_negative("Site", "access_latency_s", self.access_latency_s),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "region": self.region,
            "n_examples": self.n_examples,
            "compute_speed": self.compute_speed,
            "uplink_bps": self.uplink_bps,
            "downlink_bps": self.downlink_bps,
            "access_latency_s": self.access_latency_s,
            "inbound": self.inbound,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Site:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Site: unknown field(s) {sorted(unknown)}")
        for required in ("id", "region"):
            if required not in data:
                raise ValueError(f"Site: missing field {required!r} in {data!r}")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Link:
    """A directed link between two nodes: one-way latency, bottleneck bandwidth, loss rate.

    ``bandwidth_bps`` may be ``math.inf`` for a loopback link (two nodes on one machine).
    """

    latency_s: float
    bandwidth_bps: float
    loss: float = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "latency_s", _non_negative("Link", "latency_s", self.latency_s))
        set_(
            self,
            "bandwidth_bps",
            _positive("Link", "bandwidth_bps", self.bandwidth_bps, allow_inf=True),
        )
        loss = _number("Link", "loss", self.loss)
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"Link.loss must be in [0, 1), got {self.loss!r}")
        set_(self, "loss", loss)
