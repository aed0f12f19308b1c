"""The one translation layer between domain types (``common.domain``) and protobuf (dpfed.v1).

Pure functions named ``x_to_proto`` / ``x_from_proto`` (Flower's convention). Validation of
values read from the wire happens here too, so that a malformed message becomes an
``InvalidSpecError`` naming the field instead of a crash deeper in the core.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Callable, Iterable, Iterator

from common.domain import (
    ChargedEvent,
    ColumnInfo,
    DatasetInfo,
    DpReport,
    Estimate,
    Evaluation,
    JobEvent,
    JobStatus,
    LedgerRow,
    Metrics,
    Plan,
    PolicySummary,
    PooledMetrics,
    RoundSummary,
    SiteEvaluation,
    SitePlan,
    SiteRegistration,
    SiteSpend,
    SiteStatus,
    TaskAssignment,
    TaskFailure,
    UpdateMeta,
)
from common.dp.events import DpEvent
from common.errors import InvalidSpecError
from protos.dpfed.v1.dpfed_pb2 import Chunk as ProtoChunk
from protos.dpfed.v1.dpfed_pb2 import ColumnInfo as ProtoColumnInfo
from protos.dpfed.v1.dpfed_pb2 import DatasetInfo as ProtoDatasetInfo
from protos.dpfed.v1.dpfed_pb2 import DpEvent as ProtoDpEvent
from protos.dpfed.v1.dpfed_pb2 import DpReport as ProtoDpReport
from protos.dpfed.v1.dpfed_pb2 import Estimate as ProtoEstimate
from protos.dpfed.v1.dpfed_pb2 import EvaluateResponse as ProtoEvaluation
from protos.dpfed.v1.dpfed_pb2 import JobEvent as ProtoJobEvent
from protos.dpfed.v1.dpfed_pb2 import JobStatus as ProtoJobStatus
from protos.dpfed.v1.dpfed_pb2 import LedgerRow as ProtoLedgerRow
from protos.dpfed.v1.dpfed_pb2 import Metrics as ProtoMetrics
from protos.dpfed.v1.dpfed_pb2 import PlanResponse as ProtoPlan
from protos.dpfed.v1.dpfed_pb2 import PolicySummary as ProtoPolicySummary
from protos.dpfed.v1.dpfed_pb2 import PooledMetrics as ProtoPooledMetrics
from protos.dpfed.v1.dpfed_pb2 import RegisterRequest as ProtoRegisterRequest
from protos.dpfed.v1.dpfed_pb2 import RoundSummary as ProtoRoundSummary
from protos.dpfed.v1.dpfed_pb2 import SiteEvaluation as ProtoSiteEvaluation
from protos.dpfed.v1.dpfed_pb2 import SitePlan as ProtoSitePlan
from protos.dpfed.v1.dpfed_pb2 import SiteSpend as ProtoSiteSpend
from protos.dpfed.v1.dpfed_pb2 import SiteStatus as ProtoSiteStatus
from protos.dpfed.v1.dpfed_pb2 import Task as ProtoTask
from protos.dpfed.v1.dpfed_pb2 import TaskFailure as ProtoTaskFailure
from protos.dpfed.v1.dpfed_pb2 import UpdateHeader as ProtoUpdateHeader

# 128 KiB. Every chunk in flight is copied at each stage of gRPC's Python path (slice, protobuf
# message, serialization, C-core buffer), once per concurrent transfer: small chunks keep that
# far below the model's size, and under the orchestrator's malloc mmap threshold (256 KiB,
# orchestrator.server), so they are recycled from the heap instead of being mmapped and
# page-faulted each time. On loopback a download moves at ~0.7x the speed of 1 MiB chunks.
CHUNK_SIZE = 128 << 10
MAX_BLOB_SIZE = 4 << 30  # refuse to assemble more than 4 GiB from a stream


# ------------------------------------------------------------------ chunks


def blob_to_chunks(
    data: bytes | Callable[[int, int], bytes],
    total: int | None = None,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[ProtoChunk]:
    """Chunk messages of ``data``: bytes, or a function reading ``(offset, size)`` from
    bytes of length ``total`` that lie elsewhere (a file), read one chunk at a time."""
    read: Callable[[int, int], bytes]
    if isinstance(data, bytes):
        view = memoryview(data)
        total = len(data)

        def read(off: int, size: int) -> bytes:
            return bytes(view[off : off + size])

    else:
        if total is None:
            raise ValueError("a reader needs the total size")
        read = data
    if total == 0:
        yield ProtoChunk(data=b"", offset=0, total_size=0)
        return
    for off in range(0, total, chunk_size):
        yield ProtoChunk(data=read(off, min(chunk_size, total - off)), offset=off, total_size=total)


def chunk_data(
    chunks: Iterable[ProtoChunk], *, expected_size: int | None = None
) -> Iterator[bytes]:
    """The data of a chunk stream, piece by piece, checking that offsets are contiguous and that
    the size is what was announced (``expected_size``, else the first chunk's ``total_size``).

    Raises InvalidSpecError at the first chunk that breaks the stream, or at its end when it
    stops short; a consumer that writes the pieces somewhere has therefore seen them all
    only when the iteration ends without error.
    """
    total: int | None = expected_size
    received = 0
    for ch in chunks:
        if total is None:
            total = ch.total_size
        if ch.total_size != total:
            raise InvalidSpecError("chunk stream announces two different total sizes")
        if ch.offset != received:
            raise InvalidSpecError(f"chunk at offset {ch.offset} arrived after {received} bytes")
        data = ch.data
        if total < 0 or total > MAX_BLOB_SIZE or received + len(data) > total:
            raise InvalidSpecError("chunk stream is larger than its announced size")
        received += len(data)
        yield data
        del data
    if total is not None and received != total:
        raise InvalidSpecError(f"chunk stream ended after {received} of {total} bytes")


def blob_from_chunks(chunks: Iterable[ProtoChunk], *, expected_size: int | None = None) -> bytes:
    """Reassemble a blob (:func:`chunk_data`'s checks).

    The result is built in place, without a second full copy: the buffer is one ``bytes`` of
    the announced size, allocated zero-filled (``calloc``: pages the stream never fills are
    not even touched) when the first chunk arrives, written chunk by chunk through a
    ``BytesIO`` that owns it, and handed out by ``getvalue()``, which returns that very object
    when it is exactly full. Peak memory is the blob plus one chunk, not twice the blob (the
    previous ``bytearray`` + ``bytes(buf)`` held both at the end).
    """
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        it, total = iter(()), expected_size or 0
    else:
        it, total = itertools.chain((first,), it), first.total_size
    out: io.BytesIO | None = None
    for data in chunk_data(it, expected_size=expected_size):
        if out is None:  # the sizes are checked: allocate the announced size
            # The only reference to the new bytes is the BytesIO's: it writes into it in
            # place (a shared buffer would be copied on the first write).
            out = io.BytesIO(bytes(total if expected_size is None else expected_size))
        out.write(data)
    if out is None:
        return b""
    return out.getvalue()


# ------------------------------------------------------------------ small helpers


def _finite(name: str, x: float) -> float:
    if not math.isfinite(x):
        raise InvalidSpecError(f"{name} must be a finite number")
    return float(x)


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
            noise_multiplier=_finite("dp event noise_multiplier", msg.noise_multiplier),
            sample_rate=_finite("dp event sample_rate", msg.sample_rate),
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
        min=_finite("column min", msg.min) if msg.has_bounds else None,
        max=_finite("column max", msg.max) if msg.has_bounds else None,
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
        epsilon_spent=_finite("epsilon_spent", msg.epsilon_spent),
        max_epsilon=_finite("max_epsilon", msg.max_epsilon),
        policy_delta=_finite("policy_delta", msg.policy_delta),
        num_validation_rows=int(msg.num_validation_rows),
        dp_num_rows=_finite("dp_num_rows", msg.dp_num_rows),
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
        max_epsilon=_finite("policy.max_epsilon", msg.max_epsilon),
        delta=_finite("policy.delta", msg.delta),
        min_noise_multiplier=_finite("policy.min_noise_multiplier", msg.min_noise_multiplier),
        max_rounds=msg.max_rounds,
        allowed_models=tuple(msg.allowed_models),
        allow_exact_metrics=msg.allow_exact_metrics,
        max_steps_per_task=msg.max_steps_per_task,
        max_parameters=msg.max_parameters,
        secure_noise=msg.secure_noise,
    )


# ------------------------------------------------------------------ agent service


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
        noise_multiplier=_finite("noise_multiplier", msg.noise_multiplier),
        model_size=int(msg.model_size),
        model_sha256=msg.model_sha256,
        deadline_unix=_finite("deadline_unix", msg.deadline_unix),
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
        max_grad_norm=_finite("max_grad_norm", msg.max_grad_norm),
        delta=_finite("delta", msg.delta),
        task_epsilon=_finite("task_epsilon", msg.task_epsilon),
        job_epsilon=_finite("job_epsilon", msg.job_epsilon),
        dataset_epsilon=_finite("dataset_epsilon", msg.dataset_epsilon),
        policy_delta=_finite("policy_delta", msg.policy_delta),
        accountant=msg.accountant,
        grad_sample_mode=msg.grad_sample_mode,
    )


MAX_HISTOGRAM = 2 * 1000
"""Longest score histogram a message may carry (two classes of at most 1000 bins)."""


def metrics_to_proto(m: Metrics) -> ProtoMetrics:
    msg = ProtoMetrics(
        loss=m.loss,
        accuracy=m.accuracy,
        correct_sum=m.correct_sum,
        loss_sum=m.loss_sum,
        num_examples=m.num_examples,
        noise_multiplier=m.noise_multiplier or 0.0,
        exact=m.exact,
        score_histogram=list(m.score_histogram),
    )
    if m.count_sum is not None:
        msg.count_sum = m.count_sum
    return msg


def metrics_from_proto(msg: ProtoMetrics) -> Metrics:
    if len(msg.score_histogram) > MAX_HISTOGRAM:
        raise InvalidSpecError(f"metrics.score_histogram holds more than {MAX_HISTOGRAM} bins")
    return Metrics(
        loss=_finite("metrics.loss", msg.loss),
        accuracy=_finite("metrics.accuracy", msg.accuracy),
        correct_sum=_finite("metrics.correct_sum", msg.correct_sum),
        loss_sum=_finite("metrics.loss_sum", msg.loss_sum),
        num_examples=int(msg.num_examples),
        noise_multiplier=(
            _finite("metrics.noise_multiplier", msg.noise_multiplier)
            if msg.noise_multiplier > 0
            else None
        ),
        exact=msg.exact,
        count_sum=(
            _finite("metrics.count_sum", msg.count_sum) if msg.HasField("count_sum") else None
        ),
        score_histogram=tuple(_finite("metrics.score_histogram", v) for v in msg.score_histogram),
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


# ------------------------------------------------------------------ control service


def round_to_proto(r: RoundSummary) -> ProtoRoundSummary:
    msg = ProtoRoundSummary(
        round=r.round,
        site_ids=list(r.site_ids),
        loss=r.loss,
        accuracy=r.accuracy,
        num_examples=r.num_examples,
        duration_s=r.duration_s,
        epsilon=r.epsilon,
    )
    if r.metrics is not None:
        msg.metrics.CopyFrom(pooled_metrics_to_proto(r.metrics))
    return msg


def round_from_proto(msg: ProtoRoundSummary) -> RoundSummary:
    return RoundSummary(
        round=msg.round,
        site_ids=tuple(msg.site_ids),
        loss=msg.loss,
        accuracy=msg.accuracy,
        num_examples=msg.num_examples,
        duration_s=msg.duration_s,
        epsilon=msg.epsilon,
        metrics=pooled_metrics_from_proto(msg.metrics) if msg.HasField("metrics") else None,
    )


def site_spend_to_proto(s: SiteSpend) -> ProtoSiteSpend:
    return ProtoSiteSpend(
        site_id=s.site_id,
        num_examples=s.num_examples,
        noise_multiplier=s.noise_multiplier,
        sample_rate=s.sample_rate,
        steps=s.steps,
        max_grad_norm=s.max_grad_norm,
        epsilon=s.epsilon,
        dataset_epsilon=s.dataset_epsilon,
        events=[dp_event_to_proto(e) for e in s.events],
    )


def site_spend_from_proto(msg: ProtoSiteSpend) -> SiteSpend:
    return SiteSpend(
        site_id=msg.site_id,
        num_examples=msg.num_examples,
        noise_multiplier=msg.noise_multiplier,
        sample_rate=msg.sample_rate,
        steps=msg.steps,
        max_grad_norm=msg.max_grad_norm,
        epsilon=msg.epsilon,
        dataset_epsilon=msg.dataset_epsilon,
        events=tuple(dp_event_from_proto(e) for e in msg.events),
    )


def job_status_to_proto(j: JobStatus) -> ProtoJobStatus:
    return ProtoJobStatus(
        job_id=j.job_id,
        name=j.name,
        dataset=j.dataset,
        state=j.state,
        round=j.round,
        rounds=j.rounds,
        epsilon=j.epsilon,
        delta=j.delta,
        accountant=j.accountant,
        error=j.error,
        history=[round_to_proto(r) for r in j.history],
        sites=[site_spend_to_proto(s) for s in j.sites],
        events=[
            ProtoJobEvent(time=e.time, level=e.level, site_id=e.site_id, message=e.message)
            for e in j.events
        ],
        created_at=j.created_at,
        updated_at=j.updated_at,
        job_spec_json=j.job_spec_json,
        model_released=j.model_released,
    )


def job_status_from_proto(msg: ProtoJobStatus) -> JobStatus:
    return JobStatus(
        job_id=msg.job_id,
        name=msg.name,
        dataset=msg.dataset,
        state=msg.state,
        round=msg.round,
        rounds=msg.rounds,
        epsilon=msg.epsilon,
        delta=msg.delta,
        accountant=msg.accountant,
        error=msg.error,
        history=tuple(round_from_proto(r) for r in msg.history),
        sites=tuple(site_spend_from_proto(s) for s in msg.sites),
        events=tuple(
            JobEvent(time=e.time, level=e.level, site_id=e.site_id, message=e.message)
            for e in msg.events
        ),
        created_at=msg.created_at,
        updated_at=msg.updated_at,
        job_spec_json=msg.job_spec_json,
        model_released=msg.model_released,
    )


def site_status_to_proto(s: SiteStatus) -> ProtoSiteStatus:
    msg = ProtoSiteStatus(
        site_id=s.site_id,
        datasets=[dataset_info_to_proto(d) for d in s.datasets],
        last_seen=s.last_seen,
        version=s.version,
        state=s.state,
    )
    if s.policy is not None:
        msg.policy.CopyFrom(policy_to_proto(s.policy))
    return msg


def site_status_from_proto(msg: ProtoSiteStatus) -> SiteStatus:
    return SiteStatus(
        site_id=msg.site_id,
        datasets=tuple(dataset_info_from_proto(d) for d in msg.datasets),
        last_seen=msg.last_seen,
        version=msg.version,
        state=msg.state,
        policy=policy_from_proto(msg.policy) if msg.HasField("policy") else None,
    )


def plan_to_proto(p: Plan) -> ProtoPlan:
    return ProtoPlan(
        sites=[
            ProtoSitePlan(
                site_id=s.site_id,
                num_examples=s.num_examples,
                noise_multiplier=s.noise_multiplier,
                sample_rate=s.sample_rate,
                steps=s.steps,
                projected_epsilon=s.projected_epsilon,
                dataset_epsilon_before=s.dataset_epsilon_before,
                dataset_epsilon_after=s.dataset_epsilon_after,
                max_epsilon=s.max_epsilon,
                would_refuse=s.would_refuse,
                reason=s.reason,
            )
            for s in p.sites
        ],
        epsilon=p.epsilon,
        delta=p.delta,
        accountant=p.accountant,
        feasible=p.feasible,
        message=p.message,
    )


def plan_from_proto(msg: ProtoPlan) -> Plan:
    return Plan(
        sites=tuple(
            SitePlan(
                site_id=s.site_id,
                num_examples=s.num_examples,
                noise_multiplier=s.noise_multiplier,
                sample_rate=s.sample_rate,
                steps=s.steps,
                projected_epsilon=s.projected_epsilon,
                dataset_epsilon_before=s.dataset_epsilon_before,
                dataset_epsilon_after=s.dataset_epsilon_after,
                max_epsilon=s.max_epsilon,
                would_refuse=s.would_refuse,
                reason=s.reason,
            )
            for s in msg.sites
        ),
        epsilon=msg.epsilon,
        delta=msg.delta,
        accountant=msg.accountant,
        feasible=msg.feasible,
        message=msg.message,
    )


def ledger_row_to_proto(r: LedgerRow) -> ProtoLedgerRow:
    return ProtoLedgerRow(
        site_id=r.site_id,
        dataset=r.dataset,
        job_id=r.job_id,
        epsilon=r.epsilon,
        delta=r.delta,
        rounds=r.rounds,
        events=[dp_event_to_proto(e) for e in r.events],
    )


def ledger_row_from_proto(msg: ProtoLedgerRow) -> LedgerRow:
    return LedgerRow(
        site_id=msg.site_id,
        dataset=msg.dataset,
        job_id=msg.job_id,
        epsilon=msg.epsilon,
        delta=msg.delta,
        rounds=msg.rounds,
        events=tuple(dp_event_from_proto(e) for e in msg.events),
    )


def evaluation_to_proto(e: Evaluation) -> ProtoEvaluation:
    sites = []
    for s in e.sites:
        msg = ProtoSiteEvaluation(site_id=s.site_id, epsilon=s.epsilon, error=s.error)
        if s.metrics is not None:
            msg.metrics.CopyFrom(metrics_to_proto(s.metrics))
        sites.append(msg)
    out = ProtoEvaluation(
        sites=sites,
        loss=e.loss,
        accuracy=e.accuracy,
        num_examples=e.num_examples,
        epsilon=e.epsilon,
        delta=e.delta,
    )
    if e.metrics is not None:
        out.metrics.CopyFrom(pooled_metrics_to_proto(e.metrics))
    return out


def evaluation_from_proto(msg: ProtoEvaluation) -> Evaluation:
    return Evaluation(
        sites=tuple(
            SiteEvaluation(
                site_id=s.site_id,
                metrics=metrics_from_proto(s.metrics) if s.HasField("metrics") else None,
                epsilon=s.epsilon,
                error=s.error,
            )
            for s in msg.sites
        ),
        loss=msg.loss,
        accuracy=msg.accuracy,
        num_examples=msg.num_examples,
        epsilon=msg.epsilon,
        delta=msg.delta,
        metrics=pooled_metrics_from_proto(msg.metrics) if msg.HasField("metrics") else None,
    )
