"""The CLI's client of the ControlService: domain types in and out, gRPC errors as DpfedError."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import grpc

from common.domain import Evaluation, JobStatus, LedgerRow, Plan, SiteStatus
from common.errors import DpfedError, UnavailableError, error_from_status
from common.rpc import serde
from common.rpc.tls import TlsFiles, channel_credentials, explain_tls_failure
from common.rpc.transport import CHANNEL_OPTIONS, require_loopback_for_plaintext
from protos.dpfed.v1 import dpfed_pb2 as pb
from protos.dpfed.v1 import dpfed_pb2_grpc as pb_grpc

_TIMEOUT_S = 30.0


def _translate(err: grpc.RpcError, address: str, tls: TlsFiles | None = None) -> DpfedError:
    if isinstance(err, grpc.Call):
        code = err.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            details = err.details() or ""
            why = explain_tls_failure(tls, details, host=address) if tls is not None else None
            if why is not None:
                return UnavailableError(
                    f"cannot connect to the orchestrator at {address}: {why} (gRPC: {details})"
                )
            return UnavailableError(f"cannot reach the orchestrator at {address}: {details}")
        return error_from_status(code.name, err.details() or code.name)
    return DpfedError(str(err))


class ControlClient:
    def __init__(self, address: str, *, tls: TlsFiles | None = None) -> None:
        """mTLS with ``tls`` (the user's certificate); plaintext on loopback when None."""
        self.address = address
        self._tls = tls
        if tls is None:
            require_loopback_for_plaintext(address)
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(
                address, channel_credentials(tls), options=CHANNEL_OPTIONS
            )
        self._stub = pb_grpc.ControlServiceStub(self._channel)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @contextmanager
    def _rpc(self) -> Iterator[None]:
        """gRPC errors raised inside become the DpfedError of their status."""
        try:
            yield
        except grpc.RpcError as err:
            raise _translate(err, self.address, self._tls) from None

    def submit(self, spec_json: str) -> str:
        with self._rpc():
            resp = self._stub.SubmitJob(
                pb.SubmitJobRequest(job_spec_json=spec_json), timeout=_TIMEOUT_S
            )
        return str(resp.job_id)

    def plan(self, spec_json: str) -> Plan:
        with self._rpc():
            resp = self._stub.PlanJob(pb.SubmitJobRequest(job_spec_json=spec_json), timeout=120.0)
        return serde.plan_from_proto(resp)

    def job(self, job_id: str) -> JobStatus:
        with self._rpc():
            return serde.job_status_from_proto(
                self._stub.GetJob(pb.JobRef(job_id=job_id), timeout=_TIMEOUT_S)
            )

    def jobs(self) -> list[JobStatus]:
        with self._rpc():
            resp = self._stub.ListJobs(pb.ListJobsRequest(), timeout=_TIMEOUT_S)
        return [serde.job_status_from_proto(j) for j in resp.jobs]

    def sites(self) -> list[SiteStatus]:
        with self._rpc():
            resp = self._stub.ListSites(pb.ListSitesRequest(), timeout=_TIMEOUT_S)
        return [serde.site_status_from_proto(s) for s in resp.sites]

    def ledger(self) -> tuple[list[LedgerRow], list[SiteStatus]]:
        with self._rpc():
            resp = self._stub.GetLedger(pb.LedgerRequest(), timeout=120.0)
        return (
            [serde.ledger_row_from_proto(r) for r in resp.rows],
            [serde.site_status_from_proto(s) for s in resp.sites],
        )

    def watch(self, job_id: str) -> Iterator[JobStatus]:
        with self._rpc():
            for msg in self._stub.WatchJob(pb.JobRef(job_id=job_id)):
                yield serde.job_status_from_proto(msg)

    def cancel(self, job_id: str) -> JobStatus:
        with self._rpc():
            return serde.job_status_from_proto(
                self._stub.CancelJob(pb.JobRef(job_id=job_id), timeout=_TIMEOUT_S)
            )

    def set_site_enabled(self, site_id: str, enabled: bool) -> SiteStatus:
        with self._rpc():
            return serde.site_status_from_proto(
                self._stub.SetSiteEnabled(
                    pb.SiteEnabledRequest(site_id=site_id, enabled=enabled), timeout=_TIMEOUT_S
                )
            )

    def evaluate(
        self, job_id: str, *, dataset: str, noise_multiplier: float, timeout_s: float = 300.0
    ) -> Evaluation:
        with self._rpc():
            resp = self._stub.EvaluateModel(
                pb.EvaluateRequest(
                    job_id=job_id,
                    dataset=dataset,
                    noise_multiplier=noise_multiplier,
                    timeout_s=timeout_s,
                ),
                timeout=timeout_s + 30.0,
            )
        return serde.evaluation_from_proto(resp)

    def synthesize(
        self,
        dataset: str,
        *,
        epsilon: float,
        rows: int,
        delta: float = 1e-5,
        bins: int = 8,
        columns: tuple[str, ...] = (),
        timeout_s: float = 300.0,
    ) -> tuple[str, dict[str, object]]:
        with self._rpc():
            parts = self._stub.Synthesize(
                pb.SynthRequest(
                    dataset=dataset,
                    epsilon=epsilon,
                    rows=rows,
                    delta=delta,
                    bins=bins,
                    columns=list(columns),
                    timeout_s=timeout_s,
                ),
                timeout=timeout_s + 60.0,
            )
            first = next(parts, None)
            if first is None or first.WhichOneof("item") != "info_json":
                raise DpfedError("the orchestrator sent no synthesis report")
            csv_bytes = serde.blob_from_chunks(p.csv for p in parts)
        info: dict[str, object] = json.loads(first.info_json)
        return csv_bytes.decode(), info

    def download(self, job_id: str) -> tuple[str, bytes]:
        with self._rpc():
            parts = self._stub.DownloadModel(pb.JobRef(job_id=job_id), timeout=600.0)
            first = next(parts, None)
            if first is None or first.WhichOneof("item") != "model_card_json":
                raise DpfedError("the orchestrator sent no model card")
            weights = serde.blob_from_chunks(p.weights for p in parts)
        return first.model_card_json, weights
