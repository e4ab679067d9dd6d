"""How long local training takes on the virtual clock.

duration(site) = draw(site's RNG) / speed(site)

The draw is one sample per job from a duration distribution (the shapes FLSim uses:
constant, truncated gaussian, half-normal ``min + |N(0, sd)|``, exponential, plus
lognormal). Each site draws from its own generator (``entity_rng(seed, "compute", site)``),
so a site's durations do not depend on what other sites do. ``speed`` is the site's
relative compute speed (``topology.specs.Site.compute_speed``): 2.0 trains twice as fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedloom.federation.seeds import EntityRngs


class Distribution(Protocol):
    """A distribution of job durations in seconds (always >= 0)."""

    def draw(self, rng: np.random.Generator) -> float: ...

    @property
    def mean(self) -> float: ...


# A duration parameter (``mean_s``, ``sd_s``, ``min_s``, ``median_s``) at most this (10^6 h,
# as a scenario's windows): a draw from it, divided by the slowest speed, stays finite.
MAX_DURATION_S = 3.6e9


def _check(name: str, value: float, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"compute: {name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        need = "a positive" if positive else "a non-negative"
        raise ValueError(f"compute: {name} must be {need} finite number, got {value!r}")
    if name.endswith("_s") and v > MAX_DURATION_S:
        raise ValueError(
            f"compute: {name} must be at most {MAX_DURATION_S:g} s (10^6 h), got {value!r}"
        )
    return v


@dataclass(frozen=True, slots=True)
class Constant:
    mean_s: float

    def __post_init__(self) -> None:
        _check("mean_s", self.mean_s)

    def draw(self, rng: np.random.Generator) -> float:
        return self.mean_s

    @property
    def mean(self) -> float:
        return self.mean_s


@dataclass(frozen=True, slots=True)
class Gaussian:
    """``max(min_s, N(mean_s, sd_s))`` (truncated by clipping, as FLSim's PerUserGaussian)."""

    mean_s: float
    sd_s: float
    min_s: float = 0.0

    def __post_init__(self) -> None:
        _check("mean_s", self.mean_s)
        _check("sd_s", self.sd_s)
        _check("min_s", self.min_s)

    def draw(self, rng: np.random.Generator) -> float:
        return max(self.min_s, self.mean_s + self.sd_s * float(rng.standard_normal()))

    @property
    def mean(self) -> float:
        # Mean of a normal clipped below at min_s.
        if self.sd_s == 0:
            return max(self.min_s, self.mean_s)
        a = (self.min_s - self.mean_s) / self.sd_s
        phi = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + math.erf(a / math.sqrt(2)))
        return self.min_s * cdf + self.mean_s * (1 - cdf) + self.sd_s * phi


@dataclass(frozen=True, slots=True)
class HalfNormal:
    """``min_s + |N(0, sd_s)|`` (FLSim's PerUserHalfNormal)."""

    sd_s: float
    min_s: float = 0.0

    def __post_init__(self) -> None:
        _check("sd_s", self.sd_s)
        _check("min_s", self.min_s)

    def draw(self, rng: np.random.Generator) -> float:
        return self.min_s + abs(self.sd_s * float(rng.standard_normal()))

    @property
    def mean(self) -> float:
        return self.min_s + self.sd_s * math.sqrt(2 / math.pi)


@dataclass(frozen=True, slots=True)
class Exponential:
    """``min_s + Exp(mean_s - min_s)``: mean ``mean_s``, never below ``min_s``."""

    mean_s: float
    min_s: float = 0.0

    def __post_init__(self) -> None:
        _check("mean_s", self.mean_s, positive=True)
        _check("min_s", self.min_s)
        if self.min_s >= self.mean_s:
            raise ValueError(
                f"compute: exponential min_s ({self.min_s}) must be below mean_s ({self.mean_s})"
            )

    def draw(self, rng: np.random.Generator) -> float:
        return self.min_s + float(rng.exponential(self.mean_s - self.min_s))

    @property
    def mean(self) -> float:
        return self.mean_s


# A lognormal's sigma (and ``[sites] speed_spread``, the sigma of per-site speeds) at most
# this: exp(sigma * z) and the mean's exp(sigma**2 / 2) stay far inside float range (a sigma
# of 10 already makes a 3-sd straggler e^30 times slower than the median).
MAX_LOGNORMAL_SIGMA = 10.0


def _check_sigma(name: str, value: float) -> float:
    v = _check(name, value)
    if v > MAX_LOGNORMAL_SIGMA:
        raise ValueError(
            f"compute: {name} must be at most {MAX_LOGNORMAL_SIGMA:g} (a lognormal's sigma), "
            f"got {value!r}"
        )
    return v


@dataclass(frozen=True, slots=True)
class LogNormal:
    """``min_s + median_s * exp(sigma * N(0, 1))`` (heavy right tail of stragglers)."""

    median_s: float
    sigma: float
    min_s: float = 0.0

    def __post_init__(self) -> None:
        _check("median_s", self.median_s, positive=True)
        _check_sigma("sigma", self.sigma)
        _check("min_s", self.min_s)

    def draw(self, rng: np.random.Generator) -> float:
        return self.min_s + self.median_s * math.exp(self.sigma * float(rng.standard_normal()))

    @property
    def mean(self) -> float:
        return self.min_s + self.median_s * math.exp(self.sigma**2 / 2)


# distribution name -> (class, required keys, optional keys)
_KINDS: dict[str, tuple[Callable[..., Distribution], tuple[str, ...], tuple[str, ...]]] = {
    "constant": (Constant, ("mean_s",), ()),
    "gaussian": (Gaussian, ("mean_s", "sd_s"), ("min_s",)),
    "halfnormal": (HalfNormal, ("sd_s",), ("min_s",)),
    "exponential": (Exponential, ("mean_s",), ("min_s",)),
    "lognormal": (LogNormal, ("sigma",), ("median_s", "mean_s", "min_s")),
}
DEFAULT_MEAN_S = 60.0


def distribution_from_config(cfg: Mapping[str, Any]) -> Distribution:
    """Build a duration distribution from ``{"distribution": name, ...params}``.

    Names and parameters (seconds): ``constant`` (mean_s), ``gaussian`` (mean_s, sd_s,
    min_s=0), ``halfnormal`` (sd_s, min_s=0), ``exponential`` (mean_s, min_s=0),
    ``lognormal`` (sigma and one of median_s / mean_s, min_s=0). An empty table means a
    constant 60 s.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"compute: expected a table, got {type(cfg).__name__}")
    params = {k: v for k, v in cfg.items() if k not in ("distribution", "speeds")}
    kind = cfg.get("distribution", "constant")
    if not isinstance(kind, str):
        raise ValueError(f"compute.distribution must be a string, got {kind!r}")
    kind = kind.lower().replace("_", "").replace("-", "")
    if kind not in _KINDS:
        raise ValueError(
            f"compute.distribution: unknown {cfg.get('distribution')!r}; "
            f"choose one of {', '.join(_KINDS)}"
        )
    factory, required, optional = _KINDS[kind]
    if kind == "constant" and not params:
        params = {"mean_s": DEFAULT_MEAN_S}
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise ValueError(
            f"compute: unknown field(s) {', '.join(unknown)} for distribution {kind!r} "
            f"(allowed: {', '.join((*required, *optional))})"
        )
    missing = [k for k in required if k not in params]
    if missing:
        raise ValueError(
            f"compute: distribution {kind!r} needs {', '.join(missing)} "
            f"(allowed: {', '.join((*required, *optional))})"
        )
    for key, value in params.items():
        _check(key, value)
    if kind == "lognormal":
        has_median, has_mean = "median_s" in params, "mean_s" in params
        if has_median == has_mean:
            raise ValueError("compute: lognormal needs exactly one of median_s or mean_s")
        sigma = _check_sigma("sigma", params["sigma"])
        median = (
            float(params["median_s"])
            if has_median
            else float(params["mean_s"]) / math.exp(sigma**2 / 2)
        )
        return LogNormal(median_s=median, sigma=sigma, min_s=float(params.get("min_s", 0.0)))
    return factory(**{k: float(v) for k, v in params.items()})


class ComputeModel:
    """Per-site training durations: ``distribution.draw(site_rng) / speed(site)``."""

    def __init__(
        self,
        distribution: Distribution,
        *,
        seed: int = 0,
        speeds: Mapping[str, float] | None = None,
        default_speed: float = 1.0,
    ) -> None:
        _check("default_speed", default_speed, positive=True)
        self.distribution = distribution
        self.seed = seed
        self._speeds = dict(speeds or {})
        for site, speed in self._speeds.items():
            _check(f"speed of {site!r}", speed, positive=True)
        self._default_speed = float(default_speed)
        # site -> (its generator, its speed): one lookup per job at 100,000 sites
        self._sites: dict[str, tuple[np.random.Generator, float]] = {}
        self._streams = EntityRngs(seed, "compute")  # entity_rng(seed, "compute", site)

    @classmethod
    def constant(cls, duration_s: float, **kwargs: Any) -> ComputeModel:
        return cls(Constant(duration_s), **kwargs)

    @classmethod
    def from_config(
        cls,
        cfg: Mapping[str, Any],
        *,
        seed: int = 0,
        speeds: Mapping[str, float] | None = None,
    ) -> ComputeModel:
        """``cfg`` as for ``distribution_from_config``; ``speeds`` per site (default 1)."""
        return cls(distribution_from_config(cfg), seed=seed, speeds=speeds)

    def speed(self, site: str) -> float:
        return self._speeds.get(site, self._default_speed)

    def duration(self, site: str) -> float:
        """Draw the duration of ``site``'s next job (advances that site's stream only)."""
        entry = self._sites.get(site)
        if entry is None:
            speed = self._speeds.get(site, self._default_speed)
            entry = self._sites[site] = (self._streams.rng(site), speed)
        rng, speed = entry
        return self.distribution.draw(rng) / speed
