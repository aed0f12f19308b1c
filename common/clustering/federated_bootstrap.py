"""Standard errors of a final mixture from one DP Poisson-bootstrap release (``gmm.boot``).

:class:`FederatedBootstrap` sends one request, sums each replicate over the sites, runs one
M-step per replicate and reports the spread in data units; a site is charged
``DpEvent(σ_boot, 1.0, 1)`` (docs/clustering.md, "DP Poisson bootstrap").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from common.clustering.bootstrap import (
    MAX_BOOTSTRAP_VALUES,
    MixtureStandardErrors,
    ReplicateStats,
    bootstrap_release_size,
    bootstrap_sensitivity,
    bootstrap_weight_norm,
    capped_poisson_moments,
    noise_replicate_stats,
)
from common.clustering.model import FeatureBox, GaussianMixtureParams
from common.clustering.statistics import m_step
from common.clustering.wire import BootRequest, BootResult, ModelRequest, parse_result
from common.dp.events import DpEvent
from common.errors import InvalidSpecError, InvalidUpdateError

__all__ = ["FederatedBootstrap", "check_bootstrap_size"]

_NOISE_SIMULATIONS: Final = 200  # draws simulating the bootstrap noise alone (public)


class FederatedBootstrap:
    """One ``gmm.boot`` round: DP Poisson-bootstrap standard errors of a final mixture.

    ``params`` is the released model (data units), ``bounds`` the declared box. Send
    :meth:`request` to every site that contributed to the model, give the answers to
    :meth:`absorb`, which returns the :class:`~common.clustering.bootstrap.MixtureStandardErrors`.
    Every site that received the request is charged :meth:`planned_events`
    (``DpEvent(σ, 1.0, 1)``).
    Raises :class:`~common.errors.InvalidSpecError` at construction when the release would be
    too large (``replicates × K × (1 + D + |S2|)`` above ``MAX_BOOTSTRAP_VALUES``).
    """

    def __init__(
        self,
        params: GaussianMixtureParams,
        *,
        bounds: npt.ArrayLike,
        replicates: int,
        weight_cap: int,
        noise_multiplier: float,
        round: int = 1,
        min_variance: float = 1e-5,
    ) -> None:
        try:
            self.box = FeatureBox(np.asarray(bounds, dtype=np.float64))
            self.weight_norm = bootstrap_weight_norm(replicates, weight_cap)
        except ValueError as err:
            raise InvalidSpecError(f"bootstrap: {err}") from None
        if params.n_features != self.box.n_features:
            raise InvalidSpecError(
                f"bootstrap: the model has {params.n_features} features, the bounds "
                f"{self.box.n_features}."
            )
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise InvalidSpecError(
                f"bootstrap: noise_multiplier must be positive, got {noise_multiplier}."
            )
        check_bootstrap_size(
            replicates, params.n_components, params.n_features, params.covariance_type
        )
        self.params = params
        self.replicates = int(replicates)
        self.weight_cap = int(weight_cap)
        self.noise_multiplier = float(noise_multiplier)
        self.round = int(round)
        self.min_variance = float(min_variance)
        self.sensitivity = bootstrap_sensitivity(
            params.n_features, params.covariance_type, self.weight_norm
        )
        self.n_sites = 0

    @property
    def key(self) -> str:
        return f"K={self.params.n_components}"

    def request(self) -> dict[str, Any]:
        req = BootRequest(
            round=self.round,
            bounds=tuple((float(lo), float(hi)) for lo, hi in self.box.bounds),
            covariance_type="full" if self.params.covariance_type == "full" else "diag",
            noise_multiplier=self.noise_multiplier,
            replicates=self.replicates,
            weight_cap=self.weight_cap,
            model=ModelRequest(key=self.key, params=self.params.to_dict()),
        )
        return req.model_dump(mode="json")

    def planned_events(self) -> list[DpEvent]:
        """What every site that answers is charged: one Gaussian mechanism."""
        return [DpEvent(self.noise_multiplier, 1.0, 1)]

    def noise_sd(self, n_sites: int) -> float:
        """Standard deviation of the noise on every coordinate of a replicate summed over
        ``n_sites`` sites (unit box; public)."""
        return self.noise_multiplier * self.sensitivity * math.sqrt(max(1, n_sites))

    def absorb(self, site_results: Sequence[Mapping[str, Any]]) -> MixtureStandardErrors:
        """Sum the sites' replicates, run one M-step each, return the standard errors.

        Raises :class:`~common.errors.InvalidUpdateError` if a result does not answer the
        request (kind, round, model key, shapes).
        """
        if not site_results:
            raise InvalidUpdateError("absorb needs at least one site result.")
        K, D = self.params.n_components, self.params.n_features
        R = self.replicates
        total: ReplicateStats | None = None
        for i, raw in enumerate(site_results):
            try:
                res = parse_result(raw)
            except InvalidSpecError as err:
                raise InvalidUpdateError(f"Site result {i}: {err}") from None
            if not isinstance(res, BootResult) or res.round != self.round or res.key != self.key:
                raise InvalidUpdateError(
                    f"Site result {i} does not answer bootstrap round {self.round}."
                )
            try:
                stats = ReplicateStats.from_dict(res.stats)
            except ValueError as err:
                raise InvalidUpdateError(f"Site result {i}: {err}") from None
            if stats.s1.shape != (R, K, D) or stats.covariance_type != self.params.covariance_type:
                raise InvalidUpdateError(f"Site result {i}: wrong replicate statistics shape.")
            total = stats if total is None else total + stats
        assert total is not None
        self.n_sites = len(site_results)
        sd = self.noise_sd(self.n_sites)
        # The bootstrap variance of a smooth statistic scales with Var(w)/E[w]²; capping the
        # Poisson weights lowers it slightly, so scale back to Poisson(1)'s ratio of 1.
        mean_w, var_w, _, _ = capped_poisson_moments(self.weight_cap)
        boot = self._spread(total, sd, mean_w / math.sqrt(var_w))
        # What the noise alone does (post-processing of public quantities): fresh noise of the
        # same scale around the mean replicate, through the same M-step.
        mean = ReplicateStats(
            np.repeat(total.nk.mean(axis=0, keepdims=True), _NOISE_SIMULATIONS, axis=0),
            np.repeat(total.s1.mean(axis=0, keepdims=True), _NOISE_SIMULATIONS, axis=0),
            np.repeat(total.s2.mean(axis=0, keepdims=True), _NOISE_SIMULATIONS, axis=0),
        )
        simulated = noise_replicate_stats(
            mean, noise_multiplier=1.0, sensitivity=sd, rng=np.random.default_rng(self.round)
        )
        noise = self._spread(simulated, sd, 1.0)
        return MixtureStandardErrors(
            weights=boot["weights"],
            means=boot["means"],
            variances=boot["variances"],
            replicates=R,
            weight_cap=self.weight_cap,
            weight_norm=self.weight_norm,
            noise_multiplier=self.noise_multiplier,
            noise_only=noise,
        )

    def _spread(
        self, reps: ReplicateStats, sd: float, factor: float
    ) -> dict[str, npt.NDArray[np.float64]]:
        """``factor`` × the standard deviation over replicates of the M-step's parameters."""
        draws: dict[str, list[npt.NDArray[np.float64]]] = {
            "weights": [],
            "means": [],
            "variances": [],
        }
        for r in range(reps.n_replicates):
            unit = m_step(
                reps.replicate(r),
                covariance_type=self.params.covariance_type,
                min_variance=self.min_variance,
                min_count=max(1.0, sd),
                bound=1.0,
                noise_sd=sd,
            )
            est = self.box.params_from_unit(unit)
            cov = est.covariances
            draws["weights"].append(est.weights)
            draws["means"].append(est.means)
            draws["variances"].append(np.diagonal(cov, axis1=1, axis2=2) if cov.ndim == 3 else cov)
        return {
            k: np.asarray(np.std(np.stack(v), axis=0, ddof=1) * factor) for k, v in draws.items()
        }


def check_bootstrap_size(replicates: int, K: int, D: int, covariance_type: str) -> None:
    """Raise :class:`~common.errors.InvalidSpecError` if a bootstrap release of R replicates of
    K components in D dimensions is too large to travel (before any budget is spent)."""
    size = bootstrap_release_size(replicates, K, D, covariance_type)
    if size > MAX_BOOTSTRAP_VALUES:
        raise InvalidSpecError(
            f"bootstrap: {replicates} replicates of {K} components in {D} dimensions "
            f"({covariance_type}) release {size:,} values, above the limit of "
            f"{MAX_BOOTSTRAP_VALUES:,}; ask for fewer replicates (or diag covariances)."
        )
