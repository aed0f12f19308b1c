"""The site agent's connection loop: dial out, register, long-poll tasks, push results.

The site opens no port. If the orchestrator is away the agent retries with capped exponential
backoff and jitter; if the orchestrator forgot its session (restart) it registers again.
A task the agent cannot take (malformed fields, a model stream that breaks its own sizes, a
crash while running it) is refused with a reason and the agent keeps serving; an error outside
any task (a bug, an unusable ledger) ends :meth:`SiteAgent.run` with :attr:`SiteAgent.fatal`
set, so that ``site-agent serve`` exits non-zero and a supervisor restarts it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from common.domain import SiteRegistration, TaskAssignment, TaskFailure, UpdateMeta
from common.errors import DpfedError, InvalidSpecError
from common.private_files import private_dir, private_sqlite_files
from common.rpc import serde
from common.rpc.tls import TlsFiles, channel_credentials, explain_tls_failure
from common.rpc.transport import (
    CHANNEL_OPTIONS,
    UPLOAD_GATE,
    require_loopback_for_plaintext,
    retry_after_s,
)
from common.version import __version__
from protos.dpfed.v1 import dpfed_pb2 as pb
from protos.dpfed.v1 import dpfed_pb2_grpc as pb_grpc
from site_agent.boundary.budget import open_ledger
from site_agent.boundary.ledger import Ledger
from site_agent.boundary.pipeline import SitePipeline
from site_agent.boundary.state_lock import StateDirLock
from site_agent.config import SiteConfig

log = logging.getLogger("dpfed.site_agent")

_RPC_TIMEOUT_S = 30.0
# Cap of the reconnect backoff (jitter multiplies it by 0.5-1.5). After an orchestrator restart
# the resumed round gives a site that has not dialled in yet `--offline-after` (30 s by
# default) before it fails its task; a 30 s cap (up to 45 s of sleep) made agents miss
# resumed rounds, 10 s (at most 15 s) brings them back within that window.
_MAX_BACKOFF_S = 10.0
_TRANSFER_TIMEOUT_S = 600.0
T = TypeVar("T")


class _SessionLost(Exception):
    pass


class SiteAgent:
    def __init__(self, config: SiteConfig, *, ledger: Ledger | None = None) -> None:
        self._tls: TlsFiles | None = None
        if config.tls is None:
            if not config.insecure:
                raise InvalidSpecError(
                    f"site {config.site_id}: no TLS material; set tls: {{ca, cert, key}} "
                    "or insecure: true (plaintext, loopback only)"
                )
            require_loopback_for_plaintext(config.orchestrator)
        else:
            self._tls = TlsFiles(ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key)
            self._tls.read()  # fail at start-up, not at the first connection
        self.config = config
        # Only the agent's user reads its state (ledger, split key, canaries): issue 17.
        private_dir(config.state_dir)
        private_sqlite_files(config.state_dir / "ledger.sqlite")
        # One agent owns a state directory (its ledger, catalog, canaries): a second one on
        # the same directory refuses to start (site_agent.boundary.state_lock).
        self._state_lock = StateDirLock(config.state_dir)
        try:
            self.ledger = ledger or open_ledger(config)
            self.pipeline = SitePipeline(config, self.ledger)
        except BaseException:
            self._state_lock.release()
            raise
        self.stopping = threading.Event()
        self.tasks_done = 0
        self._state = "idle"
        self._task_id = ""
        self.tasks_refused = 0
        self.fatal: BaseException | None = None  # why run() ended, when not asked to stop

    # ------------------------------------------------------------ main loop

    def run(self) -> None:
        """Serve until :meth:`stop`; an unexpected error is logged, kept in :attr:`fatal`, and
        ends the loop (the process then exits non-zero)."""
        try:
            self._run()
        except Exception as err:
            log.exception("site=%s fatal error; the agent stops", self.config.site_id)
            self.fatal = err

    def _run(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                with self._channel() as ch:
                    stub = pb_grpc.AgentServiceStub(ch)
                    session = self._register(stub)
                    backoff = 0.5
                    self._serve_session(stub, session)
            except _SessionLost:
                log.info("site=%s session lost; registering again", self.config.site_id)
                continue
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                why = None
                if code == grpc.StatusCode.UNAVAILABLE and self._tls is not None:
                    why = explain_tls_failure(
                        self._tls, err.details() or "", host=self.config.orchestrator
                    )
                elif code is not None and code != grpc.StatusCode.UNAVAILABLE:
                    # e.g. a revoked certificate: PERMISSION_DENIED naming its serial. The TLS
                    # files are read again at each reconnection, so a re-issued one is picked
                    # up without a restart.
                    why = f"{code.name}: {err.details()}"
                log.warning(
                    "site=%s orchestrator %s refused or unreachable (%s); retrying in %.1f s",
                    self.config.site_id,
                    self.config.orchestrator,
                    why or (code.name if code else err),
                    backoff,
                )
                self.stopping.wait(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def stop(self) -> None:
        self.stopping.set()

    def _channel(self) -> grpc.Channel:
        if self._tls is None:
            return grpc.insecure_channel(self.config.orchestrator, options=CHANNEL_OPTIONS)
        return grpc.secure_channel(
            self.config.orchestrator, channel_credentials(self._tls), options=CHANNEL_OPTIONS
        )

    def close(self) -> None:
        self.ledger.close()
        self._state_lock.release()

    def _registration(self) -> SiteRegistration:
        return SiteRegistration(
            site_id=self.config.site_id,
            agent_version=__version__,
            datasets=tuple(self.pipeline.dataset_infos()),
            policy=self.pipeline.policy_summary(),
        )

    def _register(self, stub: pb_grpc.AgentServiceStub) -> str:
        req = serde.registration_to_proto(self._registration())
        resp = stub.Register(req, timeout=_RPC_TIMEOUT_S, wait_for_ready=False)
        log.info("site=%s registered with %s", self.config.site_id, self.config.orchestrator)
        return str(resp.session_id)

    def _serve_session(self, stub: pb_grpc.AgentServiceStub, session: str) -> None:
        lost = threading.Event()
        hb = threading.Thread(
            target=self._heartbeats, args=(stub, session, lost), daemon=True, name="heartbeat"
        )
        hb.start()
        try:
            while not self.stopping.is_set() and not lost.is_set():
                try:
                    resp = stub.PullTask(
                        pb.PullTaskRequest(
                            site_id=self.config.site_id,
                            session_id=session,
                            wait_seconds=self.config.poll_seconds,
                        ),
                        timeout=self.config.poll_seconds + _RPC_TIMEOUT_S,
                    )
                except grpc.RpcError as err:
                    code = err.code() if isinstance(err, grpc.Call) else None
                    if code == grpc.StatusCode.PERMISSION_DENIED:
                        raise _SessionLost() from None
                    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        # The orchestrator bounds calls in progress (per site and for all
                        # agents): wait as told and pull again in the same session.
                        self.stopping.wait(retry_after_s(err) or 1.0)
                        continue
                    raise
                if resp.HasField("task"):
                    try:
                        task = serde.task_from_proto(resp.task)
                    except DpfedError as err:
                        self._refuse_malformed(stub, resp.task, err)
                        continue
                    self._handle(stub, task)
            if lost.is_set():
                raise _SessionLost()
        finally:
            lost.set()
            hb.join(timeout=1.0)

    def _heartbeats(
        self, stub: pb_grpc.AgentServiceStub, session: str, lost: threading.Event
    ) -> None:
        while not lost.wait(self.config.heartbeat_seconds):
            try:
                resp = stub.Heartbeat(
                    pb.HeartbeatRequest(
                        site_id=self.config.site_id,
                        session_id=session,
                        state=self._state,
                        task_id=self._task_id,
                        datasets=[
                            serde.dataset_info_to_proto(d) for d in self.pipeline.dataset_infos()
                        ],
                    ),
                    timeout=_RPC_TIMEOUT_S,
                )
                if not resp.known:
                    lost.set()
            except grpc.RpcError:
                continue  # the pull loop notices an outage and reconnects

    # ------------------------------------------------------------ one task

    def _fetch(self, stub: pb_grpc.AgentServiceStub, task: TaskAssignment) -> bytes:
        return fetch_model(stub, self.config.site_id, task)

    def _handle(self, stub: pb_grpc.AgentServiceStub, task: TaskAssignment) -> None:
        log.info(
            "site=%s job=%s round=%d/%d task received",
            self.config.site_id,
            task.job_id,
            task.round,
            task.rounds,
        )
        self._state, self._task_id = "training", task.task_id
        try:
            try:
                # Public inputs only (spec, schema, policy): refused before the model is
                # downloaded or built (issue 17.4).
                self.pipeline.precheck(task)
            except DpfedError as err:
                self.tasks_refused += 1
                log.warning("site=%s job=%s refused: %s", self.config.site_id, task.job_id, err)
                self._report(stub, task, err.grpc_status, str(err))
                return
            except Exception as err:
                self.tasks_refused += 1
                log.exception("site=%s job=%s task check crashed", self.config.site_id, task.job_id)
                self._report(stub, task, "INTERNAL", f"the site agent failed: {type(err).__name__}")
                return
            try:
                blob = self._fetch(stub, task)
            except DpfedError as err:  # a stream that breaks its own sizes, a wrong model size
                self.tasks_refused += 1
                log.warning(
                    "site=%s job=%s refused: the model download is malformed: %s",
                    self.config.site_id,
                    task.job_id,
                    err,
                )
                self._report(
                    stub, task, "INVALID_ARGUMENT", f"the model download is malformed: {err}"
                )
                return
            try:
                meta, delta = self.pipeline.execute(task, blob)
            except DpfedError as err:
                self.tasks_refused += 1
                log.warning("site=%s job=%s refused: %s", self.config.site_id, task.job_id, err)
                self._report(stub, task, err.grpc_status, str(err))
                return
            except Exception as err:
                self.tasks_refused += 1
                # Details stay in the site's log: an exception message could quote data.
                log.exception("site=%s job=%s task crashed", self.config.site_id, task.job_id)
                self._report(stub, task, "INTERNAL", f"the site agent failed: {type(err).__name__}")
                return
            push_update(stub, meta, delta)
            self.tasks_done += 1
            log.info(
                "site=%s job=%s round=%d update sent (task ε=%.3f, dataset ε=%.3f)",
                self.config.site_id,
                task.job_id,
                task.round,
                meta.dp_report.task_epsilon,
                meta.dp_report.dataset_epsilon,
            )
        except grpc.RpcError as err:
            if _task_gone(err):
                log.warning("site=%s task %s: %s", self.config.site_id, task.task_id, err.details())
                return
            raise
        except Exception as err:
            # Whatever one task brings (a transfer the orchestrator answered oddly, ...) ends
            # that task, not the agent.
            self.tasks_refused += 1
            log.exception("site=%s job=%s task failed", self.config.site_id, task.job_id)
            with contextlib.suppress(grpc.RpcError):
                self._report(stub, task, "INTERNAL", f"the site agent failed: {type(err).__name__}")
        finally:
            self._state, self._task_id = "idle", ""

    def _refuse_malformed(
        self, stub: pb_grpc.AgentServiceStub, msg: pb.Task, err: DpfedError
    ) -> None:
        """Refuse a task whose fields do not parse (σ = NaN, ...): nothing of it runs."""
        self.tasks_refused += 1
        reason = f"the task is malformed: {err}"
        log.warning("site=%s task %r refused: %s", self.config.site_id, msg.task_id[:64], reason)
        try:
            self._report_id(stub, msg.task_id, "INVALID_ARGUMENT", reason)
        except grpc.RpcError as rpc_err:
            if not _task_gone(rpc_err):
                raise

    def _report(
        self, stub: pb_grpc.AgentServiceStub, task: TaskAssignment, code: str, reason: str
    ) -> None:
        self._report_id(stub, task.task_id, code, reason)

    def _report_id(
        self, stub: pb_grpc.AgentServiceStub, task_id: str, code: str, reason: str
    ) -> None:
        failure = TaskFailure(
            site_id=self.config.site_id, task_id=task_id, code=code, reason=reason
        )
        stub.ReportFailure(serde.failure_to_proto(failure), timeout=_RPC_TIMEOUT_S)


def _task_gone(err: grpc.RpcError) -> bool:
    """The orchestrator no longer knows the task or refuses it: nothing more to do for it."""
    return isinstance(err, grpc.Call) and err.code() in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
    )


def fetch_model(stub: pb_grpc.AgentServiceStub, site_id: str, task: TaskAssignment) -> bytes:
    """Download a task's model. Takes turns: when every download place is taken, the
    orchestrator says when to ask again (``common.rpc.transport.RETRY_AFTER_MS``) and the agent
    waits here, not in the orchestrator."""

    def attempt() -> bytes:
        call = stub.FetchModel(
            pb.FetchModelRequest(site_id=site_id, task_id=task.task_id),
            timeout=_TRANSFER_TIMEOUT_S,
        )
        return serde.blob_from_chunks(call, expected_size=task.model_size)

    return _in_turn(attempt)


def push_update(
    stub: pb_grpc.AgentServiceStub, meta: UpdateMeta, delta: bytes
) -> pb.PushUpdateResponse:
    """Upload an update: send the header, then hold the chunks until the orchestrator's go
    (``common.rpc.transport.UPLOAD_GATE`` in its initial metadata, sent once the round has room
    for this upload), so that a site waiting its turn does not park its update in the
    orchestrator's memory. When the round has no room yet, the orchestrator ends the call with
    the time to ask again, and the agent waits here."""

    def attempt() -> pb.PushUpdateResponse:
        go, abandoned = threading.Event(), threading.Event()
        call = stub.PushUpdate.future(
            _update_stream(meta, delta, go, abandoned), timeout=_TRANSFER_TIMEOUT_S
        )
        try:
            # Returns at the go (UPLOAD_GATE), or with nothing when the call ends (try later, an
            # error); then no chunk goes into it.
            if UPLOAD_GATE not in tuple(call.initial_metadata() or ()):
                abandoned.set()
        finally:
            go.set()
        result: pb.PushUpdateResponse = call.result()
        return result

    return _in_turn(attempt)


def _in_turn(attempt: Callable[[], T], *, give_up_after_s: float = _TRANSFER_TIMEOUT_S) -> T:
    """Run ``attempt`` until the orchestrator stops answering "try later" (then wait as told)."""
    give_up = time.monotonic() + give_up_after_s
    while True:
        try:
            return attempt()
        except grpc.RpcError as err:
            wait = retry_after_s(err)
            if wait is None or time.monotonic() + wait > give_up:
                raise
            time.sleep(wait)


def _update_stream(
    meta: UpdateMeta, delta: bytes, go: threading.Event, abandoned: threading.Event
) -> Iterator[pb.UpdateChunk]:
    """The header, then (at the go, unless the call was abandoned) the update's chunks."""
    yield pb.UpdateChunk(header=serde.update_meta_to_proto(meta))
    go.wait(_TRANSFER_TIMEOUT_S)
    if abandoned.is_set():
        return
    for ch in serde.blob_to_chunks(delta):
        yield pb.UpdateChunk(chunk=ch)
