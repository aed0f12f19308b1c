"""The Gaussian mixture and the unit box its DP statistics live in.

:class:`FeatureBox` maps declared bounds ``[lo, hi]`` to ``[-1, 1]^D`` (what makes every
sensitivity finite); :class:`GaussianMixtureParams` is ``Σ_k π_k N(μ_k, Σ_k)`` with full or
diagonal covariances, as in scikit-learn. Pure: no I/O. Derivations: docs/clustering.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import numpy as np
import numpy.typing as npt
from scipy import special

__all__ = [
    "COVARIANCE_TYPES",
    "MAX_CANDIDATES",
    "MAX_COMPONENTS",
    "MAX_FEATURES",
    "MAX_MODELS_PER_REQUEST",
    "CovarianceType",
    "FeatureBox",
    "GaussianMixtureParams",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
CovarianceType = Literal["full", "diag"]
COVARIANCE_TYPES: Final[tuple[str, ...]] = ("full", "diag")

MAX_FEATURES: Final = 512
MAX_COMPONENTS: Final = 256
MAX_CANDIDATES: Final = 16_384
MAX_MODELS_PER_REQUEST: Final = 64

_LOG_2PI: Final = math.log(2.0 * math.pi)
_SYMMETRY_RTOL: Final = 1e-8


def _check_covariance_type(covariance_type: str) -> CovarianceType:
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(
            f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}."
        )
    return cast(CovarianceType, covariance_type)


def _frozen(a: npt.ArrayLike, what: str, ndim: int) -> FloatArray:
    arr = np.array(a, dtype=np.float64, copy=True)
    if arr.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimension(s), got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite.")
    arr.flags.writeable = False
    return arr


def _check_positive(value: float, what: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what} must be positive and finite, got {value}.")
    return v


def _as_rows(X: npt.ArrayLike, n_features: int) -> FloatArray:
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != n_features:
        raise ValueError(f"Expected rows of shape (n, {n_features}), got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError("Rows must be finite (impute or drop missing values first).")
    return arr


@dataclass(frozen=True, eq=False)
class FeatureBox:
    """Declared per-column bounds ``[lo_j, hi_j]`` (shape ``(D, 2)``) and the unit-box map.

    ``to_unit`` clips every value to its bounds and maps the box onto ``[−1, 1]^D``; the
    bounds are public (declared with the job), never computed from the data.
    """

    bounds: FloatArray

    def __post_init__(self) -> None:
        b = _frozen(self.bounds, "bounds", 2)
        if b.shape[1] != 2 or not 1 <= b.shape[0] <= MAX_FEATURES:
            raise ValueError(
                f"bounds must have shape (D, 2) with 1 ≤ D ≤ {MAX_FEATURES}, got {b.shape}."
            )
        if not np.all(b[:, 0] < b[:, 1]):
            bad = [int(j) for j in np.flatnonzero(b[:, 0] >= b[:, 1])]
            raise ValueError(f"Every bound needs lo < hi; columns {bad} do not.")
        object.__setattr__(self, "bounds", b)

    @property
    def n_features(self) -> int:
        return int(self.bounds.shape[0])

    @functools.cached_property
    def center(self) -> FloatArray:
        c = (self.bounds[:, 0] + self.bounds[:, 1]) / 2.0
        c.flags.writeable = False
        return c

    @functools.cached_property
    def half_width(self) -> FloatArray:
        h = (self.bounds[:, 1] - self.bounds[:, 0]) / 2.0
        h.flags.writeable = False
        return h

    @property
    def log_jacobian(self) -> float:
        """``Σ_j log h_j``: per-row log-density in data units = unit-box value − this."""
        return float(np.sum(np.log(self.half_width)))

    def to_unit(self, X: npt.ArrayLike) -> FloatArray:
        """Clip rows to the bounds and map them to ``[−1, 1]^D``."""
        rows = _as_rows(X, self.n_features)
        clipped = np.clip(rows, self.bounds[:, 0], self.bounds[:, 1])
        return np.clip((clipped - self.center) / self.half_width, -1.0, 1.0)

    def from_unit(self, Z: npt.ArrayLike) -> FloatArray:
        return _as_rows(Z, self.n_features) * self.half_width + self.center

    def params_to_unit(self, params: GaussianMixtureParams) -> GaussianMixtureParams:
        return self._affine(params, 1.0 / self.half_width, -self.center / self.half_width)

    def params_from_unit(self, params: GaussianMixtureParams) -> GaussianMixtureParams:
        return self._affine(params, self.half_width, self.center)

    def _affine(
        self, params: GaussianMixtureParams, scale: FloatArray, shift: FloatArray
    ) -> GaussianMixtureParams:
        if params.n_features != self.n_features:
            raise ValueError(
                f"The model has {params.n_features} features, the bounds {self.n_features}."
            )
        means = params.means * scale + shift
        if params.covariance_type == "full":
            covs = params.covariances * np.outer(scale, scale)
        else:
            covs = params.covariances * scale**2
        return GaussianMixtureParams(params.weights, means, covs, params.covariance_type)


@dataclass(frozen=True, eq=False)
class GaussianMixtureParams:
    """A Gaussian mixture: weights ``(K,)``, means ``(K, D)`` and covariances.

    ``covariances`` is ``(K, D, D)`` (symmetric positive definite) for ``"full"`` and
    ``(K, D)`` (positive variances) for ``"diag"``. Weights must be non-negative and sum to 1
    (within 1e-6; they are renormalised exactly). Arrays are read-only copies.
    """

    weights: FloatArray
    means: FloatArray
    covariances: FloatArray
    covariance_type: CovarianceType = "full"

    def __post_init__(self) -> None:
        ctype = _check_covariance_type(self.covariance_type)
        w = np.array(self.weights, dtype=np.float64, copy=True)
        means = _frozen(self.means, "means", 2)
        covs = _frozen(self.covariances, "covariances", 3 if ctype == "full" else 2)
        K, D = means.shape
        if not (1 <= K <= MAX_COMPONENTS and 1 <= D <= MAX_FEATURES):
            raise ValueError(
                f"Need 1 ≤ K ≤ {MAX_COMPONENTS} components and 1 ≤ D ≤ {MAX_FEATURES} "
                f"features, got means of shape {means.shape}."
            )
        if w.shape != (K,) or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"weights must be {K} finite non-negative numbers.")
        if abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, got {float(w.sum())!r}.")
        w = w / w.sum()
        w.flags.writeable = False
        expected = (K, D, D) if ctype == "full" else (K, D)
        if covs.shape != expected:
            raise ValueError(f"covariances must have shape {expected}, got {covs.shape}.")
        if ctype == "full":
            asym = np.abs(covs - np.swapaxes(covs, 1, 2))
            scale = np.abs(covs).max(axis=(1, 2), keepdims=True)
            if np.any(asym > _SYMMETRY_RTOL * scale + 1e-300):
                raise ValueError("Full covariances must be symmetric.")
            sym = (covs + np.swapaxes(covs, 1, 2)) / 2.0
            try:
                np.linalg.cholesky(sym)
            except np.linalg.LinAlgError:
                raise ValueError("Full covariances must be positive definite.") from None
            sym.flags.writeable = False
            covs = sym
        elif np.any(covs <= 0):
            raise ValueError("Diagonal variances must be positive.")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "covariances", covs)
        object.__setattr__(self, "covariance_type", ctype)

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.means.shape[1])

    def full_covariances(self) -> FloatArray:
        """Covariances as ``(K, D, D)`` whatever the type."""
        if self.covariance_type == "full":
            return self.covariances
        return np.stack([np.diag(v) for v in self.covariances])

    @functools.cached_property
    def _cholesky(self) -> FloatArray:
        if self.covariance_type == "full":
            return np.asarray(np.linalg.cholesky(self.covariances), dtype=np.float64)
        return np.asarray(np.sqrt(self.covariances), dtype=np.float64)

    @functools.cached_property
    def _precision_cholesky(self) -> FloatArray:
        # U_k with U_k U_kᵀ = Σ_k⁻¹, so (x − μ)ᵀ Σ⁻¹ (x − μ) = ‖(x − μ) U_k‖² (as scikit-learn).
        return np.asarray(np.swapaxes(np.linalg.inv(self._cholesky), 1, 2), dtype=np.float64)

    @functools.cached_property
    def log_det(self) -> FloatArray:
        """``log det Σ_k`` for every component, shape ``(K,)``."""
        if self.covariance_type == "full":
            diag = np.diagonal(self._cholesky, axis1=1, axis2=2)
            return np.asarray(2.0 * np.sum(np.log(diag), axis=1), dtype=np.float64)
        return np.asarray(np.sum(np.log(self.covariances), axis=1), dtype=np.float64)

    def component_log_density(self, X: npt.ArrayLike) -> FloatArray:
        """``log π_k + log N(x_i; μ_k, Σ_k)`` for every row and component, shape ``(n, K)``."""
        rows = _as_rows(X, self.n_features)
        n, K, D = rows.shape[0], self.n_components, self.n_features
        maha = np.empty((n, K))
        # Overflow to +inf (density 0) is a valid answer for extreme models; no warning.
        with np.errstate(over="ignore", divide="ignore"):
            for k in range(K):
                diff = rows - self.means[k]
                if self.covariance_type == "full":
                    y = diff @ self._precision_cholesky[k]
                    maha[:, k] = np.sum(y * y, axis=1)
                else:
                    maha[:, k] = np.sum(diff * diff / self.covariances[k], axis=1)
            log_w = np.log(self.weights)
            return log_w - 0.5 * (D * _LOG_2PI + self.log_det + maha)

    def log_likelihood(self, X: npt.ArrayLike) -> FloatArray:
        """``log p(x_i)`` for every row, shape ``(n,)`` (−inf where the density underflows)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(special.logsumexp(self.component_log_density(X), axis=1))

    def predict_proba(self, X: npt.ArrayLike) -> FloatArray:
        """Posterior component probabilities (responsibilities) of new rows, ``(n, K)``.

        This is the public call for assigning clusters to new rows with a released model:
        it is a function of the model and the rows only, so it costs no privacy budget.
        """
        logp = self.component_log_density(X)
        return np.asarray(np.exp(logp - special.logsumexp(logp, axis=1, keepdims=True)))

    def predict(self, X: npt.ArrayLike) -> IntArray:
        """The most probable component of every new row, shape ``(n,)``."""
        return np.asarray(np.argmax(self.component_log_density(X), axis=1), dtype=np.int64)

    def num_parameters(self) -> int:
        """Free parameters: ``K − 1`` weights, ``K·D`` means, ``K·D(D+1)/2`` or ``K·D``."""
        K, D = self.n_components, self.n_features
        cov = K * D * (D + 1) // 2 if self.covariance_type == "full" else K * D
        return K - 1 + K * D + cov

    def bic(self, total_loglik: float, n: float) -> float:
        """Schwarz's BIC ``−2 log L + p log n`` (lower is better)."""
        if not n > 1:
            raise ValueError(f"BIC needs n > 1 rows, got {n}.")
        return -2.0 * float(total_loglik) + self.num_parameters() * math.log(n)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: nested lists of floats."""
        return {
            "covariance_type": self.covariance_type,
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "covariances": self.covariances.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GaussianMixtureParams:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming the bad field."""
        keys = {"covariance_type", "weights", "means", "covariances"}
        if not isinstance(data, Mapping) or set(data) != keys:
            raise ValueError(f"A mixture needs exactly the keys {sorted(keys)}.")
        try:
            return cls(
                weights=np.asarray(data["weights"], dtype=np.float64),
                means=np.asarray(data["means"], dtype=np.float64),
                covariances=np.asarray(data["covariances"], dtype=np.float64),
                covariance_type=data["covariance_type"],
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"Invalid mixture: {err}") from None
