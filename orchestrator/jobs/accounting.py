"""A job's charges folded per site as they are recorded, and the job's ε from them.

One :class:`JobAccount` per job serves every reader: the rounds' history, the status a
client watches, the card and the ledger view. :meth:`JobAccount.sync` folds only the charge
rows recorded since the last call, so a read in round 200 costs what it costs in round 2. It
reads by increasing row id, which never skips a row because a job's rows have one writer at a
time (the job's thread, or a one-shot release's single call), each transaction committed
before the next one starts, and row ids grow with every write.

Per site the account keeps the history merged by (σ, q), which is exact (self-composition
is composition: :func:`common.dp.accounting.compute_epsilon` merges the same way):

* :meth:`JobAccount.running` gives each site's running bound
  (:func:`common.dp.running.running_epsilon`, a sound bound at most ~2% above exact,
  recomputed once per step bucket), for figures reported while a job runs;
* :meth:`JobAccount.exact` composes each history with the tight accountant (PRV, or what it
  fell back to, named), for the released ε and anything that must be tight.

The job's ε is the maximum over sites (sites hold disjoint records: parallel composition).
Each bound names the accountant that produced it (PRV, or PLD/RDP where PRV fell back).

A charge row (:func:`charge_row`) is one site's charges for one task, for every job kind;
its events are stored as :func:`charged_event_dict` gives them (``common.dp.events``' dict
form plus the release's kind). A one-shot release (synthetic data, evaluation) gets a job row
of its own kind, its charges written before the request is sent
(:func:`open_one_shot`), so it is listed like any job.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.domain import ChargedEvent, LedgerRow, SiteSpend
from common.dp.accounting import EpsilonBound, compute_epsilon
from common.dp.events import DpEvent, event_from_dict, event_to_dict
from common.dp.running import running_epsilon
from common.errors import PrivacyAccountingError
from orchestrator.core.store import ChargeRow, JobRow, Store

ACCOUNTANT = "prv"
"""The accountant asked for; :class:`JobEpsilon` says which one answered."""


def charged_event_dict(e: ChargedEvent) -> dict[str, Any]:
    """A charged DP event as the job ledger stores it and the model card shows it."""
    return {"kind": e.kind, **event_to_dict(e.event)}


def charged_events(raw: Sequence[Mapping[str, Any]]) -> tuple[ChargedEvent, ...]:
    """The inverse of :func:`charged_event_dict`."""
    return tuple(ChargedEvent(kind=str(e["kind"]), event=event_from_dict(e)) for e in raw)


@dataclass(frozen=True)
class JobEpsilon:
    """A job's ε: each site's bound, the job's ε (their maximum) and who computed them."""

    per_site: dict[str, EpsilonBound]
    delta: float

    @property
    def epsilon(self) -> float:
        return max((b.epsilon for b in self.per_site.values()), default=0.0)

    @property
    def accountant(self) -> str:
        """The accountant behind the bounds ("prv", "pld", "rdp", or several joined by "+")."""
        used = sorted({b.accountant for b in self.per_site.values()})
        return "+".join(used) if used else ACCOUNTANT

    def site_epsilons(self) -> dict[str, float]:
        return {sid: b.epsilon for sid, b in self.per_site.items()}


@dataclass
class _Ledger:
    """One site's charges on one dataset for the job (a row of the ledger view)."""

    delta: float
    rounds: set[int] = field(default_factory=set)
    events: list[ChargedEvent] = field(default_factory=list)


@dataclass
class _Site:
    """One site's charges for the job, folded."""

    history: dict[tuple[float, float], int] = field(default_factory=dict)  # (σ, q) → steps
    train_steps: int = 0
    last_train: DpEvent | None = None  # the last charge's last training event
    num_examples: int = 0
    max_grad_norm: float = 0.0
    dataset_epsilon: float = 0.0
    ledgers: dict[str, _Ledger] = field(default_factory=dict)  # by dataset

    def fold(self, c: ChargeRow) -> None:
        evs = charged_events(c.events)
        train = [e.event for e in evs if e.kind == "train"]
        for e in evs:
            key = (e.event.noise_multiplier, e.event.sample_rate)
            self.history[key] = self.history.get(key, 0) + e.event.steps
        self.train_steps += sum(e.steps for e in train)
        self.last_train = train[-1] if train else None
        self.num_examples = c.num_examples
        self.max_grad_norm = c.max_grad_norm
        self.dataset_epsilon = max(self.dataset_epsilon, c.dataset_epsilon)
        ledger = self.ledgers.setdefault(c.dataset, _Ledger(delta=c.delta))
        ledger.rounds.add(c.round)
        ledger.events.extend(evs)

    def merged(self) -> list[DpEvent]:
        return [DpEvent(s, q, n) for (s, q), n in sorted(self.history.items())]

    @property
    def events(self) -> list[ChargedEvent]:
        """Every charged event, dataset by dataset (in the order each was first charged)."""
        return [e for ledger in self.ledgers.values() for e in ledger.events]


def _finite(sid: str, bound: EpsilonBound) -> EpsilonBound:
    if not math.isfinite(bound.epsilon):
        raise PrivacyAccountingError(f"no finite ε for site {sid}")
    return bound


class JobAccount:
    """The charges of one job, per site (see the module docstring). Thread-safe: the job's
    thread folds and reads while RPC threads read."""

    def __init__(self, job_id: str, *, delta: float) -> None:
        self.job_id = job_id
        self.delta = delta
        self._sites: dict[str, _Site] = {}
        self._last_id = 0
        self._lock = threading.Lock()

    @classmethod
    def of_rows(cls, rows: Iterable[ChargeRow], *, job_id: str, delta: float) -> JobAccount:
        """An account of rows already in hand (e.g. a one-shot release's, before or without
        the store)."""
        account = cls(job_id, delta=delta)
        for c in rows:
            account._fold(c)
        return account

    def sync(self, store: Store) -> JobAccount:
        """Fold the job's charge rows recorded since the last call; returns ``self``."""
        with self._lock:
            for c in store.charges(self.job_id, after_id=self._last_id):
                self._fold(c)
        return self

    def _fold(self, c: ChargeRow) -> None:
        self._sites.setdefault(c.site_id, _Site()).fold(c)
        if c.id is not None:
            self._last_id = max(self._last_id, c.id)

    def site_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._sites)

    def histories(self) -> dict[str, list[DpEvent]]:
        """Each site's merged history (σ, q, total steps), in site order."""
        with self._lock:
            return {sid: s.merged() for sid, s in sorted(self._sites.items())}

    def running(self) -> JobEpsilon:
        """Each site's running bound: sound, at most ~2% above exact, cheap every round."""
        return JobEpsilon(
            per_site={
                sid: running_epsilon(h, delta=self.delta, accountant=ACCOUNTANT)
                for sid, h in self.histories().items()
            },
            delta=self.delta,
        )

    def exact(self, *, within_s: float | None = None) -> JobEpsilon:
        """Each site's tight bound. ``within_s``: a time budget for the whole call (an RPC
        thread's): sites whose tight bound is not ready by then get their RDP bound (sound,
        looser; labelled "rdp")."""
        deadline = None if within_s is None else time.monotonic() + within_s
        per_site: dict[str, EpsilonBound] = {}
        for sid, h in self.histories().items():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            bound = compute_epsilon(h, delta=self.delta, accountant=ACCOUNTANT, within_s=left)
            per_site[sid] = _finite(sid, bound)
        return JobEpsilon(per_site=per_site, delta=self.delta)

    def spends(self, per_site_epsilon: dict[str, float]) -> list[SiteSpend]:
        """Per site: the job's totals (training steps summed; σ and q of the last charge's
        training event, 0 when it had none), with the given ε."""
        with self._lock:
            return [
                SiteSpend(
                    site_id=sid,
                    num_examples=s.num_examples,
                    noise_multiplier=s.last_train.noise_multiplier if s.last_train else 0.0,
                    sample_rate=s.last_train.sample_rate if s.last_train else 0.0,
                    steps=s.train_steps,
                    max_grad_norm=s.max_grad_norm,
                    epsilon=per_site_epsilon.get(sid, 0.0),
                    dataset_epsilon=s.dataset_epsilon,
                    events=tuple(s.events),
                )
                for sid, s in sorted(self._sites.items())
            ]

    def ledger_rows(self, per_site_epsilon: dict[str, float]) -> list[LedgerRow]:
        """One row per (site, dataset) the job charged: its ε (NaN where unknown), the δ of
        its first charge, the number of rounds and every event."""
        with self._lock:
            return [
                LedgerRow(
                    site_id=sid,
                    dataset=dataset,
                    job_id=self.job_id,
                    epsilon=per_site_epsilon.get(sid, math.nan),
                    delta=ledger.delta,
                    rounds=len(ledger.rounds),
                    events=tuple(ledger.events),
                )
                for sid, s in sorted(self._sites.items())
                for dataset, ledger in sorted(s.ledgers.items())
            ]


class Accounts:
    """Every job's account, created on first use from the store and kept in step with it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._accounts: dict[str, JobAccount] = {}
        self._lock = threading.Lock()

    def of(self, job_id: str, *, delta: float) -> JobAccount:
        """The job's account with every charge recorded so far."""
        with self._lock:
            account = self._accounts.get(job_id)
            if account is None:
                account = self._accounts[job_id] = JobAccount(job_id, delta=delta)
        return account.sync(self._store)


def job_epsilon(
    charges: Iterable[ChargeRow], *, delta: float, within_s: float | None = None
) -> JobEpsilon:
    """The exact ε of charge rows in hand (:meth:`JobAccount.exact`)."""
    return JobAccount.of_rows(charges, job_id="", delta=delta).exact(within_s=within_s)


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
    """One site's charges for one task, as the job ledger keeps them: ``events`` are
    (release kind, event) pairs."""
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


def charges_ahead(
    *,
    job_id: str,
    round: int,
    dataset: str,
    delta: float,
    events: Mapping[str, Sequence[tuple[str, DpEvent]]],
) -> tuple[dict[str, str], list[ChargeRow]]:
    """Each site's charge for a task it is about to be sent, under a fresh task id:
    ``(task ids by site, charge rows)``, to be written before any task is dispatched."""
    task_ids = {sid: uuid.uuid4().hex for sid in events}
    rows = [
        charge_row(
            job_id=job_id,
            round=round,
            site_id=sid,
            dataset=dataset,
            task_id=task_ids[sid],
            events=list(site_events),
            delta=delta,
        )
        for sid, site_events in sorted(events.items())
    ]
    return task_ids, rows


def open_one_shot(
    store: Store,
    *,
    job_id: str,
    kind: str,
    dataset: str,
    delta: float,
    request_json: str,
    assigned: Mapping[str, Sequence[tuple[str, DpEvent]]],
) -> dict[str, str]:
    """Before a one-shot release (``synth``, ``evaluate``) is sent: a running job row of that
    kind, and every site's charge for the task it is about to receive (write-ahead,
    :func:`charges_ahead`), so ``status`` and ``ledger`` show it like a training job's.
    Returns each site's task id.

    What is charged is ``assigned[site]``, the (kind, event) pairs the request fixes for that
    site and that the orchestrator computed from public inputs (an evaluation's σ, the
    synthetic-data plan for the site's published columns), never what a site will report.
    A site that then refuses or does not answer stays counted: an over-count, never an
    under-count. :func:`close_one_shot` ends the job.
    """
    now = time.time()
    store.add_job(
        JobRow(
            job_id=job_id,
            name=kind,
            dataset=dataset,
            spec_json=json.dumps({"kind": kind, "request": json.loads(request_json or "{}")}),
            state="running",
            round=1,
            rounds=1,
            epsilon=0.0,
            delta=delta,
            accountant=ACCOUNTANT,
            created_at=now,
            updated_at=now,
            participants={},
        )
    )
    task_ids, rows = charges_ahead(
        job_id=job_id, round=1, dataset=dataset, delta=delta, events=assigned
    )
    if rows:
        store.add_charges(rows)
    return task_ids


def close_one_shot(
    store: Store, *, job_id: str, answered: Sequence[str], error: str = ""
) -> JobEpsilon | None:
    """End a one-shot release opened by :func:`open_one_shot`: completed with the answering
    sites as participants, or failed with ``error``; its ε from every charge written ahead.
    Returns the job's ε, or None when no site was charged."""
    rows = store.charges(job_id)
    eps = job_epsilon(rows, delta=store.job(job_id).delta) if rows else None
    fields: dict[str, Any] = {
        "state": "failed" if error else "completed",
        "error": error,
        "participants": {sid: 0.0 for sid in sorted(answered)},
    }
    if eps is not None:
        fields.update(epsilon=eps.epsilon, accountant=eps.accountant)
    store.update_job(job_id, **fields)
    return eps
