"""Privacy accounting: turn a site's recorded DP events into a sound (ε, δ) upper bound.

Specification
=============

What is accounted
-----------------
Every release a site makes is a *Poisson-subsampled Gaussian mechanism* with L2 sensitivity 1
(after clipping), recorded as a frozen :class:`DpEvent` ``(σ, q, steps)``:

* a DP-SGD task (Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS,
  arXiv:1607.00133): ``steps`` noisy gradient steps, each over a Poisson sample with rate
  ``q``, with Gaussian noise of standard deviation ``σ`` times the clipping norm;
* a noised metric release: the plain Gaussian mechanism, ``q == 1.0``.

Neighbouring datasets differ by adding or removing one record, as in Opacus and
dp-accounting's default. All events on one dataset compose adaptively (sites hold disjoint
records, so composition is per dataset, never across sites).

What is returned
----------------
:func:`compute_epsilon` returns an :class:`EpsilonBound` whose ``epsilon`` is an *upper bound*
on the ε of the composed mechanism at the given δ: the numerical error of the accountant is
already added, never subtracted. An empty history costs ε = 0. When no finite bound exists
(NaN or infinity from every accountant) :class:`~common.errors.PrivacyAccountingError` is
raised: nothing may be released on it. The Gaussian-DP (μ-GDP / CLT) approximation is never
used: it is an approximation, not a bound (at q=0.01, σ=1, 10,000 steps, δ=1e-5 it gives 6.01
while the true ε is about 6.19).

Accountants (``accountant=``)
-----------------------------
``"prv"`` (default)
    Numerical composition of privacy loss random variables: Gopi, Lee & Wutschitz 2021,
    "Numerical Composition of Differential Privacy", NeurIPS, arXiv:2106.02848, as implemented
    by Opacus (``opacus.accountants.PRVAccountant`` and its ``analysis.prv`` package). The
    reported ε is the accountant's ``eps_upper`` (estimate + ``eps_error``, evaluated at
    δ − ``delta_error``, with ``delta_error`` = δ/1000); ``epsilon_estimate`` is its point
    estimate. The grid is built as ``PRVAccountant._get_dprv`` builds it (same half-width rule,
    computed from cached RDP curves), with two changes that only make it finer: the number of
    points is rounded up to a size the FFT handles quickly, and ``eps_error`` scales with ε
    (0.3% of the RDP bound, within [1e-3, 0.5]) instead of a fixed 0.01, so small budgets keep
    their relative accuracy and large ones stay affordable. The grid is sized for each event's
    steps rounded up to a power of two (finer and wider than needed, never coarser), so a
    history that grows round by round keeps its grid and its cached per-event
    discretisations, and a further round costs one FFT self-composition by repeated squaring
    (issue 19.1: a 200-round job composes in milliseconds per round). PRV falls back to ``"pld"`` (and
    :attr:`EpsilonBound.accountant` says so) when the grid would exceed
    :data:`PRV_MAX_DOMAIN_SIZE` points, when Opacus's PRV code raises or returns a non-finite
    value (observed for very weak noise, e.g. σ=0.05 at q=0.01), or when δ is below the
    float64 resolution of the grid (``eps64 · size > δ − delta_error``; Opacus checks against
    ``longdouble``, which is too lax: at δ=1e-13 and 2,000-10,000 steps its PRV result moves
    by 5-13% with the grid size, below PLD's pessimistic bound on one grid, above on another).
``"pld"``
    Privacy loss distributions (Koskela, Jälkö & Honkela 2020, "Computing Tight Differential
    Privacy Guarantees Using FFT", AISTATS; Doroshenko, Ghazi, Kamath, Kumar & Manurangsi 2022,
    "Connect the Dots: Tighter Discrete Approximations of Privacy Loss Distributions", PETS),
    as implemented by Google's ``dp_accounting.pld.PLDAccountant`` with its pessimistic
    (upper-bound) discretisation. The pessimistic rounding overshoots by about
    0.6 · k · interval² after k subsampled compositions, so the value discretisation interval
    is 0.05/√k (within [2e-5, 1e-3]; widened to ε_RDP / 50,000 for ε in the hundreds, to keep
    the support small). When PLD gives no finite bound (δ below the tail mass it truncates,
    e.g. δ=1e-15 over 2,000 steps), the RDP bound is reported.
``"rdp"``
    Rényi DP (Mironov 2017, "Rényi Differential Privacy", CSF, arXiv:1702.07476; Mironov,
    Talwar & Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
    arXiv:1908.10530) with the RDP → (ε, δ) conversion of Balle et al. 2020 (AISTATS,
    arXiv:1905.09982, Thm. 21), from ``opacus.accountants.analysis.rdp``, over Opacus's order
    grid extended with orders 11, 128, 256 and 512. Looser (≈ 6.71 instead of ≈ 6.19 in the
    example above) but analytic, fast and always an upper bound: the site uses it to project a
    task's cost before it trains (:func:`rdp_epsilon`).

All three are upper bounds, so the smaller of two is one too: a PRV or PLD result above the
RDP bound (a sign of numerical trouble) is replaced by the RDP bound, labelled ``"rdp"``.

Events with identical ``(σ, q)`` are merged (their steps summed) before accounting, which is
exact: self-composition is composition. It keeps a ledger of a thousand jobs fast.

Cost
----
Every call is bounded in time whatever the events say (a history claiming 10⁹ steps would
otherwise make the orchestrator compose for hours): PRV runs only when its grid has at most
:data:`PRV_MAX_DOMAIN_SIZE` points and distinct events × grid points stay within
:data:`PRV_MAX_WORK`; PLD only for at most :data:`PLD_MAX_COMPOSITIONS` subsampled
compositions over at most :data:`PLD_MAX_EVENTS` distinct events (about 2 s at the limit);
otherwise the RDP bound is reported (analytic: one cached curve per distinct event, however
many steps), labelled ``"rdp"``. Each is an upper bound, so the fallback is sound, only looser.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Final

import dp_accounting
import numpy as np
import numpy.typing as npt
from dp_accounting.pld import PLDAccountant
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import (
    DiscretePRV,
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    discretize,
)
from opacus.accountants.analysis.prv.compose import _compose_convolution_tree
from scipy.fft import irfft, next_fast_len, rfft

from common.errors import PrivacyAccountingError

__all__ = [
    "ACCOUNTANTS",
    "PLD_MAX_COMPOSITIONS",
    "PLD_MAX_EVENTS",
    "PRV_MAX_DOMAIN_SIZE",
    "PRV_MAX_WORK",
    "RDP_ORDERS",
    "DpEvent",
    "EpsilonBound",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "rdp_epsilon",
]

_log = logging.getLogger(__name__)

ACCOUNTANTS: Final = ("prv", "pld", "rdp")
"""Accountant names accepted by :func:`compute_epsilon`."""

_OPACUS_ORDERS: Final[tuple[float, ...]] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)

RDP_ORDERS: Final[tuple[float, ...]] = tuple(sorted({*_OPACUS_ORDERS, 11.0, 128.0, 256.0, 512.0}))
"""Rényi orders α: Opacus's default grid (1.1 … 10.9, 12 … 63) plus 11, 128, 256 and 512."""

_OPACUS_MASK: Final = np.isin(np.array(RDP_ORDERS), np.array(_OPACUS_ORDERS))

PRV_MAX_DOMAIN_SIZE: Final = 2**22
"""Largest PRV grid (points) computed; beyond it (≈ 0.3 GB of work arrays) PLD is used."""

PRV_MAX_WORK: Final = 2**25
"""Most distinct events × grid points PRV composes (one FFT per distinct event); beyond, PLD."""

PLD_MAX_COMPOSITIONS: Final = 10**6
"""Most subsampled compositions (steps with q < 1) PLD composes; beyond, the RDP bound
(measured: 10⁶ compositions take up to ≈ 2 s, 10⁷ up to 85 s)."""

PLD_MAX_EVENTS: Final = 256
"""Most distinct events PLD composes; beyond, the RDP bound."""

_PRV_DELTA_ERROR_FRACTION: Final = 1e-3  # delta_error = δ/1000, as Opacus's default
_PRV_RELATIVE_ERROR: Final = 3e-3  # eps_error = 0.3% of the RDP bound (clipped to [1e-3, 0.5])
_PLD_VALUE_DISCRETIZATION: Final = 1e-3
_SIGMA_SEARCH_MIN: Final = 1e-2
_SIGMA_SEARCH_MAX: Final = 1000.0


MIN_NOISE_MULTIPLIER = 0.01


@dataclass(frozen=True)
class DpEvent:
    """One self-composed Poisson-subsampled Gaussian mechanism.

    ``steps`` compositions of noise multiplier σ at sample rate q. ``q == 1.0`` is the plain
    Gaussian mechanism (e.g. a noised metric release with L2 sensitivity 1 and noise std σ).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if isinstance(sigma, bool) or not isinstance(sigma, Real):
            raise ValueError(f"The noise multiplier must be a number, got {sigma!r}.")
        if not (math.isfinite(sigma) and sigma >= MIN_NOISE_MULTIPLIER):
            # Below this no accountant gives a meaningful bound, and the RDP arithmetic
            # under- or overflows (σ≈1e-160 never returns in Opacus' fractional-α series).
            raise ValueError(
                f"The noise multiplier must be finite and at least {MIN_NOISE_MULTIPLIER}, "
                f"got {sigma}."
            )
        if isinstance(q, bool) or not isinstance(q, Real):
            raise ValueError(f"The sample rate must be a number, got {q!r}.")
        if not (math.isfinite(q) and 0 < q <= 1):
            raise ValueError(f"The sample rate must be in (0, 1], got {q}.")
        if isinstance(steps, bool) or not isinstance(steps, Integral):
            raise ValueError(f"The number of steps must be an integer, got {steps!r}.")
        if steps < 1:
            raise ValueError(f"The number of steps must be at least 1, got {steps}.")
        # Normalise numpy scalars so events hash, compare and serialise as plain Python values.
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(steps))


@dataclass(frozen=True)
class EpsilonBound:
    """A sound upper bound ``epsilon`` on the privacy loss at ``delta``.

    ``accountant`` names the accountant that produced the bound (``"prv"``, ``"pld"`` or
    ``"rdp"``): a request that fell back names the one actually used. ``epsilon_estimate`` is
    the accountant's point estimate where it gives one (PRV; 0.0 for an empty history), never
    to be reported as the guarantee.
    """

    epsilon: float
    delta: float
    accountant: str
    epsilon_estimate: float | None = None


# --------------------------------------------------------------------------- validation


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not isinstance(delta, int | float):
        raise ValueError(f"δ must be a number, got {delta!r}.")
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"δ must be in (0, 1), got {delta}.")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"Unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}.")


def _check_events(events: Iterable[object]) -> list[DpEvent]:
    checked: list[DpEvent] = []
    for e in events:
        if not isinstance(e, DpEvent):
            raise ValueError(f"Expected DpEvent instances, got {type(e).__name__}.")
        checked.append(e)
    return checked


def _merge(events: Sequence[DpEvent]) -> list[DpEvent]:
    """Merge events with identical (σ, q); exact, since self-composition is composition."""
    steps: dict[tuple[float, float], int] = {}
    for e in _check_events(events):
        key = (e.noise_multiplier, e.sample_rate)
        steps[key] = steps.get(key, 0) + e.steps
    return [DpEvent(s, q, n) for (s, q), n in sorted(steps.items())]


def _finite_or_raise(value: float, what: str) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise PrivacyAccountingError(
            f"The {what} accountant returned ε = {v}, which is not a usable bound; "
            "nothing may be released on it."
        )
    return v


# --------------------------------------------------------------------------- RDP


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> npt.NDArray[np.float64]:
    """RDP of one step of the sampled Gaussian mechanism at every order of RDP_ORDERS.

    Cached: a ledger repeats the same (σ, q) many times, and RDP composes additively, so a
    history's curve is Σ steps · per-step curve (exactly what ``compute_rdp`` does).
    """
    curve = np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
        ),
        dtype=np.float64,
    )
    curve.flags.writeable = False
    return curve


def _rdp_curve(merged: Sequence[DpEvent]) -> npt.NDArray[np.float64]:
    total = np.zeros(len(RDP_ORDERS))
    for e in merged:
        total += e.steps * _rdp_per_step(e.noise_multiplier, e.sample_rate)
    return total


def _rdp_to_epsilon(
    curve: npt.NDArray[np.float64], delta: float, *, opacus_grid: bool = False
) -> float:
    orders = np.array(RDP_ORDERS)
    if opacus_grid:
        orders, curve = orders[_OPACUS_MASK], curve[_OPACUS_MASK]
    with np.errstate(invalid="ignore", over="ignore"), warnings.catch_warnings():
        # "Optimal order is the smallest/largest alpha" only says the bound could be
        # tighter with a wider grid; it is still a valid upper bound.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=list(curve), delta=delta)
    return float(eps)


def _rdp_raw(merged: Sequence[DpEvent], delta: float) -> float:
    """RDP ε (may be inf/NaN) of already merged events; 0.0 for none."""
    if not merged:
        return 0.0
    return _rdp_to_epsilon(_rdp_curve(merged), delta)


def rdp_epsilon(events: Sequence[DpEvent], *, delta: float) -> float:
    """Fast, conservative ε at ``delta`` by Rényi DP (Mironov 2017; Balle et al. 2020).

    Always an upper bound, typically 5-10% above PRV/PLD for DP-SGD histories; used to project
    a task's cost before training. Raises :class:`PrivacyAccountingError` on a non-finite result.
    """
    _check_delta(delta)
    return _finite_or_raise(_rdp_raw(_merge(events), delta), "RDP")


# --------------------------------------------------------------------------- PLD


def _pld_dp_event(e: DpEvent) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(e.noise_multiplier)
    inner: dp_accounting.DpEvent = (
        gaussian
        if e.sample_rate == 1.0
        else dp_accounting.PoissonSampledDpEvent(e.sample_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(inner, e.steps)


def _pld_epsilon(merged: Sequence[DpEvent], delta: float, scale: float) -> float:
    """Pessimistic PLD ε of merged events; ``scale`` (an upper bound on ε) sizes the grid."""
    return _pld_epsilon_at(merged, delta, _pld_discretization(merged, scale))


def _pld_discretization(merged: Sequence[DpEvent], scale: float) -> float:
    """Value discretisation interval for PLD.

    The pessimistic rounding overshoots ε by about 0.6 · k · interval² after k subsampled
    compositions (measured: 0.006 at k = 10⁴ and interval 1e-3 on the reference history,
    0.18 at k ≈ 3·10⁵); q = 1 events compose analytically (σ/√steps) and count once. An
    interval of 0.05/√k keeps that overshoot near 0.0015, within [2e-5, 1e-3]; for very large ε
    (ε_RDP above ≈ 50) it is widened to ε_RDP / 50,000 so the support stays small.
    """
    k = sum(e.steps if e.sample_rate < 1.0 else 1 for e in merged)
    fine = min(_PLD_VALUE_DISCRETIZATION, max(2e-5, 0.05 / math.sqrt(k)))
    return max(fine, scale / 50_000.0)


def _pld_epsilon_at(merged: Sequence[DpEvent], delta: float, vdi: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=vdi)
    accountant.compose(dp_accounting.ComposedDpEvent([_pld_dp_event(e) for e in merged]))
    return float(accountant.get_epsilon(delta))


# --------------------------------------------------------------------------- PRV


class _PrvUnavailable(Exception):
    """PRV cannot give a bound for this input; the caller falls back to PLD."""


def _safe_half_width(merged: Sequence[DpEvent], eps_error: float, delta_error: float) -> float:
    """Half-width L of the PRV grid: Opacus's ``compute_safe_domain_size``, from cached RDP.

    Same rule (Gopi et al. 2021, Remark 5.6, as in Opacus and microsoft/prv_accountant): L
    bounds the RDP ε of the whole composition at δ_error/4 and of every single step at
    δ_error/(8·total steps), over Opacus's default orders; plus a margin of 3.
    """
    total = sum(e.steps for e in merged)
    half_width = _rdp_to_epsilon(_rdp_curve(merged), delta_error / 4, opacus_grid=True)
    for e in merged:
        one_step = _rdp_per_step(e.noise_multiplier, e.sample_rate)
        half_width = max(
            half_width,
            _rdp_to_epsilon(one_step, delta_error / (8 * total), opacus_grid=True),
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
    an upper bound on the error the result will be read with (:func:`_prv_epsilon`).
    """
    half_width = _safe_half_width(
        merged, eps_error if eps_error_at_most is None else eps_error_at_most, delta_error
    )
    if not math.isfinite(half_width):
        raise _PrvUnavailable(f"the PRV grid half-width is {half_width}")
    mesh = eps_error / math.sqrt(sum(e.steps for e in merged) * math.log(12 / delta_error) / 2)
    # Domain.create_aligned(-L, L, mesh) gives t_min = -k·mesh, t_max = (k+1)·mesh, 2k+2 points.
    k = math.ceil(half_width / mesh)
    if 2 * k + 2 > PRV_MAX_DOMAIN_SIZE:
        raise _PrvUnavailable(f"the PRV grid would need {2 * k + 2:,} points")
    if len(merged) * (2 * k + 2) > PRV_MAX_WORK:
        raise _PrvUnavailable(
            f"{len(merged)} distinct events on a {2 * k + 2:,}-point grid exceed PRV_MAX_WORK"
        )
    size = next_fast_len(2 * k + 2, real=True)
    size += size % 2
    k = (size - 2) // 2
    dt = half_width / k  # ≤ mesh, since k only grew
    return Domain(t_min=-k * dt, t_max=(k + 1) * dt, size=size)


def _grid_history(merged: Sequence[DpEvent]) -> list[DpEvent]:
    """The history the PRV grid is sized for: each event's steps rounded up to a power of 2.

    A grid built for more steps is valid for fewer (Gopi et al. 2021, Remark 5.6: the safe
    half-width only grows with the steps, and the required mesh ``ε_error / √(k·…)`` only
    shrinks), so the bound keeps its ``ε_error`` and stays an upper bound; the grid is only
    finer (at most about 1.5× the points). What it buys: a growing history (a job's or a
    dataset's, round after round) keeps the same grid from 2ⁿ to 2ⁿ⁺¹ steps, so each event's
    discretisation — most of a PRV composition's cost — is computed once per doubling
    (:func:`_discretized`), and each further round costs one FFT composition.
    """
    return [
        DpEvent(e.noise_multiplier, e.sample_rate, 1 << (e.steps - 1).bit_length()) for e in merged
    ]


_DISCRETIZED_CACHE_MAX_SIZE: Final = 2**18
"""Discretised PRVs on grids up to this many points (about 6 MiB with their transform) are
kept, at most 16."""


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
    :func:`_prv_epsilon`); cached, since it does not move while such a history grows."""
    half_history = [
        DpEvent(e.noise_multiplier, e.sample_rate, max(1, e.steps // 2)) for e in grid_history
    ]
    eps_error_mesh = _prv_eps_error(_rdp_raw(half_history, delta))
    eps_error_up = _prv_eps_error(_rdp_raw(grid_history, delta))
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


def _prv_epsilon(merged: Sequence[DpEvent], delta: float, scale: float) -> tuple[float, float]:
    """(eps_upper, eps_estimate) by Opacus's PRV analysis; raises _PrvUnavailable.

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
                raise _PrvUnavailable("the ε error lies outside its power-of-two bucket")
            domain = grid.domain
            # The FFT composition runs in float64, so rounding error in the tail sums is about
            # eps64 · size; Opacus guards with longdouble's eps, which is too lax on x86
            # (observed: δ=1e-13, 10,000 steps: 12.39 against PLD's 10.99). Require float64.
            if np.finfo(np.float64).eps * domain.size > delta - delta_error:
                raise _PrvUnavailable(
                    f"δ={delta:g} is below the float64 resolution of a {domain.size:,}-point grid"
                )
            dprv = _compose(merged, domain)
            _, eps_estimate, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    except (ValueError, RuntimeError, FloatingPointError, MemoryError) as err:
        raise _PrvUnavailable(str(err)) from err
    upper, estimate = float(eps_upper), float(eps_estimate)
    if not (math.isfinite(upper) and math.isfinite(estimate)):
        raise _PrvUnavailable(f"PRV returned ε_upper = {upper}")
    # ε ≥ 0 always holds; a small negative upper bound is discretisation noise near ε = 0.
    return max(upper, 0.0), max(estimate, 0.0)


# --------------------------------------------------------------------------- public API


def compute_epsilon(
    events: Sequence[DpEvent],
    *,
    delta: float,
    accountant: str = "prv",
    within_s: float | None = None,
) -> EpsilonBound:
    """A sound upper bound on ε at ``delta`` for the composition of ``events``.

    See the module docstring for the accountants. Raises ``ValueError`` on bad arguments and
    :class:`PrivacyAccountingError` when no finite bound can be computed.

    ``within_s``: for callers that must answer quickly (an RPC thread): the tight bound if it
    is known or computed within that many seconds (by a background worker, which goes on and
    keeps it for the next call), else the RDP bound (labelled ``"rdp"``: sound, looser, and
    analytic whatever the number of steps).
    """
    _check_delta(delta)
    _check_accountant(accountant)
    merged = _merge(events)
    if not merged:
        return EpsilonBound(epsilon=0.0, delta=delta, accountant=accountant, epsilon_estimate=0.0)
    # The orchestrator and the agents ask for the same histories again and again (status
    # views, heartbeats, rounds); the answer is a pure function of the merged history.
    key = (tuple(merged), float(delta), accountant)
    if within_s is None or accountant == "rdp":
        return _compute_and_keep(key)
    with _known_lock:
        known = _known.get(key)
        if known is not None:
            return known
    try:
        return _background().submit(key).result(timeout=max(0.0, within_s))
    except FutureTimeout:
        rdp = _finite_or_raise(_rdp_raw(merged, delta), "RDP")
        return EpsilonBound(epsilon=rdp, delta=delta, accountant="rdp")


_Key = tuple[tuple[DpEvent, ...], float, str]

_KNOWN_MAX: Final = 4096
_known: dict[_Key, EpsilonBound] = {}  # tight bounds already computed (a bounded cache)
_known_lock = threading.Lock()


def _compute_and_keep(key: _Key) -> EpsilonBound:
    bound = _compute_merged(*key)
    with _known_lock:
        if len(_known) >= _KNOWN_MAX:
            _known.clear()
        _known[key] = bound
    return bound


class _Worker:
    """One daemon thread computing tight bounds that quick callers asked for (each history
    once; a caller that gave up gets it from the cache next time). A daemon, so a queue of
    histories never delays the process's exit."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[_Key, Future[EpsilonBound]]] = queue.SimpleQueue()
        self._pending: dict[_Key, Future[EpsilonBound]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="epsilon-worker", daemon=True).start()

    def submit(self, key: _Key) -> Future[EpsilonBound]:
        with self._lock:
            fut = self._pending.get(key)
            if fut is None:
                fut = Future()
                self._pending[key] = fut
                self._queue.put((key, fut))
            return fut

    def _run(self) -> None:
        while True:
            key, fut = self._queue.get()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(_compute_and_keep(key))
                except BaseException as err:  # handed to whoever waits; the worker goes on
                    fut.set_exception(err)
            with self._lock:
                self._pending.pop(key, None)


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _background() -> _Worker:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = _Worker()
        return _worker


@functools.lru_cache(maxsize=2048)
def _compute_merged(merged: tuple[DpEvent, ...], delta: float, accountant: str) -> EpsilonBound:
    scale = _finite_or_raise(_rdp_raw(merged, delta), "RDP")
    if accountant == "rdp":
        return EpsilonBound(epsilon=scale, delta=delta, accountant="rdp")
    if accountant == "prv":
        try:
            upper, estimate = _prv_epsilon(merged, delta, scale)
        except _PrvUnavailable as unavailable:
            _log.info("PRV accountant unavailable (%s); using PLD instead.", unavailable)
        else:
            return _at_most_rdp(
                EpsilonBound(
                    epsilon=upper, delta=delta, accountant="prv", epsilon_estimate=estimate
                ),
                scale,
            )
    compositions = sum(e.steps for e in merged if e.sample_rate < 1.0)
    if compositions > PLD_MAX_COMPOSITIONS or len(merged) > PLD_MAX_EVENTS:
        # Bounded cost (module docstring, "Cost"): RDP is looser but analytic.
        _log.info(
            "%d compositions of %d distinct events are beyond PLD's bounded cost; using RDP.",
            compositions,
            len(merged),
        )
        return EpsilonBound(epsilon=scale, delta=delta, accountant="rdp")
    try:
        eps = _pld_epsilon(merged, delta, scale)
    except (ValueError, ArithmeticError, MemoryError) as err:
        eps, problem = math.nan, f"{type(err).__name__}: {err}"
    else:
        problem = f"it returned ε = {eps}"
    if math.isfinite(eps) and eps >= 0:
        return _at_most_rdp(EpsilonBound(epsilon=eps, delta=delta, accountant="pld"), scale)
    # E.g. δ below the mass PLD truncates to infinity. RDP is looser but still a bound.
    _log.warning("PLD accountant unusable (%s); reporting the RDP bound instead.", problem)
    return EpsilonBound(epsilon=scale, delta=delta, accountant="rdp")


def _at_most_rdp(bound: EpsilonBound, rdp_bound: float) -> EpsilonBound:
    """The smaller of two sound upper bounds. A tight accountant above RDP signals numerical
    trouble (seen with PLD at δ ≈ 1e-13, where its pessimistic tail mass blows up)."""
    if bound.epsilon <= rdp_bound:
        return bound
    _log.info(
        "%s bound ε=%.6g exceeds the RDP bound ε=%.6g; reporting RDP.",
        bound.accountant.upper(),
        bound.epsilon,
        rdp_bound,
    )
    return EpsilonBound(epsilon=rdp_bound, delta=bound.delta, accountant="rdp")


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
    _check_delta(delta)
    _check_accountant(accountant)
    DpEvent(1.0, sample_rate, steps)  # validates q and steps with the event's messages
    prior = _check_events(prior_events)
    target = float(target_epsilon)

    def epsilon_at(sigma: float) -> float:
        history = [*prior, DpEvent(sigma, sample_rate, steps)]
        try:
            return compute_epsilon(history, delta=delta, accountant=accountant).epsilon
        except PrivacyAccountingError:
            return math.inf  # no finite bound: infeasible

    def rdp_at(sigma: float) -> float:
        return _rdp_raw(_merge([*prior, DpEvent(sigma, sample_rate, steps)]), delta)

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
