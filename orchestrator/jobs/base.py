"""The skeleton every job kind's thread shares (``orchestrator.jobs.kinds`` lists the kinds).

* the job's handles on the store and the broker, and its :class:`JobAccount` (the charges
  that status views read too);
* :meth:`JobThread._wait`: waiting for sites, polling until ready, a deadline, cancellation
  and shutdown;
* :meth:`JobThread._send`: one task to each of several sites with each site's charge written
  to the job ledger *before* it is dispatched (write-ahead: a restart after this leaves the
  release counted, whether or not the site answered), then the answers collected
  (``orchestrator.core.fanout``), abandoned at cancellation or shutdown;
* :meth:`JobThread._record`: charges for what was received, as it is received;
* cancellation (:meth:`JobThread.cancel`), shutdown (:class:`JobStopped`: the job resumes
  from its checkpoint when the orchestrator starts again; a job that has ended is never run
  again), job events, and failing the job visibly, never hanging it, on any error.

A kind supplies ``_run`` (its rounds and its release) and its own checkpoint; it is
registered in ``orchestrator.jobs.kinds``. A one-shot release (synthetic data, evaluation)
has no thread: :func:`send_one_shot` records what each site is charged as a job of its kind,
then asks the sites once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from common.dp.events import DpEvent
from common.errors import DpfedError, JobFailedError
from orchestrator.core.broker import Broker
from orchestrator.core.fanout import FanOutResult, fan_out
from orchestrator.core.store import ChargeRow, Store
from orchestrator.jobs.accounting import (
    JobAccount,
    charges_ahead,
    close_one_shot,
    open_one_shot,
)

log = logging.getLogger("dpfed.orchestrator")

_T = TypeVar("_T")


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

    # ------------------------------------------------------------------ control

    def cancel(self, by: str) -> None:
        self._cancelled_by = by

    def _check_cancelled(self) -> None:
        if self._cancelled_by is not None:
            raise JobFailedError(f"cancelled by {self._cancelled_by}")

    def _abandon_if_stopped(self) -> None:
        """Raise at cancellation (the job fails) or shutdown (:class:`JobStopped`)."""
        self._check_cancelled()
        if self.stopping.is_set():
            raise JobStopped()

    def _run(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            if self.store.job(self.job_id).state in ("completed", "failed"):
                return  # an ended job is never run again
            self._run()
        except JobStopped:
            return
        except DpfedError as err:
            self._fail(str(err))
        except Exception as err:  # a bug must fail the job visibly, not hang it
            log.exception("job %s crashed", self.job_id)
            self._fail(f"internal error: {type(err).__name__}: {err}")

    def _wait(
        self,
        ready: Callable[[], _T | None],
        *,
        timeout_s: float,
        on_timeout: Callable[[], _T],
        waiting: Callable[[], str] | None = None,
    ) -> _T:
        """``ready()``'s first value that is not None, polled every ``poll_s``; after
        ``timeout_s``, ``on_timeout()`` (which returns a value or raises). ``waiting()``: a
        message for the job's events when the first poll finds it not ready. Raises at
        cancellation or shutdown (:meth:`_abandon_if_stopped`)."""
        deadline = time.time() + timeout_s
        announced = False
        while True:
            value = ready()
            if value is not None:
                return value
            if waiting is not None and not announced:
                self._event("info", waiting())
                announced = True
            self._abandon_if_stopped()
            if time.time() > deadline:
                return on_timeout()
            time.sleep(self.poll_s)

    # ------------------------------------------------------------------ charges and tasks

    def _record(self, rows: Sequence[ChargeRow]) -> None:
        """Write charges to the job ledger (one transaction) and fold them into the account."""
        if rows:
            self.store.add_charges(list(rows))
            self.account.sync(self.store)

    def _send(
        self,
        site_ids: list[str],
        rnd: int,
        *,
        kind: str,
        dataset: str,
        delta: float,
        request_json: str,
        events: Sequence[tuple[str, DpEvent]],
        timeout_s: float,
    ) -> FanOutResult:
        """Charge every site ``events`` (write-ahead), then send each the request and collect
        the answers until all answered or ``timeout_s`` passed; stops at cancellation or
        shutdown (the unanswered tasks are withdrawn)."""
        task_ids = self._charge_ahead(site_ids, rnd, dataset=dataset, delta=delta, events=events)
        return fan_out(
            self.broker,
            site_ids=site_ids,
            job_id=self.job_id,
            kind=kind,
            dataset=dataset,
            request_json=request_json,
            timeout_s=timeout_s,
            poll_s=self.poll_s,
            round_=rnd,
            rounds=1,
            check=self._abandon_if_stopped,
            task_ids=task_ids,
        )

    def _charge_ahead(
        self,
        site_ids: Sequence[str],
        rnd: int,
        *,
        dataset: str,
        delta: float,
        events: Sequence[tuple[str, DpEvent]],
    ) -> dict[str, str]:
        """Write every site's charge for a task it is about to be sent (write-ahead: a crash
        or an unanswered task leaves the release counted); returns each site's task id."""
        task_ids, rows = charges_ahead(
            job_id=self.job_id,
            round=rnd,
            dataset=dataset,
            delta=delta,
            events={sid: events for sid in site_ids},
        )
        self._record(rows)
        return task_ids

    # ------------------------------------------------------------------ events

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


def send_one_shot(
    broker: Broker,
    store: Store | None,
    *,
    kind: str,
    job_id: str,
    site_ids: list[str],
    dataset: str,
    delta: float,
    request_json: str,
    timeout_s: float,
    assigned: Mapping[str, Sequence[tuple[str, DpEvent]]],
    blob: bytes = b"",
) -> FanOutResult:
    """A one-shot release: each site's ``assigned`` charge written to the job ledger as job
    ``job_id`` of ``kind`` *before* the request goes out (:func:`open_one_shot`; nothing is
    recorded without a store), the request to every site, the answers collected until all
    answered or ``timeout_s``, then the job closed (:func:`close_one_shot`): completed with
    the answering sites, or failed when none answered or the fan-out raised."""
    missing = sorted(set(site_ids) - set(assigned))
    if missing:
        raise ValueError(f"one-shot release {job_id}: no assigned events for {missing}")
    task_ids = None
    if store is not None:
        task_ids = open_one_shot(
            store,
            job_id=job_id,
            kind=kind,
            dataset=dataset,
            delta=delta,
            request_json=request_json,
            assigned={sid: assigned[sid] for sid in site_ids},
        )
    try:
        res = fan_out(
            broker,
            site_ids=site_ids,
            job_id=job_id,
            kind=kind,
            dataset=dataset,
            request_json=request_json,
            blob=blob,
            timeout_s=timeout_s,
            task_ids=task_ids,
        )
    except BaseException as err:
        if store is not None:
            close_one_shot(store, job_id=job_id, answered=[], error=f"not sent: {err}")
        raise
    if store is not None:
        close_one_shot(
            store,
            job_id=job_id,
            answered=sorted(res.updates),
            error="" if res.updates else "no site answered",
        )
    return res
