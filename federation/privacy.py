"""The ``[privacy]`` table: central (user-level) differential privacy at the root.

Read the same way from a scenario file (top level, or an arm's own table) and from a
root's daemon config::

    [privacy]
    mechanism = "central"        # or "none" (the default: no DP)
    noise_multiplier = 1.1       # z > 0: the Gaussian's σ is z·clip on the sum
    clip = 0.5                   # C > 0: the L2 bound of one site's contribution to a release
    delta = 1e-5                 # δ at which ε is reported and the budget is enforced
    epsilon_budget = 8.0         # > 0; absent: account only, never stop
    accountant = "rdp"           # or "pld" (tighter, much slower; see algorithms.dp.ledger)

``noise_multiplier`` and ``clip`` are required with ``mechanism = "central"``: a privacy
parameter is never a silent default. ``check_plan`` says which plans central DP runs on
(a FedBuff or FedAvg/FedProx root over sites, uniform weighting, the mean) and refuses the
others with one line naming the field to change.

The ledger and the release machinery live in ``fedloom.algorithms.dp`` (the aggregators
need them); this module re-exports what a reader of the config needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from fedloom.algorithms.dp.ledger import (
    ACCOUNTANTS,
    DELTA_MAX,
    SIGMA_MAX,
    Z_MAX,
    Z_MIN,
    LedgerError,
    PrivacyEvent,
    PrivacyLedger,
    Release,
    require_accountant,
)
from fedloom.algorithms.dp.release import MECHANISMS, DpRelease, PrivacyConfig
from fedloom.algorithms.fedasync import FedAsyncAggregator
from fedloom.algorithms.fedbuff import FedBuffAggregator
from fedloom.algorithms.sync import SyncAggregator
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.params import AlgorithmConfig

__all__ = [
    "ACCOUNTANTS",
    "NO_PRIVACY",
    "LedgerError",
    "PrivacyConfig",
    "PrivacyEvent",
    "PrivacyLedger",
    "Release",
    "attach_privacy",
    "central_params",
    "check_plan",
    "check_secagg_clip",
    "read_privacy",
    "require_accountant",
]

NO_PRIVACY = PrivacyConfig()
DP_ALGORITHMS = ("fedbuff", "fedavg", "fedprox")


def read_privacy(t: Table) -> PrivacyConfig:
    """A ``[privacy]`` table (absent or empty: no DP). Strict: unknown fields are named."""
    mechanism = t.text("mechanism", "none", choices=MECHANISMS)
    central = mechanism == "central"
    if central:
        for key in ("noise_multiplier", "clip"):
            if not t.has(key):
                raise t.missing(
                    key,
                    'required with mechanism = "central" (no privacy parameter has a silent '
                    "default)",
                )
    # z in [Z_MIN, Z_MAX] (``algorithms.dp.ledger``: no privacy below, overflow above);
    # δ at most DELTA_MAX (it must be far below 1 / the number of sites).
    z = t.number("noise_multiplier", 1.0, min=Z_MIN, max=Z_MAX)
    clip = t.number("clip", 1.0, min=0.0, exclusive_min=True)
    delta = t.number("delta", 1e-5, min=0.0, max=DELTA_MAX, exclusive_min=True)
    budget = t.number("epsilon_budget", None, min=0.0, exclusive_min=True)
    accountant = t.text("accountant", "rdp", choices=ACCOUNTANTS)
    t.finish()
    for key, value in (("noise_multiplier", z), ("clip", clip), ("epsilon_budget", budget)):
        if value is not None and value == float("inf"):
            raise ConfigError(f"{t.where(key)}: expected a finite number, got inf")
    if central and z * clip > SIGMA_MAX:  # every release would overflow and be dropped
        raise ConfigError(
            f"{t.where('clip')}: σ = noise_multiplier · clip = {z * clip:g} is beyond what "
            f"float32 models hold (at most {SIGMA_MAX:g}): lower clip"
        )
    if not central and t.has("epsilon_budget"):
        raise ConfigError(
            f'{t.where("epsilon_budget")}: a budget needs mechanism = "central" (with "none" '
            "nothing is released privately, so nothing could be counted against it)"
        )
    return PrivacyConfig(
        mechanism=mechanism,
        noise_multiplier=z,
        clip=clip,
        delta=delta,
        epsilon_budget=budget,
        accountant=accountant,
    )


def check_plan(
    privacy: PrivacyConfig,
    algorithm: str,
    p: AlgorithmConfig,
    children: Mapping[str, str],
    where: str = "privacy",
    secagg: Any = None,
) -> None:
    """ConfigError unless central DP can run on this root: FedBuff or FedAvg/FedProx, site
    children only, uniform weighting, the mean, and a clip_norm that is "auto" or the
    privacy clip (the privacy clip replaces it). Over regions: see ``check_regions``."""
    if not privacy.enabled:
        return
    if algorithm not in DP_ALGORITHMS:
        raise ConfigError(
            f"{where}.mechanism: central DP runs on a fedbuff, fedavg or fedprox root, not "
            f'{algorithm!r}; write mechanism = "none" or change the algorithm'
        )
    if any(r == "region" for r in children.values()):
        check_regions(privacy, algorithm, p, children, secagg, where)
        return
    if p.weighting != "uniform":
        raise ConfigError(
            f"aggregation.weighting: central DP divides by a fixed denominator, so weighting "
            f'must be "uniform", not {p.weighting!r} (weighting by claimed examples would let '
            "one site's weight exceed the clip)"
        )
    if p.robust != "mean":
        raise ConfigError(
            f"aggregation.robust: central DP adds noise to the sum of clipped contributions; "
            f'robust = {p.robust!r} has no such sum (write robust = "mean")'
        )
    if isinstance(p.clip_norm, float) and p.clip_norm != privacy.clip:
        raise ConfigError(
            f"aggregation.clip_norm = {p.clip_norm:g} differs from {where}.clip = "
            f"{privacy.clip:g}: with central DP the privacy clip bounds every update; remove "
            "clip_norm or make them equal"
        )
    if p.clip_norm is None:
        raise ConfigError(
            f'aggregation.clip_norm = "off" cannot hold with central DP: {where}.clip bounds '
            "every update; remove clip_norm"
        )


def hierarchical(children: Mapping[str, str]) -> bool:
    return any(r == "region" for r in children.values())


def check_regions(
    privacy: PrivacyConfig,
    algorithm: str,
    p: AlgorithmConfig,
    children: Mapping[str, str],
    secagg: Any,
    where: str = "privacy",
) -> None:
    """Central DP on a hierarchical plan: secure regions only. The sites clip and noise
    inside their regions' cohorts (σ_member in the seal; each site refuses less noise than
    its own ``[privacy]`` z asks); a region forwards its cohort's noised sum; the root
    releases one forward per version (``buffer_size = 1``: a cohort's members are distinct
    sites, so one site moves a version by at most one clip, whereas a version folding
    several forwards could hold a fast site several times) over the regions' fixed cohort
    size (``secure_aggregation.cohort_size``), and records z: the least noise every
    cohort carries, enforced by the sites. ConfigError naming the field otherwise."""
    regions = sorted(c for c, r in children.items() if r == "region")
    if secagg is None or not secagg.enabled:
        raise ConfigError(
            f"{where}.mechanism: central DP on a hierarchical plan needs secure aggregation in "
            f"the regions (the root's children {regions[:3]} are regions: plain ones would see "
            "and sum un-noised site updates); turn on [secure_aggregation] enabled = true at "
            'the root, in every region and at every site, or write mechanism = "none"'
        )
    if algorithm != "fedbuff":
        raise ConfigError(
            f"{where}.mechanism: central DP over regions runs on a fedbuff root, not {algorithm!r}"
        )
    sites = sorted(c for c, r in children.items() if r != "region")
    if sites:
        raise ConfigError(
            f"{where}.mechanism: central DP over regions needs every child of the root to be a "
            f"region ({sites[:3]} are not): put those sites under a secure region"
        )
    if p.buffer_size != 1:
        raise ConfigError(
            f"aggregation.buffer_size = {p.buffer_size}: with central DP over regions the root "
            "releases one region cohort per version (buffer_size = 1): a version folding "
            "several forwards could hold one fast site several times, beyond the clip the "
            "noise is calibrated to"
        )
    if secagg.cohort_size < 1:
        raise ConfigError(
            "secure_aggregation.cohort_size: central DP over regions divides each release by "
            "the regions' fixed cohort size N (never by the survivors' count, which would "
            "leak who took part); set cohort_size = N, as in the regions"
        )
    if p.weighting != "uniform":
        raise ConfigError(
            f'aggregation.weighting: central DP needs weighting = "uniform", not {p.weighting!r}'
        )
    if p.robust != "mean":
        raise ConfigError(
            f"aggregation.robust: central DP sums the regions' noised sums; robust = "
            f'{p.robust!r} has no such sum (write robust = "mean")'
        )
    check_secagg_clip(privacy, secagg)


def check_secagg_clip(privacy: PrivacyConfig | None, secagg: Any) -> None:
    """With central DP and ``[secure_aggregation]`` both on, one clip bounds a site's
    contribution: the members clip to ``secure_aggregation.clip`` and the noise is
    calibrated to it, so ``privacy.clip`` must say the same (ConfigError naming both,
    instead of silently noising for the other one)."""
    if privacy is None or not privacy.enabled or secagg is None or not secagg.enabled:
        return
    if secagg.clip != privacy.clip:
        raise ConfigError(
            f"privacy.clip = {privacy.clip:g} differs from secure_aggregation.clip = "
            f"{secagg.clip:g}: with both, the members clip to the secure aggregation's clip "
            "and the DP noise is calibrated to it; make them equal"
        )


def central_params(
    privacy: PrivacyConfig | None,
    algorithm: str,
    p: AlgorithmConfig,
    children: Mapping[str, str],
    secagg: Any = None,
) -> AlgorithmConfig:
    """The root's parameters under ``privacy``: ``check_plan`` first, then the privacy
    clip as the aggregator's ``clip_norm`` (every update is clipped to C on intake); over
    regions no clip on intake (the sites clipped; a forward is a noised sum)."""
    if privacy is None or not privacy.enabled:
        return p
    check_plan(privacy, algorithm, p, children, secagg=secagg)
    return replace(p, clip_norm=None if hierarchical(children) else privacy.clip)


def attach_privacy(
    root: FedBuffAggregator | FedAsyncAggregator | SyncAggregator,
    privacy: PrivacyConfig | None,
    noise_key: int,
    secagg: Any = None,
) -> None:
    """Give a root built from ``central_params``' parameters its ``DpRelease``: FedBuff
    divides by its buffer size K and claims no sampling; a FedAvg/FedProx root by its
    round's cohort, sampled at clients drawn / site children (nominal; each round records
    the rate of its own draw). ``noise_key``: the secret the noise is drawn from (a
    daemon's from the OS; the simulator's from the seed)."""
    if privacy is None or not privacy.enabled:
        return
    if isinstance(root, FedBuffAggregator) and hierarchical(root.children):
        # One region cohort per version, over the regions' fixed cohort size (check_regions).
        dp = DpRelease(privacy, denominator=secagg.cohort_size, noise_key=noise_key)
        root.set_privacy(dp, forwards=True)
    elif isinstance(root, FedBuffAggregator):
        root.set_privacy(DpRelease(privacy, denominator=root.buffer_size, noise_key=noise_key))
    elif isinstance(root, SyncAggregator):
        # With [secure_aggregation] the round's cohort step divides by the same K and
        # records the members' effective z at this q (``SyncAggregator._cohort_step``).
        n = sum(1 for r in root.children.values() if r == "site")
        q = min(1.0, root.selected_per_round / max(1, n))
        root.set_privacy(
            DpRelease(
                privacy,
                denominator=root.clients_per_round,
                noise_key=noise_key,
                sampling_rate=None if q >= 1.0 else q,
            )
        )
    else:  # check_plan refuses it first
        raise ConfigError(f"central DP does not run on {type(root).__name__}")
