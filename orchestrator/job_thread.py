"""What every job's thread shares: its handles on the store and broker, its account of
charges, cancellation, job events, and failing the job visibly (never hanging it) on any
error."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from common.errors import DpfedError, JobFailedError
from orchestrator.core.broker import Broker
from orchestrator.core.store import Store
from orchestrator.jobs.accounting import JobAccount

log = logging.getLogger("dpfed.orchestrator")


class JobStopped(DpfedError):
    """The orchestrator is shutting down mid-job: not the job's fault; it resumes later."""


class JobThread(threading.Thread):
    """Runs ``_run`` for one job; subclasses hold the job's spec and its loop."""

    def __init__(
        self,
        *,
        job_id: str,
        store: Store,
        broker: Broker,
        on_change: Callable[[str], None],
        stopping: threading.Event,
        poll_s: float = 0.5,
        account: JobAccount | None = None,
    ) -> None:
        """``account``: the job's account that status views read too (the coordinator's);
        a private one when not given."""
        super().__init__(name=f"job-{job_id}", daemon=True)
        self.job_id = job_id
        self.store = store
        self.broker = broker
        self.on_change = on_change
        self.stopping = stopping
        self.poll_s = poll_s
        self.account = account or JobAccount(job_id, delta=store.job(job_id).delta)
        self._cancelled_by: str | None = None

    def cancel(self, by: str) -> None:
        self._cancelled_by = by

    def _check_cancelled(self) -> None:
        if self._cancelled_by is not None:
            raise JobFailedError(f"cancelled by {self._cancelled_by}")

    def _run(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            self._run()
        except JobStopped:
            return
        except DpfedError as err:
            self._fail(str(err))
        except Exception as err:  # a bug must fail the job visibly, not hang it
            log.exception("job %s crashed", self.job_id)
            self._fail(f"internal error: {type(err).__name__}: {err}")

    def _event(self, level: str, message: str, site_id: str = "") -> None:
        self.store.add_event(self.job_id, level, message, site_id=site_id)
        getattr(log, "warning" if level != "info" else "info")(
            "job=%s site=%s %s", self.job_id, site_id or "-", message
        )
        self.on_change(self.job_id)

    def _fail(self, reason: str) -> None:
        self.store.add_event(self.job_id, "error", reason)
        self.store.update_job(self.job_id, state="failed", error=reason)
        log.error("job=%s failed: %s", self.job_id, reason)
        self.on_change(self.job_id)
