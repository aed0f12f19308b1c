"""The orchestrator process: one gRPC port serving agents, the CLI and health checks."""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.rpc.tls import (
    CRL_FILE,
    ROLE_MONITOR,
    ROLE_ORCHESTRATOR,
    RevocationList,
    TlsFiles,
    expires_in,
    files_in,
    identity_from_pem,
    init_ca,
    issue,
    revoke,
    server_credentials,
    server_hosts,
)
from common.rpc.transport import SERVER_OPTIONS, require_loopback_for_plaintext
from orchestrator.allocator import (
    MALLOC_ARENA_MAX,
    MALLOC_MMAP_THRESHOLD,
    return_large_buffers_to_os,
    share_malloc_arenas,
)
from orchestrator.api.agent_service import AgentServicer
from orchestrator.api.call_limits import (
    MAX_CALLS_PER_SITE,
    MAX_CALLS_PER_USER,
    CallLimiter,
    control_reserve,
)
from orchestrator.api.control_service import ControlServicer
from orchestrator.auth import Authorizer
from orchestrator.coordinator import Coordinator
from orchestrator.core.broker import MAX_DOWNLOADS, MAX_UPLOADS
from orchestrator.metrics import MetricsServer
from orchestrator.model_size import DEFAULT_MAX_PARAMETERS
from protos.dpfed.v1 import dpfed_pb2_grpc as pb_grpc

log = logging.getLogger("dpfed.orchestrator")

DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass
class RunningServer:
    server: grpc.Server
    coordinator: Coordinator
    port: int
    health: health.HealthServicer
    metrics: MetricsServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace_s: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        if self.metrics is not None:
            self.metrics.stop()
        self.coordinator.stop()
        self.server.stop(grace_s).wait()


RENEW_BEFORE = dt.timedelta(days=30)
"""At start, the orchestrator re-issues its own certificate (and the health probe's) when it
expires within this long and the CA key is at hand; without the key it warns."""


def ensure_server_pki(pki_dir: Path, *, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> TlsFiles:
    """The orchestrator's certificate; on first start, create the deployment's CA and it.
    A certificate close to expiry (:data:`RENEW_BEFORE`) is re-issued for the same hosts."""
    files = files_in(pki_dir, name="orchestrator", role=ROLE_ORCHESTRATOR)
    if files.cert.exists() and files.key.exists():
        left = expires_in(files.cert.read_bytes())
        if left < RENEW_BEFORE and (pki_dir / "ca.key").exists():
            old_hosts = server_hosts(files.cert.read_bytes()) or hosts
            files = issue(pki_dir, name="orchestrator", role=ROLE_ORCHESTRATOR, hosts=old_hosts)
            log.warning("re-issued the orchestrator's certificate (%d days were left)", left.days)
        elif left < RENEW_BEFORE:
            log.warning(
                "the orchestrator's certificate %s expires in %d days: re-issue it with "
                "`orchestrator certs issue --role orchestrator --host ...` where the CA key is",
                files.cert,
                left.days,
            )
        _ensure_healthcheck_identity(pki_dir)
        return files
    if not (pki_dir / "ca.key").exists():
        init_ca(pki_dir)
        log.info("created a new CA in %s: issue site and user certificates from it", pki_dir)
    files = issue(pki_dir, name="orchestrator", role=ROLE_ORCHESTRATOR, hosts=hosts)
    _ensure_healthcheck_identity(pki_dir)
    return files


def _ensure_healthcheck_identity(pki_dir: Path) -> None:
    """A read-only (``monitor``) client certificate for `python -m orchestrator.healthcheck`;
    one close to expiry (:data:`RENEW_BEFORE`) is re-issued and the old one revoked."""
    hc = files_in(pki_dir, name="healthcheck", role=ROLE_MONITOR)
    if not (pki_dir / "ca.key").exists():
        return
    if not hc.cert.exists():
        issue(pki_dir, name="healthcheck", role=ROLE_MONITOR)
        return
    if expires_in(hc.cert.read_bytes()) < RENEW_BEFORE:
        old = identity_from_pem(hc.cert.read_bytes())
        issue(pki_dir, name="healthcheck", role=ROLE_MONITOR)
        revoke(pki_dir, f"{old.serial:X}")
        log.info("re-issued the healthcheck certificate (role monitor, read-only)")


def start_server(
    *,
    listen: str,
    state_dir: Path,
    tls: TlsFiles | None = None,
    db_url: str | None = None,
    offline_after_s: float = 30.0,
    max_workers: int = 512,
    metrics_listen: str | None = None,
    max_downloads: int = MAX_DOWNLOADS,
    max_uploads: int = MAX_UPLOADS,
    malloc_mmap_threshold: int | None = MALLOC_MMAP_THRESHOLD,
    malloc_arena_max: int | None = MALLOC_ARENA_MAX,
    crl: Path | None = None,
    max_calls_per_site: int = MAX_CALLS_PER_SITE,
    max_calls_per_user: int = MAX_CALLS_PER_USER,
    max_parameters: int = DEFAULT_MAX_PARAMETERS,
) -> RunningServer:
    """Serve on ``listen``: mTLS with ``tls``; plaintext (loopback only) when it is None.

    Every dialled-in agent holds one worker thread during its long-poll, so ``max_workers``
    must exceed the number of sites by a margin plus the threads kept for the control service
    (``call_limits.control_reserve``: an eighth, at least 8); threads are created on demand.
    ``max_downloads`` model downloads stream at once; the other sites wait their turn on their
    side, told when to ask again (``orchestrator.core.turns``), so the orchestrator's memory
    does not grow with the number of sites fetching the model together. ``max_uploads``
    updates a round takes at once (being read or waiting to be folded, in spool files:
    ``orchestrator.core.spool``); the other sites keep theirs until they get the go, and take
    turns the same way.
    ``bench/RESULTS.md`` §2 measures the resulting peak. ``malloc_mmap_threshold``: see
    :func:`orchestrator.allocator.return_large_buffers_to_os`; ``malloc_arena_max``: see
    :func:`orchestrator.allocator.share_malloc_arenas`
    (None leaves the allocator alone). ``crl``: the revocation list checked on every call
    (``common.rpc.tls.RevocationList``; default ``crl.pem`` next to the CA certificate).
    ``max_calls_per_site`` / ``max_calls_per_user``: calls one certificate may have in progress
    on the agent / control service; all agent calls together leave
    ``call_limits.control_reserve(max_workers)`` threads to the control service
    (``orchestrator.api.call_limits``). ``max_parameters``: the largest model a job may ask for
    (``orchestrator.model_size``), checked from the spec before anything is built.
    """
    if tls is None:
        require_loopback_for_plaintext(listen)
    if malloc_mmap_threshold is not None:
        return_large_buffers_to_os(malloc_mmap_threshold)
    if malloc_arena_max is not None:
        share_malloc_arenas(malloc_arena_max)
    coordinator = Coordinator(state_dir, db_url=db_url, offline_after_s=offline_after_s)
    if max_downloads < 1 or max_uploads < 1:
        raise ValueError("max_downloads and max_uploads must be at least 1")
    coordinator.broker.max_downloads = max_downloads
    coordinator.broker.max_uploads = max_uploads
    if max_parameters < 1:
        raise ValueError("max_parameters must be at least 1")
    coordinator.max_parameters = max_parameters  # checked from each spec before building it
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=SERVER_OPTIONS,
    )
    revocations = None
    if tls is not None:
        revocations = RevocationList(crl or tls.ca.parent / CRL_FILE, tls.ca)
    auth = Authorizer(mtls=tls is not None, revocations=revocations)
    reserve = control_reserve(max_workers)
    if max_workers <= reserve:
        raise ValueError(f"max_workers must exceed the {reserve} threads kept for the CLI")
    agent_limits = CallLimiter(
        "agent service",
        per_caller=max_calls_per_site,
        total=max_workers - reserve,
        mtls=tls is not None,
    )
    control_limits = CallLimiter(
        "control service", per_caller=max_calls_per_user, total=None, mtls=tls is not None
    )
    pb_grpc.add_AgentServiceServicer_to_server(
        AgentServicer(coordinator, auth, agent_limits), server
    )
    pb_grpc.add_ControlServiceServicer_to_server(
        ControlServicer(coordinator, auth, control_limits), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, server_credentials(tls))
    if port == 0:
        raise OSError(f"could not bind {listen}")
    server.start()
    for name in ("", "dpfed.v1.AgentService", "dpfed.v1.ControlService"):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    coordinator.start()
    metrics = None
    if metrics_listen is not None:
        metrics = MetricsServer(metrics_listen, coordinator.store)
        metrics.start()
        log.info("Prometheus metrics on http://%s/metrics", metrics_listen)
    log.info("orchestrator listening on %s (state: %s)", listen, state_dir)
    return RunningServer(
        server=server, coordinator=coordinator, port=port, health=health_servicer, metrics=metrics
    )


def serve_forever(running: RunningServer) -> None:
    """Block until SIGTERM/SIGINT, then stop gracefully (jobs resume from checkpoints)."""
    done = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    done.wait()
    running.stop()
