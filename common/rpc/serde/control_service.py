"""The control service's messages: job and site status, rounds, plans, ledger rows and
evaluations, as the CLI and the orchestrator exchange them."""

from __future__ import annotations

from common.domain import (
    Evaluation,
    JobEvent,
    JobStatus,
    LedgerRow,
    Plan,
    RoundSummary,
    SiteEvaluation,
    SitePlan,
    SiteSpend,
    SiteStatus,
)
from common.rpc.serde.agent_service import (
    dataset_info_from_proto,
    dataset_info_to_proto,
    dp_event_from_proto,
    dp_event_to_proto,
    metrics_from_proto,
    metrics_to_proto,
    policy_from_proto,
    policy_to_proto,
    pooled_metrics_from_proto,
    pooled_metrics_to_proto,
)
from protos.dpfed.v1.dpfed_pb2 import EvaluateResponse as ProtoEvaluation
from protos.dpfed.v1.dpfed_pb2 import JobEvent as ProtoJobEvent
from protos.dpfed.v1.dpfed_pb2 import JobStatus as ProtoJobStatus
from protos.dpfed.v1.dpfed_pb2 import LedgerRow as ProtoLedgerRow
from protos.dpfed.v1.dpfed_pb2 import PlanResponse as ProtoPlan
from protos.dpfed.v1.dpfed_pb2 import RoundSummary as ProtoRoundSummary
from protos.dpfed.v1.dpfed_pb2 import SiteEvaluation as ProtoSiteEvaluation
from protos.dpfed.v1.dpfed_pb2 import SitePlan as ProtoSitePlan
from protos.dpfed.v1.dpfed_pb2 import SiteSpend as ProtoSiteSpend
from protos.dpfed.v1.dpfed_pb2 import SiteStatus as ProtoSiteStatus


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
