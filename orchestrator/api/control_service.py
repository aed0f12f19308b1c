"""The control service: what the CLI calls to submit, plan, watch, cancel and evaluate jobs,
read sites and the ledger, download released models and synthetic data, and enable sites;
each call is allowed by the caller's role (``orchestrator.auth``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc

from common.rpc import serde
from orchestrator.api.call_limits import MAX_CALLS_PER_USER, CallLimiter
from orchestrator.api.errors import abort_on_error, abort_on_error_stream
from orchestrator.auth import OPERATOR_ONLY, READERS, SCIENTIST_OR_OPERATOR, Authorizer
from orchestrator.coordinator import Coordinator
from orchestrator.metrics import COUNTERS
from orchestrator.synthesis import synthesize
from protos.dpfed.v1 import dpfed_pb2 as pb
from protos.dpfed.v1 import dpfed_pb2_grpc as pb_grpc

log = logging.getLogger("dpfed.orchestrator")


class ControlServicer(pb_grpc.ControlServiceServicer):
    def __init__(
        self, coordinator: Coordinator, auth: Authorizer, limits: CallLimiter | None = None
    ) -> None:
        self.c = coordinator
        self.auth = auth
        self.limits = limits or CallLimiter(
            "control service", per_caller=MAX_CALLS_PER_USER, total=None, mtls=auth.mtls
        )

    @abort_on_error
    def SubmitJob(
        self, request: pb.SubmitJobRequest, context: grpc.ServicerContext
    ) -> pb.SubmitJobResponse:
        who = self.auth.user(context, SCIENTIST_OR_OPERATOR)
        return pb.SubmitJobResponse(
            job_id=self.c.submit(request.job_spec_json, submitted_by=who.name)
        )

    @abort_on_error
    def PlanJob(
        self, request: pb.SubmitJobRequest, context: grpc.ServicerContext
    ) -> pb.PlanResponse:
        self.auth.user(context, SCIENTIST_OR_OPERATOR)
        return serde.plan_to_proto(self.c.plan(request.job_spec_json))

    @abort_on_error
    def GetJob(self, request: pb.JobRef, context: grpc.ServicerContext) -> pb.JobStatus:
        self.auth.user(context, READERS)
        return serde.job_status_to_proto(self.c.job(request.job_id))

    @abort_on_error
    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        self.auth.user(context, READERS)
        return pb.ListJobsResponse(jobs=[serde.job_status_to_proto(j) for j in self.c.jobs()])

    @abort_on_error_stream
    def WatchJob(self, request: pb.JobRef, context: grpc.ServicerContext) -> Iterator[pb.JobStatus]:
        self.auth.user(context, READERS)
        for status in self.c.watch(request.job_id):
            if not context.is_active():
                return
            yield serde.job_status_to_proto(status)

    @abort_on_error
    def ListSites(
        self, request: pb.ListSitesRequest, context: grpc.ServicerContext
    ) -> pb.ListSitesResponse:
        self.auth.user(context, READERS)
        return pb.ListSitesResponse(sites=[serde.site_status_to_proto(s) for s in self.c.sites()])

    @abort_on_error
    def GetLedger(
        self, request: pb.LedgerRequest, context: grpc.ServicerContext
    ) -> pb.LedgerResponse:
        self.auth.user(context, READERS)
        rows, sites = self.c.ledger()
        return pb.LedgerResponse(
            rows=[serde.ledger_row_to_proto(r) for r in rows],
            sites=[serde.site_status_to_proto(s) for s in sites],
        )

    @abort_on_error_stream
    def DownloadModel(
        self, request: pb.JobRef, context: grpc.ServicerContext
    ) -> Iterator[pb.ModelPart]:
        self.auth.user(context, SCIENTIST_OR_OPERATOR)
        card, weights = self.c.model_files(request.job_id)
        COUNTERS.inc("dpfed_bytes_sent_total", len(weights), kind="released_model")
        yield pb.ModelPart(model_card_json=card)
        for ch in serde.blob_to_chunks(weights):
            yield pb.ModelPart(weights=ch)

    @abort_on_error
    def CancelJob(self, request: pb.JobRef, context: grpc.ServicerContext) -> pb.JobStatus:
        who = self.auth.user(context, SCIENTIST_OR_OPERATOR)
        submitted_by = self.c.store.job(request.job_id).submitted_by
        self.auth.may_cancel(who, request.job_id, submitted_by)
        return serde.job_status_to_proto(self.c.cancel(request.job_id, by=who.name))

    @abort_on_error
    def EvaluateModel(
        self, request: pb.EvaluateRequest, context: grpc.ServicerContext
    ) -> pb.EvaluateResponse:
        self.auth.user(context, SCIENTIST_OR_OPERATOR)
        result = self.c.evaluate(
            request.job_id,
            dataset=request.dataset,
            noise_multiplier=request.noise_multiplier or 10.0,
            timeout_s=request.timeout_s or 300.0,
        )
        return serde.evaluation_to_proto(result)

    @abort_on_error_stream
    def Synthesize(
        self, request: pb.SynthRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SynthPart]:
        self.auth.user(context, SCIENTIST_OR_OPERATOR)
        csv_text, info = synthesize(
            broker=self.c.broker,
            sites=self.c.sites(),
            dataset=request.dataset,
            epsilon=request.epsilon,
            rows=request.rows,
            delta=request.delta or 1e-5,
            bins=request.bins or 8,
            columns=tuple(request.columns),
            timeout_s=request.timeout_s or 300.0,
            store=self.c.store,
        )
        yield pb.SynthPart(info_json=json.dumps(info))
        for ch in serde.blob_to_chunks(csv_text.encode()):
            yield pb.SynthPart(csv=ch)

    @abort_on_error
    def SetSiteEnabled(
        self, request: pb.SiteEnabledRequest, context: grpc.ServicerContext
    ) -> pb.SiteStatus:
        who = self.auth.user(context, OPERATOR_ONLY)
        log.info(
            "%s %s site %s", who.name, "enabled" if request.enabled else "disabled", request.site_id
        )
        return serde.site_status_to_proto(self.c.set_site_enabled(request.site_id, request.enabled))
