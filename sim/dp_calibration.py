"""Noise calibration for user-level DP: the z that spends a target ε over a planned run.

``calibrate_noise(target, delta, releases, q)`` bisects the noise multiplier z (in log
space; ε falls as z grows) with the privacy ledger's own accountant
(``algorithms.dp.ledger.PrivacyLedger.epsilon_if``): the z it returns gives ε at δ of at
most ``target`` after ``releases`` releases of the Gaussian mechanism, each on a Poisson
sample of the sites at rate ``q`` (None: no amplification, as FedBuff claims), and within
``rtol`` of it. A scenario arm asks for it with ``target_epsilon`` and ``releases`` in
its ``[privacy]`` table (``sim.scenario``); the bench does the same.
"""

from __future__ import annotations

import math

from fedloom.algorithms.dp.ledger import Z_MAX, Z_MIN, PrivacyEvent, PrivacyLedger

__all__ = ["calibrate_noise", "epsilon_after"]


def epsilon_after(
    z: float, delta: float, releases: int, q: float | None = None, accountant: str = "rdp"
) -> float:
    """ε at ``delta`` after ``releases`` releases with noise multiplier ``z``."""
    return PrivacyLedger(accountant).epsilon_if(PrivacyEvent(z, q), delta, releases)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    releases: int,
    q: float | None = None,
    *,
    accountant: str = "rdp",
    rtol: float = 1e-3,
) -> float:
    """The smallest z (within ``rtol``) whose ``releases`` releases spend at most
    ``target_epsilon`` at ``delta``. ValueError when no z in [Z_MIN, Z_MAX] does."""
    if not (0.0 < target_epsilon < math.inf):
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon!r}")
    if releases < 1:
        raise ValueError(f"releases must be >= 1, got {releases!r}")
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    ledger = PrivacyLedger(accountant)

    def eps(z: float) -> float:
        return ledger.epsilon_if(PrivacyEvent(z, q), delta, releases)

    if eps(Z_MAX) > target_epsilon:
        raise ValueError(
            f"epsilon {target_epsilon:g} at delta {delta:g} over {releases} releases needs "
            f"a noise multiplier above {Z_MAX:g}"
        )
    if eps(Z_MIN) <= target_epsilon:
        return Z_MIN
    lo, hi = Z_MIN, Z_MAX  # eps(lo) > target >= eps(hi)
    while hi / lo > 1.0 + rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
