"""Unit tests for common.dp (accounting, calibrate, rdp, prv, pld): reference values, cross-checks, calibration, bad input."""

from __future__ import annotations

import functools
import math
import warnings

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from opacus.accountants import PRVAccountant

from common.dp import accounting, prv
from common.dp.accounting import ACCOUNTANTS, EpsilonBound, compute_epsilon
from common.dp.calibrate import calibrate_noise_multiplier
from common.dp.events import DpEvent
from common.dp.rdp import rdp_epsilon
from common.errors import PrivacyAccountingError

DELTA = 1e-5

# (σ, q, steps) histories: DP-SGD-like, plain Gaussian (q = 1) metric releases, and mixes.
GRID: list[list[DpEvent]] = [
    [DpEvent(1.0, 0.01, 1000)],
    [DpEvent(0.8, 0.02, 300)],
    [DpEvent(2.0, 0.05, 500)],
    [DpEvent(1.5, 0.1, 50)],
    [DpEvent(0.7, 0.005, 200)],
    [DpEvent(1.0, 1.0, 1)],
    [DpEvent(5.0, 1.0, 20)],
    [DpEvent(1.0, 0.01, 600), DpEvent(20.0, 1.0, 10)],
    [DpEvent(1.2, 0.02, 200), DpEvent(0.9, 0.01, 300), DpEvent(10.0, 1.0, 5)],
    [DpEvent(3.0, 1.0, 2), DpEvent(1.0, 0.5, 3)],
]


@functools.cache
def _reference_pld_epsilon(events: tuple[DpEvent, ...], delta: float) -> float:
    composed = []
    for e in events:
        gaussian = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        inner = (
            gaussian
            if e.sample_rate == 1.0
            else dp_accounting.PoissonSampledDpEvent(e.sample_rate, gaussian)
        )
        composed.append(dp_accounting.SelfComposedDpEvent(inner, e.steps))
    acc = PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.ComposedDpEvent(composed))
    return float(acc.get_epsilon(delta))


def reference_pld_epsilon(events: list[DpEvent], delta: float) -> float:
    """ε by dp-accounting's PLD accountant, written independently of the module under test."""
    return _reference_pld_epsilon(tuple(events), delta)


def label(events: list[DpEvent]) -> str:
    return "+".join(f"{e.noise_multiplier}/{e.sample_rate}/{e.steps}" for e in events)


# ---------------------------------------------------------------- reference numbers


@pytest.mark.parametrize("accountant", ["prv", "pld"])
def test_reference_value_tight_accountants(accountant: str) -> None:
    # Reference point: q=0.01, σ=1.0, 10,000 steps, δ=1e-5 → ε ≈ 6.19 with PRV/PLD.
    bound = compute_epsilon([DpEvent(1.0, 0.01, 10_000)], delta=DELTA, accountant=accountant)
    assert bound.accountant == accountant
    assert bound.delta == DELTA
    assert 6.18 <= bound.epsilon <= 6.21
    # An upper bound, never the (smaller) GDP approximation 6.01.
    assert bound.epsilon > 6.1


def test_reference_value_rdp() -> None:
    bound = compute_epsilon([DpEvent(1.0, 0.01, 10_000)], delta=DELTA, accountant="rdp")
    assert bound.epsilon == pytest.approx(6.71, abs=0.01)
    assert rdp_epsilon([DpEvent(1.0, 0.01, 10_000)], delta=DELTA) == bound.epsilon


def test_prv_reports_estimate_below_upper_bound() -> None:
    bound = compute_epsilon([DpEvent(1.0, 0.01, 10_000)], delta=DELTA)
    assert bound.epsilon_estimate is not None
    assert 0 < bound.epsilon - bound.epsilon_estimate <= 0.05
    assert bound.epsilon_estimate == pytest.approx(6.19, abs=0.01)


# ---------------------------------------------------------------- cross-checks


@pytest.mark.parametrize("events", GRID, ids=label)
def test_accountants_agree_with_independent_pld(events: list[DpEvent]) -> None:
    reference = reference_pld_epsilon(events, DELTA)
    prv = compute_epsilon(events, delta=DELTA, accountant="prv")
    pld = compute_epsilon(events, delta=DELTA, accountant="pld")
    rdp = compute_epsilon(events, delta=DELTA, accountant="rdp")
    assert (prv.accountant, pld.accountant, rdp.accountant) == ("prv", "pld", "rdp")
    # PRV within 1% of the independent PLD computation.
    assert prv.epsilon_estimate is not None
    assert prv.epsilon == pytest.approx(reference, rel=0.01)
    # Both are upper bounds; PRV's may sit below PLD's only by its own numerical error.
    prv_error = prv.epsilon - prv.epsilon_estimate
    assert prv.epsilon >= reference - prv_error - 1e-9
    # The module's PLD (coarser grid, still pessimistic) is close to and not below it.
    assert pld.epsilon == pytest.approx(reference, rel=0.01)
    assert pld.epsilon >= reference * (1 - 1e-3)
    # RDP is the loosest of the three.
    assert rdp.epsilon >= pld.epsilon
    assert rdp.epsilon >= prv.epsilon
    assert rdp.epsilon >= reference


def test_pld_stays_tight_over_many_compositions() -> None:
    # Pessimistic PLD overshoots by ~0.6·k·interval²: with a fixed 1e-3 interval, 10⁵ steps
    # would report 2.85 here instead of ≈ 2.80. The interval must shrink with k.
    events = [DpEvent(2.0, 0.004, 100_000)]
    prv = compute_epsilon(events, delta=DELTA, accountant="prv")
    pld = compute_epsilon(events, delta=DELTA, accountant="pld")
    assert prv.accountant == "prv" and pld.accountant == "pld"
    assert prv.epsilon_estimate is not None
    assert pld.epsilon >= prv.epsilon_estimate - (prv.epsilon - prv.epsilon_estimate)
    assert pld.epsilon == pytest.approx(prv.epsilon, rel=0.005)


@pytest.mark.parametrize(
    "events",
    [[DpEvent(1.0, 0.01, 3000)], [DpEvent(1.0, 0.01, 500), DpEvent(20.0, 1.0, 10)]],
    ids=label,
)
def test_prv_matches_opacus_prv_accountant(events: list[DpEvent]) -> None:
    # The module builds the PRV grid itself (FFT-friendly size, scaled eps_error); it must
    # agree with Opacus's own PRVAccountant within their numerical errors.
    opacus_acc = PRVAccountant()
    opacus_acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus_eps = opacus_acc.get_epsilon(DELTA, eps_error=0.01)
    ours = compute_epsilon(events, delta=DELTA, accountant="prv")
    assert ours.epsilon_estimate is not None
    assert abs(ours.epsilon - opacus_eps) <= 0.01 + (ours.epsilon - ours.epsilon_estimate)


def test_identical_events_are_merged_exactly() -> None:
    one = compute_epsilon([DpEvent(1.0, 0.01, 1000)], delta=DELTA)
    many = compute_epsilon([DpEvent(1.0, 0.01, 100)] * 10, delta=DELTA)
    assert many == one
    assert rdp_epsilon([DpEvent(2.0, 0.1, 5)] * 4, delta=DELTA) == pytest.approx(
        rdp_epsilon([DpEvent(2.0, 0.1, 20)], delta=DELTA), rel=1e-12
    )


def test_order_of_events_does_not_matter() -> None:
    a, b = DpEvent(1.0, 0.01, 400), DpEvent(8.0, 1.0, 3)
    for acc in ACCOUNTANTS:
        assert compute_epsilon([a, b], delta=DELTA, accountant=acc) == compute_epsilon(
            [b, a], delta=DELTA, accountant=acc
        )


def test_empty_history_costs_nothing() -> None:
    for acc in ACCOUNTANTS:
        bound = compute_epsilon([], delta=DELTA, accountant=acc)
        assert bound.epsilon == 0.0
        assert bound.accountant == acc
    assert rdp_epsilon([], delta=DELTA) == 0.0


def test_more_steps_cost_more() -> None:
    for acc in ACCOUNTANTS:
        eps = [
            compute_epsilon([DpEvent(1.0, 0.02, n)], delta=DELTA, accountant=acc).epsilon
            for n in (10, 100, 1000)
        ]
        assert eps[0] < eps[1] < eps[2], acc


# ---------------------------------------------------------------- fallback and failure


def test_prv_falls_back_to_pld_for_tiny_delta() -> None:
    # δ = 1e-11 is below the float64 resolution of the PRV grid for 2,000 steps.
    events = [DpEvent(1.0, 0.01, 2000)]
    bound = compute_epsilon(events, delta=1e-11, accountant="prv")
    assert bound.accountant == "pld"
    assert bound.epsilon_estimate is None
    assert bound.epsilon == pytest.approx(reference_pld_epsilon(events, 1e-11), rel=0.01)
    assert bound.epsilon <= rdp_epsilon(events, delta=1e-11)
    assert bound.epsilon > compute_epsilon(events, delta=1e-5).epsilon


def test_rdp_bound_reported_when_pld_has_no_finite_bound() -> None:
    # PLD truncates tail mass to "infinity"; at δ=1e-15 over 2,000 steps that mass exceeds δ.
    events = [DpEvent(1.0, 0.01, 2000)]
    for acc in ("prv", "pld"):
        bound = compute_epsilon(events, delta=1e-15, accountant=acc)
        assert bound.accountant == "rdp"
        assert bound.epsilon == rdp_epsilon(events, delta=1e-15)


def test_tight_bound_never_exceeds_rdp(monkeypatch: pytest.MonkeyPatch) -> None:
    events = [DpEvent(1.0, 0.01, 100)]
    rdp = rdp_epsilon(events, delta=DELTA)
    monkeypatch.setattr(accounting, "pld_epsilon", lambda *a, **k: rdp * 2)
    bound = compute_epsilon(events, delta=DELTA, accountant="pld")
    assert bound == EpsilonBound(epsilon=rdp, delta=DELTA, accountant="rdp")


def test_prv_falls_back_to_pld_when_grid_too_large() -> None:
    # Huge ε over many steps: the PRV grid would not fit; PLD gives the bound instead.
    events = [DpEvent(0.5, 1.0, 10_000)]
    bound = compute_epsilon(events, delta=DELTA, accountant="prv")
    assert bound.accountant == "pld"
    assert math.isfinite(bound.epsilon)
    assert bound.epsilon <= rdp_epsilon(events, delta=DELTA)


def test_prv_falls_back_when_opacus_returns_infinity() -> None:
    # Observed: Opacus's PRV returns inf for very weak noise under subsampling.
    events = [DpEvent(0.05, 0.01, 100)]
    bound = compute_epsilon(events, delta=DELTA, accountant="prv")
    assert bound.accountant == "pld"
    assert math.isfinite(bound.epsilon)
    assert 0 < bound.epsilon <= rdp_epsilon(events, delta=DELTA)


@pytest.mark.parametrize("acc", ACCOUNTANTS)
def test_unboundable_history_raises(acc: str) -> None:
    # σ so small that 1/σ² overflows has no finite bound in floating point (and σ≈1e-160 never
    # returns from Opacus' RDP series): such an event cannot even be constructed.
    with pytest.raises(ValueError, match=r"at least 0\.01"):
        DpEvent(1e-160, 1.0, 1)
    # At the floor a bound exists, however large.
    assert compute_epsilon([DpEvent(0.01, 1.0, 1)], delta=DELTA, accountant=acc).epsilon > 100


def test_nan_from_pld_falls_back_to_rdp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounting, "pld_epsilon", lambda *a, **k: float("nan"))
    events = [DpEvent(1.0, 0.01, 10)]
    bound = compute_epsilon(events, delta=DELTA, accountant="pld")
    assert bound.accountant == "rdp"
    assert bound.epsilon == rdp_epsilon(events, delta=DELTA)


def test_nan_from_every_accountant_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounting, "pld_epsilon", lambda *a, **k: float("nan"))
    monkeypatch.setattr(accounting, "rdp_raw", lambda *a, **k: float("nan"))
    accounting._compute_merged.cache_clear()  # results are memoised per history
    for acc in ACCOUNTANTS:
        with pytest.raises(PrivacyAccountingError, match="not a usable bound"):
            compute_epsilon([DpEvent(1.0, 0.01, 10)], delta=DELTA, accountant=acc)


def test_safe_half_width_matches_opacus() -> None:
    from opacus.accountants.analysis.prv import (
        PoissonSubsampledGaussianPRV,
        compute_safe_domain_size,
    )

    for events in ([DpEvent(1.0, 0.01, 1000)], [DpEvent(0.8, 0.02, 50), DpEvent(5.0, 1.0, 3)]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = compute_safe_domain_size(
                prvs=[
                    PoissonSubsampledGaussianPRV(e.sample_rate, e.noise_multiplier) for e in events
                ],
                max_self_compositions=[e.steps for e in events],
                eps_error=0.01,
                delta_error=1e-8,
            )
        ours = prv.safe_half_width(events, 0.01, 1e-8)
        assert ours == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("acc", ["prv", "rdp"])
def test_calibration_hits_target_from_below(acc: str) -> None:
    target, q, steps = 2.0, 0.01, 500
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, sample_rate=q, steps=steps, delta=DELTA, accountant=acc
    )
    eps = compute_epsilon([DpEvent(sigma, q, steps)], delta=DELTA, accountant=acc).epsilon
    assert eps <= target
    assert eps >= 0.97 * target
    # Smallest σ: 1% less noise breaks the target.
    eps_less = compute_epsilon([DpEvent(sigma * 0.99, q, steps)], delta=DELTA, accountant=acc)
    assert eps_less.epsilon > target


def test_calibration_with_tight_accountant_needs_less_noise_than_rdp() -> None:
    kwargs = {"target_epsilon": 3.0, "sample_rate": 0.02, "steps": 300, "delta": DELTA}
    sigma_prv = calibrate_noise_multiplier(**kwargs, accountant="prv")  # type: ignore[arg-type]
    sigma_rdp = calibrate_noise_multiplier(**kwargs, accountant="rdp")  # type: ignore[arg-type]
    assert sigma_prv < sigma_rdp


def test_calibration_accounts_for_prior_spend() -> None:
    prior = [DpEvent(1.0, 0.01, 300), DpEvent(20.0, 1.0, 5)]
    target = 3.0
    sigma = calibrate_noise_multiplier(
        target_epsilon=target,
        sample_rate=0.02,
        steps=200,
        delta=DELTA,
        prior_events=prior,
        accountant="prv",
    )
    eps = compute_epsilon([*prior, DpEvent(sigma, 0.02, 200)], delta=DELTA).epsilon
    assert 0.97 * target <= eps <= target
    fresh = calibrate_noise_multiplier(
        target_epsilon=target, sample_rate=0.02, steps=200, delta=DELTA, accountant="prv"
    )
    assert sigma > fresh


def test_calibration_for_a_plain_gaussian_release() -> None:
    sigma = calibrate_noise_multiplier(
        target_epsilon=1.0, sample_rate=1.0, steps=1, delta=DELTA, accountant="pld"
    )
    eps = compute_epsilon([DpEvent(sigma, 1.0, 1)], delta=DELTA, accountant="pld").epsilon
    assert 0.97 <= eps <= 1.0


def test_calibration_fails_when_prior_spend_is_past_target() -> None:
    prior = [DpEvent(0.8, 0.05, 2000)]
    assert compute_epsilon(prior, delta=DELTA).epsilon > 5.0
    with pytest.raises(PrivacyAccountingError, match="target"):
        calibrate_noise_multiplier(
            target_epsilon=5.0, sample_rate=0.01, steps=100, delta=DELTA, prior_events=prior
        )


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [
        (0.0, 0.01, 10),
        (-1.0, 0.01, 10),
        (math.nan, 0.01, 10),
        (math.inf, 0.01, 10),
        ("1.0", 0.01, 10),
        (1.0, 0.0, 10),
        (1.0, -0.1, 10),
        (1.0, 1.5, 10),
        (1.0, math.nan, 10),
        (1.0, 0.01, 0),
        (1.0, 0.01, -5),
        (1.0, 0.01, 2.5),
        (1.0, 0.01, True),
    ],
)
def test_bad_events_are_refused(sigma: object, q: object, steps: object) -> None:
    with pytest.raises(ValueError, match=r"^The .*\.$"):
        DpEvent(sigma, q, steps)  # type: ignore[arg-type]


def test_event_normalises_numeric_types() -> None:
    import numpy as np

    e = DpEvent(np.float32(1.5), 1, np.int64(7))  # type: ignore[arg-type]
    assert e == DpEvent(1.5, 1.0, 7)
    assert type(e.noise_multiplier) is float and type(e.steps) is int


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan, math.inf])
def test_bad_delta_is_refused(delta: float) -> None:
    with pytest.raises(ValueError, match="δ"):
        compute_epsilon([DpEvent(1.0, 0.01, 10)], delta=delta)
    with pytest.raises(ValueError, match="δ"):
        rdp_epsilon([DpEvent(1.0, 0.01, 10)], delta=delta)


def test_unknown_accountant_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown accountant 'gdp'"):
        compute_epsilon([DpEvent(1.0, 0.01, 10)], delta=DELTA, accountant="gdp")


def test_non_events_are_refused() -> None:
    with pytest.raises(ValueError, match="DpEvent"):
        compute_epsilon([(1.0, 0.01, 10)], delta=DELTA)  # type: ignore[list-item]


@pytest.mark.parametrize("target", [0.0, -1.0, math.nan, math.inf])
def test_calibration_refuses_bad_target(target: float) -> None:
    with pytest.raises(ValueError, match="target ε"):
        calibrate_noise_multiplier(target_epsilon=target, sample_rate=0.01, steps=10, delta=DELTA)


def test_calibration_refuses_bad_sample_rate_and_steps() -> None:
    with pytest.raises(ValueError, match="sample rate"):
        calibrate_noise_multiplier(target_epsilon=1.0, sample_rate=0.0, steps=10, delta=DELTA)
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise_multiplier(target_epsilon=1.0, sample_rate=0.1, steps=0, delta=DELTA)


def test_bound_is_a_frozen_value() -> None:
    bound = EpsilonBound(epsilon=1.0, delta=DELTA, accountant="prv")
    with pytest.raises(AttributeError):
        bound.epsilon = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    "events",
    [
        [DpEvent(1.0, 0.01, 10**9)],  # a claimed 10⁹ steps (issue 17.2)
        [DpEvent(1000.0, 1e-6, 10**9)],
        [DpEvent(1.0, 0.01, 10**7)],  # PLD alone took 85 s here
    ],
    ids=["1e9-steps", "1e9-steps-weak", "1e7-steps"],
)
def test_any_history_is_accounted_in_bounded_time_with_a_sound_bound(
    events: list[DpEvent],
) -> None:
    import time

    t0 = time.perf_counter()
    bound = compute_epsilon(events, delta=DELTA)
    assert time.perf_counter() - t0 < 5.0
    # The fallback is the RDP bound: an upper bound, computed independently here.
    assert bound.accountant == "rdp"
    assert bound.epsilon == pytest.approx(rdp_epsilon(events, delta=DELTA))


def test_a_quick_caller_gets_the_rdp_bound_at_once_and_the_tight_one_once_computed() -> None:
    import time

    events = [DpEvent(1.0123, 0.01, 100_000)]  # a history no other test composes (PRV ≈ 0.4 s)
    t0 = time.perf_counter()
    quick = compute_epsilon(events, delta=DELTA, within_s=0.0)
    assert time.perf_counter() - t0 < 0.3
    assert quick.accountant == "rdp"
    assert quick.epsilon == pytest.approx(rdp_epsilon(events, delta=DELTA))
    # The background worker goes on; the next quick call answers with the tight bound.
    deadline = time.time() + 60
    while (later := compute_epsilon(events, delta=DELTA, within_s=0.0)).accountant == "rdp":
        assert time.time() < deadline
        time.sleep(0.05)
    assert later == compute_epsilon(events, delta=DELTA)
    assert later.accountant == "prv" and later.epsilon <= quick.epsilon
    # Unusable inputs still raise for a quick caller, naming the problem.
    with pytest.raises(ValueError, match="δ must be in"):
        compute_epsilon(events, delta=0.0, within_s=0.0)
