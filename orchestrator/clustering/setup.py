"""What a mixture job is set up with before any site is asked: the declared box its sites
clip to, and its EM (fixed K) or BIC (K range) machine with σ calibrated to its target ε."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from common.clustering.federated_bootstrap import check_bootstrap_size
from common.clustering.federated_em import FederatedBIC, FederatedEM
from common.domain import SiteStatus
from common.dp.calibrate import calibrate_noise_multiplier
from common.dp.events import DpEvent
from common.errors import InvalidSpecError
from common.specs import GmmJobSpec
from orchestrator.jobs.accounting import ACCOUNTANT
from orchestrator.planning import site_dataset


def declared_box(spec: GmmJobSpec, sites: list[SiteStatus]) -> tuple[list[str], np.ndarray]:
    """The job's columns and the union of the sites' declared [min, max] for each."""
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}
    columns: list[str] | None = list(spec.columns) if spec.columns else None
    for s in sites:
        ds = site_dataset(s, spec.dataset)
        assert ds is not None
        declared = {c.name: c for c in ds.schema}
        cols = columns or list(ds.columns)
        columns = cols
        for name in cols:
            c = declared.get(name)
            if c is None or c.type != "numeric" or c.min is None or c.max is None:
                raise InvalidSpecError(
                    f"column {name!r} of dataset {spec.dataset!r} has no declared numeric "
                    f"bounds at site {s.site_id}; a mixture job clips to declared bounds"
                )
            lows[name] = min(lows.get(name, c.min), c.min)
            highs[name] = max(highs.get(name, c.max), c.max)
    assert columns is not None
    if spec.bootstrap is not None:  # refuse before any budget is spent
        check_bootstrap_size(
            spec.bootstrap.replicates, max(spec.k_values), len(columns), spec.covariance_type
        )
    return columns, np.array([[lows[c], highs[c]] for c in columns], dtype=np.float64)


def build_machine(spec: GmmJobSpec, bounds: np.ndarray) -> FederatedEM | FederatedBIC:
    """The job's EM (fixed K) or BIC (K range) machine, with σ calibrated to
    ``dp.target_epsilon`` when the spec asks for one.

    Raises:
        PrivacyAccountingError: no σ meets the target (e.g. a bootstrap σ that alone spends it).
    """
    # The seed is part of the checkpoint, so a resumed job continues the same run.
    seed = spec.seed if spec.seed is not None else int(time.time())
    common: dict[str, Any] = dict(
        covariance_type=spec.covariance_type,
        bounds=bounds,
        max_rounds=spec.max_rounds,
        tol=spec.tol,
        seed=seed,
    )

    def build(sigma: float) -> FederatedEM | FederatedBIC:
        if spec.k is not None:
            return FederatedEM(K=spec.k, noise_multiplier=sigma, **common)
        return FederatedBIC(k_values=spec.k_values, noise_multiplier=sigma, **common)

    if spec.dp.noise_multiplier is not None:
        return build(spec.dp.noise_multiplier)
    assert spec.dp.target_epsilon is not None
    # Every release of the job uses one σ and q = 1: calibrate on the worst-case count.
    # A bootstrap release at the job's σ is one more; at its own σ it is a prior event.
    steps = sum(e.steps for e in build(1.0).planned_events())
    prior: list[DpEvent] = []
    if spec.bootstrap is not None:
        if spec.bootstrap.noise_multiplier is None:
            steps += 1
        else:
            prior.append(DpEvent(spec.bootstrap.noise_multiplier, 1.0, 1))
    sigma = calibrate_noise_multiplier(
        target_epsilon=spec.dp.target_epsilon,
        sample_rate=1.0,
        steps=steps,
        delta=spec.dp.delta,
        prior_events=prior,
        accountant=ACCOUNTANT,
    )
    return build(sigma)


def bootstrap_events(spec: GmmJobSpec, machine: FederatedEM | FederatedBIC) -> list[DpEvent]:
    """The bootstrap release's event (empty without the option)."""
    b = spec.bootstrap
    if b is None:
        return []
    sigma = machine.noise_multiplier if b.noise_multiplier is None else b.noise_multiplier
    return [DpEvent(sigma, 1.0, 1)]
