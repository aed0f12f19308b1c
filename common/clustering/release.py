"""The DP release of E-step statistics and of a final model's log-likelihood.

:func:`stats_sensitivity` is the L2 sensitivity of :func:`release_vector` for add/remove one
row (derived in docs/clustering.md, "Sensitivity of the E-step statistics");
:func:`noise_stats` is the Gaussian mechanism on it, ``DpEvent(σ, 1.0, 1)`` per model. Pure.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt

from common.clustering.model import (
    MAX_COMPONENTS,
    MAX_FEATURES,
    CovarianceType,
    FloatArray,
    GaussianMixtureParams,
    _check_covariance_type,
    _check_positive,
)
from common.clustering.statistics import SufficientStats, _triu
from common.dp import noise

__all__ = [
    "LOGLIK_SENSITIVITY",
    "decode_loglik",
    "loglik_noise_sd",
    "noise_stats",
    "release_vector",
    "scaled_loglik_sum",
    "stats_sensitivity",
]


def stats_sensitivity(
    D: int,
    K: int,
    covariance_type: str,
    bound: float = 1.0,
    *,
    loglik_weight: float = 1.0,
) -> float:
    """L2 sensitivity Δ of :func:`release_vector` under adding/removing one row.

    ``Δ² = 1 + D b² + D(D+1) b⁴/2 + w²`` (full) or ``1 + D b² + D b⁴ + w²`` (diag), for
    rows in ``[−b, b]^D`` and ``w = loglik_weight``; see docs/clustering.md for the
    derivation. Independent of K (responsibilities sum to one); K is only validated.
    """
    if not (isinstance(D, int) and 1 <= D <= MAX_FEATURES):
        raise ValueError(f"D must be an integer in [1, {MAX_FEATURES}], got {D!r}.")
    if not (isinstance(K, int) and 1 <= K <= MAX_COMPONENTS):
        raise ValueError(f"K must be an integer in [1, {MAX_COMPONENTS}], got {K!r}.")
    ctype = _check_covariance_type(covariance_type)
    b = _check_positive(bound, "bound")
    w = _check_positive(loglik_weight, "loglik_weight")
    second = D * (D + 1) / 2.0 * b**4 if ctype == "full" else D * b**4
    return math.sqrt(1.0 + D * b * b + second + w * w)


def release_vector(stats: SufficientStats, *, loglik_weight: float = 1.0) -> FloatArray:
    """The vector a site releases: ``[N | S1 | S2 (upper triangle or diag) | ℓ-coordinate]``.

    The last coordinate is ``w · (L − m Σ_k N_k) / h_ℓ`` with ``m, h_ℓ`` the centre and
    half-width of ``stats.loglik_range`` (which must be set): the sum of the rows'
    log-likelihoods mapped to ``[−w, w]``.
    """
    if stats.loglik_range is None:
        raise ValueError("A DP release needs statistics computed with a loglik_range.")
    w = _check_positive(loglik_weight, "loglik_weight")
    lo, hi = stats.loglik_range
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    if stats.covariance_type == "full":
        r, c = _triu(stats.n_features)
        second = stats.s2[:, r, c].ravel()
    else:
        second = stats.s2.ravel()
    ell = w * (stats.loglik - mid * stats.total_weight) / half
    return np.concatenate([stats.nk, stats.s1.ravel(), second, [ell]])


def _from_release_vector(
    v: FloatArray,
    *,
    K: int,
    D: int,
    covariance_type: CovarianceType,
    loglik_range: tuple[float, float],
    loglik_weight: float,
) -> SufficientStats:
    nk = v[:K]
    s1 = v[K : K + K * D].reshape(K, D)
    rest = v[K + K * D : -1]
    if covariance_type == "full":
        r, c = _triu(D)
        upper = rest.reshape(K, r.size)
        s2: FloatArray = np.zeros((K, D, D))
        s2[:, r, c] = upper
        s2[:, c, r] = upper
    else:
        s2 = rest.reshape(K, D)
    lo, hi = loglik_range
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    loglik = float(v[-1]) * half / loglik_weight + mid * float(nk.sum())
    return SufficientStats(nk, s1, s2, loglik, loglik_range)


def noise_stats(
    stats: SufficientStats,
    *,
    noise_multiplier: float,
    sensitivity: float,
    rng: np.random.Generator,
    loglik_weight: float = 1.0,
) -> SufficientStats:
    """The Gaussian mechanism on :func:`release_vector`: ``N(0, (σΔ)²)`` on every coordinate.

    Returns the decoded noisy statistics: ``N_k``, ``S1`` and every ``S2`` entry of the upper
    triangle (mirrored below it) carry noise of standard deviation ``σΔ``; the decoded
    ``loglik`` carries ``(h_ℓ/w)·e + m·Σ_k e_k`` (:func:`loglik_noise_sd`). With ``Δ`` from
    :func:`stats_sensitivity` (same ``loglik_weight``) this costs ``DpEvent(σ, 1.0, 1)``.
    """
    sigma = _check_positive(noise_multiplier, "noise_multiplier")
    delta = _check_positive(sensitivity, "sensitivity")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator.")
    w = _check_positive(loglik_weight, "loglik_weight")
    v = release_vector(stats, loglik_weight=w)
    noisy = v + noise.gaussian_np(rng, sigma * delta, v.shape)
    assert stats.loglik_range is not None  # checked by release_vector
    return _from_release_vector(
        noisy,
        K=stats.n_components,
        D=stats.n_features,
        covariance_type=stats.covariance_type,
        loglik_range=stats.loglik_range,
        loglik_weight=w,
    )


def loglik_noise_sd(
    *,
    noise_multiplier: float,
    sensitivity: float,
    loglik_range: tuple[float, float],
    n_components: int,
    loglik_weight: float = 1.0,
    n_sites: int = 1,
) -> float:
    """Standard deviation of the noise in the decoded ``loglik`` summed over ``n_sites``.

    ``σΔ · √(n_sites · ((h_ℓ/w)² + K m²))``: the ℓ-coordinate's noise scaled back, plus the
    noise of ``m·Σ_k N̂_k`` used to re-centre it. A function of public quantities.
    """
    lo, hi = loglik_range
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    per_site = (half / loglik_weight) ** 2 + n_components * mid * mid
    return noise_multiplier * sensitivity * math.sqrt(n_sites * per_site)


LOGLIK_SENSITIVITY: Final = 1.0
"""L2 sensitivity of :func:`scaled_loglik_sum`: one row adds a term in ``[−1, 1]``."""


def scaled_loglik_sum(
    Z: npt.ArrayLike, params: GaussianMixtureParams, *, loglik_range: tuple[float, float]
) -> float:
    """``Σ_i (clip(log p(z_i), ℓ_lo, ℓ_hi) − m) / h_ℓ``: the evaluation release.

    Every term lies in ``[−1, 1]``, so the sensitivity is :data:`LOGLIK_SENSITIVITY` and
    the Gaussian mechanism with noise ``N(0, σ²)`` costs ``DpEvent(σ, 1.0, 1)``. It measures
    a *fixed* (final) model far more cheaply than a full E-step release (whose Δ also
    covers N, S1 and S2). :func:`decode_loglik` turns it back into a total log-likelihood.
    """
    lo, hi = loglik_range
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"loglik_range must be finite with lo < hi, got {loglik_range}.")
    ll = np.clip(params.log_likelihood(Z), lo, hi)
    return float(np.sum((ll - (lo + hi) / 2.0) / ((hi - lo) / 2.0)))


def decode_loglik(value: float, *, loglik_range: tuple[float, float], n: float) -> float:
    """Total clipped log-likelihood from a (summed, noisy) :func:`scaled_loglik_sum`.

    ``h_ℓ · value + m · n`` with ``n`` the (noisy) number of rows; the noise of ``value``
    is multiplied by ``h_ℓ``.
    """
    lo, hi = loglik_range
    return (hi - lo) / 2.0 * float(value) + (lo + hi) / 2.0 * float(n)
