"""Thin gRPC servicers: translate with ``common.rpc.serde``, call the coordinator, map errors.

Every ``DpfedError`` becomes ``context.abort(status, message)`` through the table in
``common.errors``; anything else is an INTERNAL error whose details stay in the server log.
Every call first takes a place in its service's ``CallLimiter`` (``orchestrator.call_limits``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from common.domain import TaskFailure
from common.errors import DpfedError, InvalidSpecError, TryLaterError
from common.rpc import serde
from common.rpc.transport import RETRY_AFTER_MS, TURNS, UPLOAD_GATE
from orchestrator.auth import OPERATOR_ONLY, READERS, SCIENTIST_OR_OPERATOR, Authorizer
from orchestrator.call_limits import MAX_CALLS_PER_SITE, MAX_CALLS_PER_USER, CallLimiter
from orchestrator.coordinator import Coordinator
from orchestrator.core import spool
from orchestrator.metrics import COUNTERS
from orchestrator.synthesis import synthesize
from protos.dpfed.v1 import dpfed_pb2 as pb
from protos.dpfed.v1 import dpfed_pb2_grpc as pb_grpc

log = logging.getLogger("dpfed.orchestrator")

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def _mapped_errors(method: str, context: grpc.ServicerContext) -> Iterator[None]:
    """Abort with the status of a DpfedError (INTERNAL for anything else) and count the RPC."""
    try:
        yield
    except DpfedError as err:
        COUNTERS.inc("dpfed_rpcs_total", method=method, status=err.grpc_status)
        if isinstance(err, TryLaterError):
            ms = max(1, round(err.retry_after_s * 1000))
            context.set_trailing_metadata(((RETRY_AFTER_MS, str(ms)),))
        context.abort(grpc.StatusCode[err.grpc_status], str(err))
    except Exception:
        COUNTERS.inc("dpfed_rpcs_total", method=method, status="INTERNAL")
        log.exception("internal error in %s", method)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
    COUNTERS.inc("dpfed_rpcs_total", method=method, status="OK")


def abort_on_error(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        with _mapped_errors(fn.__name__, context), self.limits.hold(context):
            return fn(self, request, context)

    return wrapper  # type: ignore[return-value]


def abort_on_error_stream(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with _mapped_errors(fn.__name__, context), self.limits.hold(context):
            yield from fn(self, request, context)

    return wrapper  # type: ignore[return-value]


def _takes_turns(context: grpc.ServicerContext) -> bool:
    """The agent waits for a transfer's turn on its side (``common.rpc.transport.TURNS``)."""
    return TURNS in tuple(context.invocation_metadata() or ())


class AgentServicer(pb_grpc.AgentServiceServicer):
    def __init__(
        self, coordinator: Coordinator, auth: Authorizer, limits: CallLimiter | None = None
    ) -> None:
        self.c = coordinator
        self.auth = auth
        self.limits = limits or CallLimiter(
            "agent service", per_caller=MAX_CALLS_PER_SITE, total=None, mtls=auth.mtls
        )

    @abort_on_error
    def Register(
        self, request: pb.RegisterRequest, context: grpc.ServicerContext
    ) -> pb.RegisterResponse:
        self.auth.site(context, request.site_id)
        reg = serde.registration_from_proto(request)
        session_id = self.c.register(reg)
        return pb.RegisterResponse(session_id=session_id, heartbeat_seconds=self.c.heartbeat_s)

    @abort_on_error
    def PullTask(
        self, request: pb.PullTaskRequest, context: grpc.ServicerContext
    ) -> pb.PullTaskResponse:
        site_id = self.auth.site(context, request.site_id)
        task = self.c.pull(site_id, request.session_id, request.wait_seconds)
        if task is None:
            return pb.PullTaskResponse()
        return pb.PullTaskResponse(task=serde.task_to_proto(task))

    @abort_on_error_stream
    def FetchModel(
        self, request: pb.FetchModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        site_id = self.auth.site(context, request.site_id)
        # At most Broker.max_downloads streams at once: each holds a few chunks in gRPC's send
        # path, so with every site fetching at once memory grew with the number of sites. An
        # agent that takes turns (TURNS) waits for its turn on its own side.
        with self.c.broker.download_slot(
            site_id, request.task_id, alive=context.is_active, wait=not _takes_turns(context)
        ) as model:
            context.send_initial_metadata((UPLOAD_GATE,))  # "this orchestrator sends a go"
            COUNTERS.inc("dpfed_bytes_sent_total", model.size, kind="global_model")
            yield from serde.blob_to_chunks(model.read, model.size)

    @abort_on_error
    def PushUpdate(
        self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext
    ) -> pb.PushUpdateResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("item") != "header":
            raise InvalidSpecError("an update stream must start with its header")
        site_id = self.auth.site(context, first.header.site_id)
        try:
            meta = serde.update_meta_from_proto(first.header)
        except InvalidSpecError as err:
            # Tell the waiting round now (if the task is this site's), not at its deadline.
            with contextlib.suppress(DpfedError):
                self.c.report_failure(
                    TaskFailure(
                        site_id=site_id,
                        task_id=first.header.task_id,
                        code="INVALID_ARGUMENT",
                        reason=f"malformed update: {err}",
                    )
                )
            raise
        # Ownership and size are checked before the bytes are read; then wait for room.
        model_size = self.c.model(meta.site_id, meta.task_id).size
        if meta.total_size > spool.max_update_size(model_size):
            raise InvalidSpecError(
                f"the update announces {meta.total_size} bytes; a task whose model has "
                f"{model_size} bytes takes at most {spool.max_update_size(model_size)}"
            )
        token = self.c.broker.wait_for_capacity(
            meta.site_id, meta.task_id, wait=not _takes_turns(context)
        )

        def chunks() -> Iterator[pb.Chunk]:
            for msg in request_iterator:
                if msg.WhichOneof("item") != "chunk":
                    raise InvalidSpecError("an update stream has one header, then chunks")
                yield msg.chunk

        try:
            # The go: an agent that saw UPLOAD_GATE in FetchModel holds its chunks until now.
            context.send_initial_metadata((UPLOAD_GATE,))
            payload = spool.receive(
                serde.chunk_data(chunks(), expected_size=meta.total_size),
                size=meta.total_size,
                spool_dir=self.c.spool_dir,
            )
            COUNTERS.inc("dpfed_bytes_received_total", payload.size, kind="update")
            try:
                self.c.push_update(meta, payload)
            except BaseException:
                payload.close()
                raise
        finally:
            self.c.broker.release_capacity(token)
        return pb.PushUpdateResponse(accepted=True, message="received")

    @abort_on_error
    def ReportFailure(
        self, request: pb.TaskFailure, context: grpc.ServicerContext
    ) -> pb.ReportFailureResponse:
        self.auth.site(context, request.site_id)
        self.c.report_failure(serde.failure_from_proto(request))
        return pb.ReportFailureResponse()

    @abort_on_error
    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatResponse:
        site_id = self.auth.site(context, request.site_id)
        known = self.c.heartbeat(
            site_id,
            request.session_id,
            state=request.state,
            datasets=[serde.dataset_info_from_proto(d) for d in request.datasets],
        )
        return pb.HeartbeatResponse(known=known)


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
