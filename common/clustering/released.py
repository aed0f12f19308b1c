"""A released mixture as pulled from the orchestrator, and reading it from its directory.

:func:`load_mixture` is the only file I/O of :mod:`common.clustering`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.clustering.bootstrap import MixtureStandardErrors
from common.clustering.model import GaussianMixtureParams
from common.errors import NotFoundError

__all__ = [
    "ReleasedMixture",
]


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


def load_mixture(path: str | Path) -> ReleasedMixture:
    """A released mixture pulled with ``orchestrator pull JOB --out DIR``.

    Example::

        from common.clustering.released import load_mixture
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
