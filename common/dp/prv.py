"""The PRV bound (Gopi, Lee & Wutschitz 2021, NeurIPS, arXiv:2106.02848), as Opacus computes it,
on a grid that a growing history keeps.

:func:`prv_epsilon` returns ``(eps_upper, eps_estimate)`` of Opacus' ``analysis.prv`` (the
upper bound already includes the numerical error) or raises :class:`PrvUnavailable` when PRV
cannot give a finite bound within :data:`PRV_MAX_DOMAIN_SIZE` / :data:`PRV_MAX_WORK` or at a δ
below the grid's float64 resolution; the caller then falls back to PLD. The grid is sized for
each event's steps rounded up to a power of two, so a history that grows round by round reuses
its grid and its cached one-step discretisations, and a further round costs one FFT
self-composition. Why each choice keeps the bound sound: ``docs/accounting.md``, "PRV".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from opacus.accountants.analysis.prv import (
    DiscretePRV,
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    discretize,
)
from opacus.accountants.analysis.prv.compose import _compose_convolution_tree
from scipy.fft import irfft, next_fast_len, rfft

from common.dp.events import DpEvent
from common.dp.rdp import rdp_curve, rdp_per_step, rdp_raw, rdp_to_epsilon

__all__ = ["PRV_MAX_DOMAIN_SIZE", "PRV_MAX_WORK", "PrvUnavailable", "prv_epsilon"]

PRV_MAX_DOMAIN_SIZE: Final = 2**22
"""Largest PRV grid (points) computed; beyond it (≈ 0.3 GB of work arrays) PLD is used."""

PRV_MAX_WORK: Final = 2**25
"""Most distinct events × grid points PRV composes (one FFT per distinct event); beyond, PLD."""

_PRV_DELTA_ERROR_FRACTION: Final = 1e-3  # delta_error = δ/1000, as Opacus's default
_PRV_RELATIVE_ERROR: Final = 3e-3  # eps_error = 0.3% of the RDP bound (clipped to [1e-3, 0.5])

_DISCRETIZED_CACHE_MAX_SIZE: Final = 2**18
"""Discretised PRVs on grids up to this many points (about 6 MiB with their transform) are
kept, at most 16."""


class PrvUnavailable(Exception):
    """PRV cannot give a bound for this input; the caller falls back to PLD."""


def safe_half_width(merged: Sequence[DpEvent], eps_error: float, delta_error: float) -> float:
    """Half-width L of the PRV grid: Opacus's ``compute_safe_domain_size``, from cached RDP.

    Same rule (Gopi et al. 2021, Remark 5.6, as in Opacus and microsoft/prv_accountant): L
    bounds the RDP ε of the whole composition at δ_error/4 and of every single step at
    δ_error/(8·total steps), over Opacus's default orders; plus a margin of 3.
    """
    total = sum(e.steps for e in merged)
    half_width = rdp_to_epsilon(rdp_curve(merged), delta_error / 4, opacus_grid=True)
    for e in merged:
        one_step = rdp_per_step(e.noise_multiplier, e.sample_rate)
        half_width = max(
            half_width,
            rdp_to_epsilon(one_step, delta_error / (8 * total), opacus_grid=True),
        )
    return max(half_width, eps_error) + 3


def _prv_domain(
    merged: Sequence[DpEvent],
    eps_error: float,
    delta_error: float,
    *,
    eps_error_at_most: float | None = None,
) -> Domain:
    """The PRV grid of Gopi et al. (Remark 5.6), as ``PRVAccountant._get_domain`` builds it.

    Same half-width L and the required mesh; the number of points is then rounded up to an
    FFT-friendly even size, which only makes the mesh finer (more accurate). The mesh is
    sized for ``eps_error``, the half-width for ``eps_error_at_most`` (default ``eps_error``),
    an upper bound on the error the result will be read with (:func:`prv_epsilon`).
    """
    half_width = safe_half_width(
        merged, eps_error if eps_error_at_most is None else eps_error_at_most, delta_error
    )
    if not math.isfinite(half_width):
        raise PrvUnavailable(f"the PRV grid half-width is {half_width}")
    mesh = eps_error / math.sqrt(sum(e.steps for e in merged) * math.log(12 / delta_error) / 2)
    # Domain.create_aligned(-L, L, mesh) gives t_min = -k·mesh, t_max = (k+1)·mesh, 2k+2 points.
    k = math.ceil(half_width / mesh)
    if 2 * k + 2 > PRV_MAX_DOMAIN_SIZE:
        raise PrvUnavailable(f"the PRV grid would need {2 * k + 2:,} points")
    if len(merged) * (2 * k + 2) > PRV_MAX_WORK:
        raise PrvUnavailable(
            f"{len(merged)} distinct events on a {2 * k + 2:,}-point grid exceed PRV_MAX_WORK"
        )
    size = next_fast_len(2 * k + 2, real=True)
    size += size % 2
    k = (size - 2) // 2
    dt = half_width / k  # ≤ mesh, since k only grew
    return Domain(t_min=-k * dt, t_max=(k + 1) * dt, size=size)


def _grid_history(merged: Sequence[DpEvent]) -> list[DpEvent]:
    """The history the PRV grid is sized for: each event's steps rounded up to a power of 2
    (a grid for more steps is valid for fewer: ``docs/accounting.md``, "PRV")."""
    return [
        DpEvent(e.noise_multiplier, e.sample_rate, 1 << (e.steps - 1).bit_length()) for e in merged
    ]


@dataclass(frozen=True)
class _Discretized:
    """One step of an event discretised on a grid, with the real FFT of its pmf."""

    dprv: DiscretePRV
    spectrum: npt.NDArray[np.complex128]


@functools.lru_cache(maxsize=16)
def _discretized_cached(
    noise_multiplier: float, sample_rate: float, t_min: float, t_max: float, size: int
) -> _Discretized:
    return _discretize(noise_multiplier, sample_rate, Domain(t_min, t_max, size))


def _discretize(noise_multiplier: float, sample_rate: float, domain: Domain) -> _Discretized:
    prv = PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier)
    dprv = discretize(TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max), domain)
    dprv.pmf.flags.writeable = False
    spectrum = np.asarray(rfft(dprv.pmf))
    spectrum.flags.writeable = False
    return _Discretized(dprv, spectrum)


def _discretized(e: DpEvent, domain: Domain) -> _Discretized:
    """One step of ``e`` discretised on ``domain`` (cached for grids of moderate size; the
    composition only reads it)."""
    if domain.size > _DISCRETIZED_CACHE_MAX_SIZE:
        return _discretize(e.noise_multiplier, e.sample_rate, domain)
    return _discretized_cached(
        e.noise_multiplier, e.sample_rate, domain.t_min, domain.t_max, domain.size
    )


def _integer_power(z: npt.NDArray[np.complex128], k: int) -> npt.NDArray[np.complex128]:
    """``z ** k`` by repeated squaring: ⌊log₂ k⌋ + popcount(k) products instead of a complex
    ``pow`` (an ``exp`` and a ``log``) per entry, about ten times faster."""
    result: npt.NDArray[np.complex128] | None = None
    base = z
    while True:
        if k & 1:
            result = base if result is None else result * base
        k >>= 1
        if not k:
            break
        base = base * base
    assert result is not None
    return result


def _self_compose(one: _Discretized, k: int) -> DiscretePRV:
    """``k``-fold self-composition: Opacus' ``_compose_fourier`` (the same roll and domain
    shift) on the cached spectrum; ``tests/unit/test_incremental_accounting.py`` checks it
    against Opacus."""
    dprv = one.dprv
    size = len(dprv.pmf)
    composed = irfft(_integer_power(one.spectrum, k), n=size)
    m = k - 1
    if k % 2 == 0:
        m += size // 2
    composed = np.roll(composed, m)
    return DiscretePRV(pmf=composed, domain=dprv.domain.shift_right(dprv.domain.shifts * (k - 1)))


def _compose(merged: Sequence[DpEvent], domain: Domain) -> DiscretePRV:
    """Opacus' ``compose_heterogeneous`` (FFT self-compositions, then a convolution tree)."""
    composed = [_self_compose(_discretized(e, domain), e.steps) for e in merged]
    return _compose_convolution_tree(composed)


@dataclass(frozen=True)
class _Grid:
    domain: Domain
    eps_error_mesh: float
    eps_error_up: float


@functools.lru_cache(maxsize=256)
def _grid_for(grid_history: tuple[DpEvent, ...], delta: float) -> _Grid:
    """The grid for every history whose steps round up to ``grid_history``'s (see
    :func:`prv_epsilon`); cached, since it does not move while such a history grows."""
    half_history = [
        DpEvent(e.noise_multiplier, e.sample_rate, max(1, e.steps // 2)) for e in grid_history
    ]
    eps_error_mesh = _prv_eps_error(rdp_raw(half_history, delta))
    eps_error_up = _prv_eps_error(rdp_raw(grid_history, delta))
    domain = _prv_domain(
        grid_history,
        eps_error_mesh,
        delta * _PRV_DELTA_ERROR_FRACTION,
        eps_error_at_most=eps_error_up,
    )
    return _Grid(domain, eps_error_mesh, eps_error_up)


def _prv_eps_error(scale: float) -> float:
    """The ε error PRV is run with: 0.3% of the RDP bound, within [1e-3, 0.5] (non-decreasing;
    a non-finite scale gives 0.5, and the grid check then refuses)."""
    return min(0.5, max(1e-3, _PRV_RELATIVE_ERROR * scale)) if math.isfinite(scale) else 0.5


def prv_epsilon(merged: Sequence[DpEvent], delta: float, scale: float) -> tuple[float, float]:
    """(eps_upper, eps_estimate) by Opacus's PRV analysis of merged events; ``scale`` is the
    RDP bound. Raises :class:`PrvUnavailable`.

    The grid and ``ε_error`` are sized for :func:`_grid_history` (steps rounded up to powers
    of 2), the composition is of ``merged`` itself."""
    eps_error = _prv_eps_error(scale)
    delta_error = delta * _PRV_DELTA_ERROR_FRACTION
    # Every event's steps k lie in (K/2, K] for its power of two K (or k = K = 1), and ε grows
    # with the steps, so ε_error(half) ≤ ε_error ≤ ε_error(grid): a mesh sized for the first
    # over the grid's steps is finer than ``merged`` needs, a half-width sized for the last
    # is wider. Neither moves while the history grows within its powers of two.
    try:
        # q == 1 makes log(1 − q) = −inf inside the PRV's pdf/cdf; that is the intended branch.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            grid = _grid_for(tuple(_grid_history(merged)), delta)
            if not grid.eps_error_mesh <= eps_error <= grid.eps_error_up:  # cannot happen
                raise PrvUnavailable("the ε error lies outside its power-of-two bucket")
            domain = grid.domain
            # The FFT composition runs in float64, so rounding error in the tail sums is about
            # eps64 · size; Opacus guards with longdouble's eps, which is too lax on x86
            # (observed: δ=1e-13, 10,000 steps: 12.39 against PLD's 10.99). Require float64.
            if np.finfo(np.float64).eps * domain.size > delta - delta_error:
                raise PrvUnavailable(
                    f"δ={delta:g} is below the float64 resolution of a {domain.size:,}-point grid"
                )
            dprv = _compose(merged, domain)
            _, eps_estimate, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    except (ValueError, RuntimeError, FloatingPointError, MemoryError) as err:
        raise PrvUnavailable(str(err)) from err
    upper, estimate = float(eps_upper), float(eps_estimate)
    if not (math.isfinite(upper) and math.isfinite(estimate)):
        raise PrvUnavailable(f"PRV returned ε_upper = {upper}")
    # ε ≥ 0 always holds; a small negative upper bound is discretisation noise near ε = 0.
    return max(upper, 0.0), max(estimate, 0.0)
