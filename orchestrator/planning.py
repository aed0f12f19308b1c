"""Before a job runs: which sites take part, each site's σ, and what the job will cost them.

Sites hold disjoint records, so the released model's sample-level ε is the maximum over sites
of each site's composed ε for the job (parallel composition), not the sum.

With ``dp.target_epsilon`` each site's σ is calibrated to its own sample rate (sites differ in
size) so that no site passes the target over all planned rounds, counting the metric releases
and, with ``encoding.numeric: quantile``, the one release of noised histograms the quantile
bin edges come from. The plan is advisory: every site re-checks each task against its own
ledger and policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.domain import DatasetInfo, Plan, SitePlan, SiteStatus
from common.dp.accounting import compute_epsilon
from common.dp.calibrate import calibrate_noise_multiplier
from common.dp.events import DpEvent
from common.errors import PrivacyAccountingError
from common.specs import JobSpec
from common.training.models import count_spec_parameters
from common.training.schedule import task_schedule
from orchestrator.training.update_bounds import MAX_STEPS_PER_TASK

ACCOUNTANT = "prv"


@dataclass(frozen=True)
class SiteTaskPlan:
    site_id: str
    dataset: DatasetInfo
    sample_rate: float
    steps: int
    noise_multiplier: float


def metrics_event(spec: JobSpec) -> DpEvent | None:
    """The Gaussian-mechanism release of one round's validation metrics (None if exact/off)."""
    if not spec.metrics.enabled or spec.metrics.exact:
        return None
    return DpEvent(noise_multiplier=spec.metrics.noise_multiplier, sample_rate=1.0, steps=1)


def quantile_event(spec: JobSpec) -> DpEvent | None:
    """The one Gaussian release of noised histograms the quantile bin edges come from
    (``orchestrator.training.quantiles``; None unless ``encoding.numeric`` is ``quantile`` and a numeric
    column is binned)."""
    sigma = spec.encoding.quantile_release
    return None if sigma is None else DpEvent(noise_multiplier=sigma, sample_rate=1.0, steps=1)


def prior_events(spec: JobSpec, rounds: int) -> list[DpEvent]:
    """Every release of the job at a site other than DP-SGD's steps."""
    out = []
    q = quantile_event(spec)
    if q is not None:
        out.append(q)
    m = metrics_event(spec)
    if m is not None:
        # One release in each round that releases metrics (metrics.every; the last round).
        releases = spec.metrics.release_count(rounds)
        out.append(DpEvent(noise_multiplier=m.noise_multiplier, sample_rate=1.0, steps=releases))
    return out


def job_events(
    spec: JobSpec, *, noise_multiplier: float, sample_rate: float, steps: int, rounds: int
) -> list[DpEvent]:
    events = [
        DpEvent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps * rounds)
    ]
    return events + prior_events(spec, rounds)


def site_dataset(site: SiteStatus, name: str) -> DatasetInfo | None:
    return next((d for d in site.datasets if d.name == name), None)


def online_holders(sites: Iterable[SiteStatus], name: str) -> list[tuple[SiteStatus, DatasetInfo]]:
    """The sites that expose dataset ``name`` and can take a task now, with that dataset."""
    out = []
    for s in sites:
        d = site_dataset(s, name)
        if d is not None and s.state not in ("offline", "disabled"):
            out.append((s, d))
    return out


def plan_site(spec: JobSpec, site_id: str, ds: DatasetInfo) -> SiteTaskPlan:
    q, steps = task_schedule(
        num_examples=ds.num_rows,
        batch_size=spec.batch_size,
        local_epochs=spec.local_epochs,
        local_steps=spec.local_steps,
    )
    if steps > MAX_STEPS_PER_TASK:  # checked before any calibration runs over them
        raise ValueError(
            f"its {ds.num_rows} registered rows give {steps} steps per round, above the "
            f"orchestrator's limit of {MAX_STEPS_PER_TASK} (set local_steps)"
        )
    if spec.dp.noise_multiplier is not None:
        sigma = spec.dp.noise_multiplier
    else:
        assert spec.dp.target_epsilon is not None
        prior = prior_events(spec, spec.rounds)
        sigma = calibrate_noise_multiplier(
            target_epsilon=spec.dp.target_epsilon,
            sample_rate=q,
            steps=steps * spec.rounds,
            delta=spec.dp.delta,
            prior_events=prior,
            accountant=ACCOUNTANT,
        )
    return SiteTaskPlan(
        site_id=site_id, dataset=ds, sample_rate=q, steps=steps, noise_multiplier=sigma
    )


def plan_job(
    spec: JobSpec, sites: list[SiteStatus], *, excluded: Mapping[str, str] | None = None
) -> Plan:
    """Project each site's cost for ``spec`` and say which sites would refuse it.

    ``excluded``: sites left out of the job (their declared schema disagrees), with why.
    """
    rows: list[SitePlan] = []
    for site in sites:
        ds = site_dataset(site, spec.dataset)
        if ds is None:
            continue
        if excluded and site.site_id in excluded:
            rows.append(
                SitePlan(
                    site.site_id,
                    ds.num_rows,
                    0.0,
                    0.0,
                    0,
                    0.0,
                    ds.epsilon_spent,
                    ds.epsilon_spent,
                    ds.max_epsilon,
                    True,
                    f"excluded from the job: {excluded[site.site_id]}",
                )
            )
            continue
        reason = ""
        try:
            p = plan_site(spec, site.site_id, ds)
        except (PrivacyAccountingError, ValueError) as err:
            rows.append(
                SitePlan(
                    site.site_id,
                    ds.num_rows,
                    0.0,
                    0.0,
                    0,
                    float("inf"),
                    ds.epsilon_spent,
                    float("inf"),
                    ds.max_epsilon,
                    True,
                    str(err),
                )
            )
            continue
        events = job_events(
            spec,
            noise_multiplier=p.noise_multiplier,
            sample_rate=p.sample_rate,
            steps=p.steps,
            rounds=spec.rounds,
        )
        try:
            eps_job = compute_epsilon(events, delta=spec.dp.delta, accountant=ACCOUNTANT).epsilon
            # The site composes the job with its whole history at its own δ; without that
            # history here, sequential composition of the two ε gives the planning estimate.
            eps_at_site_delta = compute_epsilon(
                events, delta=ds.policy_delta or spec.dp.delta, accountant=ACCOUNTANT
            ).epsilon
        except (PrivacyAccountingError, ValueError, ArithmeticError) as err:
            rows.append(
                SitePlan(
                    site.site_id,
                    ds.num_rows,
                    p.noise_multiplier,
                    p.sample_rate,
                    p.steps,
                    float("inf"),
                    ds.epsilon_spent,
                    float("inf"),
                    ds.max_epsilon,
                    True,
                    f"the job's cost cannot be bounded: {err}",
                )
            )
            continue
        after = ds.epsilon_spent + eps_at_site_delta
        pol = site.policy
        if pol is not None:
            if p.noise_multiplier < pol.min_noise_multiplier:
                reason = (
                    f"noise multiplier {p.noise_multiplier:.3g} is below the site's minimum "
                    f"{pol.min_noise_multiplier:.3g}"
                )
            elif spec.dp.delta > pol.delta:
                reason = f"δ={spec.dp.delta:g} is above the site's δ={pol.delta:g}"
            elif spec.model.kind not in pol.allowed_models:
                reason = f"model kind {spec.model.kind!r} is not allowed by the site"
            elif spec.rounds > pol.max_rounds:
                reason = f"{spec.rounds} rounds exceed the site's maximum {pol.max_rounds}"
            elif spec.metrics.exact and not pol.allow_exact_metrics:
                reason = "the site does not release exact metrics"
            elif pol.max_steps_per_task and p.steps > pol.max_steps_per_task:
                reason = (
                    f"{p.steps} steps per round exceed the site's maximum {pol.max_steps_per_task}"
                )
            elif pol.max_parameters and count_spec_parameters(spec.model) > pol.max_parameters:
                reason = (
                    f"the model's {count_spec_parameters(spec.model)} parameters exceed the "
                    f"site's maximum {pol.max_parameters}"
                )
            elif (
                m := metrics_event(spec)
            ) is not None and m.noise_multiplier < pol.min_noise_multiplier:
                reason = (
                    f"metrics noise multiplier {m.noise_multiplier:g} is below the site's "
                    f"minimum {pol.min_noise_multiplier:g}"
                )
        if not reason and ds.max_epsilon > 0 and after > ds.max_epsilon:
            reason = (
                f"projected lifetime ε {after:.3g} would pass the site's budget "
                f"{ds.max_epsilon:.3g} (spent so far {ds.epsilon_spent:.3g})"
            )
        rows.append(
            SitePlan(
                site_id=site.site_id,
                num_examples=ds.num_rows,
                noise_multiplier=p.noise_multiplier,
                sample_rate=p.sample_rate,
                steps=p.steps * spec.rounds,
                projected_epsilon=eps_job,
                dataset_epsilon_before=ds.epsilon_spent,
                dataset_epsilon_after=after,
                max_epsilon=ds.max_epsilon,
                would_refuse=bool(reason),
                reason=reason,
            )
        )
    willing = [r for r in rows if not r.would_refuse]
    feasible = len(willing) >= spec.min_sites
    message = (
        ""
        if feasible
        else (
            f"{len(willing)} site(s) would take the job; it needs min_sites={spec.min_sites}"
            if rows
            else f"no registered site exposes dataset {spec.dataset!r}"
        )
    )
    eps = max((r.projected_epsilon for r in willing), default=0.0)
    return Plan(
        sites=tuple(rows),
        epsilon=eps,
        delta=spec.dp.delta,
        accountant=ACCOUNTANT,
        feasible=feasible,
        message=message,
    )
