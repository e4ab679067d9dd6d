"""A compact wide-area latency model: round trips from region pairs plus per-site access latency.

Storing one RTT per *region pair* (not per site pair) keeps the model O(regions²) in memory, so
a 10,000-site topology never needs a 10,000 × 10,000 matrix. ``rtt_matrix`` builds the dense
matrix only for the small populations where clustering needs it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedloom.topology.specs import Site

# Above this many sites a dense float64 RTT matrix (n² × 8 bytes) stops being "small".
MAX_DENSE_SITES = 5_000

# Speed of light in fibre, km/s (refractive index ≈ 1.47).
FIBRE_KM_PER_S = 204_000.0

# A few reference cities (latitude, longitude in degrees) for quick scenario building.
CITY_COORDS: dict[str, tuple[float, float]] = {
    "london": (51.507, -0.128),
    "paris": (48.857, 2.352),
    "frankfurt": (50.110, 8.682),
    "amsterdam": (52.370, 4.895),
    "madrid": (40.417, -3.704),
    "milan": (45.464, 9.190),
    "stockholm": (59.329, 18.069),
    "new-york": (40.713, -74.006),
    "chicago": (41.878, -87.630),
    "san-francisco": (37.775, -122.419),
    "sao-paulo": (-23.551, -46.633),
    "tokyo": (35.676, 139.650),
    "singapore": (1.352, 103.820),
    "sydney": (-33.869, 151.209),
    "mumbai": (19.076, 72.878),
    "johannesburg": (-26.204, 28.047),
}


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def _rtt_value(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"WanModel.{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0.0:
        raise ValueError(f"WanModel.{name} must be a non-negative finite number, got {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class WanModel:
    """Round-trip times between regions; pairs not listed fall back to the defaults.

    ``region_rtt`` is symmetric: ``(a, b)`` and ``(b, a)`` are the same entry (giving both
    with different values is an error). An ``(r, r)`` entry overrides ``default_intra_rtt_s``
    for region ``r``. ``loss`` is the packet-loss rate applied to every WAN link.
    """

    region_rtt: Mapping[tuple[str, str], float] = field(default_factory=dict, hash=False)
    default_intra_rtt_s: float = 0.01
    default_inter_rtt_s: float = 0.08
    loss: float = 0.0

    def __post_init__(self) -> None:
        canonical: dict[tuple[str, str], float] = {}
        for key, value in self.region_rtt.items():
            if (
                not isinstance(key, tuple)
                or len(key) != 2
                or not all(isinstance(r, str) and r for r in key)
            ):
                raise ValueError(f"WanModel.region_rtt keys must be (region, region), got {key!r}")
            pair = _pair(key[0], key[1])
            rtt = _rtt_value(f"region_rtt[{key!r}]", value)
            if pair in canonical and canonical[pair] != rtt:
                raise ValueError(
                    f"WanModel.region_rtt gives two different RTTs for {pair}: "
                    f"{canonical[pair]} and {rtt}"
                )
            canonical[pair] = rtt
        set_ = object.__setattr__
        set_(self, "region_rtt", dict(sorted(canonical.items())))
        set_(
            self, "default_intra_rtt_s", _rtt_value("default_intra_rtt_s", self.default_intra_rtt_s)
        )
        set_(
            self, "default_inter_rtt_s", _rtt_value("default_inter_rtt_s", self.default_inter_rtt_s)
        )
        loss = _rtt_value("loss", self.loss)
        if loss >= 1.0:
            raise ValueError(f"WanModel.loss must be in [0, 1), got {self.loss!r}")
        set_(self, "loss", loss)

    def region_rtt_s(self, a: str, b: str) -> float:
        """Core RTT between two regions (without access latencies)."""
        default = self.default_intra_rtt_s if a == b else self.default_inter_rtt_s
        return self.region_rtt.get(_pair(a, b), default)

    def rtt(self, a: Site, b: Site) -> float:
        """Round-trip time between two sites; zero for a site and itself."""
        if a.id == b.id:
            return 0.0
        return a.access_latency_s + b.access_latency_s + self.region_rtt_s(a.region, b.region)

    def region_matrix(self, regions: Sequence[str]) -> npt.NDArray[np.float64]:
        """Dense core-RTT matrix over the given region labels (small: regions², not sites²)."""
        k = len(regions)
        out = np.empty((k, k), dtype=np.float64)
        for i, a in enumerate(regions):
            for j in range(i, k):
                out[i, j] = out[j, i] = self.region_rtt_s(a, regions[j])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "default_intra_rtt_s": self.default_intra_rtt_s,
            "default_inter_rtt_s": self.default_inter_rtt_s,
            "loss": self.loss,
            "region_rtt": [{"a": a, "b": b, "rtt_s": v} for (a, b), v in self.region_rtt.items()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WanModel:
        known = {"default_intra_rtt_s", "default_inter_rtt_s", "loss", "region_rtt"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"WanModel: unknown field(s) {sorted(unknown)}")
        pairs: dict[tuple[str, str], float] = {}
        for entry in data.get("region_rtt", []):
            if not isinstance(entry, Mapping) or set(entry) != {"a", "b", "rtt_s"}:
                raise ValueError(f"WanModel.region_rtt entries need a, b, rtt_s; got {entry!r}")
            pairs[(entry["a"], entry["b"])] = entry["rtt_s"]
        return cls(
            region_rtt=pairs,
            default_intra_rtt_s=data.get("default_intra_rtt_s", 0.01),
            default_inter_rtt_s=data.get("default_inter_rtt_s", 0.08),
            loss=data.get("loss", 0.0),
        )


def rtt_matrix(sites: Sequence[Site], wan: WanModel) -> npt.NDArray[np.float64]:
    """Dense site × site RTT matrix (seconds). Only for small populations."""
    n = len(sites)
    if n > MAX_DENSE_SITES:
        raise ValueError(
            f"rtt_matrix: {n} sites is too many for a dense matrix (max {MAX_DENSE_SITES})"
        )
    labels = sorted({s.region for s in sites})
    index = {r: i for i, r in enumerate(labels)}
    region_idx = np.fromiter((index[s.region] for s in sites), dtype=np.intp, count=n)
    access = np.fromiter((s.access_latency_s for s in sites), dtype=np.float64, count=n)
    core = wan.region_matrix(labels)
    out = access[:, None] + access[None, :] + core[np.ix_(region_idx, region_idx)]
    np.fill_diagonal(out, 0.0)
    return out


def mean_rtt_within(sites: Sequence[Site], wan: WanModel) -> npt.NDArray[np.float64]:
    """For each site, its mean RTT to the *other* sites of the group, without an n² matrix.

    mean_i = acc_i + (Σacc − acc_i)/(m−1) + (Σ_r count_r·R[r_i, r] − R[r_i, r_i])/(m−1),
    which costs O(m · regions in the group). A group of one gets 0.
    """
    m = len(sites)
    if m <= 1:
        return np.zeros(m, dtype=np.float64)
    labels = sorted({s.region for s in sites})
    index = {r: i for i, r in enumerate(labels)}
    region_idx = np.fromiter((index[s.region] for s in sites), dtype=np.intp, count=m)
    access = np.fromiter((s.access_latency_s for s in sites), dtype=np.float64, count=m)
    core = wan.region_matrix(labels)
    counts = np.bincount(region_idx, minlength=len(labels)).astype(np.float64)
    core_sum = core @ counts - np.diag(core)  # per region label: Σ_j≠i R over the group
    total_access = float(access.sum())
    return access + (total_access - access) / (m - 1) + core_sum[region_idx] / (m - 1)


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance between two (lat, lon) points in degrees."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(h)))


def region_rtt_from_coords(
    coords: Mapping[str, tuple[float, float]],
    *,
    route_factor: float = 1.5,
    overhead_s: float = 0.002,
    pairs: Iterable[tuple[str, str]] | None = None,
) -> dict[tuple[str, str], float]:
    """Estimate inter-region RTTs from coordinates (e.g. ``CITY_COORDS``).

    rtt = 2 · distance · route_factor / fibre speed + overhead; route_factor ≈ 1.5 accounts for
    fibre paths being longer than great circles. Intra-region entries are not produced.
    """
    if route_factor < 1.0 or overhead_s < 0.0:
        raise ValueError("region_rtt_from_coords: need route_factor >= 1 and overhead_s >= 0")
    names = sorted(coords)
    wanted = (
        [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        if pairs is None
        else list(pairs)
    )
    out: dict[tuple[str, str], float] = {}
    for a, b in wanted:
        if a not in coords or b not in coords:
            raise ValueError(f"region_rtt_from_coords: no coordinates for {a!r} or {b!r}")
        if a == b:
            continue
        km = haversine_km(coords[a], coords[b])
        out[_pair(a, b)] = 2.0 * km * route_factor / FIBRE_KM_PER_S + overhead_s
    return out
