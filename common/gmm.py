"""Gaussian mixture models for federated, differentially private clustering: the maths.

Specification
=============

This module is pure (no I/O, no transport). The site side (:mod:`site_agent.gmm_stats`)
computes and noises statistics with it; the orchestrator side (:mod:`orchestrator.gmm_em`)
turns noised statistics into models with it. Both sides speak the JSON-safe wire messages
defined at the end of this module.

Model
-----
:class:`GaussianMixtureParams` is a mixture ``p(x) = Σ_k π_k N(x; μ_k, Σ_k)`` with full
(``(K, D, D)``) or diagonal (``(K, D)``) covariances, as in scikit-learn's
``GaussianMixture``. EM (Dempster, Laird & Rubin 1977, JRSS-B 39(1)) alternates the E-step
(:func:`expected_stats`: responsibilities ``r_ik = π_k N(x_i; θ_k) / p(x_i)`` and the
sufficient statistics ``N_k = Σ_i r_ik``, ``S1_k = Σ_i r_ik x_i``, ``S2_k = Σ_i r_ik x_i x_iᵀ``
(or its diagonal), plus ``Σ_i log p(x_i)``) and the M-step (:func:`m_step`). The statistics
are sums over rows, so the E-step of a federation is the sum of the sites' E-steps
(:meth:`SufficientStats.__add__`) and the M-step runs once, at the orchestrator.

The unit box (what makes sensitivities finite)
----------------------------------------------
Every feature ``j`` has declared, public bounds ``[lo_j, hi_j]`` (:class:`FeatureBox`). A site
clips each value to them and maps it to ``z_j = (x_j − c_j) / h_j`` with ``c = (lo + hi)/2``
and ``h = (hi − lo)/2``, so every row lies in ``[−1, 1]^D``. The DP statistics, and the model
the orchestrator estimates from them, live in these *unit coordinates*;
:meth:`FeatureBox.params_from_unit` maps a model back to data units (an affine change of
variables, exact for Gaussians). Log-likelihoods measured in the unit box differ from those
in data units by the constant ``n · Σ_j log h_j`` (:attr:`FeatureBox.log_jacobian`), which
cancels in every comparison between models of the same rows (EM progress, BIC).

Sensitivity of the E-step statistics (add/remove one row)
---------------------------------------------------------
One site releases the vector (:func:`release_vector`)

    v = [ N (K) | S1 (K·D) | S2 (upper triangle incl. diagonal, K·D(D+1)/2; or diagonal, K·D)
          | w · (L − m·Σ_k N_k) / h_ℓ ]

where ``L = Σ_i clip(log p(z_i), ℓ_lo, ℓ_hi)``, ``m = (ℓ_lo + ℓ_hi)/2``, ``h_ℓ = (ℓ_hi −
ℓ_lo)/2`` and ``w`` is a public weight (``loglik_weight``). The last coordinate equals
``w · Σ_i ℓ̃_i`` with ``ℓ̃_i = (clip(ℓ_i) − m)/h_ℓ ∈ [−1, 1]``. Adding or removing row ``i``
with unit-box values ``z`` (every ``|z_a| ≤ b``, ``b = 1`` for the box above) and
responsibilities ``r ∈ Δ_K`` (``r_k ≥ 0``, ``Σ_k r_k = 1``) changes ``v`` by

    ‖δv‖² = Σ_k r_k² · (1 + ‖z‖² + q(z)) + w² ℓ̃_i²,

with ``q(z) = Σ_{a≤b} z_a² z_b² = (‖z‖⁴ + Σ_a z_a⁴)/2`` (full) or ``Σ_a z_a⁴`` (diag). Since
``Σ_k r_k² ≤ (Σ_k r_k)² = 1`` (equality for a one-hot ``r``), ``‖z‖² ≤ D b²`` and ``q`` is
maximal at a corner of the box, the L2 sensitivity is (:func:`stats_sensitivity`)

    Δ_full² = 1 + D b² + D(D+1) b⁴ / 2 + w²,      Δ_diag² = 1 + D b² + D b⁴ + w²,

approached by a corner row whose responsibility tends to one-hot and whose log-likelihood is
clipped (an outlier reaches ``ℓ_lo``), so the bound is tight. It does not grow with K: responsibilities sum to one, so a row's mass is
shared, never copied, across components (a per-component analysis would multiply Δ² by K).
Responsibilities depend on the row and the *public* current model only, and the clipping
range ``[ℓ_lo, ℓ_hi]`` is a function of that model (:func:`loglik_clip_range`), so the bound
holds whatever model the orchestrator sends. ``S2`` is symmetric; only its upper triangle is
noised and the noise is mirrored (Dwork, Talwar, Thakurta & Zhang 2014, "Analyze Gauss:
Optimal Bounds for Privacy-Preserving Principal Component Analysis", STOC).

This is the sufficient-statistics perturbation of DP-EM (Park, Foulds, Chaudhuri & Welling
2017, "DP-EM: Differentially Private Expectation Maximization", AISTATS, arXiv:1605.06995),
with one joint Gaussian mechanism for all statistics instead of one per statistic.
:func:`noise_stats` adds ``N(0, (σ·Δ)²)`` to every coordinate of ``v``; that is the Gaussian
mechanism with noise multiplier σ, i.e. ``DpEvent(σ, 1.0, 1)`` per model per round. The
M-step and everything after it are post-processing (Dwork & Roth 2014, Prop. 2.1).

M-step on noisy statistics
--------------------------
:func:`m_step` floors the component masses ``N_k`` at ``min_count`` (noisy masses can be
tiny or negative), projects means into the box, symmetrises the covariances and clips their
eigenvalues to ``[floor_k, D b²]`` (a noisy second moment need not be positive
semi-definite; no distribution on the box has a variance above ``D b²`` in any direction).
The floor is noise-aware: ``floor_k = max(min_variance, √D·τ_k)`` with ``τ_k`` the public
standard deviation of the noise on ``S2_k / N_k``; √D·τ_k is the root-mean-square
eigenvalue of that noise. Without it, a noisy eigenvalue collapses, the component's rows
leak to a broader neighbour, its mass (hence precision) shrinks, and EM drifts into merging
clusters (observed at σ ≈ 8 in 5-D; fixed by the floor). With zero noise and no active
floor it is exactly the EM M-step (checked against scikit-learn's in the tests).

DP initialisation (one extra release)
-------------------------------------
k-means++ (Arthur & Vassilvitskii 2007, SODA) on a noisy *coreset*: the orchestrator draws
``M`` candidate points uniformly in the box from its own seed (public, data independent,
:func:`draw_candidates`); each site releases, for every candidate, the number of its rows
whose nearest candidate it is and the sum of those rows (:class:`CandidateStats`). A row
falls in exactly one cell and contributes ``[1, z]`` to it, so the L2 sensitivity is
``√(1 + D b²)`` (:func:`candidate_sensitivity`) whatever ``M``; with noise multiplier σ this
costs ``DpEvent(σ, 1.0, 1)``. The orchestrator (post-processing) keeps the cells whose
noisy count exceeds three noise standard deviations, takes their noisy centroids weighted by
their counts, and runs weighted k-means++ seeding plus Lloyd iterations on them
(:func:`init_from_candidates`). This is the noisy-coreset idea of Feldman, Fiat, Kaplan &
Nissim 2009 ("Private coresets", STOC) and of the noisy Lloyd step of Su, Cao, Li, Bertino &
Jin 2016 ("Differentially private k-means clustering", CODASPY), restricted to one step on
a data-independent partition. One release serves every K, so a BIC sweep pays it once.

Model selection
---------------
BIC (Schwarz 1978) ``= −2 log L + p log n`` (:meth:`GaussianMixtureParams.bic`). The
log-likelihood of a *final* model is measured by one cheap release,
:func:`scaled_loglik_sum` ``= Σ_i (clip(ℓ_i) − m)/h_ℓ``: each term lies in ``[−1, 1]``, so
its sensitivity is 1 (:data:`LOGLIK_SENSITIVITY`) and it costs ``DpEvent(σ, 1.0, 1)`` per
model; :func:`decode_loglik` recovers ``Σ_i clip(ℓ_i)`` with a noisy row count.
:func:`select_k_by_bic` takes the minimum BIC, or, given a standard deviation per K, the
smallest K whose BIC is within ``z`` standard deviations of the minimum (the
one-standard-error rule, Hastie, Tibshirani & Friedman, *The Elements of Statistical
Learning*, 2nd ed., §7.10). Under DP two sources of spread matter: the release noise of the
measured log-likelihood, and the likelihood each *model* lost to the noise in its
statistics, which varies from fit to fit by far more than the BIC penalty of a component
(about 10³ nats against 60 for 30,000 rows in 2-D at σ = 8).
:func:`noise_loglik_loss` predicts that spread from public quantities (a second-order
expansion of the KL divergence, checked against simulation in the tests); without it the
plain minimum picks an overfitted K whenever its noise happened to be kinder.

One-shot alternative: merging local mixtures
--------------------------------------------
:func:`merge_mixtures` pools the components of local (DP) mixtures, weighted by site weight
times component weight, and reduces them to K: greedy pairwise moment-preserving merges by
Runnalls' upper bound on the KL discrepancy (Runnalls 2007, "Kullback-Leibler Approach to
Gaussian Mixture Reduction", IEEE Trans. Aerospace and Electronic Systems 43(3)), then
Goldberger & Roweis's regroup/refit iterations (2005, "Hierarchical Clustering of a Mixture
Model", NIPS), which do not increase ``Σ_i α_i KL(f_i ‖ g_{π(i)})``. Merging is
post-processing of the local models, so it is DP if they are.

Bag of little bootstraps (site-local diagnostic)
------------------------------------------------
:func:`blb_variance` estimates the sampling variance of the EM estimates on one site's own
rows (Kleiner, Talwalkar, Sarkar & Jordan 2014, "A Scalable Bootstrap for Massive Data",
JRSS-B 76(4)). It is **not** differentially private: its outputs must stay at the site
(operators use them to judge whether a site has enough rows for a stable fit). The DP,
accounted job option is the Poisson bootstrap below (``bootstrap:`` in a ``kind: gmm`` job).

DP Poisson bootstrap of the final model (the ``bootstrap:`` job option)
-----------------------------------------------------------------------
After the final model θ̂ is fitted, one extra release gives standard errors. Each site draws,
for every row i and replicate r = 1…R, a weight ``w_ir = min(Poisson(1), c)`` (``c`` =
``weight_cap``) from a generator seeded from OS entropy (never the job seed: the weights are
part of the mechanism's secret randomness), rescales each row's weight vector
``w_i = (w_i1 … w_iR)`` to L2 norm at most ``C`` (:func:`bootstrap_weights`), and releases,
for every replicate, the E-step statistics of its rows under the *public* θ̂ with row i
weighted by ``w_ir``: ``N_k^r = Σ_i w_ir r_ik``, ``S1_k^r = Σ_i w_ir r_ik z_i``,
``S2_k^r = Σ_i w_ir r_ik z_i z_iᵀ`` (upper triangle, or diagonal), with rows clipped and
mapped to the unit box exactly as for EM (:class:`ReplicateStats`,
:func:`replicate_stats`). No log-likelihood coordinate is released.

*Why Poisson weights, not BLB's multinomial ones.* The bag of little bootstraps (Kleiner et
al. 2014) resamples n rows from a subset of b ≪ n rows: a row's multinomial weight has mean
n/b and no bound below n, and the weights of all rows are coupled through their fixed sum n,
so adding one row changes every other row's weight law: the per-row sensitivity is
unbounded. The Poisson bootstrap (Hanley & MacGibbon 2006, "Creating non-parametric
bootstrap samples using Poisson frequencies", Computer Methods and Programs in Biomedicine
83(1); Chamandy, Muralidharan, Najmi & Naik 2012, "Estimating uncertainty for massive data
streams", Google technical report) replaces the multinomial(n; 1/n, …) counts by independent
Poisson(1) counts, which is its limit for large n, and is the form in which bootstraps are
computed over distributed data: each site (and each partition) draws its own rows' weights
without coordination. Independence per row is what makes the sensitivity finite; the cap
``c`` and the norm bound ``C`` make it small.

*Sensitivity (add/remove one row).* Responsibilities come from the public θ̂, so a row x with
unit-box values z (``|z_a| ≤ b``) and responsibilities ``r ∈ Δ_K`` contributes
``w_r · u`` to replicate r, the same vector ``u = [r_k | r_k z | r_k (z zᵀ)_{a≤b}]_k`` in every
replicate. As for EM, ``‖u‖² = Σ_k r_k² (1 + ‖z‖² + q(z)) ≤ Δ₀²`` with
``Δ₀² = 1 + D b² + D(D+1) b⁴/2`` (full) or ``1 + D b² + D b⁴`` (diag). The concatenated
release of the R replicates changes by ``(w_1 u, …, w_R u)``, of norm ``‖w‖·‖u‖ ≤ C·Δ₀``
(:func:`bootstrap_sensitivity`). The other rows' weights are independent of x, so they are
coupled in the two neighbouring worlds; for every realisation of the weights the release is
a Gaussian mechanism with sensitivity at most ``C·Δ₀``, and by joint convexity of the
hockey-stick divergence the mixture over the weights is dominated by that Gaussian pair
(Zhu, Dong & Wang 2022, "Optimal Accounting of Differential Privacy via Characteristic
Function", AISTATS, dominating pairs). Noise ``N(0, (σ·C·Δ₀)²)`` on every coordinate
(:func:`noise_replicate_stats`) therefore costs ``DpEvent(σ, 1.0, 1)``, composed with the
job's other releases by the same accountant. ``C = min(c·√R, √(R·E[w²] + 3·√(R·Var[w²])))``
for the capped Poisson w (:func:`bootstrap_weight_norm`): ``c·√R`` would bound every weight
vector without rescaling, but ``‖w‖²`` concentrates near ``2R``, so the three-sigma bound
halves the noise (at c = 4, R = 20: C = 8.95 instead of 17.9) and rescales about 0.5% of
the rows' weight vectors.

*Estimates.* The orchestrator sums each replicate over the sites and runs the M-step per
replicate (:func:`m_step` with the noise-aware floors); components stay aligned because every
replicate's responsibilities come from θ̂. The standard error of a parameter is the standard
deviation over the replicates, multiplied by ``E[w]/sd(w)`` of the capped Poisson (the
bootstrap variance of a smooth statistic scales with ``Var(w)/E[w]²``, which capping lowers
slightly: 1.2% at c = 4). The orchestrator also reports ``noise_only``: the same spread
for 200 simulated replicates made of the mean replicate plus fresh noise of the released
scale (public quantities only, so post-processing). Limits, stated on the model card: (1)
every replicate carries the release noise, so the standard errors include it and overstate
the sampling error (a lot when n is small against ``σ·C·Δ₀``; ``noise_only`` shows how
much); (2) they do *not* include the noise EM's own releases
left in θ̂; (3) one EM step per replicate is the linearised (one-step) bootstrap: exact for
well-separated components, it understates the variance by the fraction of missing
information when components overlap (Meng & Rubin 1991, "Using EM to Obtain Asymptotic
Variance-Covariance Matrices: The SEM Algorithm", JASA 86(416)); (4) the cap and the norm
bound shrink a few rows' weights, which the ``E[w]/sd(w)`` factor corrects only for the cap.

Noise is drawn through :func:`common.noise.gaussian_np`: from the caller's
:class:`numpy.random.Generator` (in production seeded from OS entropy,
``np.random.default_rng(secrets.randbits(128))``), or, where the site's policy sets
``secure_noise``, from a ChaCha20 CSPRNG with Opacus' countermeasure to floating-point attacks
(see :mod:`common.noise`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy import special
from scipy import stats as sps

from common import noise
from common.accounting import DpEvent
from common.errors import InvalidSpecError, NotFoundError

__all__ = [
    "BOOTSTRAP_NOTE",
    "COVARIANCE_TYPES",
    "LOGLIK_SENSITIVITY",
    "MAX_BOOTSTRAP_VALUES",
    "MAX_CANDIDATES",
    "MAX_COMPONENTS",
    "MAX_FEATURES",
    "MAX_MODELS_PER_REQUEST",
    "MAX_REPLICATES",
    "PROTOCOL",
    "BlbVariance",
    "BootRequest",
    "BootResult",
    "CandidateStats",
    "CovarianceType",
    "EmRequest",
    "EmResult",
    "EvalRequest",
    "EvalResult",
    "FeatureBox",
    "GaussianMixtureParams",
    "InitRequest",
    "InitResult",
    "MixtureStandardErrors",
    "ModelRequest",
    "ReleasedMixture",
    "ReplicateStats",
    "SufficientStats",
    "WireDpEvent",
    "blb_variance",
    "bootstrap_release_size",
    "bootstrap_sensitivity",
    "bootstrap_weight_norm",
    "bootstrap_weights",
    "candidate_sensitivity",
    "candidate_stats",
    "capped_poisson_moments",
    "decode_loglik",
    "draw_candidates",
    "expected_stats",
    "init_from_candidates",
    "loglik_clip_range",
    "loglik_noise_sd",
    "m_step",
    "merge_mixtures",
    "noise_candidate_stats",
    "noise_loglik_loss",
    "noise_replicate_stats",
    "noise_stats",
    "parse_request",
    "parse_result",
    "release_vector",
    "replicate_stats",
    "scaled_loglik_sum",
    "select_k_by_bic",
    "stats_sensitivity",
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


# --------------------------------------------------------------------------- the unit box


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

    def to_list(self) -> list[list[float]]:
        return [[float(lo), float(hi)] for lo, hi in self.bounds]


# --------------------------------------------------------------------------- the model


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


# --------------------------------------------------------------------------- statistics


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


# --------------------------------------------------------------------------- DP release


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
    rows in ``[−b, b]^D`` and ``w = loglik_weight``; see the module docstring for the
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


# --------------------------------------------------------------------------- DP init


def draw_candidates(
    n_candidates: int, n_features: int, *, rng: np.random.Generator, bound: float = 1.0
) -> FloatArray:
    """``n_candidates`` points uniform in ``[−b, b]^D``: public, data-independent."""
    if not 1 <= n_candidates <= MAX_CANDIDATES:
        raise ValueError(f"n_candidates must be in [1, {MAX_CANDIDATES}], got {n_candidates}.")
    b = _check_positive(bound, "bound")
    return rng.uniform(-b, b, size=(n_candidates, n_features))


@dataclass(frozen=True, eq=False)
class CandidateStats:
    """Per candidate ``c``: ``counts[c]`` rows nearest to it and ``sums[c]`` their sum."""

    counts: FloatArray
    sums: FloatArray

    def __post_init__(self) -> None:
        counts = _frozen(self.counts, "counts", 1)
        sums = _frozen(self.sums, "sums", 2)
        if sums.shape[0] != counts.shape[0]:
            raise ValueError(f"sums must have {counts.shape[0]} rows, got {sums.shape[0]}.")
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "sums", sums)

    def __add__(self, other: CandidateStats) -> CandidateStats:
        if not isinstance(other, CandidateStats):
            return NotImplemented
        if self.sums.shape != other.sums.shape:
            raise ValueError("Cannot add candidate statistics of different shapes.")
        return CandidateStats(self.counts + other.counts, self.sums + other.sums)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.tolist(), "sums": self.sums.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CandidateStats:
        if not isinstance(data, Mapping) or set(data) != {"counts", "sums"}:
            raise ValueError("Candidate statistics need exactly the keys ['counts', 'sums'].")
        try:
            return cls(
                np.asarray(data["counts"], dtype=np.float64),
                np.asarray(data["sums"], dtype=np.float64),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"Invalid candidate statistics: {err}") from None


def candidate_stats(Z: npt.ArrayLike, candidates: npt.ArrayLike) -> CandidateStats:
    """Counts and sums of the rows ``Z`` in the Voronoi cell of each candidate."""
    cand = np.asarray(candidates, dtype=np.float64)
    rows = _as_rows(Z, cand.shape[1])
    M = cand.shape[0]
    d2 = (
        np.sum(rows * rows, axis=1)[:, None]
        - 2.0 * rows @ cand.T
        + np.sum(cand * cand, axis=1)[None, :]
    )
    nearest = np.argmin(d2, axis=1)
    counts = np.bincount(nearest, minlength=M).astype(np.float64)
    sums = np.zeros((M, cand.shape[1]))
    np.add.at(sums, nearest, rows)
    return CandidateStats(counts, sums)


def candidate_sensitivity(D: int, bound: float = 1.0) -> float:
    """L2 sensitivity ``√(1 + D b²)`` of the ``[counts | sums]`` release (one cell per row)."""
    if not (isinstance(D, int) and 1 <= D <= MAX_FEATURES):
        raise ValueError(f"D must be an integer in [1, {MAX_FEATURES}], got {D!r}.")
    b = _check_positive(bound, "bound")
    return math.sqrt(1.0 + D * b * b)


def noise_candidate_stats(
    stats: CandidateStats,
    *,
    noise_multiplier: float,
    sensitivity: float,
    rng: np.random.Generator,
) -> CandidateStats:
    """Gaussian mechanism ``N(0, (σΔ)²)`` on every count and sum: ``DpEvent(σ, 1.0, 1)``."""
    scale = _check_positive(noise_multiplier, "noise_multiplier") * _check_positive(
        sensitivity, "sensitivity"
    )
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator.")
    return CandidateStats(
        stats.counts + noise.gaussian_np(rng, scale, stats.counts.shape),
        stats.sums + noise.gaussian_np(rng, scale, stats.sums.shape),
    )


def _kmeans_pp(points: FloatArray, w: FloatArray, K: int, rng: np.random.Generator) -> FloatArray:
    """Weighted k-means++ seeding (Arthur & Vassilvitskii 2007)."""
    M = points.shape[0]
    chosen = [int(rng.choice(M, p=w / w.sum()))]
    d2 = np.sum((points - points[chosen[0]]) ** 2, axis=1)
    for _ in range(1, K):
        score = w * d2
        total = float(score.sum())
        p = score / total if total > 0 else w / w.sum()
        idx = int(rng.choice(M, p=p))
        chosen.append(idx)
        d2 = np.minimum(d2, np.sum((points - points[idx]) ** 2, axis=1))
    return points[chosen].copy()


def _weighted_lloyd(
    points: FloatArray, w: FloatArray, centres: FloatArray, iters: int
) -> tuple[FloatArray, IntArray, float]:
    for _ in range(iters):
        d2 = np.sum((points[:, None, :] - centres[None, :, :]) ** 2, axis=2)
        labels = np.argmin(d2, axis=1)
        new = centres.copy()
        for k in range(centres.shape[0]):
            mask = labels == k
            if np.any(mask):
                new[k] = np.average(points[mask], axis=0, weights=w[mask])
        if np.allclose(new, centres):
            centres = new
            break
        centres = new
    d2 = np.sum((points[:, None, :] - centres[None, :, :]) ** 2, axis=2)
    labels = np.argmin(d2, axis=1).astype(np.int64)
    inertia = float(np.sum(w * d2[np.arange(points.shape[0]), labels]))
    return centres, labels, inertia


def init_from_candidates(
    stats: CandidateStats,
    K: int,
    *,
    covariance_type: str,
    noise_sd: float,
    rng: np.random.Generator,
    min_variance: float,
    bound: float = 1.0,
    n_restarts: int = 10,
    lloyd_iters: int = 25,
) -> GaussianMixtureParams:
    """Initial mixture (unit coordinates) from summed noisy candidate statistics.

    Post-processing only. Cells with noisy count above ``3·noise_sd`` (``noise_sd``: the
    standard deviation of a summed count; at least K cells are kept, the largest) give
    weighted points ``(centroid, count)``; the best of ``n_restarts`` weighted k-means++
    seedings refined by Lloyd iterations gives the means; weights are the clusters' count
    shares; covariances are isotropic: the clusters' weighted centroid spread plus the
    squared typical cell radius ``b² M^(−2/D)``, floored at ``min_variance``.
    """
    M, D = stats.sums.shape
    if not 1 <= K <= min(M, MAX_COMPONENTS):
        raise ValueError(f"K must be in [1, {min(M, MAX_COMPONENTS)}], got {K}.")
    ctype = _check_covariance_type(covariance_type)
    b = _check_positive(bound, "bound")
    min_var = _check_positive(min_variance, "min_variance")
    counts = stats.counts
    keep = np.flatnonzero(counts > 3.0 * max(noise_sd, 0.0))
    if keep.size < K:
        keep = np.argsort(-counts, kind="stable")[:K]
    w = np.maximum(counts[keep], 1e-12)
    pts = np.clip(stats.sums[keep] / w[:, None], -b, b)
    best: tuple[FloatArray, IntArray, float] | None = None
    for _ in range(max(1, n_restarts)):
        run = _weighted_lloyd(pts, w, _kmeans_pp(pts, w, K, rng), lloyd_iters)
        if best is None or run[2] < best[2]:
            best = run
    assert best is not None
    centres, labels, _ = best
    cell = b * b * float(M) ** (-2.0 / D)
    weights = np.array([w[labels == k].sum() for k in range(K)]) + 1e-12
    var = np.empty(K)
    for k in range(K):
        mask = labels == k
        spread = (
            float(np.average(np.sum((pts[mask] - centres[k]) ** 2, axis=1), weights=w[mask]))
            if np.any(mask)
            else 0.0
        )
        var[k] = min(max(spread / D + cell, min_var), b * b)
    covs = (
        np.stack([np.eye(D) * v for v in var])
        if ctype == "full"
        else np.repeat(var[:, None], D, axis=1)
    )
    return GaussianMixtureParams(weights / weights.sum(), centres, covs, ctype)


# --------------------------------------------------------------------------- model selection


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


# --------------------------------------------------------------------------- merging


def _moment_match(
    alpha: FloatArray, means: FloatArray, covs: FloatArray
) -> tuple[float, FloatArray, FloatArray]:
    """Weight, mean and full covariance of the moment-preserving merge of components."""
    total = float(alpha.sum())
    mu = alpha @ means / total
    diff = means - mu
    cov = np.einsum("i,ide->de", alpha, covs + np.einsum("id,ie->ide", diff, diff)) / total
    return total, mu, (cov + cov.T) / 2.0


def _gauss_kl(
    mu_f: FloatArray, cov_f: FloatArray, mu_g: FloatArray, cov_g: FloatArray
) -> FloatArray:
    """``KL(f_i ‖ g_j)`` for every pair, shape ``(n_f, n_g)`` (full covariances)."""
    D = mu_f.shape[1]
    inv_g = np.linalg.inv(cov_g)
    _, logdet_g = np.linalg.slogdet(cov_g)
    _, logdet_f = np.linalg.slogdet(cov_f)
    trace = np.einsum("jde,ied->ij", inv_g, cov_f)
    diff = mu_g[None, :, :] - mu_f[:, None, :]
    maha = np.einsum("ijd,jde,ije->ij", diff, inv_g, diff)
    return np.asarray(0.5 * (trace + maha - D + logdet_g[None, :] - logdet_f[:, None]))


def merge_mixtures(
    local: Sequence[GaussianMixtureParams],
    site_weights: Sequence[float],
    K: int,
    *,
    refine_iters: int = 20,
) -> GaussianMixtureParams:
    """Reduce the union of local mixtures to K components (one-shot federation).

    The pooled mixture gives component ``(s, k)`` the weight ``site_weights[s]/Σ · π_{s,k}``.
    1. Runnalls (2007): while more than K components remain, merge the pair with the least
       upper bound ``B(i,j) = ½[(w_i+w_j) log det Σ_ij − w_i log det Σ_i − w_j log det Σ_j]``
       on the KL discrepancy, where ``Σ_ij`` is the covariance of their moment-preserving
       merge (weights add, means average, covariances add the spread of the means).
    2. Goldberger & Roweis (2005): up to ``refine_iters`` times, reassign every pooled
       component to the merged component ``g_j`` minimising ``KL(f_i ‖ g_j)`` and refit each
       ``g_j`` as the moment-preserving merge of its members; stop when nothing moves.
    Diagonal models are merged with full covariances and keep the diagonal of the result
    (the KL-closest diagonal Gaussian to a moment-matched one). All models must share D and
    the covariance type.
    """
    if not local:
        raise ValueError("merge_mixtures needs at least one local mixture.")
    if len(site_weights) != len(local):
        raise ValueError(
            f"Need one site weight per mixture ({len(local)}), got {len(site_weights)}."
        )
    sw = np.maximum(np.asarray(site_weights, dtype=np.float64), 0.0)
    if not np.all(np.isfinite(sw)) or sw.sum() <= 0:
        raise ValueError("site_weights must be finite with a positive sum.")
    D, ctype = local[0].n_features, local[0].covariance_type
    if any(p.n_features != D or p.covariance_type != ctype for p in local):
        raise ValueError("All local mixtures must share the number of features and type.")
    alpha = np.concatenate([s / sw.sum() * p.weights for s, p in zip(sw, local, strict=True)])
    means = np.concatenate([p.means for p in local])
    covs = np.concatenate([p.full_covariances() for p in local])
    keep = alpha > 0
    alpha, means, covs = alpha[keep], means[keep], covs[keep]
    n = alpha.size
    if not 1 <= K <= n:
        raise ValueError(f"K must be in [1, {n}] (the pooled components), got {K}.")
    # 1. Greedy Runnalls reduction over groups of pooled components.
    groups: list[list[int]] = [[i] for i in range(n)]
    g_w, g_mu, g_cov = alpha.copy(), means.copy(), covs.copy()
    while len(groups) > K:
        _, g_logdet = np.linalg.slogdet(g_cov)
        wi, wj = g_w[:, None], g_w[None, :]
        tot = wi + wj
        mu = (wi[..., None] * g_mu[:, None, :] + wj[..., None] * g_mu[None, :, :]) / tot[..., None]
        dm = g_mu[:, None, :] - g_mu[None, :, :]
        cov = (wi[..., None, None] * g_cov[:, None] + wj[..., None, None] * g_cov[None, :]) / tot[
            ..., None, None
        ] + (wi * wj / tot**2)[..., None, None] * np.einsum("ijd,ije->ijde", dm, dm)
        _, logdet = np.linalg.slogdet(cov)
        cost = 0.5 * (tot * logdet - wi * g_logdet[:, None] - wj * g_logdet[None, :])
        cost[np.tril_indices(len(groups))] = np.inf
        i, j = divmod(int(np.argmin(cost)), len(groups))
        groups[i] = groups[i] + groups[j]
        del groups[j]
        g_w[i], g_mu[i], g_cov[i] = float(tot[i, j]), mu[i, j], cov[i, j]
        g_w, g_mu, g_cov = (np.delete(a, j, axis=0) for a in (g_w, g_mu, g_cov))
    # 2. Goldberger-Roweis regroup/refit.
    assign = np.empty(n, dtype=np.int64)
    for g, members in enumerate(groups):
        assign[members] = g
    for _ in range(max(0, refine_iters)):
        new_assign = np.argmin(_gauss_kl(means, covs, g_mu, g_cov), axis=1)
        if np.array_equal(new_assign, assign):
            break
        assign = new_assign
        for g in range(K):
            mask = assign == g
            if np.any(mask):
                g_w[g], g_mu[g], g_cov[g] = _moment_match(alpha[mask], means[mask], covs[mask])
    out_cov = g_cov if ctype == "full" else np.diagonal(g_cov, axis1=1, axis2=2).copy()
    return GaussianMixtureParams(g_w / g_w.sum(), g_mu, out_cov, ctype)


# --------------------------------------------------------------------------- bootstrap


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
    :func:`bootstrap_sensitivity`, module docstring), charged to every site's ledger and
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


# --------------------------------------------------------------------------- DP bootstrap

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

    A public function of R and the cap (module docstring): at most ``c·√R``, which every
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
    norm bound of a row's weight vector. See the module docstring for the derivation.
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
    covariance). From the DP Poisson bootstrap (module docstring): they include the bootstrap
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


@dataclass(frozen=True, eq=False)
class ReleasedMixture(GaussianMixtureParams):
    """A mixture as pulled from the orchestrator, with its standard errors when the job asked
    for the ``bootstrap:`` option (else ``standard_errors`` is None)."""

    standard_errors: MixtureStandardErrors | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        se = self.standard_errors
        if se is not None and se.means.shape != self.means.shape:
            raise ValueError(
                f"standard errors have shape {se.means.shape}, the means {self.means.shape}."
            )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.standard_errors is not None:
            out["standard_errors"] = self.standard_errors.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReleasedMixture:
        if not isinstance(data, Mapping):
            raise ValueError("A mixture must be a JSON object.")
        body = dict(data)
        raw_se = body.pop("standard_errors", None)
        params = GaussianMixtureParams.from_dict(body)
        se = None if raw_se is None else MixtureStandardErrors.from_dict(raw_se)
        return cls(params.weights, params.means, params.covariances, params.covariance_type, se)


# --------------------------------------------------------------------------- wire messages

PROTOCOL: Final = "dpfed.gmm/1"
"""Version tag carried by every request and result."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class WireDpEvent(_Wire):
    """A :class:`~common.accounting.DpEvent` on the wire."""

    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=1)

    def to_event(self) -> DpEvent:
        return DpEvent(self.noise_multiplier, self.sample_rate, self.steps)

    @classmethod
    def of(cls, event: DpEvent) -> WireDpEvent:
        return cls(
            noise_multiplier=event.noise_multiplier,
            sample_rate=event.sample_rate,
            steps=event.steps,
        )


class InitRequest(_Wire):
    """Ask a site for noisy nearest-candidate counts and sums (the DP initialisation).

    ``candidates`` are in data units; the site maps them into its unit box.
    """

    protocol: Literal["dpfed.gmm/1"] = PROTOCOL
    kind: Literal["gmm.init"] = "gmm.init"
    round: int = Field(default=0, ge=0)
    bounds: tuple[tuple[float, float], ...] = Field(min_length=1, max_length=MAX_FEATURES)
    candidates: tuple[tuple[float, ...], ...] = Field(min_length=1, max_length=MAX_CANDIDATES)
    noise_multiplier: float = Field(gt=0)


class ModelRequest(_Wire):
    """One model whose E-step statistics are asked for; ``params`` in data units."""

    key: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.=-]+$")
    params: dict[str, Any]


class EmRequest(_Wire):
    """Ask a site for noisy E-step statistics of one or more models (one EM round)."""

    protocol: Literal["dpfed.gmm/1"] = PROTOCOL
    kind: Literal["gmm.em"] = "gmm.em"
    round: int = Field(ge=1)
    bounds: tuple[tuple[float, float], ...] = Field(min_length=1, max_length=MAX_FEATURES)
    covariance_type: Literal["full", "diag"]
    noise_multiplier: float = Field(gt=0)
    loglik_weight: float = Field(default=1.0, gt=0, le=1000)
    models: tuple[ModelRequest, ...] = Field(min_length=1, max_length=MAX_MODELS_PER_REQUEST)


class InitResult(_Wire):
    """A site's answer to :class:`InitRequest`: noised :class:`CandidateStats` (unit box)."""

    protocol: Literal["dpfed.gmm/1"] = PROTOCOL
    kind: Literal["gmm.init.result"] = "gmm.init.result"
    round: int = Field(ge=0)
    stats: dict[str, Any]
    dp_event: WireDpEvent


class EmResult(_Wire):
    """A site's answer to :class:`EmRequest`: noised :class:`SufficientStats` per model key."""

    protocol: Literal["dpfed.gmm/1"] = PROTOCOL
    kind: Literal["gmm.em.result"] = "gmm.em.result"
    round: int = Field(ge=1)
    stats: dict[str, dict[str, Any]]
    dp_event: WireDpEvent


class EvalRequest(_Wire):
    """Ask a site for the noisy scaled log-likelihood sum of fixed models (model selection)."""

    protocol: Literal["dpfed.gmm/1"] = PROTOCOL
    kind: Literal["gmm.eval"] = "gmm.eval"
    round: int = Field(ge=1)
    bounds: tuple[tuple[float, float], ...] = Field(min_length=1, max_length=MAX_FEATURES)
    covariance_type: Literal["full", "diag"]
    noise_multiplier: float = Field(gt=0)
    models: tuple[ModelRequest, ...] = Field(min_length=1, max_length=MAX_MODELS_PER_REQUEST)


class EvalResult(_Wire):
    """A site's answer to :class:`EvalRequest`: noisy :func:`scaled_loglik_sum` per model."""

    protocol: Literal["dpfed.gmm/1"] = PROTOCOL
    kind: Literal["gmm.eval.result"] = "gmm.eval.result"
    round: int = Field(ge=1)
    logliks: dict[str, float]
    dp_event: WireDpEvent


class BootRequest(_Wire):
    """Ask a site for noisy Poisson-bootstrap replicates of the E-step statistics of the final
    model (the ``bootstrap:`` job option). The site derives the weight norm bound and the
    sensitivity from ``replicates``, ``weight_cap`` and the model's shape itself."""

    protocol: Literal["dpfed.gmm/1"] = PROTOCOL
    kind: Literal["gmm.boot"] = "gmm.boot"
    round: int = Field(ge=1)
    bounds: tuple[tuple[float, float], ...] = Field(min_length=1, max_length=MAX_FEATURES)
    covariance_type: Literal["full", "diag"]
    noise_multiplier: float = Field(gt=0)
    replicates: int = Field(ge=2, le=MAX_REPLICATES)
    weight_cap: int = Field(ge=1, le=100)
    model: ModelRequest


class BootResult(_Wire):
    """A site's answer to :class:`BootRequest`: noised :class:`ReplicateStats` (unit box)."""

    protocol: Literal["dpfed.gmm/1"] = PROTOCOL
    kind: Literal["gmm.boot.result"] = "gmm.boot.result"
    round: int = Field(ge=1)
    key: str
    stats: dict[str, Any]
    dp_event: WireDpEvent


def _parse(obj: object, options: Mapping[str, type[_Wire]], what: str) -> _Wire:
    if not isinstance(obj, Mapping):
        raise InvalidSpecError(f"A GMM {what} must be a JSON object.")
    kind = obj.get("kind")
    cls = options.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InvalidSpecError(
            f"Unknown GMM {what} kind {kind!r}; expected one of {sorted(options)}."
        )
    try:
        return cls.model_validate(dict(obj))
    except ValidationError as err:
        raise InvalidSpecError(f"Invalid GMM {what} ({kind}): {err}") from None


def parse_request(obj: object) -> InitRequest | EmRequest | EvalRequest | BootRequest:
    """Validate a request dict; raises :class:`~common.errors.InvalidSpecError`."""
    options: dict[str, type[_Wire]] = {
        "gmm.init": InitRequest,
        "gmm.em": EmRequest,
        "gmm.eval": EvalRequest,
        "gmm.boot": BootRequest,
    }
    return cast(
        InitRequest | EmRequest | EvalRequest | BootRequest, _parse(obj, options, "request")
    )


def release_event(req: InitRequest | EmRequest | EvalRequest | BootRequest) -> DpEvent:
    """What answering ``req`` costs a site: ``DpEvent(σ, 1.0, m)`` for an EM or evaluation
    request naming m models, ``DpEvent(σ, 1.0, 1)`` for an init or a bootstrap request. The
    site charges it and the orchestrator records it, from this one rule."""
    steps = len(req.models) if isinstance(req, EmRequest | EvalRequest) else 1
    return DpEvent(req.noise_multiplier, 1.0, steps)


def parse_result(obj: object) -> InitResult | EmResult | EvalResult | BootResult:
    """Validate a result dict; raises :class:`~common.errors.InvalidSpecError`."""
    options: dict[str, type[_Wire]] = {
        "gmm.init.result": InitResult,
        "gmm.em.result": EmResult,
        "gmm.eval.result": EvalResult,
        "gmm.boot.result": BootResult,
    }
    return cast(InitResult | EmResult | EvalResult | BootResult, _parse(obj, options, "result"))


def load_mixture(path: str | Path) -> ReleasedMixture:
    """A released mixture pulled with ``orchestrator pull JOB --out DIR``.

    Example::

        from common.gmm import load_mixture
        mix = load_mixture("model/")
        labels = mix.predict(X)          # X: (N, D) array in the card's column order
        probs = mix.predict_proba(X)     # (N, K) responsibilities
        se = mix.standard_errors         # None unless the job asked for ``bootstrap:``
        if se is not None:
            se.means                     # (K, D) standard errors of the means (data units)
            se.weights, se.variances     # (K,) and (K, D) (diagonal of the covariances)

    The standard errors (:class:`MixtureStandardErrors`) come from the DP Poisson bootstrap
    and include its release noise (``se.note`` says what they do and do not cover).
    """
    p = Path(path)
    f = p / "mixture.json" if p.is_dir() else p
    if not f.exists():
        raise NotFoundError(f"no mixture.json in {p}")
    return ReleasedMixture.from_dict(json.loads(f.read_text()))
