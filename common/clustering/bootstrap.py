"""Standard errors of a mixture: the site-local bag of little bootstraps (not DP) and the
DP Poisson bootstrap of the final model (the ``bootstrap:`` job option).

A row's replicate weights are independent, capped Poisson(1) draws rescaled to L2 norm at
most ``C``, so the R replicates' release has sensitivity ``C·Δ₀``
(:func:`bootstrap_sensitivity`) and costs ``DpEvent(σ, 1.0, 1)``. Derivation and limits:
docs/clustering.md, "DP Poisson bootstrap". Pure.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from scipy import special
from scipy import stats as sps

from common.clustering.model import (
    MAX_FEATURES,
    CovarianceType,
    FloatArray,
    GaussianMixtureParams,
    _as_rows,
    _check_covariance_type,
    _check_positive,
    _frozen,
)
from common.clustering.statistics import SufficientStats, _triu, expected_stats, m_step
from common.dp import noise

__all__ = [
    "BOOTSTRAP_NOTE",
    "MAX_BOOTSTRAP_VALUES",
    "MAX_REPLICATES",
    "BlbVariance",
    "MixtureStandardErrors",
    "ReplicateStats",
    "blb_variance",
    "bootstrap_release_size",
    "bootstrap_sensitivity",
    "bootstrap_weight_norm",
    "bootstrap_weights",
    "capped_poisson_moments",
    "noise_replicate_stats",
    "replicate_stats",
]


@dataclass(frozen=True, eq=False)
class BlbVariance:
    """Bag-of-little-bootstraps variance of each parameter; shapes as in the model.

    Site-local: computed from raw rows without noise. It must not leave the site.
    """

    weights: FloatArray
    means: FloatArray
    covariances: FloatArray
    subset_size: int
    n_subsets: int
    n_resamples: int


def blb_variance(
    X: npt.ArrayLike,
    params: GaussianMixtureParams,
    *,
    rng: np.random.Generator,
    n_subsets: int = 5,
    subset_exponent: float = 0.7,
    n_resamples: int = 50,
    em_steps: int = 2,
    min_variance: float = 1e-6,
) -> BlbVariance:
    """Sampling variance of EM estimates on one site's rows (Kleiner et al. 2014).

    Draw ``n_subsets`` subsets of ``b = ⌈n^γ⌉`` rows (``γ = subset_exponent``) without
    replacement; for each, draw ``n_resamples`` multinomial weight vectors ``(n; 1/b, …)``
    (a size-n bootstrap sample held as weights on b rows), run ``em_steps`` weighted EM
    steps from ``params`` (so component labels stay aligned with ``params``), and take the
    variance of the estimates; average the variances over subsets. Cost: ``s·r·em_steps``
    E-steps on b rows instead of ``r`` on n.

    **Not differentially private.** The result is a function of raw rows with no noise and
    no bounded sensitivity; it is a diagnostic for the site's operators and must not leave
    the site (or be released only after a separate DP analysis, which this does not give).
    For standard errors that may be released, use the job option ``bootstrap:`` of a
    ``kind: gmm`` job: the DP Poisson bootstrap (:func:`replicate_stats`,
    :func:`bootstrap_sensitivity`, docs/clustering.md), charged to every site's ledger and
    included in the model card's ε.
    """
    rows = _as_rows(X, params.n_features)
    n = rows.shape[0]
    if n < 2:
        raise ValueError("blb_variance needs at least two rows.")
    if not 0.5 <= subset_exponent <= 1.0:
        raise ValueError(f"subset_exponent must be in [0.5, 1], got {subset_exponent}.")
    if n_subsets < 1 or n_resamples < 2 or em_steps < 1:
        raise ValueError("Need n_subsets ≥ 1, n_resamples ≥ 2 and em_steps ≥ 1.")
    b = min(n, math.ceil(n**subset_exponent))
    acc: dict[str, list[FloatArray]] = {"weights": [], "means": [], "covariances": []}
    for _ in range(n_subsets):
        subset = rows[rng.choice(n, size=b, replace=False)]
        draws: dict[str, list[FloatArray]] = {"weights": [], "means": [], "covariances": []}
        for _ in range(n_resamples):
            sw = rng.multinomial(n, np.full(b, 1.0 / b)).astype(np.float64)
            est = params
            for _ in range(em_steps):
                stats = expected_stats(subset, est, sample_weight=sw)
                est = m_step(stats, min_variance=min_variance)
            draws["weights"].append(est.weights)
            draws["means"].append(est.means)
            draws["covariances"].append(est.covariances)
        for key, values in draws.items():
            acc[key].append(np.var(np.stack(values), axis=0, ddof=1))
    return BlbVariance(
        weights=np.mean(acc["weights"], axis=0),
        means=np.mean(acc["means"], axis=0),
        covariances=np.mean(acc["covariances"], axis=0),
        subset_size=b,
        n_subsets=n_subsets,
        n_resamples=n_resamples,
    )


MAX_REPLICATES: Final = 200
MAX_BOOTSTRAP_VALUES: Final = 250_000
"""Largest ``R · K · (1 + D + |S2|)`` a bootstrap release may have (it travels as JSON in one
message of at most 8 MiB)."""


def _check_replicates(replicates: int, weight_cap: int) -> tuple[int, int]:
    if isinstance(replicates, bool) or not isinstance(replicates, int):
        raise ValueError(f"replicates must be an integer, got {replicates!r}.")
    if not 2 <= replicates <= MAX_REPLICATES:
        raise ValueError(f"replicates must be in [2, {MAX_REPLICATES}], got {replicates}.")
    if isinstance(weight_cap, bool) or not isinstance(weight_cap, int):
        raise ValueError(f"weight_cap must be an integer, got {weight_cap!r}.")
    if not 1 <= weight_cap <= 100:
        raise ValueError(f"weight_cap must be in [1, 100], got {weight_cap}.")
    return replicates, weight_cap


@functools.lru_cache(maxsize=128)
def capped_poisson_moments(weight_cap: int) -> tuple[float, float, float, float]:
    """``(E[w], Var[w], E[w²], Var[w²])`` of ``w = min(Poisson(1), weight_cap)``, exactly."""
    _check_replicates(2, weight_cap)
    j = np.arange(weight_cap + 1, dtype=np.float64)
    p = sps.poisson.pmf(j, 1.0)
    p[-1] = sps.poisson.sf(weight_cap - 1, 1.0)  # P(Poisson ≥ c) all lands on c
    m1, m2, m4 = float(p @ j), float(p @ j**2), float(p @ j**4)
    return m1, m2 - m1 * m1, m2, m4 - m2 * m2


def bootstrap_weight_norm(replicates: int, weight_cap: int) -> float:
    """The L2 bound C of a row's weight vector: ``min(c·√R, √(R·E[w²] + 3·√(R·Var[w²])))``.

    A public function of R and the cap (docs/clustering.md): at most ``c·√R``, which every
    capped vector meets; usually the three-sigma bound of ``‖w‖²``, which rescales a fraction
    of a percent of the rows and about halves the noise.
    """
    R, c = _check_replicates(replicates, weight_cap)
    _, _, m2, var2 = capped_poisson_moments(c)
    return min(c * math.sqrt(R), math.sqrt(R * m2 + 3.0 * math.sqrt(R * var2)))


def bootstrap_sensitivity(
    D: int, covariance_type: str, weight_norm: float, bound: float = 1.0
) -> float:
    """L2 sensitivity ``C·Δ₀`` of the R concatenated replicate releases (add/remove one row).

    ``Δ₀² = 1 + D b² + D(D+1) b⁴/2`` (full) or ``1 + D b² + D b⁴`` (diag): the E-step
    sensitivity of :func:`stats_sensitivity` without the log-likelihood coordinate; ``C`` the
    norm bound of a row's weight vector. Derivation: docs/clustering.md.
    """
    if not (isinstance(D, int) and 1 <= D <= MAX_FEATURES):
        raise ValueError(f"D must be an integer in [1, {MAX_FEATURES}], got {D!r}.")
    ctype = _check_covariance_type(covariance_type)
    b = _check_positive(bound, "bound")
    C = _check_positive(weight_norm, "weight_norm")
    second = D * (D + 1) / 2.0 * b**4 if ctype == "full" else D * b**4
    return C * math.sqrt(1.0 + D * b * b + second)


def bootstrap_release_size(replicates: int, K: int, D: int, covariance_type: str) -> int:
    """Number of released coordinates ``R · K · (1 + D + D(D+1)/2 or 2D)``."""
    second = D * (D + 1) // 2 if _check_covariance_type(covariance_type) == "full" else D
    return int(replicates) * int(K) * (1 + D + second)


def bootstrap_weights(
    n: int, replicates: int, *, weight_cap: int, weight_norm: float, rng: np.random.Generator
) -> FloatArray:
    """Poisson-bootstrap weights ``(n, R)``: ``min(Poisson(1), cap)``, rows rescaled to L2 norm
    at most ``weight_norm``. ``rng`` must be private to the site and seeded from OS entropy."""
    R, c = _check_replicates(replicates, weight_cap)
    C = _check_positive(weight_norm, "weight_norm")
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator.")
    w = np.minimum(rng.poisson(1.0, size=(int(n), R)), c).astype(np.float64)
    norms = np.linalg.norm(w, axis=1)
    scale = np.minimum(1.0, C / np.maximum(norms, 1e-300))
    return np.asarray(w * scale[:, None], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class ReplicateStats:
    """E-step sums of R bootstrap replicates: ``nk`` ``(R, K)``, ``s1`` ``(R, K, D)`` and
    ``s2`` ``(R, K, D, D)`` (symmetric) or ``(R, K, D)`` (diagonal), unit-box coordinates."""

    nk: FloatArray
    s1: FloatArray
    s2: FloatArray

    def __post_init__(self) -> None:
        nk = _frozen(self.nk, "nk", 2)
        s1 = _frozen(self.s1, "s1", 3)
        s2 = np.array(self.s2, dtype=np.float64, copy=True)
        R, K = nk.shape
        if s1.shape[:2] != (R, K) or s1.shape[2] < 1:
            raise ValueError(f"s1 must have shape ({R}, {K}, D), got {s1.shape}.")
        D = s1.shape[2]
        if s2.shape not in ((R, K, D, D), (R, K, D)) or not np.all(np.isfinite(s2)):
            raise ValueError(
                f"s2 must be finite with shape ({R}, {K}, {D}, {D}) or ({R}, {K}, {D})."
            )
        if s2.ndim == 4:
            s2 = (s2 + np.swapaxes(s2, 2, 3)) / 2.0
        s2.flags.writeable = False
        object.__setattr__(self, "nk", nk)
        object.__setattr__(self, "s1", s1)
        object.__setattr__(self, "s2", s2)

    @property
    def n_replicates(self) -> int:
        return int(self.nk.shape[0])

    @property
    def covariance_type(self) -> CovarianceType:
        return "full" if self.s2.ndim == 4 else "diag"

    def replicate(self, r: int) -> SufficientStats:
        """Replicate r as :class:`SufficientStats` (no log-likelihood), for :func:`m_step`."""
        return SufficientStats(self.nk[r], self.s1[r], self.s2[r], 0.0)

    def __add__(self, other: ReplicateStats) -> ReplicateStats:
        """Sum over two disjoint sets of rows (two sites): replicate by replicate."""
        if not isinstance(other, ReplicateStats):
            return NotImplemented
        if self.s2.shape != other.s2.shape:
            raise ValueError(f"Cannot add replicates of shapes {self.s2.shape}, {other.s2.shape}.")
        return ReplicateStats(self.nk + other.nk, self.s1 + other.s1, self.s2 + other.s2)

    def to_dict(self) -> dict[str, Any]:
        return {"nk": self.nk.tolist(), "s1": self.s1.tolist(), "s2": self.s2.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplicateStats:
        if not isinstance(data, Mapping) or set(data) != {"nk", "s1", "s2"}:
            raise ValueError("Replicate statistics need exactly the keys ['nk', 's1', 's2'].")
        try:
            return cls(
                np.asarray(data["nk"], dtype=np.float64),
                np.asarray(data["s1"], dtype=np.float64),
                np.asarray(data["s2"], dtype=np.float64),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"Invalid replicate statistics: {err}") from None


def replicate_stats(
    Z: npt.ArrayLike,
    params: GaussianMixtureParams,
    weights: npt.ArrayLike,
    *,
    covariance_type: str | None = None,
) -> ReplicateStats:
    """Exact replicate statistics of rows ``Z`` (unit box) under ``params`` (unit box), with
    row i weighted by ``weights[i, r]`` in replicate r (:func:`bootstrap_weights`).

    Responsibilities are computed once per row; a row whose density underflows under every
    component gets uniform ones, as in :func:`expected_stats`. Not private:
    :func:`noise_replicate_stats` releases it.
    """
    rows = _as_rows(Z, params.n_features)
    ctype = _check_covariance_type(covariance_type or params.covariance_type)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != rows.shape[0] or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite, non-negative, of shape ({rows.shape[0]}, R).")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        logp = params.component_log_density(rows)
        ll = np.asarray(special.logsumexp(logp, axis=1))
        resp = np.exp(logp - ll[:, None])
    bad = ~np.isfinite(ll)
    if np.any(bad):
        resp[bad] = 1.0 / params.n_components
    K, D, R = params.n_components, params.n_features, w.shape[1]
    nk = w.T @ resp  # (R, K)
    s1 = np.empty((R, K, D))
    outer = (rows[:, :, None] * rows[:, None, :]).reshape(rows.shape[0], D * D)
    s2 = np.empty((R, K, D, D) if ctype == "full" else (R, K, D))
    for k in range(K):
        wk = w * resp[:, k, None]  # (n, R)
        s1[:, k, :] = wk.T @ rows
        if ctype == "full":
            s2[:, k] = (wk.T @ outer).reshape(R, D, D)
        else:
            s2[:, k] = wk.T @ (rows * rows)
    return ReplicateStats(nk, s1, s2)


def noise_replicate_stats(
    stats: ReplicateStats,
    *,
    noise_multiplier: float,
    sensitivity: float,
    rng: np.random.Generator,
) -> ReplicateStats:
    """Gaussian mechanism ``N(0, (σΔ)²)`` on every released coordinate of every replicate.

    ``Δ`` is :func:`bootstrap_sensitivity`. The upper triangle of each ``S2`` is noised and
    mirrored (the lower one is not released separately). Costs ``DpEvent(σ, 1.0, 1)``.
    """
    scale = _check_positive(noise_multiplier, "noise_multiplier") * _check_positive(
        sensitivity, "sensitivity"
    )
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator.")
    nk = stats.nk + noise.gaussian_np(rng, scale, stats.nk.shape)
    s1 = stats.s1 + noise.gaussian_np(rng, scale, stats.s1.shape)
    if stats.covariance_type == "full":
        R, K, D, _ = stats.s2.shape
        r, c = _triu(D)
        upper = stats.s2[:, :, r, c] + noise.gaussian_np(rng, scale, (R, K, r.size))
        s2 = np.zeros(stats.s2.shape)
        s2[:, :, r, c] = upper
        s2[:, :, c, r] = upper
    else:
        s2 = stats.s2 + noise.gaussian_np(rng, scale, stats.s2.shape)
    return ReplicateStats(nk, s1, s2)


BOOTSTRAP_NOTE: Final = (
    "Standard deviation over R Poisson-bootstrap replicates (one EM step each from the released "
    "model), released by the sites with Gaussian noise that is included in the standard errors "
    "(so they overstate the sampling error: conservative, more so for small components and "
    "few rows). noise_only is what that noise alone gives (simulated from public quantities): "
    "a standard error not clearly above it measures the noise, not the sampling error. Not "
    "included: the noise EM's own releases left in the point estimate, and the extra variance "
    "of overlapping components that one EM step does not propagate."
)


@dataclass(frozen=True, eq=False)
class MixtureStandardErrors:
    """Per-parameter standard errors of a released mixture (data units).

    ``weights`` ``(K,)``, ``means`` ``(K, D)``, ``variances`` ``(K, D)`` (the diagonal of each
    covariance). From the DP Poisson bootstrap (docs/clustering.md): they include the bootstrap
    release's noise (see ``note``). ``noise_only`` (same keys and shapes, optional) is the
    standard deviation the release noise alone gives each parameter, simulated by the
    orchestrator from public quantities (σ, the sensitivity, the number of sites and the mean
    replicate): where a standard error is not clearly above it, it measures the noise rather
    than the sampling error.
    """

    weights: FloatArray
    means: FloatArray
    variances: FloatArray
    replicates: int
    weight_cap: int
    weight_norm: float
    noise_multiplier: float
    note: str = BOOTSTRAP_NOTE
    noise_only: Mapping[str, FloatArray] | None = None

    def __post_init__(self) -> None:
        w = _frozen(self.weights, "weights", 1)
        m = _frozen(self.means, "means", 2)
        v = _frozen(self.variances, "variances", 2)
        if m.shape[0] != w.shape[0] or v.shape != m.shape:
            raise ValueError("standard errors: weights (K,), means and variances (K, D).")
        if np.any(w < 0) or np.any(m < 0) or np.any(v < 0):
            raise ValueError("standard errors must be non-negative.")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "variances", v)
        if self.noise_only is not None:
            shapes = {"weights": w.shape, "means": m.shape, "variances": v.shape}
            if set(self.noise_only) != set(shapes):
                raise ValueError(f"noise_only needs exactly the keys {sorted(shapes)}.")
            noise = {}
            for key, shape in shapes.items():
                arr = _frozen(self.noise_only[key], f"noise_only.{key}", len(shape))
                if arr.shape != shape or np.any(arr < 0):
                    raise ValueError(f"noise_only.{key} must be non-negative with shape {shape}.")
                noise[key] = arr
            object.__setattr__(self, "noise_only", noise)

    def to_dict(self) -> dict[str, Any]:
        noise = self.noise_only
        return {
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "variances": self.variances.tolist(),
            "replicates": self.replicates,
            "weight_cap": self.weight_cap,
            "weight_norm": self.weight_norm,
            "noise_multiplier": self.noise_multiplier,
            "includes_dp_noise": True,
            "noise_only": None if noise is None else {k: v.tolist() for k, v in noise.items()},
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MixtureStandardErrors:
        try:
            raw = data.get("noise_only")
            noise = None if raw is None else {k: np.asarray(raw[k], dtype=np.float64) for k in raw}
            return cls(
                weights=np.asarray(data["weights"], dtype=np.float64),
                means=np.asarray(data["means"], dtype=np.float64),
                variances=np.asarray(data["variances"], dtype=np.float64),
                replicates=int(data["replicates"]),
                weight_cap=int(data["weight_cap"]),
                weight_norm=float(data["weight_norm"]),
                noise_multiplier=float(data["noise_multiplier"]),
                note=str(data.get("note", BOOTSTRAP_NOTE)),
                noise_only=noise,
            )
        except (TypeError, ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"Invalid standard errors: {err}") from None
