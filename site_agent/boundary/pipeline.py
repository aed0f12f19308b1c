"""The site pipeline: every task, of every kind, passes the same steps in the same order.

1. **parse** the task and find its kind's handler (``site_agent.handlers.registry``);
2. **check from public inputs only** (the handler's plan: the spec validated again, the
   encoding against the site's declared schema, the model's size counted from the spec;
   then the one admission check, ``site_agent.boundary.admission``: policy, σ, δ, projected
   ε). :meth:`SitePipeline.precheck` stops here, before the agent downloads a model;
3. check the downloaded model's bytes against the task;
4. **admit and charge** the release in one ledger transaction (write-ahead: durable before
   anything computed from the data exists; a crash can over-count, never under-count);
5. **load** the data, only now (``site_agent.data.datasets``: on first use, then cached);
6. **run** the handler, which computes the release;
7. **release** its answer: under ``policy.disclose_row_counts: false`` every example count
   is the disclosed one (``site_agent.boundary.disclosure``).

Nothing before step 4 reads a row, so every refusal, message and timing that can reach the
orchestrator before the charge is the same on neighbouring datasets
(``tests/unit/test_neighbouring.py``; ``docs/site-pipeline.md``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from common.domain import DatasetInfo, PolicySummary, TaskAssignment, UpdateMeta
from common.dp import noise
from site_agent.boundary import disclosure
from site_agent.boundary.admission import (
    Projection,
    admit_and_charge,
    check_release,
    commitments_for,
)
from site_agent.boundary.budget import budget_limit
from site_agent.boundary.disclosure import SiteContext
from site_agent.boundary.ledger import Ledger
from site_agent.config import SiteConfig
from site_agent.data.catalog import CatalogCounts
from site_agent.data.datasets import Shape, SiteDatasets
from site_agent.handlers.base import Plan, TaskHandler
from site_agent.handlers.registry import handler_for

log = logging.getLogger("dpfed.site_agent")


class SitePipeline:
    """Runs tasks on one site's datasets (module docstring); thread-safe for reads."""

    def __init__(self, config: SiteConfig, ledger: Ledger) -> None:
        self.config = config
        self.ledger = ledger
        self.datasets = SiteDatasets(config)
        for ds in config.datasets:
            self.datasets.shape(ds.name)  # what the catalog needs; fails fast on a broken one
        self.site = SiteContext(
            config=config,
            ledger=ledger,
            datasets=self.datasets,
            catalog=CatalogCounts(
                config.state_dir,
                ledger,
                config.policy,
                budget_limit=functools.partial(budget_limit, config),
            ),
        )
        self._infos: list[DatasetInfo] = disclosure.dataset_infos(self.site)

    def dataset_infos(self) -> list[DatasetInfo]:
        """What the site discloses about its datasets; recomputed only when the ledger moves."""
        return list(self._infos)

    def policy_summary(self) -> PolicySummary:
        return disclosure.policy_summary(self.config)

    def precheck(self, task: TaskAssignment) -> None:
        """Steps 1-2: refuse a task from public inputs alone, before its model is downloaded
        or built. :meth:`execute` checks all of it again."""
        with noise.secure_noise(self.config.policy.secure_noise):
            _, plan, _ = self._plan(task)
            self._check(task, plan)

    def execute(self, task: TaskAssignment, blob: bytes) -> tuple[UpdateMeta, bytes]:
        """Steps 1-7; raises PolicyRefusal / InvalidSpecError / NotFoundError to refuse.

        Every noise value the task draws comes from the source the site's policy names
        (``policy.secure_noise``; :mod:`common.dp.noise`), set for this thread while it runs.
        """
        with noise.secure_noise(self.config.policy.secure_noise):
            return self._execute(task, blob)

    def _check(self, task: TaskAssignment, plan: Plan) -> Projection | None:
        release = plan.release
        if release is None:
            return None
        return check_release(
            policy=self.config.policy,
            max_epsilon=self.site.budget(task.dataset),
            dataset=task.dataset,
            release=release,
            history=commitments_for(self.ledger, task.dataset, task.job_id, release),
        )

    def _plan(self, task: TaskAssignment) -> tuple[TaskHandler[Any], Plan, Shape | None]:
        """Steps 1-2 up to the admission check: the handler, its plan, and the disclosed
        shape its answer's counts come from (None: exact sizes may leave)."""
        handler: TaskHandler[Any] = handler_for(task.kind)
        public = (
            self.site.disclosed(task.dataset)
            if handler.counts_rows and not self.config.policy.disclose_row_counts
            else None
        )
        if handler.in_memory:
            self.datasets.require_in_memory(task.dataset)
        return handler, handler.plan(self.site, task), public

    def _execute(self, task: TaskAssignment, blob: bytes) -> tuple[UpdateMeta, bytes]:
        handler, plan, public = self._plan(task)
        projection = self._check(task, plan)
        handler.check_model(self.site, task, plan, blob)
        if plan.release is not None:
            assert projection is not None
            log.info(
                "site=%s job=%s round=%d %s accepted: projected ε %.3f → %.3f of %.3f",
                self.config.site_id,
                task.job_id,
                task.round,
                task.kind,
                projection.epsilon_before,
                projection.epsilon_after,
                projection.max_epsilon,
            )
            # Checked again inside the charge's transaction: nothing spends in between.
            admit_and_charge(
                ledger=self.ledger,
                policy=self.config.policy,
                max_epsilon=self.site.budget(task.dataset),
                dataset=task.dataset,
                job_id=task.job_id,
                task_id=task.task_id,
                release=plan.release,
            )
        answer = handler.run(self.site, task, plan, blob)
        if plan.release is not None:
            self._infos = disclosure.dataset_infos(self.site)  # the spend moved
        if public is None:
            return answer
        return handler.with_public_count(answer, public.num_train + (public.num_validation or 0))
