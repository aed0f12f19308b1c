"""The agent service: registration, tasks, model downloads and update uploads, failures and
heartbeats of site agents, each identified by its certificate (``orchestrator.auth``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from common.domain import TaskFailure
from common.errors import DpfedError, InvalidSpecError
from common.rpc import serde
from common.rpc.transport import UPLOAD_GATE
from orchestrator.api.call_limits import MAX_CALLS_PER_SITE, CallLimiter
from orchestrator.api.errors import abort_on_error, abort_on_error_stream
from orchestrator.auth import Authorizer
from orchestrator.coordinator import Coordinator
from orchestrator.core import spool
from orchestrator.metrics import COUNTERS
from protos.dpfed.v1 import dpfed_pb2 as pb
from protos.dpfed.v1 import dpfed_pb2_grpc as pb_grpc


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
        # At most Broker.max_downloads streams at once (each holds a few chunks in gRPC's send
        # path); without a place, the agent is told when to ask again (TryLaterError).
        with self.c.broker.download_slot(site_id, request.task_id) as model:
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
        # Ownership and size are checked before the bytes are read; then a place in the round
        # (or TryLaterError: the agent asks again when told).
        model_size = self.c.model(meta.site_id, meta.task_id).size
        if meta.total_size > spool.max_update_size(model_size):
            raise InvalidSpecError(
                f"the update announces {meta.total_size} bytes; a task whose model has "
                f"{model_size} bytes takes at most {spool.max_update_size(model_size)}"
            )
        token = self.c.broker.wait_for_capacity(meta.site_id, meta.task_id)

        def chunks() -> Iterator[pb.Chunk]:
            for msg in request_iterator:
                if msg.WhichOneof("item") != "chunk":
                    raise InvalidSpecError("an update stream has one header, then chunks")
                yield msg.chunk

        try:
            # The go: the agent holds its chunks until now (common.rpc.transport.UPLOAD_GATE).
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
