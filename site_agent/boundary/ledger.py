"""The site's durable, append-only privacy ledger: every DP release charged to a dataset.

Specification
=============

* **Write-ahead.** The agent calls :meth:`Ledger.charge` *before* any update or metric leaves
  the site. :meth:`~Ledger.charge` returns only once the charge is committed and synced
  (SQLite ``journal_mode=WAL`` with ``synchronous=FULL``: the WAL is fsynced at every commit),
  so a crash or ``SIGKILL`` at any point afterwards cannot lose it. A crash between the charge
  and the send over-counts (the site paid for a release that never happened); the order makes
  under-counting impossible.
* **All or nothing.** One call is one transaction: either every event of the task is recorded
  or none is.
* **Append-only.** There are no update or delete methods, and SQLite triggers refuse
  ``UPDATE`` and ``DELETE`` on the charges table, so a bug elsewhere in the agent cannot lower
  the spend either.
* **Composition.** :meth:`Ledger.spent` composes every event ever charged to a dataset, across
  jobs, with :func:`common.dp.accounting.compute_epsilon` (PRV by default: Gopi, Lee & Wutschitz
  2021) at the δ asked for; each entry also keeps the δ its task was run at.
* **Check and charge in one transaction.** :meth:`Ledger.charge` takes an optional ``check``
  that sees the dataset's commitments (below) read *inside* the write transaction (SQLite
  ``BEGIN IMMEDIATE`` takes the database's write lock), and may raise to refuse; so two
  processes on one file can never both pass a budget check and together overspend.
* **Reservations.** A job admitted before its first round (:meth:`Ledger.reserve`) holds its
  whole projected cost: ``rounds`` times a per-round set of events. Each training task of that
  job charged afterwards uses up one round of it (any other release of the job is checked
  against the whole reservation, its own included); :meth:`Ledger.release` ends it (cancel, failure,
  completion). :meth:`Ledger.commitments` (what every budget check composes) is every charge
  plus the unused part of every other job's live reservation, so a concurrent job's admission
  cannot take what an admitted job was promised.
* **A budget belongs to the data.** The ledger is told which budget each dataset name draws
  on (``budgets``: name → key of the data, see ``site_agent.boundary.budget.data_key``);
  every read that composes (events, spent, commitments) covers every charge recorded under
  that key or under any name sharing it, so two names on one file share one budget.
* **Thread-safe.** One connection (``check_same_thread=False``) guarded by a lock, so the
  agent's task loop and its status/heartbeat thread may share a ledger.

The file holds a ``schema_version`` table; a ledger written by a newer, unknown schema is
refused rather than misread.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from common.dp.events import DpEvent
from common.errors import PrivacyAccountingError
from site_agent.boundary.ledger_schema import (
    SCHEMA_VERSION,
    check_delta,
    check_text,
    fsync_dir,
    setup_schema,
)

if TYPE_CHECKING:
    from common.dp.accounting import EpsilonBound

__all__ = ["SCHEMA_VERSION", "Ledger", "LedgerEntry", "Reservation"]

_COLUMNS: Final = (
    "id, dataset, job_id, round, task_id, kind, noise_multiplier, sample_rate, steps, delta, "
    "created_at"
)


@dataclass(frozen=True)
class LedgerEntry:
    """One committed charge: one DP event of one task, on one dataset."""

    id: int
    dataset: str
    job_id: str
    round: int
    task_id: str
    kind: str
    event: DpEvent
    delta: float
    created_at: float


@dataclass(frozen=True)
class Reservation:
    """A job's live hold on a budget: ``rounds`` times ``per_round``, ``used`` rounds spent."""

    grant_id: str
    dataset: str
    job_id: str
    per_round: tuple[tuple[str, DpEvent], ...]
    rounds: int
    used: int
    delta: float
    counts: tuple[int, ...] = ()
    """How many of the rounds release each event of ``per_round`` (default: every one)."""

    @property
    def remaining(self) -> list[DpEvent]:
        """The events of the rounds not yet charged (composed k-fold: ``steps`` × k)."""
        left = max(0, self.rounds - self.used)
        counts = self.counts or tuple(self.rounds for _ in self.per_round)
        # An event released in only some rounds: at most that many, and no more than are left.
        out = []
        for (_, e), count in zip(self.per_round, counts, strict=True):
            k = min(count, left)
            if k:
                out.append(DpEvent(e.noise_multiplier, e.sample_rate, e.steps * k))
        return out


Check = Callable[[list[DpEvent]], object]
"""Runs inside the charge's transaction on the dataset's commitments; raises to refuse."""


def _entry(row: tuple[object, ...]) -> LedgerEntry:
    (id_, dataset, job_id, round_, task_id, kind, sigma, q, steps, delta, created_at) = row
    assert isinstance(id_, int) and isinstance(round_, int) and isinstance(steps, int)
    assert isinstance(dataset, str) and isinstance(job_id, str)
    assert isinstance(task_id, str) and isinstance(kind, str)
    assert isinstance(sigma, float) and isinstance(q, float)
    assert isinstance(delta, float) and isinstance(created_at, float)
    return LedgerEntry(
        id=id_,
        dataset=dataset,
        job_id=job_id,
        round=round_,
        task_id=task_id,
        kind=kind,
        event=DpEvent(sigma, q, steps),
        delta=delta,
        created_at=created_at,
    )


class Ledger:
    """A site's privacy ledger in one SQLite file (see the module docstring).

    ``budgets`` maps each dataset name to the key of the data it reads (names on the same
    data share a key, hence a budget); a name it does not list is its own budget.
    """

    def __init__(self, path: Path, *, budgets: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._budgets = dict(budgets or {})
        self._lock = threading.Lock()
        # (dataset, delta, accountant) -> (events composed, ε): the highest bound reported.
        self._spent_marks: dict[tuple[str, float, str], tuple[int, float]] = {}
        # isolation_level=None: no implicit transactions; charge() opens its own.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        try:
            setup_schema(self._conn, self.path)
        except BaseException:
            self._conn.close()
            self._conn = None
            raise
        fsync_dir(self.path.parent)

    # ------------------------------------------------------------------ budgets

    def budget_of(self, dataset: str) -> str:
        """The key of the budget ``dataset`` draws on."""
        return self._budgets.get(dataset) or f"name:{dataset}"

    def _match(self, dataset: str) -> tuple[str, list[str]]:
        """SQL condition and parameters selecting every charge to ``dataset``'s budget."""
        key = self.budget_of(dataset)
        names = sorted({dataset, *(n for n, k in self._budgets.items() if k == key)})
        marks = ", ".join("?" for _ in names)
        return f"(budget = ? OR dataset IN ({marks}))", [key, *names]

    # ------------------------------------------------------------------ writing

    def charge(
        self,
        *,
        dataset: str,
        job_id: str,
        round: int,
        task_id: str,
        kind: str | Sequence[str],
        events: Sequence[DpEvent],
        delta: float,
        check: Check | None = None,
    ) -> list[LedgerEntry]:
        """Record every event of one task in one durable transaction; return the entries.

        ``kind`` names all the events, or each one (a sequence as long as ``events``).
        ``check``, when given, is called inside the transaction with the dataset's
        commitments (every charge to its budget and the unused part of every live
        reservation, see :meth:`commitments`; a training charge draws on its own job's
        reservation, so that one is left out for it); if it raises, nothing is recorded.

        Call this *before* the task's update leaves the site. When it returns, the charge is
        on disk; if it raises, nothing was recorded.
        """
        check_text("dataset", dataset)
        check_text("job_id", job_id)
        check_text("task_id", task_id)
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"The round must be a non-negative integer, got {round!r}.")
        check_delta(delta)
        events = list(events)
        if not events:
            raise ValueError("A charge must record at least one DP event.")
        kinds = [kind] * len(events) if isinstance(kind, str) else list(kind)
        if len(kinds) != len(events):
            raise ValueError(f"{len(kinds)} kinds given for {len(events)} events.")
        for k in kinds:
            check_text("kind", k)
        for e in events:
            if not isinstance(e, DpEvent):
                raise ValueError(f"Charges are DpEvent instances, got {type(e).__name__}.")
        now = time.time()
        budget = self.budget_of(dataset)
        rows = [
            (
                dataset,
                job_id,
                round,
                task_id,
                k,
                e.noise_multiplier,
                e.sample_rate,
                e.steps,
                float(delta),
                now,
                budget,
            )
            for k, e in zip(kinds, events, strict=True)
        ]
        with self._transaction() as conn:
            if check is not None:
                own = job_id if "train" in kinds else None
                check(self._commitments(conn, dataset, excluding_job=own))
            ids: list[int] = []
            for row in rows:
                cursor = conn.execute(
                    "INSERT INTO charges (dataset, job_id, round, task_id, kind, "
                    "noise_multiplier, sample_rate, steps, delta, created_at, budget) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                if cursor.lastrowid is None:  # pragma: no cover - sqlite always sets it
                    raise PrivacyAccountingError("SQLite did not report the charge's row id.")
                ids.append(cursor.lastrowid)
        return [
            LedgerEntry(
                id=id_,
                dataset=dataset,
                job_id=job_id,
                round=round,
                task_id=task_id,
                kind=k,
                event=e,
                delta=float(delta),
                created_at=now,
            )
            for id_, k, e in zip(ids, kinds, events, strict=True)
        ]

    def reserve(
        self,
        *,
        dataset: str,
        job_id: str,
        per_round: Sequence[tuple[str, DpEvent]],
        rounds: int,
        delta: float,
        check: Check,
        counts: Mapping[str, int] | None = None,
    ) -> Reservation:
        """Hold ``rounds`` × ``per_round`` of ``dataset``'s budget for ``job_id``.

        ``counts`` gives, by kind, how many of the rounds release that kind's event when
        fewer than all do (e.g. metrics only every k-th round).

        ``check`` sees the commitments *without* this job's own reservation and must raise
        to refuse; it is called inside the transaction that records the reservation. A job
        reserving again (its admission was repeated) replaces its earlier reservation.
        """
        check_text("dataset", dataset)
        check_text("job_id", job_id)
        check_delta(delta)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"A reservation covers at least one round, got {rounds!r}.")
        per_round = tuple(per_round)
        if not per_round:
            raise ValueError("A reservation must hold at least one DP event per round.")
        for k, e in per_round:
            check_text("kind", k)
            if not isinstance(e, DpEvent):
                raise ValueError(f"Reservations hold DpEvent instances, got {type(e).__name__}.")
        per_count = tuple(min(rounds, (counts or {}).get(k, rounds)) for k, _ in per_round)
        if any(c < 0 for c in per_count):
            raise ValueError(f"Release counts must be non-negative, got {counts!r}.")
        grant = uuid.uuid4().hex
        budget = self.budget_of(dataset)
        now = time.time()
        with self._transaction() as conn:
            check(self._commitments(conn, dataset, excluding_job=job_id))
            self._end(conn, job_id=job_id, dataset=dataset, reason="replaced", now=now)
            for (k, e), count in zip(per_round, per_count, strict=True):
                if not count:
                    continue
                conn.execute(
                    "INSERT INTO reservations (grant_id, dataset, budget, job_id, kind, "
                    "noise_multiplier, sample_rate, steps, rounds, delta, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        grant,
                        dataset,
                        budget,
                        job_id,
                        k,
                        e.noise_multiplier,
                        e.sample_rate,
                        e.steps,
                        count,
                        float(delta),
                        now,
                    ),
                )
        kept = [(pr, c) for pr, c in zip(per_round, per_count, strict=True) if c]
        return Reservation(
            grant,
            dataset,
            job_id,
            tuple(pr for pr, _ in kept),
            rounds,
            0,
            float(delta),
            tuple(c for _, c in kept),
        )

    def release(self, *, dataset: str, job_id: str, reason: str) -> bool:
        """End ``job_id``'s live reservation on ``dataset``'s budget; False if it had none."""
        check_text("reason", reason)
        with self._transaction() as conn:
            return self._end(conn, job_id=job_id, dataset=dataset, reason=reason, now=time.time())

    def _end(
        self, conn: sqlite3.Connection, *, job_id: str, dataset: str, reason: str, now: float
    ) -> bool:
        where, params = self._match(dataset)
        grants = [
            str(r[0])
            for r in conn.execute(
                f"SELECT DISTINCT grant_id FROM reservations WHERE job_id = ? AND {where} "
                "AND grant_id NOT IN (SELECT grant_id FROM reservation_ends)",
                [job_id, *params],
            )
        ]
        for g in grants:
            conn.execute(
                "INSERT INTO reservation_ends (grant_id, reason, created_at) VALUES (?, ?, ?)",
                (g, reason, now),
            )
        return bool(grants)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (the database's write lock is taken at BEGIN), committed and
        fsynced when the block ends, rolled back if it raises."""
        with self._lock:
            conn = self._open_conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")  # WAL + synchronous=FULL: fsynced before this returns
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ reading

    def entries(
        self, *, dataset: str | None = None, job_id: str | None = None
    ) -> list[LedgerEntry]:
        """Committed entries, oldest first, optionally filtered by dataset name and/or job."""
        clauses: list[str] = []
        params: list[str] = []
        if dataset is not None:
            clauses.append("dataset = ?")
            params.append(dataset)
        if job_id is not None:
            clauses.append("job_id = ?")
            params.append(job_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = (
                self._open_conn()
                .execute(f"SELECT {_COLUMNS} FROM charges{where} ORDER BY id", params)
                .fetchall()
            )
        return [_entry(tuple(r)) for r in rows]

    def events(self, dataset: str, *, job_id: str | None = None) -> list[DpEvent]:
        """The DP events charged to ``dataset``'s budget (optionally one job's), oldest first."""
        with self._lock:
            return self._events(self._open_conn(), dataset, job_id=job_id)

    def _events(
        self, conn: sqlite3.Connection, dataset: str, *, job_id: str | None = None
    ) -> list[DpEvent]:
        where, params = self._match(dataset)
        if job_id is not None:
            where += " AND job_id = ?"
            params.append(job_id)
        rows = conn.execute(
            f"SELECT noise_multiplier, sample_rate, steps FROM charges WHERE {where} ORDER BY id",
            params,
        ).fetchall()
        return [DpEvent(float(s), float(q), int(k)) for s, q, k in rows]

    def reservations(self, dataset: str) -> list[Reservation]:
        """The live reservations on ``dataset``'s budget, oldest first."""
        with self._lock:
            return self._reservations(self._open_conn(), dataset)

    def _reservations(self, conn: sqlite3.Connection, dataset: str) -> list[Reservation]:
        where, params = self._match(dataset)
        rows = conn.execute(
            "SELECT grant_id, dataset, job_id, kind, noise_multiplier, sample_rate, steps, "
            f"rounds, delta FROM reservations WHERE {where} "
            "AND grant_id NOT IN (SELECT grant_id FROM reservation_ends) ORDER BY id",
            params,
        ).fetchall()
        grouped: dict[str, list[tuple[Any, ...]]] = {}
        for r in rows:
            grouped.setdefault(str(r[0]), []).append(tuple(r))
        out = []
        for grant, rs in grouped.items():
            job_id = str(rs[0][2])
            # Each training task of the job charged since it was admitted uses up one round
            # (its other releases, e.g. quantile edges, are charged beside the reservation).
            used = conn.execute(
                f"SELECT COUNT(DISTINCT task_id) FROM charges WHERE {where} AND job_id = ? "
                "AND kind = 'train'",
                [*params, job_id],
            ).fetchone()[0]
            out.append(
                Reservation(
                    grant_id=grant,
                    dataset=str(rs[0][1]),
                    job_id=job_id,
                    per_round=tuple(
                        (str(r[3]), DpEvent(float(r[4]), float(r[5]), int(r[6]))) for r in rs
                    ),
                    rounds=max(int(r[7]) for r in rs),
                    used=int(used),
                    delta=float(rs[0][8]),
                    counts=tuple(int(r[7]) for r in rs),
                )
            )
        return out

    def commitments(self, dataset: str, *, excluding_job: str | None = None) -> list[DpEvent]:
        """What a budget check composes: every event charged to ``dataset``'s budget, plus
        the unused rounds of every live reservation but ``excluding_job``'s."""
        with self._lock:
            return self._commitments(self._open_conn(), dataset, excluding_job=excluding_job)

    def _commitments(
        self, conn: sqlite3.Connection, dataset: str, *, excluding_job: str | None
    ) -> list[DpEvent]:
        held = [
            e
            for r in self._reservations(conn, dataset)
            if r.job_id != excluding_job
            for e in r.remaining
        ]
        return self._events(conn, dataset) + held

    def datasets(self) -> list[str]:
        """Every dataset name with at least one charge, sorted."""
        with self._lock:
            rows = (
                self._open_conn()
                .execute("SELECT DISTINCT dataset FROM charges ORDER BY dataset")
                .fetchall()
            )
        return [str(r[0]) for r in rows]

    def spent(self, dataset: str, *, delta: float, accountant: str = "prv") -> EpsilonBound:
        """An upper bound on the ε spent on ``dataset``'s budget by all charges, at ``delta``,
        that never decreases while this ledger is open.

        A numerical accountant's bound moves within its own error (PRV: ``eps_error``, 0.3%)
        when the history grows, so it can come out a hair lower after a cheap charge. The
        ledger is append-only, so an earlier history is a subset of today's and its bound
        stays an upper bound of today's ε: reporting the larger of the two is sound."""
        # Imported here: the accountants load Opacus and torch, which recording a charge (a
        # process that only writes the ledger) does not need.
        from common.dp.accounting import compute_epsilon

        events = self.events(dataset)
        bound = compute_epsilon(events, delta=delta, accountant=accountant)
        key = (dataset, delta, accountant)
        with self._lock:
            count, previous = self._spent_marks.get(key, (0, 0.0))
            if len(events) >= count and previous > bound.epsilon:
                bound = dataclasses.replace(bound, epsilon=previous)
            self._spent_marks[key] = (len(events), bound.epsilon)
        return bound

    # ------------------------------------------------------------------ lifecycle

    def _open_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"The privacy ledger {self.path} is closed.")
        return self._conn

    def close(self) -> None:
        """Close the database; further calls raise ``ValueError``. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
