"""``[secure_aggregation]``: the one table a scenario file and a daemon config share.

Read strictly (unknown fields named, as every table here) into ``SecureAggregationConfig``.
The numbers are checked against each other where the reader can see them, and again by
``check_cohort`` once the cohort size is known (``cohort_size = 0`` means the aggregator's
buffer size K, so a daemon's ``[aggregation]`` or a scenario arm decides it):

* the threshold ``t = max(min_cohort, (N + max_colluders) // 2 + 1)`` (more than half of
  a cohort of N members plus the c = ``max_colluders`` members that may collude with the
  aggregator, so two views signed by t members each share c + 1 signers, one of them
  honest; never below ``min_cohort``) must survive the configured dropouts:
  ``t <= N * (1 - max_dropout)``, else a cohort losing ``max_dropout`` of its members
  could never be unmasked (the ConfigError names max_colluders, max_dropout and
  min_cohort);
* a cohort may have at most ``max_cohort`` members (a site refuses bigger seals before
  any cryptography: their cost grows as N^2);
* the field must hold the sum: ``N * clip * 2**precision_bits < 2**31``
  (``algorithms.secagg.field.check_capacity``);
* ``check_codec``: masked vectors are uniformly random and the field encoding IS the
  quantisation, so the update uplink must be ``fp32`` (the raw field elements); the model
  broadcast (``down``) is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedloom.algorithms.secagg.cohort import DEFAULT_MAX_COHORT, DEFAULT_MAX_COLLUDERS
from fedloom.algorithms.secagg.cohort import threshold as cohort_threshold
from fedloom.algorithms.secagg.field import check_capacity
from fedloom.federation.config_reader import ConfigError, Table
from fedloom.federation.params import CodecConfig

__all__ = [
    "SecureAggregationConfig",
    "check_codec",
    "check_cohort",
    "read_secure_aggregation",
    "threshold",
]

MAX_COHORT = 1024  # members of one cohort at most (the wire caps member lists as well)
MAX_TIMEOUT_S = 86_400.0


@dataclass(frozen=True, slots=True)
class SecureAggregationConfig:
    """Secure aggregation of one aggregator (or of a site: ``enabled`` makes it refuse to
    send plain updates). Defaults are the README's table."""

    enabled: bool = False
    min_cohort: int = 5
    cohort_size: int = 0  # 0: the aggregator's buffer size K (or the round's cohort)
    clip: float = 1.0
    precision_bits: int = 16
    max_dropout: float = 0.3
    form_wait_s: float = 30.0
    upload_timeout_s: float = 300.0
    unmask_timeout_s: float = 60.0
    max_colluders: int = DEFAULT_MAX_COLLUDERS
    max_cohort: int = DEFAULT_MAX_COHORT

    def cohort(self, buffer_size: int) -> int:
        """Members of a full cohort for an aggregator buffering ``buffer_size`` updates."""
        return self.cohort_size if self.cohort_size > 0 else buffer_size

    def threshold(self, members: int) -> int:
        return threshold(self.min_cohort, members, self.max_colluders)


def threshold(min_cohort: int, members: int, colluders: int = DEFAULT_MAX_COLLUDERS) -> int:
    """``t = max(min_cohort, (N + colluders) // 2 + 1)`` (``algorithms.secagg.cohort``)."""
    return cohort_threshold(members, min_cohort, colluders)


def check_cohort(
    cfg: SecureAggregationConfig, members: int, where: str = "secure_aggregation"
) -> None:
    """ConfigError naming the field to change when a cohort of ``members`` cannot work."""
    if not cfg.enabled:
        return
    if members < 1 or members > MAX_COHORT:
        raise ConfigError(
            f"{where}.cohort_size: a cohort of {members} members; 1..{MAX_COHORT} are possible"
        )
    if members > cfg.max_cohort:
        raise ConfigError(
            f"{where}.max_cohort: a cohort of {members} members (cohort_size, or the buffer "
            f"size K when cohort_size = 0) is more than max_cohort = {cfg.max_cohort}, the "
            "most a site accepts: raise max_cohort (on the sites too) or lower the cohort size"
        )
    t = cfg.threshold(members)
    survivors = members * (1.0 - cfg.max_dropout)
    if cfg.min_cohort > members:
        raise ConfigError(
            f"{where}.min_cohort: {cfg.min_cohort} is more than the cohort's {members} "
            "members (cohort_size, or the buffer size K when cohort_size = 0): lower "
            "min_cohort or raise the cohort size"
        )
    if t > members:
        raise ConfigError(
            f"{where}.max_colluders: {cfg.max_colluders} colluders need t = {t} of a cohort "
            f"of {members} ((N + max_colluders) // 2 + 1): lower max_colluders or raise the "
            "cohort size"
        )
    if t > survivors + 1e-9:
        raise ConfigError(
            f"{where}.max_dropout / {where}.max_colluders / {where}.min_cohort: a cohort of "
            f"{members} needs t = {t} members to unmask (max(min_cohort, (N + "
            f"max_colluders) // 2 + 1) with max_colluders = {cfg.max_colluders}), but with "
            f"max_dropout = {cfg.max_dropout} only {survivors:g} may be left: lower "
            "max_dropout, max_colluders or min_cohort, or raise the cohort size"
        )
    try:
        check_capacity(members, cfg.clip, cfg.precision_bits)
    except ValueError as exc:
        raise ConfigError(
            f"{where}.precision_bits / {where}.clip: {exc} (cohort of {members})"
        ) from None


def check_codec(codec: CodecConfig, where: str = "codec") -> None:
    """Refuse an update codec that cannot compose with masking."""
    if codec.up != "fp32":
        raise ConfigError(
            f"{where}.up: secure aggregation quantises before masking (precision_bits); "
            f"codec.up = {codec.up!r} cannot compose with masking: masked vectors are "
            'uniformly random (write up = "fp32": the secure uplink is the field encoding)'
        )


def read_secure_aggregation(t: Table) -> SecureAggregationConfig:
    """The ``[secure_aggregation]`` table (absent: disabled)."""
    d = SecureAggregationConfig()
    cfg = SecureAggregationConfig(
        enabled=t.flag("enabled", d.enabled),
        min_cohort=t.integer("min_cohort", d.min_cohort, min=2, max=MAX_COHORT),
        cohort_size=t.integer("cohort_size", d.cohort_size, min=0, max=MAX_COHORT),
        clip=t.number("clip", d.clip, min=0.0, exclusive_min=True),
        precision_bits=t.integer("precision_bits", d.precision_bits, min=1, max=30),
        max_dropout=t.number("max_dropout", d.max_dropout, min=0.0, max=0.49),
        form_wait_s=t.number("form_wait_s", d.form_wait_s, min=0.0, max=MAX_TIMEOUT_S),
        upload_timeout_s=t.number(
            "upload_timeout_s", d.upload_timeout_s, min=0.0, max=MAX_TIMEOUT_S, exclusive_min=True
        ),
        unmask_timeout_s=t.number(
            "unmask_timeout_s", d.unmask_timeout_s, min=0.0, max=MAX_TIMEOUT_S, exclusive_min=True
        ),
        max_colluders=t.integer("max_colluders", d.max_colluders, min=0, max=MAX_COHORT),
        max_cohort=t.integer("max_cohort", d.max_cohort, min=2, max=MAX_COHORT),
    )
    t.finish()
    if cfg.cohort_size:
        check_cohort(cfg, cfg.cohort_size, t.where("").rstrip(".") or "secure_aggregation")
    return cfg
