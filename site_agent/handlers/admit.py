"""``admit``: a site checks a whole training job before its first round, and reserves its cost.

The orchestrator sends every selected site an ``admit`` task before round 1 (issue 16.1:
no site spends on a job that cannot be released). The site derives one round's cost itself,
exactly as a train task would (``round_charges``: the same policy checks and the same DP
events, from the spec, its policy and its declared row count; nothing the orchestrator
claims), multiplies it by the job's declared rounds, and

* ``reserve``: refuses (``PolicyRefusal``, naming the dataset, the value and the limit) or
  records a reservation of the whole cost in the ledger, in the transaction that checked it
  (``Ledger.reserve``). Each round's charge then uses up one round of it; every other job's
  check counts what is left, so a job admitted here cannot be starved by a later one.
* ``check``: the same verdict, nothing recorded (``orchestrator plan``).
* ``release``: ends the job's reservation (the job was cancelled, failed or refused
  elsewhere, or completed with rounds to spare).

The whole job's cost is checked by the site's one admission check
(``site_agent.boundary.admission``: RDP at the policy's δ, never by adding ε values).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from common.domain import DpReport, TaskAssignment, UpdateMeta
from common.dp.events import DpEvent
from common.errors import InvalidSpecError
from common.specs import job_spec_from_json
from site_agent.boundary.admission import Projection, Release, check_release
from site_agent.boundary.budget import budget_limit
from site_agent.boundary.disclosure import SiteContext
from site_agent.boundary.ledger import Ledger
from site_agent.config import SiteConfig
from site_agent.handlers.base import Plan, Reply, TaskHandler, parse_request
from site_agent.handlers.train import RoundCharges, round_charges

__all__ = ["AdmitHandler", "AdmitRequest", "RoundCharges", "job_events", "run_admit"]


class AdmitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["reserve", "check", "release"]


def job_events(
    per_round: RoundCharges, rounds: int, *, metrics_releases: int | None = None
) -> list[DpEvent]:
    """``rounds`` rounds of ``per_round``: each event composed ``rounds``-fold, except the
    metrics release, composed ``metrics_releases``-fold when given (the rounds that
    ``metrics.every`` selects release metrics; by default only the last)."""
    return [
        DpEvent(
            e.noise_multiplier,
            e.sample_rate,
            e.steps
            * (metrics_releases if kind == "metrics" and metrics_releases is not None else rounds),
        )
        for kind, e in per_round
    ]


def run_admit(
    *,
    config: SiteConfig,
    ledger: Ledger,
    task: TaskAssignment,
    round_charges: Callable[[TaskAssignment], RoundCharges],
) -> tuple[UpdateMeta, bytes]:
    """Answer an ``admit`` task (see the module docstring); raises PolicyRefusal to refuse."""
    request = parse_request(AdmitRequest, task, source="admission request")
    if request.action == "release":
        released = ledger.release(dataset=task.dataset, job_id=task.job_id, reason="released")
        return _answer(config, task, {"released": released})
    spec = job_spec_from_json(task.job_spec_json)
    if spec.dataset != task.dataset:
        raise InvalidSpecError(
            f"task names dataset {task.dataset!r} but its spec names {spec.dataset!r}"
        )
    # The policy's rules on one round (model, size, steps, σ floor, δ, exact metrics), and
    # the events one round would charge, exactly as the train task will derive them.
    per_round = round_charges(task)
    rounds = spec.rounds
    releases = spec.metrics.release_count(rounds)
    # The job's one histogram release for quantile bin edges (handlers.quantiles) comes
    # after admission and before round 1: the whole job includes it.
    sigma_q = None if spec.encoding.edges_released else spec.encoding.quantile_release
    once = () if sigma_q is None else (DpEvent(sigma_q, 1.0, 1),)
    release = Release(
        what="the job",
        events=(*job_events(per_round, rounds, metrics_releases=releases), *once),
        delta=spec.dp.delta,
        kinds=("reservation",),
        scope=f"its {rounds} rounds",
    )
    limit = budget_limit(config, task.dataset)
    projections: list[Projection] = []

    def whole_job_fits(history: list[DpEvent]) -> None:
        projections.append(
            check_release(
                policy=config.policy,
                max_epsilon=limit,
                dataset=task.dataset,
                release=release,
                history=history,
            )
        )

    if request.action == "check":
        whole_job_fits(ledger.commitments(task.dataset, excluding_job=task.job_id))
    else:
        ledger.reserve(
            dataset=task.dataset,
            job_id=task.job_id,
            per_round=per_round,
            rounds=rounds,
            delta=spec.dp.delta,
            check=whole_job_fits,
            # Held exactly as checked: the metrics of the rounds that release them. The
            # quantile release is charged beside it, checked with it (site_agent.boundary.ledger).
            counts={"metrics": releases},
        )
    proj = projections[-1]
    return _answer(
        config,
        task,
        {
            "admitted": True,
            "reserved": request.action == "reserve",
            "rounds": rounds,
            "epsilon_before": proj.epsilon_before,
            "epsilon_after": proj.epsilon_after,
            "max_epsilon": limit,
            "accountant": proj.accountant,
        },
    )


def _answer(
    config: SiteConfig, task: TaskAssignment, result: dict[str, object]
) -> tuple[UpdateMeta, bytes]:
    """An admission answer: a verdict as JSON, no DP event (nothing was computed on data)."""
    report = DpReport(
        events=(),
        max_grad_norm=0.0,
        delta=config.policy.delta,
        task_epsilon=0.0,
        job_epsilon=0.0,
        dataset_epsilon=0.0,
        policy_delta=config.policy.delta,
        accountant="rdp",
    )
    meta = UpdateMeta(
        site_id=config.site_id,
        task_id=task.task_id,
        num_examples=1,  # one verdict (the wire requires a positive count); no row counted
        dp_report=report,
        metrics=None,
        total_size=0,
        sha256=hashlib.sha256(b"").hexdigest(),
        result_json=json.dumps(result),
    )
    return meta, b""


class AdmitHandler(TaskHandler[Plan]):
    """Admission of a whole training job: a verdict, and a reservation; nothing is computed
    from the data, so nothing is charged."""

    kind = "admit"
    counts_rows = False
    in_memory = False

    def plan(self, site: SiteContext, task: TaskAssignment) -> Plan:
        parse_request(AdmitRequest, task, source="admission request")
        return Plan(None)

    def run(self, site: SiteContext, task: TaskAssignment, plan: Plan, blob: bytes) -> Reply:
        return run_admit(
            config=site.config,
            ledger=site.ledger,
            task=task,
            round_charges=lambda t: round_charges(site, t),
        )
