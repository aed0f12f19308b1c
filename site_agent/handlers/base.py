"""The contract of a task handler: what one task kind adds to the site pipeline.

A handler is registered under its task kind (:mod:`site_agent.handlers.registry`) and is
called by :class:`site_agent.boundary.pipeline.SitePipeline` in this order:

1. :meth:`TaskHandler.plan` parses the task and decides, from **public inputs only** (the
   task, the spec, the site's policy and declared schema, the dataset's disclosed shape),
   what it would release: a :class:`~site_agent.boundary.admission.Release`, or None when
   nothing computed from the data leaves (``admit``, ``audit``). It reads no row.
2. :meth:`TaskHandler.check_model` checks the downloaded model's bytes (before the charge).
3. The pipeline admits and charges the release in one ledger transaction.
4. :meth:`TaskHandler.run` reads the data (``site.datasets``, loaded on first use), computes
   the release and answers; its DP report lists exactly the events charged.
"""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from common.domain import ChargedEvent, DpReport, Metrics, TaskAssignment, UpdateMeta
from common.dp.events import DpEvent
from common.errors import InvalidSpecError
from common.specs import format_validation_error
from site_agent.boundary.admission import Release
from site_agent.boundary.disclosure import SiteContext

Reply = tuple[UpdateMeta, bytes]
RequestT = TypeVar("RequestT", bound=BaseModel)


@dataclass(frozen=True)
class Plan:
    """A handler's decision before the charge (public inputs only)."""

    release: Release | None
    """What the task would release; None when nothing computed from the data leaves."""


PlanT = TypeVar("PlanT", bound=Plan)


class TaskHandler(ABC, Generic[PlanT]):
    """One task kind (module docstring)."""

    kind: ClassVar[str]
    counts_rows: ClassVar[bool] = True
    """Whether its answer carries example counts the pipeline replaces by the disclosed
    size under ``policy.disclose_row_counts: false`` (training does so itself)."""
    in_memory: ClassVar[bool] = True
    """Whether it reads the table whole, which a ``storage: disk`` dataset refuses (before
    the charge: configuration only)."""

    @abstractmethod
    def plan(self, site: SiteContext, task: TaskAssignment) -> PlanT:
        """Parse and decide from public inputs; raise PolicyRefusal / InvalidSpecError."""

    def check_model(
        self, site: SiteContext, task: TaskAssignment, plan: PlanT, blob: bytes
    ) -> None:
        """Check the task's model bytes before the charge (default: the task carries none)."""

    @abstractmethod
    def run(self, site: SiteContext, task: TaskAssignment, plan: PlanT, blob: bytes) -> Reply:
        """Compute and answer, after the plan's release was charged."""

    def with_public_count(self, answer: Reply, total: int) -> Reply:
        """``answer`` with every example count it carries replaced by the disclosed size
        ``total`` (``policy.disclose_row_counts: false``): the meta's ``num_examples``, kept
        at 0 when the handler sends none (as noised metrics do). The DP results are
        unchanged (post-processing of public values)."""
        meta, blob = answer
        return dataclasses.replace(meta, num_examples=meta.num_examples and total), blob


def parse_request(model: type[RequestT], task: TaskAssignment, *, source: str) -> RequestT:
    """The task's ``request_json`` as ``model``; InvalidSpecError naming each bad field."""
    try:
        return model.model_validate_json(task.request_json)
    except ValidationError as err:
        raise InvalidSpecError(format_validation_error(err, source=source)) from None


def check_sha256(blob: bytes, task: TaskAssignment, what: str) -> None:
    """Refuse model bytes that are not the ones the task names."""
    if hashlib.sha256(blob).hexdigest() != task.model_sha256:
        raise InvalidSpecError(f"{what} bytes do not match the task's sha256")


def reply(
    site: SiteContext,
    task: TaskAssignment,
    *,
    events: Sequence[DpEvent],
    delta: float,
    num_examples: int,
    result_json: str,
    task_epsilon: float = 0.0,
    metrics: Metrics | None = None,
    accountant: str | None = None,
) -> Reply:
    """The answer to a non-training task: its DP result as JSON, no tensor bytes, and a DP
    report with the events charged and the dataset's lifetime spend after them."""
    lifetime = site.ledger.spent(task.dataset, delta=site.config.policy.delta)
    report = DpReport(
        events=tuple(ChargedEvent("metrics", e) for e in events),
        max_grad_norm=0.0,
        delta=delta,
        task_epsilon=task_epsilon,
        job_epsilon=task_epsilon,
        dataset_epsilon=lifetime.epsilon,
        policy_delta=site.config.policy.delta,
        accountant=accountant or lifetime.accountant,
    )
    meta = UpdateMeta(
        site_id=site.config.site_id,
        task_id=task.task_id,
        num_examples=num_examples,
        dp_report=report,
        metrics=metrics,
        total_size=0,
        sha256=hashlib.sha256(b"").hexdigest(),
        result_json=result_json,
    )
    return meta, b""
