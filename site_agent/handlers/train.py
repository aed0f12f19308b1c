"""``train``: one round of local DP-SGD on a site's dataset, and its validation metrics.

Before the charge, from public inputs only: the spec (validated again), the job's feature
encoding against the site's declared schema (``site_agent.boundary.encoding_check``), the
model's size counted from the spec (nothing is built before the policy admits it), the
schedule ``(q, steps)`` from the disclosed row count (the one schedule function,
:func:`common.training.schedule.task_schedule`), the DP events, then the global model's
bytes against the spec. After the charge: the rows are encoded, DP-SGD runs exactly the charged ``(q, steps)``
(``site_agent.trainer``), the metrics leave through the Gaussian mechanism, and only the
noised delta, the example count and the DP report are returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from common.domain import ChargedEvent, DpReport, Metrics, TaskAssignment, UpdateMeta
from common.dp.accounting import EpsilonBound, compute_epsilon
from common.dp.events import DpEvent
from common.dp.running import running_epsilon
from common.errors import InvalidSpecError
from common.schema.encoding import FeatureEncoding
from common.specs import JobSpec, ModelSpec, job_spec_from_json
from common.training.models import build_model, count_spec_parameters
from common.training.schedule import task_schedule
from common.training.tensors import check_update, state_from_bytes, state_to_bytes
from site_agent.boundary.admission import Release, Training, check_release
from site_agent.boundary.disclosure import ACCOUNTANT, SiteContext
from site_agent.boundary.encoding_check import checked_encoding
from site_agent.boundary.ledger import Ledger
from site_agent.device import resolve as resolve_device
from site_agent.handlers.base import Plan, Reply, TaskHandler, check_sha256
from site_agent.handlers.canaries import canaries_for
from site_agent.trainer import TrainParams, evaluate, train_local

log = logging.getLogger("dpfed.site_agent")

RoundCharges = tuple[tuple[str, DpEvent], ...]
"""One round's charges as (kind, event), in the order a train task charges them."""


@dataclass(frozen=True)
class TrainPlan(Plan):
    """Everything a train task is decided on before the charge (public inputs only)."""

    spec: JobSpec
    model_spec: ModelSpec
    encoding: FeatureEncoding
    num_examples: int
    """The size q and the steps come from: the train rows plus included canaries, the rows
    counted by their disclosed (DP) number when the policy keeps sizes private."""
    sample_rate: float
    steps: int
    train_event: DpEvent
    metric_event: DpEvent | None
    exact: bool
    want_metrics: bool


class TrainHandler(TaskHandler[TrainPlan]):
    kind = "train"
    counts_rows = False  # the example count is the disclosed one already (public_num_examples)
    in_memory = False

    def plan(self, site: SiteContext, task: TaskAssignment) -> TrainPlan:
        spec: JobSpec = job_spec_from_json(task.job_spec_json)
        if spec.dataset != task.dataset:
            raise InvalidSpecError(
                f"task names dataset {task.dataset!r} but its spec names {spec.dataset!r}"
            )
        cfg = site.datasets.config_of(task.dataset)
        shape = site.disclosed(task.dataset)
        job_encoding = spec.encoding.feature_encoding() if spec.encoding.derived else None
        if job_encoding is None and spec.encoding.numeric != "minmax":
            raise InvalidSpecError(
                "the job asks for a quantile encoding but carries no derived encoding; the "
                "orchestrator derives it when the job is submitted"
            )
        encoding = checked_encoding(cfg, shape.feature_names, job_encoding, what="training")
        model_spec = _model_spec_for(spec.model, encoding)
        # The row count as disclosed (registration); canaries are drawn by secret coins.
        num_examples = shape.num_train + _included_canaries(site, task, spec, encoding)
        q, steps = task_schedule(
            num_examples=num_examples,
            batch_size=spec.batch_size,
            local_epochs=spec.local_epochs,
            local_steps=spec.local_steps,
        )
        exact = spec.metrics.enabled and spec.metrics.exact
        # Only in the rounds the job releases metrics (metrics.every; by default the last).
        want_metrics = (
            spec.metrics.releases_at(task.round, task.rounds) and shape.num_validation is not None
        )
        train_event = DpEvent(noise_multiplier=task.noise_multiplier, sample_rate=q, steps=steps)
        metric_event = (
            DpEvent(noise_multiplier=spec.metrics.noise_multiplier, sample_rate=1.0, steps=1)
            if want_metrics and not exact
            else None
        )
        release = Release(
            what="the task",
            events=(train_event,) + ((metric_event,) if metric_event else ()),
            delta=spec.dp.delta,
            kinds=("train",) + (("metrics",) if metric_event else ()),
            scope=f"this task (round {task.round} of {task.rounds})",
            training=Training(
                model_kind=spec.model.kind,
                # From the spec: nothing is built before the policy admits its size.
                num_parameters=count_spec_parameters(model_spec),
                round=task.round,
                rounds=task.rounds,
                noise_multiplier=task.noise_multiplier,
                task_delta=spec.dp.delta,
                steps=steps,
            ),
            exact_metrics=exact and want_metrics,
            round=task.round,
        )
        return TrainPlan(
            release=release,
            spec=spec,
            model_spec=model_spec,
            encoding=encoding,
            num_examples=num_examples,
            sample_rate=q,
            steps=steps,
            train_event=train_event,
            metric_event=metric_event,
            exact=exact,
            want_metrics=want_metrics,
        )

    def check_model(
        self, site: SiteContext, task: TaskAssignment, plan: TrainPlan, blob: bytes
    ) -> None:
        check_sha256(blob, task, "the global model's")
        check_update(state_from_bytes(blob), build_model(plan.model_spec).state_dict())

    def run(self, site: SiteContext, task: TaskAssignment, plan: TrainPlan, blob: bytes) -> Reply:
        spec, q, steps = plan.spec, plan.sample_rate, plan.steps
        policy = site.config.policy
        assert plan.release is not None
        epsilons = _report_epsilons_in_background(
            site.ledger,
            task_events=plan.release.events,
            dataset=task.dataset,
            job_id=task.job_id,
            delta=spec.dp.delta,
            policy_delta=policy.delta,
        )
        global_state = state_from_bytes(blob)
        train_rows, validation_rows = site.datasets.encoded(task.dataset, plan.encoding)
        if spec.audit is not None:
            # The audit's canaries train like any record: the ones whose secret coin came up.
            cx, cy, included = canaries_for(site.config.state_dir, task.job_id, spec, plan.encoding)
            train_rows = train_rows.with_extra(cx[included], cy[included])
        # A memory-mapped table is read one Poisson batch at a time; rows in memory train
        # from arrays.
        features, labels = (train_rows, None) if train_rows.maps else train_rows.arrays()
        result = train_local(
            model_spec=plan.model_spec,
            global_state=global_state,
            features=features,
            labels=labels,
            params=TrainParams(
                noise_multiplier=task.noise_multiplier,
                max_grad_norm=spec.dp.max_grad_norm,
                batch_size=spec.batch_size,
                # Exactly the steps charged: the trainer does not recompute them.
                local_epochs=None,
                local_steps=steps,
                optimizer=spec.optimizer,
                seed=spec.seed,
                device=str(resolve_device(site.config.device)),
                # The disclosed size (plus included canaries), when sizes are private: q and
                # the normalisation are then exactly those charged, never from the true count.
                public_num_examples=None if policy.disclose_row_counts else plan.num_examples,
            ),
        )
        if result.steps != steps or abs(result.sample_rate - q) > 1e-12 * q:
            # Never release an update whose DP event differs from the one in the ledger.
            raise InvalidSpecError(
                f"internal: trained {result.steps} steps at q={result.sample_rate:g}, "
                f"charged {steps} at q={q:g}; update withheld"
            )
        metrics: Metrics | None = None
        if plan.want_metrics and validation_rows is not None and len(validation_rows) > 0:
            local = {k: global_state[k] + result.delta[k] for k in global_state}
            ev = evaluate(
                model_spec=plan.model_spec,
                state=local,
                features=validation_rows.x,
                labels=validation_rows.y,
                loss_bound=spec.metrics.loss_bound,
                auc_bins=spec.metrics.auc_bins,
                noise_multiplier=None if plan.exact else spec.metrics.noise_multiplier,
            )
            metrics = ev.released()
            validation_rows.release_pages()  # a memory-mapped side: its pages, not the RSS
        eps = _wait_for_report(epsilons)
        report = DpReport(
            events=tuple(
                ChargedEvent(k, e)
                for k, e in zip(plan.release.kinds, plan.release.events, strict=True)
            ),
            max_grad_norm=spec.dp.max_grad_norm,
            delta=spec.dp.delta,
            task_epsilon=eps.task.epsilon,
            job_epsilon=eps.job.epsilon,
            dataset_epsilon=eps.lifetime.epsilon,
            policy_delta=policy.delta,
            accountant=eps.task.accountant,
            grad_sample_mode=result.grad_sample_mode,
        )
        out = state_to_bytes({k: v.to(torch.float32).contiguous() for k, v in result.delta.items()})
        meta = UpdateMeta(
            site_id=site.config.site_id,
            task_id=task.task_id,
            num_examples=result.num_examples,
            dp_report=report,
            metrics=metrics,
            total_size=len(out),
            sha256=hashlib.sha256(out).hexdigest(),
        )
        return meta, out


def round_charges(site: SiteContext, task: TaskAssignment) -> RoundCharges:
    """One round of the job an ``admit`` task asks about: the policy's rules on a round and
    the events it would charge, exactly as its train tasks derive them.

    The round is the last: it always releases the metrics (if any), so each round's charges,
    times the rounds, cover every release the job makes. The budget is not checked here
    (``history=[]``): the whole job's check is admission's, on the commitments.
    """
    plan = TrainHandler().plan(site, dataclasses.replace(task, kind="train", round=task.rounds))
    assert plan.release is not None
    check_release(
        policy=site.config.policy,
        max_epsilon=site.budget(task.dataset),
        dataset=task.dataset,
        release=plan.release,
        history=[],
    )
    metric = () if plan.metric_event is None else (("metrics", plan.metric_event),)
    return (("train", plan.train_event), *metric)


def _included_canaries(
    site: SiteContext, task: TaskAssignment, spec: JobSpec, enc: FeatureEncoding
) -> int:
    if spec.audit is None:
        return 0
    _, _, included = canaries_for(site.config.state_dir, task.job_id, spec, enc)
    return int(included.sum())


def _model_spec_for(model: ModelSpec, encoding: FeatureEncoding) -> ModelSpec:
    """``model`` with ``input_dim``/``num_classes`` from the encoding (public: the schema).

    Raises:
        InvalidSpecError: the spec states either and it differs from the encoding's.
    """
    derived = {"input_dim": encoding.width, "num_classes": encoding.num_classes}
    for key, value in derived.items():
        given = getattr(model, key)
        if given is not None and given != value:
            raise InvalidSpecError(
                f"model.{key}={given} but the feature encoding gives {key}={value}"
            )
    return model.model_copy(update=derived)


@dataclass(frozen=True)
class _ReportEpsilons:
    task: EpsilonBound
    job: EpsilonBound
    lifetime: EpsilonBound


def _report_epsilons_in_background(
    ledger: Ledger,
    *,
    task_events: Sequence[DpEvent],
    dataset: str,
    job_id: str,
    delta: float,
    policy_delta: float,
) -> Future[_ReportEpsilons]:
    """The DP report's three ε, composed in a thread while the site trains.

    They depend only on the ledger as charged (write-ahead, before training), so computing
    them alongside training gives the same numbers, and a PRV composition does not add to the
    round. Nothing here touches the data. The task's ε is exact; the job's and the lifetime's
    are :func:`common.dp.running.running_epsilon` bounds (at most ~2% above exact).
    """
    history = ledger.events(dataset, job_id=job_id)
    lifetime = ledger.events(dataset)
    out: Future[_ReportEpsilons] = Future()

    def run() -> None:
        try:
            out.set_result(
                _ReportEpsilons(
                    task=compute_epsilon(list(task_events), delta=delta, accountant=ACCOUNTANT),
                    job=running_epsilon(history, delta=delta, accountant=ACCOUNTANT),
                    lifetime=running_epsilon(lifetime, delta=policy_delta, accountant=ACCOUNTANT),
                )
            )
        except BaseException as err:  # handed to the caller, who raises it
            out.set_exception(err)

    threading.Thread(target=run, name="dp-report-accounting", daemon=True).start()
    return out


def _wait_for_report(pending: Future[_ReportEpsilons]) -> _ReportEpsilons:
    """The report's ε once composed (the part of the accounting training did not hide)."""
    return pending.result()
