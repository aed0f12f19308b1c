"""E-step sufficient statistics and the M-step (Dempster, Laird & Rubin 1977).

Statistics are sums over rows, so a federation's E-step is the sum of the sites'
(:meth:`SufficientStats.__add__`); :func:`m_step` floors masses and eigenvalues so that noisy
statistics still give a valid model (docs/clustering.md, "M-step on noisy statistics"). Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special
from scipy import stats as sps

from common.clustering.model import (
    _LOG_2PI,
    CovarianceType,
    FloatArray,
    GaussianMixtureParams,
    IntArray,
    _as_rows,
    _check_covariance_type,
    _check_positive,
    _frozen,
)

__all__ = [
    "SufficientStats",
    "expected_stats",
    "loglik_clip_range",
    "m_step",
]


def _triu(D: int) -> tuple[IntArray, IntArray]:
    rows, cols = np.triu_indices(D)
    return rows.astype(np.int64), cols.astype(np.int64)


@dataclass(frozen=True, eq=False)
class SufficientStats:
    """E-step sums for K components over some rows.

    ``nk`` ``(K,)``: responsibility mass ``N_k``; ``s1`` ``(K, D)``: ``Σ_i r_ik x_i``;
    ``s2``: ``Σ_i r_ik x_i x_iᵀ`` ``(K, D, D)`` or its diagonal ``(K, D)``; ``loglik``:
    ``Σ_i log p(x_i)`` under the model that gave the responsibilities, each term clipped to
    ``loglik_range`` when that is set (a DP release needs it; :func:`loglik_clip_range`).
    Noisy statistics may have negative masses and indefinite second moments.
    """

    nk: FloatArray
    s1: FloatArray
    s2: FloatArray
    loglik: float
    loglik_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        nk = _frozen(self.nk, "nk", 1)
        s1 = _frozen(self.s1, "s1", 2)
        s2 = np.array(self.s2, dtype=np.float64, copy=True)
        K = nk.shape[0]
        if s1.shape[0] != K or K < 1 or s1.shape[1] < 1:
            raise ValueError(f"s1 must have shape ({K}, D), got {s1.shape}.")
        D = s1.shape[1]
        if s2.shape not in ((K, D, D), (K, D)) or not np.all(np.isfinite(s2)):
            raise ValueError(f"s2 must be finite with shape ({K}, {D}, {D}) or ({K}, {D}).")
        if s2.ndim == 3:
            s2 = (s2 + np.swapaxes(s2, 1, 2)) / 2.0
        s2.flags.writeable = False
        if not math.isfinite(float(self.loglik)):
            raise ValueError("loglik must be finite.")
        rng = self.loglik_range
        if rng is not None:
            lo, hi = float(rng[0]), float(rng[1])
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"loglik_range must be finite with lo < hi, got {rng}.")
            rng = (lo, hi)
        object.__setattr__(self, "nk", nk)
        object.__setattr__(self, "s1", s1)
        object.__setattr__(self, "s2", s2)
        object.__setattr__(self, "loglik", float(self.loglik))
        object.__setattr__(self, "loglik_range", rng)

    @property
    def n_components(self) -> int:
        return int(self.nk.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.s1.shape[1])

    @property
    def covariance_type(self) -> CovarianceType:
        return "full" if self.s2.ndim == 3 else "diag"

    @property
    def total_weight(self) -> float:
        """``Σ_k N_k``: the number of rows (noisy for noised statistics)."""
        return float(self.nk.sum())

    def __add__(self, other: SufficientStats) -> SufficientStats:
        """Sum of the statistics of two disjoint sets of rows (e.g. two sites)."""
        if not isinstance(other, SufficientStats):
            return NotImplemented
        if self.s2.shape != other.s2.shape:
            raise ValueError(f"Cannot add statistics of shapes {self.s2.shape}, {other.s2.shape}.")
        if self.loglik_range != other.loglik_range:
            raise ValueError("Cannot add statistics with different log-likelihood clipping.")
        return SufficientStats(
            self.nk + other.nk,
            self.s1 + other.s1,
            self.s2 + other.s2,
            self.loglik + other.loglik,
            self.loglik_range,
        )

    def to_dict(self) -> dict[str, Any]:
        rng = None if self.loglik_range is None else list(self.loglik_range)
        return {
            "nk": self.nk.tolist(),
            "s1": self.s1.tolist(),
            "s2": self.s2.tolist(),
            "loglik": self.loglik,
            "loglik_range": rng,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SufficientStats:
        keys = {"nk", "s1", "s2", "loglik", "loglik_range"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise ValueError(f"Statistics need exactly the keys {sorted(keys)}.")
        rng = data["loglik_range"]
        try:
            return cls(
                nk=np.asarray(data["nk"], dtype=np.float64),
                s1=np.asarray(data["s1"], dtype=np.float64),
                s2=np.asarray(data["s2"], dtype=np.float64),
                loglik=float(data["loglik"]),
                loglik_range=None if rng is None else (float(rng[0]), float(rng[1])),
            )
        except (TypeError, ValueError, IndexError) as err:
            raise ValueError(f"Invalid statistics: {err}") from None


def loglik_clip_range(
    params: GaussianMixtureParams, *, coverage: float = 0.999
) -> tuple[float, float]:
    """Public clipping range ``[ℓ_lo, ℓ_hi]`` for per-row log-likelihoods under ``params``.

    ``ℓ_hi = max_k −½ log det(2πΣ_k)`` bounds ``log p(x)`` from above for every x (a mixture
    density never exceeds its highest component peak), so nothing is clipped from above.
    ``ℓ_lo = min_k [log max(π_k, 0.1/K) − ½ log det(2πΣ_k)] − ½ χ²_D(coverage)``: a row inside
    the ``coverage`` ellipsoid of a component with weight at least 0.1/K is never clipped
    from below; only outliers are (their log-likelihood is then reported too high). A
    function of the public model only, so it leaks nothing.
    """
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}.")
    D, K = params.n_features, params.n_components
    peak = -0.5 * (D * _LOG_2PI + params.log_det)
    floor_w = np.log(np.maximum(params.weights, 0.1 / K))
    hi = float(np.max(peak))
    lo = float(np.min(floor_w + peak)) - 0.5 * float(sps.chi2.ppf(coverage, D))
    return lo, hi


def expected_stats(
    X: npt.ArrayLike,
    params: GaussianMixtureParams,
    *,
    sample_weight: npt.ArrayLike | None = None,
    covariance_type: str | None = None,
    loglik_range: tuple[float, float] | None = None,
) -> SufficientStats:
    """The E-step: sufficient statistics of rows ``X`` under ``params`` (same coordinates).

    ``covariance_type`` chooses the second moment kept (default: the model's); ``"diag"``
    stores only ``Σ_i r_ik x_i²``. ``sample_weight`` multiplies every row's contribution
    (used by the bootstrap). With ``loglik_range`` every row's log-likelihood is clipped to
    it before summing.
    """
    rows = _as_rows(X, params.n_features)
    ctype = _check_covariance_type(covariance_type or params.covariance_type)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        logp = params.component_log_density(rows)
        ll = np.asarray(special.logsumexp(logp, axis=1))
        resp = np.exp(logp - ll[:, None])
    # Total on any valid model: a row whose density underflows under every component (an
    # extreme model can do that) gets uniform responsibilities and ℓ = −inf (clipped to ℓ_lo
    # below). An exception here would tell the sender whether such a row exists.
    bad = ~np.isfinite(ll)
    if np.any(bad):
        resp[bad] = 1.0 / params.n_components
        ll = np.where(bad, -np.inf, ll)
        if loglik_range is None:
            raise ValueError("A row has zero density under every component; pass loglik_range.")
    if loglik_range is not None:
        ll = np.clip(ll, loglik_range[0], loglik_range[1])
    if sample_weight is not None:
        sw = np.asarray(sample_weight, dtype=np.float64)
        if sw.shape != (rows.shape[0],) or not np.all(np.isfinite(sw)) or np.any(sw < 0):
            raise ValueError("sample_weight must be one finite non-negative weight per row.")
        resp = resp * sw[:, None]
        ll = ll * sw
    nk = resp.sum(axis=0)
    s1 = resp.T @ rows
    if ctype == "full":
        s2 = np.stack([(resp[:, k, None] * rows).T @ rows for k in range(resp.shape[1])])
    else:
        s2 = resp.T @ (rows * rows)
    return SufficientStats(nk, s1, s2, float(ll.sum()), loglik_range)


def m_step(
    stats: SufficientStats,
    *,
    covariance_type: str | None = None,
    min_variance: float,
    min_count: float = 10.0 * float(np.finfo(np.float64).eps),
    bound: float | None = None,
    noise_sd: float = 0.0,
) -> GaussianMixtureParams:
    """The M-step from (possibly noisy) statistics, with floors that make it total.

    ``N_k ← max(N_k, min_count)``; ``π_k = N_k / Σ N``; ``μ_k = S1_k / N_k``;
    ``Σ_k = S2_k / N_k − μ_k μ_kᵀ``, symmetrised, with eigenvalues (variances for
    ``"diag"``) clipped to ``[min_variance, ∞)``. With ``bound = b`` the statistics are
    known to come from rows in ``[−b, b]^D``: means are then projected into that box and
    eigenvalues capped at ``D b²`` (``b²`` per variance for ``"diag"``), the largest
    variance any distribution on the box has. The default ``min_count`` is scikit-learn's
    ``10·eps``, so on exact statistics this is its M-step (with ``reg_covar`` replaced by
    the eigenvalue floor). Full statistics may yield a ``"diag"`` model, not conversely.

    ``noise_sd`` is the standard deviation of the Gaussian noise on every entry of ``S2``
    (0 for exact statistics). The covariance estimate then carries a symmetric noise matrix
    with entries of standard deviation ``τ_k = noise_sd / N_k``, whose root-mean-square
    eigenvalue is ``√(E‖E‖_F²/D) = √D·τ_k`` (``τ_k`` for ``"diag"``); the floor of component
    k becomes ``max(min_variance, √D·τ_k)`` (``τ_k`` per variance for ``"diag"``). Without
    it a noisy eigenvalue can collapse, the component's rows leak to a neighbour, its mass
    and hence its precision shrink further, and EM drifts into merging clusters. (The noise's
    spectral norm, ≈ 2√D·τ_k by Wigner's semicircle law, would be safer still but biased:
    measured on elongated clusters it cost more log-likelihood than it saved.)
    """
    ctype = _check_covariance_type(covariance_type or stats.covariance_type)
    if ctype == "full" and stats.covariance_type == "diag":
        raise ValueError("Diagonal statistics cannot give a full-covariance model.")
    min_var = _check_positive(min_variance, "min_variance")
    if not (math.isfinite(min_count) and min_count > 0):
        raise ValueError(f"min_count must be positive and finite, got {min_count}.")
    D = stats.n_features
    max_var = math.inf
    if bound is not None:
        b = _check_positive(bound, "bound")
        max_var = D * b * b if ctype == "full" else b * b
        if max_var < min_var:
            raise ValueError(f"min_variance {min_var} exceeds the largest possible {max_var}.")
    if not (math.isfinite(noise_sd) and noise_sd >= 0):
        raise ValueError(f"noise_sd must be non-negative and finite, got {noise_sd}.")
    nk = np.maximum(stats.nk, min_count)
    weights = nk / nk.sum()
    means = stats.s1 / nk[:, None]
    spread = math.sqrt(D) if ctype == "full" else 1.0
    floor = np.minimum(np.maximum(min_var, spread * noise_sd / nk), max_var)
    if ctype == "full":
        second = stats.s2 / nk[:, None, None]
        cov = second - np.einsum("kd,ke->kde", means, means)
        cov = (cov + np.swapaxes(cov, 1, 2)) / 2.0
        eigval, eigvec = np.linalg.eigh(cov)
        eigval = np.clip(eigval, floor[:, None], max_var)
        covs = np.einsum("kde,ke,kfe->kdf", eigvec, eigval, eigvec)
        covs = (covs + np.swapaxes(covs, 1, 2)) / 2.0
    else:
        second = stats.s2 if stats.s2.ndim == 2 else np.diagonal(stats.s2, axis1=1, axis2=2)
        covs = np.clip(second / nk[:, None] - means * means, floor[:, None], max_var)
    if bound is not None:
        means = np.clip(means, -bound, bound)
    return GaussianMixtureParams(weights, means, covs, ctype)
