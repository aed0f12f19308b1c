"""Admission of any DP release other than a training round (evaluation, synthetic-data
marginals, mixture statistics): the same policy, the same ledger, the same write-ahead order.

``admit_and_charge`` checks the release against the site's policy (σ floor, δ ceiling) and its
dataset's remaining budget (conservative RDP projection over the whole history, as for
training), then charges the ledger durably. Only after it returns may the release be computed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from common.accounting import DpEvent
from common.domain import ChargedEvent, DpReport, Metrics, TaskAssignment, UpdateMeta
from common.errors import InvalidSpecError, PolicyRefusal
from common.specs import format_validation_error
from site_agent.config import SiteConfig
from site_agent.ledger import Ledger
from site_agent.policy import Projection, TaskCost, project

RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_request(model: type[RequestT], task: TaskAssignment, *, source: str) -> RequestT:
    """The task's ``request_json`` as ``model``; InvalidSpecError naming each bad field."""
    try:
        return model.model_validate_json(task.request_json)
    except ValidationError as err:
        raise InvalidSpecError(format_validation_error(err, source=source)) from None


def admit_and_charge(
    *,
    config: SiteConfig,
    ledger: Ledger,
    dataset: str,
    job_id: str,
    task_id: str,
    kind: str,
    events: Sequence[DpEvent],
    delta: float,
    what: str,
) -> Projection:
    """Refuse (``PolicyRefusal``) or charge ``events`` for ``what`` on ``dataset``."""
    policy = config.policy
    if not events:
        raise PolicyRefusal(f"{what} on dataset {dataset!r} declares no DP event; refused.")
    weakest = min(e.noise_multiplier for e in events)
    if weakest < policy.min_noise_multiplier:
        raise PolicyRefusal(
            f"{what} on dataset {dataset!r} asks for noise multiplier {weakest:g}, below this "
            f"site's minimum {policy.min_noise_multiplier:g}."
        )
    if delta > policy.delta:
        raise PolicyRefusal(
            f"{what} on dataset {dataset!r} asks for δ={delta:g}, above this site's δ={policy.delta:g}."
        )
    budget = config.max_epsilon_for(dataset)
    proj = project(
        history=ledger.events(dataset),
        cost=TaskCost(events=tuple(events), delta=delta),
        policy_delta=policy.delta,
        max_epsilon=budget,
    )
    if proj.epsilon_after > budget:
        raise PolicyRefusal(
            f"{what} would bring dataset {dataset!r} to ε={proj.epsilon_after:.3f} "
            f"(spent {proj.epsilon_before:.3f}), past this site's budget {budget:g}."
        )
    ledger.charge(
        dataset=dataset,
        job_id=job_id,
        round=0,
        task_id=task_id,
        kind=kind,
        events=list(events),
        delta=delta,
    )
    return proj


def release_update(
    *,
    config: SiteConfig,
    ledger: Ledger,
    task: TaskAssignment,
    events: Sequence[DpEvent] = (),
    delta: float,
    num_examples: int,
    result_json: str,
    task_epsilon: float = 0.0,
    metrics: Metrics | None = None,
    accountant: str | None = None,
) -> tuple[UpdateMeta, bytes]:
    """The answer to a non-training task: its DP result as JSON, no tensor bytes, and a DP
    report with the events charged and the dataset's lifetime spend after them."""
    lifetime = ledger.spent(task.dataset, delta=config.policy.delta)
    report = DpReport(
        events=tuple(ChargedEvent("metrics", e) for e in events),
        max_grad_norm=0.0,
        delta=delta,
        task_epsilon=task_epsilon,
        job_epsilon=task_epsilon,
        dataset_epsilon=lifetime.epsilon,
        policy_delta=config.policy.delta,
        accountant=accountant or lifetime.accountant,
    )
    meta = UpdateMeta(
        site_id=config.site_id,
        task_id=task.task_id,
        num_examples=num_examples,
        dp_report=report,
        metrics=metrics,
        total_size=0,
        sha256=hashlib.sha256(b"").hexdigest(),
        result_json=result_json,
    )
    return meta, b""
