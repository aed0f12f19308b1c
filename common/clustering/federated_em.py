"""The federated EM kinds: :class:`FederatedEM` (one K) and :class:`FederatedBIC` (a range
of K chosen by BIC), their checkpoints and their price.

:func:`machine_from_state` rebuilds either from :meth:`~FederatedEM.state_dict`;
:func:`request_events` prices a request exactly as a site does (docs/clustering.md, "Federated EM").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Unpack

from common.clustering.em_machine import STATE_VERSION, MixtureJob
from common.clustering.em_state import EmSettings, settings_from_config
from common.clustering.model import GaussianMixtureParams
from common.clustering.selection import select_k_by_bic
from common.clustering.wire import parse_request, release_event
from common.dp.events import DpEvent
from common.errors import InvalidSpecError

__all__ = [
    "FederatedBIC",
    "FederatedEM",
    "machine_from_state",
    "request_events",
]


class FederatedEM(MixtureJob):
    """Federated DP EM for one K (protocol and privacy: docs/clustering.md). The settings are
    :class:`~common.clustering.em_state.EmSettings`."""

    def __init__(
        self, *, K: int, evaluate_final: bool = False, **settings: Unpack[EmSettings]
    ) -> None:
        super().__init__(ks=[K], evaluate_final=evaluate_final, **settings)
        self.K = K

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "K": self.K, "evaluate_final": self.evaluate_final}

    def result(self) -> GaussianMixtureParams:
        """The final model (so far): M-step of the averaged tail statistics, data units."""
        return self._final(self.K)

    @property
    def history(self) -> list[float]:
        """Noisy total log-likelihood (unit box) of the model sent in each EM round."""
        return list(self._runs[self.K].history)

    @property
    def history_sd(self) -> list[float]:
        """Standard deviation of the noise in each ``history`` entry (public)."""
        return list(self._runs[self.K].history_sd)

    @property
    def final_loglik(self) -> tuple[float, float] | None:
        """(noisy log-likelihood, its sd) of :meth:`result` from the eval round, if run."""
        return self._runs[self.K].final_loglik

    @property
    def stop_reason(self) -> str | None:
        """``"converged"``, ``"max_rounds"`` or None while running."""
        return self._runs[self.K].stop_reason


class FederatedBIC(MixtureJob):
    """Federated DP EM for every K in ``k_values`` as one job, K chosen by BIC.

    All K share the init release and travel in the same requests (one pass over each site's
    rows per round); a final ``gmm.eval`` round measures every K's final model. The BIC of
    K uses that noisy log-likelihood and :meth:`mean_rows`; K is chosen by
    :func:`common.clustering.selection.select_k_by_bic` with the public noise standard deviations
    (one-standard-error rule with ``z``). The settings are
    :class:`~common.clustering.em_state.EmSettings`.
    """

    def __init__(
        self, *, k_values: Sequence[int], z: float = 2.0, **settings: Unpack[EmSettings]
    ) -> None:
        super().__init__(ks=k_values, evaluate_final=True, **settings)
        if not (math.isfinite(z) and z >= 0):
            raise InvalidSpecError(f"z must be non-negative and finite, got {z}.")
        self.z = float(z)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "k_values": self.k_values, "z": self.z}

    @property
    def k_values(self) -> list[int]:
        return sorted(self._runs)

    def _fits(self) -> dict[int, tuple[GaussianMixtureParams, float, float]]:
        n = self.mean_rows()
        if not n > 1:
            raise InvalidSpecError("BIC needs at least one absorbed EM round.")
        return {
            K: (self._final_unit(run), self._loglik_estimate(run)[0], n)
            for K, run in self._runs.items()
            if run.history
        }

    @property
    def bic_curve(self) -> dict[int, float]:
        """BIC of each K (unit-box log-likelihoods; lower is better)."""
        return {K: p.bic(ll, n) for K, (p, ll, n) in self._fits().items()}

    def _selection_sd(self) -> dict[int, float]:
        return {
            K: math.hypot(self._loglik_estimate(r)[1], self._model_noise_sd(r))
            for K, r in self._runs.items()
            if r.history
        }

    @property
    def bic_sd(self) -> dict[int, float]:
        """Standard deviation of each BIC value: ``2·√(sd_eval² + sd_model²)``.

        ``sd_eval`` is the noise of the measured log-likelihood; ``sd_model`` the spread of
        the log-likelihood that the model itself loses to the noise in its statistics
        (:func:`common.clustering.selection.noise_loglik_loss`). Two fits of the same K on the
        same rows differ by about this much.
        """
        return {K: 2.0 * sd for K, sd in self._selection_sd().items()}

    @property
    def chosen_k(self) -> int:
        """The smallest K whose BIC is within ``z`` standard deviations of the minimum."""
        return select_k_by_bic(self._fits(), loglik_sd=self._selection_sd(), z=self.z)

    def result(self, K: int | None = None) -> GaussianMixtureParams:
        """The final model of ``K`` (default: :attr:`chosen_k`), in data units."""
        return self._final(self.chosen_k if K is None else K)

    @property
    def results(self) -> dict[int, GaussianMixtureParams]:
        """Every K's final model, in data units."""
        return {K: self._final(K) for K in self._runs}


def request_events(request: Mapping[str, Any]) -> list[DpEvent]:
    """What a site is charged for answering ``request``: the same rule its own
    ``site_agent.gmm_stats.request_cost`` applies (:func:`common.clustering.wire.release_event`)."""
    return [release_event(parse_request(request))]


def machine_from_state(state: Mapping[str, Any]) -> FederatedEM | FederatedBIC:
    """Rebuild a machine from :meth:`FederatedEM.state_dict` (either class).

    Raises :class:`~common.errors.InvalidSpecError` if ``state`` is not such a checkpoint.
    """
    try:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported version {state.get('version')!r}")
        cfg = dict(state["config"])
        common = settings_from_config(cfg)
        machine: FederatedEM | FederatedBIC
        if state["class"] == "FederatedEM":
            machine = FederatedEM(
                K=int(cfg["K"]), evaluate_final=bool(cfg["evaluate_final"]), **common
            )
        elif state["class"] == "FederatedBIC":
            machine = FederatedBIC(
                k_values=[int(k) for k in cfg["k_values"]], z=float(cfg["z"]), **common
            )
        else:
            raise ValueError(f"unknown machine {state['class']!r}")
        machine._load_state(state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise InvalidSpecError(f"Not a mixture checkpoint: {err}") from None
    return machine
