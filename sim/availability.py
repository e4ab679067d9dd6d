"""Which sites are there: per-job dropouts, permanent deaths, churn windows.

* Dropout: each training job is lost with probability ``dropout`` (drawn from the site's
  own generator). The site node gets ``TrainFailed(job, "dropout")`` at the time the job
  would have ended and its parent hears nothing: it has to time the task out.
* Death: at ``at_s`` the node stops for good. Nothing is delivered to or from it any more;
  its neighbours get ``PeerDown`` after ``detection_delay_s``.
* Churn: during ``[start_s, end_s)`` a site is offline (cut from the network). Both ends of
  its links get ``PeerDown`` at the start and ``PeerUp`` when it returns (a churn window
  is a one-node ``network.Partition``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.federation.seeds import EntityRngs, entity_rng
from fedloom.sim.network import Partition

DEFAULT_DETECTION_DELAY_S = 30.0


@dataclass(frozen=True, slots=True)
class Death:
    at_s: float
    node: str


@dataclass(frozen=True, slots=True)
class ChurnWindow:
    node: str
    start_s: float
    end_s: float

    def as_partition(self) -> Partition:
        return Partition(self.start_s, self.end_s, frozenset({self.node}))


def _number(where: str, value: Any, *, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"availability.{where} must be a number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and lo <= v <= hi):
        upper = "" if hi == math.inf else f" and <= {hi}"
        raise ValueError(f"availability.{where} must be >= {lo}{upper}, got {value!r}")
    return v


def _probability(where: str, value: Any) -> float:
    v = _number(where, value, hi=1.0)
    if v >= 1.0:
        raise ValueError(f"availability.{where} must be < 1, got {value!r}")
    return v


class Availability:
    """Dropout draws plus the fixed schedule of deaths and churn windows."""

    def __init__(
        self,
        *,
        dropout: float | Mapping[str, float] = 0.0,
        deaths: Iterable[Death] = (),
        churn: Iterable[ChurnWindow] = (),
        detection_delay_s: float = DEFAULT_DETECTION_DELAY_S,
        seed: int = 0,
    ) -> None:
        if isinstance(dropout, Mapping):
            self._dropout_by_site = {
                s: _probability(f"dropout[{s}]", p) for s, p in dropout.items()
            }
            self._dropout = 0.0
        else:
            self._dropout_by_site = {}
            self._dropout = _probability("dropout", dropout)
        self.deaths: tuple[Death, ...] = tuple(sorted(deaths, key=lambda d: (d.at_s, d.node)))
        for d in self.deaths:
            _number(f"deaths[{d.node}].at_s", d.at_s)
        self.churn: tuple[ChurnWindow, ...] = tuple(churn)
        for w in self.churn:
            w.as_partition()  # validates the window
        self.detection_delay_s = _number("detection_delay_s", detection_delay_s)
        self.seed = seed
        self._rngs: dict[str, np.random.Generator] = {}
        self._dropout_streams = EntityRngs(seed, "dropout")  # entity_rng(seed, "dropout", site)

    @property
    def any_dropout(self) -> bool:
        return self._dropout > 0 or any(p > 0 for p in self._dropout_by_site.values())

    def dropout(self, site: str) -> float:
        return self._dropout_by_site.get(site, self._dropout)

    def job_dropped(self, site: str) -> bool:
        """Draw whether ``site``'s next job is lost (advances that site's stream only)."""
        p = self._dropout_by_site.get(site, self._dropout)
        if p <= 0.0:
            return False
        rng = self._rngs.get(site)
        if rng is None:
            rng = self._rngs[site] = self._dropout_streams.rng(site)
        return bool(rng.random() < p)

    def partitions(self) -> list[Partition]:
        """The churn windows as one-node network partitions."""
        return [w.as_partition() for w in self.churn]

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any], *, sites: Sequence[str], seed: int = 0
    ) -> Availability:
        """Build from a table (all times in seconds)::

            dropout = 0.1                  # per-job loss probability
            detection_delay_s = 30         # how long until a death is noticed
            death_fraction = 0.2           # shorthand for one [[deaths]] entry
            death_at_s = 3600
            [[deaths]]                     # at_s plus either fraction or ids
            at_s = 7200
            ids = ["site-3"]
            [[churn]]                      # start_s, end_s plus either fraction or ids
            start_s = 100
            end_s = 400
            fraction = 0.1

        Sites picked by ``fraction`` are drawn from ``sites`` with the run seed.
        """
        if not isinstance(cfg, Mapping):
            raise ValueError(f"availability: expected a table, got {type(cfg).__name__}")
        known = {
            "dropout",
            "detection_delay_s",
            "death_fraction",
            "death_at_s",
            "deaths",
            "churn",
        }
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(
                f"availability: unknown field(s) {', '.join(unknown)} "
                f"(allowed: {', '.join(sorted(known))})"
            )
        site_list = sorted(sites)
        if len(set(site_list)) != len(site_list):
            raise ValueError("availability: site ids must be unique")

        death_specs: list[Mapping[str, Any]] = []
        if "death_fraction" in cfg or "death_at_s" in cfg:
            death_specs.append(
                {"fraction": cfg.get("death_fraction", 0.0), "at_s": cfg.get("death_at_s", 0.0)}
            )
        raw_deaths = cfg.get("deaths", [])
        if not isinstance(raw_deaths, list | tuple):
            raise ValueError("availability.deaths must be a list of tables")
        death_specs.extend(raw_deaths)

        deaths: list[Death] = []
        for i, spec in enumerate(death_specs):
            where = f"deaths[{i}]"
            _only(spec, where, {"at_s", "fraction", "ids"})
            at_s = _number(f"{where}.at_s", _required(spec, where, "at_s"))
            # A site dies once: fractions are drawn among the sites still alive.
            taken = {d.node for d in deaths}
            alive = [x for x in site_list if x not in taken]
            for node in _pick(spec, where, site_list, entity_rng(seed, "deaths", i), alive):
                deaths.append(Death(at_s, node))
        dead = [d.node for d in deaths]
        if len(set(dead)) != len(dead):
            raise ValueError("availability: a site is listed to die more than once")

        churn: list[ChurnWindow] = []
        raw_churn = cfg.get("churn", [])
        if not isinstance(raw_churn, list | tuple):
            raise ValueError("availability.churn must be a list of tables")
        for i, spec in enumerate(raw_churn):
            where = f"churn[{i}]"
            _only(spec, where, {"start_s", "end_s", "fraction", "ids"})
            start = _number(f"{where}.start_s", _required(spec, where, "start_s"))
            end = _number(f"{where}.end_s", _required(spec, where, "end_s"))
            if end <= start:
                raise ValueError(f"availability.{where}.end_s must be after start_s")
            for node in _pick(spec, where, site_list, entity_rng(seed, "churn", i)):
                churn.append(ChurnWindow(node, start, end))

        return cls(
            dropout=cfg.get("dropout", 0.0),
            deaths=deaths,
            churn=churn,
            detection_delay_s=cfg.get("detection_delay_s", DEFAULT_DETECTION_DELAY_S),
            seed=seed,
        )


def periodic_windows(
    start_s: float, end_s: float, every_s: float | None, until_s: float
) -> list[tuple[float, float]]:
    """``[start_s, end_s)`` and, with ``every_s``, the same window each period after it,
    while the window starts before ``until_s`` (``every_s`` must exceed the window)."""
    if not 0.0 <= start_s < end_s:
        raise ValueError(f"a window needs 0 <= start < end, got [{start_s}, {end_s})")
    if every_s is None:
        return [(start_s, end_s)] if start_s < until_s else []
    if not every_s > end_s - start_s:
        raise ValueError(f"a window repeated every {every_s} s must be shorter than that")
    if not math.isfinite(every_s) or not math.isfinite(end_s):
        raise ValueError(
            f"a window repeats every finite period, got [{start_s}, {end_s}) every {every_s}"
        )
    out = [(start_s, end_s)] if start_s < until_s else []  # k = 0 apart: 0 * period
    k = 1
    while start_s + k * every_s < until_s:  # k * period: no drift from repeated additions
        out.append((start_s + k * every_s, end_s + k * every_s))
        k += 1
    return out


def _only(spec: Any, where: str, allowed: set[str]) -> None:
    if not isinstance(spec, Mapping):
        raise ValueError(f"availability.{where} must be a table, got {spec!r}")
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(
            f"availability.{where}: unknown field(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


def _required(spec: Mapping[str, Any], where: str, key: str) -> Any:
    if key not in spec:
        raise ValueError(f"availability.{where}.{key} is required")
    return spec[key]


def _pick(
    spec: Mapping[str, Any],
    where: str,
    sites: list[str],
    rng: np.random.Generator,
    pool: list[str] | None = None,
) -> list[str]:
    """The ids listed, or ``round(fraction * len(sites))`` drawn from ``pool`` (all sites)."""
    if ("fraction" in spec) == ("ids" in spec):
        raise ValueError(f"availability.{where} needs exactly one of fraction or ids")
    if "ids" in spec:
        ids = spec["ids"]
        if not isinstance(ids, list | tuple) or not all(isinstance(x, str) for x in ids):
            raise ValueError(f"availability.{where}.ids must be a list of site ids")
        unknown = sorted(set(ids) - set(sites))
        if unknown:
            raise ValueError(f"availability.{where}.ids: unknown site(s) {', '.join(unknown)}")
        return list(ids)
    fraction = _number(f"{where}.fraction", spec["fraction"], hi=1.0)
    candidates = sites if pool is None else pool
    count = min(round(fraction * len(sites)), len(candidates))
    if count == 0:
        return []
    chosen = rng.choice(len(candidates), size=count, replace=False)
    return [candidates[int(i)] for i in sorted(chosen)]
