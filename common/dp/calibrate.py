"""The smallest noise multiplier σ that keeps a history within a target ε.

:func:`calibrate_noise_multiplier` returns a σ at which
:func:`~common.dp.accounting.compute_epsilon` was *evaluated* and found within the target (it
errs towards more noise), or raises :class:`~common.errors.PrivacyAccountingError` when even
σ = 1000 is too little. The search: ``docs/accounting.md``, "Calibration".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Final

from common.dp.accounting import check_accountant, compute_epsilon
from common.dp.checks import check_delta
from common.dp.events import DpEvent, check_events, merge_events
from common.dp.rdp import rdp_raw
from common.errors import PrivacyAccountingError

__all__ = ["calibrate_noise_multiplier"]

_SIGMA_SEARCH_MIN: Final = 1e-2
_SIGMA_SEARCH_MAX: Final = 1000.0


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    prior_events: Sequence[DpEvent] = (),
    accountant: str = "prv",
) -> float:
    """The smallest σ keeping ``prior_events`` + ``DpEvent(σ, q, steps)`` within the target.

    Conservative: the returned σ is one at which ``compute_epsilon`` of the composed history
    at ``delta``, with the same accountant, was evaluated and found ≤ ``target_epsilon``; the
    search stops once that ε is within 0.2% of the target (or σ is pinned to 0.1%). The search
    covers σ in [0.01, 1000]; if even σ = 1000 exceeds the target (for instance because the
    prior spend is already past it), :class:`PrivacyAccountingError` is raised.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, Real):
        raise ValueError(f"The target ε must be a number, got {target_epsilon!r}.")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"The target ε must be positive and finite, got {target_epsilon}.")
    check_delta(delta)
    check_accountant(accountant)
    DpEvent(1.0, sample_rate, steps)  # validates q and steps with the event's messages
    prior = check_events(prior_events)
    target = float(target_epsilon)

    def epsilon_at(sigma: float) -> float:
        history = [*prior, DpEvent(sigma, sample_rate, steps)]
        try:
            return compute_epsilon(history, delta=delta, accountant=accountant).epsilon
        except PrivacyAccountingError:
            return math.inf  # no finite bound: infeasible

    def rdp_at(sigma: float) -> float:
        return rdp_raw(merge_events([*prior, DpEvent(sigma, sample_rate, steps)]), delta)

    def impossible(eps_max: float) -> PrivacyAccountingError:
        try:
            prior_eps = f"{compute_epsilon(prior, delta=delta, accountant=accountant).epsilon:.4g}"
        except PrivacyAccountingError:
            prior_eps = "unbounded"
        return PrivacyAccountingError(
            f"No noise multiplier up to {_SIGMA_SEARCH_MAX:g} keeps ε at δ={delta:g} within "
            f"the target {target:g}: σ={_SIGMA_SEARCH_MAX:g} gives ε={eps_max:.4g} "
            f"(the prior spend alone is ε={prior_eps})."
        )

    # 1. Feasible end. RDP bounds the tight accountants from above, so the RDP-calibrated σ
    #    (cheap: cached RDP curves) is feasible for them too, and their σ lies a little below.
    if not rdp_at(_SIGMA_SEARCH_MAX) <= target:
        hi, eps_hi = _SIGMA_SEARCH_MAX, epsilon_at(_SIGMA_SEARCH_MAX)
    else:
        hi, _ = _illinois(rdp_at, target, _SIGMA_SEARCH_MIN, _SIGMA_SEARCH_MAX, rtol=1e-2)
        eps_hi = epsilon_at(hi)
        while not eps_hi <= target and hi < _SIGMA_SEARCH_MAX:  # numerical error near RDP
            hi = min(_SIGMA_SEARCH_MAX, hi * 1.25)
            eps_hi = epsilon_at(hi)
    if not eps_hi <= target:
        raise impossible(eps_hi)
    if accountant == "rdp":
        lo = hi / (1 + 1e-2)
        return _illinois(epsilon_at, target, lo, hi, rtol=1e-3, eps_hi=eps_hi)[0]
    # 2. Infeasible end, stepping down from the RDP answer.
    lo = hi
    while True:
        if lo <= _SIGMA_SEARCH_MIN:
            return hi  # even the smallest σ searched meets the target
        lo = max(_SIGMA_SEARCH_MIN, lo * 0.85)
        eps_lo = epsilon_at(lo)
        if not eps_lo <= target:
            break
        hi, eps_hi = lo, eps_lo
    # 3. Refine inside [lo, hi].
    return _illinois(epsilon_at, target, lo, hi, rtol=1e-3, eps_lo=eps_lo, eps_hi=eps_hi)[0]


def _illinois(
    epsilon_at: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    *,
    rtol: float,
    eps_lo: float | None = None,
    eps_hi: float | None = None,
) -> tuple[float, float]:
    """(σ, ε(σ)) for the smallest evaluated feasible σ (ε ≤ target) found in ``[lo, hi]``.

    ε(σ) is decreasing; ``hi`` must be feasible (else it is returned as is). Regula falsi with
    the Illinois modification on (log σ, log ε), falling back to geometric bisection where ε
    is infinite or zero. Stops when ε(hi) is within 0.2% below the target or hi/lo ≤ 1 + rtol;
    the answer is always an evaluated feasible point, so it errs towards more noise.
    """
    if eps_hi is None:
        eps_hi = epsilon_at(hi)
    if not eps_hi <= target:
        return hi, eps_hi
    if eps_lo is None:
        eps_lo = epsilon_at(lo)
    if eps_lo <= target:
        return lo, eps_lo
    log_target = math.log(target)

    def log_gap(eps: float) -> float:
        return math.log(eps) - log_target if 0 < eps < math.inf else math.nan

    f_lo, f_hi = log_gap(eps_lo), log_gap(eps_hi)
    side = 0
    for _ in range(100):
        if hi / lo <= 1 + rtol or eps_hi >= target * (1 - 2e-3):
            break
        x_lo, x_hi = math.log(lo), math.log(hi)
        x = (x_lo + x_hi) / 2
        if math.isfinite(f_lo) and math.isfinite(f_hi) and f_lo != f_hi:
            x_secant = x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
            if x_lo < x_secant < x_hi:
                x = x_secant
        mid = min(max(math.exp(x), lo * (1 + rtol / 4)), hi / (1 + rtol / 4))
        eps_mid = epsilon_at(mid)
        if eps_mid <= target:  # NaN counts as infeasible
            hi, eps_hi, f_hi = mid, eps_mid, log_gap(eps_mid)
            if side == 1:
                f_lo /= 2
            side = 1
        else:
            lo, f_lo = mid, log_gap(eps_mid)
            if side == -1:
                f_hi /= 2
            side = -1
    return hi, eps_hi
