"""The state of a federated EM job apart from its protocol: the settings it takes
(:class:`EmSettings`) and each K's run (:class:`EmRun`), with their checkpoint forms
(docs/clustering.md, "Checkpoints")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Required, TypedDict

import numpy as np
import numpy.typing as npt

from common.clustering.model import GaussianMixtureParams
from common.clustering.statistics import SufficientStats

__all__ = ["EmRun", "EmSettings", "check_setting_names", "settings_from_config"]


class EmSettings(TypedDict, total=False):
    """The settings every federated EM job takes (keyword arguments of :class:`MixtureJob`
    and its kinds); docs/clustering.md, "Federated EM".

    ``bounds`` ``(D, 2)`` are the declared feature bounds (data units). ``min_variance``
    (default 1e-5) is a numerical eigenvalue floor in unit-box coordinates (a standard deviation
    of 0.3% of a half-range); the noise-aware floor of :func:`common.clustering.statistics.m_step`
    is what guards against noise. ``n_candidates`` defaults to ``max(64, 16·max K)``;
    ``init_noise_multiplier`` to ``noise_multiplier``; ``loglik_weight`` to 1; ``average_last``
    to the stationary tail; ``min_rounds`` to 3.
    """

    covariance_type: Required[str]
    bounds: Required[npt.ArrayLike]
    max_rounds: Required[int]
    tol: Required[float]
    noise_multiplier: Required[float]
    seed: Required[int]
    min_variance: float
    n_candidates: int | None
    init_noise_multiplier: float | None
    loglik_weight: float
    average_last: int | None
    min_rounds: int


_REQUIRED: Final = ("covariance_type", "bounds", "max_rounds", "tol", "noise_multiplier", "seed")


def check_setting_names(settings: Mapping[str, object]) -> None:
    """``TypeError`` (as for a bad keyword argument) when a required setting is missing or an
    unknown one is given."""
    missing = [k for k in _REQUIRED if k not in settings]
    unknown = sorted(settings.keys() - EmSettings.__annotations__.keys())
    if missing or unknown:
        raise TypeError(
            f"EM settings: missing {', '.join(missing) or 'none'}; unknown {', '.join(unknown) or 'none'}."
        )


def settings_from_config(cfg: Mapping[str, Any]) -> EmSettings:
    """The settings recorded in a checkpoint's ``config`` (:meth:`MixtureJob.state_dict`).

    Raises ``KeyError``, ``TypeError`` or ``ValueError`` on a malformed config.
    """
    return {
        "covariance_type": str(cfg["covariance_type"]),
        "bounds": np.asarray(cfg["bounds"], dtype=np.float64),
        "max_rounds": int(cfg["max_rounds"]),
        "tol": float(cfg["tol"]),
        "noise_multiplier": float(cfg["noise_multiplier"]),
        "seed": int(cfg["seed"]),
        "min_variance": float(cfg["min_variance"]),
        "n_candidates": int(cfg["n_candidates"]),
        "init_noise_multiplier": float(cfg["init_noise_multiplier"]),
        "loglik_weight": float(cfg["loglik_weight"]),
        "average_last": None if cfg["average_last"] is None else int(cfg["average_last"]),
        "min_rounds": int(cfg["min_rounds"]),
    }


@dataclass
class EmRun:
    """One K's EM run, in unit-box coordinates; :meth:`to_dict` / :meth:`from_dict` are its
    JSON-safe checkpoint form."""

    K: int
    params: GaussianMixtureParams | None = None  # θ_t, the model of the next EM request
    history: list[float] = field(default_factory=list)
    history_sd: list[float] = field(default_factory=list)
    n_hat: list[float] = field(default_factory=list)
    stats: list[SufficientStats] = field(default_factory=list)
    count_sd: list[float] = field(default_factory=list)
    model_sd: list[float] = field(default_factory=list)  # jitter of θ_t's log-likelihood
    stop_reason: str | None = None
    sent: dict[str, Any] | None = None  # data-unit params of the pending request
    final_loglik: tuple[float, float] | None = None  # (value, noise sd) from the eval round

    @property
    def key(self) -> str:
        return f"K={self.K}"

    @property
    def rounds(self) -> int:
        return len(self.stats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "K": self.K,
            "params": None if self.params is None else self.params.to_dict(),
            "history": list(self.history),
            "history_sd": list(self.history_sd),
            "n_hat": list(self.n_hat),
            "stats": [st.to_dict() for st in self.stats],
            "count_sd": list(self.count_sd),
            "model_sd": list(self.model_sd),
            "stop_reason": self.stop_reason,
            "sent": self.sent,
            "final_loglik": None if self.final_loglik is None else list(self.final_loglik),
        }

    @classmethod
    def from_dict(cls, r: Mapping[str, Any]) -> EmRun:
        """The inverse of :meth:`to_dict`; raises ``KeyError``, ``TypeError`` or
        ``ValueError`` on a malformed record."""
        fl = r["final_loglik"]
        return cls(
            int(r["K"]),
            params=None if r["params"] is None else GaussianMixtureParams.from_dict(r["params"]),
            history=[float(v) for v in r["history"]],
            history_sd=[float(v) for v in r["history_sd"]],
            n_hat=[float(v) for v in r["n_hat"]],
            stats=[SufficientStats.from_dict(st) for st in r["stats"]],
            count_sd=[float(v) for v in r["count_sd"]],
            model_sd=[float(v) for v in r["model_sd"]],
            stop_reason=None if r["stop_reason"] is None else str(r["stop_reason"]),
            sent=None if r["sent"] is None else dict(r["sent"]),
            final_loglik=None if fl is None else (float(fl[0]), float(fl[1])),
        )
