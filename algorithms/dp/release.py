"""Central (user-level) differential privacy at a root aggregator: what it calls at a flush.

``DpRelease`` turns one flush (a FedBuff buffer of K updates, a FedAvg round) into one
differentially private model release, and keeps the ledger and the budget:

* each SITE's contribution to the release (the sum of its staleness-discounted updates in
  the buffer, usually one) is L2-clipped to C (``clip``): adding or removing one site moves
  the sum by at most C, also when a fast site supplied several slots of a buffer;
* the clipped contributions are SUMMED, N(0, (z·C)²) is added to every coordinate of the
  sum, and the result is divided by a FIXED denominator (the buffer size K, the round's
  cohort ``clients_per_round``), never by the number that arrived: a data-dependent
  denominator would itself leak who took part. Weighting is therefore uniform;
* one ``Release(version, z, q)`` per published version goes into the ledger, which rides
  in the aggregator's checkpoint. The noise of version v comes from a generator keyed by
  (the node's noise key, v, z, C, the sum's digest), and the key is in the checkpoint
  too: replaying the log after a restart rebuilds the same models AND the same ledger,
  release for release. A daemon
  draws its key from the OS (``secrets``) and checkpoints it before its first release; the
  simulator derives it from the scenario seed (reproducible on purpose);
* the budget: before a release (and before dispatching the work for the next one), the
  root asks whether ε at δ would exceed ``epsilon_budget``. If so it releases nothing more
  and dispatches no more tasks (``exhausted``), says so once per incarnation (a WARNING and
  the metric ``privacy_budget_exhausted``) and, since the ledger is restored with the
  model, stays stopped after every restart.

Sampling (privacy amplification): a FedAvg root that draws m of the n idle sites uniformly
for a round releases on a sample at rate q = m/n; the ledger records it as Poisson
sampling at rate q, the usual approximation for fixed-size sampling without replacement
(McMahan et al., ICLR 2018). It assumes the draw is among every site a user could be at,
so q is taken over the sites idle when the round starts, not the roster; the draw itself
comes from the noise key (``draw_rng``), never from the config's seed. FedBuff claims no
amplification (q = None): its dispatcher hands tasks to whichever sites are idle, which is
not a uniform sample an analysis could rely on.

With secure aggregation the members add the noise in distributed form (discrete Gaussian,
``algorithms.dp.discrete_gaussian``) and the root only records the release with the
effective z (``effective_noise_multiplier``; the members' σ from ``member_noise_sigma``).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedloom.algorithms.dp.gaussian import add_gaussian, clip_contribution
from fedloom.algorithms.dp.ledger import (
    ACCOUNTANTS,
    DELTA_MAX,
    Z_MAX,
    Z_MIN,
    LedgerError,
    PrivacyEvent,
    PrivacyLedger,
    require_accountant,
)
from fedloom.algorithms.protocol import Effect, Log, Metric, Persist, Weights

__all__ = [
    "MECHANISMS",
    "PRIVACY_LOG_KEY",
    "DpRelease",
    "PrivacyConfig",
    "check_privacy_log",
    "effective_noise_multiplier",
    "member_noise_sigma",
    "recorded_noise",
    "restore_privacy",
]

MECHANISMS = ("central", "none")
# The log each release is appended to as it is made (before the model leaves), so that
# ``fedloom privacy STATE_DIR`` reads checkpoint + log without replaying the model. The
# node itself rebuilds the same records by replaying "applied" (and ignores this log).
PRIVACY_LOG_KEY = "privacy"
_NOISE_DOMAIN = 0x6470  # "dp": the noise generator's spawn key, apart from other streams
_DRAW_DOMAIN = 0x6472  # "dr": a sync root's draw of each round's sites


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """A ``[privacy]`` table (``federation.privacy.read_privacy`` reads it)."""

    mechanism: str = "none"
    noise_multiplier: float = 1.0
    clip: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if not Z_MIN <= self.noise_multiplier <= Z_MAX:
            raise ValueError(
                f"noise_multiplier must be in [{Z_MIN:g}, {Z_MAX:g}], got {self.noise_multiplier!r}"
            )
        if not 0.0 < self.clip < math.inf:
            raise ValueError(f"clip must be > 0, got {self.clip!r}")
        if not 0.0 < self.delta <= DELTA_MAX:
            raise ValueError(f"delta must be in (0, {DELTA_MAX:g}], got {self.delta!r}")
        if self.epsilon_budget is not None and not 0.0 < self.epsilon_budget < math.inf:
            raise ValueError(f"epsilon_budget must be > 0, got {self.epsilon_budget!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")

    @property
    def enabled(self) -> bool:
        return self.mechanism == "central"


def member_noise_sigma(
    noise_multiplier: float, clip: float, precision_bits: int, dim: int, threshold: int
) -> float:
    """σ of the discrete Gaussian each secure-aggregation member adds to its encoded
    vector: z·(C·2^f + √d)/√(t−1). The noise of t − 1 members has σ = √(t−1)·σ_member =
    z·Δ, Δ = C·2^f + √d being the L2 sensitivity of one member's encoded vector (its clip
    in field units plus at most 1 per coordinate of stochastic rounding). t − 1, not t:
    the member whose data is at stake knows its own noise (a curious member subtracts
    it), so only the others' noise protects it (conservative). Needs t ≥ 2."""
    if threshold < 2 or dim < 1 or precision_bits < 0:
        raise ValueError("threshold must be >= 2 and dim >= 1, precision_bits >= 0")
    sensitivity = clip * 2.0**precision_bits + math.sqrt(dim)
    return noise_multiplier * sensitivity / math.sqrt(threshold - 1)


def effective_noise_multiplier(
    sigma_member: float, threshold: int, clip: float, precision_bits: int, dim: int
) -> float:
    """The z the ledger records for a cohort sum noised by ``threshold`` (|U|) members
    each adding N_Z(0, sigma_member²): σ / (C·2^f + √d), σ = √(|U|−1)·σ_member, the noise
    of every member but the one whose data is at stake (it knows its own; conservative).

    The sum of independent discrete Gaussians is not exactly one, but for σ_member ≥ 1 it
    is within a negligible distance of it (Kairouz, Liu, Steinke, ICML 2021, Thm. 1); the
    cohort sums ≥ t members, so the noise is at least this. Needs |U| ≥ 2."""
    if threshold < 2 or dim < 1 or precision_bits < 0 or not sigma_member > 0.0:
        raise ValueError("sigma_member must be > 0; threshold >= 2 and dim >= 1")
    sensitivity = clip * 2.0**precision_bits + math.sqrt(dim)
    return math.sqrt(threshold - 1) * sigma_member / sensitivity


class DpRelease:
    """The DP side of one root aggregator (see the module docstring)."""

    def __init__(
        self,
        config: PrivacyConfig,
        *,
        denominator: int,
        noise_key: int,
        sampling_rate: float | None = None,
    ) -> None:
        if not config.enabled:
            raise ValueError('DpRelease needs mechanism = "central"')
        if denominator < 1:
            raise ValueError(f"denominator must be >= 1, got {denominator}")
        if not 0 <= noise_key < 1 << 256:
            raise ValueError("noise_key must be in [0, 2**256)")
        require_accountant()  # without the privacy extra: fail when the node is built
        self.config = config
        self.denominator = denominator
        self.sampling_rate = sampling_rate
        self._noise_key = int(noise_key)
        self.ledger = PrivacyLedger(config.accountant)
        self._left: tuple[PrivacyEvent, int] | None = None  # planned releases (budget)
        self._told = False  # this incarnation said it stopped
        self._reported = False  # this incarnation sent its gauges
        # A sync root's open round: the sampling rate its draw had (durable with the round).
        self.pending_q: float | None = sampling_rate
        self.refused = 0  # flushes whose release the budget refused
        # During a restore's replay: the versions the log says were released live (they
        # are rebuilt whatever the budget in force now says; ``check_privacy_log`` ends it).
        self._replay_logged: frozenset[int] | None = None
        self._restored_version = 0  # the checkpoint's model version (releases above: replayed)
        # A budget too small for even one release stops the root before it starts.
        self._exhausted = not self.fits(self.event(sampling_rate))

    # ------------------------------------------------------------- budget
    @property
    def exhausted(self) -> bool:
        """The budget allows no further release (durable: it follows from the ledger)."""
        return self._exhausted

    def event(self, q: float | None = None) -> PrivacyEvent:
        """The event of a central release with sampling rate ``q``."""
        return PrivacyEvent(self.config.noise_multiplier, q)

    def fits(self, event: PrivacyEvent) -> bool:
        """Whether one more release of ``event`` keeps ε within the budget."""
        budget = self.config.epsilon_budget
        if budget is None:
            return True
        if self._left is None or self._left[0] != event:
            self._left = (event, self.ledger.releases_left(event, self.config.delta, budget))
        return self._left[1] > 0

    def check(self, event: PrivacyEvent) -> bool:
        """``fits(event)``; when it does not, the budget is exhausted from now on (``stops``
        then says so, on a live event). During a replay a release the log says was made
        live passes (it happened: refusing it now, e.g. under a lowered budget, would
        rebuild another model and ledger); the budget is rechecked after the replay."""
        logged = self._replay_logged
        if logged is not None and (self.ledger.last_version or 0) + 1 in logged:
            return True
        if not self._exhausted and self.fits(event):
            return True
        self._exhausted = True
        return False

    def tell(self, out: list[Effect]) -> None:
        """Once per incarnation: the WARNING and the metric of an exhausted budget."""
        if not self._exhausted or self._told:
            return
        self._told = True
        eps = self.ledger.epsilon(self.config.delta)
        out.append(Metric("privacy_budget_exhausted", 1.0))
        out.append(
            Log(
                "warning",
                f"privacy budget exhausted: epsilon = {eps:.4g} at delta = "
                f"{self.config.delta:g} after {len(self.ledger)} releases, and one more "
                f"would exceed epsilon_budget = {self.config.epsilon_budget:g}; this root "
                "releases no more models and dispatches no more tasks",
                {
                    "epsilon": eps,
                    "delta": self.config.delta,
                    "epsilon_budget": self.config.epsilon_budget,
                    "releases": len(self.ledger),
                },
            )
        )

    def open_round(self, selected: int, idle: int) -> bool:
        """A synchronous round is about to draw ``selected`` of the ``idle`` sites
        uniformly: its release is Poisson-sampled at q = min(1, selected/idle) (the usual
        approximation of a fixed-size draw). Remember q for the round (durable with it);
        False, and the budget exhausted, when that release would not fit."""
        q = min(1.0, selected / idle) if idle > 0 else 1.0
        self.pending_q = None if q >= 1.0 else q
        return self.check(self.event(self.pending_q))

    def stops(self, out: list[Effect]) -> bool:
        """Called where the aggregator would dispatch work (live events only, never during
        a replay): the first time in an incarnation the gauges go out (and the warning, if
        the budget is spent); True when no work may be dispatched."""
        if not self._reported:
            self._reported = True
            self.report(out)
        if self._exhausted:
            self.tell(out)
        return self._exhausted

    # ------------------------------------------------------------ release
    def flush(
        self,
        buffer: Any,
        template: Weights,
        version: int,
        event: PrivacyEvent,
        out: list[Effect],
    ) -> Weights | None:
        """Empty ``buffer`` (an ``UpdateBuffer``) into the noised mean that would release
        model ``version`` by ``event``; None when the budget refuses it (the updates are
        discarded: nothing of them is released). The caller ``record``s the release once
        the model is published."""
        contributions = buffer.contributions()
        buffer.flush()
        if not self.check(event):
            self.refused += 1
            out.append(Metric("privacy_release_refused", float(len(contributions))))
            return None
        return self.noised_mean(contributions, template, version, out)

    def noised_mean(
        self,
        contributions: Sequence[tuple[str | None, Mapping[str, Any], float]],
        template: Weights,
        version: int,
        out: list[Effect],
    ) -> Weights:
        """(Σ_sites clip_C(Σ s·Δ) + N(0, (zC)²)) / denominator, cast to the model's
        dtypes; the noise of ``version`` (the same on a replay). ``contributions`` are
        (site, delta, staleness factor s ∈ [0, 1]) of the buffer; a ``None`` site counts
        alone."""
        per_site: dict[Any, dict[str, np.ndarray[Any, Any]]] = {}
        for i, (src, delta, s) in enumerate(contributions):
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"staleness factor {s!r} outside [0, 1]")
            key = ("#", i) if src is None else src
            acc = per_site.get(key)
            if acc is None:
                per_site[key] = {k: np.asarray(v, dtype=np.float64) * s for k, v in delta.items()}
            else:
                for k, v in delta.items():
                    acc[k] = acc[k] + np.asarray(v, dtype=np.float64) * s
        total: Weights = {k: np.zeros(v.shape, dtype=np.float64) for k, v in template.items()}
        clipped = 0
        for part in per_site.values():
            c, was = clip_contribution(part, self.config.clip)
            clipped += was
            for k in total:
                total[k] += c[k]
        if clipped:
            out.append(Metric("privacy_clipped", float(clipped)))
        sigma = self.config.noise_multiplier * self.config.clip
        noised = add_gaussian(total, sigma, self._noise_rng(version, total))
        inv = 1.0 / self.denominator
        return {k: (v * inv).astype(template[k].dtype, copy=False) for k, v in noised.items()}

    def _noise_rng(self, version: int, total: Weights) -> np.random.Generator:
        """The noise generator of releasing ``total`` as ``version``: keyed by the secret,
        the version, z, C AND a digest of the un-noised sum. A replay (same sum) draws the
        same noise; a different sum under a version number seen before (state lost, log
        repaired) never reuses a noise, which would reveal the difference of the sums, and
        neither does the same sum under another z or C (two releases m + (S + a·g)/K and
        m + (S + b·g)/K of one g would give S away)."""
        h = hashlib.blake2b(digest_size=16)
        for k, v in total.items():
            h.update(k.encode("utf-8"))
            h.update(np.ascontiguousarray(v, dtype=np.float64).tobytes())
        digest = int.from_bytes(h.digest(), "big")
        z_bits, c_bits = struct.unpack(
            ">QQ", struct.pack(">dd", self.config.noise_multiplier, self.config.clip)
        )
        seq = np.random.SeedSequence(
            self._noise_key, spawn_key=(_NOISE_DOMAIN, int(version), digest, z_bits, c_bits)
        )
        return np.random.default_rng(seq)

    def draw_rng(self, round_no: int) -> np.random.Generator:
        """The generator a sync root draws round ``round_no``'s sites with: keyed by the
        noise secret, so nobody who knows the config's seed can predict who is sampled
        (the amplification by sampling assumes the draw is secret)."""
        seq = np.random.SeedSequence(self._noise_key, spawn_key=(_DRAW_DOMAIN, int(round_no)))
        return np.random.default_rng(seq)

    def record(self, version: int, event: PrivacyEvent, out: list[Effect]) -> None:
        """Model ``version`` was published by ``event``: into the ledger (and its log, on
        a live event: ``out`` is empty during a replay), the gauges, and (the budget)
        whether another such release still fits. Call it before the model is sent."""
        release = self.ledger.record(version, event)
        # The clip rides in the log record too: a restart checks z, q and C against it.
        log = {**release.to_record(), "clip": self.config.clip}
        out.append(Persist(PRIVACY_LOG_KEY, log, append=True))
        if self._left is not None and self._left[0] == event and self._left[1] > 0:
            self._left = (event, self._left[1] - 1)
        else:
            self._left = None
        self.report(out)
        if not self.fits(event):
            self._exhausted = True  # said on the next live event (``stops``)

    def report(self, out: list[Effect]) -> None:
        """The gauges ``privacy_epsilon`` (ε at δ so far) and ``privacy_budget``."""
        out.append(Metric("privacy_epsilon", self.ledger.epsilon(self.config.delta)))
        if self.config.epsilon_budget is not None:
            out.append(Metric("privacy_budget", self.config.epsilon_budget))

    # ---------------------------------------------------------- durability
    def snapshot(self) -> dict[str, Any]:
        return {
            **self.ledger.to_records(),
            "noise_key": self._noise_key.to_bytes(32, "big"),
            "exhausted": self._exhausted,
            # The configuration in force when this was written, for ``fedloom privacy``
            # (a restore uses the current one).
            "delta": self.config.delta,
            "epsilon_budget": self.config.epsilon_budget,
            "accountant": self.config.accountant,
            "noise_multiplier": self.config.noise_multiplier,
            "clip": self.config.clip,
            "pending_q": self.pending_q,
        }

    def restore(self, state: Any) -> None:
        """Load ``snapshot()`` output; LedgerError for anything else."""
        if not isinstance(state, Mapping):
            raise LedgerError("privacy state: expected a mapping")
        key = state.get("noise_key")
        if not isinstance(key, bytes) or len(key) != 32:
            raise LedgerError("privacy state: noise_key must be 32 bytes")
        self.ledger = PrivacyLedger.from_records(state, self.config.accountant)
        self._noise_key = int.from_bytes(key, "big")
        self._left = None
        self._told = False
        self._reported = False
        self._replay_logged = None
        q = state.get("pending_q", self.sampling_rate)
        if q is not None and (isinstance(q, bool) or not isinstance(q, int | float)):
            raise LedgerError("privacy state: pending_q must be a number or None")
        self.pending_q = None if q is None else float(q)
        # Recomputed, not trusted: the budget in force now over the restored ledger (a
        # raised budget lets a stopped root go on; a lowered one stops it).
        self._exhausted = not self.fits(self.event(self.sampling_rate))


def recorded_noise(rec: Mapping[str, Any]) -> tuple[float, float, int, int] | None:
    """The members' noise (σ_member, C, f, d) a secure cohort's durable record carries
    (``noise``, written by a root with central DP); None when it carries none. A replay
    records the cohort's release with it, not with the [privacy] in force after a restart
    (the cohort's noise was what its members added then)."""
    raw = rec.get("noise")
    if not isinstance(raw, list | tuple) or len(raw) != 4:
        return None
    sigma, clip, bits, dim = raw
    return float(sigma), float(clip), int(bits), int(dim)


def _logged(records: Any) -> list[Mapping[str, Any]]:
    if records is None:
        return []
    return [
        rec
        for rec in records.records(PRIVACY_LOG_KEY)
        if isinstance(rec, Mapping) and isinstance(rec.get("version"), int)
    ]


def restore_privacy(
    dp: DpRelease | None, state: Mapping[str, Any], version: int, records: Any = None
) -> None:
    """Restore ``dp`` from an aggregator checkpoint ``state`` at model ``version`` (then
    replay ``records``, then ``check_privacy_log``). ValueError (one line) when:

    * ``dp`` is None (no [privacy] now) but the checkpoint holds a privacy ledger or the
      log private releases: the root would publish un-noised models and drop the ledger;
    * the checkpoint has no ledger and ``version`` > 0: models were published without DP;
    * the ledger ends below ``version`` (every version of a private root is a release:
      those above were published unaccounted for, e.g. by ``fedloom state reseed``)."""
    privacy = state.get("privacy")
    if dp is None:
        logged = _logged(records)
        if privacy is not None or logged:
            n = len(logged)
            if isinstance(privacy, Mapping) and isinstance(privacy.get("releases"), list):
                n = max(n, len(privacy["releases"]))
            raise ValueError(
                f"this root ran with [privacy] (its state records {n} private releases): "
                "restarting it without [privacy] would publish un-noised models and drop "
                "the privacy ledger; put the [privacy] table back (or start a new federation "
                "in a fresh state directory)"
            )
        return
    if privacy is None:
        if version > 0:
            raise ValueError(
                f"this root published {version} model versions without differential privacy: "
                "no privacy ledger can bound them; start a new federation (a fresh state "
                "directory) to run with [privacy]"
            )
    else:
        dp.restore(privacy)
        last = dp.ledger.last_version or 0
        if last < version:
            raise ValueError(
                f"the checkpoint's privacy ledger ends at version {last} but its model is at "
                f"version {version}: versions {last + 1}..{version} were published without "
                "being accounted for (e.g. `fedloom state reseed --above` on a private "
                "root); restore the state directory from a backup or start a new federation"
            )
    dp._replay_logged = frozenset(int(r["version"]) for r in _logged(records))
    dp._restored_version = version


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return isinstance(a, int | float) and math.isclose(float(a), float(b), rel_tol=1e-12)


def check_privacy_log(dp: DpRelease | None, records: Any) -> None:
    """After a restore's replay: every release the root logged (``PRIVACY_LOG_KEY``) must be
    in the rebuilt ledger with the same z and q, and one made after the checkpoint (so
    rebuilt by replaying it now) with the clip in force now. The log is written after the
    "applied" record that caused the release, so a crash cannot leave one without the
    other. A logged release the replay did not rebuild means "applied" records were lost
    (a repaired log); one rebuilt with another z, q or C means the configuration changed
    across the restart (its models would be re-released with other noise and its ε
    misrecorded): refuse (ValueError naming the field) rather than under-count ε. Ends
    the replay: the budget in force now decides from here on."""
    if dp is None:
        return
    dp._replay_logged = None
    rebuilt = {r.version: r for r in dp.ledger.releases}
    lost: list[int] = []
    for rec in _logged(records):
        v = int(rec["version"])
        r = rebuilt.get(v)
        if r is None:
            lost.append(v)
            continue
        changed = [
            (field, was, now)
            for field, was, now in (
                ("noise_multiplier (z)", rec.get("z"), r.z),
                ("sampling rate (q)", rec.get("q"), r.q),
                ("clip", rec.get("clip", dp.config.clip), dp.config.clip),
            )
            if not _same(was, now) and (field != "clip" or v > dp._restored_version)
        ]
        if changed:
            field, was, now = changed[0]
            raise ValueError(
                f"privacy.{field.split()[0]} changed across the restart: model version {v} "
                f"was released with {field} = {was!r}, replaying it now gives {now!r}; a "
                "replay would re-release it with other noise (and misrecord epsilon): "
                "restore the [privacy] values it ran with, or start a new federation"
            )
    if lost:
        raise ValueError(
            f"the log records private releases of model versions {sorted(lost)[:5]} that "
            "replaying its 'applied' records does not rebuild (records were lost, e.g. by "
            "`fedloom state repair`): the privacy ledger would under-count epsilon; restore "
            "the state directory from a backup or start a new federation"
        )
    # Recomputed, not trusted: the budget in force now over the rebuilt ledger.
    dp._left = None
    dp._exhausted = not dp.fits(dp.event(dp.sampling_rate))
