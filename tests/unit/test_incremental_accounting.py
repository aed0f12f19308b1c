"""PRV composition on grids sized per power of two of the steps (common.dp.prv).

A growing history keeps its grid, so each event is discretised once per doubling and every
further round costs one FFT composition. Checked here against Opacus' own composition and
accountant (independent computations): the same composed pmf on the same grid, and ε bounds
within the accountant's stated error of Opacus' ``PRVAccountant``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)

import common.dp.accounting as acc
import common.dp.prv as prv
from common.dp.accounting import compute_epsilon
from common.dp.events import DpEvent

DELTA = 1e-5


def test_integer_power_equals_numpy_power() -> None:
    rng = np.random.default_rng(0)
    z = rng.uniform(0.5, 1.0, 257) * np.exp(1j * rng.uniform(-np.pi, np.pi, 257))
    for k in (1, 2, 3, 7, 64, 200, 1023):
        np.testing.assert_allclose(prv._integer_power(z, k), z**k, rtol=1e-11, atol=1e-300)


@pytest.mark.parametrize("steps", [[1], [5], [200], [37, 4]])
def test_composition_equals_opacus(steps: list[int]) -> None:
    events = [DpEvent(1.0 + 0.3 * i, 0.02 + 0.01 * i, k) for i, k in enumerate(steps)]
    domain = Domain(t_min=-12.0, t_max=12.0 + 24.0 / 9998, size=10_000)
    ours = prv._compose(events, domain)
    dprvs = [
        discretize(
            TruncatedPrivacyRandomVariable(
                PoissonSubsampledGaussianPRV(e.sample_rate, e.noise_multiplier),
                domain.t_min,
                domain.t_max,
            ),
            domain,
        )
        for e in events
    ]
    theirs = compose_heterogeneous(dprvs, [e.steps for e in events])
    np.testing.assert_allclose(ours.pmf, theirs.pmf, atol=1e-14)
    assert ours.domain == theirs.domain


def test_grid_stays_put_within_a_power_of_two() -> None:
    """Rounds 129..256 of a one-event history share one grid (one discretisation)."""
    prv._discretized_cached.cache_clear()
    acc._compute_merged.cache_clear()
    for k in range(129, 141):
        compute_epsilon([DpEvent(1.0, 32 / 900, k)], delta=DELTA)
    assert prv._discretized_cached.cache_info().misses == 1


@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(1.0, 32 / 900, 3), (1.0, 32 / 900, 200), (0.8, 0.01, 300)]
)
def test_bound_within_opacus_prv(sigma: float, q: float, steps: int) -> None:
    """The bound is above its own estimate and within the stated error of Opacus' bound."""
    bound = compute_epsilon([DpEvent(sigma, q, steps)], delta=DELTA, accountant="prv")
    assert bound.accountant == "prv"
    opacus = PRVAccountant()
    opacus.history = [(sigma, q, steps)]
    eps_error = min(0.5, max(1e-3, 3e-3 * bound.epsilon))
    reference = opacus.get_epsilon(delta=DELTA, eps_error=eps_error)
    assert bound.epsilon_estimate is not None
    assert bound.epsilon >= bound.epsilon_estimate
    assert math.isclose(bound.epsilon, reference, rel_tol=0, abs_tol=eps_error)
