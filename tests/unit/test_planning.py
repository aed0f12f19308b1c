"""``orchestrator.planning``: who takes a job, at which σ, and what it costs each site.

Calibrating σ is the slow part, so the ``dp.target_epsilon`` plan is computed once per module
and several tests read it; everything else uses a fixed ``dp.noise_multiplier``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from common.domain import DatasetInfo, Plan, PolicySummary, SitePlan, SiteStatus
from common.dp.accounting import compute_epsilon
from common.specs import JobSpec, parse_job_spec
from orchestrator.planning import job_events, plan_job

DELTA = 1e-5
TARGET = 3.0
ROUNDS = 2
LOCAL_STEPS = 5
BATCH = 32

POLICY = PolicySummary(
    max_epsilon=10.0,
    delta=DELTA,
    min_noise_multiplier=0.3,
    max_rounds=1000,
    allowed_models=("linear", "mlp", "cnn1d", "cnn2d"),
    allow_exact_metrics=False,
    max_steps_per_task=100_000,
    max_parameters=100_000_000,
)


def job(**overrides: Any) -> JobSpec:
    data: dict[str, Any] = {
        "dataset": "credit",
        "model": {"kind": "mlp", "input_dim": 30, "num_classes": 2, "hidden": [16]},
        "rounds": ROUNDS,
        "local_steps": LOCAL_STEPS,
        "batch_size": BATCH,
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": DELTA},
        "min_sites": 1,
    }
    data.update(overrides)
    return parse_job_spec(data)


def site(
    site_id: str,
    num_rows: int,
    *,
    dataset: str = "credit",
    spent: float = 0.0,
    max_epsilon: float = 10.0,
    policy: PolicySummary | None = POLICY,
    **policy_overrides: Any,
) -> SiteStatus:
    ds = DatasetInfo(
        name=dataset,
        num_rows=num_rows,
        columns=tuple(f"x{i}" for i in range(30)),
        label="default",
        epsilon_spent=spent,
        max_epsilon=max_epsilon,
        policy_delta=DELTA,
        num_validation_rows=num_rows // 10,
    )
    if policy is not None and policy_overrides:
        policy = replace(policy, **policy_overrides)
    return SiteStatus(
        site_id=site_id,
        datasets=(ds,),
        last_seen=0.0,
        version="0.1.0",
        state="online",
        policy=policy,
    )


def by_id(plan: Plan) -> dict[str, SitePlan]:
    return {s.site_id: s for s in plan.sites}


# ------------------------------------------------------------------ target ε: one σ per site

TARGET_SITES = {"big": 20_000, "mid": 2_000, "small": 300}


@pytest.fixture(scope="module")
def target_plan() -> Plan:
    spec = job(dp={"target_epsilon": TARGET, "delta": DELTA}, min_sites=3)
    sites = [
        *(site(sid, n) for sid, n in TARGET_SITES.items()),
        site("other-data", 5_000, dataset="loans"),
        SiteStatus("no-data", (), 0.0, "0.1.0", "online", POLICY),
        # Calibrated σ for 2,000 rows is about 0.6: below this site's floor.
        site("strict", 2_000, min_noise_multiplier=5.0),
    ]
    return plan_job(spec, sites)


def test_sites_without_the_dataset_are_skipped(target_plan: Plan) -> None:
    assert [s.site_id for s in target_plan.sites] == ["big", "mid", "small", "strict"]


def test_each_site_gets_its_own_sigma(target_plan: Plan) -> None:
    p = by_id(target_plan)
    for sid, n in TARGET_SITES.items():
        assert p[sid].num_examples == n
        assert p[sid].sample_rate == pytest.approx(BATCH / n)
        assert p[sid].steps == LOCAL_STEPS * ROUNDS
    # Smaller site → larger sample rate → more noise for the same ε.
    assert p["small"].sample_rate > p["mid"].sample_rate > p["big"].sample_rate
    assert p["small"].noise_multiplier > p["mid"].noise_multiplier > p["big"].noise_multiplier


def test_each_site_stays_within_the_target(target_plan: Plan) -> None:
    for sid in TARGET_SITES:
        sp = by_id(target_plan)[sid]
        assert sp.projected_epsilon <= TARGET * 1.01, sid
        # The smallest σ that meets the target, not merely some large σ.
        assert sp.projected_epsilon >= TARGET * 0.9, sid
        assert sp.dataset_epsilon_before == 0.0
        assert sp.dataset_epsilon_after == pytest.approx(sp.projected_epsilon, rel=0.02)
        assert not sp.would_refuse and sp.reason == ""


def test_target_holds_under_an_independent_accountant(target_plan: Plan) -> None:
    """Recompute with PLD (dp-accounting) what the plan's σ costs, metrics releases included."""
    spec = job(dp={"target_epsilon": TARGET, "delta": DELTA})
    sp = by_id(target_plan)["small"]
    events = job_events(
        spec,
        noise_multiplier=sp.noise_multiplier,
        sample_rate=sp.sample_rate,
        steps=LOCAL_STEPS,
        rounds=ROUNDS,
    )
    assert len(events) == 2  # training and the noised metrics
    assert compute_epsilon(events, delta=DELTA, accountant="pld").epsilon <= TARGET * 1.01


def test_site_with_a_higher_sigma_floor_would_refuse(target_plan: Plan) -> None:
    strict = by_id(target_plan)["strict"]
    assert strict.noise_multiplier < 5.0
    assert strict.would_refuse
    assert "noise multiplier" in strict.reason
    assert "minimum" in strict.reason


def test_target_plan_summary(target_plan: Plan) -> None:
    willing = [s for s in target_plan.sites if not s.would_refuse]
    assert len(willing) == 3
    assert target_plan.feasible
    assert target_plan.message == ""
    assert target_plan.delta == DELTA
    assert target_plan.accountant
    assert target_plan.epsilon == max(s.projected_epsilon for s in willing)
    assert target_plan.epsilon <= TARGET * 1.01


# ------------------------------------------------------------------ fixed σ: refusals


def test_fixed_sigma_is_used_as_is() -> None:
    plan = plan_job(job(), [site("a", 1_000), site("b", 50_000)])
    p = by_id(plan)
    assert p["a"].noise_multiplier == p["b"].noise_multiplier == 1.0
    # Same σ and steps, larger q: the smaller site pays more.
    assert p["a"].projected_epsilon > p["b"].projected_epsilon > 0
    assert plan.feasible


def test_site_whose_remaining_budget_is_too_small_would_refuse() -> None:
    fresh = plan_job(job(), [site("a", 1_000)]).sites[0]
    cost = fresh.dataset_epsilon_after
    assert 0 < cost < 5.0

    plan = plan_job(job(), [site("a", 1_000, spent=10.0 - cost / 2), site("b", 1_000, spent=1.0)])
    a, b = by_id(plan)["a"], by_id(plan)["b"]
    assert a.would_refuse
    assert "budget" in a.reason
    assert a.dataset_epsilon_before == 10.0 - cost / 2
    assert a.dataset_epsilon_after > a.max_epsilon == 10.0
    assert not b.would_refuse
    assert b.dataset_epsilon_after == pytest.approx(1.0 + cost)
    assert plan.feasible  # min_sites=1, and b takes it
    assert plan.epsilon == b.projected_epsilon


def test_site_whose_sigma_floor_is_above_sigma_would_refuse() -> None:
    plan = plan_job(job(), [site("a", 1_000, min_noise_multiplier=1.5)])
    (a,) = plan.sites
    assert a.would_refuse
    assert "1.5" in a.reason and "noise multiplier" in a.reason
    assert not plan.feasible


@pytest.mark.parametrize(
    ("spec_overrides", "policy_overrides", "words"),
    [
        ({"dp": {"noise_multiplier": 1.0, "delta": 1e-4}}, {}, "δ"),
        ({}, {"allowed_models": ("linear",)}, "model kind"),
        ({}, {"max_rounds": 1}, "rounds"),
        ({"metrics": {"exact": True}}, {}, "exact metrics"),
    ],
    ids=["delta", "model", "rounds", "exact-metrics"],
)
def test_other_policy_refusals_are_explained(
    spec_overrides: dict[str, Any], policy_overrides: dict[str, Any], words: str
) -> None:
    plan = plan_job(job(**spec_overrides), [site("a", 1_000, **policy_overrides)])
    (a,) = plan.sites
    assert a.would_refuse
    assert words in a.reason


def test_exact_metrics_are_fine_where_the_site_allows_them() -> None:
    plan = plan_job(job(metrics={"exact": True}), [site("a", 1_000, allow_exact_metrics=True)])
    assert not plan.sites[0].would_refuse


def test_site_without_a_published_policy_is_checked_on_budget_only() -> None:
    plan = plan_job(
        job(), [site("a", 1_000, policy=None), site("b", 1_000, spent=9.99, policy=None)]
    )
    assert not by_id(plan)["a"].would_refuse
    assert by_id(plan)["b"].would_refuse
    assert "budget" in by_id(plan)["b"].reason


def test_site_with_no_training_rows_would_refuse() -> None:
    plan = plan_job(job(), [site("empty", 0), site("a", 1_000)])
    empty = by_id(plan)["empty"]
    assert empty.would_refuse
    assert empty.reason
    assert plan.epsilon == by_id(plan)["a"].projected_epsilon


def test_a_site_claiming_a_billion_rows_would_refuse_instead_of_planning_10_million_steps() -> None:
    import time

    spec = job(local_steps=None, local_epochs=1.0, dp={"target_epsilon": 3.0, "delta": DELTA})
    t0 = time.perf_counter()
    plan = plan_job(spec, [site("rogue", 10**9), site("a", 1_000)])
    assert time.perf_counter() - t0 < 5.0  # no calibration over 10⁷ steps
    rogue = by_id(plan)["rogue"]
    assert rogue.would_refuse and "above the orchestrator's limit" in rogue.reason
    assert not by_id(plan)["a"].would_refuse


# ------------------------------------------------------------------ feasibility


def test_infeasible_when_fewer_than_min_sites_would_take_it() -> None:
    sites = [site("a", 1_000), site("b", 2_000), site("c", 3_000, min_noise_multiplier=4.0)]
    plan = plan_job(job(min_sites=3), sites)
    assert [s.would_refuse for s in plan.sites] == [False, False, True]
    assert not plan.feasible
    assert "min_sites=3" in plan.message
    assert "2 site" in plan.message
    # The released model's ε is over the willing sites only.
    assert plan.epsilon == max(by_id(plan)[s].projected_epsilon for s in ("a", "b"))

    assert plan_job(job(min_sites=2), sites).feasible


def test_infeasible_when_too_few_sites_hold_the_dataset() -> None:
    plan = plan_job(job(min_sites=2), [site("a", 1_000), site("b", 1_000, dataset="loans")])
    assert [s.site_id for s in plan.sites] == ["a"]
    assert not plan.feasible
    assert "min_sites=2" in plan.message


def test_no_site_with_the_dataset() -> None:
    plan = plan_job(job(), [site("a", 1_000, dataset="loans")])
    assert plan.sites == ()
    assert not plan.feasible
    assert "credit" in plan.message
    assert plan.epsilon == 0.0


# ------------------------------------------------------------------ policy rules the site enforces
# The site refuses these tasks (site_agent/boundary/admission.py check_release, rules 2 and 3) and
# PolicySummary publishes the limits so that jobs can be planned against them, but plan_job
# does not look at them: it reports the site as willing and the job as feasible.


@pytest.mark.parametrize(
    ("spec_overrides", "policy_overrides"),
    [
        ({"local_steps": 50}, {"max_steps_per_task": 10}),
        ({}, {"max_parameters": 100}),  # the 30-16-2 MLP has 530 parameters
        ({"metrics": {"noise_multiplier": 0.2}}, {"min_noise_multiplier": 0.5}),
    ],
    ids=["steps-per-task", "parameters", "metrics-sigma"],
)
def test_plan_refuses_what_the_site_policy_refuses(
    spec_overrides: dict[str, Any], policy_overrides: dict[str, Any]
) -> None:
    # A budget the job cannot reach, so that only the rule under test can refuse it.
    plan = plan_job(job(**spec_overrides), [site("a", 1_000, max_epsilon=1e6, **policy_overrides)])
    (a,) = plan.sites
    assert a.would_refuse
    assert a.reason
    assert not plan.feasible
