"""Which budget a dataset draws on, and admission of any DP release other than a training
round (evaluation, synthetic-data marginals, mixture statistics, the catalog's row count): the
same policy, the same ledger, the same write-ahead order.

A budget belongs to the data, not to its name (:func:`data_key`): two dataset names on the same
file, or on the same database URL and query, draw on one budget, limited by the smaller of
their ``max_epsilon`` (:func:`budget_limit`).

``admit_and_charge`` checks the release against the site's policy (σ floor, δ ceiling) and its
dataset's remaining budget (conservative RDP projection over the whole history and every other
job's live reservation, as for training), and charges the ledger in the same transaction.
Only after it returns may the release be computed.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from common.domain import ChargedEvent, DpReport, Metrics, TaskAssignment, UpdateMeta
from common.dp.events import DpEvent
from common.errors import InvalidSpecError, PolicyRefusal
from common.specs import format_validation_error
from site_agent.config import DatasetConfig, SiteConfig
from site_agent.ledger import Ledger
from site_agent.policy import Projection, TaskCost, project

RequestT = TypeVar("RequestT", bound=BaseModel)


def data_key(cfg: DatasetConfig) -> str:
    """What identifies a dataset's records: its file's real path (symbolic links resolved),
    or its database URL and query (whitespace runs folded, case kept)."""
    if cfg.path is not None:
        return "file:" + os.path.realpath(cfg.path)
    query = re.sub(r"\s+", " ", (cfg.query or "").strip())
    return f"sql:{cfg.url}\n{query}"


def budget_keys(config: SiteConfig) -> dict[str, str]:
    """Each dataset name's budget key (see :class:`site_agent.ledger.Ledger`)."""
    return {d.name: data_key(d) for d in config.datasets}


def open_ledger(config: SiteConfig) -> Ledger:
    """The site's ledger, told which names share a budget."""
    return Ledger(config.state_dir / "ledger.sqlite", budgets=budget_keys(config))


def budget_limit(config: SiteConfig, dataset: str) -> float:
    """The ε limit of ``dataset``'s budget: the smallest over every name on the same data."""
    cfg = config.dataset(dataset)
    if cfg is None:
        return config.max_epsilon_for(dataset)
    key = data_key(cfg)
    return min(config.max_epsilon_for(d.name) for d in config.datasets if data_key(d) == key)


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
    budget = budget_limit(config, dataset)
    cost = TaskCost(events=tuple(events), delta=delta)
    projections: list[Projection] = []

    def within_budget(history: list[DpEvent]) -> None:
        proj = project(history=history, cost=cost, policy_delta=policy.delta, max_epsilon=budget)
        if proj.epsilon_after > budget:
            raise PolicyRefusal(
                f"{what} would bring dataset {dataset!r} to ε={proj.epsilon_after:.3f} "
                f"(spent or promised to admitted jobs {proj.epsilon_before:.3f}), past this "
                f"site's budget {budget:g}."
            )
        projections.append(proj)

    # Check and charge in one ledger transaction: nothing else can spend in between.
    ledger.charge(
        dataset=dataset,
        job_id=job_id,
        round=0,
        task_id=task_id,
        kind=kind,
        events=list(events),
        delta=delta,
        check=within_budget,
    )
    return projections[-1]


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
