"""The orchestrator's core, behind the gRPC servicers: sites, jobs, plans, ledger, models.

No gRPC here. The servicers translate messages with ``common.rpc.serde`` and call these methods;
errors are ``common.errors`` types that the transport maps to statuses.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

from common.domain import (
    DatasetInfo,
    Evaluation,
    JobStatus,
    LedgerRow,
    Plan,
    SiteRegistration,
    SiteStatus,
    TaskAssignment,
    TaskFailure,
    UpdateMeta,
)
from common.errors import (
    InvalidSpecError,
    NotFoundError,
    PermissionDeniedError,
)
from common.specs import any_job_spec_from_json
from orchestrator.core.broker import Broker
from orchestrator.core.spool import Payload
from orchestrator.core.store import JobRow, Store
from orchestrator.evaluation import evaluate_model
from orchestrator.jobs.accounting import Accounts
from orchestrator.jobs.base import JobThread
from orchestrator.jobs.kinds import kind_named, kind_of_spec
from orchestrator.model_size import DEFAULT_MAX_PARAMETERS, check_model_size
from orchestrator.planning import ACCOUNTANT
from orchestrator.views import job_status, site_status

log = logging.getLogger("dpfed.orchestrator")

PERSIST_LAST_SEEN_S = 60.0
"""A heartbeat writes the site's row at most this often unless its datasets changed."""


class Coordinator:
    def __init__(
        self, state_dir: Path, *, db_url: str | None = None, offline_after_s: float = 30.0
    ) -> None:
        self.store = Store(state_dir, url=db_url)
        self.accounts = Accounts(self.store)  # every job's charges, folded as they come
        self.broker = Broker(offline_after_s=offline_after_s)
        self.max_parameters = DEFAULT_MAX_PARAMETERS  # orchestrator serve --max-parameters
        self.spool_dir: Path | None = self.store.paths.spool
        self._stopping = threading.Event()
        self._runners: dict[str, JobThread] = {}
        self._cv = threading.Condition()
        self._versions: dict[str, int] = {}
        self.heartbeat_s = max(1.0, offline_after_s / 4)
        # Per site: when its row was last written, and the digest of the datasets written.
        self._persisted: dict[str, tuple[float, int | None]] = {}
        self._persisted_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Resume every job that was pending or running when the orchestrator stopped; a
        one-shot release that was in flight ends as failed (its charges, written before it
        was sent, stand)."""
        for row in self.store.jobs():
            if row.state not in ("pending", "running"):
                continue
            if kind_of_spec(row.spec_json).runner is None:
                self.store.update_job(
                    row.job_id,
                    state="failed",
                    error="the orchestrator stopped while this release was in flight",
                )
                continue
            self._start_runner(row.job_id)

    def stop(self, timeout_s: float = 5.0) -> None:
        # Close the broker first: no update is acknowledged after this, so each round that
        # stops next sees (and records) every update it was sent (see JobRunner._round).
        self.broker.close()
        self._stopping.set()
        with self._cv:
            self._cv.notify_all()
        for r in list(self._runners.values()):
            r.join(timeout=timeout_s)
        self.store.close()

    def _start_runner(self, job_id: str) -> None:
        row = self.store.job(job_id)
        kind = kind_of_spec(row.spec_json)
        if kind.runner is None:  # a one-shot release: recorded as ended, never resumed
            return
        runner = kind.runner()(
            job_id=job_id,
            account=self.accounts.of(job_id, delta=row.delta),
            store=self.store,
            broker=self.broker,
            on_change=self._changed,
            stopping=self._stopping,
        )
        self._runners[job_id] = runner
        runner.start()

    def _changed(self, job_id: str) -> None:
        with self._cv:
            self._versions[job_id] = self._versions.get(job_id, 0) + 1
            self._cv.notify_all()

    # ------------------------------------------------------------ agents

    def register(self, reg: SiteRegistration) -> str:
        row = self.store.site(reg.site_id)
        if row is not None and not row.enabled:
            raise PermissionDeniedError(
                f"site {reg.site_id} is disabled by an operator; it may not register"
            )
        session_id = self.broker.connect(reg.site_id)
        self.store.upsert_site(
            site_id=reg.site_id,
            version=reg.agent_version,
            session_id=session_id,
            datasets=[_dataset_dict(d) for d in reg.datasets],
            policy={**asdict(reg.policy), "allowed_models": list(reg.policy.allowed_models)},
        )
        with self._persisted_lock:  # the row holds these datasets: no heartbeat need rewrite them
            self._persisted[reg.site_id] = (time.monotonic(), _digest(reg.datasets))
        log.info("site=%s registered (%d datasets)", reg.site_id, len(reg.datasets))
        return session_id

    def heartbeat(
        self, site_id: str, session_id: str, *, state: str, datasets: list[DatasetInfo]
    ) -> bool:
        """A sign of life. Liveness and state are the broker's (in memory); the store gets a
        row write only when the site's datasets changed, or its last-seen time is more than
        PERSIST_LAST_SEEN_S old: one write per heartbeat would make 200 sites' heartbeats queue
        on the store's lock in front of the rounds' charge records (``bench/RESULTS.md`` §2)."""
        if not self.broker.seen(site_id, session_id, state=state or "idle"):
            return False
        now = time.monotonic()
        sent = _digest(datasets)
        with self._persisted_lock:
            last = self._persisted.get(site_id)
            due = (
                last is None
                or now - last[0] >= PERSIST_LAST_SEEN_S
                or (sent is not None and sent != last[1])
            )
            if due:
                kept = sent if sent is not None else (last[1] if last is not None else None)
                self._persisted[site_id] = (now, kept)
        if due:
            # Converted only when written: asdict over every column's schema, for every
            # heartbeat of every site, would cost a quarter of the CPU at 200 sites.
            dicts = [_dataset_dict(d) for d in datasets] if datasets else None
            self.store.touch_site(site_id, state=state or "idle", datasets=dicts)
        return True

    def pull(self, site_id: str, session_id: str, wait_s: float) -> TaskAssignment | None:
        return self.broker.pull(site_id, session_id, wait_s=wait_s)

    def model(self, site_id: str, task_id: str) -> Payload:
        return self.broker.model(site_id, task_id)

    def push_update(self, meta: UpdateMeta, payload: Payload) -> None:
        self.broker.push_update(meta, payload)

    def report_failure(self, failure: TaskFailure) -> None:
        self.broker.report_failure(failure)

    # ------------------------------------------------------------ data scientists

    def sites(self) -> list[SiteStatus]:
        return [site_status(r, self.broker) for r in self.store.sites()]

    def submit(self, spec_json: str, *, submitted_by: str = "") -> str:
        """Start a job; ``submitted_by`` (the caller's certificate name) may later cancel it."""
        spec = any_job_spec_from_json(spec_json)
        check_model_size(spec, self.max_parameters)  # from the spec, before anything is built
        kind = kind_named(spec.kind)
        if kind.prepare is None or kind.runner is None:
            raise InvalidSpecError(f"a {kind.name} job is not submitted as a job spec")
        spec, rounds = kind.prepare(spec, self.sites(), self.max_parameters)
        job_id = "job-" + uuid.uuid4().hex[:12]
        now = time.time()
        self.store.add_job(
            JobRow(
                job_id=job_id,
                name=spec.name or "",
                dataset=spec.dataset,
                spec_json=spec.model_dump_json(),
                state="pending",
                round=0,
                rounds=rounds,
                epsilon=0.0,
                delta=spec.dp.delta,
                accountant=ACCOUNTANT,
                created_at=now,
                updated_at=now,
                participants={},
                submitted_by=submitted_by,
            )
        )
        self.store.add_event(job_id, "info", f"job submitted for dataset {spec.dataset!r}")
        self._start_runner(job_id)
        return job_id

    def plan(self, spec_json: str) -> Plan:
        spec = any_job_spec_from_json(spec_json)
        check_model_size(spec, self.max_parameters)
        kind = kind_named(spec.kind)
        if kind.plan is None:
            raise InvalidSpecError(
                f"plan projects training jobs; a {kind.name} job reports its cost at start"
            )
        return kind.plan(spec, self.sites(), self.broker, self.max_parameters)

    def job(self, job_id: str) -> JobStatus:
        """The job's status. Each site's ε: while the job runs, the running bound its rounds
        report (``JobAccount.running``: cheap every round, ≤ ~2% above exact); otherwise the
        tight bound, known or computed within 0.3 s, else the RDP bound (on an RPC thread: a
        stored history must not make status hang)."""
        row = self.store.job(job_id)
        account = self.accounts.of(job_id, delta=row.delta)
        eps = account.running() if row.state == "running" else account.exact(within_s=0.3)
        return job_status(row, self.store, account.spends(eps.site_epsilons()))

    def jobs(self) -> list[JobStatus]:
        return [
            job_status(r, self.store, self.accounts.of(r.job_id, delta=r.delta).spends({}))
            for r in self.store.jobs()
        ]

    def watch(self, job_id: str, *, poll_s: float = 5.0) -> Iterator[JobStatus]:
        """Yield the job's status now and after every change, until it ends."""
        status = self.job(job_id)
        yield status
        seen = -1
        while not status.terminal and not self._stopping.is_set():
            with self._cv:
                version = self._versions.get(job_id, 0)
                if version == seen:
                    self._cv.wait(timeout=poll_s)
                    version = self._versions.get(job_id, 0)
            if version != seen:
                seen = version
                status = self.job(job_id)
                yield status

    def ledger(self) -> tuple[list[LedgerRow], list[SiteStatus]]:
        rows: list[LedgerRow] = []
        for job in self.store.jobs():
            account = self.accounts.of(job.job_id, delta=job.delta)
            rows += account.ledger_rows(account.exact(within_s=0.0).site_epsilons())
        rows.sort(key=lambda r: (r.site_id, r.dataset, r.job_id))
        return rows, self.sites()

    def cancel(self, job_id: str, *, by: str) -> JobStatus:
        row = self.store.job(job_id)
        if row.state in ("completed", "failed"):
            raise InvalidSpecError(f"job {job_id} has already ended ({row.state})")
        runner = self._runners.get(job_id)
        if runner is not None:
            runner.cancel(by)
        else:
            self.store.update_job(job_id, state="failed", error=f"cancelled by {by}")
        if runner is not None:
            runner.join(timeout=10.0)
        return self.job(job_id)

    def set_site_enabled(self, site_id: str, enabled: bool) -> SiteStatus:
        """Enable or disable a site. Disabling an id that never registered blocks it before
        its first connection; enabling one is refused (NotFoundError): likely a typo."""
        if enabled and self.store.site(site_id) is None:
            raise NotFoundError(
                f"No site {site_id!r} has ever registered; nothing to enable. "
                "(`orchestrator sites` lists the known ones.)"
            )
        self.store.set_site_enabled(site_id, enabled)
        if not enabled:
            self.broker.disconnect(site_id)
        row = self.store.site(site_id)
        assert row is not None
        return site_status(row, self.broker)

    def evaluate(
        self, job_id: str, *, dataset: str, noise_multiplier: float, timeout_s: float
    ) -> Evaluation:
        """A released model on each site's data holding ``dataset``: noised, charged metrics."""
        return evaluate_model(
            store=self.store,
            broker=self.broker,
            sites=self.sites(),
            job_id=job_id,
            dataset=dataset,
            noise_multiplier=noise_multiplier,
            timeout_s=timeout_s,
        )

    def model_files(self, job_id: str) -> tuple[str, bytes]:
        row = self.store.job(job_id)
        if not row.model_released:
            raise NotFoundError(
                f"job {job_id} has released no model (state: {row.state}"
                + (f"; {row.error}" if row.error else "")
                + ")"
            )
        released = kind_of_spec(row.spec_json).released_file
        if released is None:
            raise NotFoundError(f"job {job_id} is a one-shot release with no model")
        d = self.store.paths.model_dir(job_id)
        return (d / "model_card.json").read_text(), (d / released).read_bytes()


def _digest(datasets: Sequence[DatasetInfo]) -> int | None:
    """What a heartbeat compares with the datasets last written: a hash, not the datasets (their
    column schemas, kept for every site, would be megabytes at 200 sites). A collision of the
    64-bit hashes would delay a write by at most PERSIST_LAST_SEEN_S."""
    return hash(tuple(datasets)) if datasets else None


def _dataset_dict(d: DatasetInfo) -> dict[str, object]:
    out = asdict(d)
    out["columns"] = list(d.columns)
    return out
