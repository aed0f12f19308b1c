"""The privacy-loss-distribution bound (Google's ``dp_accounting``, pessimistic rounding).

Koskela, Jälkö & Honkela 2020, "Computing Tight Differential Privacy Guarantees Using FFT",
AISTATS; Doroshenko, Ghazi, Kamath, Kumar & Manurangsi 2022, "Connect the Dots: Tighter
Discrete Approximations of Privacy Loss Distributions", PETS. The value discretisation interval
is chosen as ``docs/accounting.md``, "PLD" derives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import dp_accounting
from dp_accounting.pld import PLDAccountant

from common.dp.events import DpEvent

__all__ = ["PLD_MAX_COMPOSITIONS", "PLD_MAX_EVENTS", "pld_epsilon"]

PLD_MAX_COMPOSITIONS: Final = 10**6
"""Most subsampled compositions (steps with q < 1) PLD composes; beyond, the RDP bound
(measured: 10⁶ compositions take up to ≈ 2 s, 10⁷ up to 85 s)."""

PLD_MAX_EVENTS: Final = 256
"""Most distinct events PLD composes; beyond, the RDP bound."""

_PLD_VALUE_DISCRETIZATION: Final = 1e-3


def _pld_dp_event(e: DpEvent) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(e.noise_multiplier)
    inner: dp_accounting.DpEvent = (
        gaussian
        if e.sample_rate == 1.0
        else dp_accounting.PoissonSampledDpEvent(e.sample_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(inner, e.steps)


def pld_epsilon(merged: Sequence[DpEvent], delta: float, scale: float) -> float:
    """Pessimistic PLD ε of merged events (may be inf/NaN); ``scale`` (an upper bound on ε,
    the RDP bound) sizes the grid. Raises what ``dp_accounting`` raises."""
    return _pld_epsilon_at(merged, delta, pld_discretization(merged, scale))


def pld_discretization(merged: Sequence[DpEvent], scale: float) -> float:
    """Value discretisation interval for PLD: 0.05/√k for k subsampled compositions, within
    [2e-5, 1e-3], widened to ``scale`` / 50,000 for very large ε (``docs/accounting.md``)."""
    k = sum(e.steps if e.sample_rate < 1.0 else 1 for e in merged)
    fine = min(_PLD_VALUE_DISCRETIZATION, max(2e-5, 0.05 / math.sqrt(k)))
    return max(fine, scale / 50_000.0)


def _pld_epsilon_at(merged: Sequence[DpEvent], delta: float, vdi: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=vdi)
    accountant.compose(dp_accounting.ComposedDpEvent([_pld_dp_event(e) for e in merged]))
    return float(accountant.get_epsilon(delta))
