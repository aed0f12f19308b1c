"""DP initialisation: noisy nearest-candidate counts and sums, then k-means++ and Lloyd.

One release of sensitivity ``√(1 + D b²)`` (:func:`candidate_sensitivity`) serves every K
(Feldman et al. 2009; Su et al. 2016; docs/clustering.md, "DP initialisation"). Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from common.clustering.model import (
    MAX_CANDIDATES,
    MAX_COMPONENTS,
    MAX_FEATURES,
    FloatArray,
    GaussianMixtureParams,
    IntArray,
    _as_rows,
    _check_covariance_type,
    _check_positive,
    _frozen,
)
from common.dp import noise

__all__ = [
    "CandidateStats",
    "candidate_sensitivity",
    "candidate_stats",
    "draw_candidates",
    "init_from_candidates",
    "noise_candidate_stats",
]


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
