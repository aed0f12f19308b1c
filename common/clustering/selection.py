"""Choosing K by BIC under DP: the one-standard-error rule with the noise's spread.

:func:`noise_loglik_loss` predicts, from public quantities, how much likelihood a model lost
to the noise in its statistics; :func:`select_k_by_bic` uses it (docs/clustering.md, "Model
selection"). Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from common.clustering.model import GaussianMixtureParams

__all__ = [
    "noise_loglik_loss",
    "select_k_by_bic",
]


def noise_loglik_loss(
    params: GaussianMixtureParams, *, n: float, noise_sd: float
) -> tuple[float, float]:
    """Approximate (mean, sd) of the log-likelihood a model loses to noise in its statistics.

    ``params`` was estimated by :func:`m_step` from statistics of ``n`` rows carrying
    independent Gaussian noise of standard deviation ``noise_sd`` on every coordinate (same
    coordinates as ``params``). Component k has ``N_k = π_k n`` rows. Its mean
    ``μ̂ = S1/N`` has error ``(e1 − μ e0)/N_k``, per coordinate of variance
    ``τ₁² = τ²(1 + ‖μ‖²/D)`` with ``τ = noise_sd/N_k``; its covariance
    ``S2/N − μ̂μ̂ᵀ`` has a symmetric error E whose entries have variance about
    ``τ₂² = τ²(1 + ‖μ‖²/D)²`` (the noise of ``S2`` plus that of ``μ̂μ̂ᵀ``). To second order
    the loss per row is the KL divergence ``½ δμᵀAδμ + ¼ tr((AE)²)`` with ``A = Σ_k⁻¹``
    (eigenvalues ``a_i``). In A's eigenbasis this is a Gaussian quadratic form with
    mean ``½τ₁²Σa_i + ¼τ₂²(Σa_i)²`` and variance ``½τ₁⁴Σa_i² + ⅛τ₂⁴(2(Σa_i²)² − Σa_i⁴)``
    (full), or mean ``½τ₁²Σa_i + ¼τ₂²Σa_i²`` and variance ``½τ₁⁴Σa_i² + ⅛τ₂⁴Σa_i⁴``
    (diag); components are independent, so means and variances add. Valid while ``τ₂`` is
    small against the smallest variance (the noise-aware floor of :func:`m_step` keeps
    fitted models there). A function of public quantities: usable on DP outputs at no cost.
    """
    if not (math.isfinite(noise_sd) and noise_sd >= 0):
        raise ValueError(f"noise_sd must be non-negative and finite, got {noise_sd}.")
    D = params.n_features
    mean = var = 0.0
    for k in range(params.n_components):
        nk = max(float(params.weights[k] * n), 1.0)
        lift = 1.0 + float(params.means[k] @ params.means[k]) / D
        t1 = (noise_sd / nk) ** 2 * lift
        t2 = (noise_sd / nk) ** 2 * lift * lift
        if params.covariance_type == "full":
            a = 1.0 / np.linalg.eigvalsh(params.covariances[k])
        else:
            a = 1.0 / params.covariances[k]
        s1, s2, s4 = float(a.sum()), float(np.sum(a**2)), float(np.sum(a**4))
        if params.covariance_type == "full":
            cov_mean, cov_var = 0.25 * t2 * s1 * s1, t2 * t2 / 8.0 * (2.0 * s2 * s2 - s4)
        else:
            cov_mean, cov_var = 0.25 * t2 * s2, t2 * t2 / 8.0 * s4
        mean += nk * (0.5 * t1 * s1 + cov_mean)
        var += nk * nk * (0.5 * t1 * t1 * s2 + cov_var)
    return mean, math.sqrt(var)


def select_k_by_bic(
    results: Mapping[int, tuple[GaussianMixtureParams, float, float]],
    *,
    loglik_sd: float | Mapping[int, float] = 0.0,
    z: float = 2.0,
) -> int:
    """The K to use, from ``{K: (params, total_loglik, n)}``.

    With ``loglik_sd = 0`` (exact likelihoods): the K of minimal BIC. Otherwise the smallest
    K whose BIC is within ``z · sd(BIC_K − BIC_min)`` of the minimum, where the BIC of K has
    standard deviation ``2 · loglik_sd[K]`` (one-standard-error rule): extra components
    must earn their place by more than the noise.
    """
    if not results:
        raise ValueError("select_k_by_bic needs at least one fitted model.")
    bics = {k: p.bic(ll, n) for k, (p, ll, n) in results.items()}
    sds = {k: float(loglik_sd[k] if isinstance(loglik_sd, Mapping) else loglik_sd) for k in bics}
    best = min(bics, key=lambda k: (bics[k], k))
    for k in sorted(bics):
        margin = z * 2.0 * math.hypot(sds[k], sds[best])
        if bics[k] <= bics[best] + margin:
            return k
    return best  # unreachable: best itself is within the margin
