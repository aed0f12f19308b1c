"""The agent service's messages: what a site registers (datasets, schema, policy), the task it
is sent, and the update header and DP report it sends back."""

from __future__ import annotations

from common.domain import (
    ChargedEvent,
    ColumnInfo,
    DatasetInfo,
    DpReport,
    Estimate,
    Metrics,
    PolicySummary,
    PooledMetrics,
    SiteRegistration,
    TaskAssignment,
    TaskFailure,
    UpdateMeta,
)
from common.dp.events import DpEvent
from common.errors import InvalidSpecError
from common.rpc.serde.checks import finite
from protos.dpfed.v1.dpfed_pb2 import ColumnInfo as ProtoColumnInfo
from protos.dpfed.v1.dpfed_pb2 import DatasetInfo as ProtoDatasetInfo
from protos.dpfed.v1.dpfed_pb2 import DpEvent as ProtoDpEvent
from protos.dpfed.v1.dpfed_pb2 import DpReport as ProtoDpReport
from protos.dpfed.v1.dpfed_pb2 import Estimate as ProtoEstimate
from protos.dpfed.v1.dpfed_pb2 import Metrics as ProtoMetrics
from protos.dpfed.v1.dpfed_pb2 import PolicySummary as ProtoPolicySummary
from protos.dpfed.v1.dpfed_pb2 import PooledMetrics as ProtoPooledMetrics
from protos.dpfed.v1.dpfed_pb2 import RegisterRequest as ProtoRegisterRequest
from protos.dpfed.v1.dpfed_pb2 import Task as ProtoTask
from protos.dpfed.v1.dpfed_pb2 import TaskFailure as ProtoTaskFailure
from protos.dpfed.v1.dpfed_pb2 import UpdateHeader as ProtoUpdateHeader


def dp_event_to_proto(ev: ChargedEvent) -> ProtoDpEvent:
    return ProtoDpEvent(
        noise_multiplier=ev.event.noise_multiplier,
        sample_rate=ev.event.sample_rate,
        steps=ev.event.steps,
        kind=ev.kind,
    )


def dp_event_from_proto(msg: ProtoDpEvent) -> ChargedEvent:
    try:
        event = DpEvent(
            noise_multiplier=finite("dp event noise_multiplier", msg.noise_multiplier),
            sample_rate=finite("dp event sample_rate", msg.sample_rate),
            steps=int(msg.steps),
        )
    except ValueError as err:
        raise InvalidSpecError(f"invalid DP event: {err}") from None
    if msg.kind not in ("train", "metrics"):
        raise InvalidSpecError(f"unknown DP event kind {msg.kind!r}")
    return ChargedEvent(kind=msg.kind, event=event)


def column_info_to_proto(c: ColumnInfo) -> ProtoColumnInfo:
    return ProtoColumnInfo(
        name=c.name,
        type=c.type,
        has_bounds=c.min is not None and c.max is not None,
        min=c.min if c.min is not None else 0.0,
        max=c.max if c.max is not None else 0.0,
        categories=list(c.categories),
        nullable=c.nullable,
    )


def column_info_from_proto(msg: ProtoColumnInfo) -> ColumnInfo:
    if msg.type not in ("numeric", "categorical"):
        raise InvalidSpecError(f"column {msg.name!r}: unknown type {msg.type!r}")
    return ColumnInfo(
        name=msg.name,
        type=msg.type,
        min=finite("column min", msg.min) if msg.has_bounds else None,
        max=finite("column max", msg.max) if msg.has_bounds else None,
        categories=tuple(msg.categories),
        nullable=msg.nullable if msg.HasField("nullable") else True,
    )


def dataset_info_to_proto(d: DatasetInfo) -> ProtoDatasetInfo:
    return ProtoDatasetInfo(
        name=d.name,
        num_rows=d.num_rows,
        columns=list(d.columns),
        label=d.label,
        epsilon_spent=d.epsilon_spent,
        max_epsilon=d.max_epsilon,
        policy_delta=d.policy_delta,
        num_validation_rows=d.num_validation_rows,
        dp_num_rows=d.dp_num_rows,
        schema=[column_info_to_proto(c) for c in d.schema],
        source=d.source,
        label_schema=column_info_to_proto(d.label_schema) if d.label_schema is not None else None,
    )


def dataset_info_from_proto(msg: ProtoDatasetInfo) -> DatasetInfo:
    if msg.num_rows < 0 or msg.num_validation_rows < 0:
        raise InvalidSpecError(f"dataset {msg.name!r}: negative row count")
    if not 0 <= msg.policy_delta < 1:
        raise InvalidSpecError(f"dataset {msg.name!r}: policy_delta must be in [0, 1)")
    for field in ("epsilon_spent", "max_epsilon"):
        if getattr(msg, field) < 0:
            raise InvalidSpecError(f"dataset {msg.name!r}: {field} must not be negative")
    return DatasetInfo(
        name=msg.name,
        num_rows=int(msg.num_rows),
        columns=tuple(msg.columns),
        label=msg.label,
        epsilon_spent=finite("epsilon_spent", msg.epsilon_spent),
        max_epsilon=finite("max_epsilon", msg.max_epsilon),
        policy_delta=finite("policy_delta", msg.policy_delta),
        num_validation_rows=int(msg.num_validation_rows),
        dp_num_rows=finite("dp_num_rows", msg.dp_num_rows),
        schema=tuple(column_info_from_proto(c) for c in msg.schema),
        source=msg.source or "csv",
        label_schema=(
            column_info_from_proto(msg.label_schema) if msg.HasField("label_schema") else None
        ),
    )


def policy_to_proto(p: PolicySummary) -> ProtoPolicySummary:
    return ProtoPolicySummary(
        max_epsilon=p.max_epsilon,
        delta=p.delta,
        min_noise_multiplier=p.min_noise_multiplier,
        max_rounds=p.max_rounds,
        allowed_models=list(p.allowed_models),
        allow_exact_metrics=p.allow_exact_metrics,
        max_steps_per_task=p.max_steps_per_task,
        max_parameters=p.max_parameters,
        secure_noise=p.secure_noise,
    )


def policy_from_proto(msg: ProtoPolicySummary) -> PolicySummary:
    if min(msg.max_rounds, msg.max_steps_per_task, msg.max_parameters) < 0:
        raise InvalidSpecError("policy summary: negative limits")
    return PolicySummary(
        max_epsilon=finite("policy.max_epsilon", msg.max_epsilon),
        delta=finite("policy.delta", msg.delta),
        min_noise_multiplier=finite("policy.min_noise_multiplier", msg.min_noise_multiplier),
        max_rounds=msg.max_rounds,
        allowed_models=tuple(msg.allowed_models),
        allow_exact_metrics=msg.allow_exact_metrics,
        max_steps_per_task=msg.max_steps_per_task,
        max_parameters=msg.max_parameters,
        secure_noise=msg.secure_noise,
    )


def registration_to_proto(r: SiteRegistration) -> ProtoRegisterRequest:
    return ProtoRegisterRequest(
        site_id=r.site_id,
        agent_version=r.agent_version,
        datasets=[dataset_info_to_proto(d) for d in r.datasets],
        policy=policy_to_proto(r.policy),
    )


def registration_from_proto(msg: ProtoRegisterRequest) -> SiteRegistration:
    if not msg.site_id:
        raise InvalidSpecError("register: site_id is empty")
    return SiteRegistration(
        site_id=msg.site_id,
        agent_version=msg.agent_version,
        datasets=tuple(dataset_info_from_proto(d) for d in msg.datasets),
        policy=policy_from_proto(msg.policy),
    )


def task_to_proto(t: TaskAssignment) -> ProtoTask:
    return ProtoTask(
        task_id=t.task_id,
        job_id=t.job_id,
        round=t.round,
        rounds=t.rounds,
        job_spec_json=t.job_spec_json,
        dataset=t.dataset,
        noise_multiplier=t.noise_multiplier,
        model_size=t.model_size,
        model_sha256=t.model_sha256,
        deadline_unix=t.deadline_unix,
        kind=t.kind,
        request_json=t.request_json,
    )


def task_from_proto(msg: ProtoTask) -> TaskAssignment:
    return TaskAssignment(
        task_id=msg.task_id,
        job_id=msg.job_id,
        round=int(msg.round),
        rounds=int(msg.rounds),
        job_spec_json=msg.job_spec_json,
        dataset=msg.dataset,
        noise_multiplier=finite("noise_multiplier", msg.noise_multiplier),
        model_size=int(msg.model_size),
        model_sha256=msg.model_sha256,
        deadline_unix=finite("deadline_unix", msg.deadline_unix),
        kind=msg.kind or "train",
        request_json=msg.request_json,
    )


def dp_report_to_proto(r: DpReport) -> ProtoDpReport:
    return ProtoDpReport(
        events=[dp_event_to_proto(e) for e in r.events],
        max_grad_norm=r.max_grad_norm,
        delta=r.delta,
        task_epsilon=r.task_epsilon,
        job_epsilon=r.job_epsilon,
        dataset_epsilon=r.dataset_epsilon,
        policy_delta=r.policy_delta,
        accountant=r.accountant,
        grad_sample_mode=r.grad_sample_mode,
    )


def dp_report_from_proto(msg: ProtoDpReport) -> DpReport:
    return DpReport(
        events=tuple(dp_event_from_proto(e) for e in msg.events),
        max_grad_norm=finite("max_grad_norm", msg.max_grad_norm),
        delta=finite("delta", msg.delta),
        task_epsilon=finite("task_epsilon", msg.task_epsilon),
        job_epsilon=finite("job_epsilon", msg.job_epsilon),
        dataset_epsilon=finite("dataset_epsilon", msg.dataset_epsilon),
        policy_delta=finite("policy_delta", msg.policy_delta),
        accountant=msg.accountant,
        grad_sample_mode=msg.grad_sample_mode,
    )


MAX_HISTOGRAM = 2 * 1000
"""Longest score histogram a message may carry (two classes of at most 1000 bins)."""


def metrics_to_proto(m: Metrics) -> ProtoMetrics:
    return ProtoMetrics(
        loss=m.loss,
        accuracy=m.accuracy,
        correct_sum=m.correct_sum,
        loss_sum=m.loss_sum,
        num_examples=m.num_examples,
        noise_multiplier=m.noise_multiplier or 0.0,
        exact=m.exact,
        count_sum=m.count_sum,
        score_histogram=list(m.score_histogram),
    )


def metrics_from_proto(msg: ProtoMetrics) -> Metrics:
    if len(msg.score_histogram) > MAX_HISTOGRAM:
        raise InvalidSpecError(f"metrics.score_histogram holds more than {MAX_HISTOGRAM} bins")
    return Metrics(
        loss=finite("metrics.loss", msg.loss),
        accuracy=finite("metrics.accuracy", msg.accuracy),
        correct_sum=finite("metrics.correct_sum", msg.correct_sum),
        loss_sum=finite("metrics.loss_sum", msg.loss_sum),
        num_examples=int(msg.num_examples),
        noise_multiplier=(
            finite("metrics.noise_multiplier", msg.noise_multiplier)
            if msg.noise_multiplier > 0
            else None
        ),
        exact=msg.exact,
        count_sum=finite("metrics.count_sum", msg.count_sum),
        score_histogram=tuple(finite("metrics.score_histogram", v) for v in msg.score_histogram),
    )


def estimate_to_proto(e: Estimate) -> ProtoEstimate:
    return ProtoEstimate(value=e.value, se=e.se)


def estimate_from_proto(msg: ProtoEstimate) -> Estimate:
    return Estimate(value=msg.value, se=msg.se)


def pooled_metrics_to_proto(m: PooledMetrics) -> ProtoPooledMetrics:
    msg = ProtoPooledMetrics(
        accuracy=estimate_to_proto(m.accuracy),
        loss=estimate_to_proto(m.loss),
        num_examples=estimate_to_proto(m.num_examples),
        sites=m.sites,
        exact=m.exact,
        noise_multiplier=m.noise_multiplier,
    )
    if m.auc is not None:
        msg.auc.CopyFrom(estimate_to_proto(m.auc))
    return msg


def pooled_metrics_from_proto(msg: ProtoPooledMetrics) -> PooledMetrics:
    return PooledMetrics(
        accuracy=estimate_from_proto(msg.accuracy),
        loss=estimate_from_proto(msg.loss),
        num_examples=estimate_from_proto(msg.num_examples),
        auc=estimate_from_proto(msg.auc) if msg.HasField("auc") else None,
        sites=int(msg.sites),
        exact=msg.exact,
        noise_multiplier=msg.noise_multiplier,
    )


def update_meta_to_proto(u: UpdateMeta) -> ProtoUpdateHeader:
    msg = ProtoUpdateHeader(
        site_id=u.site_id,
        task_id=u.task_id,
        num_examples=u.num_examples,
        dp_report=dp_report_to_proto(u.dp_report),
        total_size=u.total_size,
        sha256=u.sha256,
        result_json=u.result_json,
    )
    if u.metrics is not None:
        msg.metrics.CopyFrom(metrics_to_proto(u.metrics))
    return msg


def update_meta_from_proto(msg: ProtoUpdateHeader) -> UpdateMeta:
    if msg.num_examples <= 0:
        raise InvalidSpecError("update header: num_examples must be positive")
    return UpdateMeta(
        site_id=msg.site_id,
        task_id=msg.task_id,
        num_examples=int(msg.num_examples),
        dp_report=dp_report_from_proto(msg.dp_report),
        metrics=metrics_from_proto(msg.metrics) if msg.HasField("metrics") else None,
        total_size=int(msg.total_size),
        sha256=msg.sha256,
        result_json=msg.result_json,
    )


def failure_to_proto(f: TaskFailure) -> ProtoTaskFailure:
    return ProtoTaskFailure(site_id=f.site_id, task_id=f.task_id, code=f.code, reason=f.reason)


def failure_from_proto(msg: ProtoTaskFailure) -> TaskFailure:
    return TaskFailure(
        site_id=msg.site_id, task_id=msg.task_id, code=msg.code, reason=msg.reason[:4000]
    )
