"""The orchestrator's one record of what each site was charged, and the one place a job's ε is
composed from it (issue 16.7), for every job kind: training, mixture, synthetic data,
evaluation.

* :func:`record` writes a site's charges for one task as a ``ChargeRow`` (the job ledger that
  ``orchestrator status`` and ``orchestrator ledger`` read); a one-shot release (synthetic
  data, evaluation) first gets a job row of its own kind, so it is listed like any job.
* :func:`job_epsilon` composes each site's events with the tight accountant and takes the
  maximum over sites (disjoint records: parallel composition), and names the accountant that
  actually produced each bound (PRV, or PLD where PRV fell back), never a constant.
* :func:`assigned_worst_case` is what a rejected training update is charged (issue 16.8): the
  most its assigned task could have cost, from public inputs only (the assignment), since a
  rejected update still depended on the site's data and its rejection is published.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence

from common.domain import ChargedEvent, UpdateMeta
from common.dp.events import DpEvent
from orchestrator.core.store import ChargeRow, JobRow, Store
from orchestrator.jobs.accounting import ACCOUNTANT, JobAccount, JobEpsilon
from orchestrator.update_bounds import Assignment
from orchestrator.views import charged_event_dict


def job_epsilon(
    charges: Iterable[ChargeRow], *, delta: float, within_s: float | None = None
) -> JobEpsilon:
    """Compose every event charged to each site for a job (see the module docstring).

    ``within_s``: a time budget for the whole call (an RPC thread's): sites whose tight bound
    is not ready by then get their RDP bound (``common.dp.accounting.compute_epsilon``)."""
    account = JobAccount.of_rows(charges, job_id="", delta=delta)
    return account.exact(within_s=within_s)


def charge_row(
    *,
    job_id: str,
    round: int,
    site_id: str,
    dataset: str,
    task_id: str,
    events: Sequence[tuple[str, DpEvent]],
    delta: float,
    num_examples: int = 0,
    max_grad_norm: float = 0.0,
    dataset_epsilon: float = 0.0,
    policy_delta: float = 0.0,
    grad_sample_mode: str = "",
) -> ChargeRow:
    """One site's charges for one task, as the job ledger keeps them."""
    return ChargeRow(
        job_id=job_id,
        round=round,
        site_id=site_id,
        dataset=dataset,
        task_id=task_id,
        num_examples=num_examples,
        max_grad_norm=max_grad_norm,
        delta=delta,
        dataset_epsilon=dataset_epsilon,
        policy_delta=policy_delta,
        events=[charged_event_dict(ChargedEvent(k, e)) for k, e in events],
        grad_sample_mode=grad_sample_mode,
    )


def record(store: Store, rows: Sequence[ChargeRow]) -> None:
    """Write charges to the job ledger (one transaction)."""
    if rows:
        store.add_charges(list(rows))


def record_one_shot(
    store: Store,
    *,
    job_id: str,
    kind: str,
    dataset: str,
    delta: float,
    request_json: str,
    answers: dict[str, UpdateMeta],
) -> None:
    """A one-shot release (``synth``, ``evaluate``): a completed job row of that kind and each
    answering site's charges as its DP report lists them, so ``status`` and ``ledger`` show
    them like a training job's."""
    now = time.time()
    store.add_job(
        JobRow(
            job_id=job_id,
            name=kind,
            dataset=dataset,
            spec_json=json.dumps({"kind": kind, "request": json.loads(request_json or "{}")}),
            state="completed",
            round=1,
            rounds=1,
            epsilon=0.0,
            delta=delta,
            accountant=ACCOUNTANT,
            created_at=now,
            updated_at=now,
            participants={sid: 0.0 for sid in answers},
        )
    )
    rows = [
        charge_row(
            job_id=job_id,
            round=1,
            site_id=sid,
            dataset=dataset,
            task_id=meta.task_id,
            events=[(e.kind, e.event) for e in meta.dp_report.events],
            delta=meta.dp_report.delta or delta,
            num_examples=meta.num_examples,
            dataset_epsilon=meta.dp_report.dataset_epsilon,
            policy_delta=meta.dp_report.policy_delta,
        )
        for sid, meta in sorted(answers.items())
        if meta.dp_report.events
    ]
    record(store, rows)
    if rows:
        eps = job_epsilon(rows, delta=delta)
        store.update_job(job_id, epsilon=eps.epsilon, accountant=eps.accountant)


def assigned_worst_case(a: Assignment) -> list[tuple[str, DpEvent]]:
    """The most a task assigned as ``a`` can have charged: the largest sample rate (the
    registered rows, no canary) with the most steps (every canary included), and the
    metrics release when the job has one."""
    q, _ = a.schedule(a.num_rows)
    _, steps = a.schedule(a.num_rows + a.extra_rows)
    out = [("train", DpEvent(noise_multiplier=a.noise_multiplier, sample_rate=q, steps=steps))]
    metric = a.metrics_event()
    if metric is not None:
        out.append(("metrics", metric))
    return out
