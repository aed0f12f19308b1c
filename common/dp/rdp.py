"""The Rényi-DP bound: analytic, fast, always an upper bound, looser than PRV and PLD.

Mironov 2017, "Rényi Differential Privacy", CSF, arXiv:1702.07476; Mironov, Talwar & Zhang
2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530; the
RDP → (ε, δ) conversion of Balle et al. 2020 (AISTATS, arXiv:1905.09982, Thm. 21), all from
``opacus.accountants.analysis.rdp``, over :data:`RDP_ORDERS`. See ``docs/accounting.md``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.dp.checks import check_delta, finite_epsilon
from common.dp.events import DpEvent, merge_events

__all__ = ["RDP_ORDERS", "rdp_epsilon"]

OPACUS_ORDERS: Final[tuple[float, ...]] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
"""Opacus' default Rényi orders (1.1 … 10.9, 12 … 63)."""

RDP_ORDERS: Final[tuple[float, ...]] = tuple(sorted({*OPACUS_ORDERS, 11.0, 128.0, 256.0, 512.0}))
"""Rényi orders α: Opacus's default grid (1.1 … 10.9, 12 … 63) plus 11, 128, 256 and 512."""

_OPACUS_MASK: Final = np.isin(np.array(RDP_ORDERS), np.array(OPACUS_ORDERS))


@functools.lru_cache(maxsize=4096)
def rdp_per_step(noise_multiplier: float, sample_rate: float) -> npt.NDArray[np.float64]:
    """RDP of one step of the sampled Gaussian mechanism at every order of RDP_ORDERS.

    Cached (read-only): a ledger repeats the same (σ, q) many times, and RDP composes
    additively, so a history's curve is Σ steps · per-step curve (what ``compute_rdp`` does).
    """
    curve = np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
        ),
        dtype=np.float64,
    )
    curve.flags.writeable = False
    return curve


def rdp_curve(merged: Sequence[DpEvent]) -> npt.NDArray[np.float64]:
    """The RDP of the composition of ``merged`` at every order of RDP_ORDERS."""
    total = np.zeros(len(RDP_ORDERS))
    for e in merged:
        total += e.steps * rdp_per_step(e.noise_multiplier, e.sample_rate)
    return total


def rdp_to_epsilon(
    curve: npt.NDArray[np.float64], delta: float, *, opacus_grid: bool = False
) -> float:
    """ε at ``delta`` of an RDP curve over RDP_ORDERS (only Opacus' orders if ``opacus_grid``);
    may be infinite or NaN."""
    orders = np.array(RDP_ORDERS)
    if opacus_grid:
        orders, curve = orders[_OPACUS_MASK], curve[_OPACUS_MASK]
    with np.errstate(invalid="ignore", over="ignore"), warnings.catch_warnings():
        # "Optimal order is the smallest/largest alpha" only says the bound could be
        # tighter with a wider grid; it is still a valid upper bound.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=list(curve), delta=delta)
    return float(eps)


def rdp_raw(merged: Sequence[DpEvent], delta: float) -> float:
    """RDP ε (may be inf/NaN) of already merged events; 0.0 for none."""
    if not merged:
        return 0.0
    return rdp_to_epsilon(rdp_curve(merged), delta)


def rdp_epsilon(events: Sequence[DpEvent], *, delta: float) -> float:
    """Fast, conservative ε at ``delta`` by Rényi DP (Mironov 2017; Balle et al. 2020).

    Always an upper bound, typically 5-10% above PRV/PLD for DP-SGD histories; used to project
    a task's cost before training. Raises :class:`~common.errors.PrivacyAccountingError` on a
    non-finite result and ``ValueError`` on bad arguments.
    """
    check_delta(delta)
    return finite_epsilon(rdp_raw(merge_events(events), delta), "RDP")
